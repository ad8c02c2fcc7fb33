"""``MetricWriter``: metrics.jsonl lines and the TensorBoard events that
mirror them (read back from the event file's TFRecord framing)."""

from __future__ import annotations

import math
import os
import struct

from opd_jax.logging_utils import MetricWriter, read_metrics


def _events(tb_dir: str):
  """Every ``Event`` proto in the directory's event files."""
  from tensorboardX.proto.event_pb2 import Event

  out = []
  for name in sorted(os.listdir(tb_dir)):
    with open(os.path.join(tb_dir, name), "rb") as f:
      data = f.read()
    i = 0
    while i < len(data):  # [u64 length][u32 crc][data][u32 crc]
      (n,) = struct.unpack("<Q", data[i : i + 8])
      out.append(Event.FromString(data[i + 12 : i + 12 + n]))
      i += 12 + n + 4
  return out


def test_metric_writer_jsonl_and_tensorboard(tmp_path):
  w = MetricWriter(str(tmp_path))
  w.write(1, {"loss": 0.5, "grad_norm": 2.0, "bad": float("nan")})
  w.write(2, {"loss": 0.25, "eval/hard/accuracy": 0.75})
  w.close()
  recs = read_metrics(str(tmp_path))
  assert [r["step"] for r in recs] == [1, 2]
  assert recs[0]["loss"] == 0.5 and math.isnan(recs[0]["bad"])
  scalars = {}
  for e in _events(str(tmp_path / "tensorboard")):
    for v in e.summary.value:
      scalars[(e.step, v.tag)] = v.simple_value
  # every finite scalar of every step, nothing else (NaN is not mirrored)
  assert scalars == {
    (1, "loss"): 0.5,
    (1, "grad_norm"): 2.0,
    (2, "loss"): 0.25,
    (2, "eval/hard/accuracy"): 0.75,
  }
