"""Orbax checkpoints of a run: student params, optimizer state, step, RNG,
data-iterator state and the resolved config. The teacher is never saved.

Saves are atomic (orbax writes into a temporary directory and renames on
commit), the last ``max_to_keep`` are kept, and the newest checkpoint that
reads back whole is restored on start (:meth:`Checkpointer.restore_newest`:
a damaged one is reported and moved aside to ``<directory>.damaged/``, never
silently replaced by a fresh start). SIGTERM (preemption) sets a flag; the
driver saves at the next step boundary and exits cleanly.
"""

from __future__ import annotations

import logging as std_logging
import os
import shutil
import signal
import sys
import threading
import time
import warnings
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging


class RestoreError(RuntimeError):
  """No checkpoint of the run can be restored (each one's error is named)."""


def _short(error: BaseException, limit: int = 400) -> str:
  text = " ".join(f"{type(error).__name__}: {error}".split())
  return text if len(text) <= limit else text[:limit] + " ..."


def _quiet_closed_loop_callbacks() -> None:
  """After a failed read, TensorStore completes the checkpoint's other reads
  into orbax's closed event loop, and each reports a RuntimeError ('Event loop
  is closed') through ``sys.unraisablehook``: those are dropped (the failure
  itself is reported; a failed read's coroutines are never awaited either);
  anything else is reported as before."""
  hook = sys.unraisablehook
  if getattr(hook, "_opd_quiet", False):
    return

  def quiet(unraisable):
    value = unraisable.exc_value
    if isinstance(value, RuntimeError) and str(value) == "Event loop is closed":
      return
    hook(unraisable)

  quiet._opd_quiet = True
  sys.unraisablehook = quiet


class _FailedReadTasks(std_logging.Filter):
  """Drops asyncio's "Task exception was never retrieved" records for the
  other reads of a checkpoint whose restore already failed: orbax gives up at
  the first failed read, its sibling reads of the same files fail as well and
  are garbage-collected unawaited, each logging a TensorStore traceback. The
  failure itself is reported once (step, path, error); records for any other
  task pass through."""

  def __init__(self):
    super().__init__()
    self.paths: set[str] = set()

  def filter(self, record: std_logging.LogRecord) -> bool:
    message = str(record.msg)
    if not message.startswith("Task exception was never retrieved"):
      return True
    error = record.exc_info[1] if record.exc_info else None
    text = message + (str(error) if error is not None else "")
    return not any(path in text for path in self.paths)


_FAILED_READS = _FailedReadTasks()


def _quiet_failed_read_tasks(path: str) -> None:
  """Registers ``path`` (a checkpoint whose restore failed) with the filter."""
  logger = std_logging.getLogger("asyncio")
  if _FAILED_READS not in logger.filters:
    logger.addFilter(_FAILED_READS)
  _FAILED_READS.paths.add(os.path.join(path, ""))


class Checkpointer:
  """Thin wrapper over ``ocp.CheckpointManager`` with named items."""

  def __init__(
    self, directory: str, *, save_every: int, max_to_keep: int = 3, async_save: bool = False
  ):
    self.save_every = int(save_every)
    options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep, create=True, enable_async_checkpointing=async_save
    )
    self.manager = ocp.CheckpointManager(
      directory, options=options, item_names=("state", "data", "meta")
    )

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def should_save(self, step: int) -> bool:
    return self.save_every > 0 and step % self.save_every == 0

  def save(self, step: int, state: Any, data_state: dict, meta: dict, force: bool = False) -> bool:
    args = ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      data=ocp.args.JsonSave(data_state),
      meta=ocp.args.JsonSave(meta),
    )
    saved = self.manager.save(step, args=args, force=force)
    self.manager.wait_until_finished()
    return saved

  def restore(self, abstract_state: Any, step: int | None = None):
    """Restores ``(state, data_state, meta)`` onto the abstract state's
    shardings (``jax.ShapeDtypeStruct`` leaves with ``.sharding``)."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError("no checkpoint to restore")
    out = self.manager.restore(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        data=ocp.args.JsonRestore(),
        meta=ocp.args.JsonRestore(),
      ),
    )
    return out["state"], out["data"], out["meta"]

  def step_path(self, step: int) -> str:
    return os.path.join(os.fspath(self.manager.directory), str(step))

  def restore_newest(
    self, abstract_state: Any, step: int = 0, setting: str = "config.restore_step"
  ):
    """Restores the newest checkpoint that reads back whole: ``(step, state,
    data_state, meta)``, or None when there is no checkpoint (a fresh start).

    A checkpoint that fails to read (damaged files, another structure) is
    reported (step, path, error) with a warning and the previous one is
    tried; ``step > 0`` restores exactly that one. The checkpoints newer
    than the restored one are moved to ``<directory>.damaged/<step>`` (the
    run saves those steps again). RestoreError, naming every checkpoint and
    its error, when checkpoints exist but none can be read.
    """
    steps = sorted(self.manager.all_steps(), reverse=True)
    if step > 0 and step not in steps:
      raise RestoreError(
        f"{setting}={step}: there is no checkpoint {step} in "
        f"{self.manager.directory} (checkpoints: {sorted(steps) or 'none'})"
      )
    if not steps:
      return None
    failed = []
    _quiet_closed_loop_callbacks()
    for s in [step] if step > 0 else steps:
      try:
        out = (s, *self.restore(abstract_state, s))
      except Exception as e:  # pylint: disable=broad-except  (TensorStore, JSON, structure)
        warnings.filterwarnings("ignore", message="coroutine .* was never awaited")
        _quiet_failed_read_tasks(self.step_path(s))
        failed.append(f"checkpoint {s} ({self.step_path(s)}): {_short(e)}")
        logging.warning("cannot restore %s; trying the previous checkpoint", failed[-1])
        continue
      self._set_aside(
        [t for t in steps if t > s],
        reason="newer than the restored step "
        f"{s}" + (f" ({setting}={step})" if step > 0 else " (unreadable)"),
      )
      return out
    hint = (
      f"choose another with {setting}=N (checkpoints: {sorted(steps)})"
      if step > 0
      else f"{setting}=N restores one explicitly; to start afresh, move "
      f"{self.manager.directory} away"
    )
    raise RestoreError(
      "no checkpoint of this run can be restored (the run does not start "
      "afresh over them):\n  " + "\n  ".join(failed) + f"\n{hint}"
    )

  def _set_aside(self, steps: list[int], reason: str) -> None:
    """Moves checkpoints ``steps`` to ``<directory>.damaged/`` (process 0)."""
    if not steps:
      return
    aside = os.fspath(self.manager.directory).rstrip("/") + ".damaged"
    if jax.process_index() == 0:
      os.makedirs(aside, exist_ok=True)
      for s in steps:
        dest = os.path.join(aside, str(s))
        if os.path.exists(dest):
          dest += f".{int(time.time())}"
        shutil.move(self.step_path(s), dest)
        logging.warning("checkpoint %d %s: moved to %s", s, reason, dest)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils

      multihost_utils.sync_global_devices("checkpoints_set_aside")
    self.manager.reload()

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
