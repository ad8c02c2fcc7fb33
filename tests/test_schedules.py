"""Scheduled settings: each schedule shape against its formula, parsing and
start-up errors, and the traced values inside the compiled OPD step."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from opd_jax import opd_step, schedules
from opd_jax.sampling import SamplingConfig

STEPS = np.arange(0, 14)


def _np_value(kind, t):
  """Independent float64 formulas of the docstring's schedule forms."""
  if kind == "linear":  # 1.0 -> 1.5 over steps [2, 10]
    return 1.0 + 0.5 * min(max((t - 2) / 8, 0.0), 1.0)
  if kind == "cosine":  # 0.4 -> 0.1 over steps [3, 7]
    f = min(max((t - 3) / 4, 0.0), 1.0)
    return 0.1 + 0.3 * 0.5 * (1 + math.cos(math.pi * f))
  if kind == "step":  # 0.5 until 4, 0.2 from 4, 0.9 from 9
    return 0.5 if t < 4 else (0.2 if t < 9 else 0.9)
  return 0.25


SPECS = {
  "linear": "linear:1.0:1.5:2:10",
  "cosine": "cosine:0.4:0.1:3:7",
  "step": "step:0.5:4:0.2:9:0.9",
  "constant": "constant:0.25",
}


@pytest.mark.parametrize("kind", sorted(SPECS))
def test_schedule_shapes_match_formulas(kind):
  sched = schedules.parse(SPECS[kind])
  want = np.array([_np_value(kind, int(t)) for t in STEPS])
  host = np.array([float(schedules.value(sched, int(t))) for t in STEPS])
  traced = np.asarray(
    jax.jit(jax.vmap(lambda t: schedules.value(sched, t)))(jnp.asarray(STEPS, jnp.int32))
  )
  np.testing.assert_allclose(host, want, rtol=1e-6, atol=1e-7)
  np.testing.assert_array_equal(traced, host)  # the step and the host agree bit for bit
  assert traced.dtype == np.float32
  # The host-side form (data mixture weights), numpy float32 arithmetic.
  np.testing.assert_allclose(
    [schedules.host_value(sched, int(t)) for t in STEPS], host, rtol=1e-6, atol=1e-7
  )


def test_parse_all_and_errors():
  got = schedules.parse_all(" loss.beta=linear:1:1.5:0:10 ; loss.alpha=constant:0.2;")
  assert [t for t, _ in got] == ["loss.alpha", "loss.beta"]
  assert got[1][1] == schedules.Schedule("linear", (1.0, 1.5), (0, 10))
  assert schedules.parse_all("") == ()
  for bad, match in [
    ("loss.beta", "target=spec"),
    ("x=warp:1", "unknown schedule kind"),
    ("x=linear:1:2:5", "value"),
    ("x=linear:1:2:5:5", "increasing"),
    ("x=step:1:3:2:2:3", "increasing"),
    ("x=linear:a:2:0:1", "numbers"),
    ("x=linear:1:2:0.5:3", "integers"),
    ("x=constant:1;x=constant:2", "twice"),
  ]:
    with pytest.raises(ValueError, match=match):
      schedules.parse_all(bad)


def _cfg(loss, kwargs=None, sched=""):
  return opd_step.OPDConfig(
    sampling=SamplingConfig(max_new_tokens=2), loss=loss, loss_kwargs=kwargs or {}, schedules=sched
  )


def test_schedule_targets_checked_at_start_up():
  assert _cfg("distillm2", sched="loss.beta=linear:1:1.5:0:10").schedules[0][0] == "loss.beta"
  _cfg("skew_kl", sched="loss.alpha=cosine:0.1:0.3:0:5")
  _cfg("todi", sched="loss.beta=step:1:3:2")
  _cfg("reverse_kl", sched="loss.student_temperature=linear:1:0.8:0:5")
  cfg = _cfg(
    "reverse_kl",
    sched="on_policy_fraction=linear:0:1:0:5;"
    "sampling.temperature=cosine:1.2:0.8:0:5;teacher_sampling.temperature=constant:1",
  )
  assert opd_step.lambda_scheduled(cfg) and not opd_step.lambda_scheduled(_cfg("reverse_kl"))
  cases = [
    (("reverse_kl", None, "data.mixture.easy=linear:0:1:0:5"), "unknown target"),
    (("reverse_kl", None, "sampling.top_p=constant:0.9"), "unknown target"),
    (("reverse_kl", None, "on_policy_fraction=linear:0:1.5:0:5"), r"\[0, 1\]"),
    (("reverse_kl", None, "sampling.temperature=constant:0"), "values > 0"),
    (("jsd", None, "loss.alpha=constant:0.1"), "no keyword 'alpha'"),
    (("distillm2", None, "loss.on_policy=constant:1"), "no keyword"),
    (("k1", None, "loss.mode=constant:1"), "not numeric"),
    (("topk_opd", None, "loss.k=step:4:10:8"), "static values"),
  ]
  for (loss, kw, sched), match in cases:
    with pytest.raises(ValueError, match=match):
      _cfg(loss, kw, sched)
