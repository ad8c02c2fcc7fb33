"""Benchmarks the compiled OPD step against Hugging Face TRL on the same checkpoints.

    PYTHONPATH=. python experiments/bench_opd_step.py [--preset small[,medium,large]]
        [--steps N] [--trl-steps N] [--no-trl] [--profile]
        [--threads 0|1] [--mesh data=2,fsdp=1,tensor=1 --num-cpu-devices 2] [--json F]
        [--cli]

For every preset a Qwen3-architecture student and teacher are created, written
as Hugging Face checkpoints (``to_hf``) into a temp dir and loaded back
(``from_hf``); TRL loads the very same directories. Both sides run fully
on-policy (λ = 1) reverse-KL distillation in float32 on the same prompts (same
number, same ids), temperature 1, no top-k / top-p, generation forced to the
full ``max_new_tokens``: ours with ``eos_ids=()``; TRL with
``generation_kwargs={"min_new_tokens": max_new_tokens}`` (transformers'
``MinNewTokensLengthLogitsProcessor`` masks every EOS logit until the last
token; the script records the completion lengths TRL produced). TRL runs
without gradient checkpointing, no bf16, AdamW lr 1e-6 / wd 0.01 / clip 1.0
(our optimizer defaults).

Timing. The CPU is shared (2 cores, other jobs running), so for every step
both the wall time and this process's CPU time (``time.process_time``, all
threads) are recorded and medians reported; CPU time is much less sensitive
to the machine's load. ``--threads 0`` (default) leaves both libraries'
defaults (here: 2 threads each; the issue-#4 target, >= 3x TRL on this
2-core CPU, is for this setting). ``--threads 1`` gives both sides one
compute thread (XLA: its intra-op pool created under a one-CPU affinity, which
is restored afterwards, and ``--xla_cpu_multi_thread_eigen=false``; torch:
``set_num_threads(1)``), so CPU time is single-core time. Under heavy load
(load average ~8 on the 2 cores) torch's OpenMP threads busy-wait: with 2
threads TRL's step was ~10x slower than with 1.
Our steps run interleaved with TRL's (a few of ours after each TRL step, from
a ``TrainerCallback``), so both see the same load. Our step:
``compiled(state, teacher, batch)`` plus fetching the metrics to the host, as
``opd_jax.train`` does; warm-up steps excluded. TRL's step: ``on_step_begin``
to ``on_step_end`` (tokenization, generation, teacher, student
forward/backward, optimizer step), first ``--trl-warmup`` steps excluded;
``model.generate`` is wrapped to measure its share.

FLOPs: ``opd_jax.flops.opd_step_flops`` (formulas in that module's docstring:
2·params·tokens per forward, x3 for forward+backward, attention as executed). XLA's
``compiled.cost_analysis()['flops']`` is printed as well: it counts a
``while`` / ``scan`` body once, so it under-counts the decode loop; the
analytic count is used for the FLOP fraction = (FLOPs / step time) / (FLOP/s
of a jitted square f32 matmul run in the same process, same thread setting).

``--profile`` times the step's pieces as separately jitted functions
(sampling, teacher forward, student forward+backward+loss, optimizer).
Our side is set up exactly as a run of the driver: a config (the preset's
checkpoints, tokenizer and prompt file) through ``opd_jax.train.build_run``,
with ``sampling.ignore_eos`` for full-length generation.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from typing import Any

# --threads / --num-cpu-devices must be applied before JAX / torch initialise.
if __name__ == "__main__":
  _pre = argparse.ArgumentParser(add_help=False)
  _pre.add_argument("--num-cpu-devices", type=int, default=0)
  _pre.add_argument("--threads", type=int, default=0)
  _ns, _ = _pre.parse_known_args()
  if _ns.threads == 1:
    os.environ["XLA_FLAGS"] = (
      os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false"
    ).strip()
  if _ns.threads > 0:
    os.environ.setdefault("OMP_NUM_THREADS", str(_ns.threads))
  import jax as _jax

  if _ns.num_cpu_devices:
    from opd_jax import sharding as _sharding

    _sharding.simulate_cpu_devices(_ns.num_cpu_devices)
  # XLA:CPU sizes its intra-op pool (YNN/XNN dots) from the CPUs schedulable
  # at client creation: create it under a narrowed affinity, then restore the
  # affinity so the OS may still place our threads on any idle core.
  _allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
  if _ns.threads > 0 and _allowed and _ns.threads < len(_allowed):
    os.sched_setaffinity(0, set(sorted(_allowed)[: _ns.threads]))
    _jax.devices()
    os.sched_setaffinity(0, _allowed)

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from opd_jax import aot, configs_lib, opd_step, sharding
from opd_jax import losses as losses_lib
from opd_jax import sampling as sampling_lib
from opd_jax import train as train_lib
from opd_jax.data import write_jsonl
from opd_jax.flops import opd_step_flops
from opd_jax.models import ModelConfig, create_model, to_hf
from opd_jax.sampling import sample

PAD_ID, EOS_ID = 0, 1


@dataclasses.dataclass(frozen=True)
class Preset:
  """One benchmark configuration (student, teacher, batch shape, step counts)."""

  name: str
  student: dict[str, int]
  teacher: dict[str, int]
  vocab: int
  batch: int
  prompt_len: int
  new_tokens: int
  steps: int  # timed steps of ours (spread over TRL's steps)
  warmup: int
  trl_steps: int  # timed TRL steps


def _arch(layers, hidden, heads, kv_heads, head_dim, mlp):
  return dict(
    num_layers=layers,
    hidden_size=hidden,
    num_heads=heads,
    num_kv_heads=kv_heads,
    head_dim=head_dim,
    intermediate_size=mlp,
  )


PRESETS = {
  # The quickstart's organisms' size (student 2x64, teacher 4x128, character
  # vocabulary): per-step overheads dominate, as in most small-model sweeps.
  "tiny": Preset(
    "tiny",
    student=_arch(2, 64, 4, 2, 16, 256),
    teacher=_arch(4, 128, 4, 2, 32, 512),
    vocab=64,
    batch=32,
    prompt_len=12,
    new_tokens=48,
    steps=12,
    warmup=2,
    trl_steps=4,
  ),
  # The reference target (TRL: ~0.165 s/step, ~60% in generate, elsewhere).
  "small": Preset(
    "small",
    student=_arch(2, 128, 4, 2, 32, 384),
    teacher=_arch(4, 256, 4, 2, 64, 768),
    vocab=512,
    batch=8,
    prompt_len=16,
    new_tokens=64,
    steps=36,
    warmup=2,
    trl_steps=12,
  ),
  # Arithmetic-dominated sizes (~5 min / ~15+ min per preset with TRL here).
  "medium": Preset(
    "medium",
    student=_arch(4, 256, 4, 2, 64, 768),
    teacher=_arch(8, 512, 8, 4, 64, 1536),
    vocab=4096,
    batch=16,
    prompt_len=32,
    new_tokens=128,
    steps=3,
    warmup=1,
    trl_steps=3,
  ),
  "large": Preset(
    "large",
    student=_arch(8, 512, 8, 4, 64, 1536),
    teacher=_arch(12, 768, 12, 4, 64, 2304),
    vocab=4096,
    batch=16,
    prompt_len=32,
    new_tokens=128,
    steps=2,
    warmup=1,
    trl_steps=2,
  ),
}


# ----------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------


def median(xs) -> float:
  return statistics.median(xs) if len(xs) else float("nan")


def clock() -> np.ndarray:
  """(wall seconds, this process's CPU seconds summed over its threads)."""
  return np.array([time.perf_counter(), time.process_time()])


def summarize(deltas) -> dict[str, float]:
  """Per-step ``[(wall, cpu), ...]`` -> medians, wall min / mean, count."""
  d = np.asarray(deltas, np.float64).reshape(-1, 2)
  return dict(
    wall=median(d[:, 0]),
    cpu=median(d[:, 1]),
    wall_min=float(d[:, 0].min()),
    wall_mean=float(d[:, 0].mean()),
    n=len(d),
  )


def machine_load() -> str:
  try:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
  except OSError:
    return "load average: " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def time_fn(fn, *args, repeats: int = 5) -> dict[str, float]:
  """Median wall / CPU time of ``fn(*args)`` after one warm-up call."""
  jax.block_until_ready(fn(*args))
  ds = []
  for _ in range(repeats):
    t0 = clock()
    jax.block_until_ready(fn(*args))
    ds.append(clock() - t0)
  return summarize(ds)


def matmul_flops_per_s(n: int, repeats: int = 7) -> dict[str, float]:
  """FLOP/s of a jitted square float32 matmul (``2·n³`` FLOPs) by median wall
  time and by median process CPU time."""
  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32)
  t = time_fn(jax.jit(lambda x, y: x @ y), a, b, repeats=repeats)
  return {"n": n, "wall": 2 * n**3 / t["wall"], "cpu": 2 * n**3 / t["cpu"]}


def model_config(arch: dict[str, int], vocab: int, max_len: int) -> ModelConfig:
  return ModelConfig(
    model_type="qwen3",
    vocab_size=vocab,
    qk_norm=True,
    max_position_embeddings=max(512, max_len),
    pad_token_id=PAD_ID,
    **arch,
  )


def parse_mesh(text: str) -> dict[str, int] | None:
  if not text:
    return None
  return {k.strip(): int(v) for k, v in (part.split("=") for part in text.split(","))}


# ----------------------------------------------------------------------------
# Checkpoints and data
# ----------------------------------------------------------------------------


def make_checkpoints(preset: Preset, root: str) -> tuple[str, str]:
  """Random student / teacher written as HF checkpoints; returns their dirs."""
  max_len = preset.prompt_len + preset.new_tokens
  dirs = []
  for name, arch, seed in (("student", preset.student, 0), ("teacher", preset.teacher, 1)):
    model = create_model(model_config(arch, preset.vocab, max_len), seed=seed)
    dirs.append(to_hf(model, os.path.join(root, name)))
    del model
  return dirs[0], dirs[1]


def make_prompts(preset: Preset, seed: int = 0) -> np.ndarray:
  """``[B, P]`` prompt ids in ``[2, V)`` (no pad / EOS), all full length."""
  rng = np.random.default_rng(seed)
  return rng.integers(2, preset.vocab, size=(preset.batch, preset.prompt_len), dtype=np.int32)


# ----------------------------------------------------------------------------
# Ours
# ----------------------------------------------------------------------------


def bench_config(preset: Preset, s_dir: str, t_dir: str, tok_dir: str, prompts_file: str, args):
  """The driver config of our side: λ = 1 reverse KL, temperature 1, all
  ``new_tokens`` generated (``sampling.ignore_eos``), AdamW lr 1e-6."""
  c = configs_lib.base_config()
  c.student.path, c.teacher.path, c.tokenizer = s_dir, t_dir, tok_dir
  c.data.train_files, c.data.max_prompt_len = prompts_file, preset.prompt_len
  c.batch_size = preset.batch
  c.sampling.update(
    dict(max_new_tokens=preset.new_tokens, temperature=1.0, num_samples=1, ignore_eos=True)
  )
  c.loss = configs_lib.loss_config("reverse_kl", chunk=args.loss_chunk)
  c.metrics.update(dict(enabled=not args.no_metrics, top_k=16, position_chunk=64))
  c.optimizer.lr = 1e-6
  c.mesh.shape.update(parse_mesh(args.mesh) or dict(data=1))
  return c


def setup_ours(
  preset: Preset, s_dir: str, t_dir: str, prompts: np.ndarray, args, root: str
) -> dict[str, Any]:
  """Our step built by ``train.build_run`` from the checkpoints, the word-level
  tokenizer and the prompts written as a JSONL file (compiled there)."""
  tok_dir = os.path.join(root, "tokenizer")
  make_tokenizer(preset.vocab).save_pretrained(tok_dir)
  prompts_file = os.path.join(root, "prompts.jsonl")
  write_jsonl(prompts_file, [{"prompt": " ".join(f"t{i}" for i in row)} for row in prompts])
  run = train_lib.build_run(bench_config(preset, s_dir, t_dir, tok_dir, prompts_file, args))
  phase = run.phases["opd"]
  batch = train_lib.global_batch(next(phase.it), run.sharder, preset.batch)
  got = sorted(map(tuple, np.asarray(batch["prompt_ids"]).tolist()))
  if got != sorted(map(tuple, prompts.tolist())):
    raise RuntimeError("the data pipeline does not round-trip the prompts")
  return dict(
    name="ours (opd_jax), compiled step",
    root=root,
    tok_dir=tok_dir,
    prompts_file=prompts_file,
    step=phase.fn,
    compiled=phase.compiled,
    state=run.state,
    t_params=phase.teacher,
    batch=batch,
    cfg=phase.cfg,
    gd_s=run.student_graphdef,
    gd_t=run.teacher_graphdef,
    tx=run.tx,
    sharder=run.sharder,
    student_cfg=run.student_cfg,
    teacher_cfg=run.teacher_cfg,
    compile_s=run.compile_s,
    xla_flops=aot.xla_flops(phase.compiled),
    deltas=[],
  )


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def bench_cli(ctx: dict[str, Any], n_steps: int, args) -> None:
  """The real driver, as a user runs it: ``python -m opd_jax.train`` with
  ``configs/opd.py`` on the same checkpoints, tokenizer and prompts, its
  default ``data.max_prompt_len`` (64: prompts go to their length bucket) and
  the benchmark's sampling / loss / metrics settings, ``n_steps`` steps after
  2 warm-up steps. Appends each timed step's logged ``step_time_s`` (the wall
  time of the driver's loop iteration) to ``ctx["deltas"]`` (no CPU time: NaN)
  and its logged ``tokens_per_sec`` to ``ctx["logged_tok_s"]``."""
  import sys

  ctx["runs"] = ctx.get("runs", 0) + 1
  workdir = os.path.join(ctx["root"], f"cli_{ctx['runs']}")
  warm = 2
  arg = ",".join(
    f"{k}={v}"
    for k, v in dict(
      student=ctx["s_dir"],
      teacher=ctx["t_dir"],
      prompts=ctx["prompts_file"],
      tokenizer=ctx["tok_dir"],
      steps=n_steps + warm,
    ).items()
  )
  p = ctx["preset"]
  cmd = [
    sys.executable,
    "-m",
    "opd_jax.train",
    f"--config={os.path.join(REPO, 'configs', 'opd.py')}:{arg}",
    f"--workdir={workdir}",
    f"--config.batch_size={p.batch}",
    "--config.sampling.num_samples=1",
    f"--config.sampling.max_new_tokens={p.new_tokens}",
    "--config.sampling.ignore_eos=True",
    f"--config.loss.chunk={args.loss_chunk}",
    f"--config.metrics.enabled={not args.no_metrics}",
    "--config.progress_bar=False",
  ]
  if args.mesh:
    cmd += [
      f"--config.mesh.shape.{kv.split('=')[0]}={kv.split('=')[1]}" for kv in args.mesh.split(",")
    ]
  env = dict(
    os.environ, PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")]))
  )
  if args.num_cpu_devices:
    env["XLA_FLAGS"] = (
      env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={args.num_cpu_devices}"
    ).strip()
    sharding.size_cpu_pool(env, args.num_cpu_devices)
  one_cpu = (
    (lambda: os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})) if args.threads == 1 else None
  )
  out = subprocess.run(cmd, env=env, capture_output=True, text=True, preexec_fn=one_cpu)
  if out.returncode:
    raise RuntimeError(f"the driver failed ({' '.join(cmd)}):\n{out.stderr[-4000:]}")
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    recs = [json.loads(line) for line in f]
  timed = [r for r in recs if "loss" in r and r["step"] > warm]
  ctx["deltas"] += [(r["step_time_s"], float("nan")) for r in timed]
  ctx.setdefault("logged_tok_s", []).extend(r["tokens_per_sec"] for r in timed)
  ctx["prompt_len"] = timed[-1].get("prompt_len")
  ctx["compile_s"] = next((r["compile_time_s"] for r in recs if "compile_time_s" in r), None)
  ctx["last"] = timed[-1]


def bench_ours(ctxs: list[dict[str, Any]], n_steps: int, warmup: int) -> None:
  """Runs the variants' steps alternately; appends (wall, CPU) per step to
  each ``ctx["deltas"]``. A step includes fetching its metrics to the host."""
  for ctx in ctxs:
    for _ in range(warmup):
      ctx["state"], m = ctx["compiled"](ctx["state"], ctx["t_params"], ctx["batch"])
      jax.block_until_ready(m)
  for _ in range(n_steps):
    for ctx in ctxs:
      t0 = clock()
      ctx["state"], m = ctx["compiled"](ctx["state"], ctx["t_params"], ctx["batch"])
      metrics = opd_step.host_metrics(m, ctx["step"].token_metric_names())
      ctx["deltas"].append(clock() - t0)
      ctx["last"] = metrics


def profile_ours(preset: Preset, ctx: dict[str, Any], args) -> dict[str, dict[str, float]]:
  """Times the pieces of the step as separately jitted functions."""
  cfg, gd_s, gd_t, tx = ctx["cfg"], ctx["gd_s"], ctx["gd_t"], ctx["tx"]
  params, t_params, batch = ctx["state"].params, ctx["t_params"], ctx["batch"]
  opt_state, sharder = ctx["state"].opt_state, ctx["sharder"]
  rng = jax.random.PRNGKey(0)
  loss_fn = losses_lib.get_loss(cfg.loss, dict(cfg.loss_kwargs))
  p, n, vocab = preset.prompt_len, preset.new_tokens, preset.vocab
  reps = args.profile_repeats
  out: dict[str, dict[str, float]] = {}

  def sample_fn(sp, batch, rng):
    return sample(nnx.merge(gd_s, sp), batch["prompt_ids"], batch["prompt_mask"], rng, cfg.sampling)

  so = jax.jit(sample_fn)(params, batch, rng)
  out["sampling"] = time_fn(jax.jit(sample_fn), params, batch, rng, repeats=reps)
  ids, mask, pos = sampling_lib.full_sequence(
    batch["prompt_ids"], batch["prompt_mask"], so.tokens, so.mask
  )
  tokens, cmask = so.tokens, so.mask.astype(jnp.bool_)

  @jax.jit
  def teacher_fn(tp, ids, mask, pos):
    h, _ = nnx.merge(gd_t, tp).hidden(ids, mask, pos)
    return h[:, p - 1 : p - 1 + n]

  h_t = teacher_fn(t_params, ids, mask, pos)
  out["teacher forward (hidden)"] = time_fn(teacher_fn, t_params, ids, mask, pos, repeats=reps)
  w_t = nnx.merge(gd_t, t_params).unembedding()

  def make_grad_fn(metrics: bool):
    @jax.jit
    def grad_fn(sp, h_t, w_t, tokens, cmask, ids, mask, pos):
      weights = losses_lib.aggregate_weights(
        cmask.astype(jnp.float32), cfg.aggregation, cfg.normalizer
      )

      def loss_of(params):
        model = nnx.merge(gd_s, params)
        h_s, _ = model.hidden(ids, mask, pos)
        return opd_step.chunked_divergence(
          h_s[:, p - 1 : p - 1 + n],
          model.unembedding(),
          h_t,
          w_t,
          tokens,
          weights,
          cmask.astype(jnp.float32),
          loss_fn=loss_fn,
          vocab=vocab,
          chunk=cfg.loss_chunk,
          metrics=metrics,
          top_k=cfg.metrics_top_k,
          position_chunk=cfg.position_chunk,
          sharder=sharder,
        )

      return jax.value_and_grad(loss_of, has_aux=True)(sp)

    return grad_fn

  @jax.jit
  def student_fwd(sp, ids, mask, pos):
    return nnx.merge(gd_s, sp).hidden(ids, mask, pos)[0]

  g_args = (params, h_t, w_t, tokens, cmask, ids, mask, pos)
  out["student forward only (hidden)"] = time_fn(student_fwd, params, ids, mask, pos, repeats=reps)
  out["student fwd+bwd + chunked loss + metrics"] = time_fn(
    make_grad_fn(cfg.metrics), *g_args, repeats=reps
  )
  out["student fwd+bwd + chunked loss, no metrics"] = time_fn(
    make_grad_fn(False), *g_args, repeats=reps
  )
  (_, _), grads = make_grad_fn(False)(*g_args)

  @jax.jit
  def update_fn(grads, opt_state, params):
    upd, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, upd), opt_state

  out["optimizer update"] = time_fn(update_fn, grads, opt_state, params, repeats=reps)
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
  return PreTrainedTokenizerFast(
    tokenizer_object=tok,
    pad_token="<pad>",
    eos_token="<eos>",
    unk_token="<pad>",
    padding_side="left",
  )


def bench_trl(
  preset: Preset,
  s_dir: str,
  t_dir: str,
  prompts: np.ndarray,
  args,
  out_root: str,
  between_steps=None,
) -> dict[str, Any]:
  """TRL ``DistillationTrainer`` (else ``GKDTrainer`` with λ = 1, β = 1).

  A TRL step is timed from ``on_step_begin`` to ``on_step_end`` (generation,
  teacher, student forward/backward, optimizer). ``between_steps()`` (our
  steps, so both sides see the same machine load) runs after each timed step,
  outside the timed span.
  """
  import torch
  import transformers
  import trl
  from datasets import Dataset
  from transformers import AutoModelForCausalLM, TrainerCallback

  n_new, b = preset.new_tokens, preset.batch
  warm = max(1, args.trl_warmup)
  total = warm + (args.trl_steps or preset.trl_steps)
  if args.threads > 0:
    torch.set_num_threads(args.threads)
  tokenizer = make_tokenizer(preset.vocab)
  text = [" ".join(f"t{i}" for i in row) for row in prompts]
  if [list(r) for r in tokenizer(text=text)["input_ids"]] != prompts.tolist():
    raise RuntimeError("tokenizer does not round-trip the prompts")
  dataset = Dataset.from_dict({"prompt": text * total})  # the same 8 prompts each step

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
  spans: list[tuple[np.ndarray, np.ndarray]] = []

  class Timer(TrainerCallback):
    def on_step_begin(self, targs, state, control, **kw):
      self.t0 = clock()

    def on_step_end(self, targs, state, control, **kw):
      spans.append((self.t0, clock()))
      if between_steps is not None and len(spans) > warm:
        between_steps()

  common = dict(
    output_dir=os.path.join(out_root, "trl_out"),
    per_device_train_batch_size=b,
    gradient_accumulation_steps=1,
    max_steps=total,
    learning_rate=1e-6,
    lr_scheduler_type="constant",
    weight_decay=0.01,
    max_grad_norm=1.0,
    bf16=False,
    fp16=False,
    gradient_checkpointing=False,
    use_cpu=True,
    report_to="none",
    save_strategy="no",
    logging_steps=10**6,
    dataloader_num_workers=0,
    seed=0,
    disable_dropout=True,
    temperature=1.0,
    disable_tqdm=True,
  )
  gen_kwargs = {"min_new_tokens": n_new}  # EOS masked until max_new_tokens
  if hasattr(trl, "DistillationTrainer"):
    trainer_name = "DistillationTrainer"
    targs = trl.DistillationConfig(
      **common,
      max_completion_length=n_new,
      top_k=0,
      top_p=1.0,
      beta=1.0,
      generation_kwargs=gen_kwargs,
      shuffle_dataset=False,
    )
    trainer = trl.DistillationTrainer(
      model=student,
      teacher_model=teacher,
      args=targs,
      train_dataset=dataset,
      processing_class=tokenizer,
      callbacks=[Timer()],
    )
  else:
    from trl.experimental.gkd import GKDConfig, GKDTrainer  # pylint: disable=g-import-not-at-top

    trainer_name = "GKDTrainer(lmbda=1,beta=1)"
    targs = GKDConfig(
      **common, max_new_tokens=n_new, lmbda=1.0, beta=1.0, generation_kwargs=gen_kwargs
    )
    trainer = GKDTrainer(
      model=student,
      teacher_model=teacher,
      args=targs,
      train_dataset=dataset,
      processing_class=tokenizer,
      callbacks=[Timer()],
    )
  gen_lens: list[int] = []
  if hasattr(trainer, "_generate_single_turn"):  # completion lengths after EOS masking
    orig_gst = trainer._generate_single_turn  # pylint: disable=protected-access

    def gst(*a, **kw):
      comp = orig_gst(*a, **kw)
      gen_lens.extend(len(c) for c in comp)
      return comp

    trainer._generate_single_turn = gst  # pylint: disable=protected-access
  train_out = trainer.train()
  if len(spans) < total:
    raise RuntimeError(f"TRL ran {len(spans)} steps, expected {total}")
  timed = spans[warm:]
  deltas = np.stack([e - b for b, e in timed])
  gen = sum(
    (g1 - g0 for g0, g1 in gen_spans if any(b[0] <= g0[0] and g1[0] <= e[0] for b, e in timed)),
    np.zeros(2),
  )
  return dict(
    name=f"TRL {trl.__version__} {trainer_name}",
    trainer=trainer_name,
    version=trl.__version__,
    transformers=transformers.__version__,
    torch=torch.__version__,
    torch_threads=torch.get_num_threads(),
    deltas=deltas.tolist(),
    gen_frac=(gen / deltas.sum(0)).tolist(),
    gen_s=(gen / len(deltas)).tolist(),
    train_loss=train_out.training_loss,
    gen_len=(min(gen_lens), max(gen_lens)) if gen_lens else None,
  )


# ----------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------


def run_preset(preset: Preset, args) -> dict[str, Any]:
  """Ours before and after TRL, then the report."""
  root = tempfile.mkdtemp(prefix=f"bench_opd_{preset.name}_")
  try:
    mm = matmul_flops_per_s(args.matmul_size)
    s_dir, t_dir = make_checkpoints(preset, root)
    prompts = make_prompts(preset)
    ctxs = [setup_ours(preset, s_dir, t_dir, prompts, args, root)]
    n_steps = args.steps or preset.steps
    cli = None
    if args.cli:  # the driver as a user runs it, before and after TRL (A-B-A)
      cli = dict(
        name="ours, CLI driver loop (opd_jax.train)",
        preset=preset,
        root=root,
        s_dir=s_dir,
        t_dir=t_dir,
        tok_dir=ctxs[0]["tok_dir"],
        prompts_file=ctxs[0]["prompts_file"],
        compile_s=float("nan"),
        xla_flops=None,
        deltas=[],
      )
      bench_cli(cli, max(2, n_steps // 2), args)
    warmup = preset.warmup if args.warmup < 0 else args.warmup
    bench_ours(ctxs, 0, warmup)
    res: dict[str, Any] = {
      "preset": dataclasses.asdict(preset),
      "mm": mm,
      "devices": (ctxs[0]["sharder"].mesh.size if ctxs[0]["sharder"].mesh is not None else 1),
      "gen_tokens": preset.batch * preset.new_tokens,
      "flops": opd_step_flops(
        ctxs[0]["student_cfg"],
        ctxs[0]["teacher_cfg"],
        preset.batch,
        preset.prompt_len,
        preset.new_tokens,
        preset.vocab,
      ),
    }
    if args.profile:
      res["profile"] = profile_ours(preset, ctxs[0], args)
    if not args.no_trl:
      try:
        import trl  # noqa: F401  pylint: disable=unused-import,g-import-not-at-top
      except ImportError:
        res["trl_error"] = "trl not importable (install the bench extra)"
      else:  # ours interleaved with TRL's steps: the same load for both
        n_trl = args.trl_steps or preset.trl_steps
        per = max(1, -(-n_steps // n_trl))
        res["trl"] = bench_trl(
          preset, s_dir, t_dir, prompts, args, root, between_steps=lambda: bench_ours(ctxs, per, 0)
        )
    if not ctxs[0]["deltas"]:
      bench_ours(ctxs, n_steps, 0)
    if cli is not None:
      bench_cli(cli, max(2, n_steps // 2), args)
      ctxs.append(cli)
    res["ours"] = [
      {k: ctx[k] for k in ("name", "compile_s", "xla_flops", "deltas", "last")} for ctx in ctxs
    ]
    if cli is not None:
      res["cli"] = dict(logged_tok_s=median(cli["logged_tok_s"]), prompt_len=cli["prompt_len"])
    return res
  finally:
    shutil.rmtree(root, ignore_errors=True)


def report(res: dict[str, Any]) -> list[dict[str, Any]]:
  """Prints one preset's table; returns its summary rows."""
  p, fl, mm, gen = res["preset"], res["flops"], res["mm"], res["gen_tokens"]
  s, t = p["student"], p["teacher"]
  print(
    f"\n=== preset {p['name']}: student {s['num_layers']}L x {s['hidden_size']} "
    f"(MLP {s['intermediate_size']}), teacher {t['num_layers']}L x {t['hidden_size']} "
    f"(MLP {t['intermediate_size']}), vocab {p['vocab']}; {p['batch']} prompts x "
    f"{p['prompt_len']} tokens + {p['new_tokens']} new = {gen} generated tokens/step ==="
  )
  print(
    f"  analytic GFLOP/step {fl['total'] / 1e9:.3f} = sampling {fl['sampling'] / 1e9:.3f}"
    f" + teacher fwd {fl['teacher'] / 1e9:.3f} + student fwd+bwd "
    f"{fl['student_fwd_bwd'] / 1e9:.3f}"
  )
  xf, ndev = res["ours"][0]["xla_flops"], res.get("devices", 1)
  if xf is not None:
    per = f" per device (of {ndev})" if ndev > 1 else ""
    print(
      f"  XLA cost_analysis GFLOP/step{per} {xf / 1e9:.3f} = {xf / fl['total']:.2f}x "
      "analytic (counts each while/scan body once)"
    )
  print(
    f"  plain f32 matmul {mm['n']}x{mm['n']}: {mm['wall'] / 1e9:.1f} GFLOP/s wall, "
    f"{mm['cpu'] / 1e9:.1f} GFLOP/s per CPU-second"
  )
  print(
    f"  {'':44s}{'wall s':>8s}{'steps/s':>8s}{'tok/s':>7s}{'FLOP%':>6s} |"
    f"{'CPU s':>8s}{'tok/CPU-s':>10s}{'FLOP%':>6s}"
  )
  rows = []
  entries = [
    (o["name"], o["deltas"], f"{len(o['deltas'])} steps, compile {o['compile_s']:.1f}s")
    for o in res["ours"]
  ]
  tr = res.get("trl")
  if tr:
    entries.append(
      (
        tr["name"],
        tr["deltas"],
        f"{len(tr['deltas'])} steps, generate {100 * tr['gen_frac'][0]:.0f}% "
        f"wall / {100 * tr['gen_frac'][1]:.0f}% CPU of the step",
      )
    )
  for name, deltas, note in entries:
    d = summarize(deltas)
    row = dict(
      preset=p["name"],
      name=name,
      wall=d["wall"],
      cpu=d["cpu"],
      frac_wall=fl["total"] / d["wall"] / mm["wall"],
      frac_cpu=fl["total"] / d["cpu"] / mm["cpu"],
    )
    rows.append(row)
    print(
      f"  {name:44s}{d['wall']:8.4f}{1 / d['wall']:8.2f}{gen / d['wall']:7.0f}"
      f"{100 * row['frac_wall']:6.1f} |{d['cpu']:8.4f}{gen / d['cpu']:10.0f}"
      f"{100 * row['frac_cpu']:6.1f}  {note}"
    )
  if tr:
    trl_row = rows[-1]
    for row in rows[:-1]:
      row["ratio_wall"] = trl_row["wall"] / row["wall"]
      row["ratio_cpu"] = trl_row["cpu"] / row["cpu"]
      print(
        f"  {row['name']} / TRL, steps/s (= generated tokens/s): "
        f"{row['ratio_wall']:.2f}x wall, {row['ratio_cpu']:.2f}x CPU time  "
        "(issue target: >= 4x through the CLI)"
      )
    print(
      f"  TRL: generate {tr['gen_s'][0]:.4f}s wall / {tr['gen_s'][1]:.4f}s CPU per "
      f"step; completion lengths {tr['gen_len']}; mean loss {tr['train_loss']:.4f}; "
      f"torch {tr['torch']} ({tr['torch_threads']} threads), transformers "
      f"{tr['transformers']}"
    )
  elif "trl_error" in res:
    print(f"  TRL: {res['trl_error']}")
  if "cli" in res:
    c = res["cli"]
    print(
      f"  CLI: the driver logged {c['logged_tok_s']:.0f} tokens_per_sec (median; generated "
      f"tokens per wall second of its loop iteration); prompts padded to {c['prompt_len']:.0f} "
      "(their bucket of data.max_prompt_len=64); its CPU time is not measured (nan)"
    )
  last = res["ours"][0]["last"]
  losses = ", ".join(f"{o['last']['loss']:.4f}" for o in res["ours"])
  print(
    f"  ours: {last['num_tokens']:.0f} completion tokens/step (mean length "
    f"{last['mean_response_length']:.1f}), last loss {losses}"
  )
  if "profile" in res:
    print("  profile, separately jitted pieces (median wall s, CPU s, % of the step's CPU s):")
    step_cpu = rows[0]["cpu"]
    for k, v in res["profile"].items():
      print(f"    {k:46s}{v['wall']:8.4f}{v['cpu']:8.4f}{100 * v['cpu'] / step_cpu:6.0f}%")
  return rows


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--preset", default="small", help=f"comma-separated, out of {sorted(PRESETS)}")
  ap.add_argument(
    "--steps", type=int, default=0, help="timed steps of ours per block (0: the preset's)"
  )
  ap.add_argument("--warmup", type=int, default=-1, help="-1: the preset's")
  ap.add_argument("--trl-steps", type=int, default=0, help="0: the preset's")
  ap.add_argument("--trl-warmup", type=int, default=2, help=">= 1")
  ap.add_argument("--no-trl", action="store_true")
  ap.add_argument(
    "--cli",
    action="store_true",
    help="also time the real driver loop (python -m opd_jax.train), before and after TRL",
  )
  ap.add_argument("--profile", action="store_true", help="time the step's pieces")
  ap.add_argument("--profile-repeats", type=int, default=5)
  ap.add_argument("--loss-chunk", type=int, default=64)
  ap.add_argument("--no-metrics", action="store_true", help="OPDConfig(metrics=False)")
  ap.add_argument("--mesh", default="", help="e.g. data=2,fsdp=1,tensor=1")
  ap.add_argument("--num-cpu-devices", type=int, default=0)
  ap.add_argument(
    "--threads",
    type=int,
    default=0,
    help="CPU threads of both sides (1: XLA single-threaded Eigen, "
    "torch.set_num_threads(1)); 0: library defaults",
  )
  ap.add_argument("--matmul-size", type=int, default=2048)
  ap.add_argument("--json", default="", help="also write the raw results here")
  args = ap.parse_args(argv)

  print(
    f"machine: {machine_load()}; {os.cpu_count()} CPUs; jax {jax.__version__} "
    f"{jax.devices()}; threads {args.threads or 'library default'}"
  )
  results, rows = [], []
  for name in args.preset.split(","):
    res = run_preset(PRESETS[name.strip()], args)
    rows += report(res)
    results.append(res)
  print("\nsummary (median per step; ratio = TRL time / our time):")
  for r in rows:
    line = (
      f"  {r['preset']:7s} {r['name']:44s} {r['wall']:8.4f}s wall {r['cpu']:8.4f}s "
      f"CPU  FLOP {100 * r['frac_wall']:4.1f}% wall {100 * r['frac_cpu']:4.1f}% CPU"
    )
    if "ratio_wall" in r:
      line += f"  vs TRL {r['ratio_wall']:.2f}x wall {r['ratio_cpu']:.2f}x CPU"
    print(line)
  print(f"machine: {machine_load()}")
  if args.json:
    with open(args.json, "w") as fh:
      json.dump(results, fh, indent=2, default=lambda x: np.asarray(x).tolist())


if __name__ == "__main__":
  main()
