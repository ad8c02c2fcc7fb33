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


def create_model(cfg: ModelConfig, *, seed: int = 0, sharder: Sharder = Sharder()) -> Transformer:
  """Random-init model whose parameters are created already sharded
  (the init is jitted with ``out_shardings``; nothing lands on one device)."""
  abstract = abstract_model(cfg, sharder)
  graphdef, abs_state = nnx.split(abstract)
  shardings = param_shardings(abs_state, sharder)

  def init():
    return nnx.state(Transformer(cfg, sharder=sharder, rngs=nnx.Rngs(seed)))

  state = jax.jit(init, out_shardings=shardings if sharder.mesh is not None else None)()
  return nnx.merge(graphdef, state)


def convert_layers(model: Transformer, scan_layers: bool) -> Transformer:
  """The same weights in the other layer layout: per-layer params
  ``layers[i].*`` (``scan_layers=False``) <-> one stacked ``layers.*`` with a
  leading ``[L]`` axis (``scan_layers=True``). The result is created on the
  target layout's shardings (``model.sharder``)."""
  cfg = model.cfg.replace(scan_layers=scan_layers)
  sharder = model.sharder
  graphdef, abs_state = nnx.split(abstract_model(cfg, sharder))
  pure = nnx.to_pure_dict(nnx.state(model))
  n = cfg.num_layers

  def convert(pure):
    layers = pure["layers"]
    if model.cfg.scan_layers and not scan_layers:
      layers = {i: jax.tree.map(lambda x, i=i: x[i], layers) for i in range(n)}
    elif scan_layers and not model.cfg.scan_layers:
      layers = jax.tree.map(lambda *xs: jax.numpy.stack(xs), *[layers[i] for i in range(n)])
    state = jax.tree.map(lambda x: x, abs_state)
    nnx.replace_by_pure_dict(state, {**pure, "layers": layers})
    return state

  shardings = param_shardings(abs_state, sharder) if sharder.mesh is not None else None
  return nnx.merge(graphdef, jax.jit(convert, out_shardings=shardings)(pure))
