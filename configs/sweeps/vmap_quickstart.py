"""The quickstart's learning rate, 4 points in ONE vmapped program (one
teacher copy, one compile; each point writes its own workdir):

  python experiments/sweep.py --sweep=configs/sweeps/vmap_quickstart.py --root=runs/lr --vmap --run

Without ``--vmap`` the same file runs as 4 separate processes (the reference
the vmapped points are tested against).
"""

BASE = "configs/quickstart.py"
LRS = (1e-4, 3e-4, 1e-3, 3e-3)


def get_sweep():
  """Returns (base config file, list of (run name, config arg, overrides))."""
  return BASE, [(f"lr={lr:g}", "", {"optimizer.lr": lr}) for lr in LRS]
