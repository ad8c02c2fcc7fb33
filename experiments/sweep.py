"""Prints (or runs) the command of every run of a sweep file.

A sweep file defines ``get_sweep() -> (base_config, [(name, config_arg,
overrides), ...])``. Each run gets ``--workdir=<root>/<name>``.

  python experiments/sweep.py --sweep=configs/sweeps/loss_ablation.py --root=runs/abl [--run]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import shlex
import subprocess
import sys


def load_sweep(path: str):
  spec = importlib.util.spec_from_file_location("sweep", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_sweep()


def commands(sweep_path: str, root: str, extra: list[str] = ()) -> list[tuple[str, list[str]]]:
  base, runs = load_sweep(sweep_path)
  out, seen = [], set()
  for name, arg, overrides in runs:
    safe = re.sub(r"[^A-Za-z0-9_.=+-]", "_", name)
    if safe in seen:
      raise ValueError(f"duplicate run name {name!r} in {sweep_path}")
    seen.add(safe)
    cmd = [
      sys.executable,
      "-m",
      "opd_jax.train",
      f"--config={base}" + (f":{arg}" if arg else ""),
      f"--workdir={os.path.join(root, safe)}",
    ]
    cmd += [f"--config.{k}={v}" for k, v in overrides.items()]
    cmd += list(extra)
    out.append((safe, cmd))
  return out


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument("--sweep", required=True)
  p.add_argument("--root", required=True)
  p.add_argument("--run", action="store_true", help="run sequentially instead of printing")
  p.add_argument("extra", nargs="*", help="overrides added to every run")
  args = p.parse_args(argv)
  for name, cmd in commands(args.sweep, args.root, args.extra):
    print(shlex.join(cmd), flush=True)
    if args.run:
      subprocess.run(cmd, check=True)


if __name__ == "__main__":
  main()
