"""Name -> callable registries (big_vision style) with clear errors.

``config.loss.name = "jsd"`` with kwargs beside it resolves through
:meth:`Registry.build`, which rejects unknown names and unknown keyword
arguments with the list of valid ones.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping
from typing import Any


class Registry:
  """A named table of factories / functions.

  ``Registry("loss", needs_teacher=True)`` declares per-entry facts with
  their defaults; an entry states its own at registration
  (``@LOSSES.register("sft", needs_teacher=False)``), read back with
  :meth:`info`.
  """

  def __init__(self, kind: str, **info_defaults: Any):
    self.kind = kind
    self._items: dict[str, Callable[..., Any]] = {}
    self._defaults = dict(info_defaults)
    self._info: dict[str, dict[str, Any]] = {}

  def register(self, name: str | None = None, **info: Any):
    bad = sorted(set(info) - set(self._defaults))
    if bad:
      raise ValueError(
        f"{self.kind} registration got unknown fact(s) {bad}; valid: {sorted(self._defaults)}"
      )

    def deco(fn):
      key = name or fn.__name__
      if key in self._items:
        raise ValueError(f"{self.kind} {key!r} registered twice")
      self._items[key] = fn
      self._info[key] = {**self._defaults, **info}
      return fn

    return deco

  def info(self, name: str) -> dict[str, Any]:
    """The facts ``name`` declared at registration (ValueError if unknown)."""
    self.get(name)
    return dict(self._info[name])

  def names(self) -> list[str]:
    return sorted(self._items)

  def __contains__(self, name: str) -> bool:
    return name in self._items

  def get(self, name: str) -> Callable[..., Any]:
    if name not in self._items:
      raise ValueError(
        f"unknown {self.kind} {name!r}; valid {self.kind}s: {', '.join(self.names())}"
      )
    return self._items[name]

  def valid_kwargs(self, name: str, exclude: tuple[str, ...] = ()) -> list[str]:
    return [k for k in self.keyword_defaults(name) if k not in exclude]

  def keyword_defaults(self, name: str) -> dict[str, Any]:
    """``name``'s keyword-only arguments with their defaults (what unset
    config keys mean)."""
    sig = inspect.signature(self.get(name))
    return {p.name: p.default for p in sig.parameters.values() if p.kind == p.KEYWORD_ONLY}

  def check_kwargs(
    self, name: str, kwargs: Mapping[str, Any], exclude: tuple[str, ...] = ()
  ) -> dict[str, Any]:
    valid = self.valid_kwargs(name, exclude)
    bad = sorted(set(kwargs) - set(valid))
    if bad:
      raise ValueError(f"{self.kind} {name!r} got unknown argument(s) {bad}; valid: {valid}")
    return dict(kwargs)

  def build(
    self, name: str, kwargs: Mapping[str, Any] | None = None, exclude: tuple[str, ...] = ()
  ) -> Callable[..., Any]:
    """``get(name)`` with keyword-only ``kwargs`` bound (validated)."""
    kwargs = self.check_kwargs(name, kwargs or {}, exclude)
    return functools.partial(self.get(name), **kwargs)
