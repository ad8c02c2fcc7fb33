"""Tests for opd_jax.data (prompt datasets served with grain)."""

from __future__ import annotations

import collections
import json
import os

import numpy as np
import pytest
import tokenizers
import transformers
from tokenizers import models, pre_tokenizers

from opd_jax import data

SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>"]
ALPHABET = list("abcdefghijklmnopqrstuvwxyz0123456789 ?:<>/")
VOCAB = {t: i for i, t in enumerate(SPECIALS + ALPHABET)}
PAD, EOS = VOCAB["<pad>"], VOCAB["<eos>"]
CHAT_TEMPLATE = (
  "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
  "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def ids(text: str) -> list[int]:
  return [VOCAB[c] for c in text]


@pytest.fixture(scope="module")
def tok():
  t = tokenizers.Tokenizer(models.WordLevel(vocab=VOCAB, unk_token="<unk>"))
  t.pre_tokenizer = pre_tokenizers.Split(tokenizers.Regex("."), behavior="isolated")
  hf = transformers.PreTrainedTokenizerFast(
    tokenizer_object=t, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", unk_token="<unk>"
  )
  hf.chat_template = CHAT_TEMPLATE
  return hf


def _records(n: int, source: str | None = None) -> list[dict]:
  out = []
  for i in range(n):
    r = {"prompt": f"q{i}", "answer": str(i)}
    if source is not None:
      r["src"] = source
    out.append(r)
  return out


def _take(it, k: int) -> list[dict]:
  return [next(it) for _ in range(k)]


def _assert_batches_equal(a: list[dict], b: list[dict]):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for key in x:
      np.testing.assert_array_equal(x[key], y[key], err_msg=key)


# ----------------------------------------------------------------------------
# Reading / tokenising.


def test_left_padding_and_masks_exact(tok, tmp_path):
  path = tmp_path / "p.jsonl"
  data.write_jsonl(path, [{"prompt": "abc", "answer": 7}, {"prompt": "hello"}])
  d = data.PromptData.build(path, tok, max_prompt_len=6)
  assert len(d) == 2 and not d.has_completions
  np.testing.assert_array_equal(d.prompt_ids, [[PAD] * 3 + ids("abc"), [PAD] + ids("hello")])
  np.testing.assert_array_equal(d.prompt_mask, [[0, 0, 0, 1, 1, 1], [0, 1, 1, 1, 1, 1]])
  assert d.prompt_ids.dtype == np.int32 and d.prompt_mask.dtype == bool
  assert d.answers == (7, None)
  assert d.origins == (f"{path}:1", f"{path}:2")
  assert d.stats == {
    "num_records": 2,
    "num_read": 2,
    "num_malformed_skipped": 0,
    "num_dropped_overlong": 0,
    "num_truncated": 0,
    "num_completion_truncated": 0,
  }
  batch = next(d.iterator(2, shuffle=False, shard_index=0, shard_count=1))
  np.testing.assert_array_equal(batch["prompt_ids"], d.prompt_ids)
  np.testing.assert_array_equal(batch["prompt_mask"], d.prompt_mask)
  np.testing.assert_array_equal(batch["index"], [0, 1])
  assert batch["index"].dtype == np.int64
  assert d.answers_for(batch["index"]) == [7, None]


def test_completions_with_eos_and_truncation(tok):
  recs = [{"prompt": "p", "c": "ab"}, {"prompt": "p", "c": "abcd"}, {"prompt": "p", "c": "abcdef"}]
  d = data.PromptData.from_records(
    recs, tok, max_prompt_len=2, completion_field="c", max_completion_len=4
  )
  np.testing.assert_array_equal(
    d.completion_ids, [ids("ab") + [EOS, PAD], ids("abcd"), ids("abcd")]
  )
  np.testing.assert_array_equal(d.completion_mask, [[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 1, 1]])
  assert d.completion_ids.dtype == np.int32
  assert d.stats["num_completion_truncated"] == 1
  no_eos = data.PromptData.from_records(
    recs[:1], tok, max_prompt_len=2, completion_field="c", max_completion_len=4, append_eos=False
  )
  np.testing.assert_array_equal(no_eos.completion_ids, [ids("ab") + [PAD] * 2])
  batch = next(d.iterator(3, shuffle=False, shard_index=0, shard_count=1))
  assert {"completion_ids", "completion_mask"} <= batch.keys()
  np.testing.assert_array_equal(batch["completion_ids"], d.completion_ids)


def test_overlong_drop_vs_truncate(tok):
  recs = [{"prompt": "abcdefgh"}, {"prompt": "ab"}, {"prompt": "abcdef"}]
  dropped = data.PromptData.from_records(recs, tok, max_prompt_len=4)
  assert len(dropped) == 1
  assert dropped.stats["num_dropped_overlong"] == 2
  assert dropped.stats["num_truncated"] == 0
  np.testing.assert_array_equal(dropped.prompt_ids, [[PAD, PAD] + ids("ab")])
  trunc = data.PromptData.from_records(recs, tok, max_prompt_len=4, overlong="truncate")
  assert len(trunc) == 3
  assert trunc.stats["num_truncated"] == 2
  assert trunc.stats["num_dropped_overlong"] == 0
  np.testing.assert_array_equal(
    trunc.prompt_ids, [ids("efgh"), [PAD, PAD] + ids("ab"), ids("cdef")]
  )  # Keeps the end.
  assert trunc.prompt_mask[0].all()


def test_malformed_lines_raise_with_file_and_line(tok, tmp_path):
  path = tmp_path / "data.jsonl"
  lines = ['{"prompt": "ab"}', "", '{"prompt": "cd"', '{"prompt": "ef"}']
  path.write_text("\n".join(lines) + "\n")
  with pytest.raises(ValueError, match=r"data\.jsonl:3: invalid JSON"):
    data.PromptData.build(path, tok, max_prompt_len=4)
  with pytest.raises(ValueError, match=r"data\.jsonl:3: invalid JSON"):
    data.read_jsonl(path)
  path.write_text('{"prompt": "ab"}\n{"question": "x"}\n')
  with pytest.raises(ValueError, match=r"data\.jsonl:2: missing field 'prompt'"):
    data.PromptData.build(path, tok, max_prompt_len=4)
  path.write_text('{"prompt": 5}\n')
  with pytest.raises(ValueError, match=r"data\.jsonl:1: field 'prompt' must be"):
    data.PromptData.build(path, tok, max_prompt_len=4)
  path.write_text('[1, 2]\n')
  with pytest.raises(ValueError, match=r"data\.jsonl:1: expected a JSON object"):
    data.PromptData.build(path, tok, max_prompt_len=4)
  path.write_text('{"prompt": "ab"}\n')
  with pytest.raises(ValueError, match=r"data\.jsonl:1: missing field 'c'"):
    data.PromptData.build(path, tok, max_prompt_len=4, completion_field="c", max_completion_len=4)


def test_skip_mode_counts(tok, tmp_path):
  path = tmp_path / "data.jsonl"
  path.write_text(
    "\n".join(
      [
        '{"prompt": "ab"}',
        "not json",
        '{"prompt": 3}',
        '{"x": 1}',
        '{"prompt": "abcdefgh"}',
        '{"prompt": "cd"}',
      ]
    )
    + "\n"
  )
  d = data.PromptData.build(path, tok, max_prompt_len=4, on_error="skip")
  assert len(d) == 2
  assert d.stats["num_malformed_skipped"] == 3
  assert d.stats["num_dropped_overlong"] == 1
  assert d.stats["num_records"] == 2
  assert d.origins == (f"{path}:1", f"{path}:6")
  assert d.errors[0].startswith(f"{path}:2: invalid JSON")


def test_parquet_equals_jsonl(tok, tmp_path):
  import pyarrow as pa
  import pyarrow.parquet as pq

  recs = [{"prompt": f"q{i}", "c": "ab" * i, "answer": str(i)} for i in range(5)]
  data.write_jsonl(tmp_path / "d.jsonl", recs)
  pq.write_table(pa.Table.from_pylist(recs), tmp_path / "d.parquet")
  kw = dict(max_prompt_len=4, completion_field="c", max_completion_len=6)
  a = data.PromptData.build(tmp_path / "d.jsonl", tok, **kw)
  b = data.PromptData.build(str(tmp_path / "d.parquet"), tok, **kw)
  for field in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask"):
    np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
  assert a.answers == b.answers and a.stats == b.stats
  assert a.source_names == b.source_names == ("d",)


def test_glob_and_sources_from_file_stem(tok, tmp_path):
  data.write_jsonl(tmp_path / "math.jsonl", _records(3))
  data.write_jsonl(tmp_path / "code.jsonl", _records(2))
  d = data.PromptData.build(str(tmp_path / "*.jsonl"), tok, max_prompt_len=4)
  assert len(d) == 5
  assert d.source_names == ("code", "math")
  assert d.source_counts == {"code": 2, "math": 3}
  with pytest.raises(FileNotFoundError):
    data.PromptData.build(str(tmp_path / "*.nothing"), tok, max_prompt_len=4)


def test_chat_template_path(tok):
  recs = [
    {"prompt": [{"role": "system", "content": "be"}, {"role": "user", "content": "hi"}]},
    {"prompt": "yo"},
  ]
  d = data.PromptData.from_records(recs, tok, max_prompt_len=32)
  assert d.prompt_texts == ("<system>be<user>hi<assistant>", "yo")
  expect = ids("<system>be<user>hi<assistant>")
  np.testing.assert_array_equal(d.prompt_ids[0, -len(expect) :], expect)
  assert d.prompt_mask[0].sum() == len(expect)
  wrapped = data.PromptData.from_records(recs[1:], tok, max_prompt_len=32, use_chat_template=True)
  assert wrapped.prompt_texts == ("<user>yo<assistant>",)
  bad = [{"prompt": [{"role": "user"}]}]
  with pytest.raises(ValueError, match=r"<records>:1: .*'content'"):
    data.PromptData.from_records(bad, tok, max_prompt_len=32)


def test_bad_bytes_name_file_line_and_are_skipped(tok, tmp_path):
  """Invalid UTF-8 on one line is that line's error (file:line), skipped with
  on_error="skip" and counted by reason; the other lines are read."""
  path = tmp_path / "bytes.jsonl"
  path.write_bytes(b'{"prompt": "ab"}\n{"prompt": "c\xff\xfed"}\n{"prompt": "cd"}\n')
  with pytest.raises(ValueError, match=r"bytes\.jsonl:2: invalid UTF-8"):
    data.PromptData.build(path, tok, max_prompt_len=4)
  with pytest.raises(ValueError, match=r"bytes\.jsonl:2: invalid UTF-8"):
    data.read_jsonl(path)
  d = data.PromptData.build(path, tok, max_prompt_len=4, on_error="skip")
  assert d.origins == (f"{path}:1", f"{path}:3")
  assert d.stats["num_malformed_skipped"] == 1
  assert d.counts["num_skipped_invalid_utf8"] == 1 and d.counts["num_lines"] == 3
  assert d.errors == (f"{path}:2: invalid UTF-8 (invalid start byte at byte 14 of the line)",)


def test_skip_counts_by_reason(tok, tmp_path):
  path = tmp_path / "data.jsonl"
  path.write_text(
    "\n".join(
      [
        '{"prompt": "ab"}',
        "not json",
        '{"prompt": 3}',
        '{"x": 1}',
        '{"x": 2}',
        '{"prompt": "abcdefgh"}',
      ]
    )
    + "\n"
  )
  d = data.PromptData.build(path, tok, max_prompt_len=4, on_error="skip")
  c = d.counts
  assert (
    c["num_skipped_invalid_json"],
    c["num_skipped_invalid_field"],
    c["num_skipped_missing_field"],
    c["num_skipped_invalid_utf8"],
  ) == (1, 1, 2, 0)
  assert c["max_prompt_tokens"] == 8 and c["num_files"] == 1 and c["num_empty_files"] == 0


def test_empty_result_names_files_and_reasons(tok, tmp_path):
  """Every prompt too long, every record skipped, an empty file: the error
  names the files and the counts by reason."""
  long = tmp_path / "long.jsonl"
  data.write_jsonl(long, [{"prompt": "abcdefgh" * (i + 1)} for i in range(20)])
  d = data.PromptData.build(long, tok, max_prompt_len=4)
  assert len(d) == 0 and d.stats["num_dropped_overlong"] == 20
  with pytest.raises(
    ValueError,
    match=(
      r"PromptData is empty: no prompt records left from .*long\.jsonl \(20 non-blank lines "
      r"read\): 20 longer than max_prompt_len=4 tokens \(overlong='drop'; the longest has 160 "
      r"tokens"
    ),
  ):
    d.iterator(2, shard_index=0, shard_count=1)
  missing = tmp_path / "missing.jsonl"
  data.write_jsonl(missing, [{"question": "ab"}] * 3)
  empty = tmp_path / "empty.jsonl"
  empty.write_text("\n\n")
  d = data.PromptData.build([missing, empty], tok, max_prompt_len=4, on_error="skip")
  assert d.counts["num_empty_files"] == 1 and d.counts["num_files"] == 2
  msg = d.empty_reason()
  assert f"from {missing}, {empty} (3 non-blank lines read)" in msg, msg
  assert (
    f"3 skipped (on_error='skip'): 3 a missing field (first: {missing}:1: missing field 'prompt')"
  ) in msg, msg
  assert f"1 empty file(s): {empty}" in msg, msg
  d = data.PromptData.build(empty, tok, max_prompt_len=4)
  assert d.empty_reason() == (
    f"no prompt records left from {empty} (0 non-blank lines read): 1 empty file(s): {empty}"
  )


def test_write_read_jsonl_atomic(tmp_path):
  recs = [{"a": 1, "b": "é"}, {"a": 2, "b": [1, 2]}]
  path = tmp_path / "sub" / "out.jsonl"
  data.write_jsonl(path, recs)
  assert data.read_jsonl(path) == recs
  assert os.listdir(path.parent) == ["out.jsonl"]  # No temp files left.
  data.write_jsonl(path, recs[:1])
  assert data.read_jsonl(path) == recs[:1]


# ----------------------------------------------------------------------------
# Iteration.


@pytest.fixture(scope="module")
def d10(tok):
  return data.PromptData.from_records(_records(10), tok, max_prompt_len=4)


def _it(d, batch_size=5, **kw):
  kw.setdefault("shard_index", 0)
  kw.setdefault("shard_count", 1)
  return d.iterator(batch_size, **kw)


def _epoch_orders(d, seed, epochs=3):
  b = _take(_it(d, seed=seed), 2 * epochs)
  flat = np.concatenate([x["index"] for x in b])
  return flat.reshape(epochs, len(d))


def test_deterministic_shuffle_and_epochs(d10):
  a = _epoch_orders(d10, seed=1)
  np.testing.assert_array_equal(a, _epoch_orders(d10, seed=1))
  assert not np.array_equal(a, _epoch_orders(d10, seed=2))
  for epoch in a:  # Each epoch is a permutation ...
    assert sorted(epoch) == list(range(10))
  assert not np.array_equal(a[0], a[1])  # ... reshuffled each epoch.
  assert not np.array_equal(a[0], np.arange(10))
  plain = _take(_it(d10, shuffle=False), 2)
  np.testing.assert_array_equal(np.concatenate([x["index"] for x in plain]), np.arange(10))


def test_repeat_and_finite_epochs(d10):
  it = _it(d10, batch_size=4, num_epochs=2)
  batches = list(it)
  assert len(batches) == 5  # 20 indices // 4, remainder dropped.
  counts = collections.Counter(np.concatenate([b["index"] for b in batches]))
  assert set(counts.values()) == {2}
  forever = _take(_it(d10, batch_size=4), 50)  # num_epochs=None repeats.
  assert len(forever) == 50
  last = list(_it(d10, batch_size=4, num_epochs=1, drop_remainder=False, shuffle=False))
  assert len(last) == 3
  np.testing.assert_array_equal(last[-1]["valid"], [True, True, False, False])
  np.testing.assert_array_equal(last[-1]["index"][:2], [8, 9])
  assert last[-1]["prompt_mask"].any(axis=1).all()  # Pad rows are real rows.


def test_state_save_restore_exact(d10):
  it = _it(d10, batch_size=4, seed=3)
  _take(it, 5)
  state = json.loads(json.dumps(data.save_iterator_state(it)))
  expected = _take(it, 3)
  fresh = data.restore_iterator_state(_it(d10, batch_size=4, seed=3), state)
  _assert_batches_equal(_take(fresh, 3), expected)
  # Raw grain state also round-trips through JSON.
  it2 = _it(d10, batch_size=4, seed=3)
  it2.set_state(json.loads(json.dumps(it.get_state())))
  _assert_batches_equal(_take(it2, 2), _take(it, 2))


@pytest.mark.parametrize("mixture", [None, {"a": 1.0, "b": 3.0}])
def test_shard_union_equals_global_batch(tok, mixture):
  d = data.PromptData.from_records(
    _records(7, "a") + _records(9, "b"), tok, max_prompt_len=4, source_field="src"
  )
  kw = dict(seed=5, mixture=mixture)
  glob_b = _take(d.iterator(8, shard_index=0, shard_count=1, **kw), 6)
  s0 = _take(d.iterator(8, shard_index=0, shard_count=2, **kw), 6)
  s1 = _take(d.iterator(8, shard_index=1, shard_count=2, **kw), 6)
  for g, a, b in zip(glob_b, s0, s1):
    assert a["prompt_ids"].shape == (4, 4)
    for key in g:
      np.testing.assert_array_equal(np.concatenate([a[key], b[key]]), g[key], err_msg=key)
  with pytest.raises(ValueError, match="multiple of shard_count"):
    d.iterator(7, shard_index=0, shard_count=2)


def test_mixture_proportions_and_determinism(tok):
  d = data.PromptData.from_records(
    _records(5, "a") + _records(40, "b") + _records(6, "c"),
    tok,
    max_prompt_len=4,
    source_field="src",
  )
  assert d.source_names == ("a", "b", "c")
  mix = {"a": 3.0, "b": 1.0}
  batches = _take(_it(d, batch_size=8, seed=0, mixture=mix), 100)
  src = np.concatenate([b["source_id"] for b in batches])
  frac_a = np.mean(src == 0)
  assert abs(frac_a - 0.75) < 0.02
  assert not np.any(src == 2)  # Unlisted sources are not sampled.
  names = np.array(d.source_names)[src]
  idx = np.concatenate([b["index"] for b in batches])
  assert all(d.source_names[d.source_ids[i]] == n for i, n in zip(idx, names))
  # The 5 "a" records are all used, repeatedly (small source repeats).
  assert set(idx[src == 0]) == set(np.flatnonzero(d.source_ids == 0))
  again = _take(_it(d, batch_size=8, seed=0, mixture=mix), 100)
  _assert_batches_equal(batches, again)
  other = _take(_it(d, batch_size=8, seed=1, mixture=mix), 100)
  assert not np.array_equal(idx, np.concatenate([b["index"] for b in other]))
  # Finite epochs for a mixture: as many draws as the mixed sources hold.
  finite = list(_it(d, batch_size=5, seed=0, mixture=mix, num_epochs=1))
  assert len(finite) == 45 // 5
  with pytest.raises(ValueError, match=r"Unknown mixture source\(s\) \['z'\]"):
    _it(d, mixture={"a": 1.0, "z": 1.0})
  with pytest.raises(ValueError, match="positive"):
    _it(d, mixture={"a": 1.0, "b": 0.0})
  with pytest.raises(ValueError, match="positive"):
    _it(d, mixture={"a": -1.0})


def test_scheduled_mixture_is_a_curriculum_exact_across_resume(tok):
  """Mixture weights over batches (a curriculum from "easy" to "hard"):
  each batch's source fractions follow that batch's weights, the shards
  union to the global batch, and a restored iterator continues exactly."""
  from opd_jax import schedules

  d = data.PromptData.from_records(
    _records(30, "easy") + _records(30, "hard"), tok, max_prompt_len=4, source_field="src"
  )
  mix = {"easy": 1.0, "hard": 1.0}
  sched = {"easy": schedules.parse("linear:1:0:0:20"), "hard": schedules.parse("linear:0:1:0:20")}
  kw = dict(seed=2, mixture=mix, mixture_schedules=sched)
  batches = _take(_it(d, batch_size=16, **kw), 40)
  hard = np.array([np.mean(np.array(d.source_names)[b["source_id"]] == "hard") for b in batches])
  assert hard[0] == 0.0 and np.all(hard[20:] == 1.0)  # all easy first, all hard after 20
  want = np.clip(np.arange(40) / 20, 0, 1)
  assert np.abs(hard[:20].mean() - want[:20].mean()) < 0.05
  assert np.corrcoef(hard[:20], want[:20])[0, 1] > 0.8
  # Multi-host: shards are the global batch's rows.
  s0 = _take(d.iterator(16, shard_index=0, shard_count=2, **kw), 5)
  s1 = _take(d.iterator(16, shard_index=1, shard_count=2, **kw), 5)
  for g, a, b in zip(batches, s0, s1):
    np.testing.assert_array_equal(np.concatenate([a["index"], b["index"]]), g["index"])
  # Resume: state after 7 batches, restored into a fresh iterator.
  it = _it(d, batch_size=16, **kw)
  _take(it, 7)
  state = json.loads(json.dumps(data.save_iterator_state(it)))
  fresh = data.restore_iterator_state(_it(d, batch_size=16, **kw), state)
  _assert_batches_equal(_take(fresh, 5), batches[7:12])
  with pytest.raises(ValueError, match="name no source"):
    _it(d, mixture={"easy": 1.0}, mixture_schedules=sched)
  with pytest.raises(ValueError, match="positive sum"):
    _take(
      _it(
        d,
        mixture={"easy": 1.0, "hard": 1.0},
        mixture_schedules={
          "easy": schedules.parse("constant:0"),
          "hard": schedules.parse("constant:0"),
        },
      ),
      1,
    )


def test_build_with_options_and_iterate(tok, tmp_path):
  data.write_jsonl(tmp_path / "p.jsonl", _records(6))
  d = data.PromptData.build(tmp_path / "p.jsonl", tok, data.DataOptions(max_prompt_len=4))
  it = d.iterator(2, seed=0, shard_index=0, shard_count=1)
  assert len(d) == 6
  batch = next(it)
  assert set(batch) == {"prompt_ids", "prompt_mask", "index", "source_id", "valid"}
  assert batch["prompt_ids"].shape == (2, 4)


def test_one_jsonl_implementation(tmp_path):
  """tasks' JSONL reader / writer is the data package's: atomic through a
  unique temp file (a stale ``<path>.tmp`` is no obstacle), bad lines name
  ``file:line``."""
  from opd_jax import tasks

  assert tasks.read_jsonl is data.read_jsonl and tasks.write_jsonl is data.write_jsonl
  path = tmp_path / "x.jsonl"
  os.makedirs(str(path) + ".tmp")
  tasks.write_jsonl(path, [{"a": 1}, {"b": 2}])
  assert tasks.read_jsonl(path) == [{"a": 1}, {"b": 2}]
  with open(path, "a") as f:
    f.write("{bad\n")
  with pytest.raises(ValueError, match=r"x\.jsonl:3: invalid JSON"):
    tasks.read_jsonl(path)


@pytest.mark.parametrize("mixture", [None, {"a": 1.0, "b": 3.0, "c": 2.0}])
def test_group_quotas_fixed_rows_per_group_and_exact_resume(tok, mixture):
  """Multi-teacher batches: every batch holds exactly q_k rows of group k, in
  group order; the groups' streams cover their records; shards union to the
  global batch; a restored iterator continues exactly."""
  d = data.PromptData.from_records(
    _records(5, "a") + _records(11, "b") + _records(7, "c"),
    tok,
    max_prompt_len=4,
    source_field="src",
  )
  groups = [(("b",), 3), (("a", "c"), 5)]
  kw = dict(seed=4, mixture=mixture, groups=groups)
  batches = _take(_it(d, batch_size=8, **kw), 30)
  names = np.array(d.source_names)
  for b in batches:
    src = names[b["source_id"]]
    assert list(src[:3]) == ["b"] * 3 and set(src[3:]) <= {"a", "c"}
    assert all(d.source_names[d.source_ids[i]] == s for i, s in zip(b["index"], src))
  idx = np.concatenate([b["index"][3:] for b in batches])
  assert set(idx) == set(np.flatnonzero(d.source_ids != 1))  # a and c records all drawn
  if mixture is None:  # one shuffled stream over a + c: each epoch a permutation
    first = np.concatenate([b["index"][3:] for b in batches[:12]])[:12]
    assert sorted(first) == sorted(np.flatnonzero(d.source_ids != 1))
  _assert_batches_equal(batches, _take(_it(d, batch_size=8, **kw), 30))
  s0 = _take(d.iterator(8, shard_index=0, shard_count=2, **kw), 4)
  s1 = _take(d.iterator(8, shard_index=1, shard_count=2, **kw), 4)
  for g, a, b in zip(batches, s0, s1):
    np.testing.assert_array_equal(np.concatenate([a["index"], b["index"]]), g["index"])
  it = _it(d, batch_size=8, **kw)
  _take(it, 7)
  state = json.loads(json.dumps(data.save_iterator_state(it)))
  fresh = data.restore_iterator_state(_it(d, batch_size=8, **kw), state)
  _assert_batches_equal(_take(fresh, 5), batches[7:12])
  finite = list(_it(d, batch_size=8, seed=4, groups=groups, num_epochs=2))
  assert len(finite) == 2 * 23 // 8
  with pytest.raises(ValueError, match="add up to 8"):
    _it(d, batch_size=8, groups=[(("b",), 3), (("a",), 4)])
  with pytest.raises(ValueError, match="disjoint"):
    _it(d, batch_size=8, groups=[(("b",), 4), (("b", "a"), 4)])
  with pytest.raises(ValueError, match="in the data"):
    _it(d, batch_size=8, groups=[(("b",), 4), (("z",), 4)])
  with pytest.raises(ValueError, match=r"\['c'\] have no mixture weight"):
    _it(d, batch_size=8, groups=[(("b",), 4), (("c",), 4)], mixture={"b": 1.0})
