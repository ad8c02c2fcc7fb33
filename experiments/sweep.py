"""Prints (or runs) the command of every run of a sweep file.

A sweep file defines ``get_sweep() -> (base_config, [(name, config_arg,
overrides), ...])``. Each run gets ``--workdir=<root>/<name>``.

  python experiments/sweep.py --sweep=configs/sweeps/loss_ablation.py --root=runs/abl [--run]
  python experiments/sweep.py --sweep=configs/sweeps/vmap_quickstart.py --root=runs/lr --vmap --run

``--vmap``: every run of the sweep in ONE process and one compiled program
(``opd_jax.vmap_sweep``: the students vmapped, one teacher); the runs may
differ only in lr, seed, λ, temperatures and numeric loss keywords (anything
else is an error naming the setting). Each run still gets its own workdir.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
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


def point_configs(sweep_path: str, root: str, extra: list[str] = ()):
  """The sweep's runs as configs (in-process, for ``--vmap``): ``(configs,
  workdirs, names)``; ``extra`` are ``--config.key=value`` overrides of all."""
  from opd_jax import configs_lib

  base, runs = load_sweep(sweep_path)
  spec = importlib.util.spec_from_file_location("sweep_base", base)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  common = {}
  for item in extra:
    key, _, value = item.removeprefix("--config.").partition("=")
    common[key] = value
  configs, workdirs, names = [], [], []
  for (safe, _), (name, arg, overrides) in zip(commands(sweep_path, root), runs):
    c = module.get_config(arg or None)
    c = configs_lib.updated(c, {k: _cast(c, k, v) for k, v in common.items()})
    configs.append(configs_lib.updated(c, overrides))
    workdirs.append(os.path.join(root, safe))
    names.append(safe)
  return configs, workdirs, names


def _cast(config, key: str, text: str):
  """A command-line value as the type of the field it replaces."""
  node = config
  *parents, leaf = key.split(".")
  for name in parents:
    node = node[name]
  old = node[leaf]
  if isinstance(old, bool):
    return text.lower() in ("1", "true", "yes", "on")
  return type(old)(text) if isinstance(old, (int, float, str)) else text


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument("--sweep", required=True)
  p.add_argument("--root", required=True)
  p.add_argument("--run", action="store_true", help="run sequentially instead of printing")
  p.add_argument(
    "--vmap", action="store_true", help="all runs in one vmapped program (one process)"
  )
  p.add_argument("extra", nargs="*", help="overrides added to every run")
  args, unknown = p.parse_known_args(argv)
  bad = [u for u in unknown if not u.startswith("--config.")]
  if bad:
    p.error(f"unrecognized arguments: {' '.join(bad)}")
  args.extra = list(args.extra) + unknown  # --config.key=value overrides of every run
  if args.vmap:
    configs, workdirs, names = point_configs(args.sweep, args.root, args.extra)
    print(f"vmapped sweep: {len(names)} points in one program: {', '.join(names)}", flush=True)
    if not args.run:
      for name, w in zip(names, workdirs):
        print(f"  {name}: {w}")
      return
    from opd_jax.train import tune_malloc, use_cpu_sync_dispatch
    from opd_jax.vmap_sweep import train_vmapped

    tune_malloc()  # the host tuning of the CLI (opd_jax.train.main)
    use_cpu_sync_dispatch()
    for name, res in zip(names, train_vmapped(configs, workdirs, names)):
      keys = [k for k in sorted(res) if k in ("step", "status", "loss") or k.startswith("eval/")]
      print(json.dumps({"point": name, **{k: res[k] for k in keys}}), flush=True)
    return
  for name, cmd in commands(args.sweep, args.root, args.extra):
    print(shlex.join(cmd), flush=True)
    if args.run:
      subprocess.run(cmd, check=True)


if __name__ == "__main__":
  main()
