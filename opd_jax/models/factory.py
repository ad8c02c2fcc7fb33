"""Building models directly onto their shardings."""

from __future__ import annotations

import jax
from flax import nnx

from opd_jax.models.config import ModelConfig
from opd_jax.models.transformer import Transformer
from opd_jax.sharding import Sharder


def abstract_model(cfg: ModelConfig, sharder: Sharder = Sharder()) -> Transformer:
  """Shape-only model (no memory), for shardings, AOT lowering and loading."""
  return nnx.eval_shape(lambda: Transformer(cfg, sharder=sharder, rngs=nnx.Rngs(0)))


def param_shardings(model_or_state, sharder: Sharder):
  """NamedSharding pytree matching ``nnx.state(model)``."""
  state = model_or_state if isinstance(model_or_state, nnx.State) else nnx.state(model_or_state)
  return sharder.tree_shardings(state)


def create_model(cfg: ModelConfig, *, seed: int = 0,
                 sharder: Sharder = Sharder()) -> Transformer:
  """Random-init model whose parameters are created already sharded
  (the init is jitted with ``out_shardings``; nothing lands on one device)."""
  abstract = abstract_model(cfg, sharder)
  graphdef, abs_state = nnx.split(abstract)
  shardings = param_shardings(abs_state, sharder)

  def init():
    return nnx.state(Transformer(cfg, sharder=sharder, rngs=nnx.Rngs(seed)))

  state = jax.jit(init, out_shardings=shardings if sharder.mesh is not None else None)()
  return nnx.merge(graphdef, state)
