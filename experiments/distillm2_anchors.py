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
``--config.loss.adaptive_alpha=True``, to the training run. The official
trainer takes them from its first logging window; this reads the models the
run starts from (with a cold start: measure on the cold-started student).
"""

from __future__ import annotations

import itertools
import json
import os

import jax
from absl import app, flags
from flax import nnx
from ml_collections import config_flags

from opd_jax import configs_lib, opd_step, train


def measure(config, workdir: str, num_batches: int = 1, seed: int = 0) -> dict[str, float]:
  """{"anchor_teacher", "anchor_student"} of ``config``'s initial models over
  its first ``num_batches`` batches (ValueError when a role has no rows, e.g.
  λ = 1, or for a multi-teacher run)."""
  if config.loss.name != "distillm2":
    raise ValueError(f"config.loss.name={config.loss.name!r}: anchors are distillm2's")
  if num_batches < 1:
    raise ValueError(f"num_batches must be >= 1, got {num_batches}")
  config = train.resolve_config(config, os.path.abspath(workdir))
  # The step config must validate before the anchors exist.
  config = configs_lib.updated(config, {"loss.adaptive_alpha": False})
  run = train.build_run(config, compile_phases=False)
  if isinstance(run.teacher_graphdef, tuple):
    raise ValueError("distillm2 anchors: multi-teacher runs are not supported")
  phase, s = run.phases["opd"], run.settings
  batches = []
  for local in itertools.islice(phase.it, num_batches):
    local = train.trim_prompts(local, train.prompt_width(local, s.prompt_buckets))
    batches.append(train.global_batch(local, run.sharder, s.batch_size))
  anchors = opd_step.distillm2_anchors(
    run.student(run.state),
    nnx.merge(run.teacher_graphdef, phase.teacher),
    batches,
    jax.random.key(seed),
    phase.cfg,
    vocab_size=run.vocab,
    sharder=run.sharder,
  )
  missing = [k for k, v in anchors.items() if v is None]
  if missing:
    raise ValueError(f"distillm2 anchors: no rows for {missing} (needs 0 < on_policy_fraction < 1)")
  return anchors


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
