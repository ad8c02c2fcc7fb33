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
import json
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
from opd_jax.logging_utils import MetricWriter
from opd_jax.opd_step import (
  OPDConfig,
  TrainState,
  common_vocab_size,
  host_metrics,
  init_train_state,
  make_opd_step,
  optimizer_shardings,
)
from opd_jax.organisms import PREPARERS
from opd_jax.sampling import SamplingConfig
from opd_jax.sharding import Sharder, make_mesh, rules_from_config

BATCH_KEYS = ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask")


# -----------------------------------------------------------------------------
# The resolved config and its typed settings.


def resolve_config(config: ml_collections.ConfigDict, workdir: str) -> ml_collections.ConfigDict:
  """The run's resolved config (what is saved in the workdir): ``$WORKDIR``
  expanded, then the preparer's assets (``config.prepare``, see
  ``organisms.PREPARERS``). The loaded ``config`` is not modified."""
  config = configs_lib.expand_workdir(config, workdir)
  if config.get("prepare"):
    config = PREPARERS.get(config.prepare)(config, workdir, train)
  if int(config.cold_start.steps) > 0 and not config.cold_start.rollouts_file:
    config = configs_lib.updated(
      config, {"cold_start.rollouts_file": os.path.join(workdir, "cold_start_rollouts.jsonl")}
    )
  return config


class NonFiniteError(RuntimeError):
  """``config.max_nonfinite_steps`` steps in a row had a non-finite loss or
  gradient (each was skipped; see ``optim.skip_nonfinite``)."""


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
  """The run's ConfigDict converted once into typed fields (the loop's,
  the data's, the evals' and the cold start's; the step's are
  :func:`opd_config`)."""

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
  data: data_lib.DataOptions
  train_files: str
  num_epochs: int | None  # None: repeat forever
  mixture: dict[str, float] | None
  mixture_schedules: tuple  # ((source, schedules.Schedule), ...): "data.mixture.<source>"
  new_tokens: int  # sampling.max_new_tokens
  completion_len: int  # data.max_completion_len (0: new_tokens)
  on_policy_fraction: float  # GKD λ
  off_policy_source: str  # "dataset" or "teacher"
  use_teacher: bool  # the loss, the metrics or the off-policy rows read it
  evals: tuple[EvalSpec, ...]
  cold_start: ColdStartSpec


def settings_of(config) -> Settings:
  """``config`` -> :class:`Settings` (the one place its fields are cast)."""
  d, n = config.data, int(config.sampling.max_new_tokens)
  evals = tuple(
    EvalSpec(
      name=name,
      evaluator=e.evaluator,
      task=e.task,
      data_file=e.data_file,
      num_examples=int(e.num_examples),
      levels=str(e.levels),
      pattern=e.pattern,
      num_samples=int(e.num_samples),
      temperature=float(e.temperature),
      top_p=float(e.top_p),
      max_new_tokens=int(e.max_new_tokens) or n,
      batch_size=int(e.batch_size),
      seed=int(e.seed),
    )
    for name, e in config.evals.items()
  )
  cs = config.cold_start
  lam, source = float(config.on_policy_fraction), config.off_policy_source
  scheduled = schedules_lib.parse_all(str(config.get("schedules", "")))
  lam_schedule = dict(scheduled).get("on_policy_fraction")
  data_key = "data.mixture."
  mixture_schedules = tuple((t[len(data_key) :], v) for t, v in scheduled if t.startswith(data_key))
  if mixture_schedules and not len(d.mixture):
    raise ValueError(
      "schedules on data.mixture.<source> need config.data.mixture (the "
      "sources and their static weights)"
    )
  if lam_schedule is not None:  # a scheduled λ: data / teacher for its lowest value
    lam = min(lam_schedule.values)
  return Settings(
    seed=int(config.seed),
    batch_size=int(config.batch_size),
    total_steps=int(config.total_steps),
    log_every=int(config.log_every),
    eval_every=int(config.eval_every),
    eval_at_start=bool(config.get("eval_at_start", False)),
    checkpoint_every=int(config.checkpoint_every),
    keep_checkpoints=int(config.keep_checkpoints),
    restore_step=int(config.restore_step),
    max_nonfinite_steps=int(config.max_nonfinite_steps),
    export_hf=bool(config.export_hf),
    progress_bar=bool(config.progress_bar),
    name=str(config.get("name", "")),
    summary=bool(config.get("summary", False)),
    eval_teacher=bool(config.get("eval_teacher", False)),
    peak_flops=float(config.peak_flops),
    data=data_lib.DataOptions(
      max_prompt_len=int(d.max_prompt_len),
      max_completion_len=int(d.max_completion_len) or n if d.completion_field else None,
      prompt_field=d.prompt_field,
      completion_field=d.completion_field or None,
      answer_field=d.answer_field or None,
      source_field=d.source_field or None,
      use_chat_template=bool(d.use_chat_template),
      overlong=d.overlong,
      on_error=d.on_error,
    ),
    train_files=d.train_files,
    num_epochs=int(d.num_epochs) or None,
    mixture=d.mixture.to_dict() if len(d.mixture) else None,
    mixture_schedules=mixture_schedules,
    new_tokens=n,
    completion_len=int(d.max_completion_len) or n,
    on_policy_fraction=lam,
    off_policy_source=source,
    use_teacher=(
      losses_lib.needs_teacher(config.loss.name)
      or bool(config.metrics.enabled)
      or (lam < 1 and source == "teacher")
    ),
    evals=evals,
    cold_start=ColdStartSpec(
      steps=int(cs.steps),
      task=cs.task,
      prompts_file=cs.prompts_file,
      rollouts_file=cs.rollouts_file,
      attempts=int(cs.attempts),
      keep_per_prompt=int(cs.keep_per_prompt),
      temperature=float(cs.temperature),
      top_p=float(cs.top_p),
      max_prompts=int(cs.max_prompts),
    ),
  )


# -----------------------------------------------------------------------------
# Set-up pieces.


def init_distributed(cfg: ml_collections.ConfigDict) -> None:
  """``jax.distributed.initialize`` from config (or JAX's own env detection)."""
  if int(cfg.num_processes) <= 1:
    return
  if jax.distributed.is_initialized() if hasattr(jax.distributed, "is_initialized") else False:
    return
  pid = int(cfg.process_id)
  if pid < 0:
    pid = int(os.environ.get("OPD_PROCESS_ID", "-1"))
  kwargs: dict[str, Any] = dict(num_processes=int(cfg.num_processes))
  if cfg.coordinator_address:
    kwargs["coordinator_address"] = cfg.coordinator_address
  if pid >= 0:
    kwargs["process_id"] = pid
  if cfg.local_device_ids:
    kwargs["local_device_ids"] = [int(x) for x in str(cfg.local_device_ids).split(",")]
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


def _tokenizer(config):
  from transformers import AutoTokenizer

  path = config.tokenizer or config.student.path
  if not path:
    raise ValueError("no tokenizer: set config.tokenizer or config.student.path")
  return AutoTokenizer.from_pretrained(path)


def model_kwargs(model_cfg) -> dict[str, Any]:
  """``config.student`` / ``config.teacher`` -> the keyword arguments of
  ``models.from_hf`` and ``hf_io.config_from_hf`` (the one place model knobs
  are read, for the loading and the abstract path alike)."""
  return dict(
    dtype=model_cfg.dtype,
    param_dtype=model_cfg.param_dtype,
    vocab_pad_multiple=int(model_cfg.vocab_pad_multiple),
    remat=bool(model_cfg.remat),
    scan_layers=bool(model_cfg.scan_layers),
    attention=str(model_cfg.attention),
    attention_block=int(model_cfg.attention_block),
    attention_key_block=int(model_cfg.attention_key_block),
    decode_attention=str(model_cfg.decode_attention),
    decode_block=int(model_cfg.decode_block),
    decode_contraction=str(model_cfg.decode_contraction),
    key_cache_layout=str(model_cfg.key_cache_layout),
  )


def model_config_of(config, name: str, *, num_layers: int = 0):
  """The ``ModelConfig`` of ``config.<name>`` (student / teacher) from its
  ``config.json`` alone; ``num_layers > 0`` overrides the depth (compile-only
  checks at reduced depth)."""
  from opd_jax.models.hf_io import config_from_hf

  m = config[name]
  if not m.path:
    raise ValueError(f"model path is empty (config.{name}.path)")
  cfg = config_from_hf(m.path, **model_kwargs(m))
  return dataclasses.replace(cfg, num_layers=int(num_layers)) if num_layers else cfg


def _load(config, name: str, sharder: Sharder):
  from opd_jax.models import from_hf

  m = config[name]
  if not m.path:
    raise ValueError(f"model path is empty (config.{name}.path)")
  return from_hf(m.path, mesh=sharder.mesh, rules=sharder.rules, **model_kwargs(m))


def make_sharder(config) -> Sharder:
  """``config.mesh`` -> a :class:`Sharder` over all devices."""
  return Sharder(make_mesh(config.mesh.shape.to_dict()), rules_from_config(config.mesh.rules))


def vocab_of(student_cfg, teacher_cfg=None, tokenizer_size: int | None = None) -> int:
  """The vocabulary the step works over (see ``opd_step.common_vocab_size``)."""
  if teacher_cfg is not None:
    return common_vocab_size(student_cfg, teacher_cfg, tokenizer_size)
  return min(tokenizer_size, student_cfg.vocab_size) if tokenizer_size else (student_cfg.vocab_size)


def make_optimizer(config):
  """``config.optimizer`` -> ``(tx, schedule)``; ``optimizer.total_steps = 0``
  means ``config.total_steps``."""
  opt_cfg = config.optimizer.to_dict()
  opt_cfg["total_steps"] = int(opt_cfg["total_steps"]) or int(config.total_steps)
  return optim.make_optimizer(opt_cfg)


def batch_sharding(sharder: Sharder, shape: tuple[int, ...]):
  """Rows over the data axes, the rest replicated."""
  return sharder.named(("activation_batch",) + (None,) * (len(shape) - 1), shape)


def batch_specs(config, sharder: Sharder) -> dict[str, jax.ShapeDtypeStruct]:
  """The step's batch as sharded ``ShapeDtypeStruct`` s: ``[B, P]`` prompts
  (and ``[B, N]`` dataset completions when off-policy rows read them)."""
  s = settings_of(config)
  b, p, n = s.batch_size, s.data.max_prompt_len, s.completion_len
  keys = [("prompt_ids", jnp.int32, p), ("prompt_mask", jnp.bool_, p)]
  if s.on_policy_fraction < 1 and s.off_policy_source == "dataset":
    keys += [("completion_ids", jnp.int32, n), ("completion_mask", jnp.bool_, n)]
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
  )


def sampling_config(
  config, tokenizer=None, student_cfg=None, *, eos_ids=(), pad_id: int = 0
) -> SamplingConfig:
  """``config.sampling`` as a :class:`SamplingConfig`: EOS and pad ids from the
  tokenizer and the student's config (``evaluation.sampling_config``, as the
  evals and prompt selection), or ``eos_ids``/``pad_id`` without a tokenizer;
  ``sampling.ignore_eos``: no EOS id (every row runs ``max_new_tokens``)."""
  s = config.sampling
  knobs = dict(
    max_new_tokens=int(s.max_new_tokens),
    temperature=float(s.temperature),
    top_k=int(s.top_k),
    top_p=float(s.top_p),
    num_samples=int(s.num_samples),
  )
  if tokenizer is not None:
    out = evaluation.sampling_config(tokenizer, student_cfg, **knobs)
  else:
    out = SamplingConfig(eos_ids=tuple(eos_ids), pad_id=int(pad_id), **knobs)
  return dataclasses.replace(out, eos_ids=()) if s.get("ignore_eos", False) else out


def opd_config(config, sampling: SamplingConfig) -> OPDConfig:
  ts = config.teacher_sampling
  teacher_sampling = dataclasses.replace(
    sampling, temperature=float(ts.temperature), top_k=int(ts.top_k), top_p=float(ts.top_p)
  )
  return OPDConfig(
    sampling=sampling,
    loss=config.loss.name,
    loss_kwargs=tuple(sorted(configs_lib.loss_kwargs(config.loss).items())),
    aggregation=config.loss.aggregation,
    normalizer=float(config.loss.normalizer) or None,
    on_policy_fraction=float(config.on_policy_fraction),
    off_policy_source=config.off_policy_source,
    teacher_sampling=teacher_sampling,
    loss_chunk=int(config.loss.chunk),
    loss_chunk_budget_mib=float(config.loss.chunk_budget_mib),
    metrics=bool(config.metrics.enabled),
    metrics_top_k=int(config.metrics.top_k),
    position_chunk=int(config.metrics.position_chunk),
    micro_batches=int(config.micro_batches),
    schedules=tuple(
      (t, v)
      for t, v in schedules_lib.parse_all(str(config.get("schedules", "")))
      if not t.startswith("data.mixture.")
    ),
  )  # those are the data's


def build_data(settings: Settings, tokenizer):
  """The OPD phase's prompts (:class:`data.PromptData`) and their iterator."""
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
  it = data.iterator(
    settings.batch_size,
    seed=settings.seed,
    num_epochs=settings.num_epochs,
    mixture=settings.mixture,
    mixture_schedules=dict(settings.mixture_schedules) or None,
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


def check_run_settings(config, student_cfg, teacher_cfg=None) -> None:
  """Start-up checks of the data and length settings of the step (before
  anything is loaded or compiled); ValueError naming the setting.

  ``config.data.train_files`` (and ``config.cold_start.prompts_file``) must
  exist, ``config.max_nonfinite_steps`` >= 1 and ``config.restore_step`` >= 0,
  the cold start's task must be registered, and
  ``data.max_prompt_len + sampling.max_new_tokens`` must fit in the student's
  and the teacher's ``max_position_embeddings``.
  """
  from opd_jax.tasks import TASKS

  check_lengths(config, student_cfg, teacher_cfg)
  s = settings_of(config)
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


def check_lengths(config, student_cfg, teacher_cfg=None) -> None:
  """``data.max_prompt_len + sampling.max_new_tokens`` fits in the student's
  and the teacher's ``max_position_embeddings`` (ValueError otherwise)."""
  s = settings_of(config)
  p, n = s.data.max_prompt_len, s.new_tokens
  for name, cfg in (("student", student_cfg), ("teacher", teacher_cfg)):
    if cfg is not None and p + n > cfg.max_position_embeddings:
      where = f" ({config[name].path})" if config[name].path else ""
      raise ValueError(
        f"config.data.max_prompt_len ({p}) + config.sampling.max_new_tokens ({n}) = "
        f"{p + n} exceeds the {name}'s max_position_embeddings "
        f"{cfg.max_position_embeddings}{where}"
      )


def prepare_evals(config, student_cfg, tokenizer=None) -> dict[str, tuple[Any, list[dict]]]:
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

  settings = settings_of(config)
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
    )
    out.update({f"eval/{spec.name}/{k}": float(v) for k, v in res.items()})
  return out


def peak_flops(config) -> float | None:
  """Peak FLOP/s of one device: ``config.peak_flops``, or (0) from the
  device kind (``flops.PEAK_FLOPS_BF16``; None, e.g. on CPU)."""
  return settings_of(config).peak_flops or flops_lib.peak_flops_per_device(
    jax.devices()[0].device_kind
  )


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
  batch: dict  # the step's batch as sharded ShapeDtypeStructs

  def args(self, state) -> tuple:
    """The step's arguments ``(state, teacher, batch)`` (abstract batch)."""
    return state, self.teacher, self.batch


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
  teacher_cfg: Any  # ModelConfig, or None (no teacher pass)
  vocab: int
  tx: Any
  schedule: Any
  state: TrainState  # the initial train state
  state_shardings: Any
  student_graphdef: Any
  teacher_graphdef: Any  # None: no teacher pass
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
) -> Run:
  """The run of a resolved ``config`` (see :func:`resolve_config`): mesh,
  settings, tokenizer, models, data, optimizer, train state and compiled
  phases. Start-up checks (lengths, files, evals) come before any weight is
  read.

  ``abstract=True``: from the models' ``config.json`` files alone (no
  weights, tokenizer or data; ``num_layers > 0`` overrides both depths,
  ``vocab_size`` stands in for the tokenizer's size (default: the models'
  common vocabulary), ``eos_ids`` / ``pad_id`` for its ids (default: the
  student's ``config.json``)); nothing is compiled.
  """
  settings = settings_of(config)
  # --- Mesh.
  sharder = make_sharder(config)
  # --- Start-up checks, from the config.json files.
  use_teacher = settings.use_teacher
  s_cfg = model_config_of(config, "student", num_layers=num_layers)
  t_cfg = model_config_of(config, "teacher", num_layers=num_layers) if use_teacher else None
  tokenizer = evals = None
  if abstract:
    check_lengths(config, s_cfg, t_cfg)
  else:
    tokenizer = _tokenizer(config)
    check_run_settings(config, s_cfg, t_cfg)
    evals = prepare_evals(config, s_cfg, tokenizer)
  # --- Models.
  teacher = t_graphdef = t_params = t_shardings = None
  if abstract:
    s_graphdef, s_params, s_shardings = abstract_params(s_cfg, sharder)
    if t_cfg is not None:
      t_graphdef, t_params, t_shardings = abstract_params(t_cfg, sharder)
    vocab = vocab_size or vocab_of(s_cfg, t_cfg)
    sampling = sampling_config(config, eos_ids=eos_ids or s_cfg.eos_token_ids, pad_id=pad_id)
  else:
    student = _load(config, "student", sharder)
    s_cfg, s_graphdef = student.cfg, nnx.graphdef(student)
    if use_teacher:
      teacher = _load(config, "teacher", sharder)
      t_cfg = teacher.cfg
      t_graphdef, t_params = nnx.split(teacher)
      t_shardings = sharder.tree_shardings(t_params)
    vocab = vocab_of(s_cfg, t_cfg, len(tokenizer))
    sampling = sampling_config(config, tokenizer, s_cfg)
  step_cfg = opd_config(config, sampling)
  # --- Optimizer and train state.
  tx, schedule = make_optimizer(config)
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
    flops = flops_lib.step_flops(
      cfg,
      s_cfg,
      t_cfg if graphdef is not None else None,
      batch_size=b,
      prompt_len=batch["prompt_ids"].shape[1],
      vocab=vocab,
    )["total"]
    t0 = time.time()
    compiled = None if abstract else fn.lower(state, params, batch).compile()
    compile_s.append(time.time() - t0)
    return Phase(name, cfg, fn, compiled, flops, it, params, batch)

  def example_batch(phase_data):
    example = global_batch(next(iter(phase_data.iterator(b, seed=0))), sharder, b)
    return {k: _spec(v, v.sharding) for k, v in example.items()}

  teacher_args, compile_s = (t_graphdef, t_params, t_shardings), []
  if abstract:
    phases = {"opd": make_phase("opd", step_cfg, None, batch_specs(config, sharder), teacher_args)}
    data_stats = {}
  else:
    data, it = build_data(settings, tokenizer)
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
  after the last step (levanter's / flax ``periodic_actions`` style)."""

  every: int
  fn: Callable[[int, Any, dict], Any]
  at_end: bool = True

  def __call__(self, step: int, total: int, state, metrics: dict):
    if (self.every and step % self.every == 0) or (self.at_end and step == total):
      return self.fn(step, state, metrics)
    return None


def step_metrics(run: Run, phase: Phase, metrics, dt: float, peak: float | None) -> dict:
  """The step's host metrics plus timing, phase and FLOP keys."""
  metrics = host_metrics(metrics, phase.fn.token_metric_names())
  metrics.update(
    step_time_s=dt,
    tokens_per_sec=metrics["num_tokens"] / dt,
    cold_start=float(phase.name == "sft"),
    flops_per_step=float(phase.flops),
  )
  if peak:  # model FLOPs at the static shapes (flops.step_flops) / time / peak
    metrics["mfu"] = phase.flops / dt / (peak * jax.device_count())
  return metrics


def train(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs (or resumes) a training run; returns the final logged metrics."""
  # --- Mesh (processes), the resolved config.
  workdir = os.path.abspath(workdir)
  init_distributed(config.distributed)
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
  preempt, peak = checkpointing.PreemptionFlag(), peak_flops(config)
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
  """Steps ``start + 1 ..`` with the hooks; ``(status, last metrics, state)``."""
  s, last, status = run.settings, {"step": start}, "finished"
  for step in range(start + 1, s.total_steps + 1):
    phase = run.phase_at(step)
    batch = global_batch(next(phase.it), run.sharder, s.batch_size)
    t0 = time.time()
    state, metrics = phase.compiled(state, phase.teacher, batch)
    metrics = step_metrics(run, phase, metrics, time.time() - t0, peak)
    if phase.name == "opd":  # host-side schedules: the weights of this step's batch
      metrics.update(
        {
          f"schedule/data.mixture.{src}": schedules_lib.host_value(
            sched, step - 1 - s.cold_start.steps
          )
          for src, sched in s.mixture_schedules
        }
      )
    if step == start + 1:
      metrics["compile_time_s"] = run.compile_s
    for hook in hooks:
      hook(step, s.total_steps, state, metrics)
    last = {"step": step, **metrics}
    if preempt.requested():
      if saved[-1] != step and not metrics.get("nonfinite_in_a_row", 0):
        # (orbax refuses to save a step twice; a non-finite streak is not saved)
        _checkpoint(run, ckpt, step, state, force=True)
      status = "preempted"
      break
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

  hooks = [Hook(s.eval_every, evaluate), Hook(1, log_evals, at_end=False)] if run.evals else []
  return hooks + [
    Hook(s.log_every, log),
    Hook(1, progress),
    Hook(1, stop_if_nonfinite),
    Hook(s.checkpoint_every, checkpoint),
  ], saved


def main(argv):
  del argv
  from absl import flags, logging

  if not flags.FLAGS["verbosity"].present:  # orbax/absl INFO is very chatty
    logging.set_verbosity(logging.WARNING)
  config = flags.FLAGS.config
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
    flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)


if __name__ == "__main__":
  run()
