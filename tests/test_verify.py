"""In-step verifiers (opd_jax.tasks.verify) against the task's host scoring."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from opd_jax.tasks import get_task
from opd_jax.tasks.arithmetic import solve
from opd_jax.tasks.tokenizer import DEFAULT_ALPHABET, build_tokenizer
from opd_jax.tasks.verify import (
  ArithmeticVerifier,
  HostVerifier,
  encode_answers,
  make_verifier,
)

N, A = 40, 8


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  return build_tokenizer(tmp_path_factory.mktemp("tok"))


def _completions(tok, seed=0):
  """(texts-as-ids, answers): right, wrong, malformed and random rows."""
  rng = np.random.default_rng(seed)
  task = get_task("arithmetic")
  rows, answers = [], []
  specials = [tok.convert_tokens_to_ids(t) for t in ("<pad>", "<bos>", "<eos>", "<unk>")]
  enc = lambda text: tok.encode(text, add_special_tokens=False)
  for ex in task.generate(60, seed=seed, levels=(1, 2, 3)):
    a, b = (int(x) for x in ex["prompt"][:-1].split("+"))
    right = solve(a, b, ex["pattern"] if rng.random() < 0.5 else "B")
    total = a + b
    variants = [
      right,
      right.replace(f"ans={total}", f"ans={total + 1}"),
      f"ans = {total}",
      f"ans=\n{total};x",
      f"ans=0{total}",
      f"ans=-{total}",
      f"ans={total}5",
      f"xans=ans={total}",
      f"ans=;ans={total}",
      f"ans{total}",
      f"an s={total}",
      "ans=",
      "",
      f"ans={total}"[: rng.integers(1, 6)],
    ]
    for text in variants:
      ids = enc(text)
      if rng.random() < 0.3 and ids:  # a special token somewhere inside
        ids.insert(int(rng.integers(0, len(ids) + 1)), int(rng.choice(specials)))
      rows.append(ids[:N])
      answers.append(ex["answer"])
  alphabet = list("ans=-0123456789 \n;") + list(DEFAULT_ALPHABET)
  for _ in range(200):  # random strings biased towards the answer syntax
    text = "".join(rng.choice(alphabet, size=int(rng.integers(0, 20))))
    rows.append(enc(text)[:N])
    answers.append(str(int(rng.integers(0, 30))))
  for _ in range(100):  # random token ids, specials included
    rows.append([int(x) for x in rng.integers(0, len(tok), size=int(rng.integers(0, N)))])
    answers.append(str(int(rng.integers(0, 10))))
  tokens = np.zeros((len(rows), N), np.int32)
  mask = np.zeros((len(rows), N), bool)
  for i, ids in enumerate(rows):
    tokens[i, : len(ids)] = ids
    mask[i, : len(ids)] = True
  tokens[~mask] = rng.integers(0, len(tok), size=int((~mask).sum()))  # junk past the end
  return tokens, mask, answers


def test_jax_arithmetic_verifier_agrees_with_host_score(tok):
  """The JAX parse of ``ans=`` equals ArithmeticTask.score on the decoded
  completion (special tokens skipped) for right, wrong, malformed and random
  completions; the pure_callback verifier too, under jit."""
  task = get_task("arithmetic")
  tokens, mask, answers = _completions(tok)
  answer_ids = encode_answers(answers, tok, A)
  want = np.array(
    [
      task.score(ans, tok.decode([int(x) for x in t[m]], skip_special_tokens=True))
      for t, m, ans in zip(tokens, mask, answers)
    ],
    np.float32,
  )
  assert 0.05 < want.mean() < 0.5  # both outcomes are well represented
  verifier = make_verifier(task, tok)
  assert isinstance(verifier, ArithmeticVerifier)
  got = jax.jit(verifier)(jnp.asarray(tokens), jnp.asarray(mask), jnp.asarray(answer_ids))
  np.testing.assert_array_equal(np.asarray(got), want)
  host = jax.jit(HostVerifier(task, tok))(
    jnp.asarray(tokens), jnp.asarray(mask), jnp.asarray(answer_ids)
  )
  np.testing.assert_array_equal(np.asarray(host), want)


def test_verifier_set_up_errors(tok, tmp_path):
  with pytest.raises(ValueError, match="answer width"):
    encode_answers(["123456789"], tok, 4)
  assert (encode_answers([None], tok, 3) == -1).all()
  digits_only = build_tokenizer(tmp_path, alphabet="0123456789+=")
  with pytest.raises(ValueError, match="character-level"):
    ArithmeticVerifier.from_tokenizer(digits_only)
  assert isinstance(make_verifier(get_task("arithmetic"), digits_only), HostVerifier)
  assert isinstance(make_verifier(get_task("math"), tok), HostVerifier)
