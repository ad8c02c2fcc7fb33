"""Tokenising helpers of the prompt set."""

from __future__ import annotations


def encode(tokenizer, texts: list[str], add_special_tokens: bool):
  if not texts:
    return []
  return list(tokenizer(texts, add_special_tokens=add_special_tokens)["input_ids"])


def pad_id_of(tokenizer) -> int:
  for pid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
    if pid is not None:
      return int(pid)
  raise ValueError("Tokenizer has neither a pad token nor an EOS token.")
