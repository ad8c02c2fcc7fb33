"""Decode-step q·k over a long float32 key cache: how fast each key layout streams.

One decode query per row and kv head (q ``[B, K, G, Dh]``) against keys of
``--layers`` caches of S slots (more caches than the last-level cache holds,
so the keys stream from memory as a long decode's do), timed single-threaded
and interleaved:

  transposed  ``[B, K, Dh, S]`` (the XLA:CPU cache layout today): one
              ``bkgd,bkds->bkgs`` dot per layer
  chunked C   ``[B, K, S/C, Dh, C]``: the same scores, as a dot batched over
              the S/C chunks (a layout the model does not have yet)
  read        a plain sum over the same keys: the memory's streaming rate

It prints ms per call and GB/s of keys read (the q·k half of decode attention;
the values half, p·v over ``[B, K, S, Dh]``, already streams near the read
rate). Results are checked equal across layouts.

  python experiments/bench_decode_layouts.py [--slots 4096] [--layers 4] [--chunks 32 64 128]
"""

from __future__ import annotations

import argparse
import os
import time

os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false"
).strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402


def timed(f, args, calls: int) -> float:
  """Mean seconds per call of ``f(*args)`` over ``calls`` calls (compiled first)."""
  jax.block_until_ready(f(*args))
  t = time.perf_counter()
  for _ in range(calls):
    out = f(*args)
  jax.block_until_ready(out)
  return (time.perf_counter() - t) / calls


def main(argv=None) -> dict[str, float]:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--rows", type=int, default=8)
  p.add_argument("--kv-heads", type=int, default=2)
  p.add_argument("--group", type=int, default=2, help="query heads per kv head")
  p.add_argument("--head-dim", type=int, default=32)
  p.add_argument("--slots", type=int, default=4096)
  p.add_argument("--layers", type=int, default=4, help="caches read per call")
  p.add_argument("--chunks", type=int, nargs="+", default=[32, 64, 128])
  p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (median kept)")
  p.add_argument("--calls", type=int, default=30)
  a = p.parse_args(argv)
  b, k, g, d, s = a.rows, a.kv_heads, a.group, a.head_dim, a.slots
  if any(s % c for c in a.chunks):
    raise SystemExit(f"--slots {s} must be a multiple of every --chunks {a.chunks}")
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.standard_normal((b, k, g, d)), jnp.float32)
  keys = [rng.standard_normal((b, k, d, s)).astype(np.float32) for _ in range(a.layers)]
  cases = {
    "transposed": (
      jax.jit(lambda q, ks: [jnp.einsum("bkgd,bkds->bkgs", q, x) for x in ks]),
      (q, [jnp.asarray(x) for x in keys]),
    ),
  }
  for c in a.chunks:
    chunked = [jnp.asarray(x.reshape(b, k, d, s // c, c).transpose(0, 1, 3, 2, 4)) for x in keys]

    def scores(q, ks, c=c):
      qc = jnp.broadcast_to(q[:, :, None], (b, k, s // c, g, d))
      return [
        jnp.swapaxes(jnp.einsum("bkcgd,bkcdt->bkcgt", qc, x), 2, 3).reshape(b, k, g, s) for x in ks
      ]

    cases[f"chunked {c}"] = (jax.jit(scores), (q, chunked))
  cases["read"] = (jax.jit(lambda ks: [jnp.sum(x) for x in ks]), ([jnp.asarray(x) for x in keys],))
  ref = cases["transposed"][0](*cases["transposed"][1])
  for name, (f, args) in cases.items():
    if name != "read":
      for x, y in zip(f(*args), ref):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-4)
  times = {name: [] for name in cases}
  for _ in range(a.rounds):
    for name, (f, args) in cases.items():
      times[name].append(timed(f, args, a.calls))
  gb = a.layers * b * k * d * s * 4 / 1e9
  print(
    f"jax {jax.__version__}; {a.layers} caches x [B={b}, K={k}, Dh={d}, S={s}] float32 keys "
    f"= {1e3 * gb:.1f} MB per call, 1 thread, median of {a.rounds} interleaved rounds"
  )
  out = {}
  for name, ts in times.items():
    t = float(np.median(ts))
    out[name] = t
    print(f"  {name:12s} {1e3 * t:7.3f} ms  {gb / t:5.1f} GB/s")
  return out


if __name__ == "__main__":
  main()
