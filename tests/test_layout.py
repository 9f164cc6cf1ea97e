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
