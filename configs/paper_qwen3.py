"""The setting of arXiv 2604.13016's main runs (Qwen3-1.7B <- Qwen3-4B).

64 prompts x 4 samples per step, temperature 1.0, top-k (k=16) student-side
OPD with student-probability weights, AdamW lr 1e-6 constant, betas
(0.9, 0.999), weight decay 0.01, grad clip 1.0, fp32 master weights (bf16
compute), max prompt 1024 / response 7168 tokens, one epoch (~279 steps) of
DAPO-Math-17K; AIME avg@16 (temperature 0.7, top-p 0.95) every 50 steps when
``aime=`` names a JSONL file of ``prompt`` / ``answer`` records (without it no
eval is configured). Mesh for a TPU pod slice (v5p-64: 32 chips as fsdp=16 x
tensor=2 by default; override ``--config.mesh.shape.*``). The 256 rows run as
8 micro-batches of 32 inside the one compiled step (sampling, scoring and the
gradient of one group live at a time), the loss chunk is sized from a
per-device budget: ``python -m opd_jax.aot`` plans 23.9 GiB per device on 8
devices (fsdp=8) and 9.1 GiB on 32 (fsdp=16 x tensor=2); see README.

  python -m opd_jax.train --workdir=gs://bucket/run \
    --config=configs/paper_qwen3.py:student=/ckpt/Qwen3-1.7B,teacher=/ckpt/Qwen3-4B,\
prompts=dapo.parquet,aime=aime.jsonl
"""

from opd_jax import configs_lib


def get_config(arg=None):
  a = configs_lib.parse_arg(
    arg, student="", teacher="", prompts="", aime="", fsdp=16, tensor=2, data=1, steps=279
  )
  c = configs_lib.base_config()
  c.student.path = a.student
  c.teacher.path = a.teacher
  for m in (c.student, c.teacher):
    m.dtype = "bfloat16"  # compute
    m.param_dtype = "float32"  # fp32 master weights
    m.remat = True
    m.scan_layers = True  # one lax.scan over layers: compile time flat in depth
    m.decode_attention = "blocked"  # decode reads only the filled cache (accelerators)
  c.mesh.shape.update(dict(data=a.data, fsdp=a.fsdp, tensor=a.tensor))
  c.data.train_files = a.prompts
  c.data.prompt_field = "prompt"
  c.data.use_chat_template = True
  c.data.max_prompt_len = 1024
  c.data.overlong = "drop"
  c.data.num_epochs = 1
  c.batch_size = 64
  c.sampling.update(dict(max_new_tokens=7168, temperature=1.0, top_p=1.0, top_k=0, num_samples=4))
  c.teacher_sampling.temperature = 1.0
  c.on_policy_fraction = 1.0
  c.micro_batches = 8  # 8 groups of 32 rows, one optax update
  c.loss = configs_lib.loss_config(
    "topk_opd", k=16, strategy="student", weight="student", chunk=0, chunk_budget_mib=2048
  )  # 0: chunk from the budget
  c.optimizer.update(
    dict(
      name="adamw",
      lr=1e-6,
      schedule="constant",
      warmup_steps=0,
      b1=0.9,
      b2=0.999,
      weight_decay=0.01,
      grad_clip=1.0,
    )
  )
  c.metrics.top_k = 16
  c.metrics.position_chunk = 1024
  c.total_steps = a.steps
  c.checkpoint_every = 20
  c.log_every = 1
  if a.aime:  # the 'math' task only verifies: no file, no AIME eval
    c.evals.aime = configs_lib.eval_config(
      task="math",
      data_file=a.aime,
      num_examples=0,
      num_samples=16,
      temperature=0.7,
      top_p=0.95,
      max_new_tokens=7168,
      batch_size=2,
    )  # 2 x 16 rows: a train group's 32
  c.eval_every = 50
  return c
