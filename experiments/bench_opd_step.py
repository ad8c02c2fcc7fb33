"""Benchmarks the compiled OPD step against Hugging Face TRL on the same checkpoints.

    PYTHONPATH=. python experiments/bench_opd_step.py [--preset small[,medium,...]]
        [--steps 20] [--warmup 2] [--trl-steps 8] [--no-trl] [--profile]
        [--mesh data=1,fsdp=1,tensor=1 --num-cpu-devices N]

For every preset a Qwen3-architecture student and teacher are created, written
as Hugging Face checkpoints (``to_hf``) into a temp dir and loaded back
(``from_hf``); TRL loads the very same directories. Both sides run fully
on-policy (λ = 1) reverse-KL distillation in float32 on the same prompts, with
generation forced to the full ``max_new_tokens`` (ours: ``eos_ids=()``; TRL:
``min_new_tokens = max_new_tokens`` in its generation config, which masks
every EOS logit until the last token).

Printed per preset: compile time, steps/s, generated tokens/s, the step's
FLOP/s as a fraction of a plain jitted f32 matmul's FLOP/s measured in the same
run, the TRL step time / generated tokens/s / share of its step spent in
``model.generate``, and ours/TRL ratios. ``--profile`` additionally times the
pieces of our step as separately jitted functions (sampling, teacher forward,
student forward+backward with the chunked loss, optimizer update).

FLOP accounting (``analytic_flops``), 2 FLOPs per multiply-add, R rows, P
prompt length, N new tokens, T = P + N. For a model with L layers, hidden D,
H query / K kv heads of size Dh, MLP width F, vocabulary V:

  M  = D·(H + 2K)·Dh + H·Dh·D + 3·D·F     (matmul weights per layer and token)
  A(S) = 2·H·Dh·S                          (attention MACs per query and layer
                                            over S keys: QKᵀ and PV)

  sampling   prefill 2·L·(M + A(T))·R·P  + decode 2·L·(M + A(T))·R·(N−1)
             + lm head 2·D·V·R·N     (the KV cache has T slots and the decoder
                                      attends densely over all of them)
  teacher    2·L·(M + A(T))·R·T  +  lm head 2·D·V·R·N
  student    3 × (2·L·(M + A(T))·R·T + 2·D·V·R·N)   (forward + backward)

i.e. the usual 2·params·tokens forward / 6·params·tokens forward+backward plus
attention as XLA executes it (dense masked T×T, no causal skipping). The
``jax.checkpoint`` recomputation of both heads' logits in the backward pass of
the chunked loss (2·(Ds + Dt)·V·R·N) is *not* counted as useful work (it is
reported separately as ``recompute``). XLA's ``cost_analysis()['flops']`` is
printed next to it: XLA counts a ``while`` body once (the decode loop and the
chunked-loss ``scan`` are loops), so it under-counts; the analytic number is
the one used for the FLOP fraction.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

# --threads / --num-cpu-devices must be applied before JAX / torch initialise.
if __name__ == "__main__":
  _pre = argparse.ArgumentParser(add_help=False)
  _pre.add_argument("--num-cpu-devices", type=int, default=0)
  _pre.add_argument("--threads", type=int, default=1)
  _ns, _ = _pre.parse_known_args()
  if _ns.threads == 1:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               " --xla_cpu_multi_thread_eigen=false").strip()
  if _ns.threads > 0:
    os.environ.setdefault("OMP_NUM_THREADS", str(_ns.threads))
  if _ns.num_cpu_devices:
    import jax as _jax
    _jax.config.update("jax_num_cpu_devices", _ns.num_cpu_devices)

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from opd_jax import opd_step, optim
from opd_jax import losses as losses_lib
from opd_jax.models import ModelConfig, create_model, from_hf, to_hf
from opd_jax.sampling import SamplingConfig, sample
from opd_jax.sharding import Sharder, make_mesh

PAD_ID, EOS_ID = 0, 1


@dataclasses.dataclass(frozen=True)
class Preset:
  """One benchmark configuration (student, teacher, batch shape)."""
  name: str
  student: dict[str, int]
  teacher: dict[str, int]
  vocab: int
  batch: int
  prompt_len: int
  new_tokens: int
  steps: int          # timed steps (ours)
  trl_steps: int      # timed steps (TRL)


PRESETS = {
    # The reference target: TRL is said to take ~0.165 s/step here.
    "small": Preset(
        "small",
        student=dict(num_layers=2, hidden_size=128, num_heads=4, num_kv_heads=2,
                     head_dim=32, intermediate_size=384),
        teacher=dict(num_layers=4, hidden_size=256, num_heads=4, num_kv_heads=2,
                     head_dim=64, intermediate_size=768),
        vocab=512, batch=8, prompt_len=16, new_tokens=64, steps=30, trl_steps=10),
    "medium": Preset(
        "medium",
        student=dict(num_layers=4, hidden_size=256, num_heads=4, num_kv_heads=2,
                     head_dim=64, intermediate_size=768),
        teacher=dict(num_layers=8, hidden_size=512, num_heads=8, num_kv_heads=4,
                     head_dim=64, intermediate_size=1536),
        vocab=4096, batch=16, prompt_len=32, new_tokens=128, steps=8, trl_steps=4),
    "large": Preset(
        "large",
        student=dict(num_layers=8, hidden_size=512, num_heads=8, num_kv_heads=4,
                     head_dim=64, intermediate_size=1536),
        teacher=dict(num_layers=12, hidden_size=768, num_heads=12, num_kv_heads=4,
                     head_dim=64, intermediate_size=2304),
        vocab=4096, batch=16, prompt_len=32, new_tokens=128, steps=4, trl_steps=3),
}


# ----------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------


def median(xs):
  return statistics.median(xs) if len(xs) else float("nan")


def clock() -> np.ndarray:
  """(wall seconds, this process's CPU seconds over all threads)."""
  return np.array([time.perf_counter(), time.process_time()])


def summarize(deltas) -> dict[str, float]:
  """Per-step ``[(wall, cpu), ...]`` -> medians / min / mean."""
  d = np.asarray(deltas, np.float64).reshape(-1, 2)
  return dict(wall=median(d[:, 0]), cpu=median(d[:, 1]), wall_min=float(d[:, 0].min()),
              wall_mean=float(d[:, 0].mean()), n=len(d))


def machine_load() -> str:
  try:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
  except OSError:
    return "load: " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def model_config(p: dict[str, int], vocab: int, max_len: int) -> ModelConfig:
  return ModelConfig(model_type="qwen3", vocab_size=vocab, qk_norm=True,
                     max_position_embeddings=max(512, max_len), pad_token_id=PAD_ID,
                     **p)


def layer_macs(c: ModelConfig) -> int:
  """Matmul weights per layer and token (M in the module docstring)."""
  d, h, k, dh, f = (c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim,
                    c.intermediate_size)
  return d * (h + 2 * k) * dh + h * dh * d + 3 * d * f


def forward_flops(c: ModelConfig, rows: int, queries: int, keys: int) -> int:
  """2·L·(M + A(S))·tokens (no lm head)."""
  attn = 2 * c.num_heads * c.head_dim * keys
  return 2 * c.num_layers * (layer_macs(c) + attn) * rows * queries


def analytic_flops(s: ModelConfig, t: ModelConfig, r: int, p: int, n: int,
                   vocab: int) -> dict[str, float]:
  """Useful FLOPs of one OPD step (see the module docstring)."""
  tt = p + n
  head = lambda c: 2 * c.hidden_size * vocab * r * n
  out = {
      "sampling": forward_flops(s, r, p, tt) + forward_flops(s, r, n - 1, tt) + head(s),
      "teacher": forward_flops(t, r, tt, tt) + head(t),
      "student_fwd_bwd": 3 * (forward_flops(s, r, tt, tt) + head(s)),
      "recompute": head(s) + head(t),
  }
  out["total"] = out["sampling"] + out["teacher"] + out["student_fwd_bwd"]
  return out


def xla_flops(compiled) -> float | None:
  try:
    ca = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  if isinstance(ca, (list, tuple)):
    ca = ca[0] if ca else None
  if not ca:
    return None
  f = ca.get("flops")
  return None if f is None else float(f)


def matmul_flops_per_s(n: int = 2048, repeats: int = 7) -> dict[str, float]:
  """FLOP/s of a jitted square float32 matmul (``2·n³`` FLOPs), by the median
  wall time and by the median process CPU time."""
  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32)
  t = time_fn(jax.jit(lambda x, y: x @ y), a, b, repeats=repeats)
  return {"wall": 2 * n ** 3 / t["wall"], "cpu": 2 * n ** 3 / t["cpu"]}


def time_fn(fn, *args, repeats: int = 5) -> dict[str, float]:
  """Median wall / CPU time of ``fn(*args)`` after one warm-up call."""
  jax.block_until_ready(fn(*args))
  ds = []
  for _ in range(repeats):
    t0 = clock()
    jax.block_until_ready(fn(*args))
    ds.append(clock() - t0)
  return summarize(ds)


def parse_mesh(text: str) -> dict[str, int] | None:
  if not text:
    return None
  out = {}
  for part in text.split(","):
    k, v = part.split("=")
    out[k.strip()] = int(v)
  return out


# ----------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------


def make_checkpoints(preset: Preset, root: str) -> tuple[str, str]:
  """Random student/teacher written as HF checkpoints; returns their dirs."""
  max_len = preset.prompt_len + preset.new_tokens
  dirs = []
  for name, p, seed in (("student", preset.student, 0), ("teacher", preset.teacher, 1)):
    cfg = model_config(p, preset.vocab, max_len)
    model = create_model(cfg, seed=seed)
    dirs.append(to_hf(model, os.path.join(root, name)))
    del model
  return dirs[0], dirs[1]


def make_prompts(preset: Preset, seed: int = 0) -> np.ndarray:
  """``[B, P]`` prompt ids in ``[2, V)`` (no pad / EOS), all full length."""
  rng = np.random.default_rng(seed)
  return rng.integers(2, preset.vocab, size=(preset.batch, preset.prompt_len),
                      dtype=np.int32)


# ----------------------------------------------------------------------------
# Ours
# ----------------------------------------------------------------------------


def opd_config(preset: Preset, args) -> opd_step.OPDConfig:
  return opd_step.OPDConfig(
      sampling=SamplingConfig(max_new_tokens=preset.new_tokens, temperature=1.0,
                              eos_ids=(), pad_id=PAD_ID, num_samples=1),
      loss="reverse_kl", on_policy_fraction=1.0, loss_chunk=args.loss_chunk,
      metrics=not args.no_metrics, metrics_top_k=16, position_chunk=64)


def setup_ours(preset: Preset, s_dir: str, t_dir: str, prompts: np.ndarray, args):
  mesh = make_mesh(parse_mesh(args.mesh)) if args.mesh else None
  sharder = Sharder(mesh)
  student = from_hf(s_dir, dtype="float32", mesh=mesh)
  teacher = from_hf(t_dir, dtype="float32", mesh=mesh)
  tx, sched = optim.make_optimizer({"lr": 1e-6})
  state, st_sh = opd_step.init_train_state(student, tx, 0, sharder)
  cfg = opd_config(preset, args)
  gd_s, _ = nnx.split(student)
  gd_t, t_params = nnx.split(teacher)
  b = prompts.shape[0]
  batch = {"prompt_ids": jnp.asarray(prompts),
           "prompt_mask": jnp.ones(prompts.shape, jnp.bool_)}
  t_sh = b_sh = None
  if mesh is not None:
    t_sh = sharder.tree_shardings(t_params)
    b_sh = {k: sharder.batch(b, prompts.shape[1]) for k in batch}
    batch = {k: jax.device_put(v, b_sh[k]) for k, v in batch.items()}
  step = opd_step.make_opd_step(
      gd_s, gd_t, tx, sched, cfg, vocab_size=preset.vocab, sharder=sharder,
      state_shardings=st_sh, teacher_shardings=t_sh, batch_shardings=b_sh)
  return dict(step=step, state=state, t_params=t_params, batch=batch, cfg=cfg,
              gd_s=gd_s, gd_t=gd_t, tx=tx, sharder=sharder, student_cfg=student.cfg,
              teacher_cfg=teacher.cfg)


def compile_ours(ctx: dict) -> dict[str, Any]:
  t0 = time.perf_counter()
  compiled = ctx["step"].lower(ctx["state"], ctx["t_params"], ctx["batch"]).compile()
  ctx["compiled"] = compiled
  return {"compile_s": time.perf_counter() - t0, "xla_flops": xla_flops(compiled)}


def bench_ours(ctx: dict, n_steps: int, warmup: int) -> dict[str, Any]:
  """Times ``n_steps`` compiled steps (after ``warmup``), metrics fetched to host
  every step as the driver does."""
  compiled, state = ctx["compiled"], ctx["state"]
  t_params, batch = ctx["t_params"], ctx["batch"]
  for _ in range(warmup):
    state, m = compiled(state, t_params, batch)
    jax.block_until_ready(m)
  deltas = []
  for _ in range(n_steps):
    t0 = clock()
    state, m = compiled(state, t_params, batch)
    metrics = opd_step.host_metrics(m, ctx["step"].token_metric_names())
    deltas.append(clock() - t0)
  ctx["state"] = state
  return dict(deltas=deltas, num_tokens=metrics["num_tokens"], loss=metrics["loss"],
              mean_len=metrics["mean_response_length"])


# -- separately jitted pieces (--profile) -------------------------------------


def profile_ours(preset: Preset, ctx: dict, args) -> dict[str, float]:
  """Times the pieces of the step as separate jitted functions (median s)."""
  cfg, gd_s, gd_t, tx = ctx["cfg"], ctx["gd_s"], ctx["gd_t"], ctx["tx"]
  params, t_params, batch = ctx["state"].params, ctx["t_params"], ctx["batch"]
  sharder = ctx["sharder"]
  opt_state = ctx["state"].opt_state
  rng = jax.random.PRNGKey(0)
  loss_fn = losses_lib.get_loss(cfg.loss, dict(cfg.loss_kwargs))
  one = dataclasses.replace(cfg.sampling, num_samples=1)
  p, n, vocab = preset.prompt_len, preset.new_tokens, preset.vocab
  out: dict[str, float] = {}

  @jax.jit
  def sample_fn(sp, batch, rng):
    return sample(nnx.merge(gd_s, sp), batch["prompt_ids"], batch["prompt_mask"], rng, one)

  so = sample_fn(params, batch, rng)
  out["sampling"] = time_fn(sample_fn, params, batch, rng, repeats=args.profile_repeats)
  ids, mask, pos = opd_step.full_sequence(batch["prompt_ids"], batch["prompt_mask"],
                                          so.tokens, so.mask)
  tokens, cmask = so.tokens, so.mask.astype(jnp.bool_)

  @jax.jit
  def teacher_fn(tp, ids, mask, pos):
    h, _ = nnx.merge(gd_t, tp).hidden(ids, mask, pos)
    return h[:, p - 1:p - 1 + n]

  h_t = teacher_fn(t_params, ids, mask, pos)
  out["teacher_hidden"] = time_fn(teacher_fn, t_params, ids, mask, pos,
                                  repeats=args.profile_repeats)
  w_t = nnx.merge(gd_t, t_params).unembedding()

  def make_grad_fn(metrics: bool):
    @jax.jit
    def grad_fn(sp, h_t, w_t, tokens, cmask, ids, mask, pos):
      weights = losses_lib.aggregate_weights(cmask.astype(jnp.float32), cfg.aggregation,
                                             cfg.normalizer)

      def loss_of(params):
        model = nnx.merge(gd_s, params)
        h_s, _ = model.hidden(ids, mask, pos)
        return opd_step.chunked_divergence(
            h_s[:, p - 1:p - 1 + n], model.unembedding(), h_t, w_t, tokens, weights,
            cmask.astype(jnp.float32), loss_fn=loss_fn, vocab=vocab, chunk=cfg.loss_chunk,
            metrics=metrics, top_k=cfg.metrics_top_k, position_chunk=cfg.position_chunk,
            sharder=sharder)

      return jax.value_and_grad(loss_of, has_aux=True)(sp)
    return grad_fn

  g_args = (params, h_t, w_t, tokens, cmask, ids, mask, pos)
  out["student_fwd_bwd+loss+metrics"] = time_fn(make_grad_fn(True), *g_args,
                                                repeats=args.profile_repeats)
  out["student_fwd_bwd+loss(no metrics)"] = time_fn(make_grad_fn(False), *g_args,
                                                    repeats=args.profile_repeats)
  (_, _), grads = make_grad_fn(False)(*g_args)

  @jax.jit
  def update_fn(grads, opt_state, params):
    import optax
    upd, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, upd), opt_state

  out["optimizer_update"] = time_fn(update_fn, grads, opt_state, params,
                                    repeats=args.profile_repeats)
  return out


# ----------------------------------------------------------------------------
# TRL
# ----------------------------------------------------------------------------


def make_tokenizer(vocab: int):
  """Word-level tokenizer: ``<pad>`` = 0, ``<eos>`` = 1, ``t{i}`` = i."""
  from tokenizers import Tokenizer, models, pre_tokenizers
  from transformers import PreTrainedTokenizerFast
  words = {"<pad>": PAD_ID, "<eos>": EOS_ID}
  words.update({f"t{i}": i for i in range(2, vocab)})
  tok = Tokenizer(models.WordLevel(vocab=words, unk_token="<pad>"))
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  hf = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                               unk_token="<pad>", padding_side="left")
  return hf


def bench_trl(preset: Preset, s_dir: str, t_dir: str, prompts: np.ndarray, args,
              out_root: str) -> dict[str, Any]:
  """TRL ``DistillationTrainer`` (else ``GKDTrainer``, λ = 1, β = 1) timings.

  A step is the time between consecutive ``on_step_end`` callbacks (data,
  generation, teacher, student forward/backward, optimizer, bookkeeping); the
  first ``trl_warmup`` steps are dropped. ``model.generate`` is wrapped to time
  the generation share.
  """
  import torch
  import transformers
  import trl
  from datasets import Dataset
  from transformers import AutoModelForCausalLM, TrainerCallback

  n_new, b = preset.new_tokens, preset.batch
  warm = max(1, args.trl_warmup)
  n_timed = args.trl_steps or preset.trl_steps
  total = warm + n_timed
  if args.threads > 0:
    torch.set_num_threads(args.threads)
  tokenizer = make_tokenizer(preset.vocab)
  text = [" ".join(f"t{i}" for i in row) for row in prompts]
  ids = tokenizer(text=text)["input_ids"]
  if [list(r) for r in ids] != prompts.tolist():
    raise RuntimeError("tokenizer does not round-trip the prompts")
  dataset = Dataset.from_dict({"prompt": text * total})

  student = AutoModelForCausalLM.from_pretrained(s_dir, dtype=torch.float32)
  teacher = AutoModelForCausalLM.from_pretrained(t_dir, dtype=torch.float32)
  gen_spans: list[tuple[np.ndarray, np.ndarray]] = []
  orig_generate = student.generate

  def timed_generate(*a, **kw):
    t0 = clock()
    out = orig_generate(*a, **kw)
    gen_spans.append((t0, clock()))
    return out

  student.generate = timed_generate
  step_ends: list[np.ndarray] = []
  gen_lens: list[int] = []

  class Timer(TrainerCallback):

    def on_step_end(self, targs, state, control, **kw):
      step_ends.append(clock())

  common = dict(
      output_dir=os.path.join(out_root, "trl_out"), per_device_train_batch_size=b,
      gradient_accumulation_steps=1, max_steps=total, learning_rate=1e-6,
      lr_scheduler_type="constant", weight_decay=0.01, max_grad_norm=1.0, bf16=False,
      fp16=False, gradient_checkpointing=False, use_cpu=True, report_to="none",
      save_strategy="no", logging_steps=10 ** 6, dataloader_num_workers=0, seed=0,
      disable_dropout=True, temperature=1.0, disable_tqdm=True)
  # min_new_tokens = max_new_tokens: EOS is masked out until the last token.
  gen_kwargs = {"min_new_tokens": n_new}
  if hasattr(trl, "DistillationTrainer"):
    trainer_name = "DistillationTrainer"
    targs = trl.DistillationConfig(
        **common, max_completion_length=n_new, top_k=0, top_p=1.0, beta=1.0,
        generation_kwargs=gen_kwargs, shuffle_dataset=False)
    trainer = trl.DistillationTrainer(model=student, teacher_model=teacher, args=targs,
                                      train_dataset=dataset, processing_class=tokenizer,
                                      callbacks=[Timer()])
  else:
    from trl.experimental.gkd import GKDConfig, GKDTrainer  # pylint: disable=g-import-not-at-top
    trainer_name = "GKDTrainer (lmbda=1, beta=1)"
    targs = GKDConfig(**common, max_new_tokens=n_new, lmbda=1.0, beta=1.0,
                      generation_kwargs=gen_kwargs)
    trainer = GKDTrainer(model=student, teacher_model=teacher, args=targs,
                         train_dataset=dataset, processing_class=tokenizer,
                         callbacks=[Timer()])
  # Completion lengths actually produced (checks the full-length forcing).
  if hasattr(trainer, "_generate_single_turn"):
    orig_gst = trainer._generate_single_turn

    def gst(*a, **kw):
      comp = orig_gst(*a, **kw)
      gen_lens.extend(len(c) for c in comp)
      return comp
    trainer._generate_single_turn = gst
  trainer.train()
  if len(step_ends) < total:
    raise RuntimeError(f"TRL ran {len(step_ends)} steps, expected {total}")
  ends = np.stack(step_ends)
  deltas = np.diff(ends[warm - 1:], axis=0)
  lo, hi = ends[warm - 1], ends[-1]
  gen = np.zeros(2)
  for s0, s1 in gen_spans:
    if s0[0] >= lo[0] and s1[0] <= hi[0]:
      gen += s1 - s0
  return dict(trainer=trainer_name, version=trl.__version__,
              transformers=transformers.__version__, torch=torch.__version__,
              torch_threads=torch.get_num_threads(), deltas=deltas.tolist(),
              gen_frac_wall=gen[0] / (hi - lo)[0], gen_frac_cpu=gen[1] / (hi - lo)[1],
              gen_s=(gen / len(deltas)).tolist(),
              gen_len=(min(gen_lens), max(gen_lens)) if gen_lens else None)


# ----------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------


def run_preset(preset: Preset, args, mm: dict[str, float]) -> dict[str, Any]:
  """Ours (before and after TRL, to bracket load drift), then TRL."""
  root = tempfile.mkdtemp(prefix=f"bench_opd_{preset.name}_")
  try:
    s_dir, t_dir = make_checkpoints(preset, root)
    prompts = make_prompts(preset)
    ctx = setup_ours(preset, s_dir, t_dir, prompts, args)
    ours = compile_ours(ctx)
    n_steps = args.steps or preset.steps
    first = bench_ours(ctx, n_steps, args.warmup)
    ours.update({k: v for k, v in first.items() if k != "deltas"})
    deltas = list(first["deltas"])
    res: dict[str, Any] = {"preset": dataclasses.asdict(preset), "mm": mm,
                           "gen_tokens": preset.batch * preset.new_tokens}
    res["flops"] = analytic_flops(ctx["student_cfg"], ctx["teacher_cfg"], preset.batch,
                                  preset.prompt_len, preset.new_tokens, preset.vocab)
    if args.profile:
      res["profile"] = profile_ours(preset, ctx, args)
    if not args.no_trl:
      try:
        import trl  # noqa: F401  pylint: disable=unused-import,g-import-not-at-top
      except ImportError:
        res["trl_error"] = "trl not importable (pip install the bench extra)"
      else:
        res["trl"] = bench_trl(preset, s_dir, t_dir, prompts, args, root)
        deltas += bench_ours(ctx, n_steps, 0)["deltas"]   # after TRL too
    ours["deltas"] = deltas
    res["ours"] = ours
    return res
  finally:
    shutil.rmtree(root, ignore_errors=True)


def report(res: dict[str, Any]) -> dict[str, Any]:
  """Prints one preset's table; returns the summary row."""
  p, o, fl, mm = res["preset"], res["ours"], res["flops"], res["mm"]
  s, t = p["student"], p["teacher"]
  gen = res["gen_tokens"]
  print(f"\n=== preset {p['name']}: student {s['num_layers']}L x {s['hidden_size']} "
        f"(F {s['intermediate_size']}), teacher {t['num_layers']}L x {t['hidden_size']} "
        f"(F {t['intermediate_size']}), vocab {p['vocab']}, {p['batch']} prompts x "
        f"{p['prompt_len']} tokens + {p['new_tokens']} new ===")
  print(f"  analytic GFLOP/step {fl['total'] / 1e9:.3f} = sampling {fl['sampling'] / 1e9:.3f}"
        f" + teacher fwd {fl['teacher'] / 1e9:.3f} + student fwd+bwd "
        f"{fl['student_fwd_bwd'] / 1e9:.3f}   (head recompute {fl['recompute'] / 1e9:.3f}"
        " executed, not counted)")
  xf = o.get("xla_flops")
  xla = "n/a" if xf is None else (
      f"{xf / 1e9:.3f} = {xf / fl['total']:.2f}x analytic (XLA counts each while/scan body "
      "once)")
  print(f"  XLA cost_analysis GFLOP/step: {xla}")
  print(f"  plain f32 matmul ({mm['n']}^2): {mm['wall'] / 1e9:.1f} GFLOP/s wall, "
        f"{mm['cpu'] / 1e9:.1f} GFLOP/s per CPU-second")
  rows = []
  so = summarize(o["deltas"])
  rows.append(("ours (opd_jax)", so, f"compile {o['compile_s']:.1f}s, {so['n']} steps"))
  tr = res.get("trl")
  if tr:
    st = summarize(tr["deltas"])
    rows.append((f"TRL {tr['version']} {tr['trainer']}", st,
                 f"generate {100 * tr['gen_frac_wall']:.0f}% wall / "
                 f"{100 * tr['gen_frac_cpu']:.0f}% CPU of step, {st['n']} steps"))
  print(f"  {'':34s} {'wall s/step':>11s} {'steps/s':>8s} {'gen tok/s':>9s} "
        f"{'FLOP frac':>9s} | {'CPU s/step':>10s} {'gen tok/CPU-s':>13s} {'FLOP frac':>9s}")
  for name, d, note in rows:
    print(f"  {name:34s} {d['wall']:11.4f} {1 / d['wall']:8.2f} {gen / d['wall']:9.0f} "
          f"{fl['total'] / d['wall'] / mm['wall']:9.3f} | {d['cpu']:10.4f} "
          f"{gen / d['cpu']:13.0f} {fl['total'] / d['cpu'] / mm['cpu']:9.3f}  {note}")
  out = {"preset": p["name"], "ours_wall": so["wall"], "ours_cpu": so["cpu"],
         "flop_frac_wall": fl["total"] / so["wall"] / mm["wall"],
         "flop_frac_cpu": fl["total"] / so["cpu"] / mm["cpu"]}
  if tr:
    out.update(trl_wall=st["wall"], trl_cpu=st["cpu"], ratio_wall=st["wall"] / so["wall"],
               ratio_cpu=st["cpu"] / so["cpu"], gen_frac=tr["gen_frac_wall"])
    print(f"  ratio ours/TRL (steps/s = generated tokens/s): {out['ratio_wall']:.2f}x wall, "
          f"{out['ratio_cpu']:.2f}x CPU time   (target >= 3x)")
    print(f"  TRL generate {tr['gen_s'][0]:.4f}s/step wall; completion lengths "
          f"{tr['gen_len']}; torch {tr['torch']} ({tr['torch_threads']} threads), "
          f"transformers {tr['transformers']}")
  elif "trl_error" in res:
    print(f"  TRL: {res['trl_error']}")
  print(f"  ours: wall min {so['wall_min']:.4f}s mean {so['wall_mean']:.4f}s; tokens/step "
        f"{o['num_tokens']:.0f} (mean length {o['mean_len']:.1f}); loss {o['loss']:.4f}")
  if "profile" in res:
    prof = res["profile"]
    print(f"  profile (separately jitted pieces; median wall / CPU s):")
    for k, v in prof.items():
      print(f"    {k:40s} {v['wall']:8.4f} {v['cpu']:8.4f}")
    parts = ("sampling", "teacher_hidden", "student_fwd_bwd+loss+metrics", "optimizer_update")
    print(f"    {'sum of sampling+teacher+student+opt':40s} "
          f"{sum(prof[k]['wall'] for k in parts):8.4f} "
          f"{sum(prof[k]['cpu'] for k in parts):8.4f}   full step {so['wall']:.4f} "
          f"{so['cpu']:.4f}")
  return out


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--preset", default="small",
                  help=f"comma-separated presets out of {sorted(PRESETS)}")
  ap.add_argument("--steps", type=int, default=0, help="timed steps (ours; 0: preset's)")
  ap.add_argument("--warmup", type=int, default=2)
  ap.add_argument("--trl-steps", type=int, default=0, help="timed TRL steps (0: preset's)")
  ap.add_argument("--trl-warmup", type=int, default=2, help=">= 1")
  ap.add_argument("--no-trl", action="store_true")
  ap.add_argument("--profile", action="store_true", help="time the step's pieces")
  ap.add_argument("--profile-repeats", type=int, default=5)
  ap.add_argument("--loss-chunk", type=int, default=64)
  ap.add_argument("--no-metrics", action="store_true", help="OPDConfig(metrics=False)")
  ap.add_argument("--mesh", default="", help="e.g. data=2,fsdp=1,tensor=1")
  ap.add_argument("--num-cpu-devices", type=int, default=0)
  ap.add_argument("--threads", type=int, default=1,
                  help="CPU threads of both sides (torch.set_num_threads; XLA with single-"
                  "threaded Eigen when 1); 0: library defaults")
  ap.add_argument("--matmul-size", type=int, default=2048)
  ap.add_argument("--json", default="", help="also write the raw results here")
  args = ap.parse_args(argv)

  print(f"machine: {machine_load()}; {os.cpu_count()} CPUs; jax {jax.__version__} "
        f"{jax.devices()}; threads {args.threads or 'default'}")
  results, rows = [], []
  for name in args.preset.split(","):
    preset = PRESETS[name.strip()]
    mm = matmul_flops_per_s(args.matmul_size)
    mm["n"] = args.matmul_size
    res = run_preset(preset, args, mm)
    rows.append(report(res))
    results.append(res)
  print("\nsummary (median s/step; ratio = TRL time / our time):")
  for r in rows:
    line = (f"  {r['preset']:7s} ours {r['ours_wall']:.4f}s wall {r['ours_cpu']:.4f}s CPU, "
            f"FLOP frac {r['flop_frac_wall']:.2f} wall / {r['flop_frac_cpu']:.2f} CPU")
    if "trl_wall" in r:
      line += (f"; TRL {r['trl_wall']:.4f}s wall {r['trl_cpu']:.4f}s CPU; ours/TRL "
               f"{r['ratio_wall']:.2f}x wall {r['ratio_cpu']:.2f}x CPU")
    print(line)
  print(f"machine: {machine_load()}")
  if args.json:
    with open(args.json, "w") as fh:
      json.dump(results, fh, indent=2, default=lambda x: np.asarray(x).tolist())


if __name__ == "__main__":
  main()
