"""The library's import graph is layered: no import runs back up, no circle, no hidden import.

Parsed with ``ast`` (function-level imports included), so it needs nothing imported.  Floors,
from the top (a module may import its own floor or any below it):

5. the public names and the harnesses built on them: ``torchrec_compress/__init__.py`` (lazy:
   PEP 562), ``testing/matrix*.py``, ``testing/torchrec_harness.py``, ``testing/models.py``;
4. the drivers: ``api.py`` (``compress_``), ``distributed/compression.py`` (DMP models),
   ``distributed/budget.py`` (a byte budget over a DMP model);
3. what composes methods: ``budget/`` (one byte budget, the best method per table), which
   imports any method and the floors below, never a driver;
2. the methods, ``methods/<name>/``: each imports only itself and the floors below, never
   another method;
1. the shared layer: everything else (registry, configs' base, calibration, statistics,
   report, layout, checkpoint, guards, ``distributed/`` helpers), which names no method;
0. data and process helpers: ``data/``, ``testing/multiprocess.py``, ``testing/memory.py``.

The runnable examples in docstrings (``>>> from torchrec_compress... import ...``) follow the same
rule: a module's example imports nothing its module may not.  Importing ``a.b.c`` runs the
``__init__`` of ``a.b`` too, so each module also depends on its
parent packages' ``__init__`` (the root's is lazy and imports nothing at run time).  Imports
under ``if TYPE_CHECKING:`` are for mypy only and are not edges.  Functions may import only the
optional dependencies in :data:`OPTIONAL`.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

PACKAGE = "torchrec_compress"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE

TOP = {
    PACKAGE,
    f"{PACKAGE}.testing.matrix",
    f"{PACKAGE}.testing.matrix_cases",
    f"{PACKAGE}.testing.matrix_models",
    f"{PACKAGE}.testing.torchrec_harness",
    f"{PACKAGE}.testing.models",
}
DRIVERS = {
    f"{PACKAGE}.api",
    f"{PACKAGE}.distributed.compression",
    f"{PACKAGE}.distributed.budget",
}
COMPOSERS_PREFIX = f"{PACKAGE}.budget"
BOTTOM_PREFIXES = (f"{PACKAGE}.data",)
BOTTOM = {
    f"{PACKAGE}.testing",
    f"{PACKAGE}.testing.multiprocess",
    f"{PACKAGE}.testing.memory",
}
# optional dependencies a function may import where it needs them (documented at each use)
OPTIONAL = {"pyarrow", "tqdm", "torchx", "psutil"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def floor(module: str) -> int:
    if module in TOP:
        return 5
    if module in DRIVERS:
        return 4
    if module == COMPOSERS_PREFIX or module.startswith(f"{COMPOSERS_PREFIX}."):
        return 3
    if module.startswith(f"{PACKAGE}.methods.") or module == f"{PACKAGE}.methods":
        return 2
    if module in BOTTOM or module.startswith(BOTTOM_PREFIXES):
        return 0
    return 1


def method_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[2] if len(parts) > 2 and parts[1] == "methods" else None


def _type_checking_block(node: ast.AST) -> bool:
    return (
        isinstance(node, ast.If)
        and isinstance(node.test, ast.Name)
        and node.test.id == "TYPE_CHECKING"
    )


def _imports(tree: ast.Module, module: str, is_package: bool) -> Iterator[tuple[str, int, bool]]:
    """(imported module, line, inside a function) for every run-time import of ``tree``."""

    def visit(node: ast.AST, in_function: bool) -> Iterator[tuple[str, int, bool]]:
        for child in ast.iter_child_nodes(node):
            if _type_checking_block(child):
                continue
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.Import):
                for alias in child.names:
                    yield alias.name, child.lineno, in_function
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = module.split(".")
                    anchor = anchor if is_package else anchor[:-1]
                    anchor = anchor[: len(anchor) - child.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                for alias in child.names:  # a submodule, or a name of the module ``base``
                    yield f"{base}:{alias.name}", child.lineno, in_function
            yield from visit(child, inner)

    yield from visit(tree, False)


def import_graph() -> tuple[dict[str, set[str]], list[str]]:
    """Library module -> library modules it imports (with parent packages); and the
    function-level imports that are not optional dependencies."""
    modules = {module_name(p): p for p in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    hidden: list[str] = []
    for module, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        for found, line, in_function in _imports(tree, module, path.name == "__init__.py"):
            base, _, name = found.partition(":")
            target = f"{base}.{name}" if f"{base}.{name}" in modules else base
            if in_function and target.split(".")[0] not in OPTIONAL:
                hidden.append(f"{path.relative_to(ROOT.parent)}:{line} imports {target}")
            if target in modules and target != module:
                graph[module].add(target)
    return graph, sorted(set(hidden))


def parent_packages(module: str) -> list[str]:
    """The packages whose ``__init__`` importing ``module`` runs (the root's is lazy)."""
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(2, len(parts))]


def test_no_import_runs_back_up_or_across_methods() -> None:
    graph, _ = import_graph()
    back = [
        f"{m} (floor {floor(m)}) imports {t} (floor {floor(t)})"
        for m, targets in graph.items()
        for t in [*targets, *parent_packages(m)]
        if floor(t) > floor(m)
    ]
    across = [
        f"{m} imports {t}"
        for m, targets in graph.items()
        for t in targets
        if method_of(m) and method_of(t) and method_of(m) != method_of(t)
    ]
    assert not back, "imports running back up:\n" + "\n".join(sorted(back))
    assert not across, "one method importing another:\n" + "\n".join(sorted(across))


DOCTEST_IMPORT = re.compile(
    r">>>\s+(?:from\s+(torchrec_compress[\w.]*)\s+import\s+([\w, ]+)|import\s+(torchrec_compress[\w.]*))"
)


def test_docstring_examples_import_only_what_their_module_may() -> None:
    modules = {module_name(p): p for p in ROOT.rglob("*.py")}
    wrong = []
    for module, path in sorted(modules.items()):
        for number, line in enumerate(path.read_text().split("\n"), 1):
            for match in DOCTEST_IMPORT.finditer(line):
                base = match.group(1) or match.group(3)
                names = [n.strip() for n in (match.group(2) or "").split(",") if n.strip()]
                targets = [f"{base}.{n}" if f"{base}.{n}" in modules else base for n in names]
                for target in targets or [base]:
                    across = method_of(module) and method_of(target) not in (
                        None,
                        method_of(module),
                    )
                    if target in modules and (floor(target) > floor(module) or across):
                        wrong.append(f"{path.relative_to(ROOT.parent)}:{number} imports {target}")
    assert not wrong, "examples importing back up or across methods:\n" + "\n".join(wrong)


def test_no_import_circle() -> None:
    graph, _ = import_graph()
    state: dict[str, int] = {}  # 1: on the path, 2: done
    path: list[str] = []
    circles: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                circles.append(" -> ".join([*path[path.index(target) :], target]))
            elif target not in state:
                visit(target)
        path.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert not circles, "import circles:\n" + "\n".join(circles)


def test_functions_import_only_optional_dependencies() -> None:
    _, hidden = import_graph()
    assert not hidden, "function-level imports:\n" + "\n".join(hidden)


def test_the_checker_sees_a_back_edge_a_circle_and_a_hidden_import(tmp_path: Path) -> None:
    """The parser itself: a relative import, a function-level one and a TYPE_CHECKING one."""
    source = (
        "from typing import TYPE_CHECKING\n"
        "from . import report\n"
        "if TYPE_CHECKING:\n"
        "    from torchrec_compress.api import compress_\n"
        "def f():\n"
        "    from torchrec_compress.methods.pq import module\n"
        "    import tqdm\n"
    )
    found = list(_imports(ast.parse(source), f"{PACKAGE}.layout", False))
    assert (f"{PACKAGE}:report", 2, False) in found
    assert (f"{PACKAGE}.methods.pq:module", 6, True) in found
    assert ("tqdm", 7, True) in found
    assert not any("api" in target for target, _, _ in found)
    assert floor(f"{PACKAGE}.methods.pq.module") > floor(f"{PACKAGE}.layout")
    # what composes methods sits between the methods and the drivers, and is no method itself
    budget = f"{PACKAGE}.budget.driver"
    assert floor(f"{PACKAGE}.methods.pq.module") < floor(budget) < floor(f"{PACKAGE}.api")
    assert method_of(budget) is None
