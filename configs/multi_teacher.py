"""CPU multi-teacher OPD (MOPD): one student distilled from two teachers at
once, each teacher scoring only the rows of its own skill. No downloads: the
tokenizer, the level-tagged prompts, teacher ``low`` (strong on arithmetic
levels 1-2), teacher ``high`` (levels 3-4) and a student that knows levels
1-2 only are made under ``$WORKDIR/assets`` on the first run (cached after).

  python -m opd_jax.train --config=configs/multi_teacher.py --workdir=/tmp/opd_multi_teacher

Rows are routed by the prompts' ``source`` field (``arithmetic/L<n>``):
``low`` lists levels 1-2, ``high`` is the default teacher (every other
source); each batch holds 8 prompts per teacher. Metrics are logged per
teacher as ``teacher/<name>/<metric>``.
"""

from opd_jax import configs_lib, organisms


def get_config(arg=None):
  a = configs_lib.parse_arg(arg, loss="reverse_kl", steps=200, lam=1.0, lr=3e-4)
  q = organisms.MULTI_TEACHER
  c = configs_lib.base_config()
  c.prepare = "multi_teacher"  # fills student / teachers / data paths
  c.teachers.low = configs_lib.teacher_config(
    sources=organisms.multi_teacher_sources(q["low_levels"])
  )
  c.teachers.high = configs_lib.teacher_config(default=True)
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
  c.evals.low = configs_lib.eval_config(levels="1+2", num_examples=64)
  c.evals.high = configs_lib.eval_config(levels="3+4", num_examples=64)
  return c
