"""Logical-axis sharding: one place that maps logical names to mesh axes.

Parameters and activations are annotated with *logical* axis names (``"vocab"``,
``"embed"``, ``"heads"``, ``"activation_batch"``, ...).  A rule table from the
config maps each logical name to zero, one or several mesh axes (MaxText /
flax-gemma style).  :class:`Sharder` bundles a mesh with its rules and is the
single helper that turns names into ``NamedSharding`` s and applies activation
constraints; it is hashable so modules can hold it as static structure.

A mesh axis is dropped from a dimension whose size it does not divide (e.g. two
KV heads on a tensor axis of 4), so tiny models and odd batch sizes still run on
any mesh; the dimension is then replicated over that axis.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping, MutableMapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis -> mesh axes. Params: FSDP shards the embed dim, tensor
# parallelism the heads / mlp / vocab dims. Activations: batch over data+fsdp,
# the model-parallel dims over tensor.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
  ("vocab", "tensor"),
  ("embed", "fsdp"),
  ("heads", "tensor"),
  ("kv_heads", "tensor"),
  ("head_dim", None),
  ("mlp", "tensor"),
  ("norm", None),
  ("layers", None),
  ("activation_batch", ("data", "fsdp")),
  ("activation_length", None),
  ("activation_embed", None),
  ("activation_heads", "tensor"),
  ("activation_kv_heads", "tensor"),
  ("activation_mlp", "tensor"),
  ("activation_vocab", "tensor"),
  ("cache_layers", None),
  ("cache_batch", ("data", "fsdp")),
  ("cache_length", None),
  ("cache_kv_heads", "tensor"),
  ("cache_head_dim", None),
)


def _as_tuple(axes: Any) -> tuple[str, ...]:
  if axes is None:
    return ()
  if isinstance(axes, str):
    return (axes,)
  return tuple(axes)


# XLA:CPU runs every simulated device's program on one shared pool of
# max(PJRT_NPROC or the CPU count, devices) threads, and an in-process
# collective holds its thread until all devices have arrived. One device may
# run two independent collectives at once on two threads (seen on 8 devices:
# device 0 in a collective-permute and, on a second thread, in the decode
# loop's all-reduce), so with one thread per device the last device finds no
# thread and the rest wait until XLA aborts the process ("Termination timeout
# ... of 40 seconds exceeded"). Four threads a device leave room for that.
CPU_THREADS_PER_DEVICE = 4


def size_cpu_pool(env: MutableMapping[str, str], num_devices: int) -> None:
  """Sets ``env["PJRT_NPROC"]`` (unless already set) to the pool of
  max(4 * ``num_devices``, CPUs) threads that ``num_devices`` simulated CPU
  devices need: ``os.environ`` for this process, a subprocess's env for it."""
  env.setdefault("PJRT_NPROC", str(max(CPU_THREADS_PER_DEVICE * num_devices, os.cpu_count() or 1)))


def simulate_cpu_devices(num_devices: int) -> None:
  """``num_devices`` CPU devices (``jax_num_cpu_devices``) whose collectives
  cannot starve each other of threads (:func:`size_cpu_pool`). Call before
  the first device use: the pool is sized when the backend starts.
  """
  size_cpu_pool(os.environ, num_devices)
  jax.config.update("jax_num_cpu_devices", num_devices)


def make_mesh(
  shape: Mapping[str, int] | Sequence[int] | None = None,
  axis_names: Sequence[str] = MESH_AXES,
  devices: Sequence[jax.Device] | None = None,
) -> Mesh:
  """Builds a mesh over ``devices`` (default: all devices).

  ``shape`` maps axis name -> size; one size may be -1 (fill with the rest).
  ``None`` puts every device on the first axis (pure data parallelism).
  """
  devices = list(jax.devices() if devices is None else devices)
  if shape is None:
    shape = {axis_names[0]: -1}
  if not isinstance(shape, Mapping):
    shape = dict(zip(axis_names, shape))
  unknown = set(shape) - set(axis_names)
  if unknown:
    raise ValueError(f"mesh axes {sorted(unknown)} not in {list(axis_names)}")
  sizes = [int(shape.get(a, 1)) for a in axis_names]
  if sizes.count(-1) > 1:
    raise ValueError(f"at most one mesh axis may be -1, got {dict(shape)}")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f"{len(devices)} devices do not fill mesh {dict(shape)}")
    sizes[sizes.index(-1)] = len(devices) // known
  if math.prod(sizes) != len(devices):
    raise ValueError(
      f"mesh {dict(zip(axis_names, sizes))} needs {math.prod(sizes)} devices, have {len(devices)}"
    )
  try:
    grid = jax.experimental.mesh_utils.create_device_mesh(sizes, devices)
  except Exception:  # odd topologies / CPU: plain reshape
    grid = np.asarray(devices).reshape(sizes)
  return Mesh(grid, tuple(axis_names))


@dataclasses.dataclass(frozen=True)
class Sharder:
  """A mesh plus logical->mesh rules. ``mesh=None`` means unsharded."""

  mesh: Mesh | None = None
  rules: tuple[tuple[str, Any], ...] = DEFAULT_RULES

  def __post_init__(self):
    object.__setattr__(
      self,
      "rules",
      tuple(
        (str(k), _as_tuple(v) or None)
        for k, v in (self.rules.items() if isinstance(self.rules, Mapping) else self.rules)
      ),
    )

  def spec(
    self, logical_axes: Sequence[str | None], shape: Sequence[int] | None = None
  ) -> PartitionSpec:
    """PartitionSpec for ``logical_axes``; drops mesh axes that do not divide
    ``shape`` or that an earlier dimension already uses."""
    table = dict(self.rules)
    used: set[str] = set()
    out = []
    for i, name in enumerate(logical_axes):
      axes = _as_tuple(table.get(name)) if name is not None else ()
      if self.mesh is not None:
        axes = tuple(a for a in axes if a in self.mesh.shape and a not in used)
        if shape is not None:
          keep, size = [], int(shape[i])
          for a in axes:
            n = self.mesh.shape[a]
            if size % n == 0:
              keep.append(a)
              size //= n
          axes = tuple(keep)
      used.update(axes)
      out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*out)

  def named(
    self, logical_axes: Sequence[str | None], shape: Sequence[int] | None = None
  ) -> NamedSharding | None:
    if self.mesh is None:
      return None
    return NamedSharding(self.mesh, self.spec(logical_axes, shape))

  def replicated(self) -> NamedSharding | None:
    return None if self.mesh is None else NamedSharding(self.mesh, PartitionSpec())

  def constrain(self, x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """``with_sharding_constraint`` by logical names (the one helper).

    A no-op only when there is no mesh at all; on a 1-device or CPU mesh the
    constraint is still emitted.
    """
    if self.mesh is None:
      return x
    if len(logical_axes) != x.ndim:
      raise ValueError(
        f"{len(logical_axes)} logical axes {tuple(logical_axes)} for an array of rank {x.ndim}"
      )
    return jax.lax.with_sharding_constraint(x, self.named(logical_axes, x.shape))

  def tree_shardings(self, tree: Any) -> Any:
    """NamedShardings for a pytree of ``nnx.Variable`` s / arrays carrying
    ``logical_axes`` metadata (arrays without it are replicated)."""
    from flax import nnx

    def one(x):
      if isinstance(x, nnx.Variable):
        names = x.get_metadata().get("logical_axes")
        shape = x.get_value().shape
        s = self.named(names, shape) if names is not None else self.replicated()
        return x.replace(s)
      return self.replicated()

    return jax.tree.map(one, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))

  def batch(self, ndim: int = 2, batch_size: int | None = None) -> NamedSharding | None:
    """Sharding for a ``[B, ...]`` input: batch over the data axes."""
    shape = None if batch_size is None else (batch_size,) + (1,) * (ndim - 1)
    return self.named(("activation_batch",) + (None,) * (ndim - 1), shape)


def rules_from_config(rules: Any) -> tuple[tuple[str, Any], ...]:
  """Accepts a mapping / ConfigDict / sequence of pairs; ``None`` -> defaults.

  Config rules *update* the defaults, so a config only names what it changes.
  """
  if rules is None:
    return DEFAULT_RULES
  if hasattr(rules, "to_dict"):
    rules = rules.to_dict()
  items = list(rules.items()) if isinstance(rules, Mapping) else list(rules)
  table = dict(DEFAULT_RULES)
  for k, v in items:
    table[str(k)] = v
  return tuple(table.items())
