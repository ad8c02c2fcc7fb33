"""Multi-teacher OPD (MOPD): ``config.teachers.<name>`` and the routing of
rows to teachers by the data's source.

    config.teachers.math = configs_lib.teacher_config(path, sources="gsm8k,math")
    config.teachers.chat = configs_lib.teacher_config(path, default=True)

A record's source is its ``data.source_field`` value (or its file's stem, see
``data.files.source_from_path``). Teacher k takes the sources it lists
(``sources``, a comma list) and the default teacher (``default=True``, at most
one) every source no teacher lists. Each global batch holds a FIXED number of
prompts per teacher, q_k, in teacher name order (contiguous rows; the data pipeline's
``groups``): with ``data.mixture``, q_k = B·W_k/ΣW (W_k: the mixture weights of
teacher k's sources), else B/K. The step (``opd_step.OPDConfig.teachers``)
slices those static row ranges, and each teacher scores only its own rows.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from opd_jax import configs_lib

# Keys of config.teachers.<name> besides the model knobs of config.teacher.
ROUTING_KEYS = ("sources", "default")


@dataclasses.dataclass(frozen=True)
class TeacherSpec:
  """One entry of ``config.teachers`` (``name`` is its key)."""

  name: str
  path: str
  sources: tuple[str, ...]  # the sources it lists
  default: bool  # takes every source no teacher lists
  rows: int  # prompts per global batch (q_k)
  model: tuple[tuple[str, Any], ...]  # models.from_hf / hf_io.config_from_hf keywords


def _split(sources: Any) -> tuple[str, ...]:
  if isinstance(sources, str):
    return tuple(s.strip() for s in sources.split(",") if s.strip())
  return tuple(str(s).strip() for s in sources or () if str(s).strip())


def teacher_specs(config, model_kwargs: Callable[[Any], dict]) -> tuple[TeacherSpec, ...]:
  """``config.teachers`` -> one :class:`TeacherSpec` per teacher, in name
  order (a ConfigDict's; () when none: the single ``config.teacher``), with its prompts per
  batch from :func:`quotas`. ``model_kwargs``: the driver's reader of a model
  node's knobs. ValueError naming the setting for: ``config.teacher.path`` set
  as well, an empty path, a teacher with no sources that is not the default,
  two defaults, a source listed twice, a cold start, mixture schedules, or
  quotas that do not divide the batch."""
  teachers = config.get("teachers")
  if teachers is None or not len(teachers):
    return ()
  if config.teacher.path:
    raise ValueError(
      "config.teacher.path and config.teachers are both set: a multi-teacher run names "
      "each teacher in config.teachers.<name> (leave config.teacher.path empty)"
    )
  if int(config.cold_start.steps) > 0:
    raise ValueError("config.cold_start.steps > 0 is not supported with config.teachers")
  if "data.mixture." in str(config.get("schedules", "")):
    raise ValueError(
      "config.schedules on data.mixture.<source> cannot be combined with config.teachers "
      "(each teacher's rows per batch are fixed)"
    )
  owner: dict[str, str] = {}
  defaults, partial = [], []
  for name, node in teachers.items():
    key = f"config.teachers.{name}"
    if not str(node.get("path", "")):
      raise ValueError(f"{key}.path is empty")
    sources = _split(node.get("sources", ""))
    default = bool(node.get("default", False))
    if not sources and not default:
      raise ValueError(f"{key}: no sources and not the default teacher (set {key}.sources)")
    for s in sources:
      if s in owner:
        raise ValueError(f"{key}.sources: source {s!r} is listed by teacher {owner[s]!r} too")
      owner[s] = name
    if default:
      defaults.append(name)
    knobs = configs_lib.model_config().to_dict()  # config.teacher's knobs and defaults
    unknown = sorted(set(node) - set(knobs) - set(ROUTING_KEYS))
    if unknown:
      raise ValueError(
        f"{key}: unknown setting(s) {unknown}; valid: {sorted(set(knobs) | set(ROUTING_KEYS))}"
      )
    model = {**knobs, **{k: v for k, v in node.items() if k in knobs and k != "path"}}
    partial.append((name, str(node.path), sources, default, model))
  if len(defaults) > 1:
    raise ValueError(f"config.teachers: more than one default teacher {defaults}")
  mixture = config.data.mixture.to_dict() if len(config.data.mixture) else None
  specs = [
    TeacherSpec(name, path, sources, default, 0, tuple(sorted(model_kwargs(_Node(m)).items())))
    for name, path, sources, default, m in partial
  ]
  rows = quotas(specs, int(config.batch_size), mixture)
  return tuple(dataclasses.replace(s, rows=q) for s, q in zip(specs, rows))


class _Node(dict):
  """A teacher node's model knobs, readable as attributes (``model_kwargs``)."""

  __getattr__ = dict.__getitem__


def default_teacher(specs: Sequence[TeacherSpec]) -> str | None:
  return next((s.name for s in specs if s.default), None)


def quotas(
  specs: Sequence[TeacherSpec], batch_size: int, mixture: Mapping[str, float] | None
) -> tuple[int, ...]:
  """Prompts per global batch of each teacher: B·W_k/ΣW with the mixture
  weights W_k of its sources (the default's: the mixture's unlisted sources),
  else B/K. ValueError when a mixture source goes to no teacher, a teacher gets
  no weight, or a quota is not a whole number of prompts."""
  k = len(specs)
  if mixture is None:
    if batch_size % k:
      raise ValueError(
        f"config.batch_size={batch_size} must be a multiple of the {k} teachers "
        "(equal prompts per teacher without config.data.mixture)"
      )
    return (batch_size // k,) * k
  listed = {s: spec.name for spec in specs for s in spec.sources}
  default = default_teacher(specs)
  weight = dict.fromkeys((s.name for s in specs), 0.0)
  for source, w in mixture.items():
    name = listed.get(source, default)
    if name is None:
      raise ValueError(
        f"config.data.mixture source {source!r} goes to no teacher: list it in a "
        "config.teachers.<name>.sources or set config.teachers.<name>.default=True"
      )
    weight[name] += float(w)
  total = sum(weight.values())
  out = []
  for name, w in weight.items():
    q = batch_size * w / total if total > 0 else 0.0
    if w <= 0:
      raise ValueError(f"config.teachers.{name}: none of its sources is in config.data.mixture")
    if abs(q - round(q)) > 1e-6 or round(q) < 1:
      raise ValueError(
        f"config.teachers.{name}: its mixture share {w:g}/{total:g} of config.batch_size="
        f"{batch_size} is {q:g} prompts, not a whole number >= 1 (each teacher's rows per "
        "batch are fixed: choose weights / batch size that divide)"
      )
    out.append(int(round(q)))
  return tuple(out)


def groups(
  specs: Sequence[TeacherSpec],
  source_names: Sequence[str],
  mixture: Mapping[str, float] | None = None,
) -> list[tuple[tuple[str, ...], int]]:
  """The data pipeline's ``groups`` (``PromptData.iterator``): each teacher's
  sources present in the data (the mixture's, with one) and its rows.
  ValueError for a listed source not in the data, a used source no teacher
  takes, or a teacher left without records."""
  names = set(source_names)
  used = set(mixture) if mixture is not None else names
  listed = {s for spec in specs for s in spec.sources}
  default = default_teacher(specs)
  for spec in specs:
    missing = sorted(set(spec.sources) - names)
    if missing:
      raise ValueError(
        f"config.teachers.{spec.name}.sources: {missing} not in the data "
        f"(sources: {sorted(names)}; config.data.source_field / file stems)"
      )
  unrouted = sorted(used - listed)
  if unrouted and default is None:
    raise ValueError(
      f"data sources {unrouted} go to no teacher: list them in a "
      "config.teachers.<name>.sources or set config.teachers.<name>.default=True"
    )
  out = []
  for spec in specs:
    mine = set(spec.sources) | (set(unrouted) if spec.default else set())
    mine = tuple(sorted(mine & used))
    if not mine:
      raise ValueError(
        f"config.teachers.{spec.name}: no record of the data goes to it (sources: {sorted(used)})"
      )
    out.append((mine, spec.rows))
  return out


def model_config(spec: TeacherSpec, num_layers: int = 0):
  """The teacher's ``ModelConfig`` from its ``config.json`` (see
  ``train.model_config_of``)."""
  from opd_jax.models.hf_io import config_from_hf

  cfg = config_from_hf(spec.path, **dict(spec.model))
  return dataclasses.replace(cfg, num_layers=int(num_layers)) if num_layers else cfg


def load(spec: TeacherSpec, sharder):
  """The teacher's weights (``models.from_hf``) on the sharder's mesh."""
  from opd_jax.models import from_hf

  return from_hf(spec.path, mesh=sharder.mesh, rules=sharder.rules, **dict(spec.model))


def check_models(
  specs: Sequence[TeacherSpec],
  student_cfg,
  teacher_cfgs: Sequence[Any],
  *,
  prompt_len: int,
  new_tokens: int,
  tokenizer_size: int | None = None,
) -> int:
  """Each teacher fits ``prompt_len + new_tokens`` positions and shares the
  student's vocabulary (``opd_step.common_vocab_size``), all the same one;
  returns it. ValueError naming the teacher otherwise."""
  from opd_jax.opd_step import common_vocab_size

  vocabs = {}
  for spec, cfg in zip(specs, teacher_cfgs):
    key = f"config.teachers.{spec.name}"
    if prompt_len + new_tokens > cfg.max_position_embeddings:
      raise ValueError(
        f"config.data.max_prompt_len ({prompt_len}) + config.sampling.max_new_tokens "
        f"({new_tokens}) = {prompt_len + new_tokens} exceeds {key}'s "
        f"max_position_embeddings {cfg.max_position_embeddings} ({spec.path})"
      )
    try:
      vocabs[spec.name] = common_vocab_size(student_cfg, cfg, tokenizer_size)
    except ValueError as e:
      raise ValueError(f"{key} ({spec.path}): {e}") from None
  if len(set(vocabs.values())) > 1:
    raise ValueError(f"config.teachers: mismatched vocabularies {vocabs} (student and teachers)")
  return next(iter(vocabs.values()))
