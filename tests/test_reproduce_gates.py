"""The miniature reproduction's machinery for issue #14: ``--seeds`` parsing,
the per-seed slicing of results, the seed-robustness ("fragile") rule, the
organisms' calibration gates on synthetic accuracies, and (slow) retraining
determinism of a smoke organism."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "experiments"))

import miniature  # noqa: E402
import repro_lib as R  # noqa: E402
import reproduce  # noqa: E402


def test_seeds_flag_parses_any_list_and_rejects_bad_ones():
  p = R.parser("doc")
  args = p.parse_args(["--workdir=/tmp/x", "--seeds=3,4,5"])
  assert args.seeds == (3, 4, 5)
  assert p.parse_args(["--workdir=/tmp/x"]).seeds is None
  for bad in ("3,3", "a,b", "-1", ""):
    with pytest.raises(argparse.ArgumentTypeError):
      R.parse_seeds(bad)
  m = miniature.miniature(False, (3, 4, 5))
  assert m.seeds == (3, 4, 5) and m.opd_steps == miniature.MINIATURE.opd_steps
  assert miniature.miniature(True, None) is miniature.MINIATURE_SMOKE


def test_seed_tag_keeps_default_results_in_place():
  assert R.seed_tag(miniature.miniature(False), False) == ""
  assert R.seed_tag(miniature.miniature(True), True) == ""
  assert R.seed_tag(miniature.miniature(False, (0, 1, 2)), False) == ""
  assert R.seed_tag(miniature.miniature(False, (3, 4, 5)), False) == "seeds_3_4_5"
  assert R.seed_tag(miniature.miniature(True, (0, 1)), True) == "seeds_0_1"


def test_seed_slice_picks_one_seed_of_every_mean_std():
  res = {"a": {"x": R.mean_std([0.1, 0.5, 0.9]), "k": 7.0}, "b": [R.mean_std([1.0, 2.0, 3.0])]}
  one = R.seed_slice(res, 1)
  assert one["a"]["x"]["mean"] == 0.5 and one["a"]["x"]["std"] == 0.0 and one["a"]["x"]["n"] == 1
  assert one["a"]["k"] == 7.0 and one["b"][0]["mean"] == 2.0
  assert res["a"]["x"]["mean"] == pytest.approx(0.5) and res["a"]["x"]["n"] == 3  # not mutated


def _synthetic_results(new_recovery: list[float]) -> dict:
  """Results of every stage, as summarize reads them, with teacher_new's
  hard-level gap recovery per seed given (the rest fixed)."""
  ms = R.mean_std
  n = len(new_recovery)

  def const(v):
    return ms([v] * n)

  teacher = {
    "student_hard_accuracy": const(0.1),
    "hard_accuracy_after": const(0.5),
    "teacher_hard_accuracy": 1.0,
    "overall_gap_recovery": const(0.4),
  }
  return {
    "learnability": {"hard_gap_recovery": const(0.6)},
    "f1_gap_recovery": {
      "teachers": {
        "teacher_new": {**teacher, "hard_gap_recovery": ms(new_recovery)},
        "teacher_same": {**teacher, "hard_gap_recovery": const(0.0)},
      }
    },
    "f2_compatibility": {
      "teachers": {
        t: {"teacher_hard_accuracy": 1.0, "hard_gain": const(g)}
        for t, g in (("teacher_b", 0.0), ("teacher_new", 0.4))
      }
    },
    "f3_overlap_dynamics": {
      "teachers": {
        t: {
          "overlap_ratio_start": const(0.7),
          "overlap_ratio_end": const(0.7 + c),
          "change": const(c),
        }
        for t, c in (("teacher_new", 0.2), ("teacher_same", 0.0))
      }
    },
    "f4_overlap_mass": {
      "teachers": {
        "teacher_new": {
          "overlap_mass_student_end": const(0.99),
          "overlap_mass_teacher_end": const(0.99),
        }
      }
    },
    "f5_weak_to_strong": {
      "weak_teachers": {
        "student": {
          "hard_before": const(1.0),
          "hard_after": const(0.3),
          "weak_teacher_hard_accuracy": 0.1,
          "fall_toward_teacher": const(0.8),
        }
      }
    },
    "f6_cold_start": {
      k: {"hard": const(v)}
      for k, v in (("plain_opd", 0.0), ("after_sft", 0.2), ("cold_start_then_opd", 0.5))
    },
    "f7_prompt_selection": {
      "arms": {"selected": {"hard_after": const(0.6)}, "random_pool": {"hard_after": const(0.3)}}
    },
    "f8_long_horizon": {
      "teachers": {
        "teacher_new": {
          "overlap_ratio_late_first_chunk": const(0.8),
          "overlap_ratio_late_last_chunk": const(0.6),
        }
      }
    },
    "f9_loss_ablation": {"losses": {"reverse_kl": {"hard_after": const(0.5)}}},
  }


def _rows(results: dict, seeds) -> list[dict]:
  per_seed = {s: reproduce.summarize(R.seed_slice(results, i)) for i, s in enumerate(seeds)}
  return reproduce.with_seeds(reproduce.summarize(results), per_seed)


def test_fragile_when_a_seed_disagrees_with_the_pooled_verdict():
  # teacher_new's hard-level gap recovery: 45%, 40% on two seeds, 10% on the
  # third: the mean (32%) passes finding 1's 30% threshold, seed 5 does not
  rows = _rows(_synthetic_results([0.45, 0.40, 0.10]), (3, 4, 5))
  f1 = rows[0]
  assert f1["verdict"] == "reproduces"
  assert f1["per_seed"] == {3: "reproduces", 4: "reproduces", 5: "does not reproduce"}
  assert f1["robustness"] == "fragile"
  assert {r["robustness"] for r in rows[1:-1]} == {"robust"}  # the rest is seed-constant
  assert rows[-1]["robustness"] == "descriptive"
  table = reproduce.markdown(rows, (3, 4, 5))
  assert "over seeds 3, 4, 5" in table
  assert table.count("**fragile**") == 1 and "s3 ✓, s4 ✓, s5 ✗" in table


def test_robust_when_every_seed_agrees_and_single_seed_is_not_judged():
  rows = _rows(_synthetic_results([0.45, 0.40, 0.35]), (0, 1, 2))
  assert rows[0]["robustness"] == "robust" and "fragile" not in reproduce.markdown(rows)
  rows = _rows(_synthetic_results([0.05, 0.10, 0.02]), (0, 1, 2))
  assert rows[0]["verdict"] == "does not reproduce" and rows[0]["robustness"] == "robust"
  rows = _rows(_synthetic_results([0.1]), (7,))
  assert rows[0]["robustness"] == "single seed"
  # the reason in brackets does not make two negative outcomes differ
  assert reproduce.robustness(
    "does not reproduce", ["does not reproduce (the contrasting run does not succeed either)"] * 2
  ) == ("robust")


def _accuracies(**over):
  acc = {
    "student": {1: 1.0, 2: 1.0, 3: 0.98, 4: 0.09},
    "teacher_new": {1: 1.0, 2: 1.0, 3: 1.0, 4: 1.0},
    "teacher_same": {1: 1.0, 2: 1.0, 3: 1.0, 4: 0.12},
    "teacher_b": {1: 1.0, 2: 1.0, 3: 1.0, 4: 1.0},
  }
  for key, v in over.items():
    name, level = key.rsplit("_", 1)
    acc[name][int(level)] = v
  return acc


def test_organism_gates_name_organism_level_measured_and_required():
  m, g = miniature.MINIATURE, miniature.GATES
  assert miniature.check_organisms(m, g, _accuracies()) == []
  # the rebuild: the student at 53% on level 3
  (fail,) = miniature.check_organisms(m, g, _accuracies(student_3=0.53))
  assert fail.startswith("student level 3: measured 53.0%, required ≥ 95.0%"), fail
  # the README's teacher_same: 92% on level 4 vs the student's 9% ("not nothing new")
  (fail,) = miniature.check_organisms(m, g, _accuracies(teacher_same_4=0.92))
  assert "teacher_same level 4: measured 92.0%" in fail and "within 10.0 points of student" in fail
  (fail,) = miniature.check_organisms(m, g, _accuracies(student_4=0.0, teacher_same_4=0.0))
  assert fail.startswith("student level 4: measured 0.0%, required ≥ 2.0%"), fail
  fails = miniature.check_organisms(m, g, _accuracies(teacher_new_4=0.5, teacher_b_1=0.9))
  assert [f.split(":")[0] for f in fails] == ["teacher_new level 4", "teacher_b level 1"]


def test_failed_gate_record_stops_with_its_lines(tmp_path):
  record = {"status": "failed", "failures": ["student level 3: measured 53.0%, required ≥ 95.0%"]}
  with pytest.raises(SystemExit, match="student level 3: measured 53.0%"):
    R.require_gate(record, "organisms", "organisms.py")
  with pytest.raises(SystemExit, match="not recorded"):
    R.require_gate(None, "organisms", "organisms.py")
  R.require_gate({"status": "skipped", "reason": "smoke"}, "supervised bound", "learnability.py")
  # a finding refuses to run on a workdir whose organisms failed their gates
  os.makedirs(tmp_path / "results")
  with open(tmp_path / "results" / "organisms.json", "w") as f:
    json.dump({"organisms": {}, "gates": record}, f)
  with pytest.raises(SystemExit, match="failed, no verdict"):
    R.setting(str(tmp_path), smoke=True)


def test_retrain_check_flags_levels_beyond_tolerance():
  a = {"student": {1: 1.0, 2: 0.5}}
  assert miniature.check_retrain(a, {"student": {1: 0.95, 2: 0.5}}, 0.08) == []
  (fail,) = miniature.check_retrain(a, {"student": {1: 1.0, 2: 0.375}}, 0.08)
  assert fail == "student level 2: 50.0% then 37.5%, tolerance 8.0 points"


@pytest.mark.slow
def test_retraining_a_smoke_organism_gives_the_same_accuracies(tmp_path):
  """The student organism (smoke sizes) trained twice with its seeds: the same
  per-level accuracies within the smoke tolerance and the same SFT losses."""
  m = miniature.MINIATURE_SMOKE
  assets = str(tmp_path / "organisms")
  miniature.prepare_data(assets, m)
  dirs = [str(tmp_path / f"student_{i}") for i in range(2)]
  for d in dirs:
    miniature.train_miniature_organism(assets, m, "student", out=d)
  levels = sorted(set(m.levels) | set(m.pool_levels))
  accs = [
    {"student": {L: R.final_eval(d)[f"eval/all/acc/level_{L}"] for L in levels}} for d in dirs
  ]
  assert miniature.check_retrain(*accs, miniature.GATES_SMOKE.retrain_tolerance) == []
  losses = [[r["loss"] for r in R.records(d) if "loss" in r] for d in dirs]
  assert len(losses[0]) >= 5 and losses[0] == pytest.approx(losses[1], rel=1e-4)


def test_miniature_data_is_phrased_bpe_and_teacher_same_lacks_the_hard_level(tmp_path):
  """The redesigned data (smoke sizes): teacher_same's file is the student's
  easy-level examples in the same order without its hard-level ones; the
  tokenizer is a BPE trained on the data, larger than the character one, with
  exact round trips; first steps take each of the ``phrasings`` templates."""
  from transformers import AutoTokenizer

  from opd_jax.tasks import read_jsonl

  m = miniature.MINIATURE_SMOKE
  assert m.phrasings > 1 and m.bpe_vocab
  paths = miniature.prepare_data(str(tmp_path / "organisms"), m)
  student = read_jsonl(paths["student_sft"])
  easy = read_jsonl(paths["student_easy_sft"])
  hard = [r for r in student if r["level"] in m.hard]
  assert hard and not any(r["level"] in m.hard for r in easy)
  assert [r for r in student if r["level"] not in m.hard] == easy
  assert miniature.ORGANISMS["teacher_same"][2] == "student_easy_sft"
  tok = AutoTokenizer.from_pretrained(paths["tokenizer"])
  with open(os.path.join(paths["tokenizer"], "tokenizer.json")) as f:
    assert json.load(f)["model"]["type"] == "BPE"
  assert len(tok) > 260
  rows = read_jsonl(paths["teacher_sft"])
  for r in rows[:50]:
    text = r["prompt"] + r["completion"]
    assert tok.decode(tok(text)["input_ids"]) == text
  templates = {re.sub(r"\d", "", r["completion"].split(";")[0]) for r in rows}
  assert len(templates) == m.phrasings, templates  # "++=" and " plus  carry  is "


def test_assets_of_other_settings_are_refused(tmp_path):
  """``check_assets`` records the asset settings once and names every
  setting that differs when a workdir made with others is reused; a workdir
  of the earlier design (data, no record) is refused too."""
  m = miniature.MINIATURE_SMOKE
  assets = str(tmp_path / "organisms")
  miniature.check_assets(assets, m)
  miniature.check_assets(assets, m)  # same settings: fine
  with open(os.path.join(assets, "miniature.json")) as f:
    assert json.load(f)["phrasings"] == m.phrasings
  other = miniature.dataclasses.replace(m, phrasings=1, bpe_vocab=0)
  with pytest.raises(ValueError, match=r"phrasings: 2 there, 1 now; bpe_vocab: 300 there, 0 now"):
    miniature.check_assets(assets, other)
  old = tmp_path / "old" / "organisms"
  (old / "data").mkdir(parents=True)
  with pytest.raises(ValueError, match="earlier design"):
    miniature.check_assets(str(old), m)
