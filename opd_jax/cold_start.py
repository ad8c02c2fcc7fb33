"""Off-policy cold start (arXiv 2604.13016's recipe): SFT the student on
verified teacher rollouts before OPD.

:func:`make_teacher_rollouts` samples ``attempts`` completions per prompt from
the teacher with the same sampler as training, keeps those the task verifier
accepts (at most ``keep_per_prompt`` per prompt, first accepted first) and
writes them as a JSONL dataset (fields of the prompt record plus
``completion``), atomically. The driver then runs ``config.cold_start.steps``
SFT steps on it and switches to OPD in the same run (one workdir, one
checkpoint lineage; see :mod:`opd_jax.train`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from opd_jax import data as data_lib
from opd_jax import evaluation


def make_teacher_rollouts(
  teacher,
  tokenizer,
  records: Sequence[dict[str, Any]],
  task,
  *,
  out_file: str,
  attempts: int = 4,
  keep_per_prompt: int = 1,
  temperature: float = 1.0,
  top_p: float = 1.0,
  max_new_tokens: int = 64,
  batch_size: int = 16,
  seed: int = 0,
  max_prompt_len: int | None = None,
  use_chat_template: bool = False,
  prefix_sum: str = "auto",
) -> dict[str, Any]:
  """Writes verified teacher rollouts to ``out_file``; returns statistics.

  Deterministic for a seed. Only process 0 writes (every process samples the
  same rows, as in SPMD training).
  """
  if attempts < 1 or keep_per_prompt < 1:
    raise ValueError(f"attempts={attempts} and keep_per_prompt={keep_per_prompt} must be >= 1")
  comps = evaluation.generate_completions(
    teacher,
    tokenizer,
    [r["prompt"] for r in records],
    num_samples=attempts,
    temperature=temperature,
    top_p=top_p,
    max_new_tokens=max_new_tokens,
    batch_size=batch_size,
    seed=seed,
    max_prompt_len=max_prompt_len,
    use_chat_template=use_chat_template,
    prefix_sum=prefix_sum,
  )
  scores = evaluation.score_completions(task, records, comps.texts, attempts)
  out, solved = [], 0
  for p, rec in enumerate(records):
    good = [j for j in range(attempts) if scores[p, j] > 0]
    solved += bool(good)
    for j in good[:keep_per_prompt]:
      text = comps.texts[p * attempts + j]
      out.append({**rec, "completion": text, "rollout_attempt": j})
  stats = {
    "num_prompts": len(records),
    "num_rollouts": len(out),
    "solved_frac": solved / max(len(records), 1),
    "attempt_accuracy": float(np.mean(scores)) if len(records) else 0.0,
  }
  if not out:
    raise ValueError(
      f"no teacher rollout passed the verifier ({len(records)} prompts x "
      f"{attempts} attempts): cannot cold-start"
    )
  if jax.process_index() == 0:
    data_lib.write_jsonl(out_file, out)
    with open(out_file + ".stats.json", "w") as f:
      json.dump(stats, f, indent=2)
  return stats
