"""The Rust core's modules form layers: each uses only modules declared above it.

``rust/src/lib.rs`` declares the modules in their order of use, and a module
directory's ``mod.rs`` declares its files the same way. Read as one list (a
directory's files first, then its ``mod.rs``, which builds on them; the crate
root last), every path a file names into the crate (``crate::…``,
``super::…``, or a name it imported from the crate) must lead to a module
earlier in the list, re-exports followed to where the item is defined. So no
module uses an item of a module that uses it, and none reaches back up to the
crate root, whose only content is declarations and re-exports.

A source reader, not a compiler: it sees the paths as written, which is how
this code base writes them (no glob imports, no ``use`` of a local module by a
bare relative name other than a directory's own files).
"""

import re
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "rust" / "src"

_COMMENT = re.compile(r"//[^\n]*|/\*.*?\*/", re.S)
_STRING = re.compile(r'r#*"(?:.|\n)*?"#*|"(?:\\.|[^"\\])*"')
_MOD = re.compile(r"^\s*(?:#\[[^\]]*\]\s*)*(?:pub(?:\([^)]*\))?\s+)?mod\s+(\w+)\s*;", re.M)
_USE = re.compile(r"\b(pub(?:\([^)]*\))?\s+)?use\s+([^;]+);")
_PATH = re.compile(r"(?<![\w:$])((?:crate|super|self)(?:::\w+)+)")


def _code(text: str) -> str:
    """The source without comments and string literals (their words are not paths)."""
    return _COMMENT.sub(" ", _STRING.sub('""', text))


class Crate:
    """The module tree of a ``src`` directory, read from its ``mod`` declarations."""

    def __init__(self, src: Path):
        self.src = src
        self.files: dict[str, Path] = {}  # module path ("" for the root, "kernels::dot") → file
        self.children: dict[str, list[str]] = {}  # module → its declared submodules, in order
        self._read("", src / "lib.rs")
        self.reexports = {m: self._reexports(m) for m in self.files}
        self.imports = {m: self._imports(m) for m in self.files}

    def _read(self, module: str, path: Path) -> None:
        self.files[module] = path
        kids = _MOD.findall(_code(path.read_text()))
        self.children[module] = [f"{module}::{k}" if module else k for k in kids]
        folder = path.parent if path.name in ("lib.rs", "mod.rs") else path.with_suffix("")
        for kid, name in zip(self.children[module], kids):
            file = folder / f"{name}.rs"
            self._read(kid, file if file.exists() else folder / name / "mod.rs")

    def order(self, module: str = "") -> list[str]:
        """The modules as one list: each module's files in declared order, then the module."""
        return [m for kid in self.children[module] for m in self.order(kid)] + [module]

    def _uses(self, module: str):
        """``(is_pub, path)`` for each path a ``use`` names, braces expanded, ``as`` kept."""
        for pub, tree in _USE.findall(_code(self.files[module].read_text())):
            tree = re.sub(r"\s*([:{},])\s*", r"\1", re.sub(r"\s+", " ", tree)).strip()
            for path in _expand(tree):
                yield bool(pub), path

    def _reexports(self, module: str) -> dict[str, str]:
        """Name → path (absolute, ``::``-joined) of each ``pub use`` of ``module``."""
        out = {}
        for pub, path in self._uses(module):
            if pub:
                path, _, alias = path.partition(" as ")
                absolute = self._absolute(module, path)
                if absolute is not None:
                    out[alias or path.split("::")[-1]] = absolute
        return out

    def _imports(self, module: str) -> dict[str, str]:
        """Name → absolute path of each ``use`` of a crate path (the name a file then writes)."""
        out = {}
        for _, path in self._uses(module):
            path, _, alias = path.partition(" as ")
            absolute = self._absolute(module, path)
            if absolute is not None:
                last = path.split("::")[-1]
                name = alias or (path.split("::")[-2] if last == "self" else last)
                out[name] = absolute.removesuffix("::self")
        return out

    def _absolute(self, module: str, path: str) -> str | None:
        """``crate::a::b`` / ``super::b`` / ``self::b`` / a child's name → ``a::b``; None for another crate."""
        head, _, rest = path.partition("::")
        if head == "crate":
            return rest
        if head == "super":
            parent = module.rpartition("::")[0]
            return self._absolute(parent, f"self::{rest}") if rest else parent
        if head == "self":
            return f"{module}::{rest}" if module else rest
        child = f"{module}::{head}" if module else head
        if child in self.files:  # a directory's own file, named as `mod.rs` declares it
            return f"{child}::{rest}" if rest else child
        return None

    def owner(self, absolute: str, seen: frozenset = frozenset()) -> str:
        """The module that defines the item at ``absolute`` (or the module it names)."""
        module, parts = "", absolute.split("::")
        while parts and (f"{module}::{parts[0]}" if module else parts[0]) in self.files:
            module = f"{module}::{parts[0]}" if module else parts[0]
            parts = parts[1:]
        if parts and parts[0] in self.reexports[module] and (module, parts[0]) not in seen:
            target = self.reexports[module][parts[0]]
            return self.owner("::".join([target, *parts[1:]]), seen | {(module, parts[0])})
        return module

    def used(self, module: str) -> dict[str, set[str]]:
        """Module used → the paths by which ``module`` uses it."""
        code = _code(self.files[module].read_text())
        paths = set()
        for _, path in self._uses(module):
            absolute = self._absolute(module, path.partition(" as ")[0])
            if absolute is not None:
                paths.add(absolute.removesuffix("::self"))
        for path in _PATH.findall(code):
            absolute = self._absolute(module, path)
            if absolute is not None:
                paths.add(absolute)
        names = self.imports[module]
        if names:
            alternation = "|".join(map(re.escape, sorted(names, key=len, reverse=True)))
            for name, rest in re.findall(rf"(?<![\w:$])({alternation})((?:::\w+)+)", code):
                paths.add(names[name] + rest)
        out: dict[str, set[str]] = {}
        for path in paths:
            owner = self.owner(path)
            if owner != module:
                out.setdefault(owner, set()).add(path)
        return out


def _expand(tree: str) -> list[str]:
    """``a::{b,c::{d,e}}`` → ``a::b, a::c::d, a::c::e``; ``x as y`` → ``x as y``."""
    if "{" not in tree:
        return [tree]
    prefix, inner = tree.split("{", 1)
    inner = inner[: inner.rindex("}")]
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(inner):
        depth += ch == "{"
        depth -= ch == "}"
        if ch == "," and depth == 0:
            parts.append(inner[start:i])
            start = i + 1
    parts.append(inner[start:])
    return [prefix + p for part in parts if part for p in _expand(part)]


@pytest.fixture(scope="module")
def crate():
    return Crate(SRC)


def test_each_module_uses_only_modules_declared_above_it(crate):
    order = crate.order()
    rank = {m: i for i, m in enumerate(order)}
    back = [
        f"{crate.files[m].relative_to(crate.src)} uses {u or 'the crate root'} ({', '.join(sorted(paths))})"
        for m in order
        for u, paths in crate.used(m).items()
        if rank[u] > rank[m]
    ]
    assert not back, "uses running back up the declared order:\n" + "\n".join(back)


def test_the_reader_sees_the_uses(crate):
    # The check above is only as good as this reader: known uses, of each kind
    # of path, must be found (a reader that found nothing would pass it).
    used = {m: crate.used(m) for m in crate.files}
    assert "eigensolver" in used["guidance"]  # `use crate::eigensolver::{...}`
    assert "kernels::scan" in used["validate"]  # `crate::kernels::scan(...)`, a re-export followed
    assert "parallel" in used["validate"]  # a path in the code, not in a `use`
    assert "kernels::simd" in used["kernels::dot"]  # `use super::simd::...`
    assert "kernels::dot" in used["kernels::products"]
    assert "options" in used["solve"]  # `pub use crate::options::...`
    assert "cholesky" in used["guidance"]
    assert "kernels::products" in used["guidance"]  # `use crate::kernels;` then `kernels::normal_product(...)`
    total = sum(len(u) for u in used.values())
    assert total >= 40, total


def test_the_crate_root_only_declares_and_reexports(crate):
    # Every item of the root is a `mod` or a `pub use`: what it defines, a module
    # below could only use by reaching back up.
    for face in ("", "kernels"):
        code = _code(crate.files[face].read_text())
        rest = _USE.sub("", _MOD.sub("", code))
        rest = re.sub(r"#!?\[[^\]]*\]", "", rest)
        assert not rest.strip(), f"{crate.files[face].relative_to(crate.src)} defines more than modules and re-exports: {rest.strip()[:200]!r}"


def test_the_binding_is_declared_last(crate):
    # The binding converts for everything else; nothing in the core may use it.
    assert [m for m in crate.order() if "::" not in m][-2:] == ["python", ""]
