"""The miniature reproduction end to end in ``--smoke`` mode (all code paths:
organisms, every finding, figures, results table), its resumability, and the
analysis notebook executed headless on its output."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENTS = os.path.join(ROOT, "experiments")
FIGURES = (
  "organisms",
  "f1_gap_recovery",
  "f2_compatibility",
  "f3_overlap_dynamics",
  "f4_overlap_mass",
  "f5_weak_to_strong",
  "f6_cold_start",
  "f7_prompt_selection",
  "f8_long_horizon",
  "f9_loss_ablation",
)

pytestmark = pytest.mark.slow


def _run(workdir, *extra):
  env = {**os.environ, "PYTHONPATH": ROOT}
  return subprocess.run(
    [
      sys.executable,
      os.path.join(EXPERIMENTS, "reproduce.py"),
      f"--workdir={workdir}",
      "--smoke",
      *extra,
    ],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=1800,
  )


@pytest.fixture(scope="session")
def smoke_repro(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("repro_smoke"))
  proc = _run(workdir)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
  return workdir


def test_smoke_writes_every_figure_and_number(smoke_repro):
  for name in FIGURES:
    assert os.path.getsize(os.path.join(smoke_repro, "figures", f"{name}.png")) > 1000, name
    with open(os.path.join(smoke_repro, "results", f"{name}.json")) as f:
      assert json.load(f), name
  with open(os.path.join(smoke_repro, "results", "summary.json")) as f:
    summary = json.load(f)
  assert summary["smoke"] is True
  # every run was listed by its stage's jobs() and ran in the worker pool
  assert summary["unplanned_runs"] == [] and summary["workers"] >= 1
  assert len(summary["rows"]) == 10
  for r in summary["rows"]:
    assert r["verdict"].split(" (")[0] in ("reproduces", "does not reproduce", "descriptive"), r
  table = open(os.path.join(smoke_repro, "results", "results.md")).read()
  assert table.count("\n") == 12 and "| finding | paper |" in table
  # every OPD run finished through the real driver: config, metrics, evals
  runs = os.listdir(os.path.join(smoke_repro, "runs"))
  assert any("cold" in r for r in runs) and any("selected" in r for r in runs)
  assert any(r.startswith("teacher_new-from-student") for r in runs)
  for loss in ("reverse_kl", "k1", "forward_kl", "jsd", "skew_kl", "topk_opd"):
    assert any(f"_{loss}_" in r for r in runs), loss
  for r in runs:
    d = os.path.join(smoke_repro, "runs", r)
    assert os.path.exists(os.path.join(d, "DONE")), r
    rows = [json.loads(l) for l in open(os.path.join(d, "metrics.jsonl"))]
    assert any("eval/all/accuracy" in x and x["step"] == 0 for x in rows), r
    assert any("overlap_ratio" in x for x in rows), r


def test_cold_start_run_switches_from_sft_to_opd(smoke_repro):
  with open(os.path.join(smoke_repro, "results", "f6_cold_start.json")) as f:
    res = json.load(f)
  run = res["cold_runs"][0]
  rows = [json.loads(l) for l in open(os.path.join(run, "metrics.jsonl"))]
  phases = [x["cold_start"] for x in rows if "cold_start" in x]
  n = res["cold_start_steps"]
  assert phases[:n] == [1.0] * n and set(phases[n:]) == {0.0}
  assert os.path.exists(os.path.join(run, "cold_start_rollouts.jsonl"))


def test_prompt_selection_arm_trains_on_selected_prompts(smoke_repro):
  with open(os.path.join(smoke_repro, "results", "f7_prompt_selection.json")) as f:
    res = json.load(f)
  run = res["arms"]["selected"]["runs"][0]
  with open(os.path.join(run, "config.json")) as f:
    config = json.load(f)
  assert config["data"]["train_files"].endswith(os.path.join("prompt_selection", "selected.jsonl"))
  assert sum(res["selected_levels"].values()) == res["selection"]["num_selected"]


def test_rerun_is_resumable_and_skips_finished_runs(smoke_repro):
  runs_dir = os.path.join(smoke_repro, "runs")
  before = {
    r: os.path.getmtime(os.path.join(runs_dir, r, "metrics.jsonl")) for r in os.listdir(runs_dir)
  }
  proc = _run(smoke_repro, "--stages=organisms,f1_gap_recovery,f3_overlap_dynamics")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "[repro] run " not in proc.stdout  # nothing retrained
  after = {r: os.path.getmtime(os.path.join(runs_dir, r, "metrics.jsonl")) for r in before}
  assert after == before


def test_analysis_notebook_executes_on_smoke_runs(smoke_repro):
  import nbclient
  import nbformat

  path = os.path.join(ROOT, "notebooks", "analysis.ipynb")
  nb = nbformat.read(path, as_version=4)
  os.environ["OPD_REPRO_DIR"] = smoke_repro
  try:
    nbclient.NotebookClient(
      nb,
      timeout=300,
      kernel_name="python3",
      resources={"metadata": {"path": os.path.dirname(path)}},
    ).execute()
  finally:
    del os.environ["OPD_REPRO_DIR"]
  text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
  assert "student-from-teacher_new_reverse_kl" in text
  images = sum(
    "image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.outputs
  )
  assert images >= 2 + len(FIGURES)


def test_smoke_reseeded_runs_beside_the_default_seeds(smoke_repro):
  """``--seeds=0,1``: seed 0's runs are reused, seed 1's are added beside them,
  the results (with per-seed verdicts) go to results/seeds_0_1/ and the
  default results stay; a finding script's CLI takes ``--seeds`` too."""
  runs_dir = os.path.join(smoke_repro, "runs")
  before = {
    r: os.path.getmtime(os.path.join(runs_dir, r, "metrics.jsonl")) for r in os.listdir(runs_dir)
  }
  proc = _run(smoke_repro, "--seeds=0,1")
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
  runs = os.listdir(runs_dir)
  assert {r for r in runs if r.endswith("_s1")} and all(r.endswith("_s0") for r in before)
  assert {r: os.path.getmtime(os.path.join(runs_dir, r, "metrics.jsonl")) for r in before} == before
  with open(os.path.join(smoke_repro, "results", "seeds_0_1", "summary.json")) as f:
    summary = json.load(f)
  assert summary["seeds"] == [0, 1] and len(summary["rows"]) == 10
  for r in summary["rows"]:
    assert set(r["per_seed"]) == {"0", "1"}, r
    assert r["robustness"] in ("robust", "fragile", "descriptive"), r
  with open(os.path.join(smoke_repro, "results", "seeds_0_1", "f1_gap_recovery.json")) as f:
    f1 = json.load(f)
  assert f1["seeds"] == [0, 1] and f1["supervised_bound"]["n"] == 2
  assert len(f1["teachers"]["teacher_new"]["runs"]) == 2
  with open(os.path.join(smoke_repro, "results", "summary.json")) as f:
    assert json.load(f)["seeds"] == [0]
  # one finding alone on seed 1: its gates (the supervised bound of seed 1)
  # come first, then it reuses seed 1's runs
  env = {**os.environ, "PYTHONPATH": ROOT}
  for script in ("f3_overlap_dynamics", "learnability", "f3_overlap_dynamics"):
    proc = subprocess.run(
      [sys.executable, os.path.join(EXPERIMENTS, f"{script}.py")]
      + [f"--workdir={smoke_repro}", "--smoke", "--seeds=1"],
      cwd=ROOT,
      env=env,
      capture_output=True,
      text=True,
      timeout=600,
    )
    if not os.path.exists(os.path.join(smoke_repro, "results", "seeds_1", "learnability.json")):
      assert proc.returncode != 0 and "run experiments/learnability.py --seeds=1" in proc.stderr
      continue
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[repro] run " not in proc.stdout  # seed 1's runs exist
  with open(os.path.join(smoke_repro, "results", "seeds_1", "f3_overlap_dynamics.json")) as f:
    assert json.load(f)["seeds"] == [1]
