"""Hugging Face checkpoint I/O: safetensors <-> sharded NNX :class:`Transformer`.

Loading never materialises the whole model on the host or on one device: every
parameter is built directly onto its ``NamedSharding`` with
``jax.make_array_from_callback``, and each device's callback reads only its
slice from the memory-mapped safetensors file. Saving gathers one parameter at
a time and writes at most one safetensors shard's worth of host memory.

Layout map (ours <- HF; torch ``Linear`` weights are ``[out, in]``)::

  embed   [V, D]      <- model.embed_tokens.weight [V, D]
  q       [D, H, Dh]  <- self_attn.q_proj.weight [H*Dh, D]  (reshape, transpose)
  k, v    [D, K, Dh]  <- self_attn.{k,v}_proj.weight [K*Dh, D]
  o       [H, Dh, D]  <- self_attn.o_proj.weight [D, H*Dh]
  q_bias  [H, Dh]     <- self_attn.q_proj.bias [H*Dh]  (k/v alike)
  gate/up [D, F]      <- mlp.{gate,up}_proj.weight [F, D]
  down    [F, D]      <- mlp.down_proj.weight [D, F]
  lm_head [D, V]      <- lm_head.weight [V, D]  (absent when tied)

With ``scan_layers`` each layer param is stacked, ``layers.<name> [L, ...]``
<- ``model.layers.{0..L-1}.<tensor>``; a device's block of layers reads only
those layers' slices, and saving gathers one layer at a time.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from opd_jax.models.config import ModelConfig
from opd_jax.models.factory import abstract_model, param_shardings
from opd_jax.models.transformer import Transformer
from opd_jax.sharding import Sharder, rules_from_config

log = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"

HF_ARCHITECTURES = {
  "llama": "LlamaForCausalLM",
  "qwen2": "Qwen2ForCausalLM",
  "qwen3": "Qwen3ForCausalLM",
}
# Checkpoint tensors we know about but do not load.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


# ----------------------------------------------------------------------------
# Name / layout map
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _TensorMap:
  """How one of our params derives from one HF tensor.

  ``ours = transpose(reshape(hf, split), perm)``; ``groups[i]`` lists the split
  dims that make up HF dim ``i`` (consecutive, row-major). ``vocab_dim`` is our
  dim holding the (possibly padded) vocabulary, rows >= ``vocab`` are zeros.
  """

  hf_name: str
  hf_shape: tuple[int, ...]
  split: tuple[int, ...]
  groups: tuple[tuple[int, ...], ...]
  perm: tuple[int, ...]
  vocab_dim: int | None = None
  vocab: int = 0

  @property
  def shape(self) -> tuple[int, ...]:
    return tuple(self.split[p] for p in self.perm)

  def to_hf(self, ours: np.ndarray) -> np.ndarray:
    """Our (unpadded) array -> HF layout."""
    inv = tuple(int(i) for i in np.argsort(self.perm))
    return np.ascontiguousarray(np.transpose(ours, inv).reshape(self.hf_shape))


def _identity(name: str, shape: Sequence[int]) -> _TensorMap:
  shape = tuple(int(s) for s in shape)
  n = len(shape)
  return _TensorMap(name, shape, shape, tuple((i,) for i in range(n)), tuple(range(n)))


def _tensor_maps(cfg: ModelConfig) -> dict[tuple[Any, ...], _TensorMap]:
  """Our per-layer state path (tuple of keys, ``("layers", i, ...)`` for layer
  params) -> :class:`_TensorMap`."""
  d, f, h, k, dh = (
    cfg.hidden_size,
    cfg.intermediate_size,
    cfg.num_heads,
    cfg.num_kv_heads,
    cfg.head_dim,
  )
  v = cfg.vocab_size
  out: dict[tuple[Any, ...], _TensorMap] = {}
  out[("embed",)] = _TensorMap(
    "model.embed_tokens.weight", (v, d), (v, d), ((0,), (1,)), (0, 1), vocab_dim=0, vocab=v
  )
  out[("final_norm", "weight")] = _identity("model.norm.weight", (d,))
  if not cfg.tie_word_embeddings:
    out[("lm_head",)] = _TensorMap(
      "lm_head.weight", (v, d), (v, d), ((0,), (1,)), (1, 0), vocab_dim=1, vocab=v
    )
  for i in range(cfg.num_layers):
    p, a, m = f"model.layers.{i}.", ("layers", i, "attn"), ("layers", i, "mlp")
    out[("layers", i, "input_norm", "weight")] = _identity(p + "input_layernorm.weight", (d,))
    out[("layers", i, "post_attn_norm", "weight")] = _identity(
      p + "post_attention_layernorm.weight", (d,)
    )
    for name, n in (("q", h), ("k", k), ("v", k)):
      out[a + (name,)] = _TensorMap(
        p + f"self_attn.{name}_proj.weight", (n * dh, d), (n, dh, d), ((0, 1), (2,)), (2, 0, 1)
      )
      if cfg.qkv_bias:
        out[a + (f"{name}_bias",)] = _TensorMap(
          p + f"self_attn.{name}_proj.bias", (n * dh,), (n, dh), ((0, 1),), (0, 1)
        )
    out[a + ("o",)] = _TensorMap(
      p + "self_attn.o_proj.weight", (d, h * dh), (d, h, dh), ((0,), (1, 2)), (1, 2, 0)
    )
    if cfg.o_bias:
      out[a + ("o_bias",)] = _identity(p + "self_attn.o_proj.bias", (d,))
    if cfg.qk_norm:
      out[a + ("q_norm", "weight")] = _identity(p + "self_attn.q_norm.weight", (dh,))
      out[a + ("k_norm", "weight")] = _identity(p + "self_attn.k_norm.weight", (dh,))
    for name, shape in (("gate", (f, d)), ("up", (f, d)), ("down", (d, f))):
      out[m + (name,)] = _TensorMap(
        p + f"mlp.{name}_proj.weight", shape, shape, ((0,), (1,)), (1, 0)
      )
      if cfg.mlp_bias:
        out[m + (f"{name}_bias",)] = _identity(p + f"mlp.{name}_proj.bias", (shape[0],))
  return out


def _param_maps(cfg: ModelConfig) -> dict[tuple[Any, ...], tuple[_TensorMap, ...]]:
  """Our state path -> the HF tensors it holds: one map, or with
  ``cfg.scan_layers`` one per layer for a stacked ``("layers", ...)`` param
  (its dim 0 is the layer)."""
  out: dict[tuple[Any, ...], tuple[_TensorMap, ...]] = {}
  for key, tm in _tensor_maps(cfg).items():
    if cfg.scan_layers and key[0] == "layers":
      out.setdefault(("layers",) + key[2:], ())
      out[("layers",) + key[2:]] += (tm,)
    else:
      out[key] = (tm,)
  return out


def _path_key(path) -> tuple[Any, ...]:
  keys = []
  for p in path:
    for attr in ("key", "idx", "name"):
      if hasattr(p, attr):
        keys.append(getattr(p, attr))
        break
    else:
      keys.append(p)
  return tuple(keys)


def _flat_params(state) -> list[tuple[tuple[Any, ...], nnx.Variable]]:
  leaves = jax.tree_util.tree_flatten_with_path(
    state, is_leaf=lambda x: isinstance(x, nnx.Variable)
  )[0]
  return [(_path_key(p), v) for p, v in leaves]


# ----------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------


def _read_config_json(path: str) -> dict[str, Any]:
  if not os.path.isdir(path):
    raise FileNotFoundError(f"checkpoint directory {path!r} does not exist")
  cfg_file = os.path.join(path, CONFIG_NAME)
  if not os.path.isfile(cfg_file):
    raise FileNotFoundError(
      f"{cfg_file} not found: {path!r} is not a Hugging Face "
      "checkpoint directory (needs config.json + safetensors)"
    )
  try:
    with open(cfg_file) as fh:
      return json.load(fh)
  except json.JSONDecodeError as e:
    raise ValueError(f"{cfg_file}: invalid JSON ({e})") from None


def config_from_hf(
  path: str | os.PathLike,
  *,
  dtype: str = "float32",
  param_dtype: str = "float32",
  vocab_pad_multiple: int = 1,
  remat: bool = False,
  scan_layers: bool = False,
  **attention,
) -> ModelConfig:
  """Reads ``<path>/config.json`` into a :class:`ModelConfig`.

  ``attention``: ``attention`` / ``attention_block`` / ``attention_key_block``
  and the decode knobs ``decode_attention`` / ``decode_block`` /
  ``decode_phase_slots`` / ``decode_contraction`` / ``key_cache_layout`` of
  :class:`ModelConfig`.
  Raises FileNotFoundError / ValueError naming the config file.
  """
  path = os.fspath(path)
  hf = _read_config_json(path)
  cfg_file = os.path.join(path, CONFIG_NAME)
  try:
    return ModelConfig.from_hf_dict(
      hf,
      dtype=dtype,
      param_dtype=param_dtype,
      vocab_pad_multiple=vocab_pad_multiple,
      remat=remat,
      scan_layers=scan_layers,
      source=cfg_file,
      **attention,
    )
  except (ValueError, TypeError) as e:
    if cfg_file in str(e):
      raise
    raise ValueError(f"{cfg_file}: {e}") from None


def _weight_files(path: str) -> dict[str, str]:
  """Tensor name -> safetensors file for the checkpoint in ``path``."""
  from safetensors import safe_open

  index = os.path.join(path, WEIGHTS_INDEX_NAME)
  if os.path.isfile(index):
    with open(index) as fh:
      weight_map = json.load(fh).get("weight_map")
    if not isinstance(weight_map, dict):
      raise ValueError(f"{index}: no 'weight_map'")
    out = {}
    for name, fname in weight_map.items():
      file = os.path.join(path, fname)
      if not os.path.isfile(file):
        raise FileNotFoundError(
          f"{index} maps tensor {name!r} to shard file {file}, which does not exist"
        )
      out[name] = file
    return out
  single = os.path.join(path, WEIGHTS_NAME)
  files = (
    [single]
    if os.path.isfile(single)
    else sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".safetensors"))
  )
  if not files:
    others = [f for f in os.listdir(path) if f.endswith((".bin", ".pt", ".pth", ".h5"))]
    hint = f" (found {others}; only safetensors are supported)" if others else ""
    raise FileNotFoundError(
      f"no safetensors weights in {path}: expected {WEIGHTS_NAME} or {WEIGHTS_INDEX_NAME}{hint}"
    )
  out = {}
  for file in files:
    with safe_open(file, "np") as fh:
      for name in fh.keys():
        out[name] = file
  return out


def _norm_index(index: Sequence[slice], shape: Sequence[int]) -> tuple[tuple[int, int], ...]:
  out = []
  for sl, n in zip(index, shape):
    start, stop, step = sl.indices(n)
    if step != 1:
      raise ValueError(f"strided shard index {index} not supported")
    out.append((start, stop))
  return tuple(out)


def _read_slice(tm: _TensorMap, hf_slice, bounds: tuple[tuple[int, int], ...]) -> np.ndarray:
  """Reads our-layout block ``bounds`` (per our dim, unpadded) from the HF slice."""
  # Our dim j is split dim perm[j]; collect per-split-dim bounds.
  split_bounds = [None] * len(tm.split)
  for j, b in enumerate(bounds):
    split_bounds[tm.perm[j]] = b
  hf_index, post, split_shape = [], [], []
  for group in tm.groups:
    inner = group[1:]
    lo, hi = split_bounds[group[0]]
    if all(split_bounds[g] == (0, tm.split[g]) for g in inner):
      size = math.prod(tm.split[g] for g in inner)
      hf_index.append(slice(lo * size, hi * size))
      split_shape.extend([hi - lo] + [tm.split[g] for g in inner])
      post.extend([slice(None)] * len(group))
    else:  # inner split dims are partial: read the whole HF dim, slice after
      hf_index.append(slice(None))
      split_shape.extend(tm.split[g] for g in group)
      post.extend(slice(*split_bounds[g]) for g in group)
  block = np.asarray(hf_slice[tuple(hf_index)])
  block = block.reshape(split_shape)[tuple(post)]
  return np.transpose(block, tm.perm)


def _read_block(tm: _TensorMap, hf_slice, bounds: tuple[tuple[int, int], ...], dtype) -> np.ndarray:
  """Our-layout block ``bounds`` (per our dim, padded vocab) as ``dtype``; rows
  past the checkpoint's vocabulary are zeros."""
  real = list(bounds)
  pad = None
  if tm.vocab_dim is not None:
    lo, hi = bounds[tm.vocab_dim]
    real[tm.vocab_dim] = (min(lo, tm.vocab), min(hi, tm.vocab))
    pad = (hi - lo) - (real[tm.vocab_dim][1] - real[tm.vocab_dim][0])
  if any(hi <= lo for lo, hi in real):
    block = np.zeros([hi - lo for lo, hi in real], dtype)
  else:
    block = _read_slice(tm, hf_slice, tuple(real)).astype(dtype)
  if pad:
    widths = [(0, 0)] * len(bounds)
    widths[tm.vocab_dim] = (0, pad)
    block = np.pad(block, widths)
  return block


def _load_param(
  tms: Sequence[_TensorMap], hf_slices: Sequence[Any], shape, sharding, dtype, stacked: bool = False
) -> jax.Array:
  """Builds one parameter on ``sharding`` (``None``: default device).

  ``stacked``: dim 0 of ``shape`` is the layer and ``tms[l]`` / ``hf_slices[l]``
  layer l's tensor; a device's block of layers ``l0:l1`` reads just those
  layers' slices. Otherwise ``tms`` / ``hf_slices`` hold one tensor.
  """
  cache: dict[Any, np.ndarray] = {}
  full_shape = tuple(shape)

  def cb(index):
    bounds = _norm_index(index, full_shape)
    if bounds not in cache:
      if stacked:
        (lo, hi), rest = bounds[0], bounds[1:]
        cache[bounds] = np.stack(
          [_read_block(tms[l], hf_slices[l], rest, dtype) for l in range(lo, hi)]
        )
      else:
        cache[bounds] = _read_block(tms[0], hf_slices[0], bounds, dtype)
    return cache[bounds]

  if sharding is None:
    return jax.device_put(cb(tuple(slice(None) for _ in full_shape)))
  return jax.make_array_from_callback(full_shape, sharding, cb)


def from_hf(
  path: str | os.PathLike,
  *,
  dtype: str = "float32",
  param_dtype: str = "float32",
  mesh: jax.sharding.Mesh | None = None,
  rules: Any = None,
  vocab_pad_multiple: int = 1,
  remat: bool = False,
  scan_layers: bool = False,
  **attention,
) -> Transformer:
  """Loads a local HF checkpoint dir (config.json + safetensors) as a Transformer.

  Each parameter is created directly on its sharding (``mesh``, ``rules``);
  devices read only their slices of the mmap'd safetensors. Padded vocab rows
  (``vocab_pad_multiple``) are zeros. Tied checkpoints' ``lm_head.weight`` is
  ignored. ``scan_layers``: the ``model.layers.{i}.*`` tensors fill stacked
  ``[L, ...]`` params (each device still reads only its block).
  """
  from safetensors import safe_open

  path = os.fspath(path)
  cfg = config_from_hf(
    path,
    dtype=dtype,
    param_dtype=param_dtype,
    vocab_pad_multiple=vocab_pad_multiple,
    remat=remat,
    scan_layers=scan_layers,
    **attention,
  )
  files = _weight_files(path)
  sharder = Sharder(mesh, rules_from_config(rules))
  graphdef, abs_state = nnx.split(abstract_model(cfg, sharder))
  shardings = param_shardings(abs_state, sharder) if mesh is not None else None
  maps = _param_maps(cfg)
  np_dtype = np.dtype(jnp.dtype(param_dtype))

  params = _flat_params(abs_state)
  shard_leaves = dict(_flat_params(shardings)) if shardings is not None else {}
  missing_maps = [k for k, _ in params if k not in maps]
  if missing_maps:
    raise RuntimeError(f"internal: no HF mapping for params {missing_maps}")
  used = set()
  handles: dict[str, Any] = {}
  names: dict[str, set[str]] = {}
  loaded: dict[tuple[Any, ...], jax.Array] = {}
  try:
    for key, var in params:
      slices = []
      for tm in maps[key]:
        file = files.get(tm.hf_name)
        if file is None:
          raise ValueError(f"tensor {tm.hf_name!r} not found in {path}")
        if file not in handles:
          handles[file] = safe_open(file, "np").__enter__()
          names[file] = set(handles[file].keys())
        if tm.hf_name not in names[file]:
          raise ValueError(
            f"tensor {tm.hf_name!r} not found in {file} (listed in "
            f"{os.path.join(path, WEIGHTS_INDEX_NAME)})"
          )
        hf_slice = handles[file].get_slice(tm.hf_name)
        got = tuple(hf_slice.get_shape())
        if got != tm.hf_shape:
          raise ValueError(
            f"tensor {tm.hf_name!r} in file {file} has shape {got} but "
            f"{os.path.join(path, CONFIG_NAME)} implies {tm.hf_shape}"
          )
        slices.append(hf_slice)
        used.add(tm.hf_name)
      shape = var.get_value().shape
      sharding = shard_leaves[key].get_value() if key in shard_leaves else None
      loaded[key] = _load_param(
        maps[key], slices, shape, sharding, np_dtype, stacked=cfg.scan_layers and key[0] == "layers"
      )
  finally:
    for fh in handles.values():
      fh.__exit__(None, None, None)
  unused = [
    n
    for n in files
    if n not in used
    and not n.endswith(_IGNORED_SUFFIXES)
    and not (n == "lm_head.weight" and cfg.tie_word_embeddings)
  ]
  if unused:
    log.warning("from_hf(%s): ignoring %d unused tensors, e.g. %s", path, len(unused), unused[:5])

  state = jax.tree_util.tree_map_with_path(
    lambda p, v: v.replace(loaded[_path_key(p)]),
    abs_state,
    is_leaf=lambda x: isinstance(x, nnx.Variable),
  )
  return nnx.merge(graphdef, state)


# ----------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------


def hf_config_dict(cfg: ModelConfig) -> dict[str, Any]:
  """A HF ``config.json`` dict for ``cfg`` (for models not loaded from HF)."""
  mt = cfg.model_type
  if mt == "qwen2":
    if not cfg.qkv_bias or cfg.o_bias:
      raise ValueError(
        "qwen2 in transformers has q/k/v biases and no o bias; got "
        f"qkv_bias={cfg.qkv_bias}, o_bias={cfg.o_bias}"
      )
    attention_bias = None
  else:
    if cfg.qkv_bias != cfg.o_bias:
      raise ValueError(
        f"{mt}: transformers' attention_bias sets q/k/v and o biases "
        f"together; got qkv_bias={cfg.qkv_bias}, o_bias={cfg.o_bias}"
      )
    attention_bias = cfg.qkv_bias
  if cfg.qk_norm != (mt == "qwen3"):
    raise ValueError(
      f"{mt}: qk_norm={cfg.qk_norm} is not representable in transformers (only qwen3 has q/k norms)"
    )
  if cfg.mlp_bias and mt != "llama":
    raise ValueError(f"{mt}: mlp_bias is only supported by llama in transformers")
  eos = list(cfg.eos_token_ids)
  hf: dict[str, Any] = {
    "model_type": mt,
    "architectures": [HF_ARCHITECTURES[mt]],
    "vocab_size": cfg.vocab_size,
    "hidden_size": cfg.hidden_size,
    "intermediate_size": cfg.intermediate_size,
    "num_hidden_layers": cfg.num_layers,
    "num_attention_heads": cfg.num_heads,
    "num_key_value_heads": cfg.num_kv_heads,
    "head_dim": cfg.head_dim,
    "hidden_act": "silu",
    "max_position_embeddings": cfg.max_position_embeddings,
    "rms_norm_eps": cfg.rms_norm_eps,
    "rope_theta": cfg.rope_theta,
    "rope_scaling": None if cfg.rope_scaling is None else dict(cfg.rope_scaling),
    "tie_word_embeddings": cfg.tie_word_embeddings,
    "bos_token_id": cfg.bos_token_id,
    "eos_token_id": None if not eos else eos[0] if len(eos) == 1 else eos,
    "pad_token_id": cfg.pad_token_id,
    "initializer_range": 0.02,
    "use_cache": True,
    "attention_dropout": 0.0,
  }
  if attention_bias is not None:
    hf["attention_bias"] = attention_bias
  if mt == "llama":
    hf["mlp_bias"] = cfg.mlp_bias
  else:
    hf["use_sliding_window"] = False
  return hf


_ARCH_FIELDS = (
  "model_type",
  "vocab_size",
  "hidden_size",
  "intermediate_size",
  "num_layers",
  "num_heads",
  "num_kv_heads",
  "head_dim",
  "rms_norm_eps",
  "rope_theta",
  "rope_scaling",
  "max_position_embeddings",
  "tie_word_embeddings",
  "qkv_bias",
  "o_bias",
  "mlp_bias",
  "qk_norm",
  "bos_token_id",
  "eos_token_ids",
  "pad_token_id",
)


def _export_config(cfg: ModelConfig, dtype_name: str) -> dict[str, Any]:
  """The config.json to write: the original HF dict (or a synthesised one)
  updated with ``cfg``; checked to read back as ``cfg``."""
  if not cfg.hf_config:
    hf = hf_config_dict(cfg)
  else:
    hf = cfg.hf_config
    hf.update(
      vocab_size=cfg.vocab_size,
      hidden_size=cfg.hidden_size,
      intermediate_size=cfg.intermediate_size,
      num_hidden_layers=cfg.num_layers,
      num_attention_heads=cfg.num_heads,
      num_key_value_heads=cfg.num_kv_heads,
      head_dim=cfg.head_dim,
      rms_norm_eps=cfg.rms_norm_eps,
      max_position_embeddings=cfg.max_position_embeddings,
      tie_word_embeddings=cfg.tie_word_embeddings,
      bos_token_id=cfg.bos_token_id,
      pad_token_id=cfg.pad_token_id,
    )
    back = ModelConfig.from_hf_dict(hf)
    if back.eos_token_ids != cfg.eos_token_ids:
      eos = list(cfg.eos_token_ids)
      hf["eos_token_id"] = None if not eos else eos[0] if len(eos) == 1 else eos
    if (back.rope_theta, back.rope_scaling) != (cfg.rope_theta, cfg.rope_scaling):
      hf.pop("rope_parameters", None)
      hf["rope_theta"] = cfg.rope_theta
      hf["rope_scaling"] = None if cfg.rope_scaling is None else dict(cfg.rope_scaling)
  if not hf.get("architectures"):
    hf["architectures"] = [HF_ARCHITECTURES[cfg.model_type]]
  hf["torch_dtype"] = dtype_name
  hf["dtype"] = dtype_name
  back = ModelConfig.from_hf_dict(hf)
  diff = {
    f: (getattr(cfg, f), getattr(back, f))
    for f in _ARCH_FIELDS
    if getattr(cfg, f) != getattr(back, f)
  }
  if diff:
    raise ValueError(
      f"model config is not representable as a HF config.json: (ours, written) differ in {diff}"
    )
  return hf


def _to_host(x: jax.Array) -> np.ndarray:
  if jax.process_count() > 1 and not x.is_fully_addressable:
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


def to_hf(
  model: Transformer,
  out_dir: str | os.PathLike,
  *,
  max_shard_size: int | str = "5GB",
  dtype: str | None = None,
) -> str:
  """Writes ``model`` as a HF checkpoint (config.json + safetensors) to ``out_dir``.

  ``dtype``: saved dtype (default: the params' dtype). Shards above
  ``max_shard_size`` with a ``model.safetensors.index.json``. Vocab padding is
  stripped. Params are gathered one at a time; only process 0 writes, into a
  temp dir beside ``out_dir`` that is renamed into place at the end (an existing
  ``out_dir`` is replaced). Returns ``out_dir``.
  """
  from huggingface_hub import split_state_dict_into_shards_factory
  from safetensors.numpy import save_file

  out_dir = os.path.abspath(os.fspath(out_dir))
  cfg = model.cfg
  maps = _param_maps(cfg)
  state = nnx.state(model, nnx.Param)
  params = dict(_flat_params(state))
  missing = [k for k in params if k not in maps]
  if missing:
    raise RuntimeError(f"internal: no HF mapping for params {missing}")
  save_dtype = np.dtype(jnp.dtype(dtype or cfg.param_dtype))
  dtype_name = jnp.dtype(save_dtype).name
  hf_config = _export_config(cfg, dtype_name)  # fail before any gathering

  # HF name -> (our key, layer of a stacked param or None, map).
  by_name = {
    tm.hf_name: (k, l if cfg.scan_layers and k[0] == "layers" else None, tm)
    for k in params
    for l, tm in enumerate(maps[k])
  }
  # Plan shards from shapes only (zero-memory placeholder arrays: nbytes = size).
  specs = {
    name: np.broadcast_to(np.zeros((), save_dtype), tm.hf_shape)
    for name, (_, _, tm) in by_name.items()
  }
  split = split_state_dict_into_shards_factory(
    specs,
    get_storage_size=lambda t: int(t.nbytes),
    filename_pattern="model{suffix}.safetensors",
    max_shard_size=max_shard_size,
  )

  writer = jax.process_index() == 0
  parent = os.path.dirname(out_dir)
  tmp = None
  if writer:
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
  try:
    for fname, names in split.filename_to_tensors.items():
      tensors = {}
      for name in names:
        key, layer, tm = by_name[name]
        value = params[key].get_value()
        host = _to_host(value if layer is None else value[layer])  # one layer at a time
        if tm.vocab_dim is not None:
          host = np.take(host, np.arange(tm.vocab), axis=tm.vocab_dim)
        tensors[name] = tm.to_hf(host.astype(save_dtype))
        del host
      if writer:
        save_file(tensors, os.path.join(tmp, fname), metadata={"format": "pt"})
      del tensors
    if writer:
      if split.is_sharded:
        index = {"metadata": {**split.metadata}, "weight_map": split.tensor_to_filename}
        with open(os.path.join(tmp, WEIGHTS_INDEX_NAME), "w") as fh:
          json.dump(index, fh, indent=2, sort_keys=True)
      with open(os.path.join(tmp, CONFIG_NAME), "w") as fh:
        json.dump(hf_config, fh, indent=2, sort_keys=True)
      old = None
      if os.path.exists(out_dir):
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.old-", dir=parent)
        os.rename(out_dir, os.path.join(old, "d"))
      os.rename(tmp, out_dir)
      tmp = None
      if old is not None:
        shutil.rmtree(old, ignore_errors=True)
  finally:
    if tmp is not None:
      shutil.rmtree(tmp, ignore_errors=True)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(f"opd_jax.to_hf:{out_dir}")
  return out_dir
