"""Step time with and without the in-step token metrics (arXiv 2604.13016
Eqs. 6-10, estimator audit, position chunks).

  python experiments/bench_metrics_cost.py [--vocab 512] [--new 64] [--batch 8]

Prints compile time and the median step time of the same OPD step built with
``metrics=True`` and ``metrics=False``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from opd_jax import opd_step, optim
from opd_jax.models import ModelConfig, create_model
from opd_jax.sampling import SamplingConfig
from opd_jax.sharding import Sharder


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument("--vocab", type=int, default=512)
  p.add_argument("--new", type=int, default=64)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--prompt", type=int, default=16)
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--top_k", type=int, default=16)
  args = p.parse_args(argv)
  s_cfg = ModelConfig(
    model_type="qwen3",
    vocab_size=args.vocab,
    hidden_size=128,
    intermediate_size=384,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=32,
    qk_norm=True,
  )
  t_cfg = s_cfg.replace(hidden_size=256, intermediate_size=768, num_layers=4, head_dim=64)
  student, teacher = create_model(s_cfg, seed=0), create_model(t_cfg, seed=1)
  tx, sched = optim.make_optimizer({"lr": 1e-4})
  gd_s = nnx.graphdef(student)
  gd_t, t_params = nnx.split(teacher)
  ids = np.random.RandomState(0).randint(3, args.vocab, (args.batch, args.prompt))
  batch = {
    "prompt_ids": jnp.asarray(ids, jnp.int32),
    "prompt_mask": jnp.ones((args.batch, args.prompt), bool),
  }
  print(
    f"jax {jax.__version__} on {jax.devices()[0].platform}; batch {args.batch} x "
    f"{args.new} new tokens, vocab {args.vocab}, top-k {args.top_k}"
  )
  for metrics in (False, True):
    fresh = nnx.merge(gd_s, jax.tree.map(jnp.copy, nnx.state(student)))  # steps donate
    state, _ = opd_step.init_train_state(fresh, tx, 0, Sharder())
    cfg = opd_step.OPDConfig(
      sampling=SamplingConfig(max_new_tokens=args.new),
      loss="reverse_kl",
      loss_chunk=32,
      metrics=metrics,
      metrics_top_k=args.top_k,
      position_chunk=16,
    )
    step = opd_step.make_opd_step(
      gd_s, gd_t, tx, sched, cfg, vocab_size=args.vocab, sharder=Sharder()
    )
    t0 = time.perf_counter()
    compiled = step.lower(state, t_params, batch).compile()
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(args.steps):
      t0 = time.perf_counter()
      state, m = compiled(state, t_params, batch)
      jax.block_until_ready(m)
      times.append(time.perf_counter() - t0)
    med = statistics.median(times[1:])
    print(
      f"metrics={'on ' if metrics else 'off'}  compile {compile_s:6.1f} s   "
      f"step {med * 1e3:7.1f} ms (median of {len(times) - 1})"
    )


if __name__ == "__main__":
  main()
