"""Models: one NNX decoder covering Llama / Qwen2 / Qwen3, HF checkpoints in and out."""

from opd_jax.models.config import SUPPORTED_MODEL_TYPES, ModelConfig
from opd_jax.models.factory import abstract_model, create_model, param_shardings
from opd_jax.models.transformer import KVCache, Transformer, positions_from_mask

__all__ = [
  "ModelConfig",
  "SUPPORTED_MODEL_TYPES",
  "KVCache",
  "Transformer",
  "positions_from_mask",
  "create_model",
  "abstract_model",
  "param_shardings",
  "from_hf",
  "to_hf",
]


def from_hf(*args, **kwargs):
  from opd_jax.models.hf_io import from_hf as _from_hf

  return _from_hf(*args, **kwargs)


def to_hf(*args, **kwargs):
  from opd_jax.models.hf_io import to_hf as _to_hf

  return _to_hf(*args, **kwargs)
