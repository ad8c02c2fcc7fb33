"""Multi-process training: 2 CPU processes x 1 device on loopback (gloo
collectives) against 1 process x 2 devices with the same global batch.

The single-process side is the session's reference run (``driver_utils``);
the two processes run its first 3 steps with ``jax.distributed`` set up from
``--config.distributed.*``. Every subprocess has a hard timeout, so a hung
collective fails the test instead of hanging it.
"""

from __future__ import annotations

import json
import os
import time

import pytest
from driver_utils import (  # noqa: F401  (fixtures)
  PROC_TIMEOUT_S,
  REQUIRED_STEP_KEYS,
  Proc,
  assert_same_metrics,
  assets,
  checkpoint_steps,
  free_port,
  last_json_line,
  read_metrics,
  reference_run,
  start_driver,
  step_records,
)

pytestmark = pytest.mark.slow

STEPS = 3
RTOL = 1e-5


def _wait_all(procs: list[Proc]) -> list[tuple[int, str]]:
  """Waits for every process; one failing kills the others (a peer stuck in
  a collective would otherwise wait for the timeout)."""
  deadline = time.time() + PROC_TIMEOUT_S
  while time.time() < deadline:
    codes = [p.poll() for p in procs]
    if all(c is not None for c in codes):
      break
    if any(c not in (None, 0) for c in codes):
      for p in procs:
        p.kill()
      break
    time.sleep(0.1)
  else:
    for p in procs:
      p.kill()
  return [p.wait() for p in procs]


@pytest.fixture(scope="module")
def two_process_run(reference_run, tmp_path_factory):
  root = str(tmp_path_factory.mktemp("multihost"))
  workdir = os.path.join(root, "run")
  address = f"127.0.0.1:{free_port()}"
  procs = [
    start_driver(
      reference_run.config_file,
      workdir,
      *reference_run.flags,
      f"--config.total_steps={STEPS}",
      "--config.distributed.num_processes=2",
      f"--config.distributed.process_id={i}",
      f"--config.distributed.coordinator_address={address}",
      num_devices=1,
      log=os.path.join(root, f"process_{i}.log"),
    )
    for i in range(2)
  ]
  results = _wait_all(procs)
  for i, (rc, out) in enumerate(results):
    assert rc == 0, f"process {i} exited {rc}:\n{out[-6000:]}"
  return workdir, results


def test_two_processes_match_one_process(two_process_run, reference_run):
  workdir, results = two_process_run
  # Only process 0 prints the result and writes metrics (each step once).
  assert last_json_line(results[0][1])["step"] == STEPS
  assert not any(l.startswith('{"step"') for l in results[1][1].splitlines())
  records = read_metrics(workdir)
  assert [r["step"] for r in records] == list(range(STEPS + 1))
  assert records[0]["data/num_malformed_skipped"] == 1
  got = step_records(workdir)
  for r in got.values():
    assert all(k in r for k in REQUIRED_STEP_KEYS), r
  # Checkpoints written collectively (every 2 steps and at the end).
  assert checkpoint_steps(workdir) == [2, STEPS]
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["distributed"]["num_processes"] == 2
  # Same numbers as 1 process x 2 devices on the same global batch.
  ref = reference_run.records()
  assert_same_metrics(
    got,
    ref,
    range(1, STEPS + 1),
    keys=["loss", "grad_norm", "num_tokens", "mean_response_length"],
    rtol=RTOL,
  )
