"""Import hygiene: every module imports on its own in a fresh interpreter, and the module-level
import graph among tensorslim modules has no cycle."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PKG = SRC / "tensorslim"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES: dict[str, Path] = {_module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _eager_imports(body: list[ast.stmt]):
    """Import statements run when the module is imported: not inside functions, not under
    `if TYPE_CHECKING:` (class bodies and top-level if/try/with blocks do run)."""
    for node in body:
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        elif isinstance(node, ast.If):
            if not _is_type_checking(node.test):
                yield from _eager_imports(node.body)
            yield from _eager_imports(node.orelse)
        elif isinstance(node, ast.Try):
            for block in (node.body, node.orelse, node.finalbody):
                yield from _eager_imports(block)
            for handler in node.handlers:
                yield from _eager_imports(handler.body)
        elif isinstance(node, ast.With | ast.ClassDef):
            yield from _eager_imports(node.body)


def _target(name: str) -> str | None:
    """The tensorslim module a dotted name refers to (longest known prefix)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def import_graph() -> dict[str, set[str]]:
    """Module -> tensorslim modules it imports at module level. The implicit import of parent
    packages by `import pkg.sub` is not an edge (else every package importing its own submodules
    would be a cycle), but `from pkg import sub` is an edge to pkg as well as to pkg.sub."""
    graph: dict[str, set[str]] = {}
    for mod, path in MODULES.items():
        is_pkg = path.name == "__init__.py"
        edges: set[str] = set()
        for node in _eager_imports(ast.parse(path.read_text(encoding="utf-8")).body):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                base = node.module or ""
                if node.level:
                    anchor = mod if is_pkg else mod.rpartition(".")[0]
                    for _ in range(node.level - 1):
                        anchor = anchor.rpartition(".")[0]
                    base = f"{anchor}.{base}" if base else anchor
                # `from base import x` reads x from base's namespace: an edge to base, and to
                # base.x too when that is a module.
                names = [base, *(f"{base}.{a.name}" for a in node.names)]
            for name in names:
                target = _target(name)
                if target is not None and target != mod:
                    edges.add(target)
        graph[mod] = edges
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    sccs: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            scc = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                scc.append(w)
                if w == v:
                    break
            if len(scc) > 1:
                sccs.append(sorted(scc))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sccs


def test_no_import_cycles():
    graph = import_graph()
    # The formerly known cycles, checked edge by edge so a failure names them.
    for a, b in [
        ("tensorslim.plan.plan", "tensorslim.plan.render"),
        ("tensorslim", "tensorslim.api"),
        ("tensorslim.core", "tensorslim.core.discover"),
    ]:
        assert not (b in graph[a] and a in graph[b]), f"{a} <-> {b}"
    assert find_cycles(graph) == []


# The rooms, lowest first: a module may import its own room and the rooms below it only.
LEVELS = [
    {"errors", "_nested", "_progress", "_version", "decompose"},
    {"core", "layers"},
    {"compressors", "handlers"},
    {"plan", "calibrate"},
    {"search", "train", "study", "io", "report", "zoo", "hf", "modelspec", "lc", "_checkpoint",
     "input_files"},
    {"api", "speed"},
    {"demo", "cli"},
]


def _level(module: str) -> int:
    room = module.split(".")[1] if "." in module else ""
    for i, rooms in enumerate(LEVELS):
        if room in rooms:
            return i
    return len(LEVELS)  # the package itself


def test_imports_run_downward():
    """cli -> api -> {search, train, study, io, report} -> {plan, calibrate} -> {compressors,
    handlers} -> {core, layers} -> decompose, at module level."""
    graph = import_graph()
    assert _level("tensorslim.core.spec") == 1 and _level("tensorslim") == len(LEVELS)
    upward = [
        f"{a} -> {b}"
        for a, targets in graph.items()
        for b in targets
        if _level(b) > _level(a)
    ]
    assert upward == []


# Run in a fresh interpreter that never imports tensorslim itself: it loads the third-party
# modules tensorslim needs once (found by a throwaway child that imports everything), then forks
# one child per tensorslim module, which imports only that module. Each child thus starts with no
# tensorslim module loaded, as `python -c "import tensorslim.X"` would, without paying for torch
# every time.
_FORK_EACH = r"""
import importlib, json, os, sys

def child(fn):
    pid = os.fork()
    if pid == 0:
        try:
            fn()
        except BaseException as exc:
            print(f"{type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
            os._exit(1)
        os._exit(0)
    return pid

mods = sys.argv[1:]
r, w = os.pipe()

def preload_list():
    for m in mods:
        importlib.import_module(m)
    names = [n for n in sys.modules if n.partition(".")[0] not in ("tensorslim", "__main__")]
    os.write(w, json.dumps(names).encode() + b"\n")

os.waitpid(child(preload_list), 0)
os.close(w)
with os.fdopen(r) as f:
    names = json.loads(f.readline() or "[]")
for n in names:
    try:
        importlib.import_module(n)
    except BaseException:
        pass
assert not any(n.partition(".")[0] == "tensorslim" for n in sys.modules)

failed, running = [], {}
for m in mods:
    while len(running) >= (os.cpu_count() or 1):
        pid, status = os.wait()
        if status:
            failed.append(running[pid])
        running.pop(pid)
    running[child(lambda m=m: importlib.import_module(m))] = m
while running:
    pid, status = os.wait()
    if status:
        failed.append(running[pid])
    running.pop(pid)
print(json.dumps(sorted(failed)))
"""


def test_every_module_imports_alone():
    """Each module on its own, with no other tensorslim module loaded first, so a cycle that
    breaks only for some import orders shows."""
    mods = sorted(MODULES)
    if hasattr(os, "fork"):
        proc = subprocess.run(
            [sys.executable, "-c", _FORK_EACH, *mods],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr
        failed = json.loads(proc.stdout.strip().splitlines()[-1])
        assert failed == [], f"{failed}\n{proc.stderr}"
    else:  # no fork: one interpreter per module (slower)
        for mod in mods:
            proc = subprocess.run(
                [sys.executable, "-c", f"import {mod}"], capture_output=True, text=True
            )
            assert proc.returncode == 0, f"import {mod}:\n{proc.stderr}"
