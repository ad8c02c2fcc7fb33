"""The ahead-of-time check (``python -m opd_jax.aot``) and the FLOP model
(``opd_jax.flops``)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from opd_jax import flops as flops_lib
from opd_jax.models import ModelConfig, create_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAPER = (
  "configs/paper_qwen3.py:student=configs/model_configs/qwen3-1.7b,"
  "teacher=configs/model_configs/qwen3-4b,fsdp=8,tensor=1"
)
# The paper config's own 8 micro-batches: 16 prompts x 4 samples = 8 groups of 8 rows.
SMALL = [
  "--config.batch_size=16",
  "--config.sampling.num_samples=4",
  "--config.sampling.max_new_tokens=16",
  "--config.data.max_prompt_len=16",
]
REPORT_KEYS = {
  "argument_bytes",
  "output_bytes",
  "temp_bytes",
  "alias_bytes",
  "total_bytes",
  "compile_s",
  "flops_per_step",
  "flops_per_device",
  "devices",
  "mesh",
  "rows",
  "prompt_len",
  "new_tokens",
  "micro_batches",
  "student_layers",
  "teacher_layers",
}


def _aot(*extra: str) -> subprocess.CompletedProcess:
  cmd = [
    sys.executable,
    "-m",
    "opd_jax.aot",
    f"--config={PAPER}",
    "--devices=8",
    "--num_layers=1",
    *SMALL,
    *extra,
  ]
  return subprocess.run(
    cmd,
    cwd=ROOT,
    env={**os.environ, "PYTHONPATH": ROOT},
    capture_output=True,
    text=True,
    timeout=600,
  )


@pytest.mark.slow
def test_aot_paper_config_reduced_depth():
  """Qwen3-1.7B <- Qwen3-4B config.json files at 1 layer on 8 CPU devices:
  one JSON line; a tiny budget fails with the message, the same numbers."""
  proc = _aot()
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  (line,) = [l for l in proc.stdout.splitlines() if l.startswith("{")]
  rep = json.loads(line)
  assert REPORT_KEYS <= set(rep), sorted(REPORT_KEYS - set(rep))
  assert rep["total_bytes"] == (
    rep["argument_bytes"] + rep["temp_bytes"] + rep["output_bytes"] - rep["alias_bytes"]
  )
  assert rep["devices"] == 8 and rep["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
  assert (rep["rows"], rep["prompt_len"], rep["new_tokens"]) == (64, 16, 16)
  assert (rep["student_layers"], rep["teacher_layers"], rep["micro_batches"]) == (1, 1, 8)
  # fp32 master weights of 1.7B's embeddings alone (151,936 x 2048) sharded 8 ways.
  assert rep["argument_bytes"] > 151936 * 2048 * 4 / 8
  assert (
    rep["flops_per_step"]
    == (rep["flops_sampling"] + rep["flops_teacher"] + rep["flops_student_fwd_bwd"])
    > 0
  )

  over = _aot("--budget_gib=0.001")
  assert over.returncode == 1, over.stdout[-3000:] + over.stderr[-3000:]
  assert "over budget" in over.stderr and "--budget_gib=0.001" in over.stderr
  (line,) = [l for l in over.stdout.splitlines() if l.startswith("{")]
  assert json.loads(line)["total_bytes"] == rep["total_bytes"]


def test_over_budget_message():
  from opd_jax.aot import GIB, over_budget

  rep = dict(
    argument_bytes=GIB, temp_bytes=2 * GIB, output_bytes=GIB, alias_bytes=GIB, total_bytes=3 * GIB
  )
  assert over_budget(rep, 3.0) is None and over_budget(rep, 0.0) is None
  msg = over_budget(rep, 2.5)
  assert "total 3.000 GiB" in msg and "--budget_gib=2.5" in msg


def _tiny(layers=2, hidden=128, heads=4, kv_heads=2, head_dim=32, mlp=384, vocab=512):
  return ModelConfig(
    model_type="qwen3",
    vocab_size=vocab,
    hidden_size=hidden,
    intermediate_size=mlp,
    num_layers=layers,
    num_heads=heads,
    num_kv_heads=kv_heads,
    head_dim=head_dim,
    qk_norm=True,
    max_position_embeddings=512,
  )


def _xla_flops(fn, *args) -> float:
  ca = jax.jit(fn).lower(*args).compile().cost_analysis()
  ca = ca[0] if isinstance(ca, (list, tuple)) else ca
  return float(ca["flops"])


def test_flop_model_matches_xla_cost_analysis():
  """Teacher pass (forward + head over R·T / R·N tokens) and student
  forward+backward: the analytic count is the matmuls; XLA's adds the
  elementwise work (norms, softmax, activations), a few percent here."""
  cfg = _tiny()
  model = create_model(cfg, seed=0)
  graphdef, params = nnx.split(model)
  r, p, n = 4, 48, 16
  t = p + n
  ids = jnp.ones((r, t), jnp.int32)

  def forward(params):
    m = nnx.merge(graphdef, params)
    h, _ = m.hidden(ids)
    return jnp.einsum("bnd,dv->bnv", h[:, p - 1 : p - 1 + n], m.unembedding())

  def loss(params):
    return forward(params).astype(jnp.float32).sum()

  fwd = flops_lib.forward_flops(cfg, r * t, t) + flops_lib.head_flops(cfg, r * n, cfg.vocab_size)
  full = flops_lib.opd_step_flops(cfg, cfg, r, p, n, cfg.vocab_size)
  assert full["teacher"] == fwd and full["student_fwd_bwd"] == 3 * fwd
  xla_fwd = _xla_flops(forward, params)
  xla_grad = _xla_flops(jax.grad(loss), params)
  assert 0.95 * xla_fwd < fwd <= xla_fwd, (fwd, xla_fwd)  # 0.986 here
  assert 0.95 * xla_grad < 3 * fwd <= 1.02 * xla_grad, (3 * fwd, xla_grad)  # 0.996


def test_flop_model_terms():
  """Hand-evaluated formula, the λ split and the step_flops wrapper."""
  from opd_jax.opd_step import OPDConfig
  from opd_jax.sampling import SamplingConfig

  c = _tiny(layers=1, hidden=8, heads=2, kv_heads=1, head_dim=4, mlp=16, vocab=32)
  m = 8 * (2 + 2) * 4 + 2 * 4 * 8 + 3 * 8 * 16  # 576 weights per token
  assert flops_lib.forward_flops(c, 3, 10) == 2 * 1 * (m + 2 * 2 * 4 * 10) * 3
  assert flops_lib.head_flops(c, 5, 32) == 2 * 8 * 32 * 5
  r, p, n, v = 4, 6, 5, 32
  all_on = flops_lib.opd_step_flops(c, c, r, p, n, v)
  assert all_on["sampling"] == (
    flops_lib.forward_flops(c, r * p, p + n)
    + flops_lib.forward_flops(c, r * (n - 1), p + n)
    + flops_lib.head_flops(c, r * n, v)
  )
  half = flops_lib.opd_step_flops(c, c, r, p, n, v, on_policy_rows=2, teacher_sampled_rows=2)
  assert half["sampling"] == all_on["sampling"]  # same model sizes: same count
  dataset = flops_lib.opd_step_flops(c, None, r, p, n, v, on_policy_rows=0)
  assert dataset["sampling"] == dataset["teacher"] == 0
  assert dataset["total"] == all_on["student_fwd_bwd"]
  cfg = OPDConfig(
    sampling=SamplingConfig(max_new_tokens=n, num_samples=2),
    on_policy_fraction=0.5,
    off_policy_source="teacher",
  )
  got = flops_lib.step_flops(cfg, c, c, batch_size=2, prompt_len=p, vocab=v)
  assert got == flops_lib.opd_step_flops(c, c, 4, p, n, v, on_policy_rows=2, teacher_sampled_rows=2)
  # DistiLLM-2's adaptive α: one more forward head pass of each model.
  kw = {"adaptive_alpha": True, "anchor_teacher": 0.1, "anchor_student": 0.1}
  dm2 = flops_lib.step_flops(
    dataclasses.replace(cfg, loss="distillm2", loss_kwargs=kw),
    c,
    c,
    batch_size=2,
    prompt_len=p,
    vocab=v,
  )
  assert dm2["total"] == got["total"] + 2 * flops_lib.head_flops(c, 4 * n, v)


def test_peak_flops_table():
  assert flops_lib.peak_flops_per_device("TPU v5 lite") == 197e12
  assert flops_lib.peak_flops_per_device("TPU v5p") == 459e12
  assert flops_lib.peak_flops_per_device("TPU v4") == 275e12
  assert flops_lib.peak_flops_per_device("TPU v6 lite") == 918e12
  assert flops_lib.peak_flops_per_device("NVIDIA H100 80GB HBM3") == 989e12
  assert flops_lib.peak_flops_per_device("NVIDIA H100 PCIe") == 756e12
  assert flops_lib.peak_flops_per_device("NVIDIA A100-SXM4-80GB") == 312e12
  assert flops_lib.peak_flops_per_device("cpu") is None
