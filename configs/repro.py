"""One OPD run of the miniature reproduction of arXiv 2604.13016.

The organisms are made by ``experiments/organisms.py`` under ``ASSETS``
(``WORKDIR/organisms`` of ``experiments/reproduce.py``); pick them by name:

  python -m opd_jax.train --workdir=runs/x \
    --config=configs/repro.py:assets=runs/repro/organisms,teacher=teacher_b,loss=reverse_kl,seed=1

Without ``assets`` the run expects the reproduction layout
(``REPRO/runs/<name>`` beside ``REPRO/organisms``). ``prompts`` is a data key
of the assets (``opd_prompts``, ``prompt_pool``) or a ``.jsonl`` path;
``cold_start=N`` runs N SFT steps on verified teacher rollouts before OPD
(same total steps). Paper settings (Sec. "Hyperparameters") are kept where
they scale: temperature 1, top_p 1, AdamW with a constant lr,
no warmup, weight decay 0.01, clip 1.0, one update per batch, k = 16 metrics.
"""

import os
import sys

from opd_jax import configs_lib

_EXPERIMENTS = os.path.join(
  os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments"
)
if _EXPERIMENTS not in sys.path:
  sys.path.insert(0, _EXPERIMENTS)
import miniature  # noqa: E402  (experiments/miniature.py: the miniature's settings)


def get_config(arg=None):
  a = configs_lib.parse_arg(
    arg,
    assets="",
    smoke=False,
    student="student",
    teacher="teacher_new",
    prompts="opd_prompts",
    loss="reverse_kl",
    seed=0,
    steps=0,
    lr=0.0,
    cold_start=0,
  )
  m = miniature.miniature(a.smoke)
  paths = miniature.miniature_paths(a.assets or "$WORKDIR/../../organisms")
  c = configs_lib.base_config()
  c.seed = a.seed
  c.student.path = paths.get(a.student, a.student)
  c.teacher.path = paths.get(a.teacher, a.teacher)
  c.tokenizer = paths["tokenizer"]
  c.data.train_files = a.prompts if a.prompts.endswith(".jsonl") else paths[a.prompts]
  c.data.max_prompt_len = m.max_prompt_len
  c.batch_size = m.opd_batch
  c.sampling.update(
    dict(max_new_tokens=m.max_new_tokens, temperature=1.0, top_p=1.0, num_samples=m.num_samples)
  )
  c.loss = configs_lib.loss_config(a.loss, chunk=m.max_new_tokens // 2)
  c.optimizer.update(
    dict(lr=a.lr or m.opd_lr, schedule="constant", warmup_steps=0, weight_decay=0.01, grad_clip=1.0)
  )
  c.metrics.update(dict(enabled=True, top_k=16, position_chunk=8))
  c.total_steps = a.steps or m.opd_steps
  c.cold_start.steps = a.cold_start
  c.cold_start.max_prompts = m.cold_start_prompts
  c.log_every = 1
  c.checkpoint_every = c.total_steps
  c.keep_checkpoints = 1
  c.eval_every = m.eval_every
  c.eval_at_start = True
  c.evals.all = miniature.miniature_eval(m)
  c.progress_bar = False
  return c
