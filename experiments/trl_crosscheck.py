"""Finding 1's main contrast, run twice: by this repo's driver and by TRL's
``DistillationTrainer`` (the ``bench`` extra: torch + trl), on the same HF
organisms, with the same settings, both evaluated by OUR evaluator.

For each seed and each teacher (teacher_new, teacher_same) the student is
distilled with reverse KL (full vocabulary, token mean) by

  ours  ``repro_lib.run_opd`` (``configs/repro.py``: the run finding 1 makes;
        reused when ``--workdir`` is the reproduction's), and
  TRL   ``trl.DistillationTrainer`` (β = 1: reverse KL) from the same HF
        checkpoints, the same prompts in the same order (each prompt repeated
        ``num_samples`` times: TRL samples one completion per prompt), the
        same lr / AdamW betas, eps and weight decay / constant schedule /
        clip / steps / rows per step / max new tokens / temperature / top-p.

What differs is only the implementation: sampler, model code, loss and
optimizer (PyTorch / ``transformers.generate`` vs JAX), and the random
streams. At every eval step of our run the TRL student is written with
``save_pretrained``, read back with ``opd_jax.models.from_hf`` and scored by
``opd_jax.train.run_evals`` on the same eval set (greedy), so the two curves
differ only by training. Printed: both curves side by side (hard-level and
overall accuracy), max |Δ accuracy| over the eval points, and each
implementation's final gap recovery (finding 1's two definitions, see
``f1_gap_recovery.py``). Results: ``WORKDIR/results/trl_crosscheck.json``;
TRL runs are cached in ``WORKDIR/trl/<run>/result.json``.

  python experiments/trl_crosscheck.py --workdir=runs/repro [--seeds=0,1] [--steps=N] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections.abc import Mapping, Sequence
from typing import Any

import miniature
import numpy as np
import repro_lib as R

TEACHERS = ("teacher_new", "teacher_same")


# -----------------------------------------------------------------------------
# Our run's settings, as TRL's.


def run_arg(teacher: str, seed: int, steps: int) -> dict[str, Any]:
  """``configs/repro.py`` argument of the run (``steps`` 0: the miniature's,
  left out so the run is finding 1's own)."""
  return {"teacher": teacher, "seed": seed, **({"steps": steps} if steps else {})}


def trl_settings(config) -> dict[str, Any]:
  """The TRL equivalents of our run's ``config``; ValueError naming a setting
  TRL's on-policy distillation cannot reproduce."""
  c = config
  need = {
    "loss.name": (c.loss.name, "reverse_kl"),
    "loss.aggregation": (c.loss.aggregation, "token_mean"),
    "optimizer.name": (c.optimizer.name, "adamw"),
    "optimizer.schedule": (c.optimizer.schedule, "constant"),
    "optimizer.warmup_steps": (c.optimizer.warmup_steps, 0),
    "on_policy_fraction": (c.on_policy_fraction, 1.0),
    "cold_start.steps": (c.cold_start.steps, 0),
    "sampling.top_k": (c.sampling.top_k, 0),
    "sampling.ignore_eos": (c.sampling.ignore_eos, False),
    "loss.student_temperature": (c.loss.student_temperature, c.sampling.temperature),
    "loss.teacher_temperature": (c.loss.teacher_temperature, c.sampling.temperature),
  }
  for key, (have, want) in need.items():
    if have != want:
      raise ValueError(f"config.{key}={have!r}: the TRL cross-check needs {want!r}")
  return dict(
    prompts_per_step=int(c.batch_size),
    num_samples=int(c.sampling.num_samples),
    max_new_tokens=int(c.sampling.max_new_tokens),
    temperature=float(c.sampling.temperature),
    top_p=float(c.sampling.top_p),
    lr=float(c.optimizer.lr),
    b1=float(c.optimizer.b1),
    b2=float(c.optimizer.b2),
    eps=float(c.optimizer.eps),
    weight_decay=float(c.optimizer.weight_decay),
    decay_matrices_only=bool(c.optimizer.decay_matrices_only),
    grad_clip=float(c.optimizer.grad_clip),
    steps=int(c.total_steps),
    seed=int(c.seed),
  )


def prompt_stream(settings, tokenizer, steps: int, num_samples: int) -> list[str]:
  """The prompts of our driver's first ``steps`` batches, in order (the
  driver's iterator, same seed), each repeated ``num_samples`` times."""
  from opd_jax import train

  _, it = train.build_data(settings, tokenizer)
  texts = []
  for _ in range(steps):
    batch = next(it)
    for ids, mask, valid in zip(batch["prompt_ids"], batch["prompt_mask"], batch["valid"]):
      if not valid:
        raise ValueError("a padded batch row: config.batch_size must divide the prompt set")
      row = [int(t) for t in ids[mask]]
      text = tokenizer.decode(row)
      if list(tokenizer(text=text)["input_ids"]) != row:
        raise RuntimeError(f"prompt does not round-trip the tokenizer: {text!r}")
      texts += [text] * num_samples
  return texts


# -----------------------------------------------------------------------------
# TRL.


class HFEvaluator(R.ExportEvaluator):
  """OUR evaluator on a PyTorch model: ``save_pretrained`` -> ``from_hf`` ->
  ``train.run_evals`` (the run's eval set, sampler settings and student knobs)."""

  def __call__(self, model, step: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="trl_eval_") as d:
      model.save_pretrained(d, safe_serialization=True)
      return {"step": step, **super().__call__(d)}


def _quiet_hf() -> None:
  """No progress bars (weights loading / writing at every eval) or
  deprecation chatter from transformers / TRL."""
  import warnings

  import transformers

  transformers.utils.logging.set_verbosity_error()
  transformers.utils.logging.disable_progress_bar()
  warnings.filterwarnings("ignore", category=FutureWarning, module=r"transformers\..*")


def _optimizer(model, s: Mapping[str, Any]):
  """torch AdamW with our optimizer's decay set (``optim._decay_mask``: all
  params, or matrices only); HF Trainer's default skips norms."""
  import torch

  params = [p for p in model.parameters() if p.requires_grad]
  decays = [p.ndim >= 2 or not s["decay_matrices_only"] for p in params]
  groups = [
    {"params": [p for p, d in zip(params, decays) if d == want], "weight_decay": wd}
    for want, wd in ((True, s["weight_decay"]), (False, 0.0))
  ]
  groups = [g for g in groups if g["params"]]
  return torch.optim.AdamW(groups, lr=s["lr"], betas=(s["b1"], s["b2"]), eps=s["eps"])


def run_trl(config, out_dir: str, eval_steps: Sequence[int]) -> dict[str, Any]:
  """TRL's on-policy distillation with our run's settings; evaluates with
  :class:`HFEvaluator` at ``eval_steps`` (0: before training). Cached in
  ``out_dir/result.json`` (reused for the same settings and eval steps)."""
  s = trl_settings(config)
  done = os.path.join(out_dir, "result.json")
  if os.path.exists(done):
    with open(done) as f:
      cached = json.load(f)
    if cached["eval_steps"] == list(eval_steps) and cached["settings"] == s:
      return cached
  import torch
  import transformers
  import trl
  from datasets import Dataset
  from transformers import AutoModelForCausalLM, PrinterCallback, TrainerCallback

  _quiet_hf()
  evaluate = HFEvaluator(config)
  rows = s["prompts_per_step"] * s["num_samples"]
  prompts = prompt_stream(evaluate.settings, evaluate.tokenizer, s["steps"], s["num_samples"])
  torch.manual_seed(s["seed"])
  student = AutoModelForCausalLM.from_pretrained(config.student.path, dtype=torch.float32)
  teacher = AutoModelForCausalLM.from_pretrained(config.teacher.path, dtype=torch.float32)
  evals = [evaluate(student, 0)] if 0 in eval_steps else []
  wanted = set(eval_steps) - {0}

  class Evals(TrainerCallback):
    def on_step_end(self, args, state, control, model=None, **kw):
      if state.global_step in wanted:
        was = model.training
        model.eval()
        evals.append(evaluate(model, int(state.global_step)))
        model.train(was)
        acc = evals[-1].get("eval/all/accuracy", float("nan"))
        print(f"[trl] step {state.global_step}: accuracy {100 * acc:.1f}%", flush=True)

  targs = trl.DistillationConfig(
    output_dir=os.path.join(out_dir, "trainer"),
    per_device_train_batch_size=rows,
    gradient_accumulation_steps=1,
    max_steps=s["steps"],
    learning_rate=s["lr"],
    lr_scheduler_type="constant",
    warmup_steps=0,
    max_grad_norm=s["grad_clip"],
    bf16=False,
    fp16=False,
    gradient_checkpointing=False,
    use_cpu=True,
    report_to="none",
    save_strategy="no",
    logging_steps=1,
    dataloader_num_workers=0,
    seed=s["seed"],
    disable_dropout=True,
    disable_tqdm=True,
    shuffle_dataset=False,  # our driver's order (prompt_stream)
    max_completion_length=s["max_new_tokens"],
    temperature=s["temperature"],
    top_p=s["top_p"],
    top_k=0,
    beta=1.0,  # generalised JSD at β = 1: reverse KL(student || teacher)
  )
  trainer = trl.DistillationTrainer(
    model=student,
    teacher_model=teacher,
    args=targs,
    train_dataset=Dataset.from_dict({"prompt": prompts}),
    processing_class=evaluate.tokenizer,
    optimizers=(_optimizer(student, s), None),
    callbacks=[Evals()],
  )
  trainer.remove_callback(PrinterCallback)  # one log line per step otherwise
  seen: list[str] = []  # the prompts TRL generated for, in order
  generate = trainer._generate  # pylint: disable=protected-access

  def recording_generate(batch_prompts, *a, **kw):
    seen.extend(batch_prompts)
    return generate(batch_prompts, *a, **kw)

  trainer._generate = recording_generate  # pylint: disable=protected-access
  t0 = time.time()
  trainer.train()
  wall = time.time() - t0
  if trainer.state.global_step != s["steps"]:
    raise RuntimeError(f"TRL ran {trainer.state.global_step} steps, expected {s['steps']}")
  if seen != prompts:
    raise RuntimeError("TRL did not train on our driver's prompts in our order")
  losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
  result = dict(
    trainer=f"trl {trl.__version__} DistillationTrainer",
    versions=dict(
      trl=trl.__version__, transformers=transformers.__version__, torch=torch.__version__
    ),
    settings=s,
    eval_steps=list(eval_steps),
    evals=evals,
    losses=losses,
    train_s=wall,
  )
  os.makedirs(out_dir, exist_ok=True)
  with open(done + ".tmp", "w") as f:
    json.dump(result, f, indent=1)
  os.replace(done + ".tmp", done)
  return result


# -----------------------------------------------------------------------------
# Comparison.


def compare(
  ours: Sequence[Mapping[str, Any]],
  theirs: Sequence[Mapping[str, Any]],
  m: miniature.Miniature,
  t_hard: float,
  t_all: float,
) -> dict[str, Any]:
  """Both curves on the common eval steps, |Δ| and each final gap recovery
  (``t_hard``: teacher_new's hard-level accuracy; ``t_all``: the run's
  teacher's overall accuracy; the student's from each run's step 0)."""
  by_step = {int(r["step"]): r for r in theirs}
  steps = [int(r["step"]) for r in ours]
  if sorted(by_step) != steps:
    raise RuntimeError(f"eval steps differ: ours {steps}, TRL {sorted(by_step)}")
  curve = lambda recs, levels: [R.level_mean(r, levels) for r in recs]
  t_recs = [by_step[s] for s in steps]
  if steps[0] == 0 and _accuracies(ours[0]) != _accuracies(t_recs[0]):
    raise RuntimeError(  # the same checkpoint through save_pretrained -> from_hf
      f"step 0 evals differ: ours {_accuracies(ours[0])}, TRL {_accuracies(t_recs[0])}"
    )
  out: dict[str, Any] = {"steps": steps}
  for key, levels in (("hard", m.hard), ("overall", m.levels)):
    a, b = curve(ours, levels), curve(t_recs, levels)
    out[key] = {"ours": a, "trl": b, "max_abs_delta": float(np.max(np.abs(np.subtract(a, b))))}
    target = t_hard if key == "hard" else t_all
    out[key]["gap_recovery"] = {
      "ours": R.gap_recovery(a[-1], a[0], target),
      "trl": R.gap_recovery(b[-1], b[0], target),
    }
  return out


def _accuracies(rec: Mapping[str, Any]) -> dict[str, float]:
  return {k: v for k, v in rec.items() if "/acc/level_" in k}


def summary(cells: Mapping[str, Sequence[Mapping[str, Any]]]) -> dict[str, Any]:
  """Per teacher, over seeds: max |Δ| and mean ± std of gap recoveries; and
  finding 1's contrast (teacher_new − teacher_same hard-level recovery)."""
  out: dict[str, Any] = {}
  for teacher, runs in cells.items():
    row: dict[str, Any] = {}
    for key in ("hard", "overall"):
      row[f"{key}_max_abs_delta"] = max(r[key]["max_abs_delta"] for r in runs)
      for impl in ("ours", "trl"):
        row[f"{key}_gap_recovery_{impl}"] = R.mean_std([r[key]["gap_recovery"][impl] for r in runs])
    out[teacher] = row
  if set(TEACHERS) <= set(out):
    out["contrast_hard_gap_recovery"] = {
      impl: out["teacher_new"][f"hard_gap_recovery_{impl}"]["mean"]
      - out["teacher_same"][f"hard_gap_recovery_{impl}"]["mean"]
      for impl in ("ours", "trl")
    }
  return out


def _pct(x: float | None) -> str:
  return "   n/a" if x is None or not np.isfinite(x) else f"{100 * x:5.1f}%"


def _pm(ms: Mapping[str, Any]) -> str:
  """``mean ± std`` in percent (n/a for an undefined gap recovery)."""
  if not np.isfinite(ms["mean"]):
    return "n/a"
  return f"{100 * ms['mean']:.1f} ± {100 * ms['std']:.1f}%"


def print_table(teacher: str, seed: int, c: Mapping[str, Any]) -> None:
  h, o = c["hard"], c["overall"]
  print(f"\n== student from {teacher}, seed {seed} (accuracy; Δ = TRL − ours) ==")
  print(f"{'step':>6} | {'hard ours':>9} {'TRL':>7} {'Δ':>7} | {'all ours':>9} {'TRL':>7} {'Δ':>7}")
  for i, step in enumerate(c["steps"]):
    dh, do = h["trl"][i] - h["ours"][i], o["trl"][i] - o["ours"][i]
    print(
      f"{step:>6} | {_pct(h['ours'][i]):>9} {_pct(h['trl'][i]):>7} {100 * dh:+6.1f} |"
      f" {_pct(o['ours'][i]):>9} {_pct(o['trl'][i]):>7} {100 * do:+6.1f}"
    )
  print(
    f"max |Δ|: hard {100 * h['max_abs_delta']:.1f} pts, overall {100 * o['max_abs_delta']:.1f}"
    f" pts; final gap recovery hard ours {_pct(h['gap_recovery']['ours'])} TRL"
    f" {_pct(h['gap_recovery']['trl'])}, overall ours {_pct(o['gap_recovery']['ours'])} TRL"
    f" {_pct(o['gap_recovery']['trl'])}"
  )
  lo, lt = c["loss"]["ours"], c["loss"]["trl"]
  print(
    f"training loss (per-token reverse KL) first / last / mean: ours {lo['first']:.4f} /"
    f" {lo['last']:.4f} / {lo['mean']:.4f}, TRL {lt['first']:.4f} / {lt['last']:.4f} /"
    f" {lt['mean']:.4f}"
  )


# -----------------------------------------------------------------------------
# Main.


def ensure_organisms(workdir: str, smoke: bool, m: miniature.Miniature) -> dict[str, Any]:
  """The student's and the teachers' accuracies (hard levels, all levels) from
  their SFT runs' final evals, as ``organisms.json`` has them; trains the
  organisms first (``experiments/organisms.py``) if one is missing."""
  names = ("student", *TEACHERS)
  exports = miniature.miniature_paths(R.assets_dir(workdir))
  if not all(os.path.exists(os.path.join(exports[n], "config.json")) for n in names):
    import organisms

    organisms.main(workdir, smoke)
  table = {}
  for name in names:
    last = R.final_eval(R.organism_workdir(workdir, name))
    table[name] = {"hard": R.level_mean(last, m.hard), "overall": R.level_mean(last, m.levels)}
  return table


def main(
  workdir: str, smoke: bool = False, seeds: Sequence[int] | None = None, steps: int = 0
) -> dict[str, Any]:
  from opd_jax import train

  m = miniature.miniature(smoke)
  seeds = tuple(seeds) if seeds else R.seeds_of(m)
  orgs = ensure_organisms(workdir, smoke, m)
  t_hard = orgs["teacher_new"]["hard"]
  cells: dict[str, list[dict[str, Any]]] = {}
  runs = []
  for seed in seeds:
    for teacher in TEACHERS:
      arg = run_arg(teacher, seed, steps)
      rundir = R.run_opd(workdir, smoke, **arg)
      ours = R.eval_records(rundir)
      config = train.resolve_config(R.opd_config(workdir, smoke, arg), rundir)
      trl_dir = os.path.join(os.path.abspath(workdir), "trl", R.run_name(**arg))
      print(f"[trl] run {os.path.basename(trl_dir)}", flush=True)
      theirs = run_trl(config, trl_dir, [int(r["step"]) for r in ours])
      c = compare(ours, theirs["evals"], m, t_hard, orgs[teacher]["overall"])
      c["loss"] = {
        "ours": _loss_stats([r["loss"] for r in R.records(rundir) if "loss" in r]),
        "trl": _loss_stats(theirs["losses"]),
      }
      print_table(teacher, seed, c)
      cells.setdefault(teacher, []).append(c)
      runs.append(
        dict(teacher=teacher, seed=seed, ours=rundir, trl=trl_dir, trl_s=theirs["train_s"], **c)
      )
  out = {
    "setting": R.setting_dict(m),
    "seeds": list(seeds),
    "steps": steps or m.opd_steps,
    "trl": theirs["trainer"],
    "trl_settings": theirs["settings"],
    "organisms": orgs,
    "runs": runs,
    "summary": summary(cells),
  }
  print_summary(out["summary"])
  R.save(workdir, "trl_crosscheck", out)
  return out


def _loss_stats(losses: Sequence[float]) -> dict[str, float]:
  """The per-step training loss (token-mean reverse KL): first, last, mean."""
  return {"first": losses[0], "last": losses[-1], "mean": float(np.mean(losses))}


def print_summary(s: Mapping[str, Any]) -> None:
  print("\n== agreement (over seeds) ==")
  for teacher in TEACHERS:
    row = s.get(teacher)
    if row is None:
      continue
    print(
      f"{teacher}: max |Δ acc| hard {100 * row['hard_max_abs_delta']:.1f} pts, overall"
      f" {100 * row['overall_max_abs_delta']:.1f} pts; hard gap recovery ours"
      f" {_pm(row['hard_gap_recovery_ours'])}, TRL {_pm(row['hard_gap_recovery_trl'])};"
      f" overall ours {_pm(row['overall_gap_recovery_ours'])},"
      f" TRL {_pm(row['overall_gap_recovery_trl'])}"
    )
  if "contrast_hard_gap_recovery" in s:
    d = s["contrast_hard_gap_recovery"]
    print(
      "contrast (teacher_new − teacher_same, hard gap recovery): ours"
      f" {_pct(d['ours']).strip()}, TRL {_pct(d['trl']).strip()}"
    )


def cli() -> None:
  p = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--workdir", required=True)
  p.add_argument("--smoke", action="store_true", help="CI-sized: tiny organisms, few steps")
  p.add_argument("--seeds", default="", help="comma-separated seeds (default: the miniature's)")
  p.add_argument("--steps", type=int, default=0, help="OPD steps (default: the miniature's)")
  args = p.parse_args()
  seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
  if args.steps < 0:
    raise SystemExit(f"--steps={args.steps} must be >= 0")
  R.headless()
  R.setup_jax(args.workdir)
  main(args.workdir, args.smoke, seeds, args.steps)


if __name__ == "__main__":
  cli()
