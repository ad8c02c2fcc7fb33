"""``repro_lib.run_jobs``: the reproduction's worker pool (one core and
single-threaded XLA per worker, longest job first, dependencies, skipping
finished jobs, a failed job stopping the rest with its name)."""

from __future__ import annotations

import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "experiments"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import repro_lib as R  # noqa: E402


def record(path: str, needs: str = "", fail: bool = False) -> None:
  """A job: writes what its worker looks like to ``path/out.json``; ``needs``
  must exist already (its dependency's output)."""
  import time

  if fail:
    raise ValueError("boom")
  assert not needs or os.path.exists(needs), f"{needs} not made before {path}"
  time.sleep(0.2)
  os.makedirs(path, exist_ok=True)
  out = {
    "cores": sorted(os.sched_getaffinity(0)),
    "xla_flags": os.environ.get("XLA_FLAGS", ""),
    "pid": os.getpid(),
    "t": time.time(),
  }
  with open(os.path.join(path, "out.json"), "w") as f:
    json.dump(out, f)


def job(tmp, name, cost=1.0, after=(), **kw):
  d = str(tmp / name)
  return R.Job(
    d,
    record,
    dict(path=d, **kw),
    os.path.join(d, "out.json"),
    cost,
    tuple(str(tmp / a) for a in after),
  )


def read(tmp, name):
  with open(tmp / name / "out.json") as f:
    return json.load(f)


def test_workers_are_single_threaded_one_core_each_and_respect_dependencies(tmp_path):
  jobs = [
    job(tmp_path, "a", cost=1),
    job(tmp_path, "b", cost=5),
    job(tmp_path, "c", cost=9, after=("a",), needs=str(tmp_path / "a" / "out.json")),
    job(tmp_path, "b", cost=5),  # the same run listed by two stages: run once
  ]
  R.run_jobs(str(tmp_path), jobs, workers=2)
  outs = {n: read(tmp_path, n) for n in "abc"}
  usable = sorted(os.sched_getaffinity(0))
  for o in outs.values():
    assert len(o["cores"]) == 1 and o["cores"][0] in usable
    assert "--xla_cpu_multi_thread_eigen=false" in o["xla_flags"]
  assert len({o["pid"] for o in outs.values()}) <= 2  # two workers, reused
  assert outs["c"]["t"] > outs["a"]["t"]  # waited for its dependency, though the longest
  if len(usable) >= 2:
    assert {tuple(o["cores"]) for o in outs.values()} == {(usable[0],), (usable[1],)}


def test_finished_jobs_are_not_started_and_a_failure_names_its_job(tmp_path):
  R.run_jobs(str(tmp_path), [job(tmp_path, "a")], workers=1)
  first = read(tmp_path, "a")
  R.run_jobs(str(tmp_path), [job(tmp_path, "a")], workers=1)
  assert read(tmp_path, "a") == first  # its marker exists: skipped
  with pytest.raises(SystemExit, match=r"job .*bad failed: ValueError: boom"):
    R.run_jobs(str(tmp_path), [job(tmp_path, "bad", fail=True), job(tmp_path, "c")], workers=1)


def test_jobs_waiting_on_each_other_are_an_error(tmp_path):
  jobs = [job(tmp_path, "a", after=("b",)), job(tmp_path, "b", after=("a",))]
  with pytest.raises(RuntimeError, match="wait on each other"):
    R.run_jobs(str(tmp_path), jobs, workers=2)
