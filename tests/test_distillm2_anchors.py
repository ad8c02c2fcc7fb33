"""experiments/distillm2_anchors.py on the tiny driver assets: the anchors of a
run's initial models, then a run with adaptive α that validates and steps."""

from __future__ import annotations

import importlib.util
import json
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


@pytest.mark.slow
def test_unset_anchors_are_measured_at_start_up_and_kept_on_resume(
  assets,  # noqa: F811
  tmp_path,
  monkeypatch,
):
  """A run with adaptive α and the anchors unset measures them on its first
  logging window (``log_every`` batches), saves them in the resolved config,
  and a resumed run reads them back instead of measuring again; measured
  anchors that are not > 0 and a cold start without anchors are start-up
  errors naming the settings."""
  calls = []
  real = train.measure_distillm2_anchors

  def measure(config, num_batches=1, seed=0):
    calls.append(num_batches)
    got = real(config, num_batches, seed)
    # Random tiny models may invert a gap; the run needs Δ0 > 0.
    return {k: abs(v) for k, v in got.items()}

  monkeypatch.setattr(train, "measure_distillm2_anchors", measure)
  c = _config(assets, total_steps=2, log_every=2)
  c.loss.adaptive_alpha = True
  workdir = str(tmp_path / "run")
  first = train.train(c, workdir)
  assert first["status"] == "finished" and calls == [2]
  with open(os.path.join(workdir, "config.json")) as f:
    saved = json.load(f)["loss"]
  assert saved["anchor_teacher"] > 0 and saved["anchor_student"] > 0
  c3 = _config(assets, total_steps=3, log_every=2)
  c3.loss.adaptive_alpha = True
  assert train.train(c3, workdir)["step"] == 3 and calls == [2]  # resumed: not measured again
  with open(os.path.join(workdir, "config.json")) as f:
    again = json.load(f)["loss"]
  assert (again["anchor_teacher"], again["anchor_student"]) == (
    saved["anchor_teacher"],
    saved["anchor_student"],
  )
  monkeypatch.setattr(
    train,
    "measure_distillm2_anchors",
    lambda *a, **k: dict(anchor_teacher=-0.1, anchor_student=0.2),
  )
  with pytest.raises(ValueError, match="anchor_teacher.*not > 0"):
    train.resolve_config(c, str(tmp_path / "neg"))
  c.cold_start.steps = 2
  with pytest.raises(ValueError, match="anchor_teacher / anchor_student unset with a cold start"):
    train.resolve_config(c, str(tmp_path / "cold"))
