"""Run logging: ``metrics.jsonl`` + TensorBoard event files (process 0 only)."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np


def to_python(metrics: Mapping[str, Any]) -> dict[str, float]:
  """Device scalars -> Python floats (NaN/inf kept as floats)."""
  out = {}
  for k, v in metrics.items():
    v = np.asarray(jax.device_get(v))
    out[k] = v.item() if v.size == 1 else v.tolist()
  return out


class MetricWriter:
  """Appends one JSON object per logged step to ``metrics.jsonl`` and mirrors
  scalars to TensorBoard (tensorboardX). No-op on processes other than 0."""

  def __init__(self, workdir: str, *, tensorboard: bool = True):
    self.active = jax.process_index() == 0
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    if self.active:
      os.makedirs(workdir, exist_ok=True)
      if tensorboard:
        from tensorboardX import SummaryWriter

        # events are flushed every 10 s and at close (metrics.jsonl is written per step)
        self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"), flush_secs=10)

  def truncate_after(self, step: int):
    """Drops records with ``step > step`` (a resumed run rewrites them)."""
    if not self.active or not os.path.exists(self.path):
      return
    keep = []
    with open(self.path) as f:
      for line in f:
        try:
          record = json.loads(line)
        except json.JSONDecodeError:  # a line torn by a kill mid-write
          continue
        if record["step"] <= step:
          keep.append(line)
    tmp = self.path + ".tmp"
    with open(tmp, "w") as f:
      f.writelines(keep)
    os.replace(tmp, self.path)

  def write(self, step: int, metrics: Mapping[str, Any]):
    if not self.active:
      return
    record = {"step": int(step), **to_python(metrics)}
    with open(self.path, "a") as f:
      f.write(json.dumps(record, allow_nan=True) + "\n")
    if self._tb is not None:  # one event with every scalar (add_scalar per key: ~10x dearer)
      from tensorboardX.proto.summary_pb2 import Summary

      values = [
        Summary.Value(tag=k, simple_value=v)
        for k, v in record.items()
        if k != "step" and isinstance(v, (int, float)) and math.isfinite(v)
      ]
      self._tb._get_file_writer().add_summary(Summary(value=values), int(step))

  def close(self):
    if self._tb is not None:
      self._tb.close()


def read_metrics(workdir_or_file: str) -> list[dict[str, Any]]:
  """Reads ``metrics.jsonl`` (a workdir or the file itself)."""
  path = workdir_or_file
  if os.path.isdir(path):
    path = os.path.join(path, "metrics.jsonl")
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]
