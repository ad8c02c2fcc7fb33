"""CPU multi-teacher OPD (MOPD): one student distilled from two teachers at
once, each teacher scoring only the rows of its own skill. No downloads: the
tokenizer, the level-tagged prompts, teacher ``low`` (trained on arithmetic
levels 1-2 only), teacher ``high`` (level 3 only) and a student built like
the quickstart's (levels 1-2 and a fifth of its examples on level 3: above
zero on level 3, far below ``high``) are made under ``$WORKDIR/assets`` on
the first run (cached after; organisms.py ``MultiTeacher``).

  python -m opd_jax.train --config=configs/multi_teacher.py --workdir=/tmp/opd_multi_teacher

Rows are routed by the prompts' ``source`` field (``arithmetic/L<n>``):
``low`` lists levels 1-2, ``high`` is the default teacher (every other
source); ``data.mixture`` weighs the sources so each batch of 64 holds 16
prompts for ``low`` and 48 for ``high`` (the skill to learn). The recipe is
the quickstart's earlier one (reverse KL, 1 sample per prompt, lr 2e-3 constant, 400
steps).
Metrics are logged per teacher as ``teacher/<name>/<metric>``.
"""

from opd_jax import configs_lib, organisms


def get_config(arg=None):
  a = configs_lib.parse_arg(arg, loss="reverse_kl", steps=400, lam=1.0, lr=2e-3, seed=0)
  q = organisms.MULTI_TEACHER
  c = configs_lib.base_config()
  c.prepare = "multi_teacher"  # fills student / teachers / data paths
  c.seed = a.seed  # also the organisms' and their data's seeds
  c.teachers.low = configs_lib.teacher_config(sources=organisms.multi_teacher_sources(q.low_levels))
  c.teachers.high = configs_lib.teacher_config(default=True)
  c.batch_size = 64
  # Per-teacher quotas: 64 * W_k / sum(W) prompts (low 2/8, high 6/8).
  c.data.mixture = {
    **{f"arithmetic/L{level}": 1.0 for level in q.low_levels},
    **{f"arithmetic/L{level}": 6.0 / len(q.high_levels) for level in q.high_levels},
  }
  c.sampling.num_samples = 1  # a near-deterministic student: more prompts beat more samples
  c.sampling.max_new_tokens = q.max_new_tokens
  c.sampling.temperature = 1.0
  c.on_policy_fraction = a.lam
  c.loss = configs_lib.loss_config(a.loss, chunk=20)
  c.optimizer.update(
    dict(lr=a.lr, schedule="constant", warmup_steps=10, weight_decay=0.0, grad_clip=1.0)
  )
  c.metrics.enabled = False
  c.metrics.position_chunk = 20
  c.total_steps = a.steps
  c.log_every = 5
  c.checkpoint_every = 100
  c.eval_every = 50
  c.eval_at_start = True
  c.evals.low = configs_lib.eval_config(levels="+".join(map(str, q.low_levels)), num_examples=64)
  c.evals.high = configs_lib.eval_config(levels="+".join(map(str, q.high_levels)), num_examples=64)
  return c
