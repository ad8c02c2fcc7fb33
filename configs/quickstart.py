"""CPU quickstart: OPD of a small student from a larger teacher on the built-in
arithmetic task. No downloads: the tokenizer, data, teacher and student are
made under ``$WORKDIR/assets`` on the first run (cached after).

  python -m opd_jax.train --config=configs/quickstart.py --workdir=/tmp/opd_quickstart
"""

from opd_jax import configs_lib


def get_config(arg=None):
  a = configs_lib.parse_arg(arg, loss="reverse_kl", steps=80, lam=1.0, lr=3e-4)
  c = configs_lib.base_config()
  c.prepare = "quickstart"  # fills student / teacher / data paths
  c.batch_size = 16
  c.sampling.num_samples = 2
  c.sampling.max_new_tokens = 48
  c.sampling.temperature = 1.0
  c.on_policy_fraction = a.lam
  c.loss = configs_lib.loss_config(a.loss, chunk=16)
  c.optimizer.update(dict(lr=a.lr, schedule="constant", weight_decay=0.0, grad_clip=1.0))
  c.metrics.position_chunk = 16
  c.total_steps = a.steps
  c.checkpoint_every = 20
  c.eval_every = 0
  c.eval_at_start = True
  c.evals.hard = configs_lib.eval_config(levels="3+4", num_examples=64)
  return c
