"""Scanned vs unrolled layers: compile time and sampler decode speed.

Same random weights in both layouts (``convert_layers``); EOS disabled, so
every row decodes exactly N tokens. Prints, per layout, the sampler's compile
seconds and ms per decode step (best of ``--repeats``), then the ratio.

  python experiments/bench_scan_layers.py
  python experiments/bench_scan_layers.py --layers 8 --hidden 256 --new-tokens 512
"""

from __future__ import annotations

import bench_lib
import jax
import jax.numpy as jnp
import numpy as np

from opd_jax.models.config import ModelConfig
from opd_jax.models.factory import convert_layers, create_model
from opd_jax.sampling import SamplingConfig


def parse_args(argv=None):
  p = bench_lib.arg_parser(__doc__, layers=4)
  p.add_argument("--new-tokens", type=int, default=256)
  p.add_argument("--dtype", default="float32")
  p.add_argument("--repeats", type=int, default=3)
  return p.parse_args(argv)


def main(argv=None):
  args = parse_args(argv)
  cfg = ModelConfig(
    model_type="qwen3",
    vocab_size=args.vocab,
    hidden_size=args.hidden,
    intermediate_size=args.intermediate,
    num_layers=args.layers,
    num_heads=args.heads,
    num_kv_heads=args.kv_heads,
    head_dim=args.hidden // args.heads,
    qk_norm=True,
    max_position_embeddings=args.prompt_len + args.new_tokens + 8,
    dtype=args.dtype,
  )
  unrolled = create_model(cfg, seed=0)
  models = {"unrolled": unrolled, "scanned": convert_layers(unrolled, scan_layers=True)}
  rng = np.random.default_rng(0)
  ids = jnp.asarray(rng.integers(1, args.vocab, (args.batch, args.prompt_len)), jnp.int32)
  mask = jnp.ones_like(ids)
  config = SamplingConfig(max_new_tokens=args.new_tokens)
  print(
    f"jax {jax.__version__} ({jax.devices()[0].platform}); {args.layers} layers x "
    f"{args.hidden} hidden, batch {args.batch}, prompt {args.prompt_len}, "
    f"{args.new_tokens} new tokens, {args.dtype}"
  )
  ms, tokens = {}, {}
  for name, model in models.items():
    compile_s, run = bench_lib.sampler_runner(model, ids, mask, config)
    tokens[name] = run(0)
    best = bench_lib.best_time(run, args.repeats)
    ms[name] = 1e3 * best / args.new_tokens
    print(f"{name:>9}: compile {compile_s:6.2f} s, {ms[name]:.3f} ms per decode step")
  same = np.array_equal(tokens["unrolled"], tokens["scanned"])
  print(
    f"scanned / unrolled decode time: {ms['scanned'] / ms['unrolled']:.3f}; "
    f"tokens {'identical' if same else 'DIFFER'}"
  )


if __name__ == "__main__":
  main()
