"""The layout is the architecture: imports run one way, and importing the package is cheap."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("usam_backend", "training")
LAZY_ALLOWED = {"usam_backend/cli.py"}
"""The command line imports each command's (heavy) modules when the command runs: `usam --help`
must not load torch. Nowhere else may a function import usam's own modules."""


def _cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for root in sorted(graph.modules):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.find_modules_directly_imported_by(root))))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.find_modules_directly_imported_by(child)))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
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
    return found


def test_the_module_graph_has_no_cycle_function_level_imports_included():
    graph = grimp.build_graph(*PACKAGES, exclude_type_checking_imports=True)  # grimp sees imports inside functions too
    assert len(graph.modules) > 50
    assert _cycles(graph) == []


def test_a_planted_cycle_is_found():
    graph = grimp.ImportGraph()
    for module in ("a", "b", "c", "d"):
        graph.add_module(module)
    for importer, imported in (("a", "b"), ("b", "c"), ("c", "a"), ("c", "d")):
        graph.add_import(importer=importer, imported=imported)
    assert _cycles(graph) == [["a", "b", "c"]]


def test_no_function_imports_usams_own_modules_outside_the_command_line():
    found = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            relative = path.relative_to(ROOT).as_posix()
            for node in ast.walk(ast.parse(path.read_text())):
                if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    continue
                for inner in ast.walk(node):
                    names = (
                        [inner.module or ""] if isinstance(inner, ast.ImportFrom)
                        else [a.name for a in inner.names] if isinstance(inner, ast.Import) else []
                    )  # fmt: skip
                    if any(n.split(".")[0] in PACKAGES for n in names) and relative not in LAZY_ALLOWED:
                        found.append(f"{relative}:{inner.lineno} {names}")
    assert found == []


def test_the_layers_contract_holds():
    result = subprocess.run(
        [str(Path(sys.executable).parent / "lint-imports"), "--no-cache"], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 kept, 0 broken" in result.stdout


def test_importing_the_packages_loads_no_model_library():
    code = (
        "import sys, usam_backend, training, usam_backend.cli; "
        "print(sorted(m for m in ('torch', 'segment_anything', 'diffusers', 'fastapi') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_the_public_api_resolves():
    import training
    import usam_backend

    for name in usam_backend.__all__:
        assert getattr(usam_backend, name) is not None, name
    for name in training.__all__:
        assert getattr(training, name) is not None, name
