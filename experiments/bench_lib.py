"""Set-up shared by the sampler benchmarks (``bench_sampler.py``,
``bench_scan_layers.py``): the model and batch flags, the jitted sampler and
best-of-N timing. Importing it puts the repository root on ``sys.path`` (the
scripts run as ``python experiments/<name>.py``)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from opd_jax.sampling import SamplingConfig, sample  # noqa: E402


def arg_parser(doc: str, *, layers: int, prompt_len_help: str = "") -> argparse.ArgumentParser:
  """The flags of the model (depth ``layers`` by default) and of the batch."""
  p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--layers", type=int, default=layers)
  p.add_argument("--hidden", type=int, default=128)
  p.add_argument("--intermediate", type=int, default=384)
  p.add_argument("--heads", type=int, default=4)
  p.add_argument("--kv-heads", type=int, default=2)
  p.add_argument("--vocab", type=int, default=512)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--prompt-len", type=int, default=32, help=prompt_len_help or None)
  return p


def sampler_runner(model, ids, mask, config: SamplingConfig):
  """Compiles ``sampling.sample`` (jitted) on ``[B, P]`` ``ids`` / ``mask``;
  returns ``(compile seconds, run(seed) -> [B * n, N] tokens)``."""
  graphdef, state = nnx.split(model)

  @jax.jit
  def run(state, ids, mask, key):
    return sample(nnx.merge(graphdef, state), ids, mask, key, config).tokens

  ids, mask = jnp.asarray(ids), jnp.asarray(mask)
  t0 = time.perf_counter()
  compiled = run.lower(state, ids, mask, jax.random.key(0)).compile()
  compile_s = time.perf_counter() - t0

  def call(seed):
    return np.asarray(jax.block_until_ready(compiled(state, ids, mask, jax.random.key(seed))))

  return compile_s, call


def best_time(fn, repeats: int) -> float:
  """The fastest of ``repeats`` calls ``fn(i)``, in seconds."""
  times = []
  for i in range(repeats):
    t0 = time.perf_counter()
    fn(i)
    times.append(time.perf_counter() - t0)
  return min(times)
