"""Finding 7: teacher-aligned prompt selection. The prompt pool mixes levels
the teacher was trained on (1-4) with levels no organism saw (5-6). We score
the pool with ``opd_jax.prompt_selection`` (score ``gap`` = teacher avg@4 −
student avg@4: prompts the teacher solves and the student does not), keep the
top third, and compare OPD from teacher_new on the selected prompts against
OPD on prompts drawn at random from the whole pool, at equal steps.

  python experiments/f7_prompt_selection.py --workdir=runs/repro [--smoke] [--seeds=3,4,5]
"""

from __future__ import annotations

import collections
import json
import os

import miniature
import repro_lib as R

from opd_jax import data as data_lib
from opd_jax import prompt_selection

TEACHER = "teacher_new"


def selection_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), "prompt_selection")


def select_prompts(workdir: str, m: miniature.Miniature) -> str:
  """Scores the prompt pool and writes the selected prompts (once); returns
  their file."""
  paths = miniature.miniature_paths(R.assets_dir(workdir))
  out_dir = selection_dir(workdir)
  selected = os.path.join(out_dir, "selected.jsonl")
  if not os.path.exists(os.path.join(out_dir, "summary.json")):
    prompt_selection.run_selection(
      student=paths["student"],
      teacher=paths[TEACHER],
      prompts=paths["prompt_pool"],
      out_dir=out_dir,
      tokenizer=paths["tokenizer"],
      score="gap",
      top_fraction=m.selection_fraction,
      num_samples=4,
      max_new_tokens=m.max_new_tokens,
      temperature=1.0,
      batch_size=64,
      seed=0,
      max_prompt_len=m.max_prompt_len,
    )
  return selected


ARMS = ("random_pool", "selected")


def arm_prompts(workdir: str, arm: str) -> str:
  """The prompts of an arm: the whole pool, or the selected ones."""
  if arm == "selected":
    return os.path.join(selection_dir(workdir), "selected.jsonl")
  return "prompt_pool"


def runs(workdir: str, m: miniature.Miniature) -> list[dict]:
  """:func:`repro_lib.run_opd` arguments of every run: each arm per seed."""
  return [
    dict(
      teacher=TEACHER,
      seed=s,
      prompts=arm_prompts(workdir, arm),
      name=R.run_name(teacher=TEACHER, seed=s, prompts=arm),
    )
    for arm in ARMS
    for s in m.seeds
  ]


def jobs(workdir: str, smoke: bool = False, seeds=None) -> list:
  """The prompt selection, then the OPD runs of :func:`runs` (after it)."""
  m = R.setting(workdir, smoke, seeds)
  out = selection_dir(workdir)
  select = R.Job(
    out, select_prompts, dict(workdir=workdir, m=m), os.path.join(out, "summary.json"), 100
  )
  return [select, *R.opd_jobs(workdir, smoke, runs(workdir, m), after=(out,))]


def level_histogram(path: str) -> dict[int, int]:
  return dict(
    sorted(collections.Counter(int(r["level"]) for r in data_lib.read_jsonl(path)).items())
  )


def main(workdir: str, smoke: bool = False, seeds=None) -> dict:
  m = R.setting(workdir, smoke, seeds)
  paths = miniature.miniature_paths(R.assets_dir(workdir))
  selected = select_prompts(workdir, m)
  with open(os.path.join(os.path.dirname(selected), "summary.json")) as f:
    summary = json.load(f)
  arms = {arm: arm_prompts(workdir, arm) for arm in ARMS}
  assert arms["selected"] == selected
  out = {
    "teacher": TEACHER,
    "selection": summary,
    "pool_levels": level_histogram(paths["prompt_pool"]),
    "selected_levels": level_histogram(selected),
    "arms": {},
  }
  import matplotlib.pyplot as plt

  fig, (ax, bx) = plt.subplots(1, 2, figsize=(9, 3.3))
  colors = {"random_pool": "tab:gray", "selected": "tab:green"}
  for arm, prompts in arms.items():
    runs = [
      R.run_opd(
        workdir,
        smoke,
        teacher=TEACHER,
        seed=s,
        prompts=prompts,
        name=R.run_name(teacher=TEACHER, seed=s, prompts=f"{arm}"),
      )
      for s in R.seeds_of(m)
    ]
    last = [R.final_eval(r) for r in runs]
    out["arms"][arm] = {
      "runs": runs,
      "hard_after": R.mean_std([R.level_mean(e, m.hard) for e in last]),
      "easy_after": R.mean_std([R.level_mean(e, m.easy) for e in last]),
      "overlap_ratio_mean": R.mean_std([R.window_mean(r, "overlap_ratio", 0, 1) for r in runs]),
    }
    R.curve_band(ax, [R.accuracy_curve(r, m.hard) for r in runs], colors[arm], arm)
  ax.set_xlabel("OPD step")
  ax.set_ylabel(f"accuracy, hard levels {list(m.hard)}")
  ax.legend(fontsize=7)
  levels = sorted(out["pool_levels"])
  pool_n, sel_n = sum(out["pool_levels"].values()), max(sum(out["selected_levels"].values()), 1)
  bx.bar(
    [L - 0.2 for L in levels],
    [out["pool_levels"][L] / pool_n for L in levels],
    0.4,
    color="tab:gray",
    label="pool",
  )
  bx.bar(
    [L + 0.2 for L in levels],
    [out["selected_levels"].get(L, 0) / sel_n for L in levels],
    0.4,
    color="tab:green",
    label="selected (gap score)",
  )
  bx.set_xlabel("level")
  bx.set_ylabel("share of prompts")
  bx.legend(fontsize=7)
  fig.suptitle("Teacher-aligned prompt selection vs random prompts")
  R.save(workdir, "f7_prompt_selection", out, fig, m, smoke)
  return out


if __name__ == "__main__":
  R.cli(main, __doc__, jobs)
