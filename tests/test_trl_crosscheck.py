"""``experiments/trl_crosscheck.py``: finding 1's contrast by our driver and by
TRL's ``DistillationTrainer``, both scored by our evaluator. The settings map
runs everywhere; the ``--smoke`` run end to end needs the ``bench`` extra
(torch + trl) and skips without it (marked ``torch``: deselected on CI's
Python 3.12 leg)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENTS = os.path.join(ROOT, "experiments")


def _crosscheck():
  if EXPERIMENTS not in sys.path:
    sys.path.insert(0, EXPERIMENTS)
  spec = importlib.util.spec_from_file_location(
    "trl_crosscheck", os.path.join(EXPERIMENTS, "trl_crosscheck.py")
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_trl_settings_are_the_runs_settings(tmp_path):
  x = _crosscheck()
  config = x.R.opd_config(str(tmp_path), True, x.run_arg("teacher_same", 3, 7))
  s = x.trl_settings(config)
  m = x.miniature.miniature(True)
  assert s["prompts_per_step"] == m.opd_batch and s["num_samples"] == m.num_samples
  assert s["steps"] == 7 and s["seed"] == 3 and s["lr"] == m.opd_lr
  assert s["max_new_tokens"] == m.max_new_tokens and s["temperature"] == 1.0
  assert config.teacher.path.endswith(os.path.join("teacher_same", "export_hf"))
  assert "steps" not in x.run_arg("teacher_new", 0, 0)  # finding 1's own run name


@pytest.mark.parametrize(
  "key, value",
  [("loss.name", "forward_kl"), ("optimizer.schedule", "cosine"), ("cold_start.steps", 2)],
)
def test_trl_settings_refuse_what_trl_cannot_match(tmp_path, key, value):
  x = _crosscheck()
  config = x.R.opd_config(str(tmp_path), True, x.run_arg("teacher_new", 0, 0), {key: value})
  with pytest.raises(ValueError, match=f"config.{key}="):
    x.trl_settings(config)


@pytest.mark.slow
@pytest.mark.torch
def test_smoke_crosscheck_prints_both_curves(tmp_path):
  for name in ("torch", "trl", "datasets", "accelerate"):
    pytest.importorskip(name, reason="the bench extra (torch + trl) is not installed")
  import trl

  if not hasattr(trl, "DistillationTrainer"):
    pytest.skip(f"trl {trl.__version__} has no DistillationTrainer")
  workdir = str(tmp_path)
  proc = subprocess.run(
    [sys.executable, os.path.join(EXPERIMENTS, "trl_crosscheck.py"), f"--workdir={workdir}"]
    + ["--smoke", "--seeds=0"],
    cwd=ROOT,
    env={**os.environ, "PYTHONPATH": ROOT},
    capture_output=True,
    text=True,
    timeout=1200,
  )
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
  for teacher in ("teacher_new", "teacher_same"):
    assert f"== student from {teacher}, seed 0" in proc.stdout
  assert "== agreement (over seeds) ==" in proc.stdout
  with open(os.path.join(workdir, "results", "trl_crosscheck.json")) as f:
    res = json.load(f)
  assert res["seeds"] == [0] and res["trl"].startswith("trl ")
  assert [r["teacher"] for r in res["runs"]] == ["teacher_new", "teacher_same"]
  for r in res["runs"]:
    ours = [json.loads(line) for line in open(os.path.join(r["ours"], "metrics.jsonl"))]
    eval_steps = [x["step"] for x in ours if "eval/all/accuracy" in x]
    assert r["steps"] == eval_steps == [0, 2, 4]  # smoke: 4 steps, eval every 2
    with open(os.path.join(r["trl"], "result.json")) as f:
      trl_run = json.load(f)
    assert [e["step"] for e in trl_run["evals"]] == eval_steps
    assert len(trl_run["losses"]) == 4 and all(v >= 0 for v in trl_run["losses"])
    for key in ("hard", "overall"):
      a, b = r[key]["ours"], r[key]["trl"]
      assert len(a) == len(b) == 3 and all(0 <= v <= 1 for v in a + b)
      assert a[0] == b[0]  # step 0: the same checkpoint, the same evaluator
      assert r[key]["max_abs_delta"] == pytest.approx(max(abs(u - v) for u, v in zip(a, b)))
  assert set(res["summary"]) >= {"teacher_new", "teacher_same"}
