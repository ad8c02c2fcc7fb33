"""HF checkpoint I/O: logit parity with transformers, sharded loading, round trips."""

from __future__ import annotations

import json
import os
import re

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from hf_models import (
  FAMILIES,
  hf_logits,
  left_padded_batch,
  random_model,
  save_random_hf_model,
  tiny_hf_config,
)
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from opd_jax.models import hf_io
from opd_jax.models.config import ModelConfig
from opd_jax.models.hf_io import config_from_hf, from_hf, hf_config_dict, to_hf
from opd_jax.sharding import make_mesh

IDS, MASK = left_padded_batch(lengths=(7, 4, 9, 1))
REAL = MASK == 1
VOCAB = tiny_hf_config("llama")["vocab_size"]


def _maxdiff(a, b) -> float:
  return float(np.abs(np.asarray(a)[..., :VOCAB] - np.asarray(b)[..., :VOCAB])[REAL].max())


_jit_forward = nnx.jit(lambda m, ids, mask: m(ids, mask))


def _logits(model) -> np.ndarray:
  """Eager for unsharded models (op cache shared across tests), jit on a mesh
  (one SPMD compile instead of one per op)."""
  if model.sharder.mesh is None:
    return np.asarray(model(IDS, MASK))
  return np.asarray(_jit_forward(model, IDS, MASK))


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
  """(family, tied) -> (checkpoint dir, HF reference logits); built lazily."""
  root = tmp_path_factory.mktemp("hf")
  cache = {}

  def get(family, tied=False):
    if (family, tied) not in cache:
      path = save_random_hf_model(
        root / f"{family}_{tied}", family, seed=len(cache), tie_word_embeddings=tied
      )
      cache[family, tied] = (path, hf_logits(path, IDS, MASK))
    return cache[family, tied]

  return get


# -- parity ------------------------------------------------------------------


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("family", FAMILIES)
def test_logit_parity(ckpts, family, tied):
  path, ref = ckpts(family, tied)
  model = from_hf(path)
  assert model.cfg.tie_word_embeddings == tied
  assert hasattr(model, "lm_head") != tied
  out = _logits(model)
  assert out.dtype == np.float32 and out.shape == ref.shape
  assert _maxdiff(out, ref) <= 1e-4


def test_llama3_rope_scaling_matters(ckpts):
  path, ref = ckpts("llama3")
  cfg = config_from_hf(path)
  assert dict(cfg.rope_scaling)["rope_type"] == "llama3"
  plain = ModelConfig.from_hf_dict(
    {**cfg.hf_config, "rope_parameters": None, "rope_scaling": None, "rope_theta": cfg.rope_theta}
  )
  assert not np.allclose(cfg.inv_freq(), plain.inv_freq())


def test_sharded_checkpoint(tmp_path):
  path = save_random_hf_model(tmp_path / "sh", "qwen2", seed=3, max_shard_size="20KB")
  index = os.path.join(path, hf_io.WEIGHTS_INDEX_NAME)
  assert os.path.isfile(index)
  assert len(set(json.load(open(index))["weight_map"].values())) >= 3
  assert not os.path.exists(os.path.join(path, hf_io.WEIGHTS_NAME))
  ref = hf_logits(path, IDS, MASK)
  assert _maxdiff(_logits(from_hf(path)), ref) <= 1e-4


# -- sharded loading -----------------------------------------------------------


def test_from_hf_on_mesh(ckpts, monkeypatch):
  path, ref = ckpts("qwen3")
  mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  reads = []
  orig = hf_io._read_slice
  monkeypatch.setattr(
    hf_io, "_read_slice", lambda tm, sl, b: reads.append((tm.hf_name, b)) or orig(tm, sl, b)
  )
  model = from_hf(path, mesh=mesh)
  for arr in (
    model.embed[...],
    model.lm_head[...],
    model.layers[0].attn.q[...],
    model.layers[1].attn.o[...],
    model.layers[0].mlp.gate[...],
    model.layers[0].mlp.down[...],
  ):
    assert len(arr.sharding.device_set) == 8
    assert arr.addressable_shards[0].data.shape != arr.shape
    assert np.prod(arr.addressable_shards[0].data.shape) <= arr.size // 2
  # Each device read only its slice of the sharded tensors.
  q_reads = [b for n, b in reads if n == "model.layers.0.self_attn.q_proj.weight"]
  assert q_reads and all(b != ((0, 32), (0, 4), (0, 8)) for b in q_reads)
  unsharded = _logits(from_hf(path))
  out = _logits(model)
  assert _maxdiff(out, unsharded) <= 1e-5
  assert _maxdiff(out, ref) <= 1e-4


def test_from_hf_split_head_dim_fallback(ckpts):
  """Sharding an inner split dim (head_dim) takes the read-whole-dim path."""
  path, ref = ckpts("llama")
  mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  model = from_hf(
    path,
    mesh=mesh,
    rules={
      "head_dim": "tensor",
      "heads": None,
      "kv_heads": None,
      "activation_heads": None,
      "activation_kv_heads": None,
    },
  )
  q = model.layers[0].attn.q[...]
  assert q.addressable_shards[0].data.shape == (16, 4, 4)
  assert _maxdiff(_logits(model), ref) <= 1e-4


def test_vocab_padding(ckpts, tmp_path):
  path, ref = ckpts("llama3")
  mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  model = from_hf(path, mesh=mesh, vocab_pad_multiple=64)
  assert model.cfg.padded_vocab_size == 128 and model.cfg.vocab_size == VOCAB
  assert model.embed[...].shape == (128, 32) and model.lm_head[...].shape == (32, 128)
  assert not np.asarray(model.embed[...][VOCAB:]).any()
  assert not np.asarray(model.lm_head[...][:, VOCAB:]).any()
  out = _logits(model)
  assert out.shape[-1] == 128
  assert _maxdiff(out, ref) <= 1e-4
  assert (out[..., VOCAB:] <= -1e29).all()
  out_dir = to_hf(model, tmp_path / "out")
  tensors = load_file(os.path.join(out_dir, "model.safetensors"))
  assert tensors["model.embed_tokens.weight"].shape == (VOCAB, 32)
  assert tensors["lm_head.weight"].shape == (VOCAB, 32)
  assert json.load(open(os.path.join(out_dir, "config.json")))["vocab_size"] == VOCAB
  assert _maxdiff(hf_logits(out_dir, IDS, MASK), ref) <= 1e-5


# -- round trips ---------------------------------------------------------------


@pytest.mark.parametrize("family,tied", [("llama3", False), ("qwen2", True), ("qwen3", False)])
def test_round_trip_hf(ckpts, tmp_path, family, tied):
  path, ref = ckpts(family, tied)
  out_dir = to_hf(from_hf(path), tmp_path / "rt", max_shard_size="16KB")
  assert os.path.isfile(os.path.join(out_dir, hf_io.WEIGHTS_INDEX_NAME))
  assert [f for f in os.listdir(tmp_path) if f != "rt"] == []  # no temp dirs left
  cfg = json.load(open(os.path.join(out_dir, "config.json")))
  assert cfg["dtype"] == "float32" and cfg["tie_word_embeddings"] == tied
  orig = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
  back = transformers.AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32)
  a, b = orig.state_dict(), back.state_dict()
  assert a.keys() == b.keys()
  for k in a:
    assert torch.equal(a[k], b[k]), k
  assert _maxdiff(hf_logits(back, IDS, MASK), hf_logits(orig, IDS, MASK)) == 0.0


@pytest.mark.parametrize("family,tied", [("llama3", True), ("qwen2", False), ("qwen3", True)])
def test_model_config_to_hf(tmp_path, family, tied):
  """A model made without HF (ModelConfig only) exports a loadable checkpoint."""
  hf = tiny_hf_config(family, tie_word_embeddings=tied)
  base = ModelConfig.from_hf_dict(hf)
  cfg = ModelConfig(**{f: getattr(base, f) for f in hf_io._ARCH_FIELDS})
  assert cfg.hf_config == {}
  model = random_model(cfg, seed=2)  # == create_model(cfg) + perturb_params, no PRNG compile
  ours = _logits(model)
  out_dir = to_hf(model, tmp_path / "m")
  written = json.load(open(os.path.join(out_dir, "config.json")))
  assert written["architectures"] == [hf_io.HF_ARCHITECTURES[cfg.model_type]]
  assert ModelConfig.from_hf_dict(written) == cfg
  assert _maxdiff(hf_logits(out_dir, IDS, MASK), ours) <= 1e-4
  assert _maxdiff(_logits(from_hf(out_dir)), ours) == 0.0


def test_hf_config_dict_rejects_unrepresentable():
  base = ModelConfig.from_hf_dict(tiny_hf_config("llama"))
  with pytest.raises(ValueError, match="attention_bias"):
    hf_config_dict(base.replace(qkv_bias=True))
  with pytest.raises(ValueError, match="qk_norm"):
    hf_config_dict(base.replace(qk_norm=True))


def test_bf16_round_trip(ckpts, tmp_path):
  path, _ = ckpts("qwen3")
  model = from_hf(path, param_dtype="bfloat16", dtype="bfloat16")
  assert model.layers[0].attn.q[...].dtype == jnp.bfloat16
  out_dir = to_hf(model, tmp_path / "bf")
  assert json.load(open(os.path.join(out_dir, "config.json")))["dtype"] == "bfloat16"
  src = load_file(os.path.join(path, "model.safetensors"))
  with safe_open(os.path.join(out_dir, "model.safetensors"), "np") as f:
    for name, value in src.items():
      got = f.get_tensor(name)
      assert got.dtype == ml_dtypes.bfloat16, name
      np.testing.assert_array_equal(got, value.astype(ml_dtypes.bfloat16), err_msg=name)
  again = from_hf(out_dir, param_dtype="bfloat16")
  np.testing.assert_array_equal(
    np.asarray(again.layers[1].mlp.down[...]), np.asarray(model.layers[1].mlp.down[...])
  )
  hf = transformers.AutoModelForCausalLM.from_pretrained(out_dir, dtype="auto")
  assert hf.model.embed_tokens.weight.dtype == torch.bfloat16


def test_to_hf_replaces_existing_dir(ckpts, tmp_path):
  path, ref = ckpts("llama")
  out = tmp_path / "out"
  out.mkdir()
  (out / "stale.txt").write_text("x")
  to_hf(from_hf(path), out)
  assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
  assert os.listdir(tmp_path) == ["out"]
  assert _maxdiff(hf_logits(str(out), IDS, MASK), ref) <= 1e-5


# -- scanned layers (stacked [L, ...] params) ----------------------------------


@pytest.mark.parametrize("family,tied", [("qwen3", False), ("qwen2", True)])
def test_scan_layers_parity_on_mesh(ckpts, monkeypatch, family, tied):
  """model.layers.{i}.* load into stacked params, each device reading only its
  block of each layer's tensor; logits match transformers and the unrolled load."""
  path, ref = ckpts(family, tied)
  mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  reads = []
  orig = hf_io._read_slice
  monkeypatch.setattr(
    hf_io, "_read_slice", lambda tm, sl, b: reads.append((tm.hf_name, b)) or orig(tm, sl, b)
  )
  model = from_hf(path, mesh=mesh, scan_layers=True)
  assert model.cfg.scan_layers and not isinstance(model.layers, nnx.List)
  q = model.layers.attn.q[...]
  assert q.shape == (2, 32, 4, 8) and len(q.sharding.device_set) == 8
  assert q.addressable_shards[0].data.shape == (2, 16, 2, 8)
  for i in range(2):
    q_reads = [b for n, b in reads if n == f"model.layers.{i}.self_attn.q_proj.weight"]
    assert q_reads and all(b != ((0, 32), (0, 4), (0, 8)) for b in q_reads)
  unrolled = from_hf(path, mesh=mesh)
  np.testing.assert_array_equal(np.asarray(q[1]), np.asarray(unrolled.layers[1].attn.q[...]))
  out = _logits(model)
  assert _maxdiff(out, _logits(unrolled)) <= 1e-5
  assert _maxdiff(out, ref) <= 1e-4


def test_scan_layers_round_trip_hf(ckpts, tmp_path):
  """to_hf unstacks: the written tensors equal the source checkpoint's."""
  path, ref = ckpts("llama3")
  model = from_hf(path, scan_layers=True)
  out_dir = to_hf(model, tmp_path / "rt", max_shard_size="16KB")
  assert os.path.isfile(os.path.join(out_dir, hf_io.WEIGHTS_INDEX_NAME))
  assert "scan_layers" not in json.load(open(os.path.join(out_dir, "config.json")))
  src = load_file(os.path.join(path, "model.safetensors"))
  index = json.load(open(os.path.join(out_dir, hf_io.WEIGHTS_INDEX_NAME)))["weight_map"]
  assert set(index) == set(src)
  for name, value in src.items():
    with safe_open(os.path.join(out_dir, index[name]), "np") as f:
      np.testing.assert_array_equal(f.get_tensor(name), value, err_msg=name)
  assert _maxdiff(hf_logits(out_dir, IDS, MASK), ref) <= 1e-4


# -- errors --------------------------------------------------------------------


def _copy_ckpt(src, dst):
  import shutil

  shutil.copytree(src, dst)
  return str(dst)


def test_error_missing_config(tmp_path):
  with pytest.raises(FileNotFoundError, match="config.json"):
    from_hf(tmp_path)
  with pytest.raises(FileNotFoundError, match="does not exist"):
    from_hf(tmp_path / "nope")


def test_error_unsupported_architecture(tmp_path):
  (tmp_path / "config.json").write_text(
    json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": 10})
  )
  with pytest.raises(ValueError) as e:
    from_hf(tmp_path)
  msg = str(e.value)
  assert str(tmp_path / "config.json") in msg and "gpt2" in msg
  assert "qwen3" in msg and "llama" in msg


def test_error_invalid_config_names_path(ckpts, tmp_path):
  path = _copy_ckpt(ckpts("llama")[0], tmp_path / "c")
  cfg = json.load(open(os.path.join(path, "config.json")))
  cfg["num_attention_heads"] = 3
  json.dump(cfg, open(os.path.join(path, "config.json"), "w"))
  with pytest.raises(ValueError, match=re.escape(path) + ".*num_attention_heads"):
    config_from_hf(path)


def test_error_missing_weights(ckpts, tmp_path):
  path = _copy_ckpt(ckpts("llama")[0], tmp_path / "c")
  os.remove(os.path.join(path, "model.safetensors"))
  with pytest.raises(FileNotFoundError, match="no safetensors"):
    from_hf(path)


def test_error_index_missing_shard(tmp_path):
  path = save_random_hf_model(tmp_path / "sh", "llama", max_shard_size="20KB")
  index = json.load(open(os.path.join(path, hf_io.WEIGHTS_INDEX_NAME)))
  victim = sorted(set(index["weight_map"].values()))[1]
  os.remove(os.path.join(path, victim))
  with pytest.raises(FileNotFoundError, match=victim):
    from_hf(path)


def test_error_missing_tensor(ckpts, tmp_path):
  path = _copy_ckpt(ckpts("llama")[0], tmp_path / "c")
  file = os.path.join(path, "model.safetensors")
  tensors = load_file(file)
  del tensors["model.layers.0.mlp.up_proj.weight"]
  save_file(tensors, file, metadata={"format": "pt"})
  with pytest.raises(ValueError, match="'model.layers.0.mlp.up_proj.weight' not found in"):
    from_hf(path)


def test_error_shape_mismatch(ckpts, tmp_path):
  path = _copy_ckpt(ckpts("llama")[0], tmp_path / "c")
  file = os.path.join(path, "model.safetensors")
  tensors = load_file(file)
  tensors["model.layers.1.self_attn.k_proj.weight"] = np.zeros((8, 32), np.float32)
  save_file(tensors, file, metadata={"format": "pt"})
  with pytest.raises(
    ValueError,
    match=r"k_proj.weight.*model.safetensors.*\(8, 32\).*"
    r"config.json implies \(16, 32\)",
  ):
    from_hf(path)
  # Editing config.json's sizes instead is reported against the first tensor.
  cfg = json.load(open(os.path.join(path, "config.json")))
  cfg["hidden_size"] = 64
  json.dump(cfg, open(os.path.join(path, "config.json"), "w"))
  with pytest.raises(ValueError, match="has shape .* but .*config.json implies"):
    from_hf(path)


def test_tied_checkpoint_with_lm_head_ignored(ckpts, tmp_path):
  path, ref = ckpts("qwen3", True)
  path = _copy_ckpt(path, tmp_path / "c")
  file = os.path.join(path, "model.safetensors")
  tensors = load_file(file)
  tensors["lm_head.weight"] = np.full((VOCAB, 32), 7.0, np.float32)
  save_file(tensors, file, metadata={"format": "pt"})
  assert _maxdiff(_logits(from_hf(path)), ref) <= 1e-4


def test_export_config_follows_model_config(ckpts):
  cfg = config_from_hf(ckpts("llama3")[0])
  changed = cfg.replace(rope_theta=5000.0, eos_token_ids=(2, 5), max_position_embeddings=64)
  written = hf_io._export_config(changed, "bfloat16")
  assert ModelConfig.from_hf_dict(written) == changed
  assert written["dtype"] == "bfloat16"
  with pytest.raises(ValueError, match="not representable"):
    hf_io._export_config(cfg.replace(qkv_bias=True), "float32")


def test_error_index_lists_tensor_missing_from_shard(tmp_path):
  path = save_random_hf_model(tmp_path / "sh", "llama", max_shard_size="20KB")
  index_file = os.path.join(path, hf_io.WEIGHTS_INDEX_NAME)
  index = json.load(open(index_file))
  name = "model.layers.1.mlp.gate_proj.weight"
  other = next(
    f for f in sorted(set(index["weight_map"].values())) if f != index["weight_map"][name]
  )
  index["weight_map"][name] = other
  json.dump(index, open(index_file, "w"))
  with pytest.raises(ValueError, match=f"'{name}' not found in .*{other}"):
    from_hf(path)
