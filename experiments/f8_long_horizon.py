"""Finding 8: the cost of dense token rewards on long horizons. Alignment
metrics by response-position chunk (8 tokens; the paper uses 1024): overlap
ratio (Eq. 6), entropy gap |H(q) − H(p)| (Eq. 8), teacher overlap mass
(Eq. 10) and per-token reverse KL, token-weighted over the first and last 10%
of OPD steps, for the successful run (teacher_new) and a failing one
(teacher_b). Does alignment degrade deeper into the response?

  python experiments/f8_long_horizon.py --workdir=runs/repro [--smoke] [--seeds=3,4,5]
"""

from __future__ import annotations

import re

import numpy as np
import repro_lib as R

TEACHERS = ("teacher_new", "teacher_b")
METRICS = ("overlap_ratio", "entropy_gap", "overlap_mass_teacher", "reverse_kl")
_CHUNK = re.compile(r"^num_tokens/pos_(\d+)_(\d+)$")


def chunk_profile(rundir: str, metric: str, start_frac: float, end_frac: float):
  """Token-weighted mean of ``metric`` per position chunk over a window of
  OPD steps; returns (chunk starts, values, token counts)."""
  rows = [r for r in R.records(rundir) if "overlap_ratio" in r and not r.get("cold_start")]
  lo = int(start_frac * len(rows))
  rows = rows[lo : max(int(end_frac * len(rows)), lo + 1)]
  chunks = sorted(
    {(int(mt.group(1)), int(mt.group(2))) for r in rows for k in r if (mt := _CHUNK.match(k))}
  )
  starts, values, counts = [], [], []
  for a, b in chunks:
    w = np.array([r.get(f"num_tokens/pos_{a}_{b}", 0.0) for r in rows])
    v = np.array([r.get(f"{metric}/pos_{a}_{b}", 0.0) for r in rows])
    if w.sum() > 0:
      starts.append(a)
      values.append(float((w * v).sum() / w.sum()))
      counts.append(float(w.sum()))
  return starts, values, counts


def runs(m) -> list[dict]:
  """:func:`repro_lib.run_opd` arguments of every run: each teacher per seed."""
  return [dict(teacher=t, seed=s) for t in TEACHERS for s in m.seeds]


jobs = R.stage_jobs(runs)


def main(workdir: str, smoke: bool = False, seeds=None) -> dict:
  m = R.setting(workdir, smoke, seeds)
  out = {"teachers": {}, "chunk_tokens": 8}
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, len(METRICS), figsize=(13, 3.2))
  for teacher in TEACHERS:
    runs = [R.run_opd(workdir, smoke, teacher=teacher, seed=s) for s in R.seeds_of(m)]
    res = {}
    for metric in METRICS:
      for window, (a, b), ls in (("early", (0.0, 0.1), ":"), ("late", (0.9, 1.0), "-")):
        profiles = [chunk_profile(r, metric, a, b) for r in runs]
        n = min(len(p[0]) for p in profiles)
        starts = profiles[0][0][:n]
        vals = np.array([p[1][:n] for p in profiles])
        res[f"{metric}_{window}"] = {
          "chunk_start": starts,
          "mean": vals.mean(0).tolist(),
          "std": vals.std(0).tolist(),
          "tokens": np.mean([p[2][:n] for p in profiles], 0).tolist(),
        }
        ax = axes[METRICS.index(metric)]
        ax.errorbar(
          starts,
          vals.mean(0),
          yerr=vals.std(0),
          color=R.COLORS[teacher],
          ls=ls,
          marker="o",
          ms=3,
          capsize=2,
          label=f"{teacher}, {window}",
        )
      late = res[f"{metric}_late"]["mean"]
      if len(late) >= 2:
        res[f"{metric}_late_first_vs_last_chunk"] = [late[0], late[-1]]
        # the same per seed (mean over seeds = the pair above)
        res[f"{metric}_late_first_chunk"] = R.mean_std(vals[:, 0])
        res[f"{metric}_late_last_chunk"] = R.mean_std(vals[:, -1])
    out["teachers"][teacher] = res
  for ax, metric in zip(axes, METRICS):
    ax.set_title(metric, fontsize=9)
    ax.set_xlabel("response position (chunk start)")
  axes[0].legend(fontsize=6)
  fig.suptitle("Alignment by response position (early vs late in training)")
  R.save(workdir, "f8_long_horizon", out, fig, m, smoke)
  return out


if __name__ == "__main__":
  R.cli(main, __doc__, jobs)
