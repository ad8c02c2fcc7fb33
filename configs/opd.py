"""Generic OPD run on local Hugging Face checkpoints and a prompt file.

  python -m opd_jax.train \
    --config=configs/opd.py:student=DIR,teacher=DIR,prompts=FILE,loss=jsd \
    --config.loss.beta=0.9 --config.on_policy_fraction=0.5 --workdir=runs/x

Every setting (loss and its kwargs, λ, sampling, batch, optimizer, mesh) is
overridable with ``--config.<key>=<value>``.
"""

from opd_jax import configs_lib


def get_config(arg=None):
  a = configs_lib.parse_arg(
    arg, student="", teacher="", prompts="", tokenizer="", loss="reverse_kl", steps=100
  )
  c = configs_lib.base_config()
  c.student.path = a.student
  c.teacher.path = a.teacher
  c.tokenizer = a.tokenizer
  c.data.train_files = a.prompts
  c.loss = configs_lib.loss_config(a.loss)
  c.total_steps = a.steps
  return c
