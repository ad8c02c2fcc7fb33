"""Loss ablation of the miniature reproduction (finding 9): the same OPD run
(student ← teacher_new, configs/repro.py) with each divergence, per seed.

  python experiments/sweep.py --sweep=configs/sweeps/repro_losses.py --root=runs/repro/runs
  python experiments/f9_loss_ablation.py --workdir=runs/repro      # runs + figure

Run names match ``experiments/repro_lib.run_name`` so the reverse-KL runs are
shared with finding 1. ``$WORKDIR/../../organisms`` (the default assets of
configs/repro.py) is the reproduction's organisms directory.
"""

BASE = "configs/repro.py"

# (loss, registry kwargs): full and sampled reverse KL (k1 as a policy-gradient
# reward), forward KL, JSD(β=0.5, TRL convention), skew KL (α=0.1, DistiLLM)
# and top-k OPD (Eq. 5, k=16, student top-k set, student weights).
LOSSES = (
  ("reverse_kl", {}),
  ("k1", {"mode": "reward"}),
  ("forward_kl", {}),
  ("jsd", {"beta": 0.5}),
  ("skew_kl", {"alpha": 0.1}),
  ("topk_opd", {"k": 16, "strategy": "student", "weight": "student"}),
)


def get_sweep(seeds=(0, 1, 2), smoke=False):
  """Returns (base config file, [(run name, config arg, overrides)])."""
  runs = []
  for seed in seeds:
    for loss, kwargs in LOSSES:
      arg = f"loss={loss},seed={seed}" + (",smoke=True" if smoke else "")
      name = f"student-from-teacher_new_{loss}_opd_prompts_s{seed}"
      runs.append((name, arg, {f"loss.{k}": v for k, v in kwargs.items()}))
  return BASE, runs
