"""train.tune_malloc, train.use_cpu_sync_dispatch: the driver's host tuning at start-up."""

import platform

import pytest

from opd_jax import train


def test_tune_malloc_sets_every_knob_on_glibc():
  if platform.libc_ver()[0] != "glibc":
    pytest.skip("mallopt is glibc's")
  assert train.tune_malloc() is True
  assert [p for p, _ in train._MALLOPT] == [-1, -2, -3]  # trim, top pad, mmap threshold


def _fresh(code: str, **env: str) -> str:
  """The last stdout line of ``code`` in a fresh CPU process."""
  import os
  import subprocess
  import sys

  full = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES")}
  full.update(JAX_PLATFORMS="cpu", **env)
  out = subprocess.run(
    [sys.executable, "-c", code], env=full, capture_output=True, text=True, check=True
  )
  return out.stdout.strip().splitlines()[-1]


SYNC = (
  "import jax; from opd_jax import train; took = train.use_cpu_sync_dispatch(); "
  "print(took, jax.config.values['jax_cpu_enable_async_dispatch'])"
)


def test_cpu_sync_dispatch_on_one_device_before_the_backends_start():
  if platform.libc_ver()[0] != "glibc":
    pytest.skip("mallopt is glibc's")
  assert _fresh(SYNC) == "True False"


def test_cpu_sync_dispatch_is_a_no_op_with_several_devices_or_started_backends():
  assert _fresh(SYNC, JAX_NUM_CPU_DEVICES="2") == "False True"
  assert _fresh(SYNC, XLA_FLAGS="--xla_force_host_platform_device_count=4") == "False True"
  started = "import jax; jax.devices(); " + SYNC.removeprefix("import jax; ")
  assert _fresh(started) == "False True"
