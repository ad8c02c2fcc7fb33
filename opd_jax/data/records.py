"""The options of a prompt set and the validation / rendering of one record."""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class DataOptions:
  """How records become fixed-shape arrays (:meth:`PromptData.build`).

  Attributes:
    max_prompt_len: prompt length P; prompts are left-padded to it.
    max_completion_len: completion length N (required with a
      ``completion_field``); longer completions are truncated.
    prompt_field: string prompt, or a list of ``{role, content}`` messages
      rendered with the chat template (``add_generation_prompt=True``).
    completion_field: optional off-policy completion (e.g. teacher rollout).
    answer_field: optional reference answer kept for evaluation lookups.
    source_field: optional data-source name; defaults to the file stem.
    use_chat_template: also wrap plain string prompts as one user message.
    add_special_tokens: passed to the tokenizer for plain (non-chat)
      prompts; chat-rendered prompts never get extra special tokens.
    append_eos: append EOS to completions when it fits in N.
    overlong: ``"drop"`` or ``"truncate"`` (keep the last P tokens).
    on_error: ``"raise"`` (ValueError naming ``file:line``) or ``"skip"``.
  """

  max_prompt_len: int
  max_completion_len: int | None = None
  prompt_field: str = "prompt"
  completion_field: str | None = None
  answer_field: str | None = "answer"
  source_field: str | None = None
  use_chat_template: bool = False
  add_special_tokens: bool = True
  append_eos: bool = True
  overlong: str = "drop"
  on_error: str = "raise"


def data_options(options: DataOptions | None = None, **kwargs: Any) -> DataOptions:
  """``options`` with ``kwargs`` (fields of :class:`DataOptions`) replaced."""
  if options is None:
    return DataOptions(**kwargs)
  return dataclasses.replace(options, **kwargs) if kwargs else options


@dataclasses.dataclass(frozen=True)
class FieldSpec:
  prompt_field: str
  completion_field: str | None
  answer_field: str | None
  source_field: str | None
  use_chat_template: bool


def _check_messages(messages: list[Any]) -> str | None:
  if not messages:
    return "empty message list"
  for i, m in enumerate(messages):
    if not isinstance(m, dict):
      return f"message {i} is a {type(m).__name__}, expected an object"
    for key in ("role", "content"):
      if not isinstance(m.get(key), str):
        return f"message {i} needs a string {key!r}"
  return None


def parse_record(
  record: dict[str, Any], spec: FieldSpec, default_source: str
) -> tuple[dict[str, Any] | None, str | None]:
  """Returns ``(parsed, None)`` or ``(None, error message)``."""
  prompt = record.get(spec.prompt_field)
  if prompt is None:
    return None, f"missing field {spec.prompt_field!r}"
  if isinstance(prompt, str):
    if not prompt:
      return None, f"field {spec.prompt_field!r} is empty"
    messages = [{"role": "user", "content": prompt}]
    if not spec.use_chat_template:
      messages = None
  elif isinstance(prompt, list):
    error = _check_messages(prompt)
    if error is not None:
      return None, f"field {spec.prompt_field!r}: {error}"
    messages = [{"role": m["role"], "content": m["content"]} for m in prompt]
  else:
    return None, (
      f"field {spec.prompt_field!r} must be a string or a list of messages, "
      f"got {type(prompt).__name__}"
    )
  parsed = {
    "prompt": prompt if messages is None else None,
    "messages": messages,
    "completion": None,
    "answer": None,
    "source": default_source,
  }
  if spec.completion_field is not None:
    completion = record.get(spec.completion_field)
    if completion is None:
      return None, f"missing field {spec.completion_field!r}"
    if not isinstance(completion, str):
      return None, (
        f"field {spec.completion_field!r} must be a string, got {type(completion).__name__}"
      )
    parsed["completion"] = completion
  if spec.answer_field is not None:
    parsed["answer"] = record.get(spec.answer_field)
  if spec.source_field is not None:
    source = record.get(spec.source_field)
    if source is None:
      return None, f"missing field {spec.source_field!r}"
    if not isinstance(source, str):
      return None, (f"field {spec.source_field!r} must be a string, got {type(source).__name__}")
    parsed["source"] = source
  return parsed, None
