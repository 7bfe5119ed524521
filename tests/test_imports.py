"""The import graph of ``python/lora_da``, read from the source (no module is run).

Two rules hold for every module, lazy (function-level) imports included:

* no import circle: a module that needs another one below it never needs, even
  inside a function, a module that needs it back;
* no module imports another module's private (``_name``) names: what a module
  shares is its public face.

An import of ``pkg.sub`` runs ``pkg/__init__.py`` first, so it is counted as an
import of ``pkg`` too — except from a module inside ``pkg``, whose own import
already ran that ``__init__``. ``from pkg import name`` depends on ``pkg.name``
when that is a module, else on ``pkg/__init__.py`` (from inside ``pkg`` too: the
name is only there once that ``__init__`` has run).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "python" / "lora_da"
ROOT = "lora_da"

# Circles and private imports that are allowed: none. A new one is a design
# decision to be made here, in review, not in the module that needs it.
KNOWN_CIRCLES: set[frozenset[str]] = set()
KNOWN_PRIVATE: set[tuple[str, str]] = set()


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _parents(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _imports(name: str) -> list[tuple[str, list[str], int]]:
    """``(module imported, names taken from it, line)`` for each import statement of ``name``."""
    tree = ast.parse(MODULES[name].read_text(encoding="utf-8"), filename=str(MODULES[name]))
    package = name if _is_package(name) else name.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, [], node.lineno) for a in node.names if a.name.split(".")[0] == ROOT]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] == ROOT:
                found.append((target, [a.name for a in node.names], node.lineno))
    return found


def _edges(name: str) -> set[str]:
    """The modules ``name`` makes Python run, by the rules in the module docstring."""
    out: set[str] = set()
    for target, names, _ in _imports(name):
        hit = []
        for n in names:
            if f"{target}.{n}" in MODULES:
                hit.append(f"{target}.{n}")
            elif target in MODULES:
                hit.append(target)
        if not names and target in MODULES:
            hit.append(target)
        for mod in hit:
            if mod != name:
                out.add(mod)
            # the packages above it, run first, unless the importer is inside them
            out.update(m for m in _parents(mod) if m in MODULES and not name.startswith(m + "."))
    return out


def _graph() -> dict[str, set[str]]:
    return {name: _edges(name) for name in MODULES}


def _circles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    comps = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(frozenset(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return comps


def test_the_walk_sees_the_package():
    assert {"lora_da", "lora_da.cli", "lora_da.errors", "lora_da.report"} <= set(MODULES)
    graph = _graph()
    assert "lora_da.errors" in graph["lora_da.cli.parser"] | graph["lora_da.cli.commands"]
    assert "lora_da.data" in graph["lora_da.compare.tasks"]


def test_no_import_circle():
    circles = _circles(_graph())
    unexpected = [sorted(c) for c in circles if c not in KNOWN_CIRCLES]
    assert not unexpected, f"import circles: {unexpected}"


def test_no_module_imports_private_names():
    bad = []
    for name in MODULES:
        for target, names, line in _imports(name):
            for n in names:
                if (n.startswith("_") and not (n.startswith("__") and n.endswith("__"))
                        and f"{target}.{n}" not in MODULES and (name, f"{target}.{n}") not in KNOWN_PRIVATE):
                    bad.append(f"{MODULES[name].relative_to(PACKAGE.parent)}:{line}: {target}.{n}")
    assert not bad, "private names imported from another module:\n" + "\n".join(bad)


@pytest.mark.parametrize(
    "graph, expected",
    [
        ({"a": {"b"}, "b": {"c"}, "c": set()}, []),
        ({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}, [frozenset("abc")]),
        ({"a": {"b"}, "b": {"a"}, "c": {"d"}, "d": {"c"}}, [frozenset("ab"), frozenset("cd")]),
    ],
)
def test_the_circle_finder(graph, expected):
    assert sorted(map(sorted, _circles(graph))) == sorted(map(sorted, expected))
