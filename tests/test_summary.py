"""The closing summary (opd_jax/summary.py) on a synthetic workdir."""

import json
import os

from opd_jax import summary


def _workdir(tmp_path, records, loss=None):
  with open(tmp_path / "metrics.jsonl", "w") as f:
    for r in records:
      f.write(json.dumps(r) + "\n")
  if loss is not None:
    with open(tmp_path / "config.json", "w") as f:
      json.dump({"loss": loss}, f)
  os.makedirs(tmp_path / "checkpoints")
  return str(tmp_path)


def _records(kl_key="reverse_kl"):
  return [
    {"step": 0, "data/num_records": 10},
    {
      "step": 0,
      "eval/hard/accuracy": 0.2,
      "eval/easy/accuracy": 0.9,
      "teacher/eval/hard/accuracy": 0.8,
      "teacher/eval/easy/accuracy": 0.95,
    },
    {"step": 5, "loss": 0.5, kl_key: 0.61, "num_tokens": 100.0},
    {"step": 10, "loss": 0.3, kl_key: 0.25, "num_tokens": 300.0, "eval/hard/accuracy": 0.5},
    {
      "step": 15,
      "loss": 0.1,
      kl_key: 0.125,
      "num_tokens": 200.0,
      "eval/hard/accuracy": 0.65,
      "eval/easy/accuracy": 0.85,
    },
  ]


def test_eval_table_gap():
  rows = {r["name"]: r for r in summary.eval_table(_records())}
  hard, easy = rows["hard"], rows["easy"]
  assert (hard["start"], hard["end"], hard["teacher"]) == (0.2, 0.65, 0.8)
  assert abs(hard["gap"] - (0.65 - 0.2) / (0.8 - 0.2)) < 1e-12  # 75%
  assert (easy["start_step"], easy["end_step"]) == (0, 15)
  assert abs(easy["gap"] - (0.85 - 0.9) / (0.95 - 0.9)) < 1e-12  # -100%: lost ground
  # No teacher, or a teacher not above the start: no gap.
  no_teacher = [{k: v for k, v in r.items() if not k.startswith("teacher/")} for r in _records()]
  assert all(r["gap"] is None for r in summary.eval_table(no_teacher))


def test_summary_text_and_png(tmp_path):
  wd = _workdir(tmp_path, _records())
  text = summary.summarize(wd, status="finished", loop_s=2.0, loop_steps=15)
  assert "finished at step 15" in text
  hard = next(line for line in text.splitlines() if line.startswith("hard"))
  assert "20.0% ->  65.0%" in hard and "80.0%" in hard and "75%" in hard
  easy = next(line for line in text.splitlines() if line.startswith("easy"))
  assert "90.0% ->  85.0%" in easy and "-100%" in easy
  assert "0.6100 (step 5) -> 0.1250 (step 15)" in text
  # mean logged tokens 200 x 15 steps = 3,000 tokens in 2 s
  assert "~3,000" in text and "1,500 tokens/s" in text
  assert os.path.join(wd, "metrics.jsonl") in text and os.path.join(wd, "checkpoints") in text
  assert "tensorboard" not in text  # not made: not listed
  png = os.path.join(wd, summary.PNG_NAME)
  assert png in text
  with open(png, "rb") as f:
    head = f.read(8)
  assert head == b"\x89PNG\r\n\x1a\n" and os.path.getsize(png) > 1000
  import matplotlib.image

  assert matplotlib.image.imread(png).ndim == 3  # decodes


def test_summary_kl_from_loss(tmp_path):
  """Without the token metrics the token-mean reverse-KL loss is the per-token
  reverse KL; another loss is not reported as one."""
  records = _records(kl_key="unused")
  wd = _workdir(tmp_path, records, loss={"name": "reverse_kl", "aggregation": "token_mean"})
  assert "0.5000 (step 5) -> 0.1000 (step 15)" in summary.summarize(wd, png=False)
  with open(tmp_path / "config.json", "w") as f:
    json.dump({"loss": {"name": "jsd", "aggregation": "token_mean"}}, f)
  text = summary.summarize(wd, png=False)
  assert "reverse KL" not in text and "steps: 15" in text
  assert not os.path.exists(os.path.join(wd, summary.PNG_NAME))
