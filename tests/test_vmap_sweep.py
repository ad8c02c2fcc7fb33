"""Vmapped sweeps (``opd_jax.vmap_sweep``): K students in one compiled
program with one teacher; every point equals the same point run alone, each
writes its own workdir and the sweep resumes exactly."""

from __future__ import annotations

import os

import numpy as np
import pytest
from driver_utils import (  # noqa: F401  (fixtures)
  assert_same_metrics,
  assets,
  checkpoint_steps,
  step_records,
  tiny_config,
)

# Three points: lr, JSD β, λ and the seed vary (λ < 1: dataset off-policy rows
# need completions, so the teacher samples them).
POINTS = {
  "a": {"optimizer.lr": 1e-3, "loss.beta": 0.5, "seed": 0, "on_policy_fraction": 1.0},
  "b": {"optimizer.lr": 3e-3, "loss.beta": 0.5, "seed": 0, "on_policy_fraction": 1.0},
  "c": {"optimizer.lr": 1e-3, "loss.beta": 0.9, "seed": 1, "on_policy_fraction": 0.5},
}


def _configs(assets, total_steps=2, **extra):
  from opd_jax import configs_lib

  out = {}
  for name, values in POINTS.items():
    c = tiny_config(assets, total_steps=total_steps, checkpoint_every=1, **extra)
    c.loss = configs_lib.loss_config("jsd", chunk=4, beta=0.5)
    c.off_policy_source = "teacher"
    out[name] = configs_lib.updated(c, values)
  return out


def test_points_that_cannot_share_a_program_are_rejected(assets):
  from opd_jax import configs_lib
  from opd_jax.vmap_sweep import plan_sweep

  cs = _configs(assets)
  plan = plan_sweep(list(cs.values()), list(cs))
  assert plan.targets == ("loss.beta", "on_policy_fraction")
  assert plan.values["optimizer.lr"] == (1e-3, 3e-3, 1e-3) and plan.values["seed"] == (0, 0, 1)
  for key, value in (("batch_size", 8), ("loss.name", "reverse_kl"), ("student.path", "/x")):
    bad = dict(cs, b=configs_lib.updated(cs["b"], {key: value}))
    with pytest.raises(ValueError, match=rf"vmapped sweep: {key} differs between the points"):
      plan_sweep(list(bad.values()), list(bad))
  sched = {
    k: configs_lib.updated(c, {"schedules": "loss.beta=linear:0.1:0.9:0:4"}) for k, c in cs.items()
  }
  with pytest.raises(ValueError, match="both follow config.schedules and vary by point"):
    plan_sweep(list(sched.values()), list(sched))


@pytest.mark.slow
def test_vmapped_points_equal_single_runs_and_resume(assets, tmp_path):
  from opd_jax import checkpointing
  from opd_jax.train import build_run, train
  from opd_jax.vmap_sweep import plan_sweep, shared_config, train_vmapped

  cs = _configs(assets, total_steps=3)
  vdirs = [str(tmp_path / "vmap" / n) for n in cs]
  # 2 steps, then resumed to 3 (a new total; the checkpoints of step 2 are read back).
  two = [c.copy_and_resolve_references() for c in _configs(assets, total_steps=2).values()]
  first = train_vmapped(two, vdirs)
  assert [r["step"] for r in first] == [2, 2, 2]
  res = train_vmapped(list(cs.values()), vdirs)
  assert [r["status"] for r in res] == ["finished"] * 3 and res[0]["trace_count"] == 1
  assert first[0]["compile_count"] == res[0]["compile_count"] == 1  # fresh and restored
  np.testing.assert_allclose([r["lr"] for r in res], [1e-3, 3e-3, 1e-3], rtol=1e-6)
  plan = plan_sweep(list(cs.values()), list(cs))
  for name, c in cs.items():
    alone = str(tmp_path / "alone" / name)
    # Point c's λ = 0.5 varies, so the sweep reads λ as a traced value: the
    # run alone with λ as a constant schedule (the scheduled-λ path samples
    # every row with both policies and masks: other draws than a static λ).
    # a and b (λ = 1, β traced at its static value) equal the plain runs.
    train(shared_config(c, plan, 2) if name == "c" else c, alone)
    got, want = step_records(str(tmp_path / "vmap" / name)), step_records(alone)
    assert sorted(got) == sorted(want) == [1, 2, 3]
    assert_same_metrics(
      got, want, [1, 2, 3], keys=["num_tokens", "mean_response_length", "on_policy_frac"]
    )
    assert_same_metrics(got, want, [1, 2, 3], keys=["loss", "grad_norm", "lr"], rtol=1e-4)
    assert checkpoint_steps(str(tmp_path / "vmap" / name)) == checkpoint_steps(alone)
    # The parameters after step 3, from each run's own checkpoints.
    abstract = checkpointing.abstract_like(build_run(c, compile_phases=False).state)
    params = []
    for d in (str(tmp_path / "vmap" / name), alone):
      ck = checkpointing.Checkpointer(os.path.join(d, "checkpoints"), save_every=1)
      params.append(ck.restore(abstract, 3)[0].params)
      ck.close()
    import jax

    for x, y in zip(*(jax.tree.leaves(p) for p in params)):
      # (Adam divides by sqrt(v): float-rounding differences of tiny gradients grow)
      np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-3, atol=2e-5)
