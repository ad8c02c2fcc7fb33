"""Multi-teacher OPD in the driver: ``config.teachers`` routing, start-up
errors, bitwise resume and the CLI (the step's equivalences are in
tests/test_opd_step.py, the data pipeline's quotas in tests/test_data.py).

The tiny run: the session's random teacher takes level-1 prompts
(``arithmetic/L1``), a second random model (the student's weights, another
architecture) is the default teacher (level 2)."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
from driver_utils import (  # noqa: F401  (fixtures)
  assert_same_metrics,
  assets,
  last_json_line,
  start_driver,
  step_records,
  tiny_config,
  write_config_file,
)

from opd_jax import configs_lib, teachers

L1, L2 = "arithmetic/L1", "arithmetic/L2"


def _multi_config(assets, **overrides):
  c = tiny_config(assets, **overrides)
  c.teacher.path = ""
  c.data.source_field = "source"
  c.teachers.one = configs_lib.teacher_config(assets["teacher"], sources=L1)
  c.teachers.two = configs_lib.teacher_config(assets["student"], default=True)
  return c


def _specs(c):
  from opd_jax.train import teacher_specs

  return teacher_specs(c)


def test_teacher_specs_quotas_and_groups(assets):
  c = _multi_config(assets)
  one, two = _specs(c)
  assert (one.name, one.sources, one.default, one.rows) == ("one", (L1,), False, 2)
  assert (two.name, two.sources, two.default, two.rows) == ("two", (), True, 2)
  assert dict(one.model)["dtype"] == "float32"
  assert teachers.groups((one, two), (L1, L2)) == [((L1,), 2), ((L2,), 2)]
  # Mixture weights set the quotas: 1 : 3 of a batch of 4.
  c.data.mixture = {L1: 1.0, L2: 3.0}
  assert [s.rows for s in _specs(c)] == [1, 3]
  assert _specs(tiny_config(assets)) == ()  # config.teacher: single teacher


def _expect(c, match):
  with pytest.raises(ValueError, match=match):
    _specs(c)


def test_multi_teacher_startup_errors(assets, tmp_path):
  c = _multi_config(assets)
  c.teacher.path = assets["teacher"]
  _expect(c, r"config\.teacher\.path and config\.teachers are both set")
  c = _multi_config(assets)
  c.teachers.one.path = ""
  _expect(c, r"config\.teachers\.one\.path is empty")
  c = _multi_config(assets)
  c.teachers.two.default = False
  _expect(c, r"config\.teachers\.two: no sources and not the default")
  c.teachers.two.sources = f"{L2}, {L1}"
  _expect(c, r"source 'arithmetic/L1' is listed by teacher 'one' too")
  c = _multi_config(assets)
  c.teachers.one.default = True
  _expect(c, r"more than one default teacher \['one', 'two'\]")
  c = _multi_config(assets, batch_size=3)
  _expect(c, r"config\.batch_size=3 must be a multiple of the 2 teachers")
  c = _multi_config(assets)
  c.data.mixture = {L1: 1.0, L2: 2.0}
  _expect(c, r"config\.teachers\.one: its mixture share 1/3 of config\.batch_size=4 is 1\.33")
  c.data.mixture = {L2: 1.0}
  _expect(c, r"config\.teachers\.one: none of its sources is in config\.data\.mixture")
  c = _multi_config(assets)
  c.teachers.one.unknown_knob = 1
  _expect(c, r"config\.teachers\.one: unknown setting\(s\) \['unknown_knob'\]")
  c = _multi_config(assets)
  c.cold_start.steps = 2
  _expect(c, r"cold_start\.steps > 0 is not supported with config\.teachers")
  # Routing against the data's sources (at start-up, before compiling).
  one, two = _specs(_multi_config(assets))
  with pytest.raises(ValueError, match=r"teachers\.one\.sources: \['arithmetic/L9'\] not in the"):
    teachers.groups((teachers.dataclasses.replace(one, sources=("arithmetic/L9",)), two), (L1, L2))
  no_default = teachers.dataclasses.replace(two, sources=("x",), default=False)
  with pytest.raises(ValueError, match=r"data sources \['arithmetic/L2'\] go to no teacher"):
    teachers.groups((one, no_default), (L1, L2, "x"))
  with pytest.raises(ValueError, match=r"teachers\.two: no record of the data goes to it"):
    teachers.groups((one, two), (L1,))
  # The driver: a source no teacher takes, and mismatched vocabularies.
  from opd_jax.train import build_run

  c = _multi_config(assets)
  c.teachers.two.default, c.teachers.two.sources = False, "arithmetic/L3"
  with pytest.raises(ValueError, match=r"teachers\.two\.sources: \['arithmetic/L3'\] not in"):
    build_run(c)
  small = _small_vocab_model(assets, str(tmp_path / "small_vocab"))
  c = _multi_config(assets)
  c.teachers.two.path = small
  with pytest.raises(ValueError, match=r"config\.teachers\.two \(.*small_vocab\): vocab mismatch"):
    build_run(c)


def _small_vocab_model(assets, path):
  """A model whose vocabulary is smaller than the tokenizer's."""
  import dataclasses

  from opd_jax.models import ModelConfig, create_model, to_hf

  cfg = ModelConfig(
    model_type="qwen3",
    vocab_size=8,
    hidden_size=16,
    intermediate_size=32,
    num_layers=1,
    num_heads=2,
    num_kv_heads=1,
    head_dim=8,
    qk_norm=True,
    max_position_embeddings=64,
    tie_word_embeddings=False,
  )
  to_hf(create_model(dataclasses.replace(cfg), seed=0), path)
  return path


@pytest.mark.slow
def test_multi_teacher_run_resumes_bitwise(assets, tmp_path):
  """4 steps at once == 2 steps, then resumed to 4 (every logged metric,
  the per-teacher ones included, bitwise); each teacher's rows and tokens
  add up to the step's."""
  from opd_jax.train import train

  a = _multi_config(assets, total_steps=4, checkpoint_every=1)
  train(a, str(tmp_path / "a"))
  ra = step_records(str(tmp_path / "a"))
  for s in (1, 2, 3, 4):
    r = ra[s]
    assert r["teacher/one/num_tokens"] + r["teacher/two/num_tokens"] == r["num_tokens"]
    assert {"teacher/one/loss", "teacher/two/reverse_kl", "teacher/one/k3_bias"} <= set(r)
  for total in (2, 4):
    train(_multi_config(assets, total_steps=total, checkpoint_every=1), str(tmp_path / "b"))
  assert_same_metrics(step_records(str(tmp_path / "b")), ra, [1, 2, 3, 4])


@pytest.mark.slow
def test_multi_teacher_cli_end_to_end(assets, tmp_path):
  """``python -m opd_jax.train`` on a multi-teacher config file (2 devices):
  finishes, logs ``teacher/<name>/*`` metrics, saves the teachers' config."""
  c = _multi_config(assets, total_steps=2, checkpoint_every=2)
  path = write_config_file(c, str(tmp_path / "multi.py"))
  workdir = str(tmp_path / "run")
  out = start_driver(path, workdir, num_devices=2).check()
  assert last_json_line(out)["status"] == "finished"
  rec = step_records(workdir)[2]
  assert rec["teacher/one/on_policy_frac"] == 1.0 and rec["teacher/two/loss"] >= 0
  with open(os.path.join(workdir, "config.json")) as f:
    saved = json.load(f)
  assert saved["teachers"]["one"]["sources"] == L1 and saved["teachers"]["two"]["default"]


def _load_config(arg=None, *flags, file="configs/multi_teacher.py"):
  """configs/multi_teacher.py (or ``file``) through the driver's flag parsing
  (locked)."""
  from absl import flags as absl_flags
  from ml_collections import config_flags

  path = os.path.join(os.path.dirname(os.path.dirname(__file__)), file)
  argv = ["opd_jax.train", f"--config={path}" + (f":{arg}" if arg else ""), *flags]
  fv = absl_flags.FlagValues()
  config_flags.DEFINE_config_file(
    "config", None, "", flag_values=fv, lock_config=True, sys_argv=argv
  )
  fv(argv)
  return fv.config


def test_multi_teacher_config_builds():
  """The config file: two teachers routed by level, overridable per teacher;
  an unknown teacher name on the command line is an error naming the key."""
  c = _load_config("steps=3", "--config.teachers.low.dtype=bfloat16")
  assert c.prepare == "multi_teacher" and c.total_steps == 3 and not c.teacher.path
  assert c.teachers.low.dtype == "bfloat16" and c.teachers.high.default
  c.teachers.low.path, c.teachers.high.path = "low_dir", "high_dir"
  high, low = _specs(c)  # in name order (a ConfigDict's keys are sorted)
  # data.mixture sets the quotas: 64 prompts, 2/8 for low (levels 1-2), 6/8 for high.
  assert (low.rows, high.rows) == (16, 48) and dict(low.model)["dtype"] == "bfloat16"
  assert dict(high.model)["dtype"] == "float32"
  sources = [f"arithmetic/L{i}" for i in (1, 2, 3)]
  mixture = c.data.mixture.to_dict()
  want = [(tuple(sources[2:]), 48), (tuple(sources[:2]), 16)]
  assert teachers.groups((high, low), sources, mixture) == want
  with pytest.raises(Exception, match="nope"):
    _load_config(None, "--config.teachers.nope.path=x")


def test_multi_teacher_lowers_abstract(assets):
  """The abstract run (config.json files only) lowers the multi-teacher step;
  its FLOPs are the two single-teacher steps' on their prompts."""
  import dataclasses

  from opd_jax import flops as flops_lib
  from opd_jax.train import build_run

  run = build_run(_multi_config(assets), abstract=True)
  phase = run.phases["opd"]
  assert phase.cfg.teachers == (("one", 2), ("two", 2)) and len(run.teacher_cfg) == 2
  phase.fn.lower(*phase.args(run.state))
  one = dataclasses.replace(phase.cfg, teachers=())
  want = sum(
    flops_lib.step_flops(one, run.student_cfg, t, batch_size=2, prompt_len=12, vocab=run.vocab)[
      "total"
    ]
    for t in run.teacher_cfg
  )
  assert phase.flops == want > 0


def _tiny_organisms(monkeypatch):
  """organisms.MULTI_TEACHER shrunk to a few steps of one-layer models."""
  from opd_jax import organisms

  tiny = organisms.Arch(num_layers=1, hidden_size=32)
  small = dict(low=tiny, high=tiny, student=tiny, max_new_tokens=24, eval_examples=8)
  small.update(low_steps=2, high_steps=2, student_steps=2, teacher_examples=64)
  small.update(student_examples=64, prompt_examples=200)
  monkeypatch.setattr(
    organisms, "MULTI_TEACHER", dataclasses.replace(organisms.MULTI_TEACHER, **small)
  )


@pytest.mark.slow
def test_multi_teacher_config_runs_with_tiny_organisms(tmp_path, monkeypatch):
  """configs/multi_teacher.py out of the box (its preparer makes the
  tokenizer, tagged prompts, both teachers and the student), with the
  organisms shrunk to a few steps of one-layer models."""
  from opd_jax.train import train

  _tiny_organisms(monkeypatch)
  c = _load_config("steps=2")
  c.progress_bar, c.batch_size = False, 8  # 2 low + 6 high prompts
  c.evals.low.num_examples = c.evals.high.num_examples = 8
  last = train(c, str(tmp_path / "run"))
  assert last["status"] == "finished" and last["step"] == 2
  assert last["teacher/low/num_tokens"] + last["teacher/high/num_tokens"] == last["num_tokens"]
  assert "eval/high/accuracy" in last and last["teacher/high/on_policy_frac"] == 1.0
  with open(tmp_path / "run" / "config.json") as f:
    saved = json.load(f)
  assert saved["data"]["source_field"] == "source" and not saved["teacher"]["path"]
  assert all(
    os.path.isfile(os.path.join(saved["teachers"][t]["path"], "config.json"))
    for t in ("low", "high")
  )


def test_quickstart_grpo_config_builds():
  """configs/quickstart_grpo.py: opd_grpo on GRPO groups of 4 samples at
  temperature 1, λ = 1, the organisms picked by name (an unknown one is an
  error naming the setting)."""
  c = _load_config("alpha=0.5", file="configs/quickstart_grpo.py")
  assert (c.prepare, c.loss.name, c.loss.alpha, c.loss.reward) == (
    "quickstart_teacher600",
    "opd_grpo",
    0.5,
    "topk",
  )
  assert c.sampling.num_samples == 4 and c.sampling.temperature == 1.0
  assert c.on_policy_fraction == 1.0 and c.eval_teacher
  assert _load_config("organisms=quickstart", file="configs/quickstart_grpo.py").prepare == (
    "quickstart"
  )
  high = _load_config("organisms=multi_teacher_high", file="configs/quickstart_grpo.py")
  assert high.prepare == "multi_teacher_high"
  with pytest.raises(Exception, match="organisms='nope'"):  # absl wraps the ValueError
    _load_config("organisms=nope", file="configs/quickstart_grpo.py")


@pytest.mark.slow
def test_quickstart_grpo_runs_on_multi_teacher_high(tmp_path, monkeypatch):
  """configs/quickstart_grpo.py out of the box on tiny organisms: the
  ``multi_teacher_high`` preparer makes the student and teacher ``high`` only
  (no ``low``) and high-level prompts; the verifier's outcome metrics are
  logged and the teacher is evaluated at the start."""
  from opd_jax.train import train

  _tiny_organisms(monkeypatch)
  c = _load_config(
    "organisms=multi_teacher_high,steps=2,prompts=4", file="configs/quickstart_grpo.py"
  )
  c.progress_bar, c.evals.hard.num_examples = False, 8
  wd = tmp_path / "run"
  last = train(c, str(wd))
  assert last["status"] == "finished" and last["step"] == 2
  assert 0.0 <= last["outcome/reward_mean"] <= 1.0
  assert "eval/hard/accuracy" in last
  assert not os.path.exists(wd / "assets" / "low_sft")
  with open(wd / "config.json") as f:
    saved = json.load(f)
  assert saved["teacher"]["path"] == str(wd / "assets" / "high_sft" / "export_hf")
  with open(saved["data"]["train_files"]) as f:
    assert {json.loads(line)["level"] for line in f} == {3}
  with open(wd / "metrics.jsonl") as f:
    assert any("teacher/eval/hard/accuracy" in json.loads(line) for line in f)
