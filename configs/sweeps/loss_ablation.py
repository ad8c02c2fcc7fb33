"""Loss x λ x temperature x k ablation over the quickstart setting.

  python experiments/sweep.py --sweep=configs/sweeps/loss_ablation.py --root=runs/ablation
  python experiments/sweep.py --sweep=configs/sweeps/loss_ablation.py --root=runs/ablation --run

Each run gets its own workdir ``<root>/<name>``; the shared quickstart assets are
made once under ``<root>/_assets`` (``--config.prepare`` finds them there).
"""

from opd_jax.losses import distillm2_beta_schedule

BASE = "configs/quickstart.py"
STEPS = 150  # the quickstart's total_steps (the gradual β spans the run; tested)


def get_sweep():
  """Returns (base config file, list of (run name, config arg, overrides))."""
  runs = []
  losses = [
    ("reverse_kl", {}),
    ("k1", {}),
    ("forward_kl", {}),
    ("jsd", {"loss.beta": 0.5}),
    ("skew_kl", {"loss.alpha": 0.1}),
    ("topk_opd", {"loss.k": 16}),
    ("todi", {}),
    ("akl", {"loss.mu": 0.5}),
  ]
  for loss, extra in losses:
    runs.append((f"loss={loss}", f"loss={loss}", dict(extra)))
  # DistiLLM-2 needs both row kinds in a step: half teacher samples.
  runs.append(
    (
      "loss=distillm2",
      "loss=distillm2,lam=0.5",
      {"off_policy_source": "teacher", "loss.alpha_teacher": 0.1, "loss.alpha_student": 0.1},
    )
  )
  # ... and with the official gradual β (1 -> 1.5 over the first half of the run's steps).
  runs.append(
    (
      "loss=distillm2,gradual_beta",
      "loss=distillm2,lam=0.5",
      {"off_policy_source": "teacher", "schedules": distillm2_beta_schedule(STEPS)},
    )
  )
  # ... and with its adaptive α. The anchors are the quickstart's initial models'
  # gaps (seed 0, first 4 batches, tree 47a08b0's organisms), measured with
  #   python experiments/distillm2_anchors.py \
  #     --config=configs/quickstart.py:loss=distillm2,lam=0.5 \
  #     --config.off_policy_source=teacher --workdir=/tmp/anchors --batches=4
  runs.append(
    (
      "loss=distillm2,adaptive_alpha",
      "loss=distillm2,lam=0.5",
      {
        "off_policy_source": "teacher",
        "loss.adaptive_alpha": True,
        "loss.anchor_teacher": 0.0751,
        "loss.anchor_student": 0.2165,
      },
    )
  )
  # OPD + the arithmetic task's verified outcome (GRPO over 4 samples of each of 16
  # prompts: the quickstart's one sample per prompt gives no group variance).
  runs.append(
    (
      "loss=opd_grpo",
      "loss=opd_grpo",
      {"loss.alpha": 1.0, "sampling.num_samples": 4, "batch_size": 16},
    )
  )
  for lam in (0.5, 0.0):
    runs.append((f"lam={lam}", f"loss=reverse_kl,lam={lam}", {}))
  for temp in (0.7, 1.3):
    runs.append((f"temp={temp}", "loss=reverse_kl", {"sampling.temperature": temp}))
  for k in (4, 64):
    runs.append((f"topk_k={k}", "loss=topk_opd", {"loss.k": k}))
  return BASE, runs
