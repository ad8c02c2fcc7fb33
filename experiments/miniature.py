"""The miniature reproduction of arXiv 2604.13016: sizes, schedules and the
model organisms (one student and four teachers on the arithmetic task), made
by ``experiments/organisms.py`` and read by ``configs/repro.py`` and the
``experiments/f*.py`` findings.

The constants are pilot-tuned for this task; the library's building blocks
(:mod:`opd_jax.organisms`) are generic.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

import ml_collections

from opd_jax import configs_lib
from opd_jax.organisms import (
  Arch,
  ensure_random_model,
  ensure_task_data,
  ensure_tokenizer,
  sft_config,
  train_organism,
)


@dataclasses.dataclass(frozen=True)
class Miniature:
  """Sizes and schedules of the miniature reproduction (``smoke``: CI-sized).

  Levels are digit counts. The student learns ``easy`` only; ``hard`` is the
  capability only teacher-new has; ``pool_levels`` is the prompt pool of the
  prompt-selection finding (levels above ``levels`` are unseen by every
  teacher, i.e. not teacher-aligned).
  """

  levels: tuple[int, ...] = (1, 2, 3, 4)
  easy: tuple[int, ...] = (1, 2, 3)
  hard: tuple[int, ...] = (4,)
  # Share of hard-level examples in the student's data: the student starts
  # weak but not at zero on the hard levels, as the paper's students do (a
  # pilot with 0 left it confidently wrong there, with no mass for on-policy
  # signal to move; see the README's Results section).
  student_hard_fraction: float = 0.03
  pool_levels: tuple[int, ...] = (1, 2, 3, 4, 5, 6)
  student: Arch = Arch(num_layers=2, hidden_size=128)
  teacher: Arch = Arch(num_layers=4, hidden_size=128)
  student_steps: int = 600
  teacher_steps: int = 800
  sft_lr: float = 3e-3
  sft_batch: int = 32
  student_examples: int = 4000
  teacher_examples: int = 8000
  prompt_examples: int = 4000
  pool_examples: int = 1536
  max_prompt_len: int = 14
  max_new_tokens: int = 56
  # OPD runs (paper: 64 prompts x 4 samples, T = 1, AdamW constant lr, clip 1).
  opd_steps: int = 150
  opd_batch: int = 16
  num_samples: int = 2
  opd_lr: float = 3e-4
  eval_every: int = 25
  eval_per_level: int = 64
  seeds: tuple[int, ...] = (0, 1, 2)
  cold_start_steps: int = 100
  cold_start_prompts: int = 1024
  selection_fraction: float = 1 / 3


MINIATURE = Miniature()
MINIATURE_SMOKE = Miniature(
  levels=(1, 2),
  easy=(1,),
  hard=(2,),
  pool_levels=(1, 2, 3),
  student=Arch(num_layers=1, hidden_size=32, num_heads=2, num_kv_heads=1),
  teacher=Arch(num_layers=1, hidden_size=48, num_heads=2, num_kv_heads=1),
  student_steps=100,
  teacher_steps=200,
  student_examples=512,
  teacher_examples=1024,
  prompt_examples=256,
  pool_examples=48,
  max_prompt_len=8,
  max_new_tokens=32,
  opd_steps=4,
  opd_batch=4,
  eval_every=2,
  eval_per_level=8,
  seeds=(0,),
  cold_start_steps=2,
  cold_start_prompts=64,
)


def miniature(smoke: bool = False, seeds: Sequence[int] | None = None) -> Miniature:
  """The settings (``seeds``: the OPD run seeds, default ``Miniature.seeds``)."""
  m = MINIATURE_SMOKE if smoke else MINIATURE
  if seeds is None:
    return m
  seeds = tuple(int(s) for s in seeds)
  if not seeds or len(set(seeds)) != len(seeds):
    raise ValueError(f"--seeds must be distinct integers, got {seeds}")
  return dataclasses.replace(m, seeds=seeds)


# -----------------------------------------------------------------------------
# Calibration gates, committed before the runs they judge (issue #14). A run
# whose organisms or supervised bound fail a gate stops with a message naming
# the organism, the level, the measured and the required value; no verdict is
# produced (``experiments/organisms.py``, ``experiments/learnability.py``).


@dataclasses.dataclass(frozen=True)
class LevelGate:
  """One organism's greedy accuracy on each level of ``levels`` (``"easy"``,
  ``"hard"``, ``"all"``: the Miniature's level sets) must be ≥ ``at_least``,
  ≤ ``at_most``, and within ``within`` (absolute) of organism ``near``'s
  accuracy on the same level, whichever of them are set."""

  organism: str
  levels: str
  at_least: float | None = None
  at_most: float | None = None
  near: str | None = None
  within: float | None = None
  why: str = ""


@dataclasses.dataclass(frozen=True)
class Gates:
  """``levels``: per-level organism gates (after SFT). ``retrain_tolerance``:
  a retraining of an organism with the same seeds must give every level's
  accuracy within this (absolute) of the first. ``min_supervised_share``:
  SFT of the student on teacher_new's data at exactly the OPD budget must
  clear at least this share of the hard-level gap (None: not gated, with
  ``skip_reason``)."""

  levels: tuple[LevelGate, ...]
  retrain_tolerance: float
  min_supervised_share: float | None
  skip_reason: str = ""


# Values from the README's organism table (student 100/100/98/9%, teacher_new
# and teacher_b 100% on every level, teacher_same 92% on level 4) and the
# issue's audit (a rebuild gave the student 53% on level 3 and 3% on level 4;
# teacher_same is not "nothing new"; SFT at the OPD budget clears 3-9% of the
# gap). The current full-size organisms fail the teacher_same gate and the
# supervised bound, by design: the redesigned organisms must meet them.
GATES = Gates(
  levels=(
    LevelGate("student", "easy", at_least=0.95, why="the student knows its levels"),
    LevelGate(
      "student",
      "hard",
      at_least=0.02,
      at_most=0.25,
      why="weak but not at zero on the hard level (a 0% student gave OPD no signal; "
      "≤ 25% leaves a gap of ≥ 70 points to recover)",
    ),
    LevelGate("teacher_new", "all", at_least=0.95, why="the new capability is there"),
    LevelGate("teacher_b", "all", at_least=0.95, why="accurate in the other pattern"),
    LevelGate("teacher_same", "easy", at_least=0.95, why="as good as the student on its levels"),
    LevelGate(
      "teacher_same",
      "hard",
      near="student",
      within=0.10,
      why="nothing new: within 10 points of the student where the student has (almost) no data",
    ),
  ),
  # One from-scratch rebuild differed by ≤ 6 points (teacher_same level 4:
  # 86% vs 92%; multi-threaded CPU reductions are not bitwise reproducible
  # across processes); 8 points is 5 of the 64 problems per level.
  retrain_tolerance=0.08,
  # Finding 1 "reproduces" at a hard-level gap recovery ≥ 30%; a verdict
  # needs supervision at the same budget to reach past it with margin.
  min_supervised_share=0.5,
)
# Smoke: the tiny organisms (width 32/48, 100-200 SFT steps) are near 0% on
# every level, so nothing can be calibrated: the smoke spec only runs the
# check (accuracies within [0, 1]); the 4-step supervised bound is reported,
# not gated. Retraining in one process repeats the same programs on the same
# data order; a tolerance of one problem (of 8 per level) allows for
# non-bitwise CPU reductions.
GATES_SMOKE = Gates(
  levels=(
    LevelGate("teacher_new", "all", at_least=0.0, at_most=1.0, why="smoke: code path only"),
    LevelGate("student", "all", at_least=0.0, at_most=1.0, why="smoke: code path only"),
  ),
  retrain_tolerance=0.125,
  min_supervised_share=None,
  skip_reason="smoke: 4 SFT steps cannot show a supervised bound; reported, not gated",
)


def gates(smoke: bool = False) -> Gates:
  return GATES_SMOKE if smoke else GATES


def level_set(m: Miniature, name: str) -> tuple[int, ...]:
  return {"easy": m.easy, "hard": m.hard, "all": m.levels}[name]


def check_organisms(m: Miniature, g: Gates, accuracy: dict[str, dict[int, float]]) -> list[str]:
  """The failed organism gates (empty: all pass), one line each naming the
  organism, the level, the measured and the required accuracy.
  ``accuracy[organism][level]``: greedy accuracy in [0, 1]."""
  failures = []
  for gate in g.levels:
    for L in level_set(m, gate.levels):
      acc = accuracy[gate.organism][L]
      head = f"{gate.organism} level {L}: measured {100 * acc:.1f}%"
      if gate.at_least is not None and acc < gate.at_least:
        failures.append(f"{head}, required ≥ {100 * gate.at_least:.1f}% ({gate.why})")
      if gate.at_most is not None and acc > gate.at_most:
        failures.append(f"{head}, required ≤ {100 * gate.at_most:.1f}% ({gate.why})")
      if gate.near is not None:
        ref = accuracy[gate.near][L]
        if abs(acc - ref) > gate.within + 1e-9:
          failures.append(
            f"{head}, required within {100 * gate.within:.1f} points of {gate.near} "
            f"({100 * ref:.1f}%) ({gate.why})"
          )
  return failures


def check_retrain(
  first: dict[str, dict[int, float]], second: dict[str, dict[int, float]], tolerance: float
) -> list[str]:
  """The organism levels whose accuracy moved by more than ``tolerance``
  between two trainings with the same seeds (empty: reproducible)."""
  return [
    f"{name} level {L}: {100 * a:.1f}% then {100 * second[name][L]:.1f}%, "
    f"tolerance {100 * tolerance:.1f} points"
    for name, accs in first.items()
    for L, a in accs.items()
    if abs(second[name][L] - a) > tolerance + 1e-9
  ]


# name -> (architecture role, thinking pattern, SFT data key of miniature_paths)
ORGANISMS = {
  "student": ("student", "A", "student_sft"),
  "teacher_new": ("teacher", "A", "teacher_sft"),
  "teacher_same": ("teacher", "A", "student_sft"),
  "teacher_b": ("teacher", "B", "teacher_b_sft"),
}


def miniature_paths(assets: str) -> dict[str, str]:
  """Where the miniature's tokenizer, data files and organisms live."""
  d = {"tokenizer": os.path.join(assets, "tokenizer")}
  for key in ("student_sft", "teacher_sft", "teacher_b_sft", "opd_prompts", "prompt_pool"):
    d[key] = os.path.join(assets, "data", f"{key}.jsonl")
  for name in ORGANISMS:
    d[name] = os.path.join(assets, name, "export_hf")
  return d


def miniature_eval(m: Miniature, levels: Sequence[int] | None = None) -> ml_collections.ConfigDict:
  """The accuracy eval of every miniature run: ``eval_per_level`` held-out
  problems per level, greedy; per-level accuracy is logged as
  ``eval/all/acc/level_<L>``."""
  levels = tuple(levels or m.levels)
  return configs_lib.eval_config(
    levels="+".join(map(str, levels)),
    num_examples=m.eval_per_level * len(levels),
    max_new_tokens=m.max_new_tokens,
    batch_size=64,
  )


def prepare_miniature(assets: str, m: Miniature = MINIATURE) -> dict[str, str]:
  """Makes (or finds) the tokenizer, data and organisms of the miniature
  under ``assets``; returns :func:`miniature_paths`."""
  paths = prepare_data(assets, m)
  for name in ORGANISMS:
    train_miniature_organism(assets, m, name)
  return paths


def prepare_data(assets: str, m: Miniature = MINIATURE) -> dict[str, str]:
  """Makes (or finds) the tokenizer and data files of the miniature."""
  paths = miniature_paths(assets)
  os.makedirs(os.path.join(assets, "data"), exist_ok=True)
  ensure_tokenizer(paths["tokenizer"])
  n_hard = int(round(m.student_hard_fraction * m.student_examples))
  ensure_task_data(
    paths["student_sft"],
    n=m.student_examples - n_hard,
    seed=2,
    levels=m.easy,
    extra=(n_hard, m.hard),
  )
  ensure_task_data(paths["teacher_sft"], n=m.teacher_examples, seed=1, levels=m.levels)
  ensure_task_data(
    paths["teacher_b_sft"], n=m.teacher_examples, seed=1, levels=m.levels, pattern="B"
  )
  ensure_task_data(paths["opd_prompts"], n=m.prompt_examples, seed=3, levels=m.levels)
  ensure_task_data(paths["prompt_pool"], n=m.pool_examples, seed=4, levels=m.pool_levels)
  return paths


def train_miniature_organism(assets: str, m: Miniature, name: str, out: str | None = None) -> str:
  """SFT-trains organism ``name`` (data and tokenizer of :func:`prepare_miniature`
  under ``assets``) in ``out`` (default ``assets/name``), with its fixed seeds;
  returns its HF export."""
  paths = miniature_paths(assets)
  i = list(ORGANISMS).index(name)
  role, _, data_key = ORGANISMS[name]
  arch = m.student if role == "student" else m.teacher
  steps = m.student_steps if role == "student" else m.teacher_steps
  init = ensure_random_model(
    os.path.join(assets, f"{name}_init"), arch, ensure_tokenizer(paths["tokenizer"]), 10 + i
  )
  return train_organism(
    out or os.path.join(assets, name),
    _train,
    sft_config(
      init=init,
      tokenizer=paths["tokenizer"],
      data_file=paths[data_key],
      steps=steps,
      lr=m.sft_lr,
      batch_size=m.sft_batch,
      max_prompt_len=m.max_prompt_len,
      max_new_tokens=m.max_new_tokens,
      seed=i,
      evals={"all": miniature_eval(m, sorted(set(m.levels) | set(m.pool_levels)))},
    ),
  )


def _train(config, workdir):
  from opd_jax.train import train  # the driver (experiments may import it)

  return train(config, workdir)
