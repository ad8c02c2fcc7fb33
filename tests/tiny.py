"""The tiny ``ModelConfig`` of the unit tests (one definition; tests override
what they vary)."""

from __future__ import annotations

from typing import Any

from opd_jax.models import ModelConfig

TINY = dict(
  model_type="qwen3",
  vocab_size=64,
  hidden_size=32,
  intermediate_size=64,
  num_layers=2,
  num_heads=4,
  num_kv_heads=2,
  head_dim=8,
  qk_norm=True,
  max_position_embeddings=64,
)


def tiny_model_config(**overrides: Any) -> ModelConfig:
  """A 2-layer qwen3-style config: hidden 32 (4 query heads, 2 KV heads of
  8), MLP 64, vocabulary 64, 64 positions; ``overrides`` replace fields."""
  return ModelConfig(**{**TINY, **overrides})
