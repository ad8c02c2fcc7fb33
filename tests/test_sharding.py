"""The simulated CPU mesh's thread pool (``sharding.simulate_cpu_devices``)."""

import os
import subprocess
import sys
import textwrap

import jax
import pytest

from opd_jax import sharding

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.skipif(
  not os.path.isdir("/proc/self/task"), reason="counts threads in /proc (Linux)"
)


def _pool_threads() -> int:
  """Threads of XLA:CPU's shared pool in this process (named tf_XLAEigen)."""
  names = []
  for tid in os.listdir("/proc/self/task"):
    try:
      with open(f"/proc/self/task/{tid}/comm") as f:
        names.append(f.read().strip())
    except FileNotFoundError:  # the thread ended meanwhile
      pass
  return sum(n.startswith("tf_XLAEigen") for n in names)


def test_suite_pool_has_room_for_concurrent_collectives():
  """conftest's 8 devices run on 4 threads each: with one thread a device
  (XLA's default here), a device running two collectives at once left the
  last device without a thread and XLA aborted the process
  (test_multi_teacher_micro_batches_and_sharded_match, 2 of 8 runs; 0 of 26
  with 32 threads)."""
  assert jax.device_count() == 8
  assert _pool_threads() >= sharding.CPU_THREADS_PER_DEVICE * 8


@pytest.mark.parametrize("preset, want", [(None, max(4 * 3, os.cpu_count() or 1)), ("20", 20)])
def test_simulate_cpu_devices_sizes_the_pool(preset, want):
  """A fresh process: ``simulate_cpu_devices(3)`` gives 3 devices on
  max(4 * 3, CPUs) threads, and keeps a PJRT_NPROC the user set."""
  code = textwrap.dedent(
    """
    import jax, jax.numpy as jnp
    from opd_jax import sharding
    sharding.simulate_cpu_devices(3)
    jax.jit(lambda x: x + 1)(jnp.ones(3)).block_until_ready()
    import tests.test_sharding as t
    print(jax.device_count(), t._pool_threads())
    """
  )
  env = {k: v for k, v in os.environ.items() if k != "PJRT_NPROC"}
  env.update(JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  if preset:
    env["PJRT_NPROC"] = preset
  out = subprocess.run(
    [sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, check=True
  )
  devices, threads = map(int, out.stdout.split()[-2:])
  assert devices == 3
  assert threads == want
