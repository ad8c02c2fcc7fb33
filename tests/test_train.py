"""End-to-end tests of the experiment driver (``opd_jax/train.py``).

The training runs are real ``python -m opd_jax.train`` subprocesses on CPU
(tiny random student / teacher, see ``driver_utils``). They are few and run in
the background while the in-process tests of this module execute:

* the session's reference run (6 steps, malformed prompt file skipped through
  a command-line override, 2 devices; ``driver_utils.reference_run``);
* the CLI run: 3 steps with an eval, then ``--config.total_steps=4`` resumes;
* the kill chain: SIGKILL after step 3, restart; SIGTERM once step 4 is
  logged, while step 5 runs (the loop logs a step after dispatching the next:
  exit 0, step 5 finished and checkpointed), restart; SIGTERM after the last
  step, which is also a checkpoint step;
* the damaged chain: 4 steps, checkpoint 4's files overwritten, resumed to
  the end; then every checkpoint damaged, resumed once more (a clear error);
* the random-kill chain: SIGKILL at ``RANDOM_KILLS`` random moments of the
  loop, restarts, beside the same run uninterrupted;
* quick failures: bad overrides, unknown loss, malformed data.

Runs that compile after the reference share its persistent compilation cache,
so only the reference pays for compiling the step.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import random
import re
import shlex
import signal
import subprocess
import time

import jax
import numpy as np
import pytest
from driver_utils import (  # noqa: F401  (fixtures)
  PROC_TIMEOUT_S,
  PYTHON,
  REF_DEVICES,
  REF_STEPS,
  REPO,
  REQUIRED_STEP_KEYS,
  Proc,
  assert_same_metrics,
  assets,
  checkpoint_steps,
  driver_env,
  last_json_line,
  read_metrics,
  reference_run,
  start_driver,
  step_records,
  tiny_config,
  wait_for_step,
  write_config_file,
)

FUTURE_TIMEOUT_S = 900

# SIGKILLs at random moments in the random-kill chain (README, reliability notes).
RANDOM_KILLS = 3 if os.environ.get("CI") else 10


# -----------------------------------------------------------------------------
# Background runs.


def _touch(path):
  with open(path, "w"):
    pass


class _Runs:
  """Starts every driver subprocess of this module; results are futures."""

  def __init__(self, assets, reference, root):
    self.assets, self.reference, self.root = assets, reference, root
    self.closed = False
    self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=6)
    # Failures that never reach compilation: start at once.
    bad = os.path.join(root, "bad")
    self.bad = {
      "loss_key": start_driver(
        "configs/opd.py", bad, "--config.loss.nope=1", log=os.path.join(root, "bad_loss_key.log")
      ),
      "typo": start_driver(
        "configs/opd.py", bad, "--config.totl_steps=3", log=os.path.join(root, "bad_typo.log")
      ),
      "loss_name": start_driver(
        "configs/opd.py:loss=nope", bad, log=os.path.join(root, "bad_loss_name.log")
      ),
    }
    cfg = tiny_config(assets)
    cfg.data.train_files = assets["prompts_malformed"]
    self.bad["data"] = start_driver(
      write_config_file(cfg, os.path.join(root, "bad_data.py")),
      os.path.join(root, "bad_data"),
      num_devices=REF_DEVICES,
    )
    # 4 rows per step cannot form 3 micro-batches: fails when the step is traced.
    self.bad["micro"] = start_driver(
      write_config_file(tiny_config(assets), os.path.join(root, "bad_micro.py")),
      os.path.join(root, "bad_micro"),
      "--config.micro_batches=3",
    )
    self.cli = self.pool.submit(self._cli_chain)
    self.kill = self.pool.submit(self._kill_chain)
    self.micro = self.pool.submit(self._micro_run)
    self.damaged = self.pool.submit(self._damaged_chain)
    self.random_kills = self.pool.submit(self._random_kill_chain)

  def _start(self, *args, **kwargs) -> Proc:
    if self.closed:  # torn down while a chain was waiting
      raise RuntimeError("test module finished")
    return start_driver(*args, **kwargs)

  def _after_reference_compiled(self):
    # The step executable is in the compilation cache once step 1 is logged.
    wait_for_step(self.reference.workdir, 1, self.reference.proc)

  def _cli_chain(self):
    """3 steps + eval, then resumed to 4 with ``--config.total_steps=4``."""
    from opd_jax import configs_lib

    cfg = tiny_config(self.assets, total_steps=3)
    cfg.evals.small = configs_lib.eval_config(
      levels="1+2", num_examples=4, batch_size=4, max_new_tokens=8, seed=7
    )
    config_file = write_config_file(cfg, os.path.join(self.root, "cli_config.py"))
    workdir = os.path.join(self.root, "cli")
    self._after_reference_compiled()
    out = {"workdir": workdir}
    out["log1"] = self._start(config_file, workdir, num_devices=REF_DEVICES).check()
    out["metrics1"] = read_metrics(workdir)
    out["ckpts1"] = checkpoint_steps(workdir)
    with open(os.path.join(workdir, "config.json")) as f:
      out["config1"] = json.load(f)
    out["log2"] = self._start(
      config_file, workdir, "--config.total_steps=4", num_devices=REF_DEVICES
    ).check()
    out["metrics2"] = read_metrics(workdir)
    out["ckpts2"] = checkpoint_steps(workdir)
    with open(os.path.join(workdir, "config.json")) as f:
      out["config2"] = json.load(f)
    return out

  def _micro_run(self):
    """The reference's command with ``--config.micro_batches=4`` (4 groups of
    one row) on one device, 3 steps."""
    ref = self.reference
    workdir = os.path.join(self.root, "micro")
    self._after_reference_compiled()
    log = self._start(
      ref.config_file,
      workdir,
      *ref.flags,
      "--config.micro_batches=4",
      "--config.total_steps=3",
      num_devices=1,
    ).check()
    with open(os.path.join(workdir, "config.json")) as f:
      micro_batches = json.load(f)["micro_batches"]
    return dict(log=log, records=step_records(workdir), micro_batches=micro_batches)

  def _kill_chain(self):
    """The reference's command, killed and restarted until it finishes."""
    ref = self.reference
    workdir = os.path.join(self.root, "killed")
    out = {"workdir": workdir}

    def start(pause_at, go):
      return self._start(
        ref.config_file,
        workdir,
        *ref.flags,
        num_devices=REF_DEVICES,
        pause_at=(pause_at,),
        go_file=os.path.join(self.root, go),
      )

    self._after_reference_compiled()
    # 1. SIGKILL once step 3 is logged (checkpoints: every 2 steps).
    p = start(3, "go1")
    wait_for_step(workdir, 3, p)
    out["ckpts_before_kill"] = checkpoint_steps(workdir)
    p.kill()
    out["rc_kill"] = p.popen.returncode
    out["steps_after_kill"] = sorted(step_records(workdir))
    # 2. Restart; SIGTERM once step 4 is logged (step 5 is in flight then).
    p = start(4, "go2")
    wait_for_step(workdir, 4, p)
    out["steps_before_term"] = sorted(step_records(workdir))
    p.signal(signal.SIGTERM)
    _touch(os.path.join(self.root, "go2"))
    out["rc_term"], out["log_term"] = p.wait()
    out["ckpts_after_term"] = checkpoint_steps(workdir)
    # 3. Restart; SIGTERM after the last step (also a checkpoint step).
    p = start(REF_STEPS, "go3")
    wait_for_step(workdir, REF_STEPS, p)
    p.signal(signal.SIGTERM)
    _touch(os.path.join(self.root, "go3"))
    out["rc_last"], out["log_last"] = p.wait()
    out["ckpts_final"] = checkpoint_steps(workdir)
    return out

  def _damaged_chain(self):
    """The reference's command to step 4, checkpoint 4 damaged, resumed to
    the end; then every checkpoint damaged and resumed once more."""
    ref = self.reference
    workdir = os.path.join(self.root, "damaged")
    out = {"workdir": workdir}
    self._after_reference_compiled()
    self._start(
      ref.config_file, workdir, *ref.flags, "--config.total_steps=4", num_devices=REF_DEVICES
    ).check()
    out["ckpts_before"] = checkpoint_steps(workdir)
    _damage(os.path.join(workdir, "checkpoints", "4"))
    out["log"] = self._start(ref.config_file, workdir, *ref.flags, num_devices=REF_DEVICES).check()
    out["ckpts_after"] = checkpoint_steps(workdir)
    out["aside"] = sorted(os.listdir(os.path.join(workdir, "checkpoints.damaged")))
    out["metrics"] = read_metrics(workdir)
    for step in out["ckpts_after"]:
      _damage(os.path.join(workdir, "checkpoints", str(step)))
    out["rc_none"], out["log_none"] = self._start(
      ref.config_file, workdir, *ref.flags, num_devices=REF_DEVICES
    ).wait()
    out["ckpts_none"] = checkpoint_steps(workdir)
    out["metrics_none"] = read_metrics(workdir)
    return out

  def _random_kill_chain(self):
    """The reference's command for 3 N + 2 steps, checkpointing every step
    (keep 2), SIGKILLed N times at a random moment of its loop (in a step,
    its log write, a checkpoint save or the deletion of an old one) and
    restarted; then run to the end. Beside it (concurrently), the same run
    uninterrupted."""
    ref, n = self.reference, RANDOM_KILLS
    total = 3 * n + 2
    flags = [
      *ref.flags,
      f"--config.total_steps={total}",
      "--config.checkpoint_every=1",
      "--config.keep_checkpoints=2",
    ]
    straight = os.path.join(self.root, "straight")
    workdir = os.path.join(self.root, "random_kills")
    rng = random.Random(15)
    self._after_reference_compiled()
    uninterrupted = self._start(ref.config_file, straight, *flags, num_devices=REF_DEVICES)
    kills = []
    while len(kills) < n:
      resumed_from = max(checkpoint_steps(workdir), default=0)
      t0 = time.time()
      p = self._start(ref.config_file, workdir, *flags, num_devices=REF_DEVICES)
      while p.poll() is None and _last_step_since(workdir, t0) <= resumed_from:
        if time.time() - t0 > PROC_TIMEOUT_S:
          p.kill()
          raise AssertionError(f"no step after {resumed_from} logged:\n{p.output()[-6000:]}")
        time.sleep(0.02)
      if p.poll() is not None:  # finished (or failed) before the kill
        p.check()
        break
      delay = rng.uniform(0.0, 0.8)
      time.sleep(delay)
      p.kill()
      names = os.listdir(os.path.join(workdir, "checkpoints"))
      kills.append(
        dict(
          delay=delay,
          rc=p.popen.returncode,
          resumed_from=resumed_from,
          last_logged=_last_step_since(workdir, 0),
          in_save=any(not x.isdigit() for x in names),
        )
      )
    log = self._start(ref.config_file, workdir, *flags, num_devices=REF_DEVICES).check()
    uninterrupted.check()
    return dict(n=n, total=total, kills=kills, log=log, workdir=workdir, straight=straight)

  def close(self):
    """Kills this module's runs (the session's reference run is left alone)."""
    self.closed = True
    for p in list(Proc.live):
      if p is not self.reference.proc:
        p.kill()
    self.pool.shutdown(wait=False, cancel_futures=True)


@pytest.fixture(scope="module")
def runs(assets, reference_run, tmp_path_factory):
  r = _Runs(assets, reference_run, str(tmp_path_factory.mktemp("train_runs")))
  yield r
  r.close()


@pytest.fixture(scope="module", autouse=True)
def _start_runs_early(request):
  """Starts the background runs with the module's first test when any
  selected test of the module needs them (so in-process tests overlap)."""
  items = [i for i in request.session.items if i.module is request.module]
  if any("runs" in getattr(i, "fixturenames", ()) for i in items):
    request.getfixturevalue("runs")


def _last_step_since(workdir: str, t0: float) -> int:
  """The last training step in ``metrics.jsonl`` if the file changed after
  ``t0`` (a restart rewrites it), else -1; torn lines are skipped."""
  path = os.path.join(workdir, "metrics.jsonl")
  try:
    if os.path.getmtime(path) <= t0:
      return -1
    with open(path) as f:
      lines = f.readlines()
  except FileNotFoundError:
    return -1
  steps = [-1]
  for line in lines:
    try:
      r = json.loads(line)
    except json.JSONDecodeError:
      continue
    if "loss" in r:
      steps.append(r["step"])
  return max(steps)


def _checkpoint_arrays(workdir: str, step: int) -> dict:
  """A checkpoint's train state as numpy arrays (no devices needed)."""
  import orbax.checkpoint as ocp

  path = os.path.join(workdir, "checkpoints", str(step), "state")
  ck = ocp.PyTreeCheckpointer()
  meta = ck.metadata(path)
  tree = meta.item_metadata.tree if hasattr(meta, "item_metadata") else meta
  args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
  return ck.restore(path, args=ocp.args.PyTreeRestore(restore_args=args))


def _result(future):
  return future.result(timeout=FUTURE_TIMEOUT_S)


# -----------------------------------------------------------------------------
# Configs (in-process, cheap).


def _load_config_file(path: str, arg: str | None = None):
  import importlib.util

  spec = importlib.util.spec_from_file_location(
    "cfg_" + re.sub(r"\W", "_", path), os.path.join(REPO, path)
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def _parse_cli(argv: list[str]):
  """The driver's flag parsing (``ml_collections.config_flags``, locked
  config) on a fresh FlagValues; returns (config, workdir)."""
  from absl import flags
  from ml_collections import config_flags

  argv = ["opd_jax.train"] + list(argv)
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file(
    "config", None, "", flag_values=fv, lock_config=True, sys_argv=argv
  )  # overrides are found in sys_argv
  flags.DEFINE_string("workdir", None, "", flag_values=fv)
  fv(argv)
  return fv.config, fv.workdir


def _step_config(config):
  """The compiled step's static config (validates loss name and kwargs)."""
  from opd_jax import train
  from opd_jax.sampling import SamplingConfig

  s = config.sampling
  sampling = SamplingConfig(
    max_new_tokens=int(s.max_new_tokens),
    temperature=float(s.temperature),
    top_k=int(s.top_k),
    top_p=float(s.top_p),
    eos_ids=(2,),
    pad_id=0,
    num_samples=int(s.num_samples),
  )
  return train.opd_config(train.settings_of(config), sampling)


def test_opd_config_builds_with_args():
  c = _load_config_file("configs/opd.py", "student=/s,teacher=/t,prompts=/p.jsonl,loss=jsd,steps=7")
  assert (c.student.path, c.teacher.path, c.data.train_files) == ("/s", "/t", "/p.jsonl")
  assert c.total_steps == 7
  assert c.loss.name == "jsd" and "beta" in c.loss
  step = _step_config(c)
  assert step.loss == "jsd" and dict(step.loss_kwargs)["beta"] == c.loss.beta
  with pytest.raises(ValueError, match="unknown config argument 'bogus'"):
    _load_config_file("configs/opd.py", "bogus=1")


def test_quickstart_config_builds():
  c = _load_config_file("configs/quickstart.py")
  assert c.prepare == "quickstart"
  assert c.total_steps > 0 and c.evals and c.loss.name == "reverse_kl"
  _step_config(c)
  c = _load_config_file("configs/quickstart.py", "loss=topk_opd,lam=0.5,steps=3")
  assert (c.loss.name, c.on_policy_fraction, c.total_steps) == ("topk_opd", 0.5, 3)


def test_resolved_config_is_a_copy(tmp_path):
  """$WORKDIR expansion (and a preparer) return the resolved config; the
  loaded (locked) config is not modified."""
  from opd_jax import train

  c = _load_config_file("configs/repro.py", "smoke=True")
  before = c.to_json()
  r = train.resolve_config(c, str(tmp_path))
  assert c.to_json() == before and "$WORKDIR" in c.student.path
  assert r.student.path == os.path.join(str(tmp_path), "../../organisms/student/export_hf")
  assert r.is_locked == c.is_locked and "$WORKDIR" not in r.to_json()


def test_weak_to_strong_config_builds():
  c = _load_config_file("configs/weak_to_strong.py", "student=/strong,teacher=/weak,prompts=/p")
  assert (c.student.path, c.teacher.path) == ("/strong", "/weak")
  assert c.loss.name == "topk_opd" and c.eval_at_start and "student_task" in c.evals
  assert c.cold_start.steps == 0
  _step_config(c)


def test_sweep_prints_parseable_commands(tmp_path, monkeypatch):
  root = str(tmp_path / "sweep_root")
  out = subprocess.run(
    [PYTHON, "experiments/sweep.py", "--sweep=configs/sweeps/loss_ablation.py", f"--root={root}"],
    cwd=REPO,
    env=driver_env(),
    capture_output=True,
    text=True,
    timeout=120,
    check=True,
  )
  lines = [l for l in out.stdout.splitlines() if l.strip()]
  import importlib.util

  spec = importlib.util.spec_from_file_location(
    "loss_ablation", os.path.join(REPO, "configs/sweeps/loss_ablation.py")
  )
  sweep = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(sweep)
  _, expected = sweep.get_sweep()
  assert len(lines) == len(expected) > 1
  monkeypatch.chdir(REPO)
  workdirs, names = set(), set()
  for line, (name, _, overrides) in zip(lines, expected):
    argv = shlex.split(line)
    assert argv[1:3] == ["-m", "opd_jax.train"], line
    config, workdir = _parse_cli(argv[3:])
    assert os.path.dirname(workdir) == root and workdir not in workdirs, line
    workdirs.add(workdir)
    names.add(config.loss.name)
    for key, value in overrides.items():  # overrides landed, with their types
      node = config
      for part in key.split("."):
        node = node[part]
      assert node == value, (line, key)
    _step_config(config)  # loss kwargs valid for the loss
    assert config.total_steps == sweep.STEPS, line  # schedules over STEPS span the run
    assert not os.path.exists(workdir)  # printed, not run
  assert {"reverse_kl", "jsd", "topk_opd", "distillm2", "todi", "akl"} <= names


def _write_qwen3_config(path, *, hidden, layers, heads, kv_heads, intermediate):
  os.makedirs(path, exist_ok=True)
  cfg = dict(
    architectures=["Qwen3ForCausalLM"],
    model_type="qwen3",
    hidden_size=hidden,
    num_hidden_layers=layers,
    num_attention_heads=heads,
    num_key_value_heads=kv_heads,
    head_dim=128,
    intermediate_size=intermediate,
    vocab_size=151936,
    tie_word_embeddings=True,
    rope_theta=1000000.0,
    eos_token_id=151645,
    bos_token_id=151643,
    max_position_embeddings=40960,
    rms_norm_eps=1e-6,
    hidden_act="silu",
    attention_bias=False,
    torch_dtype="bfloat16",
  )
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(cfg, f)
  return str(path)


def _main_arg_shardings(text: str) -> list[tuple[tuple[int, ...], list[list[str]] | None]]:
  """(shape, per-dim mesh axes) of every argument of ``@main`` in StableHLO
  text (Shardy ``sdy.sharding`` attributes)."""
  head = text[text.index("func.func public @main(") :]
  head = head[: head.index(") -> (")]
  out = []
  for part in re.split(r"%arg\d+: ", head)[1:]:
    dims = re.match(r"tensor<([^>]*)>", part).group(1).split("x")[:-1]
    s = re.search(r"#sdy\.sharding<@\w+, \[(.*?)\]>", part)
    axes = None
    if s is not None:
      axes = [re.findall(r'"(\w+)"', d) for d in re.findall(r"\{([^}]*)\}", s.group(1))]
    out.append((tuple(int(d) for d in dims), axes))
  return out


@pytest.mark.slow
def test_paper_config_lowers_on_simulated_mesh(tmp_path):
  """Qwen3-1.7B <- Qwen3-4B at the paper's settings lowers on fsdp=4 x tensor=2."""
  from opd_jax.aot import lower_abstract

  assert len(jax.devices()) == 8
  student = _write_qwen3_config(
    tmp_path / "qwen3-1.7b", hidden=2048, layers=28, heads=16, kv_heads=8, intermediate=6144
  )
  teacher = _write_qwen3_config(
    tmp_path / "qwen3-4b", hidden=2560, layers=36, heads=32, kv_heads=8, intermediate=9728
  )
  c = _load_config_file(
    "configs/paper_qwen3.py", f"student={student},teacher={teacher},fsdp=4,tensor=2"
  )
  # The paper's settings.
  assert (c.batch_size, c.sampling.num_samples) == (64, 4)
  assert c.optimizer.lr == 1e-6 and c.optimizer.schedule == "constant"
  assert c.loss.name == "topk_opd" and c.loss.k == 16
  assert c.sampling.temperature == 1.0 and c.teacher_sampling.temperature == 1.0
  assert c.on_policy_fraction == 1.0
  assert (c.data.max_prompt_len, c.sampling.max_new_tokens) == (1024, 7168)
  assert (c.optimizer.b1, c.optimizer.b2, c.optimizer.weight_decay, c.optimizer.grad_clip) == (
    0.9,
    0.999,
    0.01,
    1.0,
  )
  assert (c.student.dtype, c.student.param_dtype) == ("bfloat16", "float32")
  assert dict(c.mesh.shape) == dict(data=1, fsdp=4, tensor=2)

  lowered = lower_abstract(c)
  assert isinstance(lowered, jax.stages.Lowered)
  state, teacher_params, batch = lowered.args_info[0]
  flat, _ = jax.tree_util.tree_flatten_with_path(lowered.args_info)
  args = _main_arg_shardings(lowered.as_text())
  assert len(args) == len(flat)
  by_path = {}
  for (path, info), (shape, axes) in zip(flat, args):
    assert tuple(info.shape) == shape, jax.tree_util.keystr(path)
    by_path[jax.tree_util.keystr(path)] = (shape, axes)

  def axes_of(prefix, suffix):
    keys = [k for k in by_path if k.startswith(prefix) and k.endswith(suffix)]
    assert keys, (prefix, suffix)
    return by_path[keys[0]]

  # Student parameters (argument 0 = train state), then teacher (argument 1).
  shape, axes = axes_of("[0][0].params", "['embed'].value")
  assert shape == (151936, 2048) and axes == [["tensor"], ["fsdp"]]
  # Layer params stacked [L, ...] (scan_layers), the "layers" axis replicated.
  assert c.student.scan_layers and c.teacher.scan_layers
  shape, axes = axes_of("[0][0].params", "['layers']['attn']['q'].value")
  assert shape == (28, 2048, 16, 128) and axes[:3] == [[], ["fsdp"], ["tensor"]]
  shape, axes = axes_of("[0][0].params", "['layers']['mlp']['gate'].value")
  assert shape == (28, 2048, 6144) and axes == [[], ["fsdp"], ["tensor"]]
  shape, axes = axes_of("[0][0].params", "['layers']['mlp']['down'].value")
  assert shape == (28, 6144, 2048) and axes == [[], ["tensor"], ["fsdp"]]
  # Adam moments follow their parameters.
  mu = [
    v
    for k, v in by_path.items()
    if k.startswith("[0][0].opt_state") and k.endswith("['embed'].value")
  ]
  assert mu and all(a == [["tensor"], ["fsdp"]] for _, a in mu)
  shape, axes = axes_of("[0][1]", "['embed'].value")
  assert shape == (151936, 2560) and axes == [["tensor"], ["fsdp"]]
  # The batch is split over the data axes (data x fsdp, data=1 here).
  shape, axes = axes_of("[0][2]", "['prompt_ids']")
  assert shape == (64, 1024) and "fsdp" in axes[0] and axes[1] == []
  shape, _ = axes_of("[0][1]", "['layers']['mlp']['down'].value")
  assert shape == (36, 9728, 2560)


def test_paper_config_aime_eval_is_an_argument(tmp_path):
  """No ``aime=`` file: no eval configured (the 'math' task cannot generate)."""
  c = _load_config_file("configs/paper_qwen3.py", "student=/s,teacher=/t")
  assert "aime" not in c.evals
  aime = str(tmp_path / "aime.jsonl")
  c = _load_config_file("configs/paper_qwen3.py", f"student=/s,teacher=/t,aime={aime}")
  assert (c.evals.aime.task, c.evals.aime.data_file, c.evals.aime.num_samples) == ("math", aime, 16)


# -----------------------------------------------------------------------------
# Start-up checks (before any weight is read or anything compiles).


def _model_cfg(max_len=512):
  from tiny import tiny_model_config

  return tiny_model_config(
    hidden_size=16,
    intermediate_size=32,
    num_layers=1,
    num_heads=2,
    num_kv_heads=1,
    qk_norm=False,
    max_position_embeddings=max_len,
  )


def _eval_case(tmp_path, case):
  """A base config with one eval ``x`` broken as ``case`` says."""
  from opd_jax import configs_lib
  from opd_jax import data as data_lib

  c = configs_lib.base_config()
  prompts = str(tmp_path / "prompts.jsonl")
  data_lib.write_jsonl(prompts, [{"prompt": "1+1=", "answer": "2"}])
  c.data.train_files = prompts
  c.evals.x = configs_lib.eval_config(num_examples=4)
  e = c.evals.x
  if case == "math_without_file":
    e.task = "math"
  elif case == "unknown_task":
    e.task = "nope"
  elif case == "unknown_evaluator":
    e.evaluator = "nope"
  elif case == "missing_file":
    e.data_file = str(tmp_path / "missing.jsonl")
  elif case == "too_long":
    e.max_new_tokens = 512 - int(c.data.max_prompt_len) + 1
  elif case == "no_answer":
    e.data_file = str(tmp_path / "no_answer.jsonl")
    data_lib.write_jsonl(e.data_file, [{"prompt": "1+1="}])
  elif case == "bad_json":
    e.data_file = str(tmp_path / "bad.jsonl")
    with open(e.data_file, "w") as f:
      f.write("{not json\n")
  elif case == "empty_file":
    e.data_file = str(tmp_path / "empty.jsonl")
    open(e.data_file, "w").close()
  return c


@pytest.mark.parametrize(
  "case, message",
  [
    (
      "math_without_file",
      r"config\.evals\.x\.data_file is empty and task 'math' cannot "
      "generate",
    ),
    (
      "unknown_task",
      r"config\.evals\.x\.task: unknown task 'nope'; valid tasks: "
      "arithmetic, math",
    ),
    ("unknown_evaluator", r"config\.evals\.x\.evaluator: unknown evaluator 'nope'"),
    ("missing_file", r"config\.evals\.x\.data_file: file not found: .*missing\.jsonl"),
    (
      "too_long",
      r"config\.evals\.x\.max_new_tokens: config\.data\.max_prompt_len \(64\) "
      r"\+ 449 new tokens = 513 exceeds the student's max_position_embeddings 512",
    ),
    ("no_answer", r"config\.evals\.x\.data_file: example 0 has no \['answer'\]"),
    ("bad_json", r"config\.evals\.x: "),
    ("empty_file", r"config\.evals\.x: no examples"),
  ],
)
def test_eval_settings_checked_at_startup(tmp_path, case, message):
  from opd_jax.train import prepare_evals, settings_of

  with pytest.raises(ValueError, match=message):
    prepare_evals(settings_of(_eval_case(tmp_path, case)), _model_cfg())


def test_valid_evals_prepared_at_startup(tmp_path):
  from opd_jax import data as data_lib
  from opd_jax.train import prepare_evals, settings_of

  c = _eval_case(tmp_path, "ok")
  c.evals.y = c.evals.x.copy_and_resolve_references()
  c.evals.y.task = "math"
  c.evals.y.data_file = str(tmp_path / "aime.jsonl")
  data_lib.write_jsonl(
    c.evals.y.data_file, [{"prompt": f"{i}+1?", "answer": str(i + 1)} for i in range(3)]
  )
  cache = prepare_evals(settings_of(c), _model_cfg())
  assert sorted(cache) == ["x", "y"]
  assert len(cache["x"][1]) == 4 and cache["x"][0].name == "arithmetic"
  assert [ex["answer"] for ex in cache["y"][1]] == ["1", "2", "3"]


def test_run_settings_checked_at_startup(tmp_path):
  from opd_jax.train import check_run_settings as check
  from opd_jax.train import settings_of

  def check_run_settings(c, *model_cfgs):
    check(settings_of(c), *model_cfgs)

  c = _eval_case(tmp_path, "ok")
  check_run_settings(c, _model_cfg(), _model_cfg())
  c.sampling.max_new_tokens = 512 - int(c.data.max_prompt_len) + 1
  with pytest.raises(
    ValueError,
    match=r"config\.data\.max_prompt_len \(64\) \+ "
    r"config\.sampling\.max_new_tokens \(449\) = 513 exceeds the teacher's",
  ):
    check_run_settings(c, _model_cfg(max_len=1024), _model_cfg())
  c.sampling.max_new_tokens = 64
  c.data.train_files = str(tmp_path / "nope.jsonl")
  with pytest.raises(ValueError, match=r"config\.data\.train_files: .*nope\.jsonl"):
    check_run_settings(c, _model_cfg())
  c.data.train_files = str(tmp_path / "prompts.jsonl")
  c.max_nonfinite_steps = 0
  with pytest.raises(ValueError, match=r"config\.max_nonfinite_steps=0 must be >= 1"):
    check_run_settings(c, _model_cfg())
  c.max_nonfinite_steps, c.restore_step = 5, -1
  with pytest.raises(ValueError, match=r"config\.restore_step=-1 must be >= 0"):
    check_run_settings(c, _model_cfg())
  c.restore_step = 0
  c.cold_start.steps, c.cold_start.task = 2, "nope"
  with pytest.raises(ValueError, match=r"config\.cold_start\.task: unknown task 'nope'"):
    check_run_settings(c, _model_cfg())


def test_driver_checks_evals_before_loading(assets, tmp_path):
  """``train`` fails on a broken eval before reading weights or compiling:
  the 'math' task with no file, and an eval prompt longer than max_prompt_len
  (found by encoding the eval prompts with the run's tokenizer)."""
  from opd_jax import configs_lib
  from opd_jax import data as data_lib
  from opd_jax.train import train

  c = tiny_config(assets)
  c.evals.aime = configs_lib.eval_config(task="math")
  with pytest.raises(ValueError, match=r"config\.evals\.aime\.data_file is empty"):
    train(c, str(tmp_path / "a"))
  long_file = str(tmp_path / "long.jsonl")
  data_lib.write_jsonl(long_file, [{"prompt": "1+1=" * 40, "answer": "2"}])
  c.evals.aime.data_file = long_file
  with pytest.raises(
    ValueError,
    match=r"config\.evals\.aime: prompt 0 has \d+ tokens > "
    r"max_prompt_len=12.*\(config\.data\.max_prompt_len\)",
  ):
    train(c, str(tmp_path / "b"))
  assert not os.path.exists(str(tmp_path / "b" / "checkpoints"))


# -----------------------------------------------------------------------------
# Command-line failures.


def test_bad_override_names_the_key(runs):
  rc, out = runs.bad["loss_key"].wait()
  assert rc != 0 and "nope" in out, out[-3000:]
  rc, out = runs.bad["typo"].wait()
  assert rc != 0 and "totl_steps" in out, out[-3000:]
  assert "total_steps" in out  # the suggestion


def test_unknown_loss_lists_valid_losses(runs):
  rc, out = runs.bad["loss_name"].wait()
  assert rc != 0, out[-3000:]
  assert "unknown loss 'nope'" in out, out[-3000:]
  for name in ("reverse_kl", "forward_kl", "jsd", "topk_opd"):
    assert name in out


def test_malformed_data_fails_with_file_line(runs, assets):
  rc, out = runs.bad["data"].wait()
  assert rc != 0, out[-3000:]
  assert assets["malformed_line"] in out, out[-3000:]


def test_malformed_data_skipped_with_override(runs, reference_run):
  reference_run.records()
  step0 = [r for r in read_metrics(reference_run.workdir) if r["step"] == 0]
  assert len(step0) == 1
  assert step0[0]["data/num_malformed_skipped"] == 1
  assert step0[0]["data/num_records"] == 64
  with open(os.path.join(reference_run.workdir, "config.json")) as f:
    assert json.load(f)["data"]["on_error"] == "skip"


# -----------------------------------------------------------------------------
# The CLI run.


def test_cli_end_to_end_and_resume_with_override(runs, reference_run):
  r = _result(runs.cli)
  workdir = r["workdir"]
  # --- first invocation: 3 steps.
  assert r["config1"]["total_steps"] == 3
  assert r["config1"]["student"]["path"] == runs.assets["student"]
  assert last_json_line(r["log1"])["status"] == "finished"
  m1 = r["metrics1"]
  assert [x["step"] for x in m1] == [0, 1, 2, 3]
  assert m1[0]["data/num_records"] == 64 and m1[0]["data/num_malformed_skipped"] == 0
  for rec in m1[1:]:
    missing = [k for k in REQUIRED_STEP_KEYS if k not in rec]
    assert not missing, (rec["step"], missing)
    assert np.isfinite([rec[k] for k in REQUIRED_STEP_KEYS]).all(), rec
    assert rec["lr"] == pytest.approx(1e-3)
    assert 0 < rec["mean_response_length"] <= 8 and 0 <= rec["truncated_frac"] <= 1
    assert rec["tokens_per_sec"] > 0
  assert "compile_time_s" in m1[1]
  evals = {k: v for k, v in m1[3].items() if k.startswith("eval/")}
  assert "eval/small/accuracy" in evals and "eval/small/avg@1" in evals, sorted(evals)
  assert evals["eval/small/num_problems"] == 4
  assert not any(k.startswith("eval/") for rec in m1[:3] for k in rec)
  assert r["ckpts1"] == [2, 3]
  tb = os.path.join(workdir, "tensorboard")
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(tb))
  assert os.path.exists(os.path.join(workdir, "config.txt"))
  # --- second invocation: --config.total_steps=4 resumes from checkpoint 3.
  assert r["config2"]["total_steps"] == 4
  assert last_json_line(r["log2"])["step"] == 4
  m2 = r["metrics2"]
  assert [x["step"] for x in m2] == [0, 1, 2, 3, 4]
  assert m2[:4] == m1  # steps 1..3 not re-run (timings equal)
  assert "compile_time_s" in m2[4]  # step 4 was the restarted run's first
  assert any(k.startswith("eval/small/") for k in m2[4])
  assert r["ckpts2"] == [2, 3, 4]
  # Same batches and constant lr as the reference: identical numbers.
  ref = reference_run.records()
  assert_same_metrics(step_records(workdir), ref, range(1, 5))


def test_cli_micro_batches_match_one_batch(runs, reference_run):
  """``--config.micro_batches=4`` logs the reference's (M = 1) numbers up to
  float summation order (and a different device count: 1 vs 2)."""
  r = _result(runs.micro)
  assert r["micro_batches"] == 4 and last_json_line(r["log"])["status"] == "finished"
  ref = reference_run.records()
  exact = ["num_tokens", "mean_response_length", "truncated_frac", "on_policy_frac", "lr"]
  assert_same_metrics(r["records"], ref, range(1, 4), keys=exact)
  assert_same_metrics(r["records"], ref, range(1, 4), keys=["loss", "grad_norm"], rtol=1e-5)
  assert_same_metrics(r["records"], ref, range(1, 4), rtol=1e-3)  # token metrics too


def test_bad_micro_batches_is_a_clear_error(runs):
  rc, out = runs.bad["micro"].wait()
  assert rc != 0, out[-3000:]
  assert "micro_batches=3 must divide the rows per step" in out, out[-3000:]


def test_micro_batches_config_key():
  from opd_jax import configs_lib

  c = configs_lib.base_config()
  assert c.micro_batches == 1 and _step_config(c).micro_batches == 1
  c.micro_batches = 4
  assert _step_config(c).micro_batches == 4


# -----------------------------------------------------------------------------
# Kill / preemption and resume.


def test_sigkill_and_sigterm_resume_matches_uninterrupted(runs, reference_run):
  r = _result(runs.kill)
  # SIGKILL after step 3: only checkpoint 2 exists; step 3 is logged.
  assert r["rc_kill"] == -signal.SIGKILL
  assert r["ckpts_before_kill"] == [2]
  assert r["steps_after_kill"] == [1, 2, 3]
  # The restart resumed from 2 and re-ran step 3 (logged once).
  assert r["steps_before_term"] == [1, 2, 3, 4]
  # SIGTERM after step 4 is logged, step 5 in flight: step 5 finishes, is
  # logged and checkpointed, clean exit.
  assert r["rc_term"] == 0, r["log_term"][-3000:]
  assert last_json_line(r["log_term"])["status"] == "preempted"
  assert max(r["ckpts_after_term"]) == 5
  # SIGTERM after the last step, which was checkpointed anyway: exit 0.
  assert r["rc_last"] == 0, r["log_last"][-3000:]
  assert last_json_line(r["log_last"])["step"] == REF_STEPS
  assert max(r["ckpts_final"]) == REF_STEPS
  # Every step equals the uninterrupted run's, bitwise.
  got = step_records(r["workdir"])
  assert sorted(got) == list(range(1, REF_STEPS + 1))
  assert [x["step"] for x in read_metrics(r["workdir"])].count(0) == 1
  ref = reference_run.records()
  assert sorted(ref) == list(range(1, REF_STEPS + 1))
  assert_same_metrics(
    got,
    ref,
    range(1, REF_STEPS + 1),
    keys=["loss", "grad_norm", "mean_response_length", "num_tokens"],
  )
  assert_same_metrics(got, ref, range(1, REF_STEPS + 1))  # and every other metric


def test_damaged_latest_checkpoint_is_skipped_on_resume(runs, reference_run):
  """Checkpoint 4's array files overwritten (a bad copy): the restart names
  it (step, path, error), moves it aside, resumes from 2 and ends with the
  uninterrupted run's metrics; with every checkpoint damaged it stops with a
  clear message (no traceback) and replaces nothing with a fresh start."""
  r = _result(runs.damaged)
  workdir, log = r["workdir"], r["log"]
  assert r["ckpts_before"] == [2, 4]
  ckpt4 = os.path.join(workdir, "checkpoints", "4")
  assert f"cannot restore checkpoint 4 ({ckpt4}): " in log, log[-6000:]
  assert "OCDBT" in log, log[-6000:]  # TensorStore's error, quoted
  assert "trying the previous checkpoint" in log
  assert f"moved to {os.path.join(workdir, 'checkpoints.damaged', '4')}" in log, log[-6000:]
  assert r["aside"] == ["4"] and r["ckpts_after"] == [2, 4, 6]
  assert last_json_line(log)["step"] == REF_STEPS
  got = {x["step"]: x for x in r["metrics"] if "loss" in x}
  assert [x["step"] for x in r["metrics"]] == list(range(REF_STEPS + 1))
  assert_same_metrics(got, reference_run.records(), range(1, REF_STEPS + 1))
  # None readable: a clear error, the checkpoints and the log untouched.
  out = r["log_none"]
  assert r["rc_none"] != 0, out[-3000:]
  assert "RestoreError: no checkpoint of this run can be restored" in out, out[-6000:]
  for step in (2, 4, 6):
    assert f"checkpoint {step} ({os.path.join(workdir, 'checkpoints', str(step))}):" in out
  assert "config.restore_step=N restores one explicitly" in out
  assert "Traceback" not in out, out[-6000:]
  assert r["ckpts_none"] == [2, 4, 6] and r["metrics_none"] == r["metrics"]


@pytest.mark.slow
def test_random_sigkills_resume_matches_uninterrupted(runs):
  """N SIGKILLs at random moments of the loop (checkpoint saves included),
  each followed by a restart: the final metrics and parameters equal an
  uninterrupted run's, bitwise."""
  r = _result(runs.random_kills)
  kills, total = r["kills"], r["total"]
  assert len(kills) == r["n"] == RANDOM_KILLS, kills
  assert all(k["rc"] == -signal.SIGKILL for k in kills), kills
  print(
    f"random kills: N={len(kills)}, {sum(k['in_save'] for k in kills)} during a "
    f"checkpoint save; {kills}"
  )
  assert last_json_line(r["log"])["step"] == total
  got, want = step_records(r["workdir"]), step_records(r["straight"])
  assert sorted(got) == sorted(want) == list(range(1, total + 1))
  assert [x["step"] for x in read_metrics(r["workdir"])].count(0) == 1
  assert_same_metrics(got, want, range(1, total + 1))
  a, b = _checkpoint_arrays(r["workdir"], total), _checkpoint_arrays(r["straight"], total)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)


# -----------------------------------------------------------------------------
# Off-policy cold start: SFT on verified teacher rollouts, then OPD, one run.


def _cold_config(assets, total):
  c = tiny_config(assets, total_steps=total, checkpoint_every=1)
  c.cold_start.steps = 2
  c.cold_start.attempts = 2
  c.cold_start.max_prompts = 16
  return c


def _fake_rollouts(assets, path):
  """Verified 'rollouts' (the reference completions; a random teacher solves
  nothing) so the test controls the SFT set."""
  from opd_jax import data as data_lib

  recs = data_lib.read_jsonl(assets["prompts"])[:16]
  data_lib.write_jsonl(path, recs)
  return path


def test_cold_start_switches_at_step_and_resumes_across_switch(assets, tmp_path):
  from opd_jax.train import train

  rollouts = _fake_rollouts(assets, str(tmp_path / "rollouts.jsonl"))
  a = _cold_config(assets, 4)
  a.cold_start.rollouts_file = rollouts
  train(a, str(tmp_path / "a"))
  ra = step_records(str(tmp_path / "a"))
  assert [ra[s]["cold_start"] for s in (1, 2, 3, 4)] == [1.0, 1.0, 0.0, 0.0]
  assert ra[1]["on_policy_frac"] == 0.0 and ra[2]["on_policy_frac"] == 0.0
  assert ra[3]["on_policy_frac"] == 1.0 and "overlap_ratio" in ra[3]
  assert "overlap_ratio" not in ra[2]  # SFT phase: no teacher, no metrics
  # Interrupted right after the switch (3 steps), then resumed to 4.
  for total in (3, 4):
    b = _cold_config(assets, total)
    b.cold_start.rollouts_file = rollouts
    train(b, str(tmp_path / "b"))
  rb = step_records(str(tmp_path / "b"))
  assert_same_metrics(rb, ra, [1, 2, 3, 4])


def test_cold_start_generates_verified_rollouts(assets, tmp_path):
  """Rollouts come from the teacher with the task verifier as filter: a
  random teacher solves nothing, so the run refuses to cold-start."""
  from opd_jax.train import train

  c = _cold_config(assets, 3)
  c.cold_start.max_prompts = 4
  with pytest.raises(ValueError, match="no teacher rollout passed the verifier"):
    train(c, str(tmp_path / "c"))


def test_driver_logs_flops_per_step_and_mfu(assets, tmp_path):
  """``flops_per_step`` = the analytic model FLOPs of the compiled shapes;
  ``mfu`` = flops / step time / (config.peak_flops x devices)."""
  from opd_jax import flops as flops_lib
  from opd_jax.train import model_config_of, peak_flops, settings_of, train, vocab_of

  c = tiny_config(assets, total_steps=2, peak_flops=1e12)
  train(c, str(tmp_path / "run"))
  recs = step_records(str(tmp_path / "run"))
  from transformers import AutoTokenizer

  s = settings_of(c)
  s_cfg, t_cfg = model_config_of(s.student), model_config_of(s.teacher)
  vocab = vocab_of(s_cfg, t_cfg, len(AutoTokenizer.from_pretrained(assets["tokenizer"])))
  for step in (1, 2):
    r = recs[step]  # at the step's prompt width (its bucket of max_prompt_len 12)
    assert r["prompt_len"] in settings_of(c).prompt_buckets
    want = flops_lib.step_flops(
      _step_config(c), s_cfg, t_cfg, batch_size=4, prompt_len=int(r["prompt_len"]), vocab=vocab
    )
    assert r["flops_per_step"] == want["total"] > 0
    assert r["mfu"] == pytest.approx(
      r["flops_per_step"] / r["step_time_s"] / (1e12 * jax.device_count()), rel=1e-6
    )
  assert peak_flops(s) == 1e12
  c.peak_flops = 0.0
  assert peak_flops(settings_of(c)) is None  # CPU: no table entry, so no mfu is logged


def test_build_run_abstract_is_the_same_step(assets):
  """``build_run(abstract=True)`` (the ahead-of-time path: no weights,
  tokenizer or data) builds the very step of the real run: the same static
  config, train state / teacher / batch shapes and shardings, FLOPs and
  lowered program."""
  from opd_jax.train import build_run

  c = tiny_config(assets)
  real = build_run(c)
  opd = real.phases["opd"]
  assert set(real.phases) == {"opd"} and opd.compiled is not None and real.tokenizer
  assert real.settings.total_steps == 3 and real.settings.data.max_prompt_len == 12
  sampling = opd.cfg.sampling
  ab = build_run(
    c,
    abstract=True,
    vocab_size=len(real.tokenizer),
    eos_ids=sampling.eos_ids,
    pad_id=sampling.pad_id,
  )
  a_opd = ab.phases["opd"]
  assert ab.tokenizer is None and a_opd.compiled is None and a_opd.it is None
  assert a_opd.cfg == opd.cfg and ab.vocab == real.vocab and a_opd.flops == opd.flops
  spec = lambda t: jax.tree.map(lambda x: (x.shape, x.dtype, x.sharding), t)
  assert spec(ab.state) == spec(real.state)
  assert spec(a_opd.teacher) == spec(opd.teacher)
  assert spec(a_opd.batch) == spec(opd.batch)
  assert (
    a_opd.fn.lower(*a_opd.args(ab.state)).as_text() == opd.fn.lower(*opd.args(real.state)).as_text()
  )


def test_sampling_and_decode_overrides_reach_the_step(assets, tmp_path, monkeypatch):
  """Command-line ``--config.sampling.prefix_sum`` is the compiled step's
  (student and teacher sampling: another lowered program) and the evals';
  the models' decode knobs are their ``ModelConfig`` s; a bad value stops
  ``build_run`` at start-up, naming the setting."""
  from opd_jax import configs_lib, evaluation
  from opd_jax.train import build_run, run_evals

  c = tiny_config(assets)
  c.evals.x = configs_lib.eval_config(num_examples=2)
  path = write_config_file(c, str(tmp_path / "c.py"))
  knobs = [
    "--config.student.decode_attention=dense",
    "--config.student.decode_contraction=dot",
    "--config.teacher.key_cache_layout=standard",
  ]
  runs = {
    m: build_run(
      _parse_cli([f"--config={path}", f"--config.sampling.prefix_sum={m}"] + knobs)[0],
      abstract=True,
    )
    for m in ("auto", "cumsum")
  }
  run = runs["cumsum"]
  cfg = run.phases["opd"].cfg
  assert cfg.sampling.prefix_sum == cfg.teacher_sampling.prefix_sum == "cumsum"
  assert runs["auto"].phases["opd"].cfg == dataclasses.replace(
    cfg,
    sampling=dataclasses.replace(cfg.sampling, prefix_sum="auto"),
    teacher_sampling=dataclasses.replace(cfg.teacher_sampling, prefix_sum="auto"),
  )
  text = {
    m: r.phases["opd"].fn.lower(*r.phases["opd"].args(r.state)).as_text() for m, r in runs.items()
  }
  assert text["cumsum"] != text["auto"]
  s, t = run.student_cfg, run.teacher_cfg
  assert (s.decode_attention, s.decode_contraction, s.key_cache_layout) == ("dense", "dot", "auto")
  assert (t.decode_attention, t.decode_contraction, t.key_cache_layout) == (
    "auto",
    "auto",
    "standard",
  )
  seen = {}

  def evaluator(*args, **kw):
    seen.update(kw)
    return {"accuracy": 1.0}

  monkeypatch.setattr(evaluation.EVALUATORS, "get", lambda name: evaluator)
  assert run_evals(run.settings, {"x": (None, [])}, None, None) == {"eval/x/accuracy": 1.0}
  assert seen["prefix_sum"] == "cumsum"
  with pytest.raises(ValueError, match=r"config\.sampling: prefix_sum='scan'; expected one of"):
    build_run(_parse_cli([f"--config={path}", "--config.sampling.prefix_sum=scan"])[0])


@pytest.mark.parametrize(
  "key",
  [
    "batch_size",
    "sampling.temperature",
    "student.remat",
    "teacher.attention_block",
    "optimizer.lr",
    "mesh.shape.data",
    "evals.x.num_examples",
    "cold_start.steps",
    "distributed.num_processes",
    "data.max_prompt_len",
    "loss.chunk",
  ],
)
def test_settings_reject_a_field_of_the_wrong_type(key):
  """``settings_of`` is where config fields are read: a value of the wrong
  type (a string where a number or bool belongs) stops ``build_run`` there,
  naming the field, before any model or file is touched."""
  import ml_collections

  from opd_jax import configs_lib
  from opd_jax.train import build_run

  c = configs_lib.base_config()
  c.evals.x = configs_lib.eval_config()
  c = ml_collections.ConfigDict(c.to_dict(), type_safe=False)
  *parents, leaf = key.split(".")
  node = c
  for p in parents:
    node = node[p]
  node[leaf] = "8"
  with pytest.raises(ValueError, match=rf"^config\.{re.escape(key)}='8' must be \w+, not str$"):
    build_run(c, abstract=True)


def test_settings_reject_an_unknown_spec_key():
  """A spec node (``config.optimizer``, a model, an eval, ...) holds exactly
  its fields: a key nothing reads is an error naming it."""
  from opd_jax import configs_lib
  from opd_jax.train import settings_of

  c = configs_lib.base_config()
  c.optimizer.unlock()
  c.optimizer.momentum = 0.9
  with pytest.raises(ValueError, match=r"config\.optimizer: unknown settings \['momentum'\]"):
    settings_of(c)


# -----------------------------------------------------------------------------
# Reliability at the edges: damaged checkpoints, non-finite steps.


def _damage(step_dir: str) -> None:
  """Overwrites the array data files of a checkpoint's state (a bad copy)."""
  n = 0
  for root, _, files in os.walk(os.path.join(step_dir, "state")):
    for name in files:
      if os.path.basename(root) == "d":  # OCDBT data files (.../d/<hash>)
        path = os.path.join(root, name)
        with open(path, "r+b") as f:
          f.write(b"\0" * os.path.getsize(path))
        n += 1
  assert n, f"no data files under {step_dir}/state"


def test_orphaned_reads_of_a_failed_restore_log_nothing(tmp_path):
  """asyncio's "Task exception was never retrieved" record for a read task of a
  checkpoint whose restore failed is dropped (the failure is reported once,
  with its step and path); the same record for any other task still logs."""
  import asyncio
  import gc
  import logging

  from opd_jax import checkpointing

  failed = str(tmp_path / "checkpoints" / "6")
  checkpointing._quiet_failed_read_tasks(failed)
  records = []

  class Keep(logging.Handler):
    def emit(self, record):
      records.append(record.getMessage())

  keep = Keep()
  logger = logging.getLogger("asyncio")
  logger.addHandler(keep)

  async def read(path):
    raise ValueError(f"DATA_LOSS: Error reading {path}/state/d/0: bad b-tree node")

  def orphan(path):
    loop = asyncio.new_event_loop()
    task = loop.create_task(read(path))
    loop.run_until_complete(asyncio.sleep(0))
    assert task.done()
    loop.close()
    del task
    gc.collect()

  try:
    orphan(failed)
    assert records == []
    orphan(str(tmp_path / "elsewhere"))
    assert len(records) == 1 and records[0].startswith("Task exception was never retrieved")
  finally:
    logger.removeHandler(keep)


def test_restore_skips_damaged_checkpoints(tmp_path):
  """The newest checkpoint that reads back whole is restored; a damaged one
  is reported and moved aside; none readable, or a missing
  ``config.restore_step``, is a RestoreError naming each checkpoint."""
  import jax.numpy as jnp

  from opd_jax import checkpointing

  directory = str(tmp_path / "checkpoints")

  def state(s):
    return {"w": jnp.full((8, 8), float(s)), "step": jnp.int32(s)}

  def manager():
    return checkpointing.Checkpointer(directory, save_every=2, max_to_keep=5)

  ck = manager()
  for s in (2, 4, 6):
    ck.save(s, state(s), {"opd": {"next_index": s}}, {"step": s})
  abstract = checkpointing.abstract_like(state(0))
  ck.close()
  _damage(os.path.join(directory, "6"))
  ck = manager()
  step, got, data_state, _ = ck.restore_newest(abstract)
  assert step == 4 and int(got["step"]) == 4 and data_state == {"opd": {"next_index": 4}}
  assert ck.manager.all_steps() == [2, 4]
  assert os.listdir(str(tmp_path / "checkpoints.damaged")) == ["6"]
  # An explicit step: the newer ones are set aside (the run saves them again).
  step, got, _, _ = ck.restore_newest(abstract, step=2)
  assert step == 2 and ck.manager.all_steps() == [2]
  with pytest.raises(
    checkpointing.RestoreError,
    match=r"config\.restore_step=3: there is no "
    r"checkpoint 3 in .*checkpoints \(checkpoints: \[2\]\)",
  ):
    ck.restore_newest(abstract, step=3)
  ck.close()
  _damage(os.path.join(directory, "2"))
  ck = manager()
  with pytest.raises(
    checkpointing.RestoreError,
    match=(
      r"no checkpoint of this run can be restored .*\n  checkpoint 2 \(.*checkpoints/2\): "
      r"ValueError: .*OCDBT(.|\n)*config\.restore_step=N restores one explicitly"
    ),
  ):
    ck.restore_newest(abstract)
  assert ck.manager.all_steps() == [2]  # nothing is replaced
  ck.close()
  empty = checkpointing.Checkpointer(str(tmp_path / "none"), save_every=1)
  assert empty.restore_newest(abstract) is None


def test_nonfinite_step_never_reaches_the_parameters(assets):
  """A teacher with NaN weights (a non-finite loss and gradient) injected
  into one compiled step: the student's parameters and the optimizer state
  are kept, the step is counted; the next finite step updates as usual."""
  import jax.numpy as jnp

  from opd_jax.train import build_run, global_batch

  run = build_run(tiny_config(assets))
  phase = run.phases["opd"]
  batch = global_batch(next(phase.it), run.sharder, run.settings.batch_size)
  copy = lambda t: jax.tree.map(jnp.copy, t)
  before = jax.device_get(run.state)
  bad_teacher = jax.tree.map(lambda x: x * jnp.nan, phase.teacher)
  state, m = phase.compiled(copy(run.state), bad_teacher, batch)
  assert not np.isfinite(float(m["loss"])) or not np.isfinite(float(m["grad_norm"]))
  assert (float(m["nonfinite_steps"]), float(m["nonfinite_in_a_row"])) == (1.0, 1.0)
  assert int(state.step) == 1
  same = jax.tree.map(
    lambda a, b: np.array_equal(a, b), before.params, jax.device_get(state.params)
  )
  assert all(jax.tree.leaves(same))
  inner = lambda s: jax.tree.leaves(jax.device_get(s.opt_state.inner_state))
  assert all(np.array_equal(a, b) for a, b in zip(inner(before), inner(state)))
  state, m = phase.compiled(state, phase.teacher, batch)
  assert np.isfinite(float(m["loss"])) and np.isfinite(float(m["grad_norm"]))
  assert (float(m["nonfinite_steps"]), float(m["nonfinite_in_a_row"])) == (1.0, 0.0)
  moved = jax.tree.map(
    lambda a, b: not np.array_equal(a, b), before.params, jax.device_get(state.params)
  )
  assert any(jax.tree.leaves(moved))
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(jax.device_get(state.params)))


@pytest.mark.slow
def test_diverging_run_stops_with_last_good_checkpoint(assets, tmp_path):
  """lr 1e30: step 1 is finite, then every loss / gradient is non-finite.
  Each is skipped and counted; after config.max_nonfinite_steps in a row the
  run stops with a message naming the setting and the last good checkpoint,
  which the streak never overwrote."""
  from opd_jax import checkpointing
  from opd_jax.train import NonFiniteError, build_run, train

  c = tiny_config(assets, total_steps=8, checkpoint_every=1, max_nonfinite_steps=3)
  c.optimizer.lr = 1e30
  workdir = str(tmp_path / "run")
  with pytest.raises(
    NonFiniteError,
    match=(
      r"step 4: 3 steps in a row with a non-finite loss or gradient .* the parameters are "
      r"those of step 1; the run stops \(config\.max_nonfinite_steps=3\)\. Last good state: "
      r"checkpoint 1 \(.*checkpoints/1\); lower config\.optimizer\.lr"
    ),
  ):
    train(c, workdir)
  recs = step_records(workdir)
  assert sorted(recs) == [1, 2, 3, 4]
  assert [recs[s]["nonfinite_steps"] for s in (1, 2, 3, 4)] == [0.0, 1.0, 2.0, 3.0]
  assert np.isfinite(recs[1]["loss"]) and not np.isfinite(recs[2]["grad_norm"])
  assert checkpoint_steps(workdir) == [1]
  run = build_run(c)
  ck = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), save_every=1)
  step, state, _, _ = ck.restore_newest(checkpointing.abstract_like(run.state))
  ck.close()
  assert step == 1 and int(state.step) == 1
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.params))


def _prompt_file(path, lines: list[bytes]) -> str:
  with open(path, "wb") as f:
    f.write(b"".join(line + b"\n" for line in lines))
  return str(path)


def test_driver_data_errors_name_file_line_and_settings(assets, tmp_path):
  """The driver's prompt set (``build_data``): bad bytes are a file:line error
  (skipped and counted with on_error=skip); an empty result names the files,
  the counts by reason and the config.data settings."""
  from transformers import AutoTokenizer

  from opd_jax.train import build_data, settings_of

  tok = AutoTokenizer.from_pretrained(assets["tokenizer"])
  good = [json.dumps({"prompt": f"{i}+1=", "answer": str(i + 1)}).encode() for i in range(8)]
  c = tiny_config(assets)
  c.data.train_files = _prompt_file(
    tmp_path / "bytes.jsonl", good[:1] + [b'{"prompt": "1\xff+1="}'] + good[1:]
  )
  with pytest.raises(
    ValueError,
    match=r"bytes\.jsonl:2: invalid UTF-8 .*\(config\.data\."
    r"on_error=skip skips such records",
  ):
    build_data(settings_of(c), tok)
  c.data.on_error = "skip"
  data, _ = build_data(settings_of(c), tok)
  assert len(data) == 8 and data.counts["num_skipped_invalid_utf8"] == 1
  assert data.stats["num_malformed_skipped"] == 1
  # Every prompt longer than max_prompt_len (overlong=drop).
  c.data.train_files = _prompt_file(
    tmp_path / "long.jsonl", [json.dumps({"prompt": "1+1=" * 10, "answer": "2"}).encode()] * 20
  )
  with pytest.raises(
    ValueError,
    match=(
      r"config\.data\.train_files: no prompt records left from .*long\.jsonl \(20 non-blank "
      r"lines read\): 20 longer than max_prompt_len=12 tokens \(overlong='drop'; the longest "
      r"has \d+ tokens.*\(settings: config\.data\.max_prompt_len / overlong / on_error"
    ),
  ):
    build_data(settings_of(c), tok)
  # An empty prompt file.
  c.data.train_files = _prompt_file(tmp_path / "empty.jsonl", [])
  with pytest.raises(
    ValueError,
    match=r"config\.data\.train_files: no prompt records left "
    r"from .*empty\.jsonl \(0 non-blank lines read\): 1 empty file\(s\)",
  ):
    build_data(settings_of(c), tok)


def test_logged_data_stats_count_skips_by_reason(runs, reference_run):
  """The reference run skips one invalid-JSON line: data/* at step 0 counts
  it by reason, beside the files read."""
  reference_run.records()
  step0 = [r for r in read_metrics(reference_run.workdir) if r["step"] == 0][0]
  assert step0["data/num_skipped_invalid_json"] == 1
  assert step0["data/num_skipped_missing_field"] == step0["data/num_skipped_invalid_utf8"] == 0
  assert step0["data/num_files"] == 1 and step0["data/num_empty_files"] == 0


@pytest.mark.parametrize(
  "case, message",
  [
    ("unknown_evaluator", r"config\.evals\.x\.evaluator: unknown evaluator 'nope'"),
    (
      "too_long",
      r"config\.evals\.x\.max_new_tokens: config\.data\.max_prompt_len \(12\) \+ "
      r"\d+ new tokens = \d+ exceeds the student's max_position_embeddings",
    ),
    ("math_without_file", r"config\.evals\.x\.data_file is empty and task 'math' cannot"),
  ],
)
def test_driver_fails_on_evals_that_cannot_run_before_step_1(assets, tmp_path, case, message):
  """Evals that cannot run stop ``train`` at start-up: nothing is compiled,
  logged or checkpointed."""
  from opd_jax import configs_lib
  from opd_jax.train import model_config_of, settings_of, train

  c = tiny_config(assets)
  c.evals.x = configs_lib.eval_config(num_examples=4)
  if case == "unknown_evaluator":
    c.evals.x.evaluator = "nope"
  elif case == "too_long":
    limit = model_config_of(settings_of(c).student).max_position_embeddings
    c.evals.x.max_new_tokens = limit - int(c.data.max_prompt_len) + 1
  else:
    c.evals.x.task = "math"
  workdir = tmp_path / "run"
  with pytest.raises(ValueError, match=message):
    train(c, str(workdir))
  assert not (workdir / "checkpoints").exists() and not (workdir / "metrics.jsonl").exists()


@pytest.mark.slow
def test_scheduled_loss_kwarg_logged_every_step_and_exact_across_resume(assets, tmp_path):
  """config.schedules: the value the step used is logged every step (step s
  runs at counter s − 1, like lr) and follows its schedule, a data mixture
  schedule too; a run stopped at 2 and resumed to 4 logs the same values and
  metrics as one of 4 (the data iterator resumes the curriculum exactly)."""
  from opd_jax import configs_lib, schedules
  from opd_jax.train import train

  spec = "linear:0.1:0.4:0:3"

  def config(total):  # + a curriculum: level-2 prompts' weight 0 -> 1
    c = tiny_config(
      assets,
      total_steps=total,
      schedules=(f"loss.alpha={spec};data.mixture.arithmetic/L2=linear:0:1:0:3"),
    )
    c.loss = configs_lib.loss_config("skew_kl", chunk=4)
    c.data.source_field = "source"
    c.data.mixture = {"arithmetic/L1": 1.0, "arithmetic/L2": 1.0}
    return c

  train(config(4), str(tmp_path / "a"))
  ra = step_records(str(tmp_path / "a"))
  want = [float(schedules.value(schedules.parse(spec), s - 1)) for s in (1, 2, 3, 4)]
  assert [ra[s]["schedule/loss.alpha"] for s in (1, 2, 3, 4)] == pytest.approx(want)
  assert want == pytest.approx([0.1, 0.2, 0.3, 0.4])
  assert [ra[s]["schedule/data.mixture.arithmetic/L2"] for s in (1, 2, 3, 4)] == pytest.approx(
    [0.0, 1 / 3, 2 / 3, 1.0]
  )
  for total in (2, 4):
    train(config(total), str(tmp_path / "b"))
  rb = step_records(str(tmp_path / "b"))
  assert_same_metrics(rb, ra, [1, 2, 3, 4])


def test_schedules_split_between_step_and_data():
  """data.mixture.<source> schedules go to the data pipeline (Settings),
  the rest to the step (OPDConfig); a data schedule needs a mixture."""
  from opd_jax import configs_lib, schedules
  from opd_jax.train import settings_of

  c = configs_lib.base_config()
  c.data.mixture = {"easy": 1.0, "hard": 1.0}
  c.schedules = "data.mixture.hard=linear:0:1:0:10;on_policy_fraction=step:0:5:1"
  s = settings_of(c)
  assert s.mixture_schedules == (("hard", schedules.parse("linear:0:1:0:10")),)
  assert s.on_policy_fraction == 0.0  # the scheduled λ's lowest value
  assert [t for t, _ in _step_config(c).schedules] == ["on_policy_fraction"]
  c.data.mixture = {}
  with pytest.raises(ValueError, match="need config.data.mixture"):
    settings_of(c)


# -----------------------------------------------------------------------------
# The loop's order of work (asynchronous metrics, batches prepared ahead).


class _Recorder:
  """Wraps a phase's executable and iterator and the loop's hooks so that
  the order of dispatches (D), batch reads (B) and hook runs (H) is logged."""

  def __init__(self, phase):
    self.events, self.phase = [], phase
    dispatches = [0]

    def compiled(*args):
      dispatches[0] += 1
      self.events.append(("D", dispatches[0]))
      return phase.compiled(*args)

    class It:
      def __init__(it):
        it.n = 0

      def __next__(it):
        it.n += 1
        self.events.append(("B", it.n))
        return next(phase.it)

      def get_state(it):  # what a checkpoint saves: the batches read so far
        return {"batches_read": it.n}

    self.wrapped = dataclasses.replace(phase, compiled=compiled, it=It())

  def hooks(self, state_every: int):
    from opd_jax.train import Hook

    log = lambda step, state, m: self.events.append(("H", step, state is not None))
    return [Hook(1, log), Hook(state_every, lambda *a: None, needs_state=True)]


class _Flag:
  def __init__(self, at: int, events):
    self.at, self.events = at, events

  def requested(self):
    return any(e[0] == "H" and e[1] == self.at for e in self.events)


class _FakeCheckpointer:
  def __init__(self):
    self.saved = []

  def save(self, step, state, data_state, meta, force=False):
    self.saved.append((step, int(state.step), data_state, force))


def _recorded_loop(assets, total: int, state_every: int, preempt_after: int = 0):
  from opd_jax import train as train_lib

  run = train_lib.build_run(tiny_config(assets, total_steps=total, data__prompt_buckets="none"))
  rec = _Recorder(run.phases["opd"])
  run = dataclasses.replace(run, phases={"opd": rec.wrapped})
  ckpt = _FakeCheckpointer()
  status, last, state = train_lib._loop(
    run,
    run.state,
    0,
    rec.hooks(state_every),
    [0],
    ckpt,
    _Flag(preempt_after, rec.events),
    None,
  )
  return rec.events, status, last, int(state.step), ckpt.saved


def test_loop_fetches_metrics_after_the_next_dispatch(assets):
  """Step n's hooks run after step n + 1 is dispatched (with no state),
  step n + 1's batch is read while step n runs; a step whose hooks read the
  state (every 3rd here) and the last step finish before the next dispatch."""
  events, status, last, step, saved = _recorded_loop(assets, total=5, state_every=3)
  assert events == [
    ("B", 1),
    ("D", 1),
    ("B", 2),
    ("D", 2),
    ("H", 1, False),
    ("B", 3),
    ("D", 3),
    ("H", 2, False),
    ("H", 3, True),
    ("B", 4),
    ("D", 4),
    ("B", 5),
    ("D", 5),
    ("H", 4, False),
    ("H", 5, True),
  ]
  assert (status, last["step"], step, saved) == ("finished", 5, 5, [])
  assert last["step_time_s"] > 0 and last["tokens_per_sec"] > 0


def test_loop_preemption_finishes_and_saves_the_step_in_flight(assets):
  """A pre-emption noticed while step 2's hooks run (step 3 in flight): step 3
  is finished with its state and saved (forced) with the data state of the
  3 batches its steps read; no further batch is read."""
  events, status, last, step, saved = _recorded_loop(
    assets, total=6, state_every=0, preempt_after=2
  )
  assert events[-3:] == [("D", 3), ("H", 2, False), ("H", 3, True)]
  assert ("B", 4) not in events
  assert (status, last["step"], step, saved) == (
    "preempted",
    3,
    3,
    [(3, 3, {"opd": {"batches_read": 3}}, True)],
  )


def test_prompt_buckets_parse_and_reject():
  from opd_jax.train import prompt_buckets

  assert prompt_buckets("auto", 64) == (8, 16, 32, 64)
  assert prompt_buckets("auto", 1024) == (128, 256, 512, 1024)
  assert prompt_buckets("auto", 12) == (8, 12)
  assert prompt_buckets("none", 64) == (64,)
  assert prompt_buckets("16, 32", 64) == (16, 32, 64)
  for bad in ("0,16", "128", "x", ","):
    with pytest.raises(ValueError, match="config.data.prompt_buckets"):
      prompt_buckets(bad, 64)


def test_bucketed_prompts_give_the_full_width_step(assets):
  """A batch trimmed to its prompt bucket (only padding columns dropped) runs
  the step of the full-width batch: same loss, tokens, lengths and update,
  through an executable compiled for the narrower width on first use."""
  import jax.numpy as jnp

  from opd_jax.train import build_run, global_batch, prompt_width, trim_prompts

  run = build_run(tiny_config(assets, data__prompt_buckets="4,8"))
  phase = run.phases["opd"]
  local = next(phase.it)
  width = prompt_width(local, run.settings.prompt_buckets)
  assert width < local["prompt_ids"].shape[1] == 12
  full = global_batch(local, run.sharder, 4)
  trimmed = global_batch(trim_prompts(local, width), run.sharder, 4)
  copy = lambda t: jax.tree.map(jnp.copy, t)
  exe, flops, _ = phase.executable(run.state, full)
  assert exe is phase.compiled and flops == phase.flops
  s_full, m_full = exe(copy(run.state), phase.teacher, full)
  exe_w, flops_w, compile_s = phase.executable(run.state, trimmed)
  assert exe_w is not phase.compiled and flops_w < flops and compile_s > 0
  assert phase.executable(run.state, trimmed)[0] is exe_w  # compiled once
  s_w, m_w = exe_w(copy(run.state), phase.teacher, trimmed)
  for k in ("num_tokens", "mean_response_length"):
    assert float(m_w[k]) == float(m_full[k]), k
  for k in ("loss", "grad_norm"):
    np.testing.assert_allclose(float(m_w[k]), float(m_full[k]), rtol=1e-5, err_msg=k)
  for a, b in zip(jax.tree.leaves(s_full.params), jax.tree.leaves(s_w.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_opd_grpo_run_verifies_in_the_step(assets, tmp_path):
  """loss=opd_grpo end to end: the batches carry the answers' token ids, the
  arithmetic task's JAX-native verifier runs inside the one compiled step,
  and the outcome metrics are logged every step."""
  from opd_jax import configs_lib
  from opd_jax.tasks.verify import ArithmeticVerifier
  from opd_jax.train import build_run, train

  c = tiny_config(assets, total_steps=2, sampling__num_samples=2)
  c.loss = configs_lib.loss_config("opd_grpo", chunk=4, alpha=0.5)
  run = build_run(c)
  assert isinstance(run.phases["opd"].cfg.verifier, ArithmeticVerifier)
  assert run.phases["opd"].batch["answer_ids"].shape[0] == c.batch_size
  train(c, str(tmp_path / "run"))
  recs = step_records(str(tmp_path / "run"))
  for step in (1, 2):
    r = recs[step]
    assert 0.0 <= r["outcome/reward_mean"] <= 1.0
    assert 0.0 <= r["outcome/zero_variance_groups"] <= 1.0
    assert r["outcome/advantage_distill"] == pytest.approx(-r["k1"])
    assert np.isfinite(r["outcome/advantage_outcome"]) and np.isfinite(r["loss"])
  c.loss.task = "nope"
  with pytest.raises(ValueError, match="config.loss.task"):
    build_run(c)


@pytest.mark.slow
def test_quickstart_end_to_end_small(tmp_path, monkeypatch, capsys):
  """The quickstart's whole path at reduced size (organisms 2x64 / 1x64 and
  a few OPD steps, so it stays well under the full run's ~3 minutes): every
  phase says what it does, the closing summary has the student's start -> end
  beside the teacher's, OPD lowers the per-token reverse KL, summary.png is
  written, and a rerun reuses every asset. The full run's gate (gap recovery
  >= 50% on every seed) is experiments/quickstart_check.py's, README."""
  import dataclasses

  from opd_jax import organisms, summary, train

  small = dataclasses.replace(
    organisms.QUICKSTART,
    teacher=organisms.Arch(num_layers=2, hidden_size=64),
    student=organisms.Arch(num_layers=1, hidden_size=64),
    teacher_steps=60,
    student_steps=40,
    teacher_examples=600,
    student_examples=400,
    prompt_examples=200,
    eval_examples=24,
  )
  monkeypatch.setattr(organisms, "QUICKSTART", small)
  c = _load_config_file("configs/quickstart.py", "steps=30")
  assert c.eval_teacher and c.summary and c.sampling.num_samples == 1
  c.batch_size, c.eval_every, c.progress_bar = 16, 0, False
  c.evals.hard.num_examples = 16
  wd = str(tmp_path / "qs")
  last = train.train(c, wd)
  out = capsys.readouterr().out
  assert last["status"] == "finished" and last["step"] == 30
  for what in ("tokenizer", "teacher_sft.jsonl", "student_sft.jsonl", "opd_prompts.jsonl"):
    assert re.search(rf"^made \S*{what} ", out, re.M), what
  for role in ("teacher (2x64)", "student (1x64)"):
    assert re.search(rf"^{re.escape(role)}: \d+ SFT steps .* L1 \d+% L2 \d+% L3 \d+%\)$", out, re.M)
  assert "== run summary: finished at step 30 ==" in out
  (row,) = summary.eval_table(read_metrics(wd))
  assert row["start_step"] == 0 and row["end_step"] == 30 and row["teacher"] is not None
  assert re.search(r"^hard +[\d.]+% -> +[\d.]+% +[\d.]+% ", out, re.M)
  kl = summary.kl_curve(read_metrics(wd), json.load(open(os.path.join(wd, "config.json"))))
  assert kl and kl[-1][1] < kl[0][1]  # OPD lowers the student-teacher reverse KL
  assert os.path.getsize(os.path.join(wd, summary.PNG_NAME)) > 0
  # A rerun (the finished run resumes at its last step) reuses every asset.
  train.train(c, wd)
  out = capsys.readouterr().out
  assert "made " not in out and out.count("reused ") == 6, out
