"""Shared plumbing of the miniature reproduction (``experiments/f*.py``).

Layout of a reproduction workdir::

  organisms/          tokenizer, data, SFT workdirs of the organisms (+ export_hf)
  runs/<name>/        one OPD run each (configs/repro.py), resumable; names end
                      in ``_s<seed>``, so runs of other ``--seeds`` live beside
  learnability/<name>/  the supervised-bound SFT runs (experiments/learnability.py)
  results/<fig>.json  the numbers of each figure (key ``seeds``: the OPD seeds)
  figures/<fig>.png   the figures
  results/seeds_3_4_5/, figures/seeds_3_4_5/   the same for a non-default
                      ``--seeds`` list (organisms.json stays at the top: the
                      organisms do not depend on the OPD seeds)

A run is skipped once its ``DONE`` marker exists; an interrupted run resumes
from its checkpoint (the driver does that), so the whole reproduction is
resumable at any point.

Every stage lists its runs as :class:`Job` s (``jobs(workdir, smoke, seeds)``
of each stage module) and :func:`run_jobs` runs them in ``--workers``
processes, each pinned to one core with single-threaded XLA (the runs are
small: on this 2-core CPU an OPD step of a 2x128 student takes 0.12 s on one
core and 0.14 s on both, so two at once give ~2.3x the throughput of one on
two threads); the stage's ``main`` then finds them done and only reads them.
The numbers do not depend on the number of workers: every run is
single-threaded, whichever worker takes it.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import multiprocessing
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

import miniature  # noqa: E402

from opd_jax.logging_utils import read_metrics  # noqa: E402

REPRO_CONFIG = os.path.join(ROOT, "configs", "repro.py")
COLORS = {
  "teacher_new": "tab:green",
  "teacher_same": "tab:orange",
  "teacher_b": "tab:red",
  "student": "tab:blue",
}


def parser(doc: str) -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workdir", required=True)
  p.add_argument("--smoke", action="store_true", help="CI-sized: tiny organisms, few steps")
  p.add_argument(
    "--seeds",
    type=parse_seeds,
    default=None,
    help="comma-separated OPD run seeds, e.g. 3,4,5 (default: miniature.Miniature.seeds)",
  )
  p.add_argument(
    "--workers",
    type=int,
    default=0,
    help="runs at once, one core each (0: one per usable core)",
  )
  return p


def parse_seeds(text: str) -> tuple[int, ...]:
  """``"3,4,5"`` -> (3, 4, 5); distinct non-negative integers."""
  try:
    seeds = tuple(int(x) for x in text.split(",") if x.strip())
  except ValueError:
    raise argparse.ArgumentTypeError(f"--seeds: comma-separated integers, got {text!r}") from None
  if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
    raise argparse.ArgumentTypeError(f"--seeds: distinct non-negative integers, got {text!r}")
  return seeds


def headless() -> None:
  """Figures to files only (entry points; a notebook keeps its inline backend)."""
  import matplotlib

  matplotlib.use("Agg")


def setup_jax(workdir: str) -> None:
  """Persistent compilation cache: runs with the same shapes compile once;
  the CLI's host tuning (``train.tune_malloc``, ``train.use_cpu_sync_dispatch``:
  on one CPU device, steps ~25% faster), called before JAX starts."""
  import jax

  from opd_jax.train import tune_malloc, use_cpu_sync_dispatch

  tune_malloc()
  use_cpu_sync_dispatch()

  jax.config.update("jax_compilation_cache_dir", os.path.join(workdir, ".jax_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def assets_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), "organisms")


def organism_workdir(workdir: str, name: str) -> str:
  return os.path.join(assets_dir(workdir), name)


def arch_of(m: miniature.Miniature, name: str) -> str:
  a = m.student if miniature.ORGANISMS[name][0] == "student" else m.teacher
  return f"{a.num_layers}x{a.hidden_size}"


def setting_dict(m: miniature.Miniature) -> dict[str, Any]:
  return dataclasses.asdict(m)


# -----------------------------------------------------------------------------
# Runs.


def run_name(
  teacher: str = "teacher_new",
  loss: str = "reverse_kl",
  seed: int = 0,
  student: str = "student",
  prompts: str = "opd_prompts",
  cold_start: int = 0,
  **extra: Any,
) -> str:
  parts = [f"{student}-from-{teacher}", loss, prompts]
  if cold_start:
    parts.append(f"cold{cold_start}")
  parts += [f"{k}={v}" for k, v in sorted(extra.items())]
  parts.append(f"s{seed}")
  return "_".join(str(p).replace("/", "-").replace(".", "p") for p in parts)


def opd_config(
  workdir: str,
  smoke: bool,
  arg: Mapping[str, Any] | None = None,
  overrides: Mapping[str, Any] | None = None,
):
  """configs/repro.py with ``arg`` (its ``key=value`` argument) and dotted
  ``overrides`` (as ``--config.a.b=v`` on the command line)."""
  import importlib.util

  spec = importlib.util.spec_from_file_location("repro_config", REPRO_CONFIG)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  a = {"assets": assets_dir(workdir), "smoke": smoke, **(arg or {})}
  config = module.get_config(",".join(f"{k}={v}" for k, v in a.items()))
  for key, value in (overrides or {}).items():
    *parents, leaf = key.split(".")
    node = config
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def opd_rundir(workdir: str, name: str | None = None, **arg: Any) -> str:
  """Where :func:`run_opd` with these arguments writes its run."""
  return os.path.join(os.path.abspath(workdir), "runs", name or run_name(**arg))


def run_opd(
  workdir: str,
  smoke: bool,
  name: str | None = None,
  overrides: Mapping[str, Any] | None = None,
  **arg: Any,
) -> str:
  """Runs (or resumes, or skips if done) one OPD run; returns its directory."""
  from opd_jax.train import train

  rundir = opd_rundir(workdir, name, **arg)
  return run_once(rundir, lambda: opd_config(workdir, smoke, arg, overrides), train)


def run_once(rundir: str, make_config, train) -> str:
  """Runs ``train(make_config(), rundir)`` unless its ``DONE`` marker exists
  (an interrupted run resumes from its checkpoint); returns ``rundir``."""
  name = os.path.basename(rundir)
  done = os.path.join(rundir, "DONE")
  if not os.path.exists(done):
    print(f"[repro] run {name}", flush=True)
    last = train(make_config(), rundir)
    if last.get("status") != "finished":
      raise SystemExit(f"run {name} stopped ({last.get('status')}); rerun to resume")
    with open(done, "w") as f:
      f.write("finished\n")
  return rundir


# -----------------------------------------------------------------------------
# Jobs: every stage's runs, run in parallel before its analysis.


@dataclasses.dataclass(frozen=True)
class Job:
  """One run of a stage: ``fn(**kwargs)`` (a module-level function, so a
  worker process can import it; it skips work already done). ``key`` names
  what it makes (its directory); ``marker``: a file that exists once it is
  done (the job is then not started); ``cost`` orders the queue (longest
  first, in OPD-step equivalents); ``after``: keys of jobs that must finish
  first (keys not among the jobs run are taken as done)."""

  key: str
  fn: Callable[..., Any]
  kwargs: Mapping[str, Any]
  marker: str
  cost: float
  after: tuple[str, ...] = ()


def opd_jobs(
  workdir: str, smoke: bool, runs: Sequence[Mapping[str, Any]], after: tuple[str, ...] = ()
) -> list[Job]:
  """:class:`Job` s of :func:`run_opd` for each keyword set of ``runs``
  (``name``, ``overrides`` and :func:`run_name`'s arguments). Cost: the
  run's steps, x2.5 for a teacher-sized student (fwd + bwd of 4 layers)."""
  m = miniature.miniature(smoke)
  out = []
  for r in runs:
    r = dict(r)
    big = miniature.ORGANISMS.get(r.get("student", "student"), ("student",))[0] != "student"
    cost = (r.get("steps") or m.opd_steps) * (2.5 if big else 1.0)
    key = opd_rundir(workdir, **{k: v for k, v in r.items() if k != "overrides"})
    kwargs = dict(workdir=workdir, smoke=smoke, **r)
    out.append(Job(key, run_opd, kwargs, os.path.join(key, "DONE"), cost, after))
  return out


def stage_jobs(runs: Callable[[miniature.Miniature], Sequence[Mapping[str, Any]]]):
  """The ``jobs(workdir, smoke, seeds)`` of a finding whose OPD runs are
  ``runs(m)`` (:func:`run_opd` arguments), once the gates have passed
  (:func:`setting`)."""

  def jobs(workdir: str, smoke: bool = False, seeds=None) -> list[Job]:
    return opd_jobs(workdir, smoke, runs(setting(workdir, smoke, seeds)))

  return jobs


def default_workers() -> int:
  """One worker per usable core."""
  return len(os.sched_getaffinity(0))


def run_jobs(workdir: str, jobs: Sequence[Job], workers: int = 0) -> float:
  """Runs ``jobs`` in ``workers`` processes (0: :func:`default_workers`),
  longest first as their ``after`` allow; returns the wall seconds. Each
  worker is pinned to one core (round robin over the usable ones) and runs
  XLA single-threaded. A failed job stops the rest (SystemExit naming it)."""
  by_key: dict[str, Job] = {}
  for j in jobs:
    if not os.path.exists(j.marker):
      by_key.setdefault(j.key, j)  # stages share runs (finding 3 reads 1's and 2's)
  if not by_key:
    return 0.0
  t0 = time.time()
  workers = min(workers or default_workers(), len(by_key))
  ctx = multiprocessing.get_context("spawn")
  cores = ctx.Queue()
  usable = sorted(os.sched_getaffinity(0))
  for i in range(workers):
    cores.put(usable[i % len(usable)])
  pending = sorted(by_key.values(), key=lambda j: -j.cost)
  done: set[str] = set()
  running: dict[concurrent.futures.Future, Job] = {}
  with concurrent.futures.ProcessPoolExecutor(
    workers, mp_context=ctx, initializer=_worker_init, initargs=(cores, workdir)
  ) as pool:
    while pending or running:
      for j in list(pending):
        if len(running) >= workers:
          break
        if all(a in done or a not in by_key for a in j.after):
          pending.remove(j)
          running[pool.submit(j.fn, **j.kwargs)] = j
      if not running:
        raise RuntimeError(f"jobs wait on each other: {[j.key for j in pending]}")
      finished, _ = concurrent.futures.wait(running, return_when="FIRST_COMPLETED")
      for f in finished:
        j = running.pop(f)
        try:
          f.result()
        except BaseException as e:
          pool.shutdown(cancel_futures=True)
          raise SystemExit(f"job {j.key} failed: {type(e).__name__}: {e}") from e
        done.add(j.key)
  return time.time() - t0


def _worker_init(cores, workdir: str) -> None:
  """A :func:`run_jobs` worker: one core, single-threaded XLA (set before
  JAX starts its backend), figures to files, the reproduction's JAX set-up."""
  os.sched_setaffinity(0, {cores.get()})
  flags = os.environ.get("XLA_FLAGS", "")
  if "xla_cpu_multi_thread_eigen" not in flags:
    os.environ["XLA_FLAGS"] = (flags + " --xla_cpu_multi_thread_eigen=false").strip()
  headless()
  setup_jax(workdir)


def seeds_of(m: miniature.Miniature) -> tuple[int, ...]:
  return tuple(m.seeds)


def seed_tag(m: miniature.Miniature, smoke: bool) -> str:
  """ "" for the default seeds, else ``seeds_3_4_5``: where results go."""
  if tuple(m.seeds) == miniature.miniature(smoke).seeds:
    return ""
  return "seeds_" + "_".join(map(str, m.seeds))


def setting(workdir: str, smoke: bool, seeds: Sequence[int] | None = None) -> miniature.Miniature:
  """The settings of a finding with OPD seeds ``seeds``, once its calibration
  gates have passed: the organisms' (``results/organisms.json``) and the
  supervised bound's (``learnability.json`` of these seeds). A failed or
  missing gate stops the script (SystemExit): no verdict from uncalibrated
  organisms."""
  m = miniature.miniature(smoke, seeds)
  require_gate(load(workdir, "organisms").get("gates"), "organisms", "organisms.py")
  opts = "" if seeds is None else " --seeds=" + ",".join(map(str, m.seeds))
  bound = load(workdir, "learnability", m, smoke, missing=f"run experiments/learnability.py{opts}")
  require_gate(bound.get("gate"), "supervised bound", "learnability.py")
  return m


def require_gate(record: Mapping[str, Any] | None, what: str, script: str) -> None:
  if not record:
    raise SystemExit(f"calibration gate ({what}) not recorded: rerun experiments/{script}")
  if record["status"] not in ("passed", "skipped"):
    lines = "\n  ".join(record.get("failures", []))
    raise SystemExit(f"calibration gate ({what}) failed, no verdict:\n  {lines}")


# -----------------------------------------------------------------------------
# Reading runs.


class ExportEvaluator:
  """This repo's evals of a run's ``config`` (``config.evals``, its sampler
  settings and student knobs) on HF exports: ``from_hf`` -> ``train.run_evals``;
  examples read once, at construction."""

  def __init__(self, config):
    from transformers import AutoTokenizer

    from opd_jax import train

    self.settings = train.settings_of(config)
    self.tokenizer = AutoTokenizer.from_pretrained(self.settings.tokenizer)
    s_cfg = train.model_config_of(self.settings.student)
    self.cache = train.prepare_evals(self.settings, s_cfg, self.tokenizer)

  def __call__(self, export: str) -> dict[str, float]:
    """``eval/<name>/<metric>`` of the HF export at ``export``."""
    from opd_jax import train
    from opd_jax.models import from_hf

    model = from_hf(export, **self.settings.student.kwargs())
    return train.run_evals(self.settings, self.cache, model, self.tokenizer)


def records(rundir: str) -> list[dict[str, Any]]:
  return read_metrics(rundir)


def eval_records(rundir: str, prefix: str = "eval/all") -> list[dict[str, Any]]:
  return [r for r in records(rundir) if f"{prefix}/accuracy" in r]


def final_eval(rundir: str, prefix: str = "eval/all") -> dict[str, Any]:
  evals = eval_records(rundir, prefix)
  if not evals:
    raise ValueError(f"no {prefix} evaluation in {rundir}/metrics.jsonl")
  return evals[-1]


def level_mean(rec: Mapping[str, Any], levels: Sequence[int], prefix: str = "eval/all") -> float:
  """Accuracy averaged over ``levels`` (each level has the same count)."""
  return float(np.mean([rec[f"{prefix}/acc/level_{L}"] for L in levels]))


def accuracy_curve(rundir: str, levels: Sequence[int]) -> tuple[list[int], list[float]]:
  evals = eval_records(rundir)
  return [int(r["step"]) for r in evals], [level_mean(r, levels) for r in evals]


def metric_curve(rundir: str, key: str) -> tuple[np.ndarray, np.ndarray]:
  rows = [r for r in records(rundir) if key in r and "cold_start" in r and not r["cold_start"]]
  return (
    np.array([r["step"] for r in rows], dtype=np.int64),
    np.array([r[key] for r in rows], dtype=np.float64),
  )


def smooth(y: np.ndarray, window: int) -> np.ndarray:
  """Trailing moving average (window clipped at the start)."""
  if window <= 1 or len(y) == 0:
    return y
  c = np.cumsum(np.insert(y, 0, 0.0))
  idx = np.arange(1, len(y) + 1)
  lo = np.maximum(idx - window, 0)
  return (c[idx] - c[lo]) / (idx - lo)


def window_mean(rundir: str, key: str, start_frac: float, end_frac: float) -> float:
  """Mean of a per-step metric over a fraction of the OPD steps."""
  steps, y = metric_curve(rundir, key)
  if not len(y):
    return float("nan")
  lo, hi = int(start_frac * len(y)), max(int(end_frac * len(y)), int(start_frac * len(y)) + 1)
  return float(np.mean(y[lo:hi]))


def mean_std(values: Sequence[float]) -> dict[str, Any]:
  v = np.asarray(values, dtype=np.float64)
  return {
    "mean": float(np.mean(v)),
    "std": float(np.std(v, ddof=1)) if len(v) > 1 else 0.0,
    "n": int(len(v)),
    "values": [float(x) for x in v],
  }


def fmt(ms: Mapping[str, Any], scale: float = 1.0, digits: int = 1) -> str:
  return f"{ms['mean'] * scale:.{digits}f} ± {ms['std'] * scale:.{digits}f}"


# A teacher less than this (absolute accuracy) above or below the student
# leaves no gap to recover: its recovery is NaN, not a ratio of noise (the
# redesigned teacher_same is 0.4 points below the student overall, which
# made "recoveries" of ±3000%).
MIN_GAP = 0.05


def gap_recovery(after: float, student: float, teacher: float) -> float:
  """(acc_after − acc_student) / (acc_teacher − acc_student) (paper Fig. 1
  left); NaN when |acc_teacher − acc_student| < :data:`MIN_GAP`."""
  gap = teacher - student
  return float("nan") if abs(gap) < MIN_GAP else (after - student) / gap


def organisms_table(workdir: str) -> dict[str, Any]:
  return load(workdir, "organisms")["organisms"]


def results_dir(workdir: str, m: miniature.Miniature | None = None, smoke: bool = False) -> str:
  """``workdir/results`` (``m`` None or default seeds), else its seed subfolder."""
  return os.path.join(workdir, "results", seed_tag(m, smoke) if m is not None else "")


def load(
  workdir: str,
  name: str,
  m: miniature.Miniature | None = None,
  smoke: bool = False,
  missing: str = "",
) -> dict[str, Any]:
  """``results/[seeds_…/]<name>.json`` as written by :func:`save`."""
  path = os.path.join(results_dir(workdir, m, smoke), f"{name}.json")
  if not os.path.exists(path):
    raise SystemExit(f"{path} missing" + (f": {missing}" if missing else ""))
  with open(path) as f:
    return json.load(f)


# -----------------------------------------------------------------------------
# Writing results.


def save(
  workdir: str,
  name: str,
  data: Mapping[str, Any],
  fig=None,
  m: miniature.Miniature | None = None,
  smoke: bool = False,
) -> None:
  """Writes ``results/<name>.json`` (+ ``figures/<name>.png``); with ``m``,
  records its OPD ``seeds`` and writes under :func:`seed_tag`'s subfolder."""
  tag = seed_tag(m, smoke) if m is not None else ""
  if m is not None:
    data = {**data, "seeds": list(m.seeds)}
  for sub in ("results", "figures"):
    os.makedirs(os.path.join(workdir, sub, tag), exist_ok=True)
  tmp = os.path.join(workdir, "results", tag, f".{name}.json.tmp")
  with open(tmp, "w") as f:
    json.dump(_finite(data), f, indent=2, default=_json_default, allow_nan=False)
  os.replace(tmp, os.path.join(workdir, "results", tag, f"{name}.json"))
  if fig is not None:
    fig.tight_layout()
    fig.savefig(os.path.join(workdir, "figures", tag, f"{name}.png"), dpi=120)
    import matplotlib.pyplot as plt

    plt.close(fig)


def _finite(x):
  """NaN / inf -> None (strict JSON), recursively."""
  if isinstance(x, dict):
    return {k: _finite(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_finite(v) for v in x]
  if isinstance(x, (float, np.floating)) and not np.isfinite(x):
    return None
  return x


def _json_default(x):
  if isinstance(x, (np.floating, np.integer)):
    return x.item()
  if isinstance(x, np.ndarray):
    return x.tolist()
  raise TypeError(f"not JSON serialisable: {type(x)}")


def print_json(data: Any) -> None:
  print(json.dumps(data, indent=2, default=_json_default))


def final_eval_at(rundir: str, step: int, prefix: str = "eval/all") -> dict[str, Any]:
  """The evaluation logged at ``step`` (0: before any update)."""
  for r in eval_records(rundir, prefix):
    if int(r["step"]) == step:
      return r
  raise ValueError(f"no {prefix} evaluation at step {step} in {rundir}")


def curve_band(
  ax, curves: Sequence[tuple[np.ndarray, np.ndarray]], color: str, label: str, window: int = 1
) -> None:
  """Mean ± std over seeds of per-step curves (aligned on the first's steps)."""
  n = min(len(c[1]) for c in curves)
  steps = np.asarray(curves[0][0][:n])
  ys = np.array([smooth(np.asarray(c[1][:n], dtype=np.float64), window) for c in curves])
  mu, sd = ys.mean(0), ys.std(0)
  ax.plot(steps, mu, color=color, label=label)
  ax.fill_between(steps, mu - sd, mu + sd, color=color, alpha=0.2)


def seed_slice(res: Any, i: int) -> Any:
  """``res`` with every :func:`mean_std` record replaced by seed ``i``'s value
  alone (mean = values[i], std 0, n 1): the results one seed would give."""
  if isinstance(res, dict):
    if {"mean", "std", "n", "values"} <= set(res) and isinstance(res["values"], list):
      v = res["values"][i]
      return {**res, "mean": v, "std": 0.0, "n": 1, "values": [v]}
    return {k: seed_slice(v, i) for k, v in res.items()}
  if isinstance(res, (list, tuple)):
    return [seed_slice(v, i) for v in res]
  return res


def seed_runs(workdir: str, smoke: bool, m: miniature.Miniature, **arg: Any):
  """One run per seed of ``m``: (run dirs, evals at step 0, final evals)."""
  runs = [run_opd(workdir, smoke, seed=s, **arg) for s in seeds_of(m)]
  return runs, [final_eval_at(r, 0) for r in runs], [final_eval(r) for r in runs]


def cli(main, doc: str, jobs=None) -> None:
  """``python experiments/<finding>.py --workdir=DIR [--smoke] [--seeds=3,4,5]
  [--workers=N]``: the stage's ``jobs`` (:func:`run_jobs`), then its ``main``."""
  args = parser(doc).parse_args()
  headless()
  setup_jax(args.workdir)
  if jobs is not None:
    run_jobs(args.workdir, jobs(args.workdir, args.smoke, args.seeds), args.workers)
  print_json(main(args.workdir, args.smoke, args.seeds))
