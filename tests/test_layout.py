"""Static checks of the code's layering (issue 16): the stage logic under tasks/ knows nothing of
the orchestration; the flows and the command line sit above it."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ORCHESTRATION = ("prefect", "prefect_ray", "flows")


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_nothing_under_tasks_imports_prefect_or_the_flows():
    offenders = {str(p.relative_to(ROOT)): sorted(n for n in _imports(p) if n.split(".")[0] in ORCHESTRATION)
                 for p in sorted((ROOT / "tasks").rglob("*.py"))}
    assert {k: v for k, v in offenders.items() if v} == {}
    # the check sees imports inside functions too: the flows' own modules do import prefect
    assert any(n.split(".")[0] == "prefect" for n in _imports(ROOT / "flows" / "pipeline.py"))


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported_on_load(path: Path, known: set[str]) -> set[str]:
    """The modules of `known` that `path` imports at module level (function-level imports run later)."""
    names = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return names & known


def test_modules_under_tasks_and_flows_import_each_other_without_a_cycle():
    paths = {_module_name(p): p for top in ("tasks", "flows") for p in sorted((ROOT / top).rglob("*.py"))}
    graph = {m: sorted(_imported_on_load(p, set(paths)) - {m}) for m, p in paths.items()}  # a package loads its own modules
    cycles, done = [], set()

    def visit(module: str, chain: list[str]) -> None:
        if module in chain:
            cycles.append(" -> ".join(chain[chain.index(module):] + [module]))
            return
        if module in done:
            return
        for dep in graph[module]:
            visit(dep, chain + [module])
        done.add(module)

    for module in graph:
        visit(module, [])
    assert cycles == []


def test_no_module_imports_another_modules_private_names():
    """`from tasks.x import _helper` ties two modules to one's internals: what modules share is public.
    A package's __init__ may re-export its own submodules' names."""
    offenders = {}
    for path in sorted(p for top in ("tasks", "flows", "bench") for p in (ROOT / top).rglob("*.py")):
        package = _module_name(path) if path.name == "__init__.py" else None
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not (isinstance(node, ast.ImportFrom) and node.module and node.level == 0):
                continue
            if node.module.split(".")[0] not in ("tasks", "flows", "bench"):
                continue
            if package and node.module.startswith(package + "."):
                continue
            private = [a.name for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
            if private:
                offenders.setdefault(str(path.relative_to(ROOT)), []).append(f"{node.module}: {private}")
    assert offenders == {}


def test_no_test_module_imports_another():
    """Shared test code lives in conftest.py (fixtures) and in support modules named for what they
    hold (fakes.py, configs.py), so running or moving one test module never runs another's import."""
    offenders = {}
    for path in sorted((ROOT / "tests").rglob("*.py")):
        imported = sorted(n for n in _imports(path) if n.split(".")[-1].startswith("test_"))
        if imported:
            offenders[str(path.relative_to(ROOT))] = imported
    assert offenders == {}


def test_no_module_under_tasks_is_over_600_lines():
    long = {str(p.relative_to(ROOT)): n for p in sorted((ROOT / "tasks").rglob("*.py"))
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > 600}
    assert long == {}, "split these by concern (issue 16)"
