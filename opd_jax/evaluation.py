"""Evaluation of a policy on a verifiable task: sample, decode, score, aggregate.

:func:`evaluate` tokenises the prompts (left-padded to one fixed length),
samples ``num_samples`` completions per prompt with :func:`opd_jax.sampling.sample`
(jitted once per model graph / sampling config / shape; the last batch is padded
to the full batch size), decodes them (cut at EOS, special tokens skipped) and
scores them with the task's verifier. It returns floats::

  avg@k, accuracy     mean correctness over all k samples of all problems
  pass@j              unbiased pass@j (Chen et al. 2021) for j = 1, 2, 4, ..., k
  mean_length         mean completion length in tokens (EOS included)
  truncated_frac      share of completions that hit max_new_tokens without EOS
  acc/level_L         avg@k over the problems of level L (when examples have levels)
  num_problems, num_samples

The pure parts (:func:`pass_at_k`, :func:`aggregate`, :func:`score_completions`,
:func:`evaluate_completions`) work on plain numbers and texts.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from opd_jax import sampling
from opd_jax.registry import Registry

EVALUATORS = Registry("evaluator")


# ----------------------------------------------------------------------------
# Pure metrics.


def pass_at_k(n: int, c: int, k: int) -> float:
  """Unbiased pass@k = 1 - C(n-c, k) / C(n, k) from ``c`` correct of ``n`` samples.

  Computed as the numerically stable product of Chen et al. (2021).
  """
  if not 0 <= c <= n:
    raise ValueError(f"need 0 <= c <= n, got c={c}, n={n}")
  if not 1 <= k <= n:
    raise ValueError(f"need 1 <= k <= n, got k={k}, n={n}")
  if n - c < k:
    return 1.0
  return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1, dtype=np.float64)))


def default_ks(n: int) -> tuple[int, ...]:
  """Powers of two below ``n``, and ``n`` itself."""
  ks, j = [], 1
  while j < n:
    ks.append(j)
    j *= 2
  return tuple(ks) + (n,)


def aggregate(
  scores: np.ndarray,
  *,
  lengths: np.ndarray | None = None,
  truncated: np.ndarray | None = None,
  levels: Sequence[int] | None = None,
  ks: Sequence[int] | None = None,
) -> dict[str, float]:
  """Metrics from per-sample scores.

  Args:
    scores: ``[P, k]`` scores in [0, 1] (problem p, sample j); a sample counts
      as correct for pass@j when its score is > 0.5.
    lengths: ``[P, k]`` or ``[P * k]`` completion lengths in tokens.
    truncated: ``[P, k]`` or ``[P * k]`` bools.
    levels: ``[P]`` level of every problem (adds ``acc/level_L``).
    ks: pass@j values to report (default :func:`default_ks`).

  Returns:
    The dict described in the module docstring.
  """
  scores = np.asarray(scores, np.float64)
  if scores.ndim != 2 or scores.shape[0] == 0 or scores.shape[1] == 0:
    raise ValueError(f"scores must be a non-empty [P, k] array, got {scores.shape}")
  num_problems, k = scores.shape
  out = {f"avg@{k}": float(scores.mean()), "accuracy": float(scores.mean())}
  correct = (scores > 0.5).sum(axis=1)
  for j in default_ks(k) if ks is None else ks:
    out[f"pass@{j}"] = float(np.mean([pass_at_k(k, int(c), int(j)) for c in correct]))
  if lengths is not None:
    out["mean_length"] = float(np.mean(np.asarray(lengths, np.float64)))
  if truncated is not None:
    out["truncated_frac"] = float(np.mean(np.asarray(truncated, np.float64)))
  if levels is not None:
    levels = np.asarray(levels)
    if levels.shape != (num_problems,):
      raise ValueError(f"levels must have shape [{num_problems}], got {levels.shape}")
    per_problem = scores.mean(axis=1)
    for level in sorted(set(levels.tolist())):
      out[f"acc/level_{level}"] = float(per_problem[levels == level].mean())
  out["num_problems"] = float(num_problems)
  out["num_samples"] = float(k)
  return out


def _levels_of(examples: Sequence[Mapping[str, Any]]) -> list[int] | None:
  levels = [ex.get("level") if isinstance(ex, Mapping) else None for ex in examples]
  if not levels or any(level is None for level in levels):
    return None
  return [int(level) for level in levels]


def score_completions(
  task: Any, examples: Sequence[Mapping[str, Any]], texts: Sequence[str], num_samples: int
) -> np.ndarray:
  """``[P, k]`` task scores; ``texts[p * k + j]`` is sample j of problem p."""
  if len(texts) != len(examples) * num_samples:
    raise ValueError(
      f"{len(texts)} completions for {len(examples)} problems x {num_samples} samples"
    )
  scores = np.zeros((len(examples), num_samples), np.float64)
  for p, ex in enumerate(examples):
    for j in range(num_samples):
      scores[p, j] = task.score(ex, texts[p * num_samples + j])
  return scores


def evaluate_completions(
  task: Any,
  examples: Sequence[Mapping[str, Any]],
  texts: Sequence[str],
  *,
  num_samples: int = 1,
  lengths: np.ndarray | None = None,
  truncated: np.ndarray | None = None,
  ks: Sequence[int] | None = None,
) -> dict[str, float]:
  """Scores given completion texts and aggregates (no model involved)."""
  task = _resolve_task(task)
  scores = score_completions(task, examples, texts, num_samples)
  return aggregate(scores, lengths=lengths, truncated=truncated, levels=_levels_of(examples), ks=ks)


# ----------------------------------------------------------------------------
# Tokenisation.


def _resolve_task(task: Any) -> Any:
  if isinstance(task, str):
    from opd_jax.tasks import get_task  # pylint: disable=import-outside-toplevel

    return get_task(task)
  return task


def pad_id_of(tokenizer) -> int:
  """The tokenizer's pad id, else its EOS id."""
  for pid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
    if pid is not None:
      return int(pid)
  raise ValueError("tokenizer has neither a pad token nor an EOS token")


def eos_ids_of(tokenizer, model_cfg=None) -> tuple[int, ...]:
  """Every id sampling stops on: the model's ``config.json`` EOS ids
  (``ModelConfig.eos_token_ids``; Qwen / Llama list several) and the
  tokenizer's ``eos_token_id``."""
  ids = set(model_cfg.eos_token_ids) if model_cfg is not None else set()
  if tokenizer.eos_token_id is not None:
    ids.add(int(tokenizer.eos_token_id))
  return tuple(sorted(ids))


def sampling_config(tokenizer, model_cfg=None, **knobs: Any) -> sampling.SamplingConfig:
  """The one :class:`SamplingConfig` builder of training, evaluation and
  prompt selection: stops on :func:`eos_ids_of` ``(tokenizer, model_cfg)``,
  pads with :func:`pad_id_of`; ``knobs`` are the other fields
  (``max_new_tokens``, ``temperature``, ``top_k``, ``top_p``, ``greedy``,
  ``num_samples``, ``prefix_sum``, ...)."""
  return sampling.SamplingConfig(
    eos_ids=eos_ids_of(tokenizer, model_cfg), pad_id=pad_id_of(tokenizer), **knobs
  )


def encode_prompts(
  tokenizer,
  prompts: Sequence[str],
  *,
  max_prompt_len: int | None = None,
  use_chat_template: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
  """Left-padded ``(ids [P, L] int32, mask [P, L] bool)``.

  ``L = max_prompt_len`` when given (a longer prompt raises), else the longest
  prompt. Plain prompts are encoded with the tokenizer's default special tokens;
  with ``use_chat_template`` each prompt becomes one user message rendered with
  ``add_generation_prompt=True`` and encoded without extra special tokens.
  """
  if not prompts:
    raise ValueError("no prompts")
  if use_chat_template:
    texts = [
      tokenizer.apply_chat_template(
        [{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False
      )
      for p in prompts
    ]
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
  else:
    encoded = tokenizer(list(prompts), add_special_tokens=True)["input_ids"]
  longest = max(len(e) for e in encoded)
  if min(len(e) for e in encoded) == 0:
    raise ValueError("a prompt encodes to zero tokens")
  width = longest if max_prompt_len is None else int(max_prompt_len)
  if longest > width:
    i = max(range(len(encoded)), key=lambda i: len(encoded[i]))
    raise ValueError(
      f"prompt {i} has {longest} tokens > max_prompt_len={width}: {prompts[i][:80]!r}"
    )
  ids = np.full((len(encoded), width), pad_id_of(tokenizer), np.int32)
  mask = np.zeros((len(encoded), width), bool)
  for i, e in enumerate(encoded):
    if e:
      ids[i, width - len(e) :] = e
      mask[i, width - len(e) :] = True
  return ids, mask


def decode_completions(
  tokenizer, tokens: np.ndarray, mask: np.ndarray, eos_ids: Sequence[int] = ()
) -> list[str]:
  """Texts of ``[R, N]`` sampled rows: cut at the first EOS, specials skipped."""
  tokens, mask = np.asarray(tokens), np.asarray(mask).astype(bool)
  eos = set(int(e) for e in eos_ids)
  texts = []
  for row, m in zip(tokens, mask):
    row = [int(t) for t in row[m]]
    for i, t in enumerate(row):
      if t in eos:
        row = row[:i]
        break
    texts.append(tokenizer.decode(row, skip_special_tokens=True))
  return texts


# ----------------------------------------------------------------------------
# Sampling.


class Completions(NamedTuple):
  """Decoded samples; row ``p * k + j`` is sample j of prompt p."""

  texts: list[str]
  lengths: np.ndarray  # [P * k] int, tokens incl. EOS
  truncated: np.ndarray  # [P * k] bool


@functools.partial(jax.jit, static_argnums=(0, 5))
def _sample_jit(graphdef, state, prompt_ids, prompt_mask, rng, config):
  model = nnx.merge(graphdef, state)
  out = sampling.sample(model, prompt_ids, prompt_mask, rng, config)
  return out.tokens, out.mask, out.lengths, out.truncated


def generate_completions(
  model,
  tokenizer,
  prompts: Sequence[str],
  *,
  num_samples: int = 1,
  temperature: float = 0.7,
  top_p: float = 0.95,
  top_k: int = 0,
  greedy: bool = False,
  max_new_tokens: int = 128,
  batch_size: int = 32,
  seed: int = 0,
  max_prompt_len: int | None = None,
  use_chat_template: bool = False,
  prefix_sum: str = "auto",
) -> Completions:
  """Samples ``num_samples`` completions for each prompt (``batch_size`` prompts
  per compiled call; batch ``i`` uses ``fold_in(PRNGKey(seed), i)``). Sampling
  stops on every EOS id training stops on (:func:`sampling_config` with the
  model's config); ``prefix_sum``: ``SamplingConfig.prefix_sum`` (the run's
  ``config.sampling.prefix_sum``)."""
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  config = sampling_config(
    tokenizer,
    model.cfg,
    max_new_tokens=max_new_tokens,
    temperature=temperature,
    top_k=top_k,
    top_p=top_p,
    greedy=greedy,
    num_samples=num_samples,
    prefix_sum=prefix_sum,
  )
  ids, mask = encode_prompts(
    tokenizer, prompts, max_prompt_len=max_prompt_len, use_chat_template=use_chat_template
  )
  graphdef, state = nnx.split(model)
  base = jax.random.PRNGKey(seed)
  texts, lengths, truncated = [], [], []
  for i, start in enumerate(range(0, len(ids), batch_size)):
    b_ids, b_mask = ids[start : start + batch_size], mask[start : start + batch_size]
    real = len(b_ids)
    if real < batch_size:  # pad with copies of the first row: one compiled shape
      fill = batch_size - real
      b_ids = np.concatenate([b_ids, np.repeat(b_ids[:1], fill, 0)])
      b_mask = np.concatenate([b_mask, np.repeat(b_mask[:1], fill, 0)])
    tok, tok_mask, lens, trunc = jax.device_get(
      _sample_jit(
        graphdef,
        state,
        jnp.asarray(b_ids),
        jnp.asarray(b_mask),
        jax.random.fold_in(base, i),
        config,
      )
    )
    rows = real * num_samples
    texts += decode_completions(tokenizer, tok[:rows], tok_mask[:rows], config.eos_ids)
    lengths.append(np.asarray(lens[:rows]))
    truncated.append(np.asarray(trunc[:rows]).astype(bool))
  return Completions(texts, np.concatenate(lengths), np.concatenate(truncated))


def evaluate(
  model,
  tokenizer,
  examples: Sequence[Mapping[str, Any]],
  task: Any,
  *,
  num_samples: int = 1,
  temperature: float = 0.7,
  top_p: float = 0.95,
  top_k: int = 0,
  greedy: bool = False,
  max_new_tokens: int = 128,
  batch_size: int = 32,
  seed: int = 0,
  max_prompt_len: int | None = None,
  use_chat_template: bool = False,
  ks: Sequence[int] | None = None,
  prefix_sum: str = "auto",
) -> dict[str, float]:
  """Samples, scores with ``task`` (object or registered name) and aggregates.

  Defaults follow the paper's evaluation (temperature 0.7, top_p 0.95); its
  avg@16 is ``num_samples=16``. ``batch_size`` counts prompts per sampler call
  (``batch_size * num_samples`` rows). Returns the metrics of the module
  docstring.
  """
  task = _resolve_task(task)
  examples = list(examples)
  comps = generate_completions(
    model,
    tokenizer,
    [ex["prompt"] for ex in examples],
    num_samples=num_samples,
    temperature=temperature,
    top_p=top_p,
    top_k=top_k,
    greedy=greedy,
    max_new_tokens=max_new_tokens,
    batch_size=batch_size,
    seed=seed,
    max_prompt_len=max_prompt_len,
    use_chat_template=use_chat_template,
    prefix_sum=prefix_sum,
  )
  return evaluate_completions(
    task,
    examples,
    comps.texts,
    num_samples=num_samples,
    lengths=comps.lengths,
    truncated=comps.truncated,
    ks=ks,
  )


EVALUATORS.register("accuracy")(evaluate)
