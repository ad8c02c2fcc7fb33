"""Model organisms: small models trained from scratch on the built-in task,
and the run preparers (``config.prepare``) that make them.

Everything goes through the real paths: the tokenizer is saved as a standard
``tokenizer.json``, models are created from a :class:`ModelConfig`, written in
Hugging Face format (``to_hf``), trained by this repo's own driver in SFT mode
(λ = 0, ``sft`` loss on dataset completions) and exported again with
``to_hf``. Each organism is cached: a finished export is reused. The driver
is passed in (``train_fn``), never imported: this module sits below
:mod:`opd_jax.train`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from opd_jax import configs_lib
from opd_jax.models import ModelConfig, create_model, to_hf
from opd_jax.registry import Registry
from opd_jax.tasks import get_task, read_jsonl, write_jsonl

# ``train_fn(config, workdir) -> last metrics``: the driver's ``train``.
TrainFn = Callable[[ml_collections.ConfigDict, str], dict]

# Functions that create a run's assets (tokenizer, data, models) before it
# starts, selected by ``config.prepare``: ``(config, workdir, train_fn) ->
# config`` returns the resolved config (a copy with the assets' paths); the
# given config is not modified.
PREPARERS = Registry("preparer")


@dataclasses.dataclass(frozen=True)
class Arch:
  """A small Qwen3-style architecture."""

  num_layers: int
  hidden_size: int
  num_heads: int = 4
  num_kv_heads: int = 2
  mlp_ratio: int = 3

  def model_config(self, vocab_size: int, eos_id: int, pad_id: int) -> ModelConfig:
    return ModelConfig(
      model_type="qwen3",
      vocab_size=vocab_size,
      hidden_size=self.hidden_size,
      intermediate_size=self.mlp_ratio * self.hidden_size,
      num_layers=self.num_layers,
      num_heads=self.num_heads,
      num_kv_heads=self.num_kv_heads,
      head_dim=self.hidden_size // self.num_heads,
      qk_norm=True,
      rope_theta=10000.0,
      max_position_embeddings=512,
      tie_word_embeddings=False,
      eos_token_ids=(eos_id,),
      pad_token_id=pad_id,
    )


def is_done(path: str) -> bool:
  return os.path.exists(os.path.join(path, "config.json"))


def ensure_tokenizer(path: str, *, bpe_from: Sequence[str] = (), vocab_size: int = 512):
  """The tokenizer at ``path``, built once: character level, or a byte-level
  BPE of ``vocab_size`` trained on the text of the JSONL files ``bpe_from``
  (their prompts and completions)."""
  from transformers import AutoTokenizer

  if not os.path.exists(os.path.join(path, "tokenizer.json")):
    from opd_jax.tasks.tokenizer import build_bpe_tokenizer, build_tokenizer

    if bpe_from:
      texts = [r["prompt"] + r.get("completion", "") for f in bpe_from for r in read_jsonl(f)]
      build_bpe_tokenizer(path, texts, vocab_size=vocab_size)
    else:
      build_tokenizer(path)
  return AutoTokenizer.from_pretrained(path)


def ensure_random_model(path: str, arch: Arch, tokenizer, seed: int) -> str:
  """A random-init model saved in HF format (with the tokenizer beside it).
  A model already at ``path`` is reused only if it has ``arch``'s shape
  (ValueError naming the difference otherwise: another arch needs its own
  path)."""
  if is_done(path):
    with open(os.path.join(path, "config.json")) as f:
      saved = json.load(f)
    want = {
      "num_hidden_layers": arch.num_layers,
      "hidden_size": arch.hidden_size,
      "num_attention_heads": arch.num_heads,
      "num_key_value_heads": arch.num_kv_heads,
      "intermediate_size": arch.mlp_ratio * arch.hidden_size,
    }
    diff = {k: (saved.get(k), v) for k, v in want.items() if saved.get(k) != v}
    if diff:
      raise ValueError(
        f"{path} holds another architecture than {arch} "
        f"(saved vs wanted: {diff}); give this one its own init path"
      )
  else:
    cfg = arch.model_config(len(tokenizer), tokenizer.eos_token_id, tokenizer.pad_token_id)
    to_hf(create_model(cfg, seed=seed), path)
    if jax.process_index() == 0:
      tokenizer.save_pretrained(path)
  return path


def ensure_task_data(
  path: str,
  *,
  n: int,
  seed: int,
  levels: Sequence[int],
  pattern: str = "A",
  split: str = "train",
  task: str = "arithmetic",
  extra: tuple[int, Sequence[int]] | None = None,
  phrasings: int = 1,
) -> str:
  """``n`` examples over ``levels`` (+ ``extra = (n2, levels2)`` more, mixed
  in at random positions), written once; ``phrasings > 1``: the arithmetic
  task's varied step templates (:mod:`opd_jax.tasks.arithmetic`)."""
  if not os.path.exists(path):
    t = get_task(task, **({"phrasings": phrasings} if phrasings != 1 else {}))
    examples = t.generate(n, seed=seed, levels=tuple(levels), pattern=pattern, split=split)
    if extra and extra[0]:
      more = t.generate(
        extra[0], seed=seed + 7919, levels=tuple(extra[1]), pattern=pattern, split=split
      )
      examples += more
      order = np.random.default_rng(seed).permutation(len(examples))
      examples = [examples[i] for i in order]
    write_jsonl(path, examples)
  return path


def sft_config(
  *,
  init: str,
  tokenizer: str,
  data_file: str,
  steps: int,
  lr: float,
  batch_size: int,
  max_prompt_len: int,
  max_new_tokens: int,
  seed: int = 0,
  evals: dict[str, Any] | None = None,
  mesh: dict[str, int] | None = None,
  name: str = "",
  progress_bar: bool = False,
) -> ml_collections.ConfigDict:
  """Driver config for supervised fine-tuning on dataset completions
  (``name``: the progress bar's label; no closing summary)."""
  c = configs_lib.base_config()
  c.seed = seed
  c.name = name
  c.summary = False
  c.student.path = init
  c.tokenizer = tokenizer
  c.data.train_files = data_file
  c.data.completion_field = "completion"
  c.data.max_prompt_len = max_prompt_len
  c.sampling.max_new_tokens = max_new_tokens
  c.batch_size = batch_size
  c.on_policy_fraction = 0.0
  c.off_policy_source = "dataset"
  c.loss = configs_lib.loss_config("sft", chunk=max(8, max_new_tokens // 2))
  c.metrics.enabled = False
  c.optimizer.update(
    dict(
      lr=lr,
      schedule="cosine",
      warmup_steps=max(1, steps // 20),
      end_lr_factor=0.1,
      weight_decay=0.01,
      grad_clip=1.0,
    )
  )
  c.total_steps = steps
  c.log_every = max(1, steps // 20)
  c.checkpoint_every = max(1, steps // 2)
  c.keep_checkpoints = 1
  c.export_hf = True
  c.progress_bar = progress_bar
  for key, e in (evals or {}).items():
    c.evals[key] = e
  if mesh:
    c.mesh.shape.update(mesh)
  return c


def _say(text: str) -> None:
  if jax.process_index() == 0:
    print(text, flush=True)


def level_accuracies(metrics: dict) -> str:
  """``"L1 100% L2 98%"`` from ``eval/<name>/acc/level_L`` keys (first eval)."""
  found = sorted((int(k.rsplit("_", 1)[1]), v) for k, v in metrics.items() if "/acc/level_" in k)
  return " ".join(f"L{level} {100 * v:.0f}%" for level, v in found) or "no eval"


def _last_eval(workdir: str) -> dict:
  path = os.path.join(workdir, "metrics.jsonl")
  last = {}
  if os.path.exists(path):
    with open(path) as f:
      for line in f:
        record = json.loads(line) if line.strip() else {}
        if any(k.startswith("eval/") for k in record):
          last = record
  return last


def train_organism(
  workdir: str, train_fn: TrainFn, config: ml_collections.ConfigDict, label: str = ""
) -> str:
  """Runs an SFT config in ``workdir`` with the driver's ``train_fn``
  (resumable) and returns its HF export; with ``label``, says what it made
  (or reused) and the per-level greedy accuracy of its final eval."""
  export = os.path.join(workdir, "export_hf")
  if is_done(export):
    if label:
      _say(f"{label}: reused {export} ({level_accuracies(_last_eval(workdir))})")
    return export
  t0 = time.time()
  last = train_fn(config, workdir)
  if last.get("status") != "finished":
    raise SystemExit(
      f"organism training in {workdir} stopped ({last.get('status')}); rerun to resume"
    )
  if label:
    _say(
      f"{label}: {int(config.total_steps)} SFT steps in {time.time() - t0:.0f} s -> {export} "
      f"(greedy accuracy {level_accuracies(last)})"
    )
  return export


# -----------------------------------------------------------------------------
# The quickstart: a teacher with new capability (level 3 solved), a smaller
# student that knows the easy levels and a little of level 3 (above zero, far
# below the teacher), both trained here by the driver's SFT mode; OPD then
# closes most of the level-3 gap (README: the three-seed check,
# experiments/quickstart_check.py).


@dataclasses.dataclass(frozen=True)
class Quickstart:
  """The quickstart's organisms and data (seeds are offsets from
  ``config.seed``: another seed gives other organisms, data and OPD)."""

  levels: tuple[int, ...] = (1, 2, 3)
  easy: tuple[int, ...] = (1, 2)
  hard: tuple[int, ...] = (3,)
  teacher: Arch = Arch(num_layers=3, hidden_size=128)
  student: Arch = Arch(num_layers=2, hidden_size=128)
  teacher_steps: int = 400
  student_steps: int = 300
  sft_lr: float = 3e-3
  sft_batch: int = 32
  teacher_examples: int = 6000
  student_examples: int = 4000
  student_hard_fraction: float = 0.2  # of the student's examples on the hard levels
  prompt_examples: int = 2000  # OPD prompts, all on the hard levels
  eval_examples: int = 96  # per organism eval, over all levels
  # The longest prompt (level 3, "727+389=") is 8 tokens: one prompt width, so each
  # phase compiles one step (a wider max_prompt_len also compiles its own bucket).
  max_prompt_len: int = 8
  max_new_tokens: int = 40


QUICKSTART = Quickstart()
# The organisms configs/quickstart_grpo.py runs on (README: its three-seed table
# was measured on them): the quickstart's data and student, its teacher trained
# 600 SFT steps (the quickstart's own teacher has 400 since the 3-minute budget;
# at 600 it reached 100% on level 3 on seeds 0-2, at 400 96.9-100%).
QUICKSTART_TEACHER600 = dataclasses.replace(QUICKSTART, teacher_steps=600)


def _data(path: str, what: str, **kw) -> str:
  made = not os.path.exists(path)
  ensure_task_data(path, **kw)
  n = kw["n"] + (kw["extra"][0] if kw.get("extra") else 0)
  _say(f"{'made' if made else 'reused'} {path} ({n} {what})")
  return path


@PREPARERS.register("quickstart")
def prepare_quickstart(
  config: ml_collections.ConfigDict, workdir: str, train_fn: TrainFn
) -> ml_collections.ConfigDict:
  """Makes (or finds) the quickstart's tokenizer, data, teacher and student
  under ``workdir/assets``; returns ``config`` pointed at them (a copy)."""
  return _prepare_quickstart(config, workdir, train_fn, QUICKSTART)


@PREPARERS.register("quickstart_teacher600")
def prepare_quickstart_teacher600(
  config: ml_collections.ConfigDict, workdir: str, train_fn: TrainFn
) -> ml_collections.ConfigDict:
  """:func:`prepare_quickstart` with ``QUICKSTART_TEACHER600``: the same data
  and student, the teacher trained 600 SFT steps."""
  return _prepare_quickstart(config, workdir, train_fn, QUICKSTART_TEACHER600)


def _prepare_quickstart(
  config: ml_collections.ConfigDict, workdir: str, train_fn: TrainFn, q: Quickstart
) -> ml_collections.ConfigDict:
  seed = int(config.seed)
  assets = os.path.join(workdir, "assets")
  os.makedirs(assets, exist_ok=True)
  _say(f"quickstart assets under {assets} (seed {seed})")
  tok_dir = os.path.join(assets, "tokenizer")
  made = not os.path.exists(os.path.join(tok_dir, "tokenizer.json"))
  tokenizer = ensure_tokenizer(tok_dir)
  _say(f"{'made' if made else 'reused'} {tok_dir} (character tokenizer, {len(tokenizer)} tokens)")
  p, n = q.max_prompt_len, q.max_new_tokens
  lv = lambda levels: "level " + "+".join(map(str, levels))
  teacher_data = _data(
    os.path.join(assets, "teacher_sft.jsonl"),
    f"teacher SFT examples, {lv(q.levels)}",
    n=q.teacher_examples,
    seed=1000 * seed + 1,
    levels=q.levels,
  )
  n_hard = int(round(q.student_hard_fraction * q.student_examples))
  student_data = _data(
    os.path.join(assets, "student_sft.jsonl"),
    f"student SFT examples, {lv(q.easy)}, {n_hard} of them {lv(q.hard)}",
    n=q.student_examples - n_hard,
    seed=1000 * seed + 2,
    levels=q.easy,
    extra=(n_hard, q.hard),
  )
  prompts = _data(
    os.path.join(assets, "opd_prompts.jsonl"),
    f"OPD prompts, {lv(q.hard)}",
    n=q.prompt_examples,
    seed=1000 * seed + 3,
    levels=q.hard,
  )
  evals = {
    "all": configs_lib.eval_config(
      levels="+".join(map(str, q.levels)), num_examples=q.eval_examples, max_new_tokens=n
    )
  }
  organisms = {}
  for i, (role, arch, steps, data) in enumerate(
    (
      ("teacher", q.teacher, q.teacher_steps, teacher_data),
      ("student", q.student, q.student_steps, student_data),
    )
  ):
    label = f"{role} ({arch.num_layers}x{arch.hidden_size})"
    init = os.path.join(assets, f"{role}_init")
    organisms[role] = train_organism(
      os.path.join(assets, f"{role}_sft"),
      train_fn,
      sft_config(
        init=ensure_random_model(init, arch, tokenizer, 1000 * seed + 1 + i),
        tokenizer=tok_dir,
        data_file=data,
        steps=steps,
        lr=q.sft_lr,
        batch_size=q.sft_batch,
        max_prompt_len=p,
        max_new_tokens=n,
        seed=seed,
        evals=evals,
        name=f"{role} sft",
        progress_bar=True,
      ),
      label=label,
    )
  return configs_lib.updated(
    config,
    {
      "student.path": organisms["student"],
      "teacher.path": organisms["teacher"],
      "tokenizer": tok_dir,
      "data.train_files": prompts,
      "data.max_prompt_len": p,
      "sampling.max_new_tokens": n,
    },
  )


# -----------------------------------------------------------------------------
# Multi-teacher OPD: two teachers, each strong on its own level range and
# trained on that range only, and a student built like the quickstart's (the
# low range and a little of the high one: above zero, far below teacher
# ``high``); the prompts carry their level as source ("arithmetic/L<n>"), so
# the driver routes each row to its range's teacher.


@dataclasses.dataclass(frozen=True)
class MultiTeacher:
  """The multi-teacher run's organisms and data (seeds are offsets from
  ``config.seed``)."""

  low_levels: tuple[int, ...] = (1, 2)  # teacher ``low``'s skill (and the student's)
  high_levels: tuple[int, ...] = (3,)  # teacher ``high``'s skill (the student's gap)
  low: Arch = Arch(num_layers=3, hidden_size=128)
  high: Arch = Arch(num_layers=3, hidden_size=128)
  student: Arch = Arch(num_layers=2, hidden_size=128)
  low_steps: int = 400
  high_steps: int = 500
  student_steps: int = 300
  sft_lr: float = 3e-3
  sft_batch: int = 32
  teacher_examples: int = 4000  # each teacher's, on its own levels only
  student_examples: int = 4000
  student_high_fraction: float = 0.2  # of the student's examples on the high levels
  prompt_examples: int = 3000  # OPD prompts, spread over all levels
  eval_examples: int = 96  # per organism eval, over all levels
  max_prompt_len: int = 12
  max_new_tokens: int = 40


MULTI_TEACHER = MultiTeacher()


def multi_teacher_sources(levels: Sequence[int], task: str = "arithmetic") -> str:
  """``config.teachers.<name>.sources`` of a level range: the task's source
  names (``"arithmetic/L1,arithmetic/L2"``)."""
  return ",".join(f"{task}/L{level}" for level in levels)


def _lv(levels: Sequence[int]) -> str:
  return "level " + "+".join(map(str, levels))


def _multi_teacher_organisms(
  config: ml_collections.ConfigDict, assets: str, train_fn: TrainFn, roles: Sequence[str]
) -> tuple[str, dict[str, str]]:
  """The tokenizer and the organisms ``roles`` (of "low", "high",
  "student") under ``assets``, made or reused: (tokenizer dir, {role: HF
  export})."""
  q, seed = MULTI_TEACHER, int(config.seed)
  tok_dir = os.path.join(assets, "tokenizer")
  tokenizer = ensure_tokenizer(tok_dir)
  levels = q.low_levels + q.high_levels
  n_high = int(round(q.student_high_fraction * q.student_examples))
  plan = (
    ("low", q.low, q.low_steps, (q.teacher_examples, q.low_levels, None), _lv(q.low_levels)),
    ("high", q.high, q.high_steps, (q.teacher_examples, q.high_levels, None), _lv(q.high_levels)),
    (
      "student",
      q.student,
      q.student_steps,
      (q.student_examples - n_high, q.low_levels, (n_high, q.high_levels)),
      f"{_lv(q.low_levels)}, {n_high} of them {_lv(q.high_levels)}",
    ),
  )
  evals = {
    "all": configs_lib.eval_config(
      levels="+".join(map(str, levels)),
      num_examples=q.eval_examples,
      max_new_tokens=q.max_new_tokens,
    )
  }
  organisms = {}
  for i, (name, arch, steps, (count, data_levels, extra), what) in enumerate(plan):
    if name not in roles:
      continue
    data = _data(
      os.path.join(assets, f"{name}_sft.jsonl"),
      f"{name} SFT examples, {what}",
      n=count,
      seed=1000 * seed + 10 + i,
      levels=data_levels,
      extra=extra,
    )
    init = ensure_random_model(
      os.path.join(assets, f"{name}_init"), arch, tokenizer, 1000 * seed + 1 + i
    )
    organisms[name] = train_organism(
      os.path.join(assets, f"{name}_sft"),
      train_fn,
      sft_config(
        init=init,
        tokenizer=tok_dir,
        data_file=data,
        steps=steps,
        lr=q.sft_lr,
        batch_size=q.sft_batch,
        max_prompt_len=q.max_prompt_len,
        max_new_tokens=q.max_new_tokens,
        seed=seed,
        evals=evals,
        name=f"{name} sft",
        progress_bar=bool(config.get("progress_bar", True)),
      ),
      label=f"{name} ({arch.num_layers}x{arch.hidden_size})",
    )
  return tok_dir, organisms


def _assets_dir(workdir: str, config: ml_collections.ConfigDict) -> str:
  assets = os.path.join(workdir, "assets")
  os.makedirs(assets, exist_ok=True)
  _say(f"multi-teacher assets under {assets} (seed {int(config.seed)})")
  return assets


@PREPARERS.register("multi_teacher")
def prepare_multi_teacher(
  config: ml_collections.ConfigDict, workdir: str, train_fn: TrainFn
) -> ml_collections.ConfigDict:
  """Makes (or finds) the multi-teacher run's tokenizer, prompts (tagged by
  level), teachers ``low`` (trained on the low levels only) and ``high`` (the
  high levels only) and the student (low levels, a fifth of its examples on
  the high ones) under ``workdir/assets``; returns ``config`` pointed at them
  (a copy; ``config.teachers.low`` / ``high`` must exist)."""
  q, assets = MULTI_TEACHER, _assets_dir(workdir, config)
  levels = q.low_levels + q.high_levels
  prompts = _data(
    os.path.join(assets, "opd_prompts.jsonl"),
    f"OPD prompts, {_lv(levels)}, tagged by level",
    n=q.prompt_examples,
    seed=1000 * int(config.seed) + 3,
    levels=levels,
  )
  tok_dir, organisms = _multi_teacher_organisms(
    config, assets, train_fn, ("low", "high", "student")
  )
  return configs_lib.updated(
    config,
    {
      "student.path": organisms["student"],
      "teachers.low.path": organisms["low"],
      "teachers.high.path": organisms["high"],
      "tokenizer": tok_dir,
      "data.train_files": prompts,
      "data.source_field": "source",
      "data.max_prompt_len": q.max_prompt_len,
      "sampling.max_new_tokens": q.max_new_tokens,
    },
  )


@PREPARERS.register("multi_teacher_high")
def prepare_multi_teacher_high(
  config: ml_collections.ConfigDict, workdir: str, train_fn: TrainFn
) -> ml_collections.ConfigDict:
  """Single-teacher OPD on the multi-teacher run's gap: its student and
  teacher ``high`` (the same assets: made or reused under ``workdir/assets``)
  and prompts on the high levels only; returns ``config`` pointed at them
  (``config.teacher.path``; a copy)."""
  q, assets = MULTI_TEACHER, _assets_dir(workdir, config)
  prompts = _data(
    os.path.join(assets, "opd_prompts_high.jsonl"),
    f"OPD prompts, {_lv(q.high_levels)}",
    n=q.prompt_examples,
    seed=1000 * int(config.seed) + 4,
    levels=q.high_levels,
  )
  tok_dir, organisms = _multi_teacher_organisms(config, assets, train_fn, ("high", "student"))
  return configs_lib.updated(
    config,
    {
      "student.path": organisms["student"],
      "teacher.path": organisms["high"],
      "tokenizer": tok_dir,
      "data.train_files": prompts,
      "data.max_prompt_len": q.max_prompt_len,
      "sampling.max_new_tokens": q.max_new_tokens,
    },
  )
