"""Finding 9: loss ablation. The same OPD run (student ← teacher_new) with
full-vocabulary reverse KL, sampled-token reverse KL (k1 as a per-token
reward), forward KL, JSD(β = 0.5), skew KL (α = 0.1) and top-k OPD (k = 16),
side by side; the runs come from one sweep config,
``configs/sweeps/repro_losses.py``.

  python experiments/f9_loss_ablation.py --workdir=runs/repro [--smoke] [--seeds=3,4,5]
"""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import repro_lib as R

from opd_jax import configs_lib

SWEEP = os.path.join(R.ROOT, "configs", "sweeps", "repro_losses.py")


def load_sweep():
  spec = importlib.util.spec_from_file_location("repro_losses", SWEEP)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def runs(m, smoke: bool) -> list[dict]:
  """:func:`repro_lib.run_opd` arguments of every run of the sweep (name,
  overrides, loss, seed), in the sweep's order."""
  _, sweep_runs = load_sweep().get_sweep(seeds=R.seeds_of(m), smoke=smoke)
  out = []
  for name, arg, overrides in sweep_runs:
    a = dict(configs_lib.parse_arg(arg, loss="", seed=0, smoke=False))
    a.pop("smoke")
    out.append(dict(name=name, overrides=dict(overrides), **a))
  return out


def jobs(workdir: str, smoke: bool = False, seeds=None) -> list:
  """The OPD runs of :func:`runs` as :class:`repro_lib.Job` s."""
  return R.opd_jobs(workdir, smoke, runs(R.setting(workdir, smoke, seeds), smoke))


def main(workdir: str, smoke: bool = False, seeds=None) -> dict:
  m = R.setting(workdir, smoke, seeds)
  by_loss: dict[str, list[str]] = {}
  kwargs: dict[str, dict] = {}
  for r in runs(m, smoke):
    kwargs[r["loss"]] = r["overrides"]
    by_loss.setdefault(r["loss"], []).append(R.run_opd(workdir, smoke, **r))
  out = {"sweep": os.path.relpath(SWEEP, R.ROOT), "losses": {}}
  import matplotlib.pyplot as plt

  fig, (ax, bx, cx) = plt.subplots(1, 3, figsize=(13, 3.4))
  colors = plt.get_cmap("tab10")
  for i, (loss, rundirs) in enumerate(by_loss.items()):
    last = [R.final_eval(r) for r in rundirs]
    out["losses"][loss] = {
      "kwargs": kwargs[loss],
      "hard_after": R.mean_std([R.level_mean(e, m.hard) for e in last]),
      "easy_after": R.mean_std([R.level_mean(e, m.easy) for e in last]),
      "reverse_kl_end": R.mean_std([R.window_mean(r, "reverse_kl", 0.9, 1) for r in rundirs]),
      "overlap_ratio_end": R.mean_std([R.window_mean(r, "overlap_ratio", 0.9, 1) for r in rundirs]),
      "step_time_s": R.mean_std([R.window_mean(r, "step_time_s", 0.1, 1) for r in rundirs]),
    }
    h = out["losses"][loss]["hard_after"]
    ax.bar(i, h["mean"], yerr=h["std"], color=colors(i), capsize=3)
    R.curve_band(bx, [R.metric_curve(r, "reverse_kl") for r in rundirs], colors(i), loss, window=10)
    R.curve_band(
      cx, [R.metric_curve(r, "overlap_ratio") for r in rundirs], colors(i), loss, window=10
    )
  ax.set_xticks(np.arange(len(by_loss)), list(by_loss), rotation=30, fontsize=7)
  ax.set_ylabel(f"final accuracy, hard levels {list(m.hard)}")
  bx.set_ylabel("reverse KL per token (10-step mean)")
  bx.set_yscale("log")
  cx.set_ylabel("overlap ratio (10-step mean)")
  for x in (bx, cx):
    x.set_xlabel("OPD step")
  bx.legend(fontsize=6)
  fig.suptitle(f"Loss ablation, student ← teacher_new ({len(R.seeds_of(m))} seeds)")
  R.save(workdir, "f9_loss_ablation", out, fig, m, smoke)
  return out


if __name__ == "__main__":
  R.cli(main, __doc__, jobs)
