"""Tokenizers for the synthetic tasks, built locally (no downloads).

:func:`build_tokenizer`: character level.

Every character of the alphabet is one token (a ``WordLevel`` model over single
characters, split with a one-character regex and re-joined by a ``Fuse``
decoder), so encode / decode round-trips exactly. Special tokens: ``<pad>``
(id 0), ``<bos>``, ``<eos>``, ``<unk>``. No special tokens are added on encode
(like Qwen); the chat template renders the user turns' text as is.

:func:`build_bpe_tokenizer`: a byte-level BPE trained on the task's own text,
pre-tokenized the way Qwen's is in the parts that matter here: every digit is
its own token, words and punctuation runs are merged, spaces attach to the
following word (GPT-2 / Qwen byte level). The 256 byte symbols are always in
the vocabulary, so any text encodes and decodes exactly.
"""

from __future__ import annotations

import json
import os
import string
from collections.abc import Iterable

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")
# Digits, lowercase letters and the punctuation of both arithmetic patterns.
DEFAULT_ALPHABET = string.digits + string.ascii_lowercase + " \n+-*=;:|,.>()?"
# Concatenates the user (and system / assistant) turns; adds nothing else.
CHAT_TEMPLATE = "{% for message in messages %}{{ message['content'] }}{% endfor %}"


def build_tokenizer(
  out_dir: str | os.PathLike, alphabet: str | None = None, *, model_max_length: int = 4096
):
  """Builds, saves (``save_pretrained(out_dir)``) and returns the tokenizer.

  Args:
    out_dir: directory for ``tokenizer.json`` / ``tokenizer_config.json``.
    alphabet: characters of the vocabulary (default :data:`DEFAULT_ALPHABET`);
      duplicates are dropped, order kept. Ids: specials 0..3, then alphabet.
    model_max_length: recorded in the tokenizer config.

  Returns:
    A ``transformers.PreTrainedTokenizerFast``.
  """
  # pylint: disable=import-outside-toplevel
  from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

  chars = list(dict.fromkeys(DEFAULT_ALPHABET if alphabet is None else alphabet))
  if not chars:
    raise ValueError("alphabet must not be empty")
  bad = [c for c in chars if len(c) != 1]
  if bad:
    raise ValueError(f"alphabet entries must be single characters, got {bad}")
  vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
  for c in chars:
    vocab[c] = len(vocab)

  tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
  tok.decoder = decoders.Fuse()
  tok.add_special_tokens(list(SPECIAL_TOKENS))

  return _save(tok, out_dir, model_max_length)


def build_bpe_tokenizer(
  out_dir: str | os.PathLike,
  texts: Iterable[str],
  *,
  vocab_size: int = 512,
  model_max_length: int = 4096,
):
  """Trains a byte-level BPE on ``texts``, saves and returns it.

  Args:
    out_dir: directory for ``tokenizer.json`` / ``tokenizer_config.json``.
    texts: training text (e.g. the task's prompts and completions).
    vocab_size: target size including the 4 specials and the 256 byte
      symbols (so > 260); training stops early when no pair repeats.
    model_max_length: recorded in the tokenizer config.

  Returns:
    A ``transformers.PreTrainedTokenizerFast`` (specials at ids 0..3).
  """
  # pylint: disable=import-outside-toplevel
  from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

  floor = len(SPECIAL_TOKENS) + 256
  if vocab_size <= floor:
    raise ValueError(f"vocab_size must be > {floor} (specials + 256 bytes), got {vocab_size}")
  tok = Tokenizer(models.BPE(unk_token=None))
  tok.pre_tokenizer = pre_tokenizers.Sequence(
    [
      pre_tokenizers.Split(Regex(r"\d"), behavior="isolated"),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ]
  )
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
    vocab_size=vocab_size,
    special_tokens=list(SPECIAL_TOKENS),
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    show_progress=False,
  )
  tok.train_from_iterator(texts, trainer=trainer)
  return _save(tok, out_dir, model_max_length)


def _save(tok, out_dir: str | os.PathLike, model_max_length: int):
  """Wraps a ``tokenizers.Tokenizer`` as a fast HF tokenizer, saves it with
  ``save_pretrained(out_dir)`` and returns it."""
  from transformers import PreTrainedTokenizerFast  # pylint: disable=import-outside-toplevel

  fast = PreTrainedTokenizerFast(
    tokenizer_object=tok,
    pad_token="<pad>",
    bos_token="<bos>",
    eos_token="<eos>",
    unk_token="<unk>",
    model_max_length=model_max_length,
    padding_side="left",
    clean_up_tokenization_spaces=False,
  )
  fast.chat_template = CHAT_TEMPLATE
  os.makedirs(os.fspath(out_dir), exist_ok=True)
  fast.save_pretrained(os.fspath(out_dir))
  # transformers 5 records its own backend class name; the generic name loads
  # under transformers 4 and 5 alike.
  config_path = os.path.join(os.fspath(out_dir), "tokenizer_config.json")
  with open(config_path, encoding="utf-8") as f:
    config = json.load(f)
  config["tokenizer_class"] = "PreTrainedTokenizerFast"
  with open(config_path, "w", encoding="utf-8") as f:
    json.dump(config, f, indent=2, ensure_ascii=False)
  return fast
