"""No import cycle in ``opd_jax/``: a static scan of every ``import`` (those
inside functions included) between the package's modules, and the library
never imports the driver or the experiments."""

from __future__ import annotations

import ast
import os

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "opd_jax")


def _modules() -> dict[str, str]:
  """``{dotted name: path}`` of every module of ``opd_jax``."""
  out = {}
  for dirpath, _, files in os.walk(ROOT):
    for f in files:
      if f.endswith(".py"):
        rel = os.path.relpath(os.path.join(dirpath, f), os.path.dirname(ROOT))[:-3]
        parts = rel.split(os.sep)
        if parts[-1] == "__init__":
          parts = parts[:-1]
        out[".".join(parts)] = os.path.join(dirpath, f)
  return out


def import_graph() -> dict[str, set[str]]:
  """Module -> the ``opd_jax`` modules it imports (anywhere in the file).

  ``import a.b.c`` and ``from a.b import c`` run the packages above the
  target too; a module's own ancestor packages are left out (running a
  package's ``__init__`` before its submodule is how Python imports).
  """
  mods = _modules()
  graph = {}
  for name, path in mods.items():
    with open(path) as f:
      tree = ast.parse(f.read(), path)
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(tree):
      if isinstance(node, ast.Import):
        targets.update(a.name for a in node.names)
      elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
          up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
          base = ".".join(up + ([base] if base else []))
        targets.add(base)
        targets.update(f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in mods)
    ancestors = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
    edges = set()
    for t in targets:
      parts = t.split(".")
      for i in range(1, len(parts) + 1):
        m = ".".join(parts[:i])
        if m in mods and m not in ancestors and m != name:
          edges.add(m)
    graph[name] = edges
  return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """One import cycle as a list of modules (first == last), or None."""
  state: dict[str, int] = {}
  stack: list[str] = []

  def visit(m):
    state[m] = 1
    stack.append(m)
    for n in sorted(graph.get(m, ())):
      if state.get(n) == 1:
        return stack[stack.index(n) :] + [n]
      if n not in state:
        found = visit(n)
        if found:
          return found
    stack.pop()
    state[m] = 2
    return None

  for m in sorted(graph):
    if m not in state:
      found = visit(m)
      if found:
        return found
  return None


def test_find_cycle_finds_one():
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle_in_opd_jax():
  graph = import_graph()
  assert "opd_jax.train" in graph and "opd_jax.organisms" in graph["opd_jax.train"]
  assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_library_does_not_import_the_driver():
  graph = import_graph()
  users = sorted(m for m, edges in graph.items() if "opd_jax.train" in edges)
  assert users == ["opd_jax.aot", "opd_jax.vmap_sweep"], users  # the drivers built on build_run
