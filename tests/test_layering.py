"""The direction of imports in DESIGN.md, checked on the source: a layer never imports the ones above it.

`merging/` is algorithms you can call in a notebook (no orchestration, tracking or database);
`evaluation/` knows nothing of the registry or the flows; `registry/` knows nothing of the flows.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FORBIDDEN = {
    "merging": {"prefect", "mlflow", "sqlalchemy", "alembic", "registry", "evaluation", "flows"},
    "evaluation": {"prefect", "mlflow", "sqlalchemy", "alembic", "registry", "flows"},
    "registry": {"prefect", "evaluation", "flows"},
}


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_a_layer_never_imports_the_layers_above_it(layer):
    files = sorted((ROOT / layer).rglob("*.py"))
    assert files, f"no sources under {layer}/"
    offending = {f"{path.relative_to(ROOT)}: {name}" for path in files for name in _imports(path) & FORBIDDEN[layer]}
    assert not offending, f"{layer}/ imports what sits above it: {sorted(offending)}"


def test_the_check_sees_an_import_hidden_inside_a_function(tmp_path):
    source = tmp_path / "algorithm.py"
    source.write_text("def f():\n    from prefect import flow\n    import mlflow.tracking\n")
    assert _imports(source) == {"prefect", "mlflow"}
