"""The closing summary of a run, from its workdir's ``metrics.jsonl``.

:func:`summarize` returns the text the driver prints at the end of a run
(process 0) and writes ``summary.png`` beside the metrics: every eval's
accuracy from the first to the last logged eval, beside the teacher's
(``teacher/eval/<name>/accuracy``, logged at step 0 with
``config.eval_teacher``) and the share of the gap recovered,

    gap recovered = (end - start) / (teacher - start),

the per-token reverse KL from the first to the last logged step (the
``reverse_kl`` token metric, or the loss itself when it is ``reverse_kl`` with
token-mean aggregation), the steps run, generated tokens per second (the
logged steps' mean ``num_tokens`` times the steps run, over the loop's wall
time, evals and logging included) and where the run's files are.
"""

from __future__ import annotations

import json
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


def kl_curve(records: list[dict[str, Any]], config: dict | None = None) -> list[tuple]:
  """``[(step, per-token reverse KL)]``: the ``reverse_kl`` metric, else the
  loss when ``config`` (the saved ``config.json``) has the token-mean
  ``reverse_kl`` loss; ``[]`` otherwise."""
  loss = (config or {}).get("loss", {})
  key = KL_KEY
  if not any(KL_KEY in r for r in records):
    exact = loss.get("name") == "reverse_kl" and loss.get("aggregation") == "token_mean"
    if not exact:
      return []
    key = "loss"
  return [(r["step"], r[key]) for r in records if key in r and "num_tokens" in r]


def throughput(
  records: list[dict[str, Any]], loop_s: float | None, loop_steps: int | None
) -> tuple[float | None, float | None]:
  """``(generated tokens, tokens per second)`` of the loop: the logged steps'
  mean ``num_tokens`` times ``loop_steps``, over ``loop_s`` (None when
  unknown)."""
  logged = [float(r["num_tokens"]) for r in records if "num_tokens" in r]
  if not logged or not loop_steps:
    return None, None
  tokens = sum(logged) / len(logged) * loop_steps
  return tokens, (tokens / loop_s if loop_s else None)


def _pct(x: float | None) -> str:
  return "  -  " if x is None else f"{100 * x:5.1f}%"


def summarize(
  workdir: str,
  *,
  status: str = "finished",
  loop_s: float | None = None,
  loop_steps: int | None = None,
  png: bool = True,
) -> str:
  """The closing summary of the run in ``workdir`` (text; ``png``: also
  writes ``workdir/summary.png``). ``loop_s`` / ``loop_steps``: wall time and
  steps of this process's loop (the tokens per second)."""
  has = lambda name: os.path.exists(os.path.join(workdir, name))
  records = read_metrics(workdir) if has("metrics.jsonl") else []
  config = {}
  if has("config.json"):
    with open(os.path.join(workdir, "config.json")) as f:
      config = json.load(f)
  last = max((r["step"] for r in records), default=0)
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
  kl = kl_curve(records, config)
  if kl:
    lines.append(
      f"per-token reverse KL(student || teacher): {kl[0][1]:.4f} (step {kl[0][0]}) -> "
      f"{kl[-1][1]:.4f} (step {kl[-1][0]})"
    )
  tokens, tok_s = throughput(records, loop_s, loop_steps)
  line = f"steps: {last}"
  if tokens is not None:
    line += f"; generated tokens: ~{tokens:,.0f}"
  if tok_s is not None:
    line += (
      f" in {loop_s:.0f} s, {tok_s:,.0f} tokens/s (loop wall time, evals and logging included)"
    )
  lines.append(line)
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
    plot(records, table, kl, path)
    lines.append(f"{'plot:':<14}{path}")
  return "\n".join(lines)


def plot(records: list[dict[str, Any]], table: list[dict[str, Any]], kl: list, path: str) -> None:
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
  if kl:
    ax2.plot(*zip(*kl), color="C3")
  ax2.set(xlabel="step", ylabel="nats / token", title="per-token reverse KL")
  fig.tight_layout()
  fig.savefig(path, dpi=80)
  plt.close(fig)
