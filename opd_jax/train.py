"""Experiment driver.

    python -m opd_jax.train --config=configs/<name>.py[:arg=value,...] \
        --config.<key>=<value> --workdir=DIR

(also installed as ``opd-train``). Configs are locked: an override of a key
that does not exist is an error. The resolved config is saved in the workdir;
the latest checkpoint there is restored automatically.

:func:`build_run` is the one set-up (mesh, settings, tokenizer, models, data,
optimizer, train state, compiled phases) of the driver, the ahead-of-time
check (``abstract=True``: no weights, tokenizer or data) and the benchmarks;
:func:`train` is the loop over a :class:`Run` with periodic hooks (log, eval,
checkpoint).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import numbers
import os
import re
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging as absl_logging
from flax import nnx

from opd_jax import checkpointing, configs_lib, evaluation, optim
from opd_jax import data as data_lib
from opd_jax import flops as flops_lib
from opd_jax import losses as losses_lib
from opd_jax import schedules as schedules_lib
from opd_jax import teachers as teachers_lib
from opd_jax.logging_utils import MetricWriter
from opd_jax.opd_step import (
  OPDConfig,
  TrainState,
  common_vocab_size,
  distillm2_anchors,
  host_metrics,
  init_train_state,
  make_opd_step,
  optimizer_shardings,
)
from opd_jax.organisms import PREPARERS
from opd_jax.sampling import SamplingConfig
from opd_jax.sharding import Sharder, make_mesh, rules_from_config

BATCH_KEYS = ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "answer_ids")
ANSWER_TOKENS = 64  # answer_ids width of an outcome loss's batches (opd_grpo)


# -----------------------------------------------------------------------------
# The resolved config and its typed settings.


def resolve_config(config: ml_collections.ConfigDict, workdir: str) -> ml_collections.ConfigDict:
  """The run's resolved config (what is saved in the workdir): ``$WORKDIR``
  expanded, then the preparer's assets (``config.prepare``, see
  ``organisms.PREPARERS``). The loaded ``config`` is not modified."""
  config = configs_lib.expand_workdir(config, workdir)
  if config.get("prepare"):
    config = PREPARERS.get(config.prepare)(config, workdir, train)
  if config.cold_start.steps > 0 and not config.cold_start.rollouts_file:
    config = configs_lib.updated(
      config, {"cold_start.rollouts_file": os.path.join(workdir, "cold_start_rollouts.jsonl")}
    )
  return _resolve_distillm2_anchors(config, workdir)


_ANCHORS = ("anchor_teacher", "anchor_student")


def _resolve_distillm2_anchors(config, workdir: str):
  """DistiLLM-2's adaptive α with an anchor left unset (0): measured as the
  official trainer does, on the run's first logging window (its first
  ``log_every`` batches) with the initial models
  (:func:`measure_distillm2_anchors`), and written into the resolved config;
  a resumed run (checkpoints in the workdir) reads the ones its first start
  saved. A run with a cold start must set them (measured on the cold-started
  student: ``experiments/distillm2_anchors.py``)."""
  loss = config.loss
  if loss.get("name") != "distillm2" or loss.get("adaptive_alpha", False) is not True:
    return config
  unset = [k for k in _ANCHORS if not loss.get(k, 0.0)]
  if not unset:
    return config
  anchors, saved = None, os.path.join(workdir, "config.json")
  ckpts = os.path.join(workdir, "checkpoints")
  if os.path.isdir(ckpts) and os.listdir(ckpts) and os.path.exists(saved):
    with open(saved) as f:
      previous = json.load(f)["loss"]
    anchors = {k: float(previous.get(k) or 0.0) for k in _ANCHORS}
  if anchors is None:
    if config.cold_start.steps > 0:
      raise ValueError(
        f"config.loss.{' / '.join(unset)} unset with a cold start: measure the anchors on the "
        "cold-started student (experiments/distillm2_anchors.py) and set them"
      )
    anchors = measure_distillm2_anchors(config, num_batches=max(1, int(config.log_every)))
  bad = {k: anchors[k] for k in unset if not anchors[k] or anchors[k] <= 0}
  if bad:
    raise ValueError(
      f"config.loss: measured DistiLLM-2 anchors {bad} are not > 0 (the student does not trail "
      "the teacher on that row role): set them explicitly"
    )
  absl_logging.info("distillm2 adaptive α anchors: %s", {k: anchors[k] for k in unset})
  return configs_lib.updated(config, {f"loss.{k}": anchors[k] for k in unset})


def measure_distillm2_anchors(config, num_batches: int = 1, seed: int = 0) -> dict[str, float]:
  """DistiLLM-2's adaptive-α anchors {"anchor_teacher", "anchor_student"} of a
  resolved ``config``'s initial models over its first ``num_batches`` step
  batches (``opd_step.distillm2_anchors``: completions made as the step
  makes them, key ``seed``). ValueError when a role has no rows (needs
  0 < on_policy_fraction < 1) or for a multi-teacher run."""
  if config.loss.name != "distillm2":
    raise ValueError(f"config.loss.name={config.loss.name!r}: anchors are distillm2's")
  if num_batches < 1:
    raise ValueError(f"num_batches must be >= 1, got {num_batches}")
  # The step config must validate before the anchors exist.
  config = configs_lib.updated(config, {"loss.adaptive_alpha": False})
  run = build_run(config, compile_phases=False)
  if isinstance(run.teacher_graphdef, tuple):
    raise ValueError("distillm2 anchors: multi-teacher runs are not supported")
  phase, s = run.phases["opd"], run.settings
  batches = []
  for local in itertools.islice(phase.it, num_batches):
    local = trim_prompts(local, prompt_width(local, s.prompt_buckets))
    batches.append(global_batch(local, run.sharder, s.batch_size))
  anchors = distillm2_anchors(
    run.student(run.state),
    nnx.merge(run.teacher_graphdef, phase.teacher),
    batches,
    jax.random.key(seed),
    phase.cfg,
    vocab_size=run.vocab,
    sharder=run.sharder,
  )
  missing = [k for k, v in anchors.items() if v is None]
  if missing:
    raise ValueError(f"distillm2 anchors: no rows for {missing} (needs 0 < on_policy_fraction < 1)")
  return anchors


class NonFiniteError(RuntimeError):
  """``config.max_nonfinite_steps`` steps in a row had a non-finite loss or
  gradient (each was skipped; see ``optim.skip_nonfinite``)."""


_REQUIRED = object()
_KINDS = {"int": int, "float": float, "bool": bool, "str": str}


class _Fields:
  """Typed reads of one ConfigDict node (``at``: its name in errors,
  ``config.data``): the only place a config field is converted."""

  def __init__(self, node, at: str = "config"):
    self.node, self.at = node, at

  def __call__(self, key: str, kind: type, default: Any = _REQUIRED):
    """``node.<key>`` (dotted) as ``kind`` (int, float, bool or str; an int
    is a float too); ValueError naming the setting when it is not one."""
    *parents, leaf = key.split(".")
    node = self.node
    for name in parents:
      node = node[name]
    return self.leaf(leaf, kind, default, node=node, at=".".join([self.at, *parents]))

  def leaf(self, key: str, kind: type, default: Any = _REQUIRED, *, node=None, at=None):
    """``node[key]`` (``key`` as is: a mixture source may hold dots) as ``kind``."""
    node, at = self.node if node is None else node, at or self.at
    v = node[key] if default is _REQUIRED else node.get(key, default)
    if kind is bool:
      ok = isinstance(v, (bool, np.bool_))
    elif kind in (int, float):  # numpy scalars too; a bool is no number here
      ok = isinstance(v, numbers.Integral if kind is int else numbers.Real)
      ok = ok and not isinstance(v, (bool, np.bool_))
    else:
      ok = isinstance(v, kind)
    if not ok:
      raise ValueError(f"{at}.{key}={v!r} must be {kind.__name__}, not {type(v).__name__}")
    return kind(v)


def _read_spec(cls, fields: _Fields, **given):
  """``cls`` (a spec dataclass) from a config node: each field not ``given``
  is read as its annotated kind; a key of the node that is no field is an
  error naming it (the node is the spec, nothing is ignored)."""
  names = [f.name for f in dataclasses.fields(cls)]
  unknown = sorted(set(fields.node.keys()) - set(names))
  if unknown:
    raise ValueError(f"{fields.at}: unknown settings {unknown}; valid: {names}")
  read = {
    f.name: fields.leaf(f.name, _KINDS[f.type])
    for f in dataclasses.fields(cls)
    if f.name not in given
  }
  return cls(**read, **given)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """``config.student`` / ``config.teacher``: the checkpoint directory and the
  model knobs (``ModelConfig`` fields, see ``configs_lib.model_config``)."""

  name: str  # "student" or "teacher"
  path: str
  dtype: str
  param_dtype: str
  vocab_pad_multiple: int
  remat: bool
  scan_layers: bool
  attention: str
  attention_block: int
  attention_key_block: int
  decode_attention: str
  decode_block: int
  decode_phase_slots: int
  decode_contraction: str
  key_cache_layout: str

  def kwargs(self) -> dict[str, Any]:
    """The keyword arguments of ``models.from_hf`` / ``hf_io.config_from_hf``."""
    return {
      f.name: getattr(self, f.name)
      for f in dataclasses.fields(self)
      if f.name not in ("name", "path")
    }


def model_spec(node, name: str = "student") -> ModelSpec:
  """``config.<name>`` (a ``configs_lib.model_config`` node) -> :class:`ModelSpec`."""
  return _read_spec(ModelSpec, _Fields(node, f"config.{name}"), name=name)


@dataclasses.dataclass(frozen=True)
class MeshSpec:
  """``config.mesh``: axis sizes (one may be -1: the rest) and the logical
  axis rules (``sharding.DEFAULT_RULES`` updated by ``mesh.rules``)."""

  shape: tuple[tuple[str, int], ...]
  rules: tuple[tuple[str, Any], ...]


@dataclasses.dataclass(frozen=True)
class DistributedSpec:
  """``config.distributed`` (``jax.distributed.initialize``)."""

  coordinator_address: str  # "": JAX's own detection
  num_processes: int  # <= 1: a single process
  process_id: int  # -1: $OPD_PROCESS_ID, else JAX's detection
  local_device_ids: tuple[int, ...]  # (): all


def distributed_spec(config) -> DistributedSpec:
  """``config.distributed`` -> :class:`DistributedSpec` (also read before the
  config is resolved: the processes come first)."""
  f = _Fields(config.distributed, "config.distributed")
  ids = f("local_device_ids", str)
  try:
    local = tuple(int(x) for x in ids.split(",")) if ids else ()
  except ValueError:
    raise ValueError(f"config.distributed.local_device_ids={ids!r}: comma-separated ints") from None
  return _read_spec(DistributedSpec, f, local_device_ids=local)


@dataclasses.dataclass(frozen=True)
class OptimizerSpec:
  """``config.optimizer`` (``optim.make_optimizer`` reads these fields)."""

  name: str
  lr: float
  schedule: str
  warmup_steps: int
  total_steps: int  # resolved (config 0: config.total_steps)
  end_lr_factor: float
  b1: float
  b2: float
  eps: float
  weight_decay: float
  grad_clip: float  # 0: no clipping
  decay_matrices_only: bool
  skip_nonfinite: bool


@dataclasses.dataclass(frozen=True)
class EvalSpec:
  """One entry of ``config.evals`` (``name`` is its key)."""

  name: str
  evaluator: str
  task: str
  data_file: str
  num_examples: int
  levels: str  # "1+2": the generated levels ("": the task's)
  pattern: str
  num_samples: int
  temperature: float  # 0: greedy
  top_p: float
  max_new_tokens: int  # resolved (config 0: sampling.max_new_tokens)
  batch_size: int
  seed: int


@dataclasses.dataclass(frozen=True)
class ColdStartSpec:
  """``config.cold_start``: SFT on verified teacher rollouts for ``steps``."""

  steps: int
  task: str
  prompts_file: str  # "": data.train_files
  rollouts_file: str  # resolved by resolve_config
  attempts: int
  keep_per_prompt: int
  temperature: float
  top_p: float
  max_prompts: int  # 0: all


@dataclasses.dataclass(frozen=True)
class Settings:
  """The run's ConfigDict converted once into typed fields and specs (the
  loop's, the models', the mesh's, the optimizer's, the data's, the step's,
  the evals' and the cold start's); every set-up helper reads these."""

  seed: int
  batch_size: int
  total_steps: int
  log_every: int
  eval_every: int  # 0: only at the end
  eval_at_start: bool
  checkpoint_every: int
  keep_checkpoints: int
  restore_step: int  # 0: the newest checkpoint that reads back whole
  max_nonfinite_steps: int  # non-finite steps in a row (each skipped) that stop the run
  export_hf: bool
  progress_bar: bool
  name: str  # the progress bar's label ("": "opd")
  summary: bool  # the closing summary (summary.py)
  eval_teacher: bool  # the evals on the teacher once at the start
  peak_flops: float  # 0: from the device kind
  student: ModelSpec
  teacher: ModelSpec
  tokenizer: str  # config.tokenizer, else the student's directory ("": none)
  mesh: MeshSpec
  distributed: DistributedSpec
  optimizer: OptimizerSpec
  # The compiled step's static config; its sampling configs stop on no id yet
  # (see sampling_config / opd_config: the ids come from the tokenizer).
  step: OPDConfig
  teachers: tuple  # teachers.TeacherSpec per config.teachers.<name> (): one teacher
  ignore_eos: bool  # sampling.ignore_eos: no EOS id (every row runs max_new_tokens)
  data: data_lib.DataOptions
  prompt_buckets: tuple[int, ...]  # ascending prompt widths, the last max_prompt_len
  train_files: str
  num_epochs: int | None  # None: repeat forever
  mixture: dict[str, float] | None
  mixture_schedules: tuple  # ((source, schedules.Schedule), ...): "data.mixture.<source>"
  new_tokens: int  # sampling.max_new_tokens
  completion_len: int  # data.max_completion_len (0: new_tokens)
  on_policy_fraction: float  # GKD λ (a scheduled one: its lowest value)
  off_policy_source: str  # "dataset" or "teacher"
  use_teacher: bool  # the loss, the metrics or the off-policy rows read it
  evals: tuple[EvalSpec, ...]
  cold_start: ColdStartSpec


def _sampling_of(f: _Fields) -> tuple[SamplingConfig, SamplingConfig]:
  """``config.sampling`` / ``config.teacher_sampling`` -> the student's and the
  teacher's :class:`SamplingConfig` (no stop ids yet)."""
  knobs = dict(
    max_new_tokens=f("sampling.max_new_tokens", int),
    temperature=f("sampling.temperature", float),
    top_k=f("sampling.top_k", int),
    top_p=f("sampling.top_p", float),
    num_samples=f("sampling.num_samples", int),
    prefix_sum=f("sampling.prefix_sum", str, "auto"),
  )
  teacher = dict(
    temperature=f("teacher_sampling.temperature", float),
    top_k=f("teacher_sampling.top_k", int),
    top_p=f("teacher_sampling.top_p", float),
  )
  try:
    sampling = SamplingConfig(**knobs)
  except ValueError as e:  # SamplingConfig's own checks
    raise ValueError(f"config.sampling: {e}") from None
  try:
    return sampling, dataclasses.replace(sampling, **teacher)
  except ValueError as e:
    raise ValueError(f"config.teacher_sampling: {e}") from None


def _step_of(f: _Fields, config, schedules: tuple) -> OPDConfig:
  """The step's :class:`OPDConfig` (``schedules``: the step's, not the data's)."""
  sampling, teacher_sampling = _sampling_of(f)
  return OPDConfig(
    sampling=sampling,
    loss=f("loss.name", str),
    loss_kwargs=tuple(sorted(configs_lib.loss_kwargs(config.loss).items())),
    aggregation=f("loss.aggregation", str),
    normalizer=f("loss.normalizer", float) or None,
    on_policy_fraction=f("on_policy_fraction", float),
    off_policy_source=f("off_policy_source", str),
    teacher_sampling=teacher_sampling,
    loss_chunk=f("loss.chunk", int),
    loss_chunk_budget_mib=f("loss.chunk_budget_mib", float),
    metrics=f("metrics.enabled", bool),
    metrics_top_k=f("metrics.top_k", int),
    position_chunk=f("metrics.position_chunk", int),
    micro_batches=f("micro_batches", int),
    schedules=schedules,
  )


def _eval_spec(name: str, node, new_tokens: int) -> EvalSpec:
  """``config.evals.<name>`` -> :class:`EvalSpec` (``max_new_tokens`` 0:
  ``new_tokens``, the run's)."""
  f = _Fields(node, f"config.evals.{name}")
  return _read_spec(EvalSpec, f, name=name, max_new_tokens=f("max_new_tokens", int) or new_tokens)


def settings_of(config) -> Settings:
  """``config`` -> :class:`Settings` (the one place its fields are cast;
  a field of the wrong type is a ValueError naming it)."""
  f = _Fields(config)
  n = f("sampling.max_new_tokens", int)
  evals = tuple(_eval_spec(name, e, n) for name, e in config.evals.items())
  scheduled = schedules_lib.parse_all(f("schedules", str, ""))
  lam_schedule = dict(scheduled).get("on_policy_fraction")
  data_key = "data.mixture."
  mixture_schedules = tuple((t[len(data_key) :], v) for t, v in scheduled if t.startswith(data_key))
  m = _Fields(config.data.mixture, "config.data.mixture")
  mixture = {k: m.leaf(k, float) for k in config.data.mixture.keys()}
  if mixture_schedules and not mixture:
    raise ValueError(
      "schedules on data.mixture.<source> need config.data.mixture (the "
      "sources and their static weights)"
    )
  step = _step_of(f, config, tuple((t, v) for t, v in scheduled if not t.startswith(data_key)))
  lam, source = step.on_policy_fraction, step.off_policy_source
  if lam_schedule is not None:  # a scheduled λ: data / teacher for its lowest value
    lam = min(lam_schedule.values)
  max_completion_len = f("data.max_completion_len", int)
  completion_field = f("data.completion_field", str)
  student = model_spec(config.student, "student")
  total_steps = f("total_steps", int)
  shape = _Fields(config.mesh.shape, "config.mesh.shape")
  return Settings(
    seed=f("seed", int),
    batch_size=f("batch_size", int),
    total_steps=total_steps,
    log_every=f("log_every", int),
    eval_every=f("eval_every", int),
    eval_at_start=f("eval_at_start", bool, False),
    checkpoint_every=f("checkpoint_every", int),
    keep_checkpoints=f("keep_checkpoints", int),
    restore_step=f("restore_step", int),
    max_nonfinite_steps=f("max_nonfinite_steps", int),
    export_hf=f("export_hf", bool),
    progress_bar=f("progress_bar", bool),
    name=f("name", str, ""),
    summary=f("summary", bool, False),
    eval_teacher=f("eval_teacher", bool, False),
    peak_flops=f("peak_flops", float),
    student=student,
    teacher=model_spec(config.teacher, "teacher"),
    tokenizer=f("tokenizer", str) or student.path,
    mesh=MeshSpec(
      shape=tuple((k, shape.leaf(k, int)) for k in config.mesh.shape.keys()),
      rules=rules_from_config(config.mesh.rules),
    ),
    distributed=distributed_spec(config),
    optimizer=_read_spec(
      OptimizerSpec,
      _Fields(config.optimizer, "config.optimizer"),
      total_steps=f("optimizer.total_steps", int) or total_steps,
    ),
    step=step,
    teachers=teacher_specs(config),
    ignore_eos=f("sampling.ignore_eos", bool, False),
    data=data_lib.DataOptions(
      max_prompt_len=f("data.max_prompt_len", int),
      max_completion_len=max_completion_len or n if completion_field else None,
      prompt_field=f("data.prompt_field", str),
      completion_field=completion_field or None,
      answer_field=f("data.answer_field", str) or None,
      source_field=f("data.source_field", str) or None,
      use_chat_template=f("data.use_chat_template", bool),
      overlong=f("data.overlong", str),
      on_error=f("data.on_error", str),
    ),
    prompt_buckets=prompt_buckets(f("data.prompt_buckets", str), f("data.max_prompt_len", int)),
    train_files=f("data.train_files", str),
    num_epochs=f("data.num_epochs", int) or None,
    mixture=mixture or None,
    mixture_schedules=mixture_schedules,
    new_tokens=n,
    completion_len=max_completion_len or n,
    on_policy_fraction=lam,
    off_policy_source=source,
    use_teacher=(
      losses_lib.needs_teacher(step.loss) or step.metrics or (lam < 1 and source == "teacher")
    ),
    evals=evals,
    cold_start=_read_spec(ColdStartSpec, _Fields(config.cold_start, "config.cold_start")),
  )


def prompt_buckets(spec: str, max_len: int) -> tuple[int, ...]:
  """``config.data.prompt_buckets`` -> ascending prompt widths ending at
  ``max_len``: ``"auto"`` is ``max_len`` and its halves down to ``max_len /
  8`` (rounded up to multiples of 8, at least 8); ``"none"`` only ``max_len``;
  otherwise a comma list of widths <= ``max_len`` (``max_len`` is added)."""
  if spec == "none":
    return (max_len,)
  if spec == "auto":
    widths = {max(8, -(-(max_len >> k) // 8) * 8) for k in range(1, 4)}
  else:
    try:
      widths = {int(x) for x in spec.split(",") if x.strip()}
    except ValueError:
      widths = {0}
    if not widths or min(widths) <= 0 or max(widths) > max_len:
      raise ValueError(
        f"config.data.prompt_buckets={spec!r}: expected 'auto', 'none' or a comma list of "
        f"positive widths <= data.max_prompt_len={max_len}"
      )
  return tuple(sorted(w for w in widths | {max_len} if w <= max_len))


def prompt_width(local: dict[str, np.ndarray], buckets: tuple[int, ...]) -> int:
  """The smallest bucket holding every prompt of the global batch (the
  processes' longest prompts are gathered when there are several)."""
  longest = int(np.asarray(local["prompt_mask"]).sum(axis=1).max(initial=0))
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    longest = int(np.max(multihost_utils.process_allgather(np.int32(longest))))
  return next(w for w in buckets if w >= longest)


def trim_prompts(local: dict[str, np.ndarray], width: int) -> dict[str, np.ndarray]:
  """Left-padded ``[B, P]`` prompts -> their last ``width`` columns (only
  padding is dropped: ``width`` holds the longest prompt)."""
  out = dict(local)
  for key in ("prompt_ids", "prompt_mask"):
    out[key] = np.asarray(local[key])[:, local[key].shape[1] - width :]
  return out


# -----------------------------------------------------------------------------
# Set-up pieces.


def init_distributed(spec: DistributedSpec) -> None:
  """``jax.distributed.initialize`` from ``config.distributed`` (or JAX's own
  env detection)."""
  if spec.num_processes <= 1:
    return
  if jax.distributed.is_initialized() if hasattr(jax.distributed, "is_initialized") else False:
    return
  pid = spec.process_id
  if pid < 0:
    pid = int(os.environ.get("OPD_PROCESS_ID", "-1"))
  kwargs: dict[str, Any] = dict(num_processes=spec.num_processes)
  if spec.coordinator_address:
    kwargs["coordinator_address"] = spec.coordinator_address
  if pid >= 0:
    kwargs["process_id"] = pid
  if spec.local_device_ids:
    kwargs["local_device_ids"] = list(spec.local_device_ids)
  if not jax.config.jax_cpu_collectives_implementation:  # CPU cross-process collectives
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(**kwargs)


def save_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  if jax.process_index() != 0:
    return
  os.makedirs(workdir, exist_ok=True)
  for name, text in (
    ("config.json", config.to_json_best_effort(indent=2, sort_keys=True)),
    ("config.txt", str(config)),
  ):
    tmp = os.path.join(workdir, name + ".tmp")
    with open(tmp, "w") as f:
      f.write(text)
    os.replace(tmp, os.path.join(workdir, name))


def _tokenizer(settings: Settings):
  from transformers import AutoTokenizer

  if not settings.tokenizer:
    raise ValueError("no tokenizer: set config.tokenizer or config.student.path")
  return AutoTokenizer.from_pretrained(settings.tokenizer)


def _model_path(spec: ModelSpec) -> str:
  if not spec.path:
    raise ValueError(f"model path is empty (config.{spec.name}.path)")
  return spec.path


def model_config_of(spec: ModelSpec, *, num_layers: int = 0):
  """The ``ModelConfig`` of ``spec`` (``config.student`` / ``teacher``) from
  its ``config.json`` alone; ``num_layers > 0`` overrides the depth
  (compile-only checks at reduced depth)."""
  from opd_jax.models.hf_io import config_from_hf

  cfg = config_from_hf(_model_path(spec), **spec.kwargs())
  return dataclasses.replace(cfg, num_layers=num_layers) if num_layers else cfg


def teacher_specs(config) -> tuple[teachers_lib.TeacherSpec, ...]:
  """``config.teachers`` -> typed :class:`teachers.TeacherSpec` s (multi-teacher
  OPD; () for the single ``config.teacher``); start-up errors name the setting.
  Read by :func:`settings_of` (``Settings.teachers``)."""
  knobs = lambda node: model_spec(
    ml_collections.ConfigDict({**node, "path": ""}), "teachers.<name>"
  ).kwargs()
  return teachers_lib.teacher_specs(config, knobs)


def _load(spec: ModelSpec, sharder: Sharder):
  from opd_jax.models import from_hf

  return from_hf(_model_path(spec), mesh=sharder.mesh, rules=sharder.rules, **spec.kwargs())


def make_sharder(mesh: MeshSpec) -> Sharder:
  """``config.mesh`` -> a :class:`Sharder` over all devices."""
  return Sharder(make_mesh(dict(mesh.shape)), mesh.rules)


def vocab_of(student_cfg, teacher_cfg=None, tokenizer_size: int | None = None) -> int:
  """The vocabulary the step works over (see ``opd_step.common_vocab_size``)."""
  if teacher_cfg is not None:
    return common_vocab_size(student_cfg, teacher_cfg, tokenizer_size)
  return min(tokenizer_size, student_cfg.vocab_size) if tokenizer_size else (student_cfg.vocab_size)


def make_optimizer(spec: OptimizerSpec):
  """``config.optimizer`` -> ``(tx, schedule)`` (``optim.make_optimizer``)."""
  return optim.make_optimizer(spec)


def batch_sharding(sharder: Sharder, shape: tuple[int, ...]):
  """Rows over the data axes, the rest replicated."""
  return sharder.named(("activation_batch",) + (None,) * (len(shape) - 1), shape)


def batch_specs(settings: Settings, sharder: Sharder) -> dict[str, jax.ShapeDtypeStruct]:
  """The step's batch as sharded ``ShapeDtypeStruct`` s: ``[B, P]`` prompts
  (and ``[B, N]`` dataset completions when off-policy rows read them)."""
  s = settings
  b, p, n = s.batch_size, s.data.max_prompt_len, s.completion_len
  keys = [("prompt_ids", jnp.int32, p), ("prompt_mask", jnp.bool_, p)]
  if s.on_policy_fraction < 1 and s.off_policy_source == "dataset":
    keys += [("completion_ids", jnp.int32, n), ("completion_mask", jnp.bool_, n)]
  if losses_lib.needs_outcome(s.step.loss):
    keys += [("answer_ids", jnp.int32, ANSWER_TOKENS)]
  return {
    k: jax.ShapeDtypeStruct((b, w), dt, sharding=batch_sharding(sharder, (b, w)))
    for k, dt, w in keys
  }


def sft_config(step_cfg: OPDConfig) -> OPDConfig:
  """The cold-start phase's step: SFT on dataset completions, no teacher."""
  return dataclasses.replace(
    step_cfg,
    loss="sft",
    loss_kwargs=(),
    on_policy_fraction=0.0,
    off_policy_source="dataset",
    metrics=False,
    schedules=(),
    teachers=(),
  )


def sampling_config(
  settings: Settings, tokenizer=None, student_cfg=None, *, eos_ids=(), pad_id: int = 0
) -> SamplingConfig:
  """``config.sampling`` (``settings.step.sampling``) with its stop ids: EOS
  and pad ids from the tokenizer and the student's config
  (``evaluation.sampling_config``, as the evals and prompt selection), or
  ``eos_ids``/``pad_id`` without a tokenizer; ``sampling.ignore_eos``: no EOS
  id (every row runs ``max_new_tokens``)."""
  knobs = dataclasses.asdict(settings.step.sampling)
  del knobs["eos_ids"], knobs["pad_id"]
  if tokenizer is not None:
    out = evaluation.sampling_config(tokenizer, student_cfg, **knobs)
  else:
    out = SamplingConfig(eos_ids=tuple(eos_ids), pad_id=pad_id, **knobs)
  return dataclasses.replace(out, eos_ids=()) if settings.ignore_eos else out


def outcome_verifier(settings: Settings, tokenizer=None):
  """The in-step verifier of an outcome loss (opd_grpo) from its ``task``
  keyword (``config.loss.task``; ``tasks.verify.make_verifier``; without a
  tokenizer, e.g. for the abstract lowering, the task's host verifier), else
  None."""
  step = settings.step
  if not losses_lib.needs_outcome(step.loss):
    return None
  from opd_jax.tasks import get_task, verify  # pylint: disable=import-outside-toplevel

  name = dict(step.loss_kwargs).get("task", "arithmetic")
  try:
    task = get_task(name)
  except ValueError as e:
    raise ValueError(f"config.loss.task: {e}") from None
  if tokenizer is None:
    return verify.HostVerifier(task, None)
  return verify.make_verifier(task, tokenizer)


def opd_config(settings: Settings, sampling: SamplingConfig, verifier=None) -> OPDConfig:
  """The step's :class:`OPDConfig` (``settings.step``) sampling with
  ``sampling`` (:func:`sampling_config`); the teacher's sampling is the same
  with ``config.teacher_sampling``'s temperature, top-k and top-p.
  ``verifier``: an outcome loss's in-step verifier (default
  :func:`outcome_verifier` without a tokenizer)."""
  if verifier is None:
    verifier = outcome_verifier(settings)
  ts = settings.step.teacher_sampling
  return dataclasses.replace(
    settings.step,
    sampling=sampling,
    verifier=verifier,
    teacher_sampling=dataclasses.replace(
      sampling, temperature=ts.temperature, top_k=ts.top_k, top_p=ts.top_p
    ),
  )


def build_data(settings: Settings, tokenizer, answers: bool = False, teachers=()):
  """The OPD phase's prompts (:class:`data.PromptData`) and their iterator
  (``answers``: batches carry ``answer_ids``, for an in-step verifier); with
  ``teachers`` (``Settings.teachers``), each batch holds every teacher's
  fixed rows in order (``teachers.groups``)."""
  if not settings.train_files:
    raise ValueError("config.data.train_files is empty")
  try:
    data = data_lib.PromptData.build(settings.train_files, tokenizer, settings.data)
  except ValueError as e:  # a bad record, "file:line: ..."
    if settings.data.on_error == "skip" or not re.search(r":\d+: ", str(e)):
      raise
    raise ValueError(
      f"{e} (config.data.on_error=skip skips such records, counted in the logged data/* stats)"
    ) from None
  if len(data) == 0:  # the settings are config.data.<option>
    raise ValueError(
      f"config.data.train_files: {data.empty_reason()} (settings: "
      "config.data.max_prompt_len / overlong / on_error / prompt_field)"
    )
  if answers:
    from opd_jax.tasks.verify import encode_answers  # pylint: disable=import-outside-toplevel

    try:
      answer_ids = encode_answers(data.answers, tokenizer, ANSWER_TOKENS)
    except ValueError as e:
      raise ValueError(f"config.data.answer_field: {e}") from None
    data = dataclasses.replace(data, answer_ids=answer_ids)
  it = data.iterator(
    settings.batch_size,
    seed=settings.seed,
    num_epochs=settings.num_epochs,
    mixture=settings.mixture,
    mixture_schedules=dict(settings.mixture_schedules) or None,
    groups=teachers_lib.groups(teachers, data.source_names, settings.mixture) if teachers else None,
  )
  return data, it


def global_batch(local: dict[str, np.ndarray], sharder: Sharder, global_batch_size: int):
  """Per-process numpy rows -> global jax arrays sharded over the data axes."""
  out = {}
  for key in BATCH_KEYS:
    if key in local:
      x = np.asarray(local[key])
      shape = (global_batch_size,) + x.shape[1:]
      sharding = batch_sharding(sharder, shape)
      out[key] = jax.make_array_from_process_local_data(sharding, x, shape)
  return out


def cold_start_data(settings: Settings, tokenizer, teacher, new_tokens: int):
  """The cold-start SFT set: verified teacher rollouts (made once, cached in
  ``config.cold_start.rollouts_file``) and its iterator."""
  from opd_jax.cold_start import make_teacher_rollouts
  from opd_jax.tasks import get_task

  cs, opts = settings.cold_start, settings.data
  path = cs.rollouts_file
  if not os.path.exists(path):
    if teacher is None:
      raise ValueError("cold start needs a teacher (config.teacher.path)")
    records = []
    for f in data_lib.expand_paths(cs.prompts_file or settings.train_files):
      records += data_lib.read_jsonl(f)
    records = records[: cs.max_prompts or None]
    stats = make_teacher_rollouts(
      teacher,
      tokenizer,
      records,
      get_task(cs.task),
      out_file=path,
      attempts=cs.attempts,
      keep_per_prompt=cs.keep_per_prompt,
      temperature=cs.temperature,
      top_p=cs.top_p,
      max_new_tokens=new_tokens,
      batch_size=settings.batch_size,
      seed=settings.seed,
      max_prompt_len=opts.max_prompt_len,
      use_chat_template=opts.use_chat_template,
      prefix_sum=settings.step.sampling.prefix_sum,
    )
    absl_logging.info("cold-start rollouts: %s", stats)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils

      multihost_utils.sync_global_devices("cold_start_rollouts")
  sft_opts = dataclasses.replace(
    opts, max_completion_len=new_tokens, completion_field="completion", source_field=None
  )
  sft_data = data_lib.PromptData.build(path, tokenizer, sft_opts)
  return sft_data, sft_data.iterator(settings.batch_size, seed=settings.seed)


def eval_examples(spec: EvalSpec, task) -> list[dict]:
  if spec.data_file:
    return data_lib.read_jsonl(spec.data_file)[: spec.num_examples or None]
  levels = [int(x) for x in spec.levels.split("+") if x] or None
  return task.generate(
    spec.num_examples, seed=spec.seed, levels=levels, pattern=spec.pattern, split="eval"
  )


def _check_files(setting: str, paths) -> None:
  try:
    data_lib.expand_paths(paths)
  except FileNotFoundError as e:
    raise ValueError(f"{setting}: {e}") from None


def check_run_settings(settings: Settings, student_cfg, teacher_cfg=None) -> None:
  """Start-up checks of the data and length settings of the step (before
  anything is loaded or compiled); ValueError naming the setting.

  ``config.data.train_files`` (and ``config.cold_start.prompts_file``) must
  exist, ``config.max_nonfinite_steps`` >= 1 and ``config.restore_step`` >= 0,
  the cold start's task must be registered, and
  ``data.max_prompt_len + sampling.max_new_tokens`` must fit in the student's
  and the teacher's ``max_position_embeddings``.
  """
  from opd_jax.tasks import TASKS

  check_lengths(settings, student_cfg, teacher_cfg)
  s = settings
  if not s.train_files:
    raise ValueError("config.data.train_files is empty")
  _check_files("config.data.train_files", s.train_files)
  if s.max_nonfinite_steps < 1:
    raise ValueError(
      f"config.max_nonfinite_steps={s.max_nonfinite_steps} must be >= 1 "
      "(non-finite steps in a row, each skipped, that stop the run)"
    )
  if s.restore_step < 0:
    raise ValueError(
      f"config.restore_step={s.restore_step} must be >= 0 (0: the newest "
      "checkpoint that reads back whole)"
    )
  cs = s.cold_start
  if cs.steps > 0:
    if cs.task not in TASKS:
      raise ValueError(
        f"config.cold_start.task: unknown task {cs.task!r}; valid tasks: {', '.join(TASKS.names())}"
      )
    if cs.prompts_file:
      _check_files("config.cold_start.prompts_file", cs.prompts_file)


def check_lengths(settings: Settings, student_cfg, teacher_cfg=None) -> None:
  """``data.max_prompt_len + sampling.max_new_tokens`` fits in the student's
  and the teacher's ``max_position_embeddings`` (ValueError otherwise)."""
  p, n = settings.data.max_prompt_len, settings.new_tokens
  for spec, cfg in ((settings.student, student_cfg), (settings.teacher, teacher_cfg)):
    name = spec.name
    if cfg is not None and p + n > cfg.max_position_embeddings:
      where = f" ({spec.path})" if spec.path else ""
      raise ValueError(
        f"config.data.max_prompt_len ({p}) + config.sampling.max_new_tokens ({n}) = "
        f"{p + n} exceeds the {name}'s max_position_embeddings "
        f"{cfg.max_position_embeddings}{where}"
      )


def prepare_evals(
  settings: Settings, student_cfg, tokenizer=None
) -> dict[str, tuple[Any, list[dict]]]:
  """Checks every entry of ``config.evals`` and reads (or generates) its
  examples at start-up; returns the :func:`run_evals` cache
  ``{name: (task, examples)}``.

  ValueError naming the setting (``config.evals.<name>.<key>``) for: an
  unknown task or evaluator; a missing or unreadable ``data_file``; no
  ``data_file`` for a task that cannot generate examples (e.g. ``math``);
  no examples, or examples without ``prompt`` / ``answer``;
  ``data.max_prompt_len`` + the eval's ``max_new_tokens`` beyond the
  student's ``max_position_embeddings``; with ``tokenizer``, a prompt longer
  than ``data.max_prompt_len``.
  """
  from opd_jax.tasks import TASKS, get_task

  cache = {}
  p = settings.data.max_prompt_len
  for spec in settings.evals:
    key = f"config.evals.{spec.name}"
    if spec.task not in TASKS:
      raise ValueError(
        f"{key}.task: unknown task {spec.task!r}; valid tasks: {', '.join(TASKS.names())}"
      )
    if spec.evaluator not in evaluation.EVALUATORS:
      raise ValueError(
        f"{key}.evaluator: unknown evaluator {spec.evaluator!r}; valid "
        f"evaluators: {', '.join(evaluation.EVALUATORS.names())}"
      )
    n, limit = spec.max_new_tokens, student_cfg.max_position_embeddings
    if p + n > limit:
      raise ValueError(
        f"{key}.max_new_tokens: config.data.max_prompt_len ({p}) + {n} new "
        f"tokens = {p + n} exceeds the student's max_position_embeddings "
        f"{limit}"
      )
    task = get_task(spec.task)
    no_file = (
      f"{key}.data_file is empty and task {spec.task!r} cannot generate examples; "
      "set it to a JSONL file of prompts with answers"
    )
    if spec.data_file and not os.path.isfile(spec.data_file):
      raise ValueError(f"{key}.data_file: file not found: {spec.data_file!r}")
    if not spec.data_file and not callable(getattr(task, "generate", None)):
      raise ValueError(no_file)
    try:
      examples = eval_examples(spec, task)
    except NotImplementedError:
      raise ValueError(no_file) from None
    except (ValueError, UnicodeDecodeError) as e:  # json.JSONDecodeError, bad levels
      raise ValueError(f"{key}: {e}") from None
    if not examples:
      raise ValueError(f"{key}: no examples ({key}.data_file / num_examples)")
    for i, ex in enumerate(examples):
      missing = [f for f in ("prompt", "answer") if f not in ex]
      if missing:
        raise ValueError(f"{key}.data_file: example {i} has no {missing} field")
    if tokenizer is not None:
      try:
        evaluation.encode_prompts(
          tokenizer,
          [ex["prompt"] for ex in examples],
          max_prompt_len=p,
          use_chat_template=settings.data.use_chat_template,
        )
      except ValueError as e:
        raise ValueError(f"{key}: {e} (config.data.max_prompt_len)") from None
    cache[spec.name] = (task, examples)
  return cache


def run_evals(settings: Settings, cache: dict, model, tokenizer) -> dict[str, float]:
  """Every eval of ``settings.evals`` on the examples of :func:`prepare_evals`
  (``cache``), logged as ``eval/<name>/<metric>``."""
  out, data = {}, settings.data
  for spec in settings.evals:
    task, examples = cache[spec.name]
    fn = evaluation.EVALUATORS.get(spec.evaluator)
    res = fn(
      model,
      tokenizer,
      examples,
      task,
      num_samples=spec.num_samples,
      temperature=spec.temperature or 1.0,
      greedy=spec.temperature == 0.0,
      top_p=spec.top_p,
      max_new_tokens=spec.max_new_tokens,
      batch_size=spec.batch_size,
      seed=spec.seed,
      max_prompt_len=data.max_prompt_len,
      use_chat_template=data.use_chat_template,
      prefix_sum=settings.step.sampling.prefix_sum,
    )
    out.update({f"eval/{spec.name}/{k}": float(v) for k, v in res.items()})
  return out


def peak_flops(settings: Settings) -> float | None:
  """Peak FLOP/s of one device: ``config.peak_flops``, or (0) from the
  device kind (``flops.PEAK_FLOPS_BF16``; None, e.g. on CPU)."""
  return settings.peak_flops or flops_lib.peak_flops_per_device(jax.devices()[0].device_kind)


def _spec(x, sharding) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)


def abstract_params(cfg, sharder: Sharder):
  """``(graphdef, params, shardings)`` of a model: ``params`` are sharded
  ``ShapeDtypeStruct`` s (no memory)."""
  from opd_jax.models import abstract_model

  graphdef, state = nnx.split(abstract_model(cfg, sharder))
  shardings = sharder.tree_shardings(state)
  return graphdef, jax.tree.map(_spec, state, shardings), shardings


def abstract_train_state(tx, params, param_shardings, sharder: Sharder):
  """``(state, state_shardings)``: the :class:`TrainState` of abstract
  ``params`` (moments follow their parameters, ``optimizer_shardings``)."""
  rep = sharder.replicated()
  opt_shard = optimizer_shardings(tx, params, param_shardings, rep)
  opt_state = jax.tree.map(_spec, jax.eval_shape(tx.init, params), opt_shard)
  scalar = lambda dt, shape=(): jax.ShapeDtypeStruct(shape, dt, sharding=rep)
  state = TrainState(
    step=scalar(jnp.int32), params=params, opt_state=opt_state, rng=scalar(jnp.uint32, (2,))
  )
  return state, TrainState(step=rep, params=param_shardings, opt_state=opt_shard, rng=rep)


# -----------------------------------------------------------------------------
# The run.


@dataclasses.dataclass(frozen=True)
class Phase:
  """One training phase (``opd``, and ``sft`` for a cold start)."""

  name: str
  cfg: OPDConfig  # the step's static config
  fn: Any  # the jitted step (trace_count, token_metric_names)
  compiled: Any  # its executable (None when abstract)
  flops: int  # model FLOPs per step (flops.step_flops at the compiled shapes)
  it: Any  # its data iterator (None when abstract)
  teacher: Any  # teacher parameters (None: no teacher pass)
  batch: dict  # the step's batch as sharded ShapeDtypeStructs (prompts at max width)
  flops_at: Any = None  # prompt width -> model FLOPs per step
  # prompt width -> (executable, FLOPs); the other buckets compile when first used
  by_width: dict = dataclasses.field(default_factory=dict)

  def args(self, state) -> tuple:
    """The step's arguments ``(state, teacher, batch)`` (abstract batch)."""
    return state, self.teacher, self.batch

  def executable(self, state, batch) -> tuple[Any, int, float]:
    """``(executable, model FLOPs, seconds compiling)`` for ``batch``'s
    prompt width (compiled on first use of a width)."""
    width = batch["prompt_ids"].shape[1]
    if width == self.batch["prompt_ids"].shape[1]:
      return self.compiled, self.flops, 0.0
    if width not in self.by_width:
      t0 = time.time()
      exe = self.fn.lower(state, self.teacher, batch).compile()
      self.by_width[width] = (exe, self.flops_at(width), time.time() - t0)
      return self.by_width[width]
    exe, flops, _ = self.by_width[width]
    return exe, flops, 0.0


@dataclasses.dataclass(frozen=True)
class Run:
  """Everything :func:`train` loops over, built once by :func:`build_run`.

  With ``abstract=True`` the state and the teacher are sharded
  ``ShapeDtypeStruct`` s, there is no tokenizer, data or executable, and the
  only phase is ``opd`` (``phase.fn.lower(*phase.args(run.state))``).
  """

  config: ml_collections.ConfigDict  # the resolved config
  settings: Settings
  sharder: Sharder
  tokenizer: Any  # None when abstract
  student_cfg: Any  # ModelConfig
  teacher_cfg: Any  # ModelConfig, a tuple of them (config.teachers), or None (no teacher pass)
  vocab: int
  tx: Any
  schedule: Any
  state: TrainState  # the initial train state
  state_shardings: Any
  student_graphdef: Any
  teacher_graphdef: Any  # None: no teacher pass; a tuple with config.teachers
  phases: dict[str, Phase]
  data_stats: dict[str, int]
  evals: dict  # prepare_evals: {name: (task, examples)}
  compile_s: float  # seconds spent compiling the phases

  def phase_at(self, step: int) -> Phase:
    """The phase of 1-based ``step``: the cold start's first steps are SFT."""
    return self.phases["sft" if step <= self.settings.cold_start.steps else "opd"]

  def student(self, state: TrainState):
    """The student at ``state`` (an NNX module)."""
    return nnx.merge(self.student_graphdef, state.params)


def build_run(
  config: ml_collections.ConfigDict,
  *,
  abstract: bool = False,
  num_layers: int = 0,
  vocab_size: int | None = None,
  eos_ids: tuple[int, ...] = (),
  pad_id: int = 0,
  compile_phases: bool = True,
) -> Run:
  """The run of a resolved ``config`` (see :func:`resolve_config`): mesh,
  settings, tokenizer, models, data, optimizer, train state and compiled
  phases. Start-up checks (lengths, files, evals) come before any weight is
  read.

  ``abstract=True``: from the models' ``config.json`` files alone (no
  weights, tokenizer or data; ``num_layers > 0`` overrides both depths,
  ``vocab_size`` stands in for the tokenizer's size (default: the models'
  common vocabulary), ``eos_ids`` / ``pad_id`` for its ids (default: the
  student's ``config.json``)); nothing is compiled. ``compile_phases=False``:
  the phases' steps are jitted but not compiled (``Phase.compiled`` None; a
  vmapped sweep compiles its own program around ``Phase.fn.step_fn``).
  """
  settings = settings_of(config)
  # --- Mesh.
  sharder = make_sharder(settings.mesh)
  # --- Start-up checks, from the config.json files.
  use_teacher = settings.use_teacher
  specs = settings.teachers  # multi-teacher OPD (checked even when unused)
  multi = bool(specs) and use_teacher
  s_cfg = model_config_of(settings.student, num_layers=num_layers)
  t_cfg = None
  if multi:
    t_cfg = tuple(teachers_lib.model_config(t, num_layers) for t in specs)
  elif use_teacher:
    t_cfg = model_config_of(settings.teacher, num_layers=num_layers)
  tokenizer = evals = None
  one_t_cfg = None if multi else t_cfg
  if abstract:
    check_lengths(settings, s_cfg, one_t_cfg)
  else:
    tokenizer = _tokenizer(settings)
    check_run_settings(settings, s_cfg, one_t_cfg)
    evals = prepare_evals(settings, s_cfg, tokenizer)
  if multi:
    vocab = teachers_lib.check_models(
      specs,
      s_cfg,
      t_cfg,
      prompt_len=settings.data.max_prompt_len,
      new_tokens=settings.new_tokens,
      tokenizer_size=None if abstract else len(tokenizer),
    )
  # --- Models.
  teacher = t_graphdef = t_params = t_shardings = None
  if abstract:
    s_graphdef, s_params, s_shardings = abstract_params(s_cfg, sharder)
    if multi:
      t_graphdef, t_params, t_shardings = zip(*(abstract_params(c, sharder) for c in t_cfg))
    elif t_cfg is not None:
      t_graphdef, t_params, t_shardings = abstract_params(t_cfg, sharder)
    vocab = vocab_size or (vocab if multi else vocab_of(s_cfg, t_cfg))
    sampling = sampling_config(settings, eos_ids=eos_ids or s_cfg.eos_token_ids, pad_id=pad_id)
  else:
    student = _load(settings.student, sharder)
    s_cfg, s_graphdef = student.cfg, nnx.graphdef(student)
    if multi:  # one teacher per spec, in batch order
      loaded = [teachers_lib.load(t, sharder) for t in specs]
      t_cfg = tuple(t.cfg for t in loaded)
      t_graphdef, t_params = zip(*(nnx.split(t) for t in loaded))
      del loaded
      t_shardings = tuple(sharder.tree_shardings(p) for p in t_params)
    elif use_teacher:
      teacher = _load(settings.teacher, sharder)
      t_cfg = teacher.cfg
      t_graphdef, t_params = nnx.split(teacher)
      t_shardings = sharder.tree_shardings(t_params)
    if not multi:
      vocab = vocab_of(s_cfg, t_cfg, len(tokenizer))
    sampling = sampling_config(settings, tokenizer, s_cfg)
  step_cfg = opd_config(settings, sampling, outcome_verifier(settings, tokenizer))
  if multi:
    step_cfg = dataclasses.replace(step_cfg, teachers=tuple((t.name, t.rows) for t in specs))
  # --- Optimizer and train state.
  tx, schedule = make_optimizer(settings.optimizer)
  if abstract:
    state, state_shardings = abstract_train_state(tx, s_params, s_shardings, sharder)
  else:
    state, state_shardings = init_train_state(student, tx, settings.seed, sharder)
    del student  # the state holds (and the step donates) its parameters
  # --- Data and step.
  b = settings.batch_size

  def make_phase(name, cfg, it, batch, teacher_args):
    graphdef, params, shardings = teacher_args
    fn = make_opd_step(
      s_graphdef,
      graphdef,
      tx,
      schedule,
      cfg,
      vocab_size=vocab,
      sharder=sharder,
      state_shardings=state_shardings,
      teacher_shardings=shardings,
      batch_shardings={k: v.sharding for k, v in batch.items()},
    )
    flops_at = lambda width: flops_lib.step_flops(
      cfg,
      s_cfg,
      t_cfg if graphdef is not None else None,
      batch_size=b,
      prompt_len=width,
      vocab=vocab,
    )["total"]
    t0 = time.time()
    compiled = None
    if compile_phases and not abstract:
      compiled = fn.lower(state, params, batch).compile()
    compile_s.append(time.time() - t0)
    flops = flops_at(batch["prompt_ids"].shape[1])
    return Phase(name, cfg, fn, compiled, flops, it, params, batch, flops_at)

  def example_batch(phase_data):
    example = global_batch(next(iter(phase_data.iterator(b, seed=0))), sharder, b)
    return {k: _spec(v, v.sharding) for k, v in example.items()}

  teacher_args, compile_s = (t_graphdef, t_params, t_shardings), []
  if abstract:
    phases = {
      "opd": make_phase("opd", step_cfg, None, batch_specs(settings, sharder), teacher_args)
    }
    data_stats = {}
  else:
    data, it = build_data(
      settings, tokenizer, answers=step_cfg.verifier is not None, teachers=specs if multi else ()
    )
    data_stats = {**data.stats, **data.counts}
    phases = {"opd": make_phase("opd", step_cfg, it, example_batch(data), teacher_args)}
    if settings.cold_start.steps > 0:
      sft_data, sft_it = cold_start_data(settings, tokenizer, teacher, sampling.max_new_tokens)
      phases["sft"] = make_phase(
        "sft", sft_config(step_cfg), sft_it, example_batch(sft_data), (None, None, None)
      )
  return Run(
    config=config,
    settings=settings,
    sharder=sharder,
    tokenizer=tokenizer,
    student_cfg=s_cfg,
    teacher_cfg=t_cfg,
    vocab=vocab,
    tx=tx,
    schedule=schedule,
    state=state,
    state_shardings=state_shardings,
    student_graphdef=s_graphdef,
    teacher_graphdef=t_graphdef,
    phases=phases,
    data_stats=data_stats,
    evals=evals or {},
    compile_s=sum(compile_s),
  )


# -----------------------------------------------------------------------------
# The loop and its periodic hooks.


@dataclasses.dataclass
class Hook:
  """A periodic side effect of the loop: ``fn(step, state, metrics)`` runs
  after every ``every`` steps (0: never periodically) and, with ``at_end``,
  after the last step (levanter's / flax ``periodic_actions`` style).

  ``needs_state``: the hook reads the train state (evals, checkpoints). The
  loop runs a step's hooks after dispatching the next step (asynchronous
  metrics) unless one of them needs the state at that step; those get
  ``state=None`` otherwise."""

  every: int
  fn: Callable[[int, Any, dict], Any]
  at_end: bool = True
  needs_state: bool = False

  def due(self, step: int, total: int) -> bool:
    return bool(self.every and step % self.every == 0) or (self.at_end and step == total)

  def __call__(self, step: int, total: int, state, metrics: dict):
    return self.fn(step, state, metrics) if self.due(step, total) else None


def step_metrics(
  run: Run, phase: Phase, metrics, dt: float, peak: float | None, flops: int | None = None
) -> dict:
  """The step's host metrics plus timing, phase and FLOP keys. ``dt``: wall
  seconds of the step's loop iteration (:func:`_loop`), so ``tokens_per_sec``
  is generated tokens (``num_tokens``: the completions' real tokens, EOS
  included, padding not) per wall second of the whole loop."""
  metrics = host_metrics(metrics, phase.fn.token_metric_names())
  flops = phase.flops if flops is None else flops
  metrics.update(
    step_time_s=dt,
    tokens_per_sec=metrics["num_tokens"] / dt,
    cold_start=float(phase.name == "sft"),
    flops_per_step=float(flops),
  )
  if peak:  # model FLOPs at the static shapes (flops.step_flops) / time / peak
    metrics["mfu"] = flops / dt / (peak * jax.device_count())
  return metrics


def train(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs (or resumes) a training run; returns the final logged metrics."""
  # --- Mesh (processes), the resolved config.
  workdir = os.path.abspath(workdir)
  init_distributed(distributed_spec(config))
  config = resolve_config(config, workdir)
  save_config(config, workdir)
  # --- Data, Models, Step.
  run = build_run(config)
  s, is_main = run.settings, jax.process_index() == 0
  # --- Restore.
  ckpt = checkpointing.Checkpointer(
    os.path.join(workdir, "checkpoints"),
    save_every=s.checkpoint_every,
    max_to_keep=s.keep_checkpoints,
  )
  state, start = run.state, 0
  restored = ckpt.restore_newest(checkpointing.abstract_like(state), s.restore_step)
  if restored is not None:  # the newest readable one (or config.restore_step)
    _, state, data_state, _ = restored
    for name, phase in run.phases.items():
      if name in data_state:
        data_lib.restore_iterator_state(phase.it, data_state[name])
    start = int(state.step)
  writer = MetricWriter(workdir)
  writer.truncate_after(start if start else -1)  # a fresh start rewrites step 0 too
  if is_main and start == 0:
    writer.write(0, {f"data/{k}": v for k, v in run.data_stats.items()})
  # --- Loop.
  from tqdm import tqdm

  bar = tqdm(
    total=s.total_steps,
    initial=start,
    disable=not (is_main and s.progress_bar),
    desc=s.name or "opd",
    dynamic_ncols=True,
  )
  hooks, saved = _hooks(run, ckpt, writer, bar)
  if run.evals and start == 0 and (s.eval_at_start or s.eval_teacher):
    writer.write(0, start_evals(run, state))
  preempt, peak = checkpointing.PreemptionFlag(), peak_flops(s)
  t_loop = time.time()
  try:
    status, last, state = _loop(run, state, start, hooks, saved, ckpt, preempt, peak)
  finally:
    bar.close()
    preempt.restore_handler()
    ckpt.close()
    writer.close()
  loop = dict(loop_s=time.time() - t_loop, loop_steps=int(last["step"]) - start)
  # --- Export.
  if status == "finished" and s.export_hf:
    from opd_jax.models import to_hf

    to_hf(run.student(state), os.path.join(workdir, "export_hf"))
    if is_main:
      run.tokenizer.save_pretrained(os.path.join(workdir, "export_hf"))
  if is_main and s.summary:
    from opd_jax import summary

    print(summary.summarize(workdir, status=status, **loop), flush=True)
  return {
    **last,
    "status": status,
    "trace_count": max(p.fn.trace_count() for p in run.phases.values()),
  }


def start_evals(run: Run, state) -> dict[str, float]:
  """Step 0's evals: the student's (``config.eval_at_start``) and the
  teacher's as ``teacher/eval/*`` (``config.eval_teacher``)."""
  s, out = run.settings, {}
  if s.eval_at_start:
    out.update(run_evals(s, run.evals, run.student(state), run.tokenizer))
  if s.eval_teacher:
    if isinstance(run.teacher_graphdef, tuple):
      raise ValueError("config.eval_teacher is not supported with config.teachers (several)")
    if run.teacher_graphdef is None:
      raise ValueError(
        "config.eval_teacher: this run has no teacher pass (the loss, the metrics "
        "and the off-policy rows do not read config.teacher)"
      )
    teacher = nnx.merge(run.teacher_graphdef, run.phases["opd"].teacher)
    res = run_evals(s, run.evals, teacher, run.tokenizer)
    out.update({f"teacher/{k}": v for k, v in res.items()})
  return out


def _loop(run: Run, state, start: int, hooks, saved, ckpt, preempt, peak):
  """Steps ``start + 1 ..`` with the hooks; ``(status, last metrics, state)``.

  The loop never waits for a step it need not: step ``n`` is dispatched
  (asynchronously), step ``n - 1``'s metrics are fetched and its hooks run,
  and step ``n + 1``'s batch is assembled and put on the devices, all while
  ``n`` runs. A step whose hooks read the state (eval, checkpoint) and the
  last step are finished before the next dispatch, so every checkpoint holds
  the data state of the batches its step consumed. On a pre-emption signal
  the step in flight is finished, checkpointed, and the loop stops.
  ``step_time_s`` is the wall time between two consecutive steps' metrics
  arriving on the host (the whole loop iteration, hooks included).
  """
  s, last, status = run.settings, {"step": start}, "finished"
  clock = [time.time()]  # when the previous step's metrics reached the host

  def batch_of(step):
    phase = run.phase_at(step)
    local = next(phase.it)
    local = trim_prompts(local, prompt_width(local, s.prompt_buckets))
    return phase, global_batch(local, run.sharder, s.batch_size)

  def finish(step, phase, device_metrics, width, flops, compile_s, state):
    now = time.time()
    metrics = step_metrics(run, phase, device_metrics, now - clock[0], peak, flops)
    clock[0] = now
    metrics["prompt_len"] = float(width)
    if phase.name == "opd":  # host-side schedules: the weights of this step's batch
      metrics.update(
        {
          f"schedule/data.mixture.{src}": schedules_lib.host_value(
            sched, step - 1 - s.cold_start.steps
          )
          for src, sched in s.mixture_schedules
        }
      )
    compile_s += run.compile_s if step == start + 1 else 0.0
    if compile_s:  # the run's phases, or a prompt width's first step (in step_time_s)
      metrics["compile_time_s"] = compile_s
    for hook in hooks:
      hook(step, s.total_steps, state, metrics)
    return {"step": step, **metrics}

  pending, ready = None, batch_of(start + 1) if start < s.total_steps else None
  for step in range(start + 1, s.total_steps + 1):
    phase, batch = ready
    exe, flops, compile_s = phase.executable(state, batch)
    state, device_metrics = exe(state, phase.teacher, batch)  # dispatched
    if pending is not None:  # the previous step's metrics and hooks, while this one runs
      last = finish(*pending, None)
    pending = (step, phase, device_metrics, batch["prompt_ids"].shape[1], flops, compile_s)
    stop = preempt.requested()
    if (
      stop
      or step == s.total_steps
      or any(h.needs_state and h.due(step, s.total_steps) for h in hooks)
    ):
      last, pending = finish(*pending, state), None
    if stop:  # the step in flight was finished: save it (its batch was the last one read)
      if saved[-1] != step and not last.get("nonfinite_in_a_row", 0):
        # (orbax refuses to save a step twice; a non-finite streak is not saved)
        _checkpoint(run, ckpt, step, state, force=True)
      status = "preempted"
      break
    if step < s.total_steps:
      ready = batch_of(step + 1)  # overlaps this step on the devices
  return status, last, state


def _checkpoint(run: Run, ckpt, step: int, state, force: bool = False) -> None:
  data_state = {name: data_lib.save_iterator_state(p.it) for name, p in run.phases.items()}
  ckpt.save(step, state, data_state, {"step": step, "time": time.time()}, force=force)


def _hooks(run: Run, ckpt, writer: MetricWriter, bar) -> tuple[list[Hook], list[int]]:
  """The loop's periodic side effects, in order: eval (adds ``eval/*`` to the
  step's metrics), log (also on an eval step), progress bar, checkpoint
  (``saved`` lists the steps checkpointed, for the pre-emption save)."""
  s, saved = run.settings, [0]

  def evaluate(step, state, metrics):
    metrics.update(run_evals(s, run.evals, run.student(state), run.tokenizer))

  def log(step, state, metrics):
    writer.write(step, metrics)

  def log_evals(step, state, metrics):  # an eval step is logged too
    if any(k.startswith("eval/") for k in metrics) and not (
      step % s.log_every == 0 or step == s.total_steps
    ):
      writer.write(step, metrics)

  def progress(step, state, metrics):
    bar.update(1)
    bar.set_postfix(
      loss=f"{metrics['loss']:.4f}",
      tok_s=f"{metrics['tokens_per_sec']:.0f}",
      len=f"{metrics['mean_response_length']:.1f}",
      refresh=False,  # the bar redraws at its own pace (tqdm mininterval)
    )

  def stop_if_nonfinite(step, state, metrics):
    k = int(metrics.get("nonfinite_in_a_row", 0))
    if k >= s.max_nonfinite_steps:
      good = [x for x in ckpt.manager.all_steps() if x <= step - k]
      where = (
        f"checkpoint {max(good)} ({ckpt.step_path(max(good))})" if good else "no checkpoint yet"
      )
      raise NonFiniteError(
        f"step {step}: {k} steps in a row with a non-finite loss or gradient (loss "
        f"{metrics['loss']}, grad_norm {metrics['grad_norm']}), each skipped: the parameters "
        f"are those of step {step - k}; the run stops (config.max_nonfinite_steps="
        f"{s.max_nonfinite_steps}). Last good state: {where}; lower config.optimizer.lr or "
        "check the data, then resume (config.restore_step=N chooses a checkpoint)."
      )

  def checkpoint(step, state, metrics):
    if metrics.get("nonfinite_in_a_row", 0):  # keep the last good checkpoint
      absl_logging.warning(
        "step %d: not checkpointed (%d non-finite steps in a row)",
        step,
        int(metrics["nonfinite_in_a_row"]),
      )
      return
    _checkpoint(run, ckpt, step, state)
    saved.append(step)

  hooks = [Hook(s.eval_every, evaluate, needs_state=True)] if run.evals else []
  hooks += [Hook(1, log_evals, at_end=False)] if run.evals else []
  return hooks + [
    Hook(s.log_every, log),
    Hook(1, progress),
    Hook(1, stop_if_nonfinite),
    Hook(s.checkpoint_every, checkpoint, needs_state=True),
  ], saved


# glibc mallopt parameters (malloc.h): M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD.
_MALLOPT = ((-1, 1 << 30), (-2, 64 << 20), (-3, 32 << 20))


def tune_malloc() -> bool:
  """Keeps freed heap memory mapped (glibc only; elsewhere a no-op, False).

  XLA:CPU allocates its temporaries afresh every execution; glibc's defaults
  hand freed blocks above 128 KiB back to the kernel (``munmap``, heap trim),
  so every step faults its pages in again (quickstart student SFT step:
  ~13,000-17,000 page faults, ~20% of its CPU time). Trim threshold 1 GiB, top
  pad 64 MiB, blocks below 32 MiB on the heap: ~500 faults a step, same results.
  Every setting is tried; True iff glibc took them all.
  """
  mallopt = _glibc_mallopt()
  return mallopt is not None and all([mallopt(p, v) == 1 for p, v in _MALLOPT])


def _glibc_mallopt():
  """glibc's ``mallopt`` (None elsewhere)."""
  import ctypes
  import ctypes.util

  try:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
  except (OSError, AttributeError):
    return None


# glibc M_MMAP_MAX: 0 = never mmap, every block from the heap.
_NO_MMAP = (-4, 0)


def use_cpu_sync_dispatch() -> bool:
  """On one CPU device: XLA:CPU runs each execution on the calling thread
  (``jax_cpu_enable_async_dispatch=False``) and glibc serves every block from
  the heap (``M_MMAP_MAX=0``), so a step's temporaries are reused, not
  faulted in afresh every execution. True iff both took effect (off glibc
  only the dispatch does).

  Why: with async dispatch a worker thread allocates the step's temporary
  buffer from its own glibc arena, whose heaps hold at most 64 MiB; a larger
  block (the quickstart's OPD step: 113 MiB; a vmapped sweep's K times that)
  is ``mmap``-ed and unmapped every execution, ~29,000 page faults a step
  whatever ``mallopt`` says. On the main thread the main arena's heap serves
  it, and the trim threshold of :func:`tune_malloc` keeps it. The driver
  loop's host work (1-3% of a step here) then no longer overlaps the step.
  Measured (README "Host tuning"): quickstart OPD step 109-127 -> 82-91 ms,
  same losses. Must run before JAX starts its backends; a no-op (False) after,
  with several CPU devices (``jax_num_cpu_devices`` or XLA's
  ``--xla_force_host_platform_device_count``: their collectives need the
  worker threads), on accelerators or off glibc.
  """
  from jax._src import xla_bridge

  forced = re.findall(
    r"--xla_force_host_platform_device_count=(\d+)", os.environ.get("XLA_FLAGS", "")
  )
  several = jax.config.jax_num_cpu_devices not in (-1, 1) or any(int(n) > 1 for n in forced)
  if xla_bridge.backends_are_initialized() or several:
    return False
  jax.config.update("jax_cpu_enable_async_dispatch", False)
  if jax.default_backend() != "cpu":  # starts the backends, with the setting above
    return False
  mallopt = _glibc_mallopt()
  return mallopt is not None and mallopt(*_NO_MMAP) == 1


def main(argv):
  del argv
  from absl import flags, logging

  if "tune_malloc" not in flags.FLAGS or flags.FLAGS.tune_malloc:
    tune_malloc()
  config = flags.FLAGS.config
  single_process = distributed_spec(config).num_processes <= 1
  if single_process and ("cpu_sync_dispatch" not in flags.FLAGS or flags.FLAGS.cpu_sync_dispatch):
    use_cpu_sync_dispatch()  # before anything starts the backends
  if not flags.FLAGS["verbosity"].present:  # orbax/absl INFO is very chatty
    logging.set_verbosity(logging.WARNING)
  workdir = flags.FLAGS.workdir
  try:
    result = train(config, workdir)
  except (checkpointing.RestoreError, NonFiniteError) as e:  # what and which setting
    raise SystemExit(f"opd_jax.train: {type(e).__name__}: {e}") from None
  if jax.process_index() == 0:
    keys = [k for k in ("step", "status", "loss", "tokens_per_sec") if k in result]
    print(json.dumps({k: result[k] for k in keys}))
    for k, v in sorted(result.items()):
      if k.startswith("eval/") and ("avg@" in k or "accuracy" in k):
        print(f"{k}: {v:.4f}")


def run():
  """Console-script entry point (``opd-train``)."""
  from absl import app, flags
  from ml_collections import config_flags

  if "config" not in flags.FLAGS:
    config_flags.DEFINE_config_file(
      "config", None, "config file (get_config(arg))", lock_config=True
    )
    flags.DEFINE_string("workdir", None, "run directory (checkpoints, logs)")
    flags.DEFINE_bool("tune_malloc", True, "glibc: keep freed heap memory mapped (tune_malloc)")
    flags.DEFINE_bool(
      "cpu_sync_dispatch",
      True,
      "one CPU device: run steps on the main thread, temporaries from the heap "
      "(use_cpu_sync_dispatch)",
    )
    flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)


if __name__ == "__main__":
  run()
