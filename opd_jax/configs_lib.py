"""Building blocks for ``configs/*.py`` (``get_config(arg)`` files).

Every field a run reads exists in :func:`base_config`, so command-line
overrides of locked configs catch typos. Loss hyperparameters sit beside the
loss name (``config.loss.name = "jsd"``, ``config.loss.beta = 0.5``): choose
the loss in the config argument (``--config=configs/opd.py:loss=jsd``) and its
keyword arguments appear with their registry defaults, ready to override.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Mapping
from typing import Any

import ml_collections

from opd_jax import losses as losses_lib

# Keys of config.loss that configure the step, not the loss function.
# chunk: sequence positions per loss chunk (0: the largest whose estimated
# per-device working set fits chunk_budget_mib, see opd_step.auto_loss_chunk).
LOSS_STEP_KEYS = ("name", "aggregation", "normalizer", "chunk", "chunk_budget_mib")


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
  """``"a=1,b=x"`` -> ConfigDict over ``defaults`` (values cast to the
  defaults' types); unknown keys are an error listing the valid ones."""
  out = dict(defaults)
  for item in filter(None, (arg or "").split(",")):
    if "=" not in item:
      raise ValueError(f"config argument {item!r} is not key=value")
    key, value = item.split("=", 1)
    key = key.strip()
    if key not in defaults:
      raise ValueError(f"unknown config argument {key!r}; valid: {sorted(defaults)}")
    default = defaults[key]
    if isinstance(default, bool):
      value = value.lower() in ("1", "true", "yes", "on")
    elif isinstance(default, int):
      value = int(value)
    elif isinstance(default, float):
      value = float(value)
    out[key] = value
  return ml_collections.ConfigDict(out)


def updated(
  config: ml_collections.ConfigDict, values: Mapping[str, Any]
) -> ml_collections.ConfigDict:
  """A copy of ``config`` with ``values`` (``{"data.max_prompt_len": 12}``:
  dotted keys) set; ``config`` itself is not modified. A key that does not
  exist is an error (the copy stays locked)."""
  out = copy.deepcopy(config)
  for key, value in values.items():
    *parents, leaf = key.split(".")
    node = out
    for name in parents:
      node = node[name]
    node[leaf] = value
  return out


def expand_workdir(config: ml_collections.ConfigDict, workdir: str) -> ml_collections.ConfigDict:
  """A copy of ``config`` with ``$WORKDIR`` replaced by ``workdir`` in every
  string field."""

  def walk(node, prefix):
    for key, value in node.items():
      if isinstance(value, ml_collections.ConfigDict):
        yield from walk(value, f"{prefix}{key}.")
      elif isinstance(value, str) and "$WORKDIR" in value:
        yield f"{prefix}{key}", value.replace("$WORKDIR", workdir)

  return updated(config, dict(walk(config, "")))


def loss_config(name: str, **overrides: Any) -> ml_collections.ConfigDict:
  """``config.loss`` for loss ``name``: its registry kwargs with defaults,
  plus aggregation settings."""
  fn = losses_lib.LOSSES.get(name)
  kwargs = {
    p.name: p.default
    for p in inspect.signature(fn).parameters.values()
    if p.kind == p.KEYWORD_ONLY
    and p.default is not inspect.Parameter.empty
    and p.name not in losses_lib.ROW_INPUTS
  }
  cfg = dict(
    name=name, aggregation="token_mean", normalizer=0.0, chunk=64, chunk_budget_mib=1024.0, **kwargs
  )
  for k, v in overrides.items():
    if k not in cfg:
      raise ValueError(f"loss {name!r} has no setting {k!r}; valid: {sorted(cfg)}")
    cfg[k] = v
  return ml_collections.ConfigDict(cfg)


def loss_kwargs(loss_cfg: Any) -> dict[str, Any]:
  return {k: v for k, v in dict(loss_cfg).items() if k not in LOSS_STEP_KEYS}


def model_config(path: str = "", **kw) -> ml_collections.ConfigDict:
  """``config.student`` / ``config.teacher``. ``attention``: the many-query
  attention (models/attention.py IMPLEMENTATIONS), with its query / key blocks;
  ``decode_*`` / ``key_cache_layout``: the one-query (sampler) attention over
  the KV cache (``ModelConfig``; "auto" picks per backend)."""
  return ml_collections.ConfigDict(
    dict(
      path=path,
      dtype="float32",
      param_dtype="float32",
      remat=False,
      scan_layers=False,
      vocab_pad_multiple=1,
      attention="blockwise",
      attention_block=256,
      attention_key_block=512,
      decode_attention="auto",
      decode_block=128,
      decode_phase_slots=512,
      decode_contraction="auto",
      key_cache_layout="auto",
      **kw,
    )
  )


def teacher_config(
  path: str = "", *, sources: str = "", default: bool = False, **kw
) -> ml_collections.ConfigDict:
  """One entry of ``config.teachers`` (multi-teacher OPD, ``opd_jax.teachers``):
  the model knobs of ``config.teacher`` plus its routing, ``sources`` (a comma
  list of the data's source names) and ``default`` (takes every unlisted
  source)."""
  c = model_config(path, **kw)
  c.sources = sources
  c.default = default
  return c


def base_config() -> ml_collections.ConfigDict:
  """Every setting a run reads, with defaults (a generic OPD run)."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.student = model_config()
  c.teacher = model_config()
  # Multi-teacher OPD: {name: teacher_config(...)} (then config.teacher.path stays
  # empty); rows go to a teacher by their data source (opd_jax.teachers).
  c.teachers = ml_collections.ConfigDict()
  c.tokenizer = ""  # default: the student's directory
  c.mesh = ml_collections.ConfigDict(
    dict(
      shape=ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1)),
      rules=ml_collections.ConfigDict(),
    )
  )  # logical axis -> mesh axes overrides
  c.data = ml_collections.ConfigDict(
    dict(
      train_files="",
      prompt_field="prompt",
      completion_field="",
      answer_field="answer",
      source_field="",
      use_chat_template=False,
      max_prompt_len=64,
      # Each batch's prompts are padded to the smallest of these widths that
      # holds its longest prompt (one compile per width used): "auto" is
      # max_prompt_len and its halves down to 1/8 (multiples of 8); "none":
      # always max_prompt_len; or a comma list, e.g. "128,512".
      prompt_buckets="auto",
      max_completion_len=0,  # 0: sampling.max_new_tokens
      overlong="drop",
      on_error="raise",
      num_epochs=0,  # 0: repeat forever
      mixture=ml_collections.ConfigDict(),
    )
  )
  c.batch_size = 8  # prompts per step (global)
  # ignore_eos=True: every row runs max_new_tokens (benchmarks); prefix_sum: the
  # inverse-CDF draw's prefix sums (SamplingConfig.prefix_sum: "auto" picks per
  # backend, "matmul" / "cumsum"), for training, the evals and the cold start.
  c.sampling = ml_collections.ConfigDict(
    dict(
      max_new_tokens=64,
      temperature=1.0,
      top_k=0,
      top_p=1.0,
      num_samples=1,
      ignore_eos=False,
      prefix_sum="auto",
    )
  )
  c.teacher_sampling = ml_collections.ConfigDict(dict(temperature=1.0, top_k=0, top_p=1.0))
  c.on_policy_fraction = 1.0  # GKD λ
  c.off_policy_source = "dataset"  # or "teacher"
  c.micro_batches = 1  # row groups per step (lax.scan), one update
  c.loss = loss_config("reverse_kl")
  # Scheduled settings, "target=spec;...", e.g. "loss.beta=linear:1.0:1.5:0:500"
  # (opd_jax.schedules; logged every step as schedule/<target>).
  c.schedules = ""
  c.optimizer = ml_collections.ConfigDict(
    dict(
      name="adamw",
      lr=1e-6,
      schedule="constant",
      warmup_steps=0,
      total_steps=0,
      end_lr_factor=0.0,
      b1=0.9,
      b2=0.999,
      eps=1e-8,
      weight_decay=0.01,
      grad_clip=1.0,
      decay_matrices_only=False,
      skip_nonfinite=True,
    )
  )
  c.metrics = ml_collections.ConfigDict(dict(enabled=True, top_k=16, position_chunk=64))
  c.total_steps = 100
  c.log_every = 1
  c.checkpoint_every = 50
  c.keep_checkpoints = 3
  c.restore_step = 0  # 0: the newest checkpoint that reads back whole
  # A step with a non-finite loss or gradient is skipped (parameters and
  # optimizer state kept, counted as `nonfinite_steps`); this many in a row
  # stop the run (optimizer.skip_nonfinite=False: plain optax, no guard).
  c.max_nonfinite_steps = 5
  c.eval_every = 0  # 0: only at the end
  c.evals = ml_collections.ConfigDict()
  c.export_hf = False  # write the final student to workdir/export_hf
  c.distributed = ml_collections.ConfigDict(
    dict(coordinator_address="", num_processes=1, process_id=-1, local_device_ids="")
  )
  c.progress_bar = True
  c.name = ""  # the run's label (progress bar, closing summary); "": "opd"
  c.summary = True  # a closing summary on the terminal and summary.png in the workdir
  # Evaluate the teacher once at the start (``teacher/eval/*`` at step 0,
  # the summary's gap recovery); needs a teacher and config.evals.
  c.eval_teacher = False
  # Off-policy cold start: SFT on verified teacher rollouts for `steps` steps,
  # then OPD, in one run (one workdir, one checkpoint lineage).
  c.cold_start = ml_collections.ConfigDict(
    dict(
      steps=0,
      task="arithmetic",
      prompts_file="",  # default: data.train_files
      rollouts_file="",  # default: $WORKDIR/cold_start_rollouts.jsonl
      attempts=4,
      keep_per_prompt=1,
      temperature=1.0,
      top_p=1.0,
      max_prompts=0,
    )
  )
  c.prepare = ""  # PREPARERS entry that makes assets first
  c.eval_at_start = False
  # Peak FLOP/s of one device for the logged MFU; 0: from the device kind
  # (opd_jax.flops.PEAK_FLOPS_BF16; none on CPU, where mfu is not logged).
  c.peak_flops = 0.0
  return c


def eval_config(task: str = "arithmetic", **kw) -> ml_collections.ConfigDict:
  """One entry of ``config.evals`` (an evaluator run every ``eval_every`` steps)."""
  d = dict(
    evaluator="accuracy",
    task=task,
    data_file="",
    num_examples=64,
    levels="",
    pattern="A",
    num_samples=1,
    temperature=0.0,
    top_p=1.0,
    max_new_tokens=0,
    batch_size=32,
    seed=1234,
  )
  d.update(kw)
  return ml_collections.ConfigDict(d)
