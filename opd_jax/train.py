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
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging as absl_logging
import numpy as np
from flax import nnx

from opd_jax import checkpointing, configs_lib, data as data_lib, evaluation
from opd_jax import losses as losses_lib, optim, organisms
from opd_jax.logging_utils import MetricWriter
from opd_jax.opd_step import (OPDConfig, common_vocab_size, host_metrics,
                              init_train_state, make_opd_step, optimizer_shardings)
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


def _load(model_cfg, sharder: Sharder):
  from opd_jax.models import from_hf
  if not model_cfg.path:
    raise ValueError("model path is empty (config.student.path / config.teacher.path)")
  return from_hf(model_cfg.path, dtype=model_cfg.dtype, param_dtype=model_cfg.param_dtype,
                 mesh=sharder.mesh, rules=sharder.rules,
                 vocab_pad_multiple=int(model_cfg.vocab_pad_multiple),
                 remat=bool(model_cfg.remat))


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
      loss_chunk=int(config.loss.chunk),
      loss_chunk_budget_mib=float(config.loss.chunk_budget_mib),
      metrics=bool(config.metrics.enabled),
      metrics_top_k=int(config.metrics.top_k),
      position_chunk=int(config.metrics.position_chunk))


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
      sharding = sharder.named(("activation_batch",) + (None,) * (x.ndim - 1), shape)
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


def run_evals(config, model, tokenizer, cache: dict) -> dict[str, float]:
  """Every entry of ``config.evals``, logged as ``eval/<name>/<metric>``."""
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
             top_p=float(cfg.top_p),
             max_new_tokens=int(cfg.max_new_tokens) or int(config.sampling.max_new_tokens),
             batch_size=int(cfg.batch_size), seed=int(cfg.seed),
             max_prompt_len=int(config.data.max_prompt_len),
             use_chat_template=bool(config.data.use_chat_template))
    out.update({f"eval/{name}/{k}": float(v) for k, v in res.items()})
  return out


def train(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs (or resumes) a training run; returns the final logged metrics."""
  workdir = os.path.abspath(workdir)
  init_distributed(config.distributed)
  expand_paths(config, workdir)
  if config.get("prepare"):
    PREPARERS.get(config.prepare)(config, workdir)
  save_config(config, workdir)
  is_main = jax.process_index() == 0

  mesh = make_mesh(config.mesh.shape.to_dict())
  sharder = Sharder(mesh, rules_from_config(config.mesh.rules))
  tokenizer = _tokenizer(config)
  student = _load(config.student, sharder)
  teacher = _load(config.teacher, sharder) if needs_teacher(config) else None
  vocab = (common_vocab_size(student.cfg, teacher.cfg, len(tokenizer)) if teacher is not None
           else min(len(tokenizer), student.cfg.vocab_size))
  sampling = sampling_config(config, tokenizer, student.cfg)
  step_cfg = opd_config(config, sampling)
  data, it = build_data(config, tokenizer)

  opt_cfg = config.optimizer.to_dict()
  opt_cfg["total_steps"] = int(opt_cfg["total_steps"]) or int(config.total_steps)
  tx, schedule = optim.make_optimizer(opt_cfg)
  state, state_shardings = init_train_state(student, tx, int(config.seed), sharder)
  student_graphdef = nnx.graphdef(student)
  del student
  teacher_graphdef = teacher_params = teacher_shardings = None
  if teacher is not None:
    teacher_graphdef, teacher_params = nnx.split(teacher)
    teacher_shardings = sharder.tree_shardings(teacher_params)

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
    example = global_batch(next(iter(phase_data.iterator(b, seed=0))), sharder, b)
    fn = make_opd_step(student_graphdef, t_graphdef, tx, schedule, cfg, vocab_size=vocab,
                       sharder=sharder, state_shardings=state_shardings,
                       teacher_shardings=t_shardings,
                       batch_shardings={k: v.sharding for k, v in example.items()})
    return fn, fn.lower(state, t_params, example).compile()

  t0 = time.time()
  step_fn, compiled = compile_phase(step_cfg, data, teacher_graphdef, teacher_params,
                                    teacher_shardings)
  phases = {"opd": (step_fn, compiled, it, teacher_params)}
  cold_steps = int(config.cold_start.steps)
  if cold_steps > 0:
    sft_data, sft_it = cold_start_data(config, workdir, tokenizer, teacher, sampling)
    if sft_state is not None:
      data_lib.restore_iterator_state(sft_it, sft_state)
    sft_cfg = dataclasses.replace(step_cfg, loss="sft", loss_kwargs=(), on_policy_fraction=0.0,
                                  off_policy_source="dataset", metrics=False)
    sft_fn, sft_compiled = compile_phase(sft_cfg, sft_data, None, None, None)
    phases["sft"] = (sft_fn, sft_compiled, sft_it, None)
  compile_s = time.time() - t0

  preempt = checkpointing.PreemptionFlag()
  eval_cache: dict = {}
  total = int(config.total_steps)
  last: dict[str, Any] = {"step": start}

  def student_model(state):
    return nnx.merge(student_graphdef, state.params)

  def checkpoint(step, force=False):
    data_state = {name: data_lib.save_iterator_state(p[2]) for name, p in phases.items()}
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
    fn, compiled, phase_it, phase_teacher = phases[phase]
    batch = global_batch(next(phase_it), sharder, b)
    t0 = time.time()
    state, metrics = compiled(state, phase_teacher, batch)
    metrics = host_metrics(metrics, fn.token_metric_names())
    dt = time.time() - t0
    metrics.update(step_time_s=dt, tokens_per_sec=metrics["num_tokens"] / dt,
                   cold_start=float(phase == "sft"))
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
  last["trace_count"] = max(p[0].trace_count() for p in phases.values())
  return last


def lower_abstract(config: ml_collections.ConfigDict, *, vocab_size: int | None = None,
                   eos_ids: tuple[int, ...] = (), pad_id: int = 0, compile: bool = False):
  """Builds, shards and lowers the step from ``config.json`` files alone.

  No weights, tokenizer or data are read: parameters, optimizer state and the
  batch are ``jax.ShapeDtypeStruct`` s carrying their shardings. Returns the
  ``jax.stages.Lowered`` (or ``Compiled`` with ``compile=True``); used to
  check paper-scale configs on a simulated mesh.
  """
  from opd_jax.models import abstract_model
  from opd_jax.models.hf_io import config_from_hf
  mesh = make_mesh(config.mesh.shape.to_dict())
  sharder = Sharder(mesh, rules_from_config(config.mesh.rules))

  def abstract(m):
    cfg = config_from_hf(m.path, dtype=m.dtype, param_dtype=m.param_dtype,
                         vocab_pad_multiple=int(m.vocab_pad_multiple), remat=bool(m.remat))
    model = abstract_model(cfg, sharder)
    graphdef, state = nnx.split(model)
    shardings = sharder.tree_shardings(state)
    state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                         state, shardings)
    return cfg, graphdef, state, shardings

  s_cfg, s_graphdef, s_params, s_shard = abstract(config.student)
  teacher = abstract(config.teacher) if needs_teacher(config) else None
  vocab = vocab_size or (common_vocab_size(s_cfg, teacher[0]) if teacher else s_cfg.vocab_size)
  sampling = sampling_config(config, eos_ids=eos_ids or s_cfg.eos_token_ids, pad_id=pad_id)
  opt_cfg = config.optimizer.to_dict()
  opt_cfg["total_steps"] = int(opt_cfg["total_steps"]) or int(config.total_steps)
  tx, schedule = optim.make_optimizer(opt_cfg)
  rep = sharder.replicated()
  opt_shard = optimizer_shardings(tx, s_params, s_shard, rep)
  opt_state = jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
                           jax.eval_shape(tx.init, s_params), opt_shard)
  from opd_jax.opd_step import TrainState
  scalar = lambda dt, shape=(): jax.ShapeDtypeStruct(shape, dt, sharding=rep)
  state = TrainState(step=scalar(jnp.int32), params=s_params, opt_state=opt_state,
                     rng=scalar(jnp.uint32, (2,)))
  state_shardings = TrainState(step=rep, params=s_shard, opt_state=opt_shard, rng=rep)
  b, p = int(config.batch_size), int(config.data.max_prompt_len)
  batch = {}
  for key, dt in (("prompt_ids", jnp.int32), ("prompt_mask", jnp.bool_)):
    batch[key] = jax.ShapeDtypeStruct((b, p), dt, sharding=sharder.named(
        ("activation_batch", None), (b, p)))
  if float(config.on_policy_fraction) < 1 and config.off_policy_source == "dataset":
    n = int(config.data.max_completion_len) or int(config.sampling.max_new_tokens)
    for key, dt in (("completion_ids", jnp.int32), ("completion_mask", jnp.bool_)):
      batch[key] = jax.ShapeDtypeStruct((b, n), dt, sharding=sharder.named(
          ("activation_batch", None), (b, n)))
  step_fn = make_opd_step(
      s_graphdef, teacher[1] if teacher else None, tx, schedule,
      opd_config(config, sampling), vocab_size=vocab, sharder=sharder,
      state_shardings=state_shardings, teacher_shardings=teacher[3] if teacher else None,
      batch_shardings={k: v.sharding for k, v in batch.items()})
  lowered = step_fn.lower(state, teacher[2] if teacher else None, batch)
  return lowered.compile() if compile else lowered


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
