"""Shared test helpers: tiny random Hugging Face checkpoints and their logits.

``torch`` / ``transformers`` models are imported lazily inside the functions so
that importing this module stays cheap (and works for tests that only need
:func:`tiny_hf_config`).

Typical use::

  path = save_random_hf_model(tmp_path / "qwen3", "qwen3", tie_word_embeddings=True)
  ref = hf_logits(path, ids, mask)          # np.float32 [B, T, V]
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

FAMILIES = ("llama", "llama3", "qwen2", "qwen3")

_COMMON = dict(
  vocab_size=97,
  hidden_size=32,
  intermediate_size=64,
  num_hidden_layers=2,
  num_attention_heads=4,
  num_key_value_heads=2,
  head_dim=8,
  max_position_embeddings=256,
  rms_norm_eps=1e-6,
  hidden_act="silu",
  tie_word_embeddings=False,
  bos_token_id=1,
  eos_token_id=2,
  pad_token_id=0,
)


def tiny_hf_config(family: str, **overrides: Any) -> dict[str, Any]:
  """A tiny HF ``config.json``-style dict for ``family``.

  Families: ``"llama"``, ``"llama3"`` (llama + llama3 rope scaling with a small
  ``original_max_position_embeddings`` so the scaling changes the logits),
  ``"qwen2"`` (q/k/v biases), ``"qwen3"`` (q/k norms). ``overrides`` update the
  dict (e.g. ``tie_word_embeddings=True``). Written in the transformers 4.x
  ``rope_theta`` / ``rope_scaling`` style, which transformers 5 also accepts.
  """
  if family not in FAMILIES:
    raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
  cfg: dict[str, Any] = dict(_COMMON)
  if family == "llama":
    cfg.update(
      model_type="llama",
      architectures=["LlamaForCausalLM"],
      rope_theta=10000.0,
      attention_bias=False,
      mlp_bias=False,
    )
  elif family == "llama3":
    cfg.update(
      model_type="llama",
      architectures=["LlamaForCausalLM"],
      rope_theta=10000.0,
      attention_bias=False,
      mlp_bias=False,
      rope_scaling={
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16,
      },
    )
  elif family == "qwen2":
    cfg.update(
      model_type="qwen2",
      architectures=["Qwen2ForCausalLM"],
      rope_theta=1000000.0,
      use_sliding_window=False,
    )
  elif family == "qwen3":
    cfg.update(
      model_type="qwen3",
      architectures=["Qwen3ForCausalLM"],
      rope_theta=1000000.0,
      attention_bias=False,
      use_sliding_window=False,
    )
  cfg.update(overrides)
  return cfg


def make_hf_model(family: str, seed: int = 0, **overrides: Any):
  """A random float32 ``transformers`` causal LM with perturbed parameters.

  Every parameter (norm weights and biases included) gets noticeable random
  values so that layout / transpose bugs show up in logits.
  """
  import torch
  import transformers

  cfg_dict = tiny_hf_config(family, **overrides)
  kwargs = {k: v for k, v in cfg_dict.items() if k != "model_type"}
  config = transformers.AutoConfig.for_model(cfg_dict["model_type"], **kwargs)
  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(
    config, dtype=torch.float32, attn_implementation="eager"
  )
  gen = torch.Generator().manual_seed(seed + 1)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
      if "norm" in name:
        p.copy_(1.0 + 0.3 * noise)
      elif name.endswith("bias"):
        p.copy_(0.2 * noise)
      elif "embed_tokens" in name or "lm_head" in name:
        p.copy_(0.5 * noise)
      else:
        p.copy_(noise / np.sqrt(p.shape[-1]))
  model.eval()
  return model


def save_random_hf_model(
  path: str | os.PathLike,
  family: str,
  seed: int = 0,
  max_shard_size: str | int | None = None,
  **overrides: Any,
) -> str:
  """Saves a random tiny HF checkpoint (float32 safetensors) to ``path``.

  ``max_shard_size`` (e.g. ``"20KB"``) forces a sharded checkpoint with a
  ``model.safetensors.index.json``. Returns ``str(path)``.
  """
  model = make_hf_model(family, seed=seed, **overrides)
  kw = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
  model.save_pretrained(str(path), safe_serialization=True, **kw)
  return str(path)


def hf_position_ids(attention_mask: np.ndarray) -> np.ndarray:
  """Left-padded mask ``[B, T]`` -> positions ``[B, T]`` (cumsum - 1, pads 0)."""
  mask = np.asarray(attention_mask).astype(np.int64)
  return np.maximum(np.cumsum(mask, axis=-1) - 1, 0) * mask


def hf_logits(path_or_model, input_ids, attention_mask=None) -> np.ndarray:
  """float32 logits ``[B, T, V]`` from transformers (CPU, eager attention).

  ``path_or_model``: a checkpoint dir or a loaded ``transformers`` model.
  Position ids follow ours (cumsum(mask) - 1, pads 0). Logits at pad query
  positions are meaningless; compare only where ``attention_mask == 1``.
  """
  import torch
  import transformers

  if isinstance(path_or_model, (str, os.PathLike)):
    model = transformers.AutoModelForCausalLM.from_pretrained(
      str(path_or_model), dtype=torch.float32, attn_implementation="eager"
    )
  else:
    model = path_or_model
  model.eval()
  ids = np.asarray(input_ids)
  mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask)
  with torch.no_grad():
    out = model(
      input_ids=torch.as_tensor(ids, dtype=torch.long),
      attention_mask=torch.as_tensor(mask, dtype=torch.long),
      position_ids=torch.as_tensor(hf_position_ids(mask), dtype=torch.long),
      use_cache=False,
    )
  return out.logits.float().numpy()


def left_padded_batch(
  vocab_size: int = 97, lengths=(7, 4, 9), seed: int = 0, pad_id: int = 0
) -> tuple[np.ndarray, np.ndarray]:
  """A left-padded batch: (input_ids int32 ``[B, T]``, mask int32 ``[B, T]``)."""
  rng = np.random.default_rng(seed)
  t = max(lengths)
  ids = np.full((len(lengths), t), pad_id, np.int32)
  mask = np.zeros((len(lengths), t), np.int32)
  for i, n in enumerate(lengths):
    ids[i, t - n :] = rng.integers(3, vocab_size, size=n)
    mask[i, t - n :] = 1
  return ids, mask


def perturb_params(model, seed: int = 0):
  """Overwrites an NNX model's params in place with noticeable random values.

  Same scheme as :func:`make_hf_model` (norm weights ~1 + 0.3 N, biases
  0.2 N, embeddings 0.5 N, matrices N / sqrt(hidden)), keeping each param's
  dtype and sharding. Returns ``model``. Needs no torch.
  """
  import jax
  from flax import nnx

  rng = np.random.default_rng(seed)
  hidden = model.cfg.hidden_size
  state = nnx.state(model, nnx.Param)

  def one(path, var):
    name = "/".join(str(getattr(p, "key", p)) for p in path)
    old = var.get_value()
    noise = rng.standard_normal(old.shape).astype(np.float32)
    if "norm" in name:
      val = 1.0 + 0.3 * noise
    elif name.endswith("bias"):
      val = 0.2 * noise
    elif name in ("embed", "lm_head"):
      val = 0.5 * noise
    else:
      val = noise / np.sqrt(hidden)
    return var.replace(jax.device_put(val.astype(old.dtype), old.sharding))

  new = jax.tree_util.tree_map_with_path(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))
  nnx.update(model, new)
  return model


def random_model(cfg, seed: int = 0, sharder=None):
  """A :class:`Transformer` for ``cfg`` with :func:`perturb_params` values.

  Like ``create_model`` but without compiling a PRNG init (values come from
  numpy and are put straight onto each param's sharding), so tests stay fast.
  """
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from opd_jax.models.factory import abstract_model, param_shardings
  from opd_jax.sharding import Sharder

  sharder = sharder or Sharder()
  graphdef, abs_state = nnx.split(abstract_model(cfg, sharder))
  shardings = param_shardings(abs_state, sharder) if sharder.mesh is not None else None
  is_var = lambda x: isinstance(x, nnx.Variable)
  flat_sh = (
    {}
    if shardings is None
    else dict(jax.tree_util.tree_flatten_with_path(shardings, is_leaf=is_var)[0])
  )

  def zeros(path, var):
    v = var.get_value()
    s = flat_sh[path].get_value() if path in flat_sh else None
    return var.replace(jax.device_put(np.zeros(v.shape, jnp.dtype(v.dtype)), s))

  state = jax.tree_util.tree_map_with_path(zeros, abs_state, is_leaf=is_var)
  return perturb_params(nnx.merge(graphdef, state), seed=seed)
