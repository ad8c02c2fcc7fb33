"""CPU OPD + outcome reward (issue #16): the quickstart's organisms and
level-3 prompts, trained with ``opd_grpo``: the per-token distillation
advantage plus α times the GRPO advantage of the verified answer (the
arithmetic verifier runs inside the compiled step). GRPO needs groups with
reward variance, so each prompt gets ``samples`` completions at temperature 1
(the quickstart's 1 sample per prompt gives every group zero variance).

  python -m opd_jax.train --config=configs/quickstart_grpo.py --workdir=/tmp/opd_grpo

``organisms``: "quickstart_teacher600" (default: the quickstart's data and
student with its teacher trained 600 SFT steps, the organisms the README's
table was measured on; made or reused under ``$WORKDIR/assets``), "quickstart"
(the quickstart's own, teacher at 400 steps) or "multi_teacher_high" (organisms.py
``MultiTeacher``: its student, built like the quickstart's, and its level-3
teacher ``high``). ``prompts`` is the number of prompts per step: keep it at
32 or more (README: at 16 prompts x 8 samples, the same 128 rows, greedy
level 3 dips to 6% at step 20 with α = 1 and ends below its start with α = 0).
``alpha``: 4 (checked on three seeds, README; on these organisms the
outcome reward rises with α = 0 too, within noise of α = 4 in 40 steps);
``alpha=0`` is the same run without the outcome term (plain top-k OPD).
Logged every step: ``outcome/reward_mean`` (share of correct samples),
``outcome/zero_variance_groups``, ``outcome/advantage_outcome`` / ``_distill``;
experiments/quickstart_grpo_check.py compares α values over seeds.
"""

from opd_jax import configs_lib


def get_config(arg=None):
  a = configs_lib.parse_arg(
    arg,
    organisms="quickstart_teacher600",
    alpha=4.0,
    reward="topk",
    steps=40,
    samples=4,
    prompts=32,
    lr=1e-3,
    seed=0,
  )
  choices = ("quickstart_teacher600", "quickstart", "multi_teacher_high")
  if a.organisms not in choices:
    raise ValueError(f"organisms={a.organisms!r}: one of {', '.join(map(repr, choices))}")
  c = configs_lib.base_config()
  c.prepare = a.organisms  # fills student / teacher / data paths
  c.seed = a.seed  # also the organisms' and their data's seeds
  c.batch_size = a.prompts  # prompts per step; rows = prompts x samples
  c.sampling.num_samples = a.samples  # a GRPO group per prompt
  c.sampling.max_new_tokens = 40
  c.sampling.temperature = 1.0
  c.on_policy_fraction = 1.0
  c.loss = configs_lib.loss_config(
    "opd_grpo", chunk=20, alpha=a.alpha, reward=a.reward, task="arithmetic"
  )
  c.optimizer.update(
    dict(lr=a.lr, schedule="constant", warmup_steps=10, weight_decay=0.0, grad_clip=1.0)
  )
  c.metrics.enabled = False
  c.metrics.position_chunk = 20
  c.total_steps = a.steps
  c.log_every = 1  # the outcome reward of every step (a noisy mean over the step's groups)
  c.checkpoint_every = 40
  c.eval_every = 40
  c.eval_at_start = True
  c.eval_teacher = True
  c.evals.hard = configs_lib.eval_config(levels="3", num_examples=64)
  return c
