"""The closing summary of a run, from its workdir's ``metrics.jsonl``.

:func:`summarize` returns the text the driver prints at the end of a run
(process 0) and writes ``summary.png`` beside the metrics: every eval's
accuracy from the first to the last logged eval, beside the teacher's
(``teacher/eval/<name>/accuracy``, logged at step 0 with
``config.eval_teacher``) and the share of the gap recovered,

    gap recovered = (end - start) / (teacher - start),

the steps run, generated tokens per second (sum of ``num_tokens`` over the sum
of ``step_time_s`` of the logged steps) and where the run's files are.
"""

from __future__ import annotations

import os
from typing import Any

from opd_jax.logging_utils import read_metrics

PNG_NAME = "summary.png"
KL_KEY = "reverse_kl"  # per-token exact reverse KL(p_student || p_teacher) of a step
_TEACHER = "teacher/"


def eval_table(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
  """One row per ``eval/<name>/accuracy`` key: ``name``, ``start`` / ``end``
  (first and last logged value) with their steps, ``teacher`` (or None) and
  ``gap`` (``(end - start) / (teacher - start)``; None without a teacher or
  when ``teacher <= start``)."""
  rows = {}
  for r in records:
    for k, v in r.items():
      teacher = k.startswith(_TEACHER)
      key = k[len(_TEACHER) :] if teacher else k
      if not (key.startswith("eval/") and key.endswith("/accuracy")):
        continue
      name = key[len("eval/") : -len("/accuracy")]
      row = rows.setdefault(
        name, dict(name=name, start=None, start_step=None, end=None, end_step=None, teacher=None)
      )
      if teacher:
        row["teacher"] = v
      else:
        if row["start"] is None:
          row.update(start=v, start_step=r["step"])
        row.update(end=v, end_step=r["step"])
  out = []
  for row in rows.values():
    t, a, b = row["teacher"], row["start"], row["end"]
    ok = t is not None and a is not None and t > a
    out.append({**row, "gap": (b - a) / (t - a) if ok else None})
  return out


def throughput(records: list[dict[str, Any]]) -> tuple[int, float, float | None]:
  """``(last step, generated tokens, tokens per second)`` over the logged
  training steps (records with ``num_tokens`` and ``step_time_s``)."""
  steps = [r for r in records if "num_tokens" in r and "step_time_s" in r]
  last = max((r["step"] for r in records), default=0)
  tokens = sum(float(r["num_tokens"]) for r in steps)
  secs = sum(float(r["step_time_s"]) for r in steps)
  return last, tokens, (tokens / secs if secs > 0 else None)


def _pct(x: float | None) -> str:
  return "  -  " if x is None else f"{100 * x:5.1f}%"


def summarize(workdir: str, *, status: str = "finished", png: bool = True) -> str:
  """The closing summary of the run in ``workdir`` (text; ``png``: also
  writes ``workdir/summary.png``)."""
  records = read_metrics(workdir) if os.path.exists(os.path.join(workdir, "metrics.jsonl")) else []
  last, tokens, tok_s = throughput(records)
  lines = [f"== run summary: {status} at step {last} =="]
  table = eval_table(records)
  if table:
    width = max(len(r["name"]) for r in table) + 2
    lines.append(f"{'eval':<{width}}start ->    end   teacher   gap recovered")
    for r in table:
      gap = "  -" if r["gap"] is None else f"{100 * r['gap']:4.0f}%"
      lines.append(
        f"{r['name']:<{width}}{_pct(r['start'])} -> {_pct(r['end'])}   {_pct(r['teacher'])}   {gap}"
      )
    lines.append(
      "  (greedy accuracy at the first and last eval; gap = (end - start) / (teacher - start))"
    )
  kl = [(r["step"], r[KL_KEY]) for r in records if KL_KEY in r]
  if kl:
    lines.append(f"per-token reverse KL: {kl[0][1]:.4f} (step {kl[0][0]}) -> {kl[-1][1]:.4f}")
  rate = "-" if tok_s is None else f"{tok_s:,.0f}"
  lines.append(f"steps: {last}; generated tokens: {tokens:,.0f} ({rate} tokens/s in the steps)")
  where = [
    ("metrics", "metrics.jsonl"),
    ("tensorboard", "tensorboard"),
    ("checkpoints", "checkpoints"),
    ("student (HF)", "export_hf"),
  ]
  for label, name in where:
    path = os.path.join(workdir, name)
    if os.path.exists(path):
      lines.append(f"{label + ':':<14}{path}")
  if png and records:
    path = os.path.join(workdir, PNG_NAME)
    plot(records, table, path)
    lines.append(f"{'plot:':<14}{path}")
  return "\n".join(lines)


def plot(records: list[dict[str, Any]], table: list[dict[str, Any]], path: str) -> None:
  """Eval accuracy (teacher dashed) and per-token reverse KL over steps."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(8, 3))
  for i, row in enumerate(table):
    key = f"eval/{row['name']}/accuracy"
    pts = [(r["step"], r[key]) for r in records if key in r]
    color = f"C{i}"
    if pts:
      ax1.plot(*zip(*pts), "o-", color=color, label=f"student: {row['name']}")
    if row["teacher"] is not None:
      ax1.axhline(row["teacher"], ls="--", color=color, label=f"teacher: {row['name']}")
  ax1.set(xlabel="step", ylabel="eval accuracy", ylim=(-0.02, 1.02), title="eval accuracy")
  if table:
    ax1.legend(fontsize=7)
  kl = [(r["step"], r[KL_KEY]) for r in records if KL_KEY in r]
  if kl:
    ax2.plot(*zip(*kl), color="C3")
  ax2.set(xlabel="step", ylabel="nats / token", title="per-token reverse KL")
  fig.tight_layout()
  fig.savefig(path, dpi=80)
  plt.close(fig)
