"""Teacher-aligned prompt selection (arXiv 2604.13016's recipe).

Scores every prompt of a set with the teacher and the student, then keeps the
prompts on which OPD has the most to transfer:

* ``gap``: teacher avg@k − student avg@k (the teacher solves what the student
  cannot — "genuinely new capability");
* ``overlap``: 1 − mean top-k overlap ratio (Eq. 6) on the student's samples
  (low overlap: the teacher disagrees with the student where it goes);
* ``advantage``: mean sampled-token OPD reward log q(y) − log p(y) on the
  student's samples (the teacher prefers the student's own tokens: aligned);
* ``neg_kl``: minus the exact reverse KL on the student's samples (alignment).

Writes ``scores.jsonl`` (one row per prompt, every score), ``selected.jsonl``
(the kept records with all their original fields, in input order) and
``summary.json``. Deterministic for a seed.

  python -m opd_jax.prompt_selection --student=DIR --teacher=DIR --prompts=FILE \
      --task=arithmetic --score=gap --top_fraction=0.5 --out_dir=DIR
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from opd_jax import data as data_lib
from opd_jax import evaluation, sampling
from opd_jax import metrics as metrics_lib
from opd_jax.sampling import full_sequence

SCORES = ("gap", "overlap", "advantage", "neg_kl")
ROW_METRICS = (
  "overlap_ratio",
  "reverse_kl",
  "k1",
  "overlap_mass_student",
  "overlap_mass_teacher",
  "entropy_gap",
)


@functools.partial(jax.jit, static_argnums=(0, 2, 6, 7))
def _score_batch(
  s_graphdef,
  s_state,
  t_graphdef,
  t_state,
  prompt_ids,
  prompt_mask,
  config: sampling.SamplingConfig,
  top_k: int,
  rng,
):
  """Student samples k completions per prompt; per-row means ``[R]`` of the
  token metrics with the teacher scoring them (full logits: for prompt
  scoring at modest sizes)."""
  student = nnx.merge(s_graphdef, s_state)
  teacher = nnx.merge(t_graphdef, t_state)
  out = sampling.sample(student, prompt_ids, prompt_mask, rng, config)
  ids, mask, pos = full_sequence(out.prompt_ids, out.prompt_mask, out.tokens, out.mask)
  p, n = out.prompt_ids.shape[1], out.tokens.shape[1]
  s_logits = student(ids, mask, pos)[:, p - 1 : p - 1 + n]
  t_logits = teacher(ids, mask, pos)[:, p - 1 : p - 1 + n]
  v = min(s_logits.shape[-1], t_logits.shape[-1])
  per_tok = metrics_lib.token_metrics(s_logits[..., :v], t_logits[..., :v], out.tokens, k=top_k)
  m = out.mask.astype(jnp.float32)
  denom = jnp.maximum(m.sum(-1), 1.0)
  return ({k: (per_tok[k] * m).sum(-1) / denom for k in ROW_METRICS}, out.tokens, out.mask)


def score_prompts(
  student,
  teacher,
  tokenizer,
  records: Sequence[dict],
  task,
  *,
  num_samples: int = 4,
  max_new_tokens: int = 64,
  temperature: float = 1.0,
  top_k_metrics: int = 16,
  batch_size: int = 16,
  seed: int = 0,
  max_prompt_len: int | None = None,
  use_chat_template: bool = False,
  prefix_sum: str = "auto",
) -> list[dict[str, Any]]:
  """Per-prompt scores (see module docstring), in input order (``prefix_sum``:
  ``SamplingConfig.prefix_sum`` of both models' samples)."""
  prompts = [r["prompt"] for r in records]
  ids, mask = evaluation.encode_prompts(
    tokenizer, prompts, max_prompt_len=max_prompt_len, use_chat_template=use_chat_template
  )
  config = evaluation.sampling_config(
    tokenizer,
    student.cfg,
    max_new_tokens=max_new_tokens,
    temperature=temperature,
    num_samples=num_samples,
    prefix_sum=prefix_sum,
  )
  s_graphdef, s_state = nnx.split(student)
  t_graphdef, t_state = nnx.split(teacher)
  base = jax.random.PRNGKey(seed)
  rows: dict[str, list[np.ndarray]] = {k: [] for k in ROW_METRICS}
  student_texts: list[str] = []
  for i, start in enumerate(range(0, len(ids), batch_size)):
    b_ids, b_mask = ids[start : start + batch_size], mask[start : start + batch_size]
    real = len(b_ids)
    if real < batch_size:  # one compiled shape: pad with the first prompt
      b_ids = np.concatenate([b_ids, np.repeat(b_ids[:1], batch_size - real, 0)])
      b_mask = np.concatenate([b_mask, np.repeat(b_mask[:1], batch_size - real, 0)])
    res, tok, tok_mask = jax.device_get(
      _score_batch(
        s_graphdef,
        s_state,
        t_graphdef,
        t_state,
        jnp.asarray(b_ids),
        jnp.asarray(b_mask),
        config,
        top_k_metrics,
        jax.random.fold_in(base, i),
      )
    )
    keep = real * num_samples
    for k in ROW_METRICS:
      rows[k].append(np.asarray(res[k])[:keep])
    student_texts += evaluation.decode_completions(
      tokenizer, tok[:keep], tok_mask[:keep], config.eos_ids
    )
  teacher_texts = evaluation.generate_completions(
    teacher,
    tokenizer,
    prompts,
    num_samples=num_samples,
    temperature=temperature,
    top_p=1.0,
    max_new_tokens=max_new_tokens,
    batch_size=batch_size,
    seed=seed + 1,
    max_prompt_len=max_prompt_len,
    use_chat_template=use_chat_template,
    prefix_sum=prefix_sum,
  ).texts
  per_row = {k: np.concatenate(v).reshape(len(records), num_samples) for k, v in rows.items()}
  s_correct = evaluation.score_completions(task, records, student_texts, num_samples)
  t_correct = evaluation.score_completions(task, records, teacher_texts, num_samples)
  out = []
  for i, r in enumerate(records):
    s_acc, t_acc = float(s_correct[i].mean()), float(t_correct[i].mean())
    row = {
      "index": i,
      "prompt": r["prompt"],
      "source": r.get("source"),
      "student_acc": s_acc,
      "teacher_acc": t_acc,
    }
    row.update({k: float(per_row[k][i].mean()) for k in ROW_METRICS})
    row["gap"] = t_acc - s_acc
    row["overlap"] = 1.0 - row["overlap_ratio"]
    row["advantage"] = -row["k1"]
    row["neg_kl"] = -row["reverse_kl"]
    out.append(row)
  return out


def select(
  scores: Sequence[dict],
  *,
  score: str = "gap",
  top_fraction: float | None = None,
  threshold: float | None = None,
) -> list[int]:
  """Indices of the kept prompts (input order). Ties in the ranking are broken
  by index, so the selection is deterministic."""
  if score not in SCORES:
    raise ValueError(f"unknown score {score!r}; valid: {SCORES}")
  if (top_fraction is None) == (threshold is None):
    raise ValueError("give exactly one of top_fraction or threshold")
  if threshold is not None:
    return [s["index"] for s in scores if s[score] >= threshold]
  if not 0 < top_fraction <= 1:
    raise ValueError(f"top_fraction must be in (0, 1], got {top_fraction}")
  n = max(1, int(round(top_fraction * len(scores))))
  ranked = sorted(scores, key=lambda s: (-s[score], s["index"]))
  return sorted(s["index"] for s in ranked[:n])


def run_selection(
  *,
  student: str,
  teacher: str,
  prompts: str,
  out_dir: str,
  task: str = "arithmetic",
  tokenizer: str = "",
  score: str = "gap",
  top_fraction: float | None = 0.5,
  threshold: float | None = None,
  num_samples: int = 4,
  max_new_tokens: int = 64,
  temperature: float = 1.0,
  batch_size: int = 16,
  seed: int = 0,
  max_prompt_len: int | None = None,
  limit: int = 0,
  prefix_sum: str = "auto",
) -> dict[str, Any]:
  """Loads models and prompts, scores, selects and writes the three files."""
  from transformers import AutoTokenizer

  from opd_jax.models import from_hf
  from opd_jax.tasks import get_task

  tok = AutoTokenizer.from_pretrained(tokenizer or student)
  records = data_lib.read_jsonl(prompts)
  if limit:
    records = records[:limit]
  scores = score_prompts(
    from_hf(student),
    from_hf(teacher),
    tok,
    records,
    get_task(task),
    num_samples=num_samples,
    max_new_tokens=max_new_tokens,
    temperature=temperature,
    batch_size=batch_size,
    seed=seed,
    max_prompt_len=max_prompt_len,
    prefix_sum=prefix_sum,
  )
  kept = select(scores, score=score, top_fraction=top_fraction, threshold=threshold)
  os.makedirs(out_dir, exist_ok=True)
  data_lib.write_jsonl(os.path.join(out_dir, "scores.jsonl"), scores)
  data_lib.write_jsonl(os.path.join(out_dir, "selected.jsonl"), [records[i] for i in kept])
  summary = {
    "num_prompts": len(records),
    "num_selected": len(kept),
    "score": score,
    "top_fraction": top_fraction,
    "threshold": threshold,
    "seed": seed,
    "mean_selected": float(np.mean([scores[i][score] for i in kept])),
    "mean_all": float(np.mean([s[score] for s in scores])),
  }
  with open(os.path.join(out_dir, "summary.json"), "w") as f:
    json.dump(summary, f, indent=2)
  return summary


def main(argv):
  del argv
  from absl import flags

  f = flags.FLAGS
  summary = run_selection(
    student=f.student,
    teacher=f.teacher,
    prompts=f.prompts,
    out_dir=f.out_dir,
    task=f.task,
    tokenizer=f.tokenizer,
    score=f.score,
    top_fraction=None if f.threshold is not None else f.top_fraction,
    threshold=f.threshold,
    num_samples=f.num_samples,
    max_new_tokens=f.max_new_tokens,
    temperature=f.temperature,
    batch_size=f.batch_size,
    seed=f.seed,
    max_prompt_len=f.max_prompt_len or None,
    limit=f.limit,
    prefix_sum=f.prefix_sum,
  )
  print(json.dumps(summary))


def run():
  from absl import app, flags

  flags.DEFINE_string("student", None, "student HF checkpoint dir")
  flags.DEFINE_string("teacher", None, "teacher HF checkpoint dir")
  flags.DEFINE_string("prompts", None, "prompt JSONL (prompt, answer, optional source)")
  flags.DEFINE_string("out_dir", None, "output directory")
  flags.DEFINE_string("task", "arithmetic", "task (verifier) name")
  flags.DEFINE_string("tokenizer", "", "tokenizer dir (default: student)")
  flags.DEFINE_enum("score", "gap", list(SCORES), "ranking score")
  flags.DEFINE_float("top_fraction", 0.5, "keep this top fraction")
  flags.DEFINE_float("threshold", None, "keep prompts with score >= threshold instead")
  flags.DEFINE_integer("num_samples", 4, "samples per prompt per model")
  flags.DEFINE_integer("max_new_tokens", 64, "completion length")
  flags.DEFINE_float("temperature", 1.0, "sampling temperature")
  flags.DEFINE_integer("batch_size", 16, "prompts per compiled call")
  flags.DEFINE_integer("seed", 0, "seed")
  flags.DEFINE_integer("max_prompt_len", 0, "prompt length (0: longest)")
  flags.DEFINE_integer("limit", 0, "score only the first N prompts (0: all)")
  flags.DEFINE_enum(
    "prefix_sum", "auto", list(sampling.PREFIX_SUMS), "the sampler's prefix sums (per backend)"
  )
  flags.mark_flags_as_required(["student", "teacher", "prompts", "out_dir"])
  app.run(main)


if __name__ == "__main__":
  run()
