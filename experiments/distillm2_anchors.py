"""Measures DistiLLM-2's adaptive-α anchors on a run's initial models.

  python experiments/distillm2_anchors.py --config=configs/quickstart.py:loss=distillm2,lam=0.5 \
    --config.off_policy_source=teacher --workdir=/tmp/anchors [--batches=4] [--config.X=Y ...]

builds the run of ``--config`` (its preparer's assets included) without
compiling its step, takes its first ``--batches`` step batches, makes their
completions as the step does (student rows and teacher / dataset rows by the
run's λ mix) and prints the two overrides

  --config.loss.anchor_teacher=Δ0_t --config.loss.anchor_student=Δ0_s

(``opd_step.distillm2_anchors``: the mean over teacher-response rows of
exp(mean log q) − exp(mean log p), and over student rows of exp(mean log p)
− exp(mean log q), at the loss's temperatures) to pass, with
``--config.loss.adaptive_alpha=True``, to the training run. A run with
adaptive α and the anchors unset measures them itself at start-up on its
first ``log_every`` batches (the official trainer's first logging window);
this script is for fixing them across runs, or for a cold start (measure on
the cold-started student).
"""

from __future__ import annotations

import json
import os

from absl import app, flags
from ml_collections import config_flags

from opd_jax import configs_lib, train


def measure(config, workdir: str, num_batches: int = 1, seed: int = 0) -> dict[str, float]:
  """{"anchor_teacher", "anchor_student"} of ``config``'s initial models over
  its first ``num_batches`` batches (``train.measure_distillm2_anchors`` on
  the resolved config; ValueError when a role has no rows, e.g. λ = 1, or
  for a multi-teacher run)."""
  if config.loss.name != "distillm2":
    raise ValueError(f"config.loss.name={config.loss.name!r}: anchors are distillm2's")
  config = configs_lib.updated(config, {"loss.adaptive_alpha": False})
  config = train.resolve_config(config, os.path.abspath(workdir))
  return train.measure_distillm2_anchors(config, num_batches, seed)


def main(argv):
  del argv
  f = flags.FLAGS
  anchors = measure(f.config, f.workdir, f.batches, f.seed)
  print(json.dumps(anchors))
  print(" ".join(f"--config.loss.{k}={v:.6g}" for k, v in anchors.items()))


if __name__ == "__main__":
  config_flags.DEFINE_config_file("config", None, "Training config file.")
  flags.DEFINE_string("workdir", None, "Work directory (the preparer's assets).")
  flags.DEFINE_integer("batches", 1, "Step batches to average over.")
  flags.DEFINE_integer("seed", 0, "Sampling key.")
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
