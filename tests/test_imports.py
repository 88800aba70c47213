"""No import cycles in `visrec/`: not between two modules, nor around any longer loop.

Every import counts, wherever it stands: at the top, inside a function, under `if TYPE_CHECKING:`. A
lazy or type-only import hides a cycle from the interpreter, not from the design, so it is no way out.

Importing `visrec.a.b` runs `visrec/a/__init__.py` first, so it counts as importing `visrec.a` too, for
every module outside `visrec.a`. Not for a module inside it: its package's `__init__` has always begun
before it runs, whoever imports it, so that edge would say nothing about the module's own imports and
would only forbid a package's `__init__` to import its own submodules, which `visrec.api` (it wires the
app from its routers) and `visrec.index` (it opens a store from `edge` or `server`) exist to do. A name
taken from the package itself (`from visrec.index import Hit` inside `visrec.index.edge`) does count.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import visrec

Graph = dict[str, set[str]]


def module_name(path: Path, root: Path, package: str) -> str:
    """`root/a/b.py` -> `package.a.b`; a package's `root/a/__init__.py` -> `package.a`."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join([package, *parts])


def imported(tree: ast.AST, module: str, is_package: bool, modules: set[str]) -> Iterator[str]:
    """Every module of `modules` that the file of `module` names in an import, with their packages."""
    here = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = here.split(".")[: len(here.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            # `from pkg import name`: a submodule when one is called so, else a name in `pkg` itself
            targets = [f"{base}.{alias.name}" for alias in node.names]
            if not set(targets) <= modules:
                targets.append(base)
        for target in targets:
            parts = target.split(".")
            packages = {".".join(parts[:n]) for n in range(1, len(parts))}  # `a.b.c` runs `a`, `a.b` first
            for name in packages - {p for p in packages if module.startswith(p + ".")} | {target}:
                if name in modules and name != module:
                    yield name


def import_graph(root: Path, package: str) -> Graph:
    files = {module_name(p, root, package): p for p in sorted(root.rglob("*.py"))}
    graph: Graph = {}
    for module, path in files.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        graph[module] = set(imported(tree, module, path.name == "__init__.py", set(files)))
    return graph


def cycles(graph: Graph) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(found)


def describe(graph: Graph, component: list[str]) -> str:
    members = set(component)
    edges = [f"{a} -> {b}" for a in component for b in sorted(graph[a] & members)]
    return "{" + ", ".join(component) + "}: " + "; ".join(edges)


def test_visrec_has_no_import_cycle() -> None:
    root = Path(visrec.__file__).parent
    graph = import_graph(root, "visrec")
    assert len(graph) > 40 and "visrec.index" in graph and "visrec.index.base" in graph["visrec.index"]
    found = cycles(graph)
    assert not found, "import cycles:\n" + "\n".join(describe(graph, c) for c in found)


def test_checker_finds_a_cycle_through_a_lazy_type_only_and_package_import(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    files = {
        "__init__.py": "",
        "a.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.b import B\n",
        "b.py": "def f() -> None:\n    from . import c\n",
        "c.py": "from .sub.leaf import x\n",  # runs pkg/sub/__init__.py first
        "sub/__init__.py": "import pkg.a\n",
        "sub/leaf.py": "from pkg.sub.twig import y\n",  # within pkg.sub: no edge to pkg.sub itself
        "sub/twig.py": "y = 1\n",
        "lone.py": "import os\nfrom pkg import b\n",
    }
    for name, text in files.items():
        (pkg / name).write_text(text)
    graph = import_graph(pkg, "pkg")
    assert graph["pkg.c"] == {"pkg.sub", "pkg.sub.leaf"} and graph["pkg.sub.leaf"] == {"pkg.sub.twig"}
    assert graph["pkg.lone"] == {"pkg.b"}
    assert cycles(graph) == [["pkg.a", "pkg.b", "pkg.c", "pkg.sub"]]
    (pkg / "sub/__init__.py").write_text("")
    assert cycles(import_graph(pkg, "pkg")) == []
