"""Iterator state: JSON-serialisable, saved in checkpoints."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import grain
import numpy as np


def _to_json(value: Any) -> Any:
  if isinstance(value, dict):
    return {str(k): _to_json(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_to_json(v) for v in value]
  if isinstance(value, np.generic):
    return value.item()
  if isinstance(value, np.ndarray):
    return value.tolist()
  if value is None or isinstance(value, (bool, int, float, str)):
    return value
  raise TypeError(f"Iterator state value {value!r} is not JSON-serialisable.")


def save_iterator_state(it: grain.DatasetIterator) -> dict[str, Any]:
  """Returns the iterator state as a JSON-serialisable dict."""
  state = _to_json(it.get_state())
  json.dumps(state)  # Fail here, not inside the checkpointer.
  return state


def restore_iterator_state(
  it: grain.DatasetIterator, state: Mapping[str, Any]
) -> grain.DatasetIterator:
  """Restores ``state`` (from :func:`save_iterator_state`) into ``it``."""
  if not isinstance(state, Mapping):
    raise TypeError(f"Iterator state must be a dict, got {type(state)}.")
  it.set_state(dict(state))
  return it
