"""Orbax checkpoints of a run: student params, optimizer state, step, RNG,
data-iterator state and the resolved config. The teacher is never saved.

Saves are atomic (orbax writes into a temporary directory and renames on
commit), the last ``max_to_keep`` are kept, and the latest is restored on
start. SIGTERM (preemption) sets a flag; the driver saves at the next step
boundary and exits cleanly.
"""

from __future__ import annotations

import signal
import threading
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp


class Checkpointer:
  """Thin wrapper over ``ocp.CheckpointManager`` with named items."""

  def __init__(self, directory: str, *, save_every: int, max_to_keep: int = 3,
               async_save: bool = False):
    self.save_every = int(save_every)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=True,
        enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(
        directory, options=options, item_names=("state", "data", "meta"))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def should_save(self, step: int) -> bool:
    return self.save_every > 0 and step % self.save_every == 0

  def save(self, step: int, state: Any, data_state: dict, meta: dict,
           force: bool = False) -> bool:
    args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                              data=ocp.args.JsonSave(data_state),
                              meta=ocp.args.JsonSave(meta))
    saved = self.manager.save(step, args=args, force=force)
    self.manager.wait_until_finished()
    return saved

  def restore(self, abstract_state: Any, step: int | None = None):
    """Restores ``(state, data_state, meta)`` onto the abstract state's
    shardings (``jax.ShapeDtypeStruct`` leaves with ``.sharding``)."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError("no checkpoint to restore")
    out = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()))
    return out["state"], out["data"], out["meta"]

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


def abstract_like(tree: Any) -> Any:
  """ShapeDtypeStructs (with shardings) for restoring onto ``tree``'s layout."""
  def one(x):
    if isinstance(x, jax.Array):
      return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    return x
  return jax.tree.map(one, tree)


class PreemptionFlag:
  """Catches SIGTERM; ``requested()`` is agreed across processes."""

  def __init__(self):
    self._event = threading.Event()
    self._previous = None
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):  # noqa: ARG002
    self._event.set()

  def set(self):
    self._event.set()

  def requested(self) -> bool:
    local = self._event.is_set()
    if jax.process_count() == 1:
      return local
    from jax.experimental import multihost_utils
    flags = multihost_utils.process_allgather(np.asarray([local], np.int32))
    return bool(np.asarray(flags).any())

  def restore_handler(self):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
