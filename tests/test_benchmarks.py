"""The benchmark scripts still run (numbers are printed, never asserted on
time): ``experiments/bench_opd_step.py`` without TRL, its per-piece profile
and its JSON output."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_bench(script: str, *args: str, timeout: int = 900) -> str:
  """Runs ``experiments/<script>`` with ``args``; its stdout (exit code 0 asserted)."""
  proc = subprocess.run(
    [sys.executable, os.path.join(ROOT, "experiments", script), *args],
    cwd=ROOT,
    env={**os.environ, "PYTHONPATH": ROOT},
    capture_output=True,
    text=True,
    timeout=timeout,
  )
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  return proc.stdout


@pytest.mark.slow
def test_bench_opd_step_small_runs(tmp_path):
  out = tmp_path / "bench.json"
  stdout = _run_bench(
    "bench_opd_step.py",
    *("--preset", "small", "--no-trl", "--steps", "2", "--profile", "--profile-repeats", "1"),
    *("--cli", "--json", str(out)),
  )
  (res,) = json.loads(out.read_text())
  assert res["gen_tokens"] == 8 * 64
  fl = res["flops"]
  assert fl["total"] == fl["sampling"] + fl["teacher"] + fl["student_fwd_bwd"] > 0
  ours = res["ours"][0]
  # XLA counts the decode loop's body once, so its total sits a little under
  # the analytic count (all N tokens), never above it.
  assert 0.85 * fl["total"] < ours["xla_flops"] <= fl["total"]
  assert len(ours["deltas"]) == 2 and all(w > 0 and c > 0 for w, c in ours["deltas"])
  last = ours["last"]
  assert last["num_tokens"] == 512 and last["mean_response_length"] == 64
  # Reverse-KL loss (token mean) == the in-step exact reverse-KL metric.
  assert last["loss"] == pytest.approx(last["reverse_kl"], rel=1e-4)
  assert set(res["profile"]) >= {"sampling", "teacher forward (hidden)", "optimizer update"}
  # --cli: the real driver (python -m opd_jax.train), 2 steps before and 2
  # after where TRL would run; prompts in their 16-token bucket of the default 64.
  cli = res["ours"][1]
  assert cli["name"].startswith("ours, CLI driver loop")
  assert len(cli["deltas"]) == 4 and all(w > 0 for w, _ in cli["deltas"])
  assert cli["last"]["num_tokens"] == 512 and cli["last"]["prompt_len"] == 16
  assert res["cli"]["prompt_len"] == 16 and res["cli"]["logged_tok_s"] > 0
  assert "/ TRL, steps/s" not in stdout  # no TRL side: no ratio printed
  assert "FLOP" in stdout and "steps/s" in stdout


@pytest.mark.slow
def test_bench_vmap_sweep_runs():
  """The vmapped-sweep benchmark prints both sides and their ratio."""
  out = _run_bench("bench_vmap_sweep.py", "--preset", "tiny", "--points", "2", "--steps", "1")
  assert "vmapped (1 call, 2 points)" in out
  assert "vmapped / sequential throughput:" in out


@pytest.mark.slow
def test_bench_sampler_runs():
  """experiments/bench_sampler.py with two decode choices side by side (tiny
  model, short decodes): greedy parity with generate and one row per choice."""
  out = _run_bench(
    "bench_sampler.py",
    *("--new-tokens", "16", "40", "--decode-attention", "phased", "dense"),
    *("--decode-phase-slots", "16", "--repeats", "1", "--parity-tokens", "8", "--batch", "2"),
    timeout=600,
  )
  assert out.count("identical") == 2, out
  rows = [line.split() for line in out.splitlines() if line.split()[:1] in (["16"], ["40"])]
  assert [(r[0], r[1]) for r in rows] == [
    ("16", "phased"),
    ("16", "dense"),
    ("40", "phased"),
    ("40", "dense"),
  ], out


def test_bench_decode_layouts_runs():
  """experiments/bench_decode_layouts.py at a tiny size: every layout's scores
  equal the transposed cache's (checked in the script) and each gets a row."""
  out = _run_bench(
    "bench_decode_layouts.py",
    *("--slots", "128", "--layers", "1", "--chunks", "32", "64"),
    *("--rounds", "1", "--calls", "1"),
    timeout=300,
  )
  names = [line.strip().split("  ")[0] for line in out.splitlines()[1:]]
  assert names == ["transposed", "chunked 32", "chunked 64", "read"], out


def test_bench_decode_layouts_rejects_uneven_chunks():
  with pytest.raises(AssertionError, match="must be a multiple"):
    _run_bench("bench_decode_layouts.py", "--slots", "100", "--chunks", "64", timeout=300)
