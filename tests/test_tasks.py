"""Tests for opd_jax.tasks: arithmetic generator / verifier, tokenizer, math."""

from __future__ import annotations

import json
import os
import re
import sys

import pytest

from opd_jax.tasks import TASKS, get_task, read_jsonl
from opd_jax.tasks import arithmetic as ar
from opd_jax.tasks import math as mt
from opd_jax.tasks.tokenizer import SPECIAL_TOKENS, build_tokenizer

LEVELS = tuple(range(1, 7))


@pytest.fixture(scope="module")
def task():
  return get_task("arithmetic")


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("tok")
  build_tokenizer(d)
  return d


@pytest.fixture(scope="module")
def tok(tok_dir):
  # The saved files through the generic fast class (AutoTokenizer is tested
  # once below; it pulls in torch, which is slow to import).
  from transformers import PreTrainedTokenizerFast

  return PreTrainedTokenizerFast.from_pretrained(tok_dir)


def _operands(prompt):
  m = re.fullmatch(r"(\d+)\+(\d+)=", prompt)
  assert m, prompt
  return int(m.group(1)), int(m.group(2))


def _check_steps_a(a, b, completion):
  *steps, ans = completion.split(";")
  carry, digits = 0, []
  for i, step in enumerate(steps):
    x, y, c, s = map(int, re.fullmatch(r"(\d)\+(\d)\+([01])=(\d\d)", step).groups())
    assert (x, y) == ((a // 10**i) % 10, (b // 10**i) % 10)
    assert c == carry and s == x + y + c
    carry = s // 10
    digits.append(s % 10)
  value = sum(d * 10**i for i, d in enumerate(digits)) + carry * 10 ** len(digits)
  assert ans == f"ans={value}"


def _check_steps_b(a, b, completion):
  *steps, ans = completion.split("|")
  carry, digits = 0, []
  for i, step in enumerate(steps):
    m = re.fullmatch(r"([a-z])([01]):(?:(\d)\+(\d))?>(\d)", step)
    assert m and m.group(1) == ar.PLACES[i] and int(m.group(2)) == carry, step
    if m.group(3) is None:  # final carry step
      assert i == len(steps) - 1 and carry == 1 and m.group(5) == "1"
      digits.append(1)
      continue
    y, x, d = int(m.group(3)), int(m.group(4)), int(m.group(5))
    assert (x, y) == ((a // 10**i) % 10, (b // 10**i) % 10)
    assert d == (x + y + carry) % 10
    carry = (x + y + carry) // 10
    digits.append(d)
  assert ans == f"ans={sum(d * 10**i for i, d in enumerate(digits))}"


# ----------------------------------------------------------------------------
# Arithmetic task.


def test_documented_examples():
  assert ar.solve(47, 85, "A") == "7+5+0=12;4+8+1=13;ans=132"
  assert ar.solve(47, 85, "B") == "u0:5+7>2|t1:8+4>3|h1:>1|ans=132"
  assert ar.solve(3, 4, "A") == "3+4+0=07;ans=7"
  assert ar.solve(3, 4, "B") == "u0:4+3>7|ans=7"
  assert ar.prompt_for(47, 85) == "47+85="
  with pytest.raises(ValueError, match="pattern"):
    ar.solve(1, 2, "C")


@pytest.mark.parametrize("pattern", ar.PATTERNS)
@pytest.mark.parametrize("split", ar.SPLITS)
def test_reference_completions_score_one(task, pattern, split):
  examples = task.generate(600, seed=3, levels=LEVELS, pattern=pattern, split=split)
  assert len(examples) == 600
  assert {ex["level"] for ex in examples} == set(LEVELS)
  for ex in examples:
    a, b = _operands(ex["prompt"])
    level = ex["level"]
    lo = 0 if level == 1 else 10 ** (level - 1)
    assert lo <= a < 10**level and lo <= b < 10**level
    assert ex["answer"] == str(a + b)
    assert ex["source"] == f"arithmetic/L{level}"
    assert ex["completion"].endswith("ans=" + ex["answer"])
    assert task.extract_answer(ex["completion"]) == ex["answer"]
    assert task.score(ex, ex["completion"]) == 1.0
    assert task.split_of(ex["prompt"]) == split
    (_check_steps_a if pattern == "A" else _check_steps_b)(a, b, ex["completion"])


def test_edge_operands_steps():
  for a, b in [(0, 0), (9, 9), (999999, 999999), (999999, 1), (100000, 900000), (5, 12345)]:
    _check_steps_a(a, b, ar.solve(a, b, "A"))
    _check_steps_b(a, b, ar.solve(a, b, "B"))


def test_patterns_share_problems_and_differ_from_first_token(task, tok):
  ex_a = task.generate(200, seed=7, pattern="A")
  ex_b = task.generate(200, seed=7, pattern="B")
  assert [e["prompt"] for e in ex_a] == [e["prompt"] for e in ex_b]
  assert [e["answer"] for e in ex_a] == [e["answer"] for e in ex_b]
  for ea, eb in zip(ex_a, ex_b):
    ta = tok(ea["completion"])["input_ids"]
    tb = tok(eb["completion"])["input_ids"]
    assert ta[0] != tb[0]
    assert ea["completion"][0].isdigit() and eb["completion"][0] == "u"


def test_determinism_and_seed_dependence(task):
  a = task.generate(50, seed=11, pattern="B")
  assert a == task.generate(50, seed=11, pattern="B")
  assert [e["prompt"] for e in a] != [e["prompt"] for e in task.generate(50, seed=12)]
  # Levels are drawn from independent streams: a level's problems do not
  # depend on which other levels are requested.
  only3 = {e["prompt"] for e in task.generate(30, seed=5, levels=(3,))}
  mixed = {e["prompt"] for e in task.generate(90, seed=5, levels=(1, 2, 3)) if e["level"] == 3}
  assert only3 == mixed


def test_level_balance_and_unique_prompts(task):
  examples = task.generate(3000, seed=0, levels=(2, 3, 4, 5, 6))
  prompts = [e["prompt"] for e in examples]
  assert len(set(prompts)) == len(prompts)
  counts = {level: sum(e["level"] == level for e in examples) for level in (2, 3, 4, 5, 6)}
  assert set(counts.values()) == {600}
  # Level 1 has ~90 train problems: unique up to that, repeats only beyond.
  small = task.generate(80, seed=0, levels=(1,))
  assert len({e["prompt"] for e in small}) == 80
  pool = sum(task.split_of(ar.prompt_for(a, b)) == "train" for a in range(10) for b in range(10))
  big = task.generate(300, seed=0, levels=(1,))
  assert len({e["prompt"] for e in big}) == pool
  assert len(task.generate(0, seed=0)) == 0


def test_train_eval_disjoint(task):
  train = {e["prompt"] for e in task.generate(4000, seed=0, split="train")}
  for seed in range(3):
    ev = {e["prompt"] for e in task.generate(600, seed=seed, split="eval")}
    assert not train & ev
  # Every level-1/2 problem is in exactly one split; eval share ~ eval_fraction.
  all_l2 = [ar.prompt_for(a, b) for a in range(10, 100) for b in range(10, 100)]
  n_eval = sum(task.split_of(p) == "eval" for p in all_l2)
  assert 0.07 < n_eval / len(all_l2) < 0.13
  ev1 = {e["prompt"] for e in task.generate(100, seed=0, levels=(1,), split="eval")}
  tr1 = {e["prompt"] for e in task.generate(100, seed=0, levels=(1,), split="train")}
  assert not ev1 & tr1 and len(ev1 | tr1) == 100


def test_extract_answer_and_score_robustness(task):
  ex = {"prompt": "47+85=", "answer": "132"}
  assert task.score(ex, "7+5+0=12;4+8+1=13;ans=132") == 1.0
  assert task.score(ex, "ans=132;junk 9+9 ans=7<eos>zz") == 1.0
  assert task.score(ex, "ans=132\n\nxx") == 1.0
  assert task.score(ex, "ans = 132") == 1.0
  assert task.score("132", "u0:5+7>2|ans=132|") == 1.0
  assert task.score(132, "ans=132") == 1.0
  assert task.score(ex, "ans=1320") == 0.0
  assert task.score(ex, "ans=0132") == 0.0
  assert task.score(ex, "ans=131") == 0.0
  assert task.score(ex, "7+5+0=12;4+8+1=13;") == 0.0
  assert task.score(ex, "132") == 0.0
  assert task.score(ex, "") == 0.0
  assert task.score(ex, None) == 0.0
  assert task.extract_answer("ans=12;ans=13") == "12"
  assert task.extract_answer("no answer") is None
  assert task.extract_answer("ans=") is None
  assert task.extract_answer(None) is None


def test_validation_and_registry(task):
  assert "arithmetic" in TASKS and "math" in TASKS
  assert get_task("arithmetic", levels=(1, 2)).levels == (1, 2)
  with pytest.raises(ValueError, match="unknown task"):
    get_task("nope")
  with pytest.raises(ValueError, match="unknown argument"):
    get_task("arithmetic", digits=3)
  with pytest.raises(ValueError, match="pattern"):
    task.generate(3, seed=0, pattern="C")
  with pytest.raises(ValueError, match="split"):
    task.generate(3, seed=0, split="test")
  with pytest.raises(ValueError, match="levels"):
    task.generate(3, seed=0, levels=(0,))


def test_write_jsonl_roundtrip(task, tmp_path):
  examples = task.generate(20, seed=0, pattern="B")
  path = tmp_path / "sub" / "train.jsonl"
  task.write_jsonl(path, examples)
  assert read_jsonl(path) == examples
  first = json.loads(path.read_text().splitlines()[0])
  assert set(first) >= {"prompt", "completion", "answer", "level", "source"}


# ----------------------------------------------------------------------------
# Tokenizer.


def _template_regex(template: str) -> re.Pattern:
  """A step template of ar.PHRASINGS as a regex with named number groups."""
  out, i = "", 0
  for m in re.finditer(r"\{(\w)(:02d)?\}", template):
    out += re.escape(template[i : m.start()])
    out += (
      f"(?P<{m.group(1)}>\\d\\d)"
      if m.group(2)
      else (f"(?P<{m.group(1)}>[a-z])" if m.group(1) == "p" else f"(?P<{m.group(1)}>\\d)")
    )
    i = m.end()
  return re.compile(out + re.escape(template[i:]))


@pytest.mark.parametrize("pattern", ar.PATTERNS)
def test_phrasings_draw_every_template_and_keep_the_arithmetic(pattern):
  """phrasings=4: the problems are those of phrasings=1; every step is one of
  the pattern's templates with the column's digits, carry and sum; all four
  templates occur; the answer line and the first character class (digit in
  A, place letter in B) are unchanged; a seed gives the same completions."""
  plain = ar.ArithmeticTask().generate(300, seed=3, levels=(2, 3, 4), pattern=pattern)
  task = ar.ArithmeticTask(phrasings=4)
  varied = task.generate(300, seed=3, levels=(2, 3, 4), pattern=pattern)
  assert [e["prompt"] for e in varied] == [e["prompt"] for e in plain]
  assert varied == task.generate(300, seed=3, levels=(2, 3, 4), pattern=pattern)
  regexes = [_template_regex(t) for t in ar.PHRASINGS[pattern]]
  used = set()
  for e, e0 in zip(varied, plain):
    a, b = _operands(e["prompt"])
    *steps, ans = e["completion"].split(";" if pattern == "A" else "|")
    assert ans == e0["completion"].split(";" if pattern == "A" else "|")[-1] == f"ans={a + b}"
    assert task.score(e, e["completion"]) == 1.0
    assert e["completion"][0].isdigit() == (pattern == "A")
    carry = 0
    for i, step in enumerate(steps):
      x, y = (a // 10**i) % 10, (b // 10**i) % 10
      if pattern == "B" and i == len(steps) - 1 and carry and x == y == 0 and 10**i > max(a, b):
        finals = [ar._FINAL_CARRY_B[k].format(p=ar.PLACES[i]) for k in range(4)]
        assert step in finals, step
        continue
      hits = [k for k, r in enumerate(regexes) if r.fullmatch(step)]
      assert len(hits) == 1, (step, hits)
      used.add(hits[0])
      g = regexes[hits[0]].fullmatch(step).groupdict()
      s = x + y + carry
      assert (int(g["x"]), int(g["y"]), int(g["c"])) == (x, y, carry), step
      assert int(g.get("s", s)) == s and int(g.get("d", s % 10)) == s % 10, step
      if pattern == "B":
        assert g["p"] == ar.PLACES[i]
      carry = s // 10
  assert used == {0, 1, 2, 3}


def test_phrasings_validation():
  with pytest.raises(ValueError, match=r"phrasings must be in 1\.\.4"):
    ar.ArithmeticTask(phrasings=5)
  with pytest.raises(ValueError, match="pass rng"):
    ar.solve(12, 34, phrasings=2)
  assert get_task("arithmetic", phrasings=2).phrasings == 2
  assert ar.solve(47, 85, "A", phrasings=1) == "7+5+0=12;4+8+1=13;ans=132"


def test_bpe_tokenizer_round_trips_with_single_digit_tokens(tmp_path):
  """A byte-level BPE trained on phrased completions: > 260 tokens (specials
  + bytes + merges), each digit its own token, words merged with their
  leading space, exact round trip on every training text, the saved files
  encode the same; a vocab_size without room for merges is an error."""
  from transformers import PreTrainedTokenizerFast

  from opd_jax.tasks.tokenizer import build_bpe_tokenizer

  task = ar.ArithmeticTask(phrasings=4)
  texts = [
    e["prompt"] + e["completion"]
    for p in ar.PATTERNS
    for e in task.generate(400, seed=0, levels=(1, 2, 3), pattern=p)
  ]
  tok = build_bpe_tokenizer(tmp_path / "bpe", texts, vocab_size=400)
  assert 260 < len(tok) <= 400
  assert [tok.convert_ids_to_tokens(i) for i in range(4)] == list(SPECIAL_TOKENS)
  loaded = PreTrainedTokenizerFast.from_pretrained(tmp_path / "bpe")
  for text in texts[::7]:
    ids = tok.encode(text)
    assert tok.decode(ids) == text and loaded.encode(text) == ids
    pieces = [tok.decode([i]) for i in ids]
    assert all(len(q) == 1 for q in pieces if any(ch.isdigit() for ch in q)), pieces
  assert len(tok.encode(" carry")) == 1 and len(tok.encode(" plus")) == 1
  with pytest.raises(ValueError, match="vocab_size must be > 260"):
    build_bpe_tokenizer(tmp_path / "small", texts, vocab_size=200)


def test_organism_assets_with_phrasings_and_a_bpe_tokenizer(tmp_path):
  """organisms.ensure_task_data(phrasings=3) writes phrased completions (the
  problems of phrasings=1), ensure_tokenizer(bpe_from=...) trains a BPE on
  that file once and loads it back (a second call reuses the files)."""
  from opd_jax import organisms

  plain = organisms.ensure_task_data(str(tmp_path / "a.jsonl"), n=60, seed=1, levels=(2, 3))
  varied = organisms.ensure_task_data(
    str(tmp_path / "b.jsonl"), n=60, seed=1, levels=(2, 3), phrasings=3
  )
  rows0, rows = read_jsonl(plain), read_jsonl(varied)
  assert [r["prompt"] for r in rows] == [r["prompt"] for r in rows0]
  assert any(" plus " in r["completion"] or " with " in r["completion"] for r in rows)
  assert not any(" " in r["completion"] for r in rows0)
  tok_dir = str(tmp_path / "tok")
  tok = organisms.ensure_tokenizer(tok_dir, bpe_from=[varied], vocab_size=300)
  assert (
    260 < len(tok) <= 300 and tok.decode(tok.encode(rows[0]["completion"])) == rows[0]["completion"]
  )
  mtime = os.path.getmtime(os.path.join(tok_dir, "tokenizer.json"))
  again = organisms.ensure_tokenizer(tok_dir, bpe_from=[varied], vocab_size=300)
  assert (
    len(again) == len(tok) and os.path.getmtime(os.path.join(tok_dir, "tokenizer.json")) == mtime
  )


def test_tokenizer_files_and_autoload(tok_dir):
  from transformers import AutoTokenizer

  assert (tok_dir / "tokenizer.json").exists()
  assert (tok_dir / "tokenizer_config.json").exists()
  tok = AutoTokenizer.from_pretrained(tok_dir)
  assert len(tok) < 64
  assert tok.pad_token_id == 0
  assert tok.convert_ids_to_tokens(list(range(4))) == list(SPECIAL_TOKENS)
  assert {tok.bos_token, tok.eos_token, tok.unk_token} == {"<bos>", "<eos>", "<unk>"}
  assert tok.padding_side == "left"
  assert (
    tok.apply_chat_template(
      [{"role": "user", "content": "1+2="}], tokenize=False, add_generation_prompt=True
    )
    == "1+2="
  )


def test_tokenizer_round_trip(task, tok):
  for pattern in ar.PATTERNS:
    for ex in task.generate(120, seed=1, pattern=pattern):
      text = ex["prompt"] + ex["completion"]
      ids = tok(text)["input_ids"]
      assert len(ids) == len(text)  # one token per character
      assert tok.unk_token_id not in ids
      assert tok.decode(ids) == text
      assert tok.decode(ids + [tok.eos_token_id], skip_special_tokens=True) == text
  odd = "a  b\n\n c|;:>"
  assert tok.decode(tok(odd)["input_ids"]) == odd
  batch = tok(["1+2=", "10+20="], padding=True)
  assert batch["input_ids"][0][:2] == [0, 0] and batch["attention_mask"][0][:2] == [0, 0]


def test_tokenizer_custom_alphabet(tmp_path):
  tok = build_tokenizer(tmp_path, alphabet="0123456789+=")
  assert len(tok) == 4 + 12
  assert tok.decode(tok("12+3=")["input_ids"]) == "12+3="
  assert tok("x")["input_ids"] == [tok.unk_token_id]


def test_chat_template(tok):
  msgs = [{"role": "user", "content": "47+85="}]
  text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
  assert text == "47+85="
  ids = tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True)
  ids = ids["input_ids"] if not isinstance(ids, list) else ids
  assert list(ids) == tok("47+85=", add_special_tokens=False)["input_ids"]


# ----------------------------------------------------------------------------
# Math verifier.


def test_extract_boxed():
  eb = mt.extract_boxed
  assert eb(r"so \boxed{42}.") == "42"
  assert eb(r"\boxed{1} then \boxed{\frac{1}{2}}") == r"\frac{1}{2}"
  assert eb(r"\boxed{\frac{\sqrt{a^{2}}}{b_{1}}} end") == r"\frac{\sqrt{a^{2}}}{b_{1}}"
  assert eb(r"\fbox{7}") == "7"
  assert eb(r"\boxed{3} and \fbox{4}") == "4"
  assert eb(r"\fbox{4} and \boxed {5}") == "5"
  assert eb(r"$\boxed 9$") == "9"
  assert eb(r"\boxed{unbalanced") is None
  assert eb(r"\boxed{2} \boxed{unbalanced") == "2"
  assert eb("no box") is None
  assert eb(None) is None and eb("") is None
  assert mt.MathTask().extract_answer(r"x \boxed{\{1,2\}}") == r"\{1,2\}"


def test_math_verify_scoring():
  import math_verify  # noqa: F401  (the test extra installs it; no silent skip)

  task = get_task("math")
  assert task.score(r"\frac{1}{2}", r"The answer is \boxed{0.5}.") == 1.0
  assert task.score({"answer": "0.5"}, r"so \boxed{\frac{1}{2}}") == 1.0
  assert task.score("3", r"\boxed{4}") == 0.0
  assert task.score("3", "") == 0.0
  assert task.score("3", None) == 0.0
  assert mt.score(r"\sqrt{2}", r"\boxed{\sqrt 2}") == 1.0
  with pytest.raises(NotImplementedError):
    task.generate(1, seed=0)


def test_math_missing_package_raises(monkeypatch):
  monkeypatch.setitem(sys.modules, "math_verify", None)
  with pytest.raises(ImportError, match=r"opd_jax\[math\]"):
    get_task("math").score("1", r"\boxed{1}")
