"""Shared helpers and fixtures for the driver tests (``test_train.py``,
``test_multihost.py``).

* :func:`assets` (session fixture): a task tokenizer, a tiny random student
  (1 layer) and teacher (2 layers) in Hugging Face format and prompt files,
  built once per session under pytest's tmp dir.
* :func:`tiny_config`: a ready ``base_config()``-based run config over them;
  :func:`write_config_file` turns it into a ``configs/``-style file for the CLI.
* :class:`Proc` / :func:`start_driver`: ``python -m opd_jax.train`` as a
  background subprocess (own log file, hard timeouts, killed at teardown).
  ``pause_at`` makes the run wait after logging a step until the test says
  go, so that a signal can be delivered at a known step.
* :func:`reference_run` (session fixture): an uninterrupted 6-step run on 2
  CPU devices that the resume and multi-process tests compare against.

Test modules import the fixtures by name (``from driver_utils import assets,
reference_run``; tests/ is on ``sys.path`` under pytest). Driver subprocesses
share a persistent JAX compilation cache, so identical programs compile once.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Any

import pytest

from opd_jax import sharding

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHON = sys.executable

# Generous per-process limit: a hung collective / deadlock fails the test.
PROC_TIMEOUT_S = 300

# Keys every logged training step carries.
REQUIRED_STEP_KEYS = (
  "step",
  "loss",
  "grad_norm",
  "lr",
  "tokens_per_sec",
  "mean_response_length",
  "truncated_frac",
)
# Wall-clock metrics: excluded from equality checks between runs.
TIMING_KEYS = ("step_time_s", "tokens_per_sec", "compile_time_s", "mfu")

# Settings of the reference run (and of every run compared with it).
REF_DEVICES = 2
REF_STEPS = 6

__all__ = [
  "REPO",
  "PYTHON",
  "PROC_TIMEOUT_S",
  "REQUIRED_STEP_KEYS",
  "TIMING_KEYS",
  "REF_DEVICES",
  "REF_STEPS",
  "Proc",
  "assets",
  "build_assets",
  "tiny_config",
  "write_config_file",
  "driver_env",
  "start_driver",
  "free_port",
  "read_metrics",
  "step_records",
  "assert_same_metrics",
  "max_rel_diff",
  "wait_for_step",
  "checkpoint_steps",
  "last_json_line",
  "reference_run",
  "reference_command",
]


# -----------------------------------------------------------------------------
# Assets and configs.


def build_assets(root: str) -> dict[str, str]:
  """Tokenizer, student, teacher and prompt files under ``root``."""
  from opd_jax import organisms

  tok_dir = os.path.join(root, "tokenizer")
  tokenizer = organisms.ensure_tokenizer(tok_dir)
  student = organisms.ensure_random_model(
    os.path.join(root, "student"), organisms.Arch(num_layers=1, hidden_size=32), tokenizer, seed=1
  )
  teacher = organisms.ensure_random_model(
    os.path.join(root, "teacher"), organisms.Arch(num_layers=2, hidden_size=32), tokenizer, seed=2
  )
  prompts = organisms.ensure_task_data(
    os.path.join(root, "prompts.jsonl"), n=64, seed=3, levels=(1, 2)
  )
  with open(prompts) as f:
    lines = f.readlines()
  # The same records with one malformed line (line 3): with on_error=skip it
  # yields exactly the batches of the clean file.
  bad = os.path.join(root, "prompts_malformed.jsonl")
  with open(bad, "w") as f:
    f.writelines(lines[:2] + ['{"prompt": "1+1=", "answer": \n'] + lines[2:])
  return dict(
    root=root,
    tokenizer=tok_dir,
    student=student,
    teacher=teacher,
    prompts=prompts,
    prompts_malformed=bad,
    malformed_line=f"{bad}:3",
  )


# Persistent compilation cache shared by the driver subprocesses of a session
# (set by the `assets` fixture): identical programs compile once.
COMPILE_CACHE_DIR = ""


# Session objects, cached here as well: a fixture imported into two test
# modules is instantiated once per module even when session-scoped.
_SESSION: dict[str, Any] = {}


@pytest.fixture(scope="session")
def assets(tmp_path_factory) -> dict[str, str]:
  global COMPILE_CACHE_DIR
  if "assets" not in _SESSION:
    COMPILE_CACHE_DIR = str(tmp_path_factory.mktemp("jax_compile_cache"))
    _SESSION["assets"] = build_assets(str(tmp_path_factory.mktemp("driver_assets")))
  return _SESSION["assets"]


def tiny_config(assets: dict[str, str], **overrides: Any):
  """A ``base_config()`` for the tiny models: 3 steps of batch 4, 8 new
  tokens, constant lr, checkpoint every 2 steps, token metrics on.

  ``overrides``: config keys, nested ones as ``loss__beta=0.5`` (or
  ``**{"loss.beta": 0.5}``); unknown keys are an error.
  """
  from opd_jax import configs_lib

  c = configs_lib.base_config()
  c.student.path = assets["student"]
  c.teacher.path = assets["teacher"]
  c.tokenizer = assets["tokenizer"]
  c.data.train_files = assets["prompts"]
  c.data.max_prompt_len = 12
  c.batch_size = 4
  c.sampling.max_new_tokens = 8
  c.loss = configs_lib.loss_config("reverse_kl", chunk=4)
  c.metrics.position_chunk = 4
  c.optimizer.update(dict(lr=1e-3, schedule="constant", weight_decay=0.0))
  c.total_steps = 3
  c.checkpoint_every = 2
  c.keep_checkpoints = 10
  c.progress_bar = False
  for key, value in overrides.items():
    key = key.replace("__", ".")
    *parents, leaf = key.split(".")
    node = c
    for p in parents:
      node = node[p]
    if leaf not in node:
      raise KeyError(f"tiny_config: no config key {key!r}")
    node[leaf] = value
  return c


_CONFIG_FILE = '''"""Test config written by tests/driver_utils.py."""

import json

import ml_collections

CONFIG = json.loads({text!r})


def get_config(arg=None):
  del arg
  return ml_collections.ConfigDict(CONFIG)
'''


def write_config_file(config, path: str) -> str:
  """Writes ``config`` as a ``configs/``-style file (``get_config(arg)``)."""
  text = config.to_json(sort_keys=True)
  with open(path, "w") as f:
    f.write(_CONFIG_FILE.format(text=text))
  return path


# -----------------------------------------------------------------------------
# Driver subprocesses.

# Runs the CLI with `MetricWriter.write` patched to wait, after logging any
# step in OPD_TEST_PAUSE_STEPS, until the file OPD_TEST_GO_FILE exists (or 120
# s pass): the test can then deliver a signal at a known step. Numerics are
# untouched.
_PAUSE_SHIM = r"""
import os, time
from opd_jax import logging_utils, train
pause = {int(s) for s in os.environ.get("OPD_TEST_PAUSE_STEPS", "").split(",") if s}
go = os.environ.get("OPD_TEST_GO_FILE", "")
write = logging_utils.MetricWriter.write
def paused_write(self, step, metrics):
  write(self, step, metrics)
  if int(step) in pause and "loss" in metrics:
    deadline = time.time() + 120
    while not (go and os.path.exists(go)) and time.time() < deadline:
      time.sleep(0.02)
logging_utils.MetricWriter.write = paused_write
train.run()
"""


def driver_env(num_devices: int = 1, **extra: str) -> dict[str, str]:
  """Environment of a CPU driver subprocess with ``num_devices`` devices."""
  env = dict(os.environ)
  env["JAX_PLATFORMS"] = "cpu"
  flags = re.sub(
    r"--xla_force_host_platform_device_count=\S+", "", env.get("XLA_FLAGS", "")
  ).split()
  if num_devices > 1:
    flags.append(f"--xla_force_host_platform_device_count={num_devices}")
    sharding.size_cpu_pool(env, num_devices)
  env["XLA_FLAGS"] = " ".join(flags)
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO, env.get("PYTHONPATH", "")]))
  env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  if COMPILE_CACHE_DIR:
    env.update(
      JAX_COMPILATION_CACHE_DIR=COMPILE_CACHE_DIR,
      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
      JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1",
    )
  env.update(extra)
  return env


class Proc:
  """A background subprocess with its output in a log file."""

  live: list["Proc"] = []

  def __init__(
    self,
    args: list[str],
    log: str,
    env: dict[str, str] | None = None,
    timeout: float = PROC_TIMEOUT_S,
  ):
    self.args, self.log, self.timeout = list(args), log, timeout
    self.t0 = time.time()
    self._f = open(log, "w")
    self.popen = subprocess.Popen(
      args,
      cwd=REPO,
      env=env or driver_env(),
      stdout=self._f,
      stderr=subprocess.STDOUT,
      start_new_session=True,
    )
    Proc.live.append(self)

  @property
  def pid(self) -> int:
    return self.popen.pid

  def poll(self) -> int | None:
    return self.popen.poll()

  def signal(self, sig: int):
    if self.popen.poll() is None:
      os.kill(self.popen.pid, sig)

  def kill(self):
    """SIGKILL (only this process, by its pid) and reap it."""
    if self.popen.poll() is None:
      os.kill(self.popen.pid, signal.SIGKILL)
    self.popen.wait()
    self._close()

  def wait(self) -> tuple[int, str]:
    """Waits (at most the remaining timeout); returns (returncode, output)."""
    remaining = max(1.0, self.timeout - (time.time() - self.t0))
    try:
      rc = self.popen.wait(remaining)
    except subprocess.TimeoutExpired:
      self.kill()
      raise AssertionError(
        f"timed out after {self.timeout:.0f} s: {' '.join(self.args)}\n{self.output()}"
      )
    self._close()
    return rc, self.output()

  def check(self) -> str:
    """Waits; fails the test with the log unless the exit status is 0."""
    rc, out = self.wait()
    assert rc == 0, f"exit {rc}: {' '.join(self.args)}\n{out[-6000:]}"
    return out

  def output(self) -> str:
    with open(self.log) as f:
      return f.read()

  def _close(self):
    if not self._f.closed:
      self._f.close()
    if self in Proc.live:
      Proc.live.remove(self)

  @classmethod
  def kill_all(cls):
    """Teardown: kills every subprocess started here that is still running."""
    for p in list(cls.live):
      p.kill()


def start_driver(
  config_file: str,
  workdir: str,
  *flags: str,
  num_devices: int = 1,
  pause_at: tuple[int, ...] = (),
  go_file: str = "",
  log: str | None = None,
  env_extra: dict[str, str] | None = None,
  timeout: float = PROC_TIMEOUT_S,
) -> Proc:
  """``python -m opd_jax.train --config=FILE --workdir=DIR FLAGS`` in the
  background (``pause_at``: through the pausing shim, see ``_PAUSE_SHIM``)."""
  os.makedirs(workdir, exist_ok=True)
  extra = dict(env_extra or {})
  if pause_at:
    head = [PYTHON, "-c", _PAUSE_SHIM]
    extra.update(OPD_TEST_PAUSE_STEPS=",".join(map(str, pause_at)), OPD_TEST_GO_FILE=go_file)
  else:
    head = [PYTHON, "-m", "opd_jax.train"]
  args = head + [f"--config={config_file}", f"--workdir={workdir}", *flags]
  if log is None:
    n = 0
    while os.path.exists(log := os.path.join(workdir, f"driver_{n}.log")):
      n += 1
  return Proc(args, log, driver_env(num_devices, **extra), timeout=timeout)


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


# -----------------------------------------------------------------------------
# Reading and comparing runs.


def read_metrics(workdir: str) -> list[dict[str, Any]]:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def step_records(workdir: str) -> dict[int, dict[str, Any]]:
  """Training-step records by step (asserts each step is logged once)."""
  out: dict[int, dict[str, Any]] = {}
  for r in read_metrics(workdir):
    if "loss" in r:
      assert r["step"] not in out, f"step {r['step']} logged twice in {workdir}"
      out[r["step"]] = r
  return out


def _same(a, b) -> bool:
  if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
    return True
  return a == b


def max_rel_diff(a: dict[str, Any], b: dict[str, Any], keys) -> float:
  out = 0.0
  for k in keys:
    x, y = float(a[k]), float(b[k])
    if not _same(x, y):
      out = max(out, abs(x - y) / max(abs(x), abs(y), 1e-30))
  return out


def assert_same_metrics(
  got: dict[int, dict], want: dict[int, dict], steps, *, keys=None, rtol: float = 0.0
):
  """Per-step equality (bitwise with ``rtol=0``) of metric records; ``keys``
  defaults to every non-timing training metric."""
  diffs = []
  for s in steps:
    assert s in got and s in want, f"step {s} missing: got {sorted(got)}, want {sorted(want)}"
    names = keys or sorted(
      k for k in want[s] if k not in TIMING_KEYS and k != "step" and not k.startswith("eval/")
    )
    assert set(names) <= set(got[s]), f"step {s}: keys {set(names) - set(got[s])} missing"
    for k in names:
      x, y = got[s][k], want[s][k]
      if _same(x, y):
        continue
      rel = abs(x - y) / max(abs(x), abs(y), 1e-30)
      if rel > rtol:
        diffs.append((s, k, x, y, rel))
  assert not diffs, (
    "metrics differ (step, key, got, want, rel):\n"
    + "\n".join(map(str, diffs[:40]))
    + f"\nmax rel diff {max(d[-1] for d in diffs):.3g}"
  )


def wait_for_step(workdir: str, step: int, proc: Proc, timeout: float = PROC_TIMEOUT_S):
  """Polls ``metrics.jsonl`` until a training step >= ``step`` is logged."""
  deadline = time.time() + timeout
  while time.time() < deadline:
    recs = step_records(workdir)
    if recs and max(recs) >= step:
      return max(recs)
    if proc.poll() is not None:
      raise AssertionError(
        f"run exited ({proc.poll()}) before step {step}:\n{proc.output()[-6000:]}"
      )
    time.sleep(0.05)
  proc.kill()
  raise AssertionError(f"step {step} not reached in {timeout} s:\n{proc.output()[-6000:]}")


def last_json_line(log: str) -> dict[str, Any]:
  """The driver's printed result (its last line that is a JSON object)."""
  for line in reversed(log.splitlines()):
    if line.startswith("{"):
      try:  # stderr can interleave with a long stdout line of the killed run
        return json.loads(line)
      except json.JSONDecodeError:
        continue
  raise AssertionError(f"no result line in:\n{log[-3000:]}")


def checkpoint_steps(workdir: str) -> list[int]:
  d = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(d):
    return []
  return sorted(int(n) for n in os.listdir(d) if n.isdigit())


# -----------------------------------------------------------------------------
# The reference run.


def reference_command(assets: dict[str, str], root: str) -> tuple[str, list[str]]:
  """(config file, extra flags) of the reference run's settings, reused by
  the runs compared with it: the malformed prompt file skipped through a
  command-line override (same batches as the clean file)."""
  config_file = os.path.join(root, "reference_config.py")
  cfg = tiny_config(assets, total_steps=REF_STEPS)
  cfg.data.train_files = assets["prompts_malformed"]
  write_config_file(cfg, config_file)
  return config_file, ["--config.data.on_error=skip"]


class _Reference:
  """The uninterrupted reference run (started once, waited for on use)."""

  def __init__(self, assets, root):
    self.root = root
    self.workdir = os.path.join(root, "reference")
    self.config_file, self.flags = reference_command(assets, root)
    self.proc = start_driver(self.config_file, self.workdir, *self.flags, num_devices=REF_DEVICES)
    self._lock = threading.Lock()
    self._records = None

  def records(self) -> dict[int, dict[str, Any]]:
    with self._lock:
      if self._records is None:
        self.proc.check()
        self._records = step_records(self.workdir)
      return self._records


@pytest.fixture(scope="session")
def reference_run(assets, tmp_path_factory):
  """Starts (in the background) the uninterrupted reference run: 6 steps,
  checkpoint every 2, 2 CPU devices; ``.records()`` waits for it."""
  if "reference" not in _SESSION:
    _SESSION["reference"] = _Reference(assets, str(tmp_path_factory.mktemp("reference")))
  yield _SESSION["reference"]
  Proc.kill_all()
