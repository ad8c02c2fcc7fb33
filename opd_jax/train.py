"""Experiment driver.

    python -m opd_jax.train --config=configs/<name>.py[:arg=value,...] \
        --config.<key>=<value> --workdir=DIR

(also installed as ``opd-train``). Configs are locked: an override of a key
that does not exist is an error. The resolved config is saved in the workdir;
the latest checkpoint there is restored automatically.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging as absl_logging
import numpy as np
from flax import nnx

from opd_jax import checkpointing, configs_lib, data as data_lib, evaluation
from opd_jax import flops as flops_lib
from opd_jax import losses as losses_lib, optim, organisms
from opd_jax.logging_utils import MetricWriter
from opd_jax.opd_step import (OPDConfig, common_vocab_size, host_metrics,
                              init_train_state, make_opd_step)
from opd_jax.registry import Registry
from opd_jax.sampling import SamplingConfig
from opd_jax.sharding import Sharder, make_mesh, rules_from_config

# Functions that create a run's assets (tokenizer, data, models) before it
# starts, selected by ``config.prepare``; each takes (config, workdir) and
# fills the config's paths in place.
PREPARERS = Registry("preparer")
PREPARERS.register("quickstart")(organisms.prepare_quickstart)

BATCH_KEYS = ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask")


def expand_paths(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Replaces ``$WORKDIR`` in every string field (in place)."""
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      expand_paths(value, workdir)
    elif isinstance(value, str) and "$WORKDIR" in value:
      config[key] = value.replace("$WORKDIR", workdir)


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
  if not jax.config.jax_cpu_collectives_implementation:   # CPU cross-process collectives
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(**kwargs)


def save_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  if jax.process_index() != 0:
    return
  os.makedirs(workdir, exist_ok=True)
  for name, text in (("config.json", config.to_json_best_effort(indent=2, sort_keys=True)),
                     ("config.txt", str(config))):
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
  return dict(dtype=model_cfg.dtype, param_dtype=model_cfg.param_dtype,
              vocab_pad_multiple=int(model_cfg.vocab_pad_multiple),
              remat=bool(model_cfg.remat), scan_layers=bool(model_cfg.scan_layers),
              attention=str(model_cfg.attention), attention_block=int(model_cfg.attention_block),
              attention_key_block=int(model_cfg.attention_key_block),
              decode_attention=str(model_cfg.decode_attention),
              decode_block=int(model_cfg.decode_block),
              decode_contraction=str(model_cfg.decode_contraction),
              key_cache_layout=str(model_cfg.key_cache_layout))


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
  return min(tokenizer_size, student_cfg.vocab_size) if tokenizer_size else (
      student_cfg.vocab_size)


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
  b, p = int(config.batch_size), int(config.data.max_prompt_len)
  keys = [("prompt_ids", jnp.int32, p), ("prompt_mask", jnp.bool_, p)]
  if float(config.on_policy_fraction) < 1 and config.off_policy_source == "dataset":
    n = int(config.data.max_completion_len) or int(config.sampling.max_new_tokens)
    keys += [("completion_ids", jnp.int32, n), ("completion_mask", jnp.bool_, n)]
  return {k: jax.ShapeDtypeStruct((b, w), dt, sharding=batch_sharding(sharder, (b, w)))
          for k, dt, w in keys}


class Phase(NamedTuple):
  """One compiled training phase (``opd``, and ``sft`` for a cold start)."""
  fn: Any               # the jitted step (trace_count, token_metric_names)
  compiled: Any         # its executable
  flops: int            # model FLOPs per step (flops.step_flops at the compiled shapes)
  it: Any               # its data iterator
  teacher_params: Any   # None: no teacher pass


def sft_config(step_cfg: OPDConfig) -> OPDConfig:
  """The cold-start phase's step: SFT on dataset completions, no teacher."""
  return dataclasses.replace(step_cfg, loss="sft", loss_kwargs=(), on_policy_fraction=0.0,
                             off_policy_source="dataset", metrics=False)


def eos_ids_of(tokenizer, model_cfg) -> tuple[int, ...]:
  ids = set(model_cfg.eos_token_ids)
  if tokenizer.eos_token_id is not None:
    ids.add(int(tokenizer.eos_token_id))
  return tuple(sorted(ids))


def sampling_config(config, tokenizer=None, student_cfg=None, *, eos_ids=(),
                    pad_id: int = 0) -> SamplingConfig:
  """``config.sampling`` as a :class:`SamplingConfig`; EOS and pad ids from the
  tokenizer (and the student's config) when given, else ``eos_ids``/``pad_id``."""
  s = config.sampling
  if tokenizer is not None:
    eos_ids, pad_id = eos_ids_of(tokenizer, student_cfg), evaluation.pad_id_of(tokenizer)
  return SamplingConfig(max_new_tokens=int(s.max_new_tokens), temperature=float(s.temperature),
                        top_k=int(s.top_k), top_p=float(s.top_p), eos_ids=tuple(eos_ids),
                        pad_id=int(pad_id), num_samples=int(s.num_samples))


def opd_config(config, sampling: SamplingConfig) -> OPDConfig:
  ts = config.teacher_sampling
  teacher_sampling = dataclasses.replace(sampling, temperature=float(ts.temperature),
                                         top_k=int(ts.top_k), top_p=float(ts.top_p))
  return OPDConfig(
      sampling=sampling, loss=config.loss.name,
      loss_kwargs=tuple(sorted(configs_lib.loss_kwargs(config.loss).items())),
      aggregation=config.loss.aggregation,
      normalizer=float(config.loss.normalizer) or None,
      on_policy_fraction=float(config.on_policy_fraction),
      off_policy_source=config.off_policy_source, teacher_sampling=teacher_sampling,
      loss_chunk=int(config.loss.chunk), metrics=bool(config.metrics.enabled),
      metrics_top_k=int(config.metrics.top_k),
      position_chunk=int(config.metrics.position_chunk),
      micro_batches=int(config.get("micro_batches", 1)))


def needs_teacher(config) -> bool:
  return (losses_lib.needs_teacher(config.loss.name) or bool(config.metrics.enabled)
          or (float(config.on_policy_fraction) < 1 and config.off_policy_source == "teacher"))


def build_data(config, tokenizer):
  d = config.data
  if not d.train_files:
    raise ValueError("config.data.train_files is empty")
  n_new = int(d.max_completion_len) or int(config.sampling.max_new_tokens)
  data = data_lib.PromptData.build(
      d.train_files, tokenizer, max_prompt_len=int(d.max_prompt_len),
      max_completion_len=n_new if d.completion_field else None,
      prompt_field=d.prompt_field, completion_field=d.completion_field or None,
      answer_field=d.answer_field or None, source_field=d.source_field or None,
      use_chat_template=bool(d.use_chat_template), overlong=d.overlong,
      on_error=d.on_error)
  mixture = d.mixture.to_dict() if len(d.mixture) else None
  it = data.iterator(int(config.batch_size), seed=int(config.seed),
                     num_epochs=int(d.num_epochs) or None, mixture=mixture)
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


def cold_start_data(config, workdir: str, tokenizer, teacher, sampling: SamplingConfig):
  """The cold-start SFT set: verified teacher rollouts (made once, cached in
  ``config.cold_start.rollouts_file``) and its iterator."""
  from opd_jax.cold_start import make_teacher_rollouts
  from opd_jax.tasks import get_task
  cs = config.cold_start
  path = cs.rollouts_file or os.path.join(workdir, "cold_start_rollouts.jsonl")
  if not os.path.exists(path):
    if teacher is None:
      raise ValueError("cold start needs a teacher (config.teacher.path)")
    records = []
    for f in data_lib._expand_paths(cs.prompts_file or config.data.train_files):
      records += data_lib.read_jsonl(f)
    records = records[: int(cs.max_prompts) or None]
    stats = make_teacher_rollouts(
        teacher, tokenizer, records, get_task(cs.task), out_file=path,
        attempts=int(cs.attempts), keep_per_prompt=int(cs.keep_per_prompt),
        temperature=float(cs.temperature), top_p=float(cs.top_p),
        max_new_tokens=sampling.max_new_tokens, batch_size=int(config.batch_size),
        seed=int(config.seed), max_prompt_len=int(config.data.max_prompt_len),
        use_chat_template=bool(config.data.use_chat_template))
    absl_logging.info("cold-start rollouts: %s", stats)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices("cold_start_rollouts")
  d = config.data
  sft_data = data_lib.PromptData.build(
      path, tokenizer, max_prompt_len=int(d.max_prompt_len),
      max_completion_len=sampling.max_new_tokens, prompt_field=d.prompt_field,
      completion_field="completion", answer_field=d.answer_field or None,
      use_chat_template=bool(d.use_chat_template), overlong=d.overlong, on_error=d.on_error)
  return sft_data, sft_data.iterator(int(config.batch_size), seed=int(config.seed))


def eval_examples(cfg, task) -> list[dict]:
  if cfg.data_file:
    return data_lib.read_jsonl(cfg.data_file)[: int(cfg.num_examples) or None]
  levels = [int(x) for x in str(cfg.levels).split("+") if x] or None
  return task.generate(int(cfg.num_examples), seed=int(cfg.seed), levels=levels,
                       pattern=cfg.pattern, split="eval")


def eval_new_tokens(config, cfg) -> int:
  """An eval's ``max_new_tokens`` (0: ``config.sampling.max_new_tokens``)."""
  return int(cfg.max_new_tokens) or int(config.sampling.max_new_tokens)


def _check_files(setting: str, paths) -> None:
  try:
    data_lib._expand_paths(paths)  # pylint: disable=protected-access
  except FileNotFoundError as e:
    raise ValueError(f"{setting}: {e}") from None


def check_run_settings(config, student_cfg, teacher_cfg=None) -> None:
  """Start-up checks of the data and length settings of the step (before
  anything is loaded or compiled); ValueError naming the setting.

  ``config.data.train_files`` (and ``config.cold_start.prompts_file``) must
  exist, the cold start's task must be registered, and
  ``data.max_prompt_len + sampling.max_new_tokens`` must fit in the student's
  and the teacher's ``max_position_embeddings``.
  """
  from opd_jax.tasks import TASKS
  check_lengths(config, student_cfg, teacher_cfg)
  if not config.data.train_files:
    raise ValueError("config.data.train_files is empty")
  _check_files("config.data.train_files", config.data.train_files)
  cs = config.cold_start
  if int(cs.steps) > 0:
    if cs.task not in TASKS:
      raise ValueError(f"config.cold_start.task: unknown task {cs.task!r}; valid tasks: "
                       f"{', '.join(TASKS.names())}")
    if cs.prompts_file:
      _check_files("config.cold_start.prompts_file", cs.prompts_file)


def check_lengths(config, student_cfg, teacher_cfg=None) -> None:
  """``data.max_prompt_len + sampling.max_new_tokens`` fits in the student's
  and the teacher's ``max_position_embeddings`` (ValueError otherwise)."""
  p, n = int(config.data.max_prompt_len), int(config.sampling.max_new_tokens)
  for name, cfg in (("student", student_cfg), ("teacher", teacher_cfg)):
    if cfg is not None and p + n > cfg.max_position_embeddings:
      where = f" ({config[name].path})" if config[name].path else ""
      raise ValueError(
          f"config.data.max_prompt_len ({p}) + config.sampling.max_new_tokens ({n}) = "
          f"{p + n} exceeds the {name}'s max_position_embeddings "
          f"{cfg.max_position_embeddings}{where}")


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
  cache = {}
  p = int(config.data.max_prompt_len)
  for name, cfg in config.evals.items():
    key = f"config.evals.{name}"
    if cfg.task not in TASKS:
      raise ValueError(f"{key}.task: unknown task {cfg.task!r}; valid tasks: "
                       f"{', '.join(TASKS.names())}")
    if cfg.evaluator not in evaluation.EVALUATORS:
      raise ValueError(f"{key}.evaluator: unknown evaluator {cfg.evaluator!r}; valid "
                       f"evaluators: {', '.join(evaluation.EVALUATORS.names())}")
    n, limit = eval_new_tokens(config, cfg), student_cfg.max_position_embeddings
    if p + n > limit:
      raise ValueError(f"{key}.max_new_tokens: config.data.max_prompt_len ({p}) + {n} new "
                       f"tokens = {p + n} exceeds the student's max_position_embeddings "
                       f"{limit}")
    task = get_task(cfg.task)
    no_file = (f"{key}.data_file is empty and task {cfg.task!r} cannot generate examples; "
               "set it to a JSONL file of prompts with answers")
    if cfg.data_file and not os.path.isfile(cfg.data_file):
      raise ValueError(f"{key}.data_file: file not found: {cfg.data_file!r}")
    if not cfg.data_file and not callable(getattr(task, "generate", None)):
      raise ValueError(no_file)
    try:
      examples = eval_examples(cfg, task)
    except NotImplementedError:
      raise ValueError(no_file) from None
    except (ValueError, UnicodeDecodeError) as e:   # json.JSONDecodeError, bad levels
      raise ValueError(f"{key}: {e}") from None
    if not examples:
      raise ValueError(f"{key}: no examples ({key}.data_file / num_examples)")
    for i, ex in enumerate(examples):
      missing = [f for f in ("prompt", "answer") if f not in ex]
      if missing:
        raise ValueError(f"{key}.data_file: example {i} has no {missing} field")
    if tokenizer is not None:
      try:
        evaluation.encode_prompts(tokenizer, [ex["prompt"] for ex in examples],
                                  max_prompt_len=p,
                                  use_chat_template=bool(config.data.use_chat_template))
      except ValueError as e:
        raise ValueError(f"{key}: {e} (config.data.max_prompt_len)") from None
    cache[name] = (task, examples)
  return cache


def run_evals(config, model, tokenizer, cache: dict) -> dict[str, float]:
  """Every entry of ``config.evals``, logged as ``eval/<name>/<metric>``;
  ``cache`` holds ``{name: (task, examples)}`` (see :func:`prepare_evals`)."""
  from opd_jax.tasks import get_task
  out = {}
  for name, cfg in config.evals.items():
    if name not in cache:
      task = get_task(cfg.task)
      cache[name] = (task, eval_examples(cfg, task))
    task, examples = cache[name]
    fn = evaluation.EVALUATORS.get(cfg.evaluator)
    res = fn(model, tokenizer, examples, task, num_samples=int(cfg.num_samples),
             temperature=float(cfg.temperature) or 1.0, greedy=float(cfg.temperature) == 0.0,
             top_p=float(cfg.top_p), max_new_tokens=eval_new_tokens(config, cfg),
             batch_size=int(cfg.batch_size), seed=int(cfg.seed),
             max_prompt_len=int(config.data.max_prompt_len),
             use_chat_template=bool(config.data.use_chat_template))
    out.update({f"eval/{name}/{k}": float(v) for k, v in res.items()})
  return out


def peak_flops(config) -> float | None:
  """Peak FLOP/s of one device: ``config.peak_flops``, or (0) from the
  device kind (``flops.PEAK_FLOPS_BF16``; None, e.g. on CPU)."""
  return float(config.peak_flops) or flops_lib.peak_flops_per_device(
      jax.devices()[0].device_kind)


def train(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs (or resumes) a training run; returns the final logged metrics."""
  workdir = os.path.abspath(workdir)
  init_distributed(config.distributed)
  expand_paths(config, workdir)
  if config.get("prepare"):
    PREPARERS.get(config.prepare)(config, workdir)
  save_config(config, workdir)
  is_main = jax.process_index() == 0

  sharder = make_sharder(config)
  tokenizer = _tokenizer(config)
  # Start-up checks from the config.json files, before any weight is read.
  use_teacher = needs_teacher(config)
  s_cfg = model_config_of(config, "student")
  t_cfg = model_config_of(config, "teacher") if use_teacher else None
  check_run_settings(config, s_cfg, t_cfg)
  eval_cache = prepare_evals(config, s_cfg, tokenizer)
  student = _load(config, "student", sharder)
  teacher = _load(config, "teacher", sharder) if use_teacher else None
  vocab = vocab_of(student.cfg, teacher.cfg if teacher is not None else None, len(tokenizer))
  sampling = sampling_config(config, tokenizer, student.cfg)
  step_cfg = opd_config(config, sampling)
  data, it = build_data(config, tokenizer)

  tx, schedule = make_optimizer(config)
  state, state_shardings = init_train_state(student, tx, int(config.seed), sharder)
  student_graphdef = nnx.graphdef(student)
  s_cfg = student.cfg
  del student
  teacher_graphdef = teacher_params = teacher_shardings = None
  if teacher is not None:
    teacher_graphdef, teacher_params = nnx.split(teacher)
    teacher_shardings = sharder.tree_shardings(teacher_params)
    t_cfg = teacher.cfg

  ckpt = checkpointing.Checkpointer(
      os.path.join(workdir, "checkpoints"), save_every=int(config.checkpoint_every),
      max_to_keep=int(config.keep_checkpoints))
  start, sft_state = 0, None
  if ckpt.latest_step() is not None:
    state, data_state, _ = ckpt.restore(checkpointing.abstract_like(state))
    data_lib.restore_iterator_state(it, data_state["opd"])
    sft_state = data_state.get("sft")
    start = int(state.step)
  writer = MetricWriter(workdir)
  writer.truncate_after(start if start else -1)   # a fresh start rewrites step 0 too
  if is_main and start == 0:
    writer.write(0, {f"data/{k}": v for k, v in data.stats.items()})

  b = int(config.batch_size)

  def compile_phase(cfg, phase_data, t_graphdef, t_params, t_shardings):
    """(step function, its executable, its model FLOPs per step)."""
    example = global_batch(next(iter(phase_data.iterator(b, seed=0))), sharder, b)
    fn = make_opd_step(student_graphdef, t_graphdef, tx, schedule, cfg, vocab_size=vocab,
                       sharder=sharder, state_shardings=state_shardings,
                       teacher_shardings=t_shardings,
                       batch_shardings={k: v.sharding for k, v in example.items()})
    flops = flops_lib.step_flops(cfg, s_cfg, t_cfg if t_graphdef is not None else None,
                                 batch_size=b, prompt_len=example["prompt_ids"].shape[1],
                                 vocab=vocab)["total"]
    return fn, fn.lower(state, t_params, example).compile(), flops

  t0 = time.time()
  phases = {"opd": Phase(*compile_phase(step_cfg, data, teacher_graphdef, teacher_params,
                                        teacher_shardings), it, teacher_params)}
  cold_steps = int(config.cold_start.steps)
  if cold_steps > 0:
    sft_data, sft_it = cold_start_data(config, workdir, tokenizer, teacher, sampling)
    if sft_state is not None:
      data_lib.restore_iterator_state(sft_it, sft_state)
    phases["sft"] = Phase(*compile_phase(sft_config(step_cfg), sft_data, None, None, None),
                          sft_it, None)
  compile_s = time.time() - t0
  peak = peak_flops(config)

  preempt = checkpointing.PreemptionFlag()
  total = int(config.total_steps)
  last: dict[str, Any] = {"step": start}

  def student_model(state):
    return nnx.merge(student_graphdef, state.params)

  def checkpoint(step, force=False):
    data_state = {name: data_lib.save_iterator_state(p.it) for name, p in phases.items()}
    ckpt.save(step, state, data_state, {"step": step, "time": time.time()}, force=force)

  from tqdm import tqdm
  bar = tqdm(total=total, initial=start, disable=not (is_main and config.progress_bar),
             desc="opd", dynamic_ncols=True)
  if config.evals and start == 0 and config.get("eval_at_start", False):
    res = run_evals(config, student_model(state), tokenizer, eval_cache)
    writer.write(0, res)
  status = "finished"
  for step in range(start + 1, total + 1):
    phase = "sft" if step <= cold_steps else "opd"
    ph = phases[phase]
    batch = global_batch(next(ph.it), sharder, b)
    t0 = time.time()
    state, metrics = ph.compiled(state, ph.teacher_params, batch)
    metrics = host_metrics(metrics, ph.fn.token_metric_names())
    dt = time.time() - t0
    metrics.update(step_time_s=dt, tokens_per_sec=metrics["num_tokens"] / dt,
                   cold_start=float(phase == "sft"), flops_per_step=float(ph.flops))
    if peak:   # model FLOPs at the static shapes (flops.step_flops) / time / peak
      metrics["mfu"] = ph.flops / dt / (peak * jax.device_count())
    if step == start + 1:
      metrics["compile_time_s"] = compile_s
    evals_now = config.evals and (step == total or (
        int(config.eval_every) and step % int(config.eval_every) == 0))
    if evals_now:
      metrics.update(run_evals(config, student_model(state), tokenizer, eval_cache))
    if step % int(config.log_every) == 0 or step == total or evals_now:
      writer.write(step, metrics)
    last = {"step": step, **metrics}
    bar.update(1)
    bar.set_postfix(loss=f"{metrics['loss']:.4f}", tok_s=f"{metrics['tokens_per_sec']:.0f}",
                    len=f"{metrics['mean_response_length']:.1f}")
    saved = ckpt.should_save(step) or step == total
    if saved:
      checkpoint(step)
    if preempt.requested():
      if not saved:   # orbax refuses to save a step twice
        checkpoint(step, force=True)
      status = "preempted"
      break
  bar.close()
  preempt.restore_handler()
  if status == "finished" and config.export_hf:
    from opd_jax.models import to_hf
    to_hf(student_model(state), os.path.join(workdir, "export_hf"))
    if is_main:
      tokenizer.save_pretrained(os.path.join(workdir, "export_hf"))
  ckpt.close()
  writer.close()
  last["status"] = status
  last["trace_count"] = max(p.fn.trace_count() for p in phases.values())
  return last


def main(argv):
  del argv
  from absl import flags, logging
  if not flags.FLAGS["verbosity"].present:   # orbax/absl INFO is very chatty
    logging.set_verbosity(logging.WARNING)
  config = flags.FLAGS.config
  workdir = flags.FLAGS.workdir
  result = train(config, workdir)
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
    config_flags.DEFINE_config_file("config", None, "config file (get_config(arg))",
                                    lock_config=True)
    flags.DEFINE_string("workdir", None, "run directory (checkpoints, logs)")
    flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)


if __name__ == "__main__":
  run()
