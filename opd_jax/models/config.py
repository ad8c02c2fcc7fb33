"""Model configuration derived from a Hugging Face ``config.json``.

One decoder-only transformer covers the Llama (2/3, llama3 rope scaling),
Qwen2 (q/k/v bias) and Qwen3 (per-head q/k RMSNorm) families.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from opd_jax.models import attention as attention_lib

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Static architecture description (hashable: lives in the graphdef).

  ``vocab_size`` is the checkpoint's embedding rows (already padded by the
  checkpoint authors, e.g. 151,936 for Qwen); ``padded_vocab_size`` >= it adds
  rows for sharding divisibility, whose logits are masked out.
  """

  model_type: str
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  rope_scaling: tuple[tuple[str, Any], ...] | None = None
  max_position_embeddings: int = 4096
  tie_word_embeddings: bool = False
  qkv_bias: bool = False
  o_bias: bool = False
  mlp_bias: bool = False
  qk_norm: bool = False
  bos_token_id: int | None = None
  eos_token_ids: tuple[int, ...] = ()
  pad_token_id: int | None = None
  padded_vocab_size: int = 0
  dtype: str = "float32"
  param_dtype: str = "float32"
  remat: bool = False
  # Many-query attention (prefill, training), models/attention.py: "blockwise"
  # (flash, linear memory), "dense", "xla", "cudnn" or "pallas_tpu"; its query
  # block (dense: remat query blocks, 0 off) and key block.
  attention: str = "blockwise"
  attention_block: int = 256
  attention_key_block: int = 512
  scan_layers: bool = False  # layers stacked [L, ...] and run as one lax.scan
  # One-query (decode) attention over the KV cache, models/attention.py:
  # "blocked" (flash-decoding over the filled cache blocks of decode_block
  # slots), "dense" (every allocated slot) or "phased" (dense over a cache
  # that grows by decode_phase_slots slots per phase, one decode loop per
  # phase) or "pallas_gpu" (the Pallas GPU decode kernel); "auto": phased for
  # unrolled layers on XLA:CPU, blocked elsewhere.
  # Backend choices ("auto" picks per backend, attention.resolve_*): scores
  # and p·v as dot_general or multiply-reduce ("dot" / "reduce"), keys cached
  # [B, K, Dh, S] or [B, K, S, Dh] ("transposed" on XLA:CPU / "standard"
  # elsewhere).
  decode_attention: str = "auto"
  decode_block: int = 128
  decode_phase_slots: int = 512
  decode_contraction: str = "auto"
  key_cache_layout: str = "auto"
  hf_config_json: str = dataclasses.field(default="{}", compare=False, repr=False)

  def __post_init__(self):
    if self.model_type not in SUPPORTED_MODEL_TYPES:
      raise ValueError(
        f"unsupported model_type {self.model_type!r}; supported: {SUPPORTED_MODEL_TYPES}"
      )
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
        f"num_attention_heads={self.num_heads} is not a multiple of "
        f"num_key_value_heads={self.num_kv_heads}"
      )
    for name in ("dtype", "param_dtype"):
      if getattr(self, name) not in DTYPES:
        raise ValueError(f"{name}={getattr(self, name)!r}; expected one of {DTYPES}")
    attention_lib.validate(self.attention, self.attention_block, self.attention_key_block)
    attention_lib.validate_decode(
      self.decode_attention,
      self.decode_block,
      self.decode_contraction,
      self.key_cache_layout,
      self.decode_phase_slots,
    )
    if self.padded_vocab_size == 0:
      object.__setattr__(self, "padded_vocab_size", self.vocab_size)
    if self.padded_vocab_size < self.vocab_size:
      raise ValueError(f"padded_vocab_size={self.padded_vocab_size} < vocab_size={self.vocab_size}")
    if self.rope_scaling is not None:
      rope_type = dict(self.rope_scaling).get("rope_type", "default")
      if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
          f"unsupported rope_scaling type {rope_type!r}; supported: {SUPPORTED_ROPE_TYPES}"
        )

  @property
  def hf_config(self) -> dict[str, Any]:
    return json.loads(self.hf_config_json)

  def replace(self, **kw) -> "ModelConfig":
    return dataclasses.replace(self, **kw)

  def num_params(self) -> int:
    d, f, h, kh, dh = (
      self.hidden_size,
      self.intermediate_size,
      self.num_heads,
      self.num_kv_heads,
      self.head_dim,
    )
    attn = d * h * dh * 2 + d * kh * dh * 2
    per_layer = attn + 3 * d * f + 2 * d + (2 * dh if self.qk_norm else 0)
    emb = self.padded_vocab_size * d * (1 if self.tie_word_embeddings else 2)
    return self.num_layers * per_layer + emb + d

  def inv_freq(self) -> np.ndarray:
    """RoPE inverse frequencies ``[head_dim // 2]`` (float64), with scaling."""
    dim = self.head_dim
    inv = 1.0 / (self.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    if self.rope_scaling is None:
      return inv
    s = dict(self.rope_scaling)
    kind = s.get("rope_type", "default")
    if kind == "linear":
      return inv / float(s["factor"])
    if kind == "llama3":
      # transformers' _compute_llama3_parameters (Llama 3.1 paper, Sec. 3.3).
      factor = float(s["factor"])
      low, high = float(s["low_freq_factor"]), float(s["high_freq_factor"])
      old_len = float(s["original_max_position_embeddings"])
      low_wavelen, high_wavelen = old_len / low, old_len / high
      wavelen = 2 * math.pi / inv
      scaled = np.where(wavelen > low_wavelen, inv / factor, inv)
      smooth = (old_len / wavelen - low) / (high - low)
      smoothed = (1 - smooth) * scaled / factor + smooth * scaled
      medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
      return np.where(medium, smoothed, scaled)
    return inv

  @classmethod
  def from_hf_dict(
    cls,
    hf: Mapping[str, Any],
    *,
    dtype: str = "float32",
    param_dtype: str = "float32",
    vocab_pad_multiple: int = 1,
    remat: bool = False,
    scan_layers: bool = False,
    attention: str = "blockwise",
    attention_block: int = 256,
    attention_key_block: int = 512,
    decode_attention: str = "auto",
    decode_block: int = 128,
    decode_phase_slots: int = 512,
    decode_contraction: str = "auto",
    key_cache_layout: str = "auto",
    source: str = "config.json",
  ) -> "ModelConfig":
    """Builds a config from a HF ``config.json`` dict (transformers 4.x or 5.x)."""
    hf = dict(hf)
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
      arch = hf.get("architectures")
      raise ValueError(
        f"{source}: unsupported architecture model_type={model_type!r} "
        f"(architectures={arch}); supported model types: "
        f"{SUPPORTED_MODEL_TYPES}"
      )
    act = hf.get("hidden_act", "silu")
    if act != "silu":
      raise ValueError(f"{source}: unsupported hidden_act {act!r} (only 'silu')")
    if hf.get("use_sliding_window"):
      raise ValueError(f"{source}: sliding-window attention is not supported")
    try:
      d, h = int(hf["hidden_size"]), int(hf["num_attention_heads"])
      layers, vocab = int(hf["num_hidden_layers"]), int(hf["vocab_size"])
      inter = int(hf["intermediate_size"])
    except KeyError as e:
      raise ValueError(f"{source}: missing required field {e.args[0]!r}") from None
    head_dim = hf.get("head_dim") or d // h
    # transformers 5 moved rope_theta / rope_scaling into rope_parameters.
    rope = dict(hf.get("rope_parameters") or {})
    theta = float(rope.pop("rope_theta", hf.get("rope_theta", 10000.0)))
    scaling = rope or hf.get("rope_scaling") or None
    if scaling is not None:
      scaling = dict(scaling)
      if "type" in scaling and "rope_type" not in scaling:
        scaling["rope_type"] = scaling.pop("type")
      if scaling.get("rope_type", "default") == "default":
        scaling = None
    eos = hf.get("eos_token_id")
    eos = () if eos is None else tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos),)
    attn_bias = bool(hf.get("attention_bias", False))
    padded = int(math.ceil(vocab / vocab_pad_multiple) * vocab_pad_multiple)
    return cls(
      model_type=model_type,
      vocab_size=vocab,
      hidden_size=d,
      intermediate_size=inter,
      num_layers=layers,
      num_heads=h,
      num_kv_heads=int(hf.get("num_key_value_heads") or h),
      head_dim=int(head_dim),
      rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
      rope_theta=theta,
      rope_scaling=None if scaling is None else tuple(sorted(scaling.items())),
      max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
      tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
      qkv_bias=attn_bias or model_type == "qwen2",
      o_bias=attn_bias and model_type != "qwen2",
      mlp_bias=bool(hf.get("mlp_bias", False)),
      qk_norm=model_type == "qwen3",
      bos_token_id=hf.get("bos_token_id"),
      eos_token_ids=eos,
      pad_token_id=hf.get("pad_token_id"),
      padded_vocab_size=padded,
      dtype=dtype,
      param_dtype=param_dtype,
      remat=remat,
      scan_layers=scan_layers,
      attention=attention,
      attention_block=attention_block,
      attention_key_block=attention_key_block,
      decode_attention=decode_attention,
      decode_block=decode_block,
      decode_phase_slots=decode_phase_slots,
      decode_contraction=decode_contraction,
      key_cache_layout=key_cache_layout,
      hf_config_json=json.dumps(hf, sort_keys=True),
    )
