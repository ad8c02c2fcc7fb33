"""Test set-up: 8 simulated CPU devices for mesh tests, float32 matmuls."""

import os

os.environ.setdefault("XLA_FLAGS", "")
import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_default_matmul_precision", "highest")

import pytest  # noqa: E402


def pytest_configure(config):
  config.addinivalue_line("markers", "slow: slower end-to-end tests (still run in CI)")
