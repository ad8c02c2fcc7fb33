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
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from opd_jax import configs_lib
from opd_jax.models import ModelConfig, create_model, to_hf
from opd_jax.registry import Registry
from opd_jax.tasks import get_task, write_jsonl

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


def ensure_tokenizer(path: str):
  from transformers import AutoTokenizer

  if not os.path.exists(os.path.join(path, "tokenizer.json")):
    from opd_jax.tasks.tokenizer import build_tokenizer

    build_tokenizer(path)
  return AutoTokenizer.from_pretrained(path)


def ensure_random_model(path: str, arch: Arch, tokenizer, seed: int) -> str:
  """A random-init model saved in HF format (with the tokenizer beside it)."""
  if not is_done(path):
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
) -> str:
  """``n`` examples over ``levels`` (+ ``extra = (n2, levels2)`` more, mixed
  in at random positions), written once."""
  if not os.path.exists(path):
    t = get_task(task)
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
) -> ml_collections.ConfigDict:
  """Driver config for supervised fine-tuning on dataset completions."""
  c = configs_lib.base_config()
  c.seed = seed
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
  c.progress_bar = False
  for name, e in (evals or {}).items():
    c.evals[name] = e
  if mesh:
    c.mesh.shape.update(mesh)
  return c


def train_organism(workdir: str, train_fn: TrainFn, config: ml_collections.ConfigDict) -> str:
  """Runs an SFT config in ``workdir`` with the driver's ``train_fn``
  (resumable) and returns its HF export."""
  export = os.path.join(workdir, "export_hf")
  if not is_done(export):
    last = train_fn(config, workdir)
    if last.get("status") != "finished":
      raise SystemExit(
        f"organism training in {workdir} stopped ({last.get('status')}); rerun to resume"
      )
  return export


# -----------------------------------------------------------------------------
# The quickstart: a teacher with new capability (all levels), a small student
# that knows the easy levels, both trained here in a couple of minutes.

QUICKSTART = dict(
  levels=(1, 2, 3, 4),
  easy=(1, 2),
  hard=(3, 4),
  teacher=Arch(num_layers=4, hidden_size=128),
  student=Arch(num_layers=2, hidden_size=64),
  teacher_steps=400,
  student_steps=150,
  teacher_examples=6000,
  student_examples=2000,
  max_prompt_len=12,
  max_new_tokens=48,
)


@PREPARERS.register("quickstart")
def prepare_quickstart(
  config: ml_collections.ConfigDict, workdir: str, train_fn: TrainFn
) -> ml_collections.ConfigDict:
  """Makes (or finds) the quickstart's tokenizer, data, teacher and student
  under ``workdir/assets``; returns ``config`` pointed at them (a copy)."""
  q = QUICKSTART
  assets = os.path.join(workdir, "assets")
  os.makedirs(assets, exist_ok=True)
  tok_dir = os.path.join(assets, "tokenizer")
  tokenizer = ensure_tokenizer(tok_dir)
  p, n = q["max_prompt_len"], q["max_new_tokens"]
  teacher_data = ensure_task_data(
    os.path.join(assets, "teacher_sft.jsonl"), n=q["teacher_examples"], seed=1, levels=q["levels"]
  )
  student_data = ensure_task_data(
    os.path.join(assets, "student_sft.jsonl"), n=q["student_examples"], seed=2, levels=q["easy"]
  )
  prompts = ensure_task_data(
    os.path.join(assets, "opd_prompts.jsonl"), n=2000, seed=3, levels=q["levels"]
  )
  evals = {
    "hard": configs_lib.eval_config(
      levels="+".join(map(str, q["hard"])), num_examples=64, max_new_tokens=n
    )
  }
  teacher = train_organism(
    os.path.join(assets, "teacher_sft"),
    train_fn,
    sft_config(
      init=ensure_random_model(os.path.join(assets, "teacher_init"), q["teacher"], tokenizer, 1),
      tokenizer=tok_dir,
      data_file=teacher_data,
      steps=q["teacher_steps"],
      lr=3e-3,
      batch_size=32,
      max_prompt_len=p,
      max_new_tokens=n,
      evals=evals,
    ),
  )
  student = train_organism(
    os.path.join(assets, "student_sft"),
    train_fn,
    sft_config(
      init=ensure_random_model(os.path.join(assets, "student_init"), q["student"], tokenizer, 2),
      tokenizer=tok_dir,
      data_file=student_data,
      steps=q["student_steps"],
      lr=3e-3,
      batch_size=32,
      max_prompt_len=p,
      max_new_tokens=n,
      evals=evals,
    ),
  )
  return configs_lib.updated(
    config,
    {
      "student.path": student,
      "teacher.path": teacher,
      "tokenizer": tok_dir,
      "data.train_files": prompts,
      "data.max_prompt_len": p,
      "sampling.max_new_tokens": n,
    },
  )


# -----------------------------------------------------------------------------
# Multi-teacher OPD: two teachers, each strong on its own level range, and a
# student that knows the low range only; the prompts carry their level as source
# ("arithmetic/L<n>"), so the driver routes each row to its level's teacher.

MULTI_TEACHER = dict(
  low_levels=(1, 2),
  high_levels=(3, 4),
  student_levels=(1, 2),
  low=Arch(num_layers=3, hidden_size=96),
  high=Arch(num_layers=4, hidden_size=128),
  student=Arch(num_layers=2, hidden_size=64),
  low_steps=400,
  high_steps=400,
  student_steps=600,
  teacher_examples=4000,
  student_examples=2000,
  max_prompt_len=12,
  max_new_tokens=48,
)


def multi_teacher_sources(levels: Sequence[int], task: str = "arithmetic") -> str:
  """``config.teachers.<name>.sources`` of a level range: the task's source
  names (``"arithmetic/L1,arithmetic/L2"``)."""
  return ",".join(f"{task}/L{level}" for level in levels)


@PREPARERS.register("multi_teacher")
def prepare_multi_teacher(
  config: ml_collections.ConfigDict, workdir: str, train_fn: TrainFn
) -> ml_collections.ConfigDict:
  """Makes (or finds) the multi-teacher run's tokenizer, prompts (tagged by
  level), teachers ``low`` (levels 1-2) and ``high`` (levels 3-4) and the
  student (levels 1-2) under ``workdir/assets``; returns ``config`` pointed at
  them (a copy; ``config.teachers.low`` / ``high`` must exist)."""
  q = MULTI_TEACHER
  assets = os.path.join(workdir, "assets")
  os.makedirs(assets, exist_ok=True)
  tok_dir = os.path.join(assets, "tokenizer")
  tokenizer = ensure_tokenizer(tok_dir)
  p, n = q["max_prompt_len"], q["max_new_tokens"]
  levels = q["low_levels"] + q["high_levels"]
  prompts = ensure_task_data(
    os.path.join(assets, "opd_prompts.jsonl"), n=2000, seed=3, levels=levels
  )

  def organism(name: str, arch: Arch, levels, steps: int, n_examples: int, seed: int) -> str:
    data = ensure_task_data(
      os.path.join(assets, f"{name}_sft.jsonl"), n=n_examples, seed=10 + seed, levels=levels
    )
    init = ensure_random_model(os.path.join(assets, f"{name}_init"), arch, tokenizer, seed)
    return train_organism(
      os.path.join(assets, f"{name}_sft"),
      train_fn,
      sft_config(
        init=init,
        tokenizer=tok_dir,
        data_file=data,
        steps=steps,
        lr=3e-3,
        batch_size=32,
        max_prompt_len=p,
        max_new_tokens=n,
      ),
    )

  low = organism("low", q["low"], q["low_levels"], q["low_steps"], q["teacher_examples"], 1)
  high = organism("high", q["high"], q["high_levels"], q["high_steps"], q["teacher_examples"], 2)
  student = organism(
    "student", q["student"], q["student_levels"], q["student_steps"], q["student_examples"], 3
  )
  return configs_lib.updated(
    config,
    {
      "student.path": student,
      "teachers.low.path": low,
      "teachers.high.path": high,
      "tokenizer": tok_dir,
      "data.train_files": prompts,
      "data.source_field": "source",
      "data.max_prompt_len": p,
      "sampling.max_new_tokens": n,
    },
  )
