"""CPU quickstart: OPD of a small student from a larger teacher on the built-in
arithmetic task. No downloads: the tokenizer, data, teacher and student are
made under ``$WORKDIR/assets`` on the first run (cached after; organisms.py,
``Quickstart``): the teacher solves level 3 (3-digit addition), the student
knows levels 1-2 and a little of level 3; OPD on level-3 prompts closes most
of the gap (README: the three-seed check, experiments/quickstart_check.py).

  python -m opd_jax.train --config=configs/quickstart.py --workdir=/tmp/opd_quickstart
"""

from opd_jax import configs_lib


def get_config(arg=None):
  a = configs_lib.parse_arg(arg, loss="reverse_kl", steps=150, lam=1.0, lr=2e-3, seed=0)
  c = configs_lib.base_config()
  c.prepare = "quickstart"  # fills student / teacher / data paths
  c.seed = a.seed  # also the organisms' and their data's seeds
  c.batch_size = 64  # prompts per step
  c.sampling.num_samples = 1  # a near-deterministic student: more prompts beat more samples
  c.sampling.max_new_tokens = 40
  c.sampling.temperature = 1.0
  c.on_policy_fraction = a.lam
  c.loss = configs_lib.loss_config(a.loss, chunk=20)
  c.optimizer.update(
    dict(
      lr=a.lr,
      schedule="cosine",  # to 0.1 lr at the end: a steadier last eval than a constant lr
      warmup_steps=max(1, min(10, a.steps // 10)),
      end_lr_factor=0.1,
      weight_decay=0.0,
      grad_clip=1.0,
    )
  )
  # The paper's token metrics cost more than the step here; the loss is the
  # per-token reverse KL (token mean) that the summary plots.
  c.metrics.enabled = False
  c.metrics.position_chunk = 20
  c.total_steps = a.steps
  c.log_every = 5
  c.checkpoint_every = 50
  c.eval_every = 25
  c.eval_at_start = True
  c.eval_teacher = True
  c.evals.hard = configs_lib.eval_config(levels="3", num_examples=64)
  return c
