"""Teacher-aligned prompt selection: scores, selection rule, determinism."""

import json
import os

import pytest

from opd_jax import organisms
from opd_jax.prompt_selection import SCORES, run_selection, select


def _scores(values, key="gap"):
  return [{"index": i, key: v} for i, v in enumerate(values)]


def test_select_top_fraction_and_threshold():
  s = _scores([0.1, 0.9, 0.5, 0.9, -1.0, 0.3])
  assert select(s, top_fraction=0.5) == [1, 2, 3]  # ties by index, input order
  assert select(s, top_fraction=1 / 6) == [1]
  assert select(s, threshold=0.3) == [1, 2, 3, 5]
  with pytest.raises(ValueError, match="exactly one"):
    select(s, top_fraction=0.5, threshold=0.1)
  with pytest.raises(ValueError, match="unknown score"):
    select(s, score="nope", top_fraction=0.5)
  assert set(SCORES) == {"gap", "overlap", "advantage", "neg_kl"}


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("sel"))
  tok_dir = os.path.join(root, "tok")
  tok = organisms.ensure_tokenizer(tok_dir)
  student = organisms.ensure_random_model(
    os.path.join(root, "s"), organisms.Arch(1, 32), tok, seed=1
  )
  teacher = organisms.ensure_random_model(
    os.path.join(root, "t"), organisms.Arch(2, 32), tok, seed=2
  )
  prompts = organisms.ensure_task_data(os.path.join(root, "p.jsonl"), n=10, seed=0, levels=(1, 2))
  return root, tok_dir, student, teacher, prompts


def test_run_selection_writes_files_and_is_deterministic(tiny_pair):
  root, tok_dir, student, teacher, prompts = tiny_pair
  outs = []
  for name in ("a", "b"):
    out = os.path.join(root, name)
    summary = run_selection(
      student=student,
      teacher=teacher,
      prompts=prompts,
      out_dir=out,
      tokenizer=tok_dir,
      score="neg_kl",
      top_fraction=0.4,
      num_samples=2,
      max_new_tokens=6,
      batch_size=4,
      seed=3,
    )
    assert summary["num_prompts"] == 10 and summary["num_selected"] == 4
    files = {f: open(os.path.join(out, f)).read() for f in ("scores.jsonl", "selected.jsonl")}
    outs.append(files)
  assert outs[0] == outs[1]
  scores = [json.loads(l) for l in outs[0]["scores.jsonl"].splitlines()]
  assert [s["index"] for s in scores] == list(range(10))
  for s in scores:
    assert 0.0 <= s["overlap_ratio"] <= 1.0 and s["reverse_kl"] >= -1e-6
    assert s["gap"] == pytest.approx(s["teacher_acc"] - s["student_acc"])
    assert s["neg_kl"] == pytest.approx(-s["reverse_kl"])
  selected = [json.loads(l) for l in outs[0]["selected.jsonl"].splitlines()]
  kept = select(scores, score="neg_kl", top_fraction=0.4)
  source = [json.loads(l) for l in open(prompts)]
  assert selected == [source[i] for i in kept]  # original records, all fields
  assert min(scores[i]["neg_kl"] for i in kept) >= max(
    s["neg_kl"] for s in scores if s["index"] not in kept
  )
