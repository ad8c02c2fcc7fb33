"""Tests for opd_jax.evaluation: pass@k, aggregation, scoring, evaluate()."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from opd_jax import evaluation as ev
from opd_jax.tasks import get_task
from opd_jax.tasks.tokenizer import build_tokenizer


@pytest.fixture(scope="module")
def task():
  return get_task("arithmetic")


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  return build_tokenizer(tmp_path_factory.mktemp("tok"))


# ----------------------------------------------------------------------------
# Pure metrics.


def _brute_pass_at_k(n, c, k):
  """P(some of k samples drawn without replacement from n is correct)."""
  items = [1] * c + [0] * (n - c)
  subsets = list(itertools.combinations(range(n), k))
  return sum(any(items[i] for i in s) for s in subsets) / len(subsets)


def test_pass_at_k_matches_brute_force():
  for n in range(1, 9):
    for c in range(n + 1):
      for k in range(1, n + 1):
        want = _brute_pass_at_k(n, c, k)
        assert ev.pass_at_k(n, c, k) == pytest.approx(want, abs=1e-12)
        assert ev.pass_at_k(n, c, k) == pytest.approx(
          1 - math.comb(n - c, k) / math.comb(n, k), abs=1e-12
        )


def test_pass_at_k_edges_and_errors():
  assert ev.pass_at_k(16, 0, 16) == 0.0
  assert ev.pass_at_k(16, 1, 16) == 1.0
  assert ev.pass_at_k(16, 4, 1) == pytest.approx(0.25)
  assert 0.0 < ev.pass_at_k(200, 1, 100) < 1.0
  for args in [(4, 5, 1), (4, -1, 1), (4, 1, 0), (4, 1, 5)]:
    with pytest.raises(ValueError):
      ev.pass_at_k(*args)
  assert ev.default_ks(1) == (1,)
  assert ev.default_ks(16) == (1, 2, 4, 8, 16)
  assert ev.default_ks(6) == (1, 2, 4, 6)


def test_aggregate_known_values():
  scores = np.array(
    [
      [1, 0, 0, 0],  # level 1
      [1, 1, 1, 1],  # level 2
      [0, 0, 0, 0],  # level 1
      [0, 1, 0, 1],
    ]
  )  # level 2
  out = ev.aggregate(
    scores,
    lengths=np.arange(16),
    truncated=np.array([True] * 4 + [False] * 12),
    levels=[1, 2, 1, 2],
  )
  assert out["avg@4"] == pytest.approx(7 / 16)
  assert out["accuracy"] == out["avg@4"]
  assert out["pass@1"] == pytest.approx(out["avg@4"])
  assert out["pass@4"] == pytest.approx(3 / 4)
  want2 = np.mean([ev.pass_at_k(4, c, 2) for c in (1, 4, 0, 2)])
  assert out["pass@2"] == pytest.approx(want2)
  assert out["mean_length"] == pytest.approx(7.5)
  assert out["truncated_frac"] == pytest.approx(0.25)
  assert out["acc/level_1"] == pytest.approx(1 / 8)
  assert out["acc/level_2"] == pytest.approx(6 / 8)
  assert out["num_problems"] == 4 and out["num_samples"] == 4
  assert all(isinstance(v, float) for v in out.values())
  out = ev.aggregate(scores, ks=(3,))
  assert "pass@3" in out and "pass@1" not in out and "acc/level_1" not in out
  with pytest.raises(ValueError):
    ev.aggregate(np.zeros((0, 2)))
  with pytest.raises(ValueError):
    ev.aggregate(scores, levels=[1, 2])


@pytest.mark.parametrize("pattern", ["A", "B"])
def test_evaluate_completions_reference_and_corrupted(task, pattern):
  examples = task.generate(40, seed=0, pattern=pattern, split="eval")
  ref = [ex["completion"] for ex in examples]
  out = ev.evaluate_completions(task, examples, ref)
  assert out["avg@1"] == 1.0 and out["pass@1"] == 1.0
  assert all(out[f"acc/level_{level}"] == 1.0 for level in range(1, 7))
  corrupted = [c.replace("ans=", "ans=9") for c in ref]
  assert ev.evaluate_completions(task, examples, corrupted)["avg@1"] == 0.0
  # k = 2 samples per problem: one right, one truncated before the answer.
  mixed = [t for c in ref for t in (c, c[: c.index("ans=")])]
  out = ev.evaluate_completions("arithmetic", examples, mixed, num_samples=2)
  assert out["avg@2"] == 0.5 and out["pass@1"] == 0.5 and out["pass@2"] == 1.0
  with pytest.raises(ValueError):
    ev.evaluate_completions(task, examples, ref[:-1])


# ----------------------------------------------------------------------------
# Tokenisation.


def test_encode_prompts_left_padded(tok):
  ids, mask = ev.encode_prompts(tok, ["1+2=", "10+20="])
  assert ids.shape == (2, 6) and ids.dtype == np.int32 and mask.dtype == bool
  assert mask.tolist() == [[False, False, True, True, True, True], [True] * 6]
  assert ids[0, :2].tolist() == [tok.pad_token_id] * 2
  assert tok.decode(ids[0][mask[0]]) == "1+2="
  ids8, mask8 = ev.encode_prompts(tok, ["1+2=", "10+20="], max_prompt_len=8)
  assert ids8.shape == (2, 8) and (ids8[:, 2:] == ids).all()
  ids_chat, mask_chat = ev.encode_prompts(tok, ["1+2=", "10+20="], use_chat_template=True)
  assert (ids_chat == ids).all() and (mask_chat == mask).all()
  with pytest.raises(ValueError, match="max_prompt_len"):
    ev.encode_prompts(tok, ["100+200="], max_prompt_len=4)


def test_decode_completions_cuts_at_eos(tok):
  enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]
  eos, pad = tok.eos_token_id, tok.pad_token_id
  rows = [
    enc("ans=12") + [eos] + [pad] * 3,  # EOS then pads
    enc("ans=12345") + [eos],  # EOS in the last slot
    enc("3+4+0=07;a"),
  ]  # truncated, no EOS
  tokens = np.array(rows)
  mask = np.array([[1] * 7 + [0] * 3, [1] * 10, [1] * 10])
  assert ev.decode_completions(tok, tokens, mask, (eos,)) == ["ans=12", "ans=12345", "3+4+0=07;a"]


# ----------------------------------------------------------------------------
# End to end with a tiny random model.


def _tiny_model(vocab_size, seed, eos_token_ids=()):
  """Random tiny Qwen3, filled with numpy draws (``create_model``'s jitted
  init would cost ~10 CPU-seconds of compilation for nothing tested here)."""
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from tiny import tiny_model_config

  from opd_jax.models import abstract_model

  cfg = tiny_model_config(
    vocab_size=vocab_size, max_position_embeddings=4096, eos_token_ids=tuple(eos_token_ids)
  )
  graphdef, state = nnx.split(abstract_model(cfg))
  rng = np.random.default_rng(seed)
  fill = lambda x: jnp.asarray(
    np.ones(x.shape, x.dtype)
    if x.ndim == 1  # norms
    else rng.normal(0.0, 0.5, x.shape).astype(x.dtype)
  )
  return nnx.merge(graphdef, jax.tree.map(fill, state))


@pytest.fixture(scope="module")
def tiny_model(tok):
  return _tiny_model(len(tok), seed=0)


def test_evals_stop_on_every_eos_id_training_stops_on(tiny_model, tok):
  """A checkpoint EOS id that is not the tokenizer's (Qwen / Llama list
  several): training's sampler stops on it, and so do the evals."""
  import jax

  from opd_jax import configs_lib, sampling, train

  ids, mask = ev.encode_prompts(tok, ["12+34="])
  greedy = ev.sampling_config(tok, tiny_model.cfg, max_new_tokens=6, greedy=True)
  first = int(sampling.sample(tiny_model, ids, mask, jax.random.PRNGKey(0), greedy).tokens[0, 0])
  assert first != tok.eos_token_id
  model = _tiny_model(len(tok), seed=0, eos_token_ids=(first,))  # same weights
  c = configs_lib.base_config()
  train_eos = train.sampling_config(train.settings_of(c), tok, model.cfg).eos_ids
  assert set(train_eos) == {first, tok.eos_token_id}
  comps = ev.generate_completions(
    model, tok, ["12+34="], greedy=True, max_new_tokens=6, batch_size=1
  )
  assert comps.lengths.tolist() == [1] and comps.texts == [""]  # stopped on `first`


def test_evaluate_end_to_end(tiny_model, tok, task):
  examples = task.generate(7, seed=0, split="eval")  # 7 = 2 batches of 4, last padded
  kw = dict(
    num_samples=2,
    temperature=1.0,
    top_p=0.95,
    max_new_tokens=8,
    batch_size=4,
    seed=0,
    max_prompt_len=16,
  )
  out = ev.evaluate(tiny_model, tok, examples, task, **kw)
  keys = {
    "avg@2",
    "accuracy",
    "pass@1",
    "pass@2",
    "mean_length",
    "truncated_frac",
    "num_problems",
    "num_samples",
  }
  assert keys <= set(out)
  assert {k for k in out if k.startswith("acc/level_")} == {
    f"acc/level_{ex['level']}" for ex in examples
  }
  assert all(isinstance(v, float) for v in out.values())
  assert 0.0 <= out["avg@2"] <= out["pass@2"] <= 1.0
  assert 1.0 <= out["mean_length"] <= 8.0
  assert 0.0 <= out["truncated_frac"] <= 1.0
  assert out["num_problems"] == 7 and out["num_samples"] == 2

  # Same seed -> same result; other example counts reuse the compiled sampler.
  compiled = ev._sample_jit._cache_size()
  assert ev.EVALUATORS.build("accuracy", kw)(tiny_model, tok, examples, "arithmetic") == out
  comps = ev.generate_completions(
    tiny_model, tok, [e["prompt"] for e in examples[:3]], **{k: v for k, v in kw.items()}
  )
  assert ev._sample_jit._cache_size() == compiled
  # A new model instance with the same architecture (e.g. after a training
  # step) reuses the compiled sampler too.
  ev.evaluate(_tiny_model(len(tok), seed=1), tok, examples, task, **kw)
  assert ev._sample_jit._cache_size() == compiled
  assert len(comps.texts) == 6 and comps.lengths.shape == (6,) and comps.truncated.shape == (6,)
  assert all(isinstance(t, str) and "<eos>" not in t and "<pad>" not in t for t in comps.texts)
  assert ((comps.lengths == 8) | ~comps.truncated).all()


def test_evaluators_registry():
  assert ev.EVALUATORS.names() == ["accuracy"]
  assert "num_samples" in ev.EVALUATORS.valid_kwargs("accuracy")
  with pytest.raises(ValueError, match="unknown argument"):
    ev.EVALUATORS.build("accuracy", {"samples": 3})
