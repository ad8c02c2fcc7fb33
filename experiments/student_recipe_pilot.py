"""Pilot: is a student recipe inside the organism gates for every seed?

Trains the miniature's student (``miniature.train_miniature_organism``) with
seed variants v (init seed 10 + 100v, data-order seed 100v; v = 0 is the
committed student) on a built workdir's data and tokenizer, optionally with
other SFT steps, fewer hard-level rows, another peak lr or depth, or in two
stages (easy rows first), and checks each against the student's gates in
``miniature.gates`` (and teacher_same's hard-level window,
which depends on the student, when the workdir has teacher_same). A recipe
is adopted only if every variant passes (README "Student-recipe pilots");
pilots are written down before they run and reported whatever they give.

  python experiments/student_recipe_pilot.py --workdir=runs/repro \
      --variants=0,1,2 [--steps=1200] [--hard-rows=40] [--lr=1e-3] [--layers=3] \
      [--easy-first=150] [--gate-eval=512] [--out=DIR] [--smoke]

Prints one line per variant (per-level accuracy, failed gates) and writes
``OUT/pilot.json``. Variants run one after another in this process (start
several processes, e.g. under ``taskset``, to use more cores).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os

import miniature
import organisms
import repro_lib as R

from opd_jax.tasks import read_jsonl, write_jsonl


def recipe_name(
  steps: int,
  hard_rows: int | None,
  lr: float | None = None,
  layers: int | None = None,
  easy_first: int = 0,
) -> str:
  return (
    (f"easy{steps}_then{easy_first}" if easy_first else f"steps{steps}")
    + ("" if hard_rows is None else f"_hard{hard_rows}")
    + ("" if lr is None else f"_lr{lr:g}")
    + ("" if layers is None else f"_layers{layers}")
  )


def student_data(assets: str, m: miniature.Miniature, hard_rows: int | None, out: str) -> str:
  """The student's SFT file, or a copy keeping only its first ``hard_rows``
  hard-level rows (the rest in their order)."""
  path = miniature.miniature_paths(assets)["student_sft"]
  if hard_rows is None:
    return path
  rows = read_jsonl(path)
  hard = [i for i, r in enumerate(rows) if r["level"] in m.hard]
  if not 0 <= hard_rows <= len(hard):
    raise ValueError(
      f"--hard-rows must be in [0, {len(hard)}] (the data's hard rows), got {hard_rows}"
    )
  drop = set(hard[hard_rows:])
  kept = os.path.join(out, f"student_sft_hard{hard_rows}.jsonl")
  write_jsonl(kept, [r for i, r in enumerate(rows) if i not in drop])
  return kept


def check_student(
  m, g, student: dict[int, float], teacher_same: dict[int, float] | None
) -> list[str]:
  """The failed gates that judge the student (its own, and teacher_same's
  window around it when ``teacher_same`` is given)."""
  accuracy = {"student": student}
  if teacher_same is not None:
    accuracy["teacher_same"] = teacher_same
  gates = [
    gate
    for gate in g.levels
    if gate.organism == "student" or (teacher_same is not None and gate.near == "student")
  ]
  return miniature.check_organisms(m, dataclasses.replace(g, levels=tuple(gates)), accuracy)


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--workdir", required=True, help="a reproduction workdir with built organisms")
  ap.add_argument("--variants", default="0,1,2")
  ap.add_argument("--steps", type=int, default=0, help="student SFT steps (0: the Miniature's)")
  ap.add_argument("--hard-rows", type=int, default=-1, help="hard-level rows kept (-1: all)")
  ap.add_argument("--lr", type=float, default=0.0, help="student SFT peak lr (0: the Miniature's)")
  ap.add_argument("--layers", type=int, default=0, help="student depth (0: the Miniature's)")
  ap.add_argument(
    "--easy-first",
    type=int,
    default=0,
    help="two stages: --steps on the student's data without its hard rows, then this many "
    "steps on its (cut) data from that student (0: one stage)",
  )
  ap.add_argument(
    "--gate-eval",
    type=int,
    default=0,
    help="judge the gates on this many eval problems per level (students and teacher_same "
    "re-evaluated, organisms.accuracies_at; 0: the runs' own evals)",
  )
  ap.add_argument("--out", default="", help="default WORKDIR/pilots/student_<recipe>")
  ap.add_argument("--smoke", action="store_true")
  args = ap.parse_args(argv)
  m, g = miniature.miniature(args.smoke), miniature.gates(args.smoke)
  if args.steps:
    m = dataclasses.replace(m, student_steps=args.steps)
  if args.lr < 0:
    raise SystemExit(f"--lr must be > 0 (or 0: the Miniature's), got {args.lr}")
  if args.gate_eval < 0:
    raise SystemExit(f"--gate-eval must be >= 0, got {args.gate_eval}")
  if args.easy_first < 0:
    raise SystemExit(f"--easy-first must be >= 0, got {args.easy_first}")
  if args.layers < 0:
    raise SystemExit(f"--layers must be >= 1 (or 0: the Miniature's), got {args.layers}")
  if args.lr:
    m = dataclasses.replace(m, sft_lr=args.lr)  # only the student is trained here
  if args.layers:
    m = dataclasses.replace(m, student=dataclasses.replace(m.student, num_layers=args.layers))
  hard_rows = None if args.hard_rows < 0 else args.hard_rows
  variants = [int(v) for v in args.variants.split(",") if v]
  assets = R.assets_dir(args.workdir)
  name = recipe_name(
    m.student_steps, hard_rows, args.lr or None, args.layers or None, args.easy_first
  )
  out = os.path.abspath(args.out or os.path.join(args.workdir, "pilots", f"student_{name}"))
  os.makedirs(out, exist_ok=True)
  # The workdir's data and tokenizer as built (its organisms' SFT steps may
  # differ from the Miniature's: only the student is retrained here).
  paths = miniature.miniature_paths(assets)
  missing = [paths[k] for k in ("tokenizer", *miniature.DATA_KEYS) if not os.path.exists(paths[k])]
  if missing:
    raise SystemExit(
      f"{args.workdir}: no built organism data ({missing[0]} missing); "
      "run experiments/organisms.py first"
    )
  data_file = student_data(assets, m, hard_rows, out)
  levels = sorted(set(m.levels) | set(m.pool_levels))
  same_dir = R.organism_workdir(args.workdir, "teacher_same")
  teacher_same = None
  measure = (
    (lambda d: organisms.accuracies_at(d, args.gate_eval))
    if args.gate_eval
    else (lambda d: organisms.accuracies(d, levels))
  )
  if os.path.exists(os.path.join(same_dir, "metrics.jsonl")):
    teacher_same = measure(same_dir)
  results = {}
  for v in variants:
    d = os.path.join(out, f"v{v}")
    train = functools.partial(
      miniature.train_miniature_organism,
      assets,
      m,
      "student",
      variant=v,
      init_tag=f"layers{args.layers}" if args.layers else "",
    )
    if args.easy_first:  # stage 1 on the easy rows only, then the recipe's data
      easy = train(out=os.path.join(out, f"v{v}_easy"), data_file=paths["student_easy_sft"])
      train(out=d, data_file=data_file, init_from=easy, steps=args.easy_first)
    else:
      train(out=d, data_file=data_file)
    acc = measure(d)
    failures = check_student(m, g, acc, teacher_same)
    results[v] = {"accuracy": acc, "failures": failures}
    shown = " / ".join(f"{100 * acc[L]:.1f}" for L in m.levels)
    print(
      f"[pilot] {name} v{v}: L{'/'.join(map(str, m.levels))} = {shown}; "
      f"{'passes' if not failures else 'fails: ' + '; '.join(failures)}",
      flush=True,
    )
  summary = {
    "recipe": {
      "student_steps": m.student_steps,
      "hard_rows": hard_rows,
      "lr": m.sft_lr,
      "student_layers": m.student.num_layers,
      "easy_first": args.easy_first,
      "gate_eval_per_level": args.gate_eval or None,
    },
    "variants": results,
    "adopt": all(not r["failures"] for r in results.values()),
  }
  with open(os.path.join(out, "pilot.json"), "w") as f:
    json.dump(summary, f, indent=1)
  print(f"[pilot] {name}: {'every variant passes' if summary['adopt'] else 'not adopted'}")
  return summary


if __name__ == "__main__":
  main()
