"""Weak-to-strong *reverse* distillation (arXiv 2604.13016, Fig. 1 middle):
the "teacher" is weaker than the student. OPD pulls the student toward the
teacher's thinking pattern, so the strong student's accuracy falls toward the
weak teacher's — watch ``eval/*/avg@k`` and ``overlap_ratio``.

  python -m opd_jax.train \
    --config=configs/weak_to_strong.py:student=STRONG_DIR,teacher=WEAK_DIR,prompts=FILE \
    --workdir=runs/w2s
"""

from opd_jax import configs_lib


def get_config(arg=None):
  a = configs_lib.parse_arg(
    arg,
    student="",
    teacher="",
    prompts="",
    tokenizer="",
    loss="topk_opd",
    steps=200,
    lr=1e-6,
    task="arithmetic",
    eval_levels="",
  )
  c = configs_lib.base_config()
  c.student.path = a.student  # the strong model
  c.teacher.path = a.teacher  # the weak model
  c.tokenizer = a.tokenizer
  c.data.train_files = a.prompts
  c.loss = configs_lib.loss_config(a.loss)
  c.optimizer.update(dict(lr=a.lr, schedule="constant"))
  c.total_steps = a.steps
  c.eval_every = max(1, a.steps // 10)
  c.eval_at_start = True
  c.evals.student_task = configs_lib.eval_config(
    task=a.task, levels=a.eval_levels, num_examples=128
  )
  return c
