"""Test set-up: 8 simulated CPU devices for mesh tests (on a thread pool their
collectives cannot starve: ``sharding.simulate_cpu_devices``), float32 matmuls.

Compilation dominates this suite's run time on a 2-core CPU, so tests run with
XLA's backend optimisation level 0 (same numerics, roughly half the compile
time) and a persistent compilation cache shared with the subprocesses the
end-to-end tests start. Set XLA_FLAGS yourself to override.
"""

import os
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0")
os.environ.setdefault(
  "JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "opd_jax_test_jax_cache")
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "2")

import jax  # noqa: E402

from opd_jax import sharding  # noqa: E402

sharding.simulate_cpu_devices(8)
jax.config.update("jax_default_matmul_precision", "highest")

import pytest  # noqa: E402

# Parity tests against transformers' PyTorch models (marked `torch`). The test
# extra installs a CPU torch; where none exists (CI's Python 3.12 leg) .ci/run
# sets OPD_SKIP_TORCH_TESTS=1 and deselects them with -m "not torch", out loud.
TORCH_MODULES = ("test_hf_io.py",)
TORCH_TESTS = (
  "test_greedy_matches_hf_generate",
  "test_process_logits_matches_hf_warpers",
  "test_bench_sampler_runs",
)
collect_ignore = list(TORCH_MODULES) if os.environ.get("OPD_SKIP_TORCH_TESTS") == "1" else []


def pytest_collection_modifyitems(config, items):
  for item in items:
    if item.path.name in TORCH_MODULES or item.originalname in TORCH_TESTS:
      item.add_marker(pytest.mark.torch)


def pytest_configure(config):
  config.addinivalue_line("markers", "slow: slower end-to-end tests (still run in CI)")
  config.addinivalue_line(
    "markers",
    "torch: parity tests against transformers' PyTorch models (need the test extra's CPU torch)",
  )
