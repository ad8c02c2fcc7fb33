"""The miniature reproduction of arXiv 2604.13016: sizes, schedules and the
model organisms (one student and four teachers on the arithmetic task), made
by ``experiments/organisms.py`` and read by ``configs/repro.py`` and the
``experiments/f*.py`` findings.

The constants are pilot-tuned for this task; the library's building blocks
(:mod:`opd_jax.organisms`) are generic.
"""

from __future__ import annotations

import dataclasses
import functools
import json
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
from opd_jax.tasks import read_jsonl, write_jsonl


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
  # Data of the redesign (issue #14): every scratchpad step is written in one
  # of ``phrasings`` templates (genuine choice points: the next-token mass
  # spreads over the templates at each step's start), tokenized by a
  # byte-level BPE of up to ``bpe_vocab`` tokens trained on the SFT text
  # (digits one token each; 0: the character-level tokenizer).
  phrasings: int = 3
  bpe_vocab: int = 512
  student: Arch = Arch(num_layers=2, hidden_size=128)
  teacher: Arch = Arch(num_layers=4, hidden_size=128)
  student_steps: int = 600
  # 800: the committed build. Rebuilds on another machine failed the gates,
  # and 1200-step teachers passed theirs while the student did not (README
  # "Rebuilds"); the committed results are of this setting.
  teacher_steps: int = 800
  sft_lr: float = 3e-3
  sft_batch: int = 32
  student_examples: int = 4000
  teacher_examples: int = 8000
  prompt_examples: int = 4000
  pool_examples: int = 1536
  # BPE tokens: prompts of level 6 are 14; completions of level 4 are at most
  # 55 (pattern A) / 70 (pattern B) with three phrasings.
  max_prompt_len: int = 14
  max_new_tokens: int = 72
  # OPD runs (paper: 64 prompts x 4 samples, T = 1, AdamW constant lr, clip 1).
  # The budget is where supervision succeeds (the audit: SFT at 150
  # steps x 32 rows lifted level 4 from 3% to 6-12%, 450 steps at lr 1e-3 to
  # 44%); one sample per prompt, as the near-deterministic student's second
  # sample was a near-duplicate (32 x 1 beat 16 x 2).
  opd_steps: int = 450
  opd_batch: int = 32
  num_samples: int = 1
  opd_lr: float = 1e-3
  eval_every: int = 50
  eval_per_level: int = 64
  seeds: tuple[int, ...] = (0, 1, 2)
  # A third of the OPD budget: long enough to install pattern B (SFT on
  # teacher_new's data moved level 4 by ~80 points in 250 steps of 32 rows).
  cold_start_steps: int = 150
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
  phrasings=2,
  bpe_vocab=300,
  max_prompt_len=8,
  max_new_tokens=32,
  opd_steps=4,
  opd_batch=4,
  num_samples=2,
  opd_lr=3e-4,
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
  # The student's data without its hard-level examples: the same knowledge,
  # more capacity (trained on the student's full data it reached 92-94% on
  # level 4 from 3% of level-4 examples: not "nothing new").
  "teacher_same": ("teacher", "A", "student_easy_sft"),
  "teacher_b": ("teacher", "B", "teacher_b_sft"),
}


DATA_KEYS = (
  "student_sft",
  "student_easy_sft",
  "teacher_sft",
  "teacher_b_sft",
  "opd_prompts",
  "prompt_pool",
)
# The settings that make the assets (data, tokenizer, organisms): assets made
# with other values are refused (``check_assets``), never silently reused.
ASSET_FIELDS = (
  "levels",
  "easy",
  "hard",
  "student_hard_fraction",
  "pool_levels",
  "phrasings",
  "bpe_vocab",
  "student",
  "teacher",
  "student_steps",
  "teacher_steps",
  "sft_lr",
  "sft_batch",
  "student_examples",
  "teacher_examples",
  "prompt_examples",
  "pool_examples",
  "max_prompt_len",
  "max_new_tokens",
)


def asset_setting(m: Miniature) -> dict:
  """The :data:`ASSET_FIELDS` of ``m`` as JSON-ready values."""
  fields = dataclasses.asdict(m)
  return json.loads(json.dumps({f: fields[f] for f in ASSET_FIELDS}))


def check_assets(assets: str, m: Miniature) -> None:
  """Records ``m``'s asset settings in ``assets/miniature.json`` on first
  use; raises ValueError naming the differing settings when the assets there
  were made with others (e.g. a workdir of an earlier organism design)."""
  path = os.path.join(assets, "miniature.json")
  want = asset_setting(m)
  if os.path.exists(path):
    with open(path) as f:
      have = json.load(f)
    diff = [f"{k}: {have.get(k)!r} there, {v!r} now" for k, v in want.items() if have.get(k) != v]
    if diff:
      raise ValueError(
        f"the organisms under {assets} were made with other settings ({'; '.join(diff)}): "
        "use a new --workdir"
      )
  elif os.path.isdir(os.path.join(assets, "data")):
    raise ValueError(
      f"{assets} holds organisms of an earlier design (no miniature.json): use a new --workdir"
    )
  else:
    os.makedirs(assets, exist_ok=True)
    with open(path + ".tmp", "w") as f:
      json.dump(want, f, indent=1)
    os.replace(path + ".tmp", path)


def miniature_paths(assets: str) -> dict[str, str]:
  """Where the miniature's tokenizer, data files and organisms live."""
  d = {"tokenizer": os.path.join(assets, "tokenizer")}
  for key in DATA_KEYS:
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
  check_assets(assets, m)
  os.makedirs(os.path.join(assets, "data"), exist_ok=True)
  n_hard = int(round(m.student_hard_fraction * m.student_examples))
  data = functools.partial(ensure_task_data, phrasings=m.phrasings)
  data(
    paths["student_sft"],
    n=m.student_examples - n_hard,
    seed=2,
    levels=m.easy,
    extra=(n_hard, m.hard),
  )
  if not os.path.exists(paths["student_easy_sft"]):  # the same rows, minus the hard levels
    rows = read_jsonl(paths["student_sft"])
    write_jsonl(paths["student_easy_sft"], [r for r in rows if r["level"] not in m.hard])
  data(paths["teacher_sft"], n=m.teacher_examples, seed=1, levels=m.levels)
  data(paths["teacher_b_sft"], n=m.teacher_examples, seed=1, levels=m.levels, pattern="B")
  data(paths["opd_prompts"], n=m.prompt_examples, seed=3, levels=m.levels)
  data(paths["prompt_pool"], n=m.pool_examples, seed=4, levels=m.pool_levels)
  sft_text = [paths[k] for k in ("student_sft", "teacher_sft", "teacher_b_sft")]
  # bpe_vocab 0: no BPE text, the character-level tokenizer.
  ensure_tokenizer(
    paths["tokenizer"], bpe_from=sft_text if m.bpe_vocab else (), vocab_size=m.bpe_vocab
  )
  return paths


def train_miniature_organism(
  assets: str,
  m: Miniature,
  name: str,
  out: str | None = None,
  variant: int = 0,
  data_file: str | None = None,
  init_tag: str = "",
  init_from: str | None = None,
  steps: int | None = None,
) -> str:
  """SFT-trains organism ``name`` (data and tokenizer of :func:`prepare_miniature`
  under ``assets``) in ``out`` (default ``assets/name``), with its fixed seeds;
  returns its HF export. ``variant`` v > 0 reseeds it (init seed 10 + i + 100v,
  data-order seed i + 100v, init under ``assets/<name>_init_v<v>``; v = 0 is
  the committed organism); ``data_file`` replaces its SFT data and
  ``init_tag`` names its init apart (``<name>_init_<tag>[_v<v>]``: pilots of
  another architecture); ``init_from`` (an HF export) replaces its random
  init and ``steps`` its SFT steps (a pilot's second stage)."""
  if variant < 0:
    raise ValueError(f"variant must be >= 0, got {variant}")
  paths = miniature_paths(assets)
  i = list(ORGANISMS).index(name)
  role, _, data_key = ORGANISMS[name]
  arch = m.student if role == "student" else m.teacher
  if steps is None:
    steps = m.student_steps if role == "student" else m.teacher_steps
  init_dir = (
    f"{name}_init" + (f"_{init_tag}" if init_tag else "") + (f"_v{variant}" if variant else "")
  )
  init = init_from or ensure_random_model(
    os.path.join(assets, init_dir),
    arch,
    ensure_tokenizer(paths["tokenizer"]),
    10 + i + 100 * variant,
  )
  return train_organism(
    out or os.path.join(assets, name),
    _train,
    sft_config(
      init=init,
      tokenizer=paths["tokenizer"],
      data_file=data_file or paths[data_key],
      steps=steps,
      lr=m.sft_lr,
      batch_size=m.sft_batch,
      max_prompt_len=m.max_prompt_len,
      max_new_tokens=m.max_new_tokens,
      seed=i + 100 * variant,
      evals={"all": miniature_eval(m, sorted(set(m.levels) | set(m.pool_levels)))},
    ),
  )


def _train(config, workdir):
  from opd_jax.train import train  # the driver (experiments may import it)

  return train(config, workdir)
