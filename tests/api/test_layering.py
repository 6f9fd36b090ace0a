"""The core's private modules import each other without cycles (issue 10: _writer -> _gc -> api -> _writer)."""

from __future__ import annotations

import ast
import os

import ckptfmt

PKG = os.path.dirname(ckptfmt.__file__)


def _module_imports() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for d, _, files in os.walk(PKG):
        for f in files:
            if not f.endswith(".py"):
                continue
            rel = os.path.relpath(os.path.join(d, f), os.path.dirname(PKG))[:-3].replace(os.sep, ".")
            rel = rel.removesuffix(".__init__")
            tree = ast.parse(open(os.path.join(d, f)).read())
            deps = set()
            for node in tree.body:  # module level only: imports inside functions are deferred on purpose
                if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ckptfmt"):
                    deps.add(node.module)
                elif isinstance(node, ast.Import):
                    deps |= {a.name for a in node.names if a.name.startswith("ckptfmt")}
            graph[rel] = deps
    return graph


def test_no_import_cycles_between_core_modules():
    graph = _module_imports()
    core = {m for m in graph if m != "ckptfmt" and not m.endswith("__init__")}
    state: dict[str, int] = {}

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for d in graph.get(m, ()):
            if d not in core or d == "ckptfmt":
                continue
            assert state.get(d) != 1, "import cycle: " + " -> ".join(stack + [m, d])
            if d not in state:
                visit(d, stack + [m])
        state[m] = 2

    for m in sorted(core):
        if m not in state:
            visit(m, [])


def test_deletion_and_the_writer_go_through_storage():
    """No filesystem calls behind the Storage seam in the modules that delete or lock."""
    for name in ("_gc.py", "_layout.py", "_lock.py", "_writer.py", "manager.py"):
        lines = open(os.path.join(PKG, name)).read().splitlines()
        src = "\n".join(l for l in lines if not l.strip().startswith((">>>", "...")))  # doctest examples may
        for call in ("os.unlink", "os.remove", "os.rmdir", "os.listdir", "os.scandir", "os.stat", "os.open",
                     "shutil.", "fcntl.", "os.path.isfile", "os.path.isdir", "os.path.exists"):
            assert call not in src, f"{name} calls {call} directly"
