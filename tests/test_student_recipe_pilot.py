"""``experiments/student_recipe_pilot.py``: seed variants of the miniature's
student (reseeded init and data order), a recipe's steps and hard-row cut,
and the gates that judge the student."""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "experiments"))

import miniature  # noqa: E402
import repro_lib as R  # noqa: E402
import student_recipe_pilot as pilot  # noqa: E402


def test_student_gates_name_each_failed_level():
  m, g = miniature.miniature(), miniature.gates()
  good = {1: 1.0, 2: 1.0, 3: 0.98, 4: 0.06}
  assert pilot.check_student(m, g, good, {1: 1.0, 2: 1.0, 3: 1.0, 4: 0.0}) == []
  # The committed student of the 1,200-step build: one level-1 problem missed.
  fails = pilot.check_student(m, g, {**good, 1: 0.906}, None)
  assert len(fails) == 1 and fails[0].startswith("student level 1: measured 90.6%")
  # Level 4 above teacher_same's window (teacher_same at 0%), still under 25%.
  fails = pilot.check_student(m, g, {**good, 4: 0.141}, {1: 1.0, 2: 1.0, 3: 1.0, 4: 0.0})
  assert len(fails) == 1 and fails[0].startswith("teacher_same level 4")
  # Without teacher_same only the student's own gates apply.
  assert pilot.check_student(m, g, {**good, 4: 0.141}, None) == []


def test_variant_must_not_be_negative(tmp_path):
  with pytest.raises(ValueError, match="variant must be >= 0"):
    miniature.train_miniature_organism(
      str(tmp_path), miniature.miniature(True), "student", variant=-1
    )


def test_recipe_names_and_lr_check(tmp_path):
  assert pilot.recipe_name(600, None) == "steps600"
  assert pilot.recipe_name(1200, 40, 1e-3) == "steps1200_hard40_lr0.001"
  assert pilot.recipe_name(1200, 40, None, 3) == "steps1200_hard40_layers3"
  assert pilot.recipe_name(1200, None, None, 3, 150) == "easy1200_then150_layers3"
  with pytest.raises(SystemExit, match="--lr must be > 0"):
    pilot.main([f"--workdir={tmp_path}", "--smoke", "--variants=0", "--lr=-1"])
  with pytest.raises(SystemExit, match="--layers must be >= 1"):
    pilot.main([f"--workdir={tmp_path}", "--smoke", "--variants=0", "--layers=-2"])


def test_random_init_of_another_arch_is_refused(tmp_path):
  """A pilot of another depth must not silently reuse a cached init."""
  from opd_jax import organisms as O

  tok = O.ensure_tokenizer(str(tmp_path / "tok"))
  path = str(tmp_path / "init")
  O.ensure_random_model(path, O.Arch(num_layers=1, hidden_size=32), tok, seed=1)
  assert O.ensure_random_model(path, O.Arch(num_layers=1, hidden_size=32), tok, seed=1) == path
  with pytest.raises(ValueError, match="another architecture.*num_hidden_layers.*\\(1, 2\\)"):
    O.ensure_random_model(path, O.Arch(num_layers=2, hidden_size=32), tok, seed=1)


def _smoke_workdir(tmp_path):
  """The smoke Miniature, a workdir with its data built, its assets dir and a
  pilot output dir."""
  m = miniature.miniature(True)
  workdir = str(tmp_path / "w")
  assets = R.assets_dir(workdir)
  miniature.prepare_data(assets, m)
  return m, workdir, assets, str(tmp_path / "pilot")


def test_pilot_needs_built_data(tmp_path):
  with pytest.raises(SystemExit, match="no built organism data"):
    pilot.main([f"--workdir={tmp_path}", "--smoke", "--variants=0"])


@pytest.mark.slow
def test_smoke_pilot_trains_reseeded_students(tmp_path):
  from safetensors.numpy import load_file

  m, workdir, assets, out = _smoke_workdir(tmp_path)
  summary = pilot.main(
    [
      f"--workdir={workdir}",
      "--smoke",
      "--variants=0,1",
      "--steps=3",
      "--hard-rows=2",
      "--lr=2e-3",
      f"--out={out}",
    ]
  )
  with open(os.path.join(out, "pilot.json")) as f:
    assert json.load(f) == json.loads(json.dumps(summary))
  assert summary["recipe"] == {
    "student_steps": 3,
    "hard_rows": 2,
    "lr": 2e-3,
    "student_layers": m.student.num_layers,
    "easy_first": 0,
    "gate_eval_per_level": None,
  }
  # The smoke gates only run the check: every variant passes, so it is adopted.
  assert summary["adopt"] is True and set(summary["variants"]) == {0, 1}
  for v in (0, 1):
    rows = [json.loads(line) for line in open(os.path.join(out, f"v{v}", "metrics.jsonl"))]
    assert max(r["step"] for r in rows) == 3
    # The recipe's peak lr, not the Miniature's (smoke: 3e-3), is what trained it.
    with open(os.path.join(out, f"v{v}", "config.json")) as f:
      assert json.load(f)["optimizer"]["lr"] == 2e-3
  # The cut data keeps exactly 2 hard rows and every easy row.
  full = [json.loads(line) for line in open(miniature.miniature_paths(assets)["student_sft"])]
  cut = [json.loads(line) for line in open(os.path.join(out, "student_sft_hard2.jsonl"))]
  assert sum(r["level"] in m.hard for r in cut) == 2
  assert len(cut) == len(full) - sum(r["level"] in m.hard for r in full) + 2
  # Variant 1 has its own init (seed 10 + 100), variant 0 the committed one.
  w0 = load_file(os.path.join(assets, "student_init", "model.safetensors"))
  w1 = load_file(os.path.join(assets, "student_init_v1", "model.safetensors"))
  assert w0.keys() == w1.keys()
  assert any(not np.array_equal(w0[k], w1[k]) for k in w0)


@pytest.mark.slow
def test_smoke_pilot_easy_first_trains_two_stages(tmp_path):
  """--easy-first: stage 1 on the easy rows only, stage 2 from its export on
  the recipe's data for the given steps; the gates judge stage 2."""
  m, workdir, assets, out = _smoke_workdir(tmp_path)
  summary = pilot.main(
    [f"--workdir={workdir}", "--smoke", "--variants=0", "--steps=2", "--easy-first=3"]
    + [f"--out={out}", "--gate-eval=4"]
  )
  assert summary["recipe"]["easy_first"] == 3
  with open(os.path.join(out, "v0_easy", "config.json")) as f:
    easy = json.load(f)
  with open(os.path.join(out, "v0", "config.json")) as f:
    second = json.load(f)
  paths = miniature.miniature_paths(assets)
  assert easy["data"]["train_files"] == paths["student_easy_sft"]
  assert easy["student"]["path"] == os.path.join(assets, "student_init")
  assert second["data"]["train_files"] == paths["student_sft"]
  assert second["student"]["path"] == os.path.join(out, "v0_easy", "export_hf")
  steps = lambda d: max(json.loads(x)["step"] for x in open(os.path.join(out, d, "metrics.jsonl")))
  assert (steps("v0_easy"), steps("v0")) == (2, 3)
  assert not any(r["level"] in m.hard for r in _rows(paths["student_easy_sft"]))
  # --gate-eval: the gates read a re-evaluation of the export at 4 problems per
  # level; at the run's own size it reproduces the run's final eval exactly.
  import organisms

  d = os.path.join(out, "v0")
  assert summary["variants"][0]["accuracy"] == organisms.accuracies_at(d, 4)
  levels = sorted(set(m.levels) | set(m.pool_levels))
  assert organisms.accuracies_at(d, m.eval_per_level) == organisms.accuracies(d, levels)


def _rows(path):
  return [json.loads(line) for line in open(path)]
