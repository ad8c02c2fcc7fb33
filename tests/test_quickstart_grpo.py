"""configs/quickstart_grpo.py (OPD + outcome reward, issue #16) on the
quickstart's organisms, shrunk so a run fits a test.

The full organisms (teacher 3x128 x 600 SFT steps, student 2x128 x 300) take
minutes to make on 2 cores, so the test makes smaller ones with the same
preparer (organisms.py ``prepare_quickstart``: tokenizer, SFT data, teacher
and student trained by the driver's SFT mode): teacher 2x64 x 200 steps on
levels 1-2 (level 1: ~92% greedy), student 1x64 x 100 steps on level 1
(~17% greedy, ~24% of its temperature-1 samples right), OPD prompts on
level 1. The run is the config's own (opd_grpo, top-k distillation reward,
the arithmetic verifier inside the step, 32 prompts x 4 samples at
temperature 1, lr 1e-3, 40 steps); only the organisms, the level, the
completion length and the evals are smaller. It still checks the claim
where it can fail both ways: on these organisms distillation alone *lowers*
the outcome reward (α = 0: ~0.22 -> ~0.04 over the 40 steps, as the earlier
full-size quickstart organisms did), so a rise needs the outcome term to
work end to end (verifier, GRPO groups, advantage sign). The full-size check
over three seeds is experiments/quickstart_grpo_check.py (README, "OPD +
outcome reward").
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os

import numpy as np
import pytest
from driver_utils import read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NEW_TOKENS = 30  # the teacher's level-2 SFT completions: 25 characters (+ EOS)


def _config(arg: str):
  spec = importlib.util.spec_from_file_location(
    "cfg_quickstart_grpo", os.path.join(REPO, "configs/quickstart_grpo.py")
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config(arg)
  c.sampling.max_new_tokens = NEW_TOKENS
  c.evals.hard.update(levels="1", num_examples=16, max_new_tokens=NEW_TOKENS)
  c.eval_every, c.eval_teacher, c.progress_bar, c.checkpoint_every = 0, False, False, 1000
  return c


def _rewards(workdir: str) -> np.ndarray:
  return np.array([r["outcome/reward_mean"] for r in read_metrics(workdir) if "loss" in r])


@pytest.mark.slow
def test_quickstart_grpo_short_run_raises_the_outcome_reward(tmp_path, monkeypatch):
  """40 steps of configs/quickstart_grpo.py (α = 4) on small quickstart
  organisms raise the outcome reward (share of the step's samples the
  in-step verifier scores correct) from the first 10 steps to the last 10,
  and end well above the same run without the outcome term (α = 0: same
  organisms, prompts and first samples; at the time of writing α = 4: 0.246
  -> 0.285, α = 0: 0.223 -> 0.041)."""
  from opd_jax import organisms, train

  small = dataclasses.replace(
    organisms.QUICKSTART,
    levels=(1, 2),
    easy=(1,),
    hard=(1,),
    teacher=organisms.Arch(num_layers=2, hidden_size=64),
    student=organisms.Arch(num_layers=1, hidden_size=64),
    teacher_steps=200,
    student_steps=100,
    teacher_examples=2000,
    student_examples=1000,
    prompt_examples=400,
    eval_examples=24,
    max_new_tokens=NEW_TOKENS,
  )
  monkeypatch.setattr(organisms, "QUICKSTART", small)
  runs = {}
  for alpha in (4.0, 0.0):
    wd = tmp_path / f"alpha_{alpha:g}"
    wd.mkdir()
    if alpha == 0.0:  # the organisms the first run made
      os.symlink(tmp_path / "alpha_4" / "assets", wd / "assets")
    c = _config(f"organisms=quickstart,alpha={alpha},steps=40")
    assert train.train(c, str(wd))["status"] == "finished"
    runs[alpha] = _rewards(str(wd))
  print("\n[test_quickstart_grpo] outcome reward α=4:", np.round(runs[4.0], 3))
  print("[test_quickstart_grpo] outcome reward α=0:", np.round(runs[0.0], 3))
  grpo, control = runs[4.0], runs[0.0]
  assert len(grpo) == len(control) == 40
  assert 0.0 < grpo[:10].mean() < 0.5, grpo  # a group signal to learn from, room to rise
  assert grpo[-10:].mean() > grpo[:10].mean(), grpo
  assert grpo[-10:].mean() > control[-10:].mean() + 0.1, (grpo, control)
