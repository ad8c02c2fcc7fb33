"""experiments/distillm2_anchors.py on the tiny driver assets: the anchors of a
run's initial models, then a run with adaptive α that validates and steps."""

from __future__ import annotations

import importlib.util
import math
import os

import jax
import numpy as np
import pytest
from driver_utils import REPO, assets, tiny_config  # noqa: F401  (fixtures)
from flax import nnx

from opd_jax import configs_lib, opd_step, train


def _script():
  path = os.path.join(REPO, "experiments", "distillm2_anchors.py")
  spec = importlib.util.spec_from_file_location("distillm2_anchors", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def _config(assets, **kw):
  c = tiny_config(assets, on_policy_fraction=0.5, off_policy_source="teacher", **kw)
  c.loss = configs_lib.loss_config("distillm2", chunk=4, alpha_teacher=0.3, alpha_student=0.3)
  return c


@pytest.mark.slow
def test_anchors_of_the_initial_models_then_an_adaptive_run(assets, tmp_path):  # noqa: F811
  measure = _script().measure
  anchors = measure(_config(assets), str(tmp_path / "a"), num_batches=2)
  assert set(anchors) == {"anchor_teacher", "anchor_student"}
  assert all(math.isfinite(v) for v in anchors.values()), anchors
  # The same numbers as distillm2_anchors on the run's first two batches.
  run = train.build_run(_config(assets), compile_phases=False)
  phase = run.phases["opd"]
  batches = [
    train.global_batch(next(phase.it), run.sharder, run.settings.batch_size) for _ in range(2)
  ]
  want = opd_step.distillm2_anchors(
    run.student(run.state),
    nnx.merge(run.teacher_graphdef, phase.teacher),
    batches,
    jax.random.key(0),
    phase.cfg,
    vocab_size=run.vocab,
  )
  for k in anchors:
    np.testing.assert_allclose(anchors[k], want[k], rtol=1e-5)
  # Plugged in (|Δ0| > 0: random tiny models may invert a gap), a run with
  # adaptive α builds and takes a finite step.
  c = _config(assets)
  c.loss.adaptive_alpha = True
  c.loss.anchor_teacher = abs(anchors["anchor_teacher"])
  c.loss.anchor_student = abs(anchors["anchor_student"])
  run = train.build_run(c)
  phase = run.phases["opd"]
  batch = train.global_batch(next(phase.it), run.sharder, run.settings.batch_size)
  _, m = phase.compiled(run.state, phase.teacher, batch)
  assert np.isfinite(float(m["loss"]))


@pytest.mark.slow
def test_anchors_errors(assets, tmp_path):  # noqa: F811
  measure = _script().measure
  with pytest.raises(ValueError, match="distillm2"):
    measure(tiny_config(assets), str(tmp_path / "b"))
  with pytest.raises(ValueError, match="num_batches"):
    measure(_config(assets), str(tmp_path / "c"), num_batches=0)
  c = _config(assets)
  c.on_policy_fraction = 1.0
  with pytest.raises(ValueError, match="anchor_teacher"):
    measure(c, str(tmp_path / "d"))
  c = _config(assets)
  c.loss.adaptive_alpha = True
  with pytest.raises(ValueError, match="anchor_teacher"):
    train.build_run(c, abstract=True)
