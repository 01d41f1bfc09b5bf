"""The direction of imports in DESIGN.md, checked on the source: a layer never imports the ones above it, the
lower layers use only the parts of `merging/` the design names, and no module imports itself round a circle.

`merging/` is algorithms you can call in a notebook (no orchestration, tracking or database);
`evaluation/` knows nothing of the registry or the flows and takes from `merging/` its types, checkpoints and
digests; `registry/` knows nothing of the flows and takes from `merging/` digests, checkpoints and validation.
Imports inside functions count: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("merging", "evaluation", "registry", "flows")
FORBIDDEN = {
    "merging": {"prefect", "mlflow", "sqlalchemy", "alembic", "registry", "evaluation", "flows"},
    "evaluation": {"prefect", "mlflow", "sqlalchemy", "alembic", "registry", "flows"},
    "registry": {"prefect", "evaluation", "flows"},
}
# what each lower layer may take from merging/: whole folders (and a few shared top-level modules)
SHARED = {"merging.errors", "merging.yaml_input", "merging.checkpoints"}
ALLOWED_FROM_MERGING = {
    "evaluation": SHARED | {"merging.objective", "merging.algorithms.mudsc"},  # the objective protocol; MuDSC's spec types
    # refs, the store's runtime (atomic writes, whose process owns a run or a directory, the fault-injection hook)
    "registry": SHARED | {"merging.references", "merging.runtime"},
}
# merging/'s own folders, lowest first: each may use the folders before it (and merging's top-level modules:
# errors, version, objective, yaml_input, references), never one after it
MERGING_FOLDERS = ("runtime", "checkpoints", "algorithms", "methods", "recipes", "engine")


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


def modules(root: Path = ROOT) -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in (root / package).rglob("*.py"):
            rel = path.relative_to(root).with_suffix("")
            out[".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)] = path
    return out


def module_imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The project's modules `name` imports (a `from a import b` names module a.b where one exists)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name in known}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                parts = parts[:len(parts) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            for alias in node.names:
                full = f"{base}.{alias.name}"
                out.add(full if full in known else base)
    return {m for m in out if m in known and m != name}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_a_layer_never_imports_the_layers_above_it(layer):
    files = sorted((ROOT / layer).rglob("*.py"))
    assert files, f"no sources under {layer}/"
    offending = {f"{path.relative_to(ROOT)}: {name}" for path in files for name in _imports(path) & FORBIDDEN[layer]}
    assert not offending, f"{layer}/ imports what sits above it: {sorted(offending)}"


@pytest.mark.parametrize("layer", sorted(ALLOWED_FROM_MERGING))
def test_lower_layers_use_only_the_parts_of_merging_the_design_names(layer):
    known = modules()
    allowed = ALLOWED_FROM_MERGING[layer]
    offending = sorted(
        f"{name} → {target}" for name, path in known.items() if name.split(".")[0] == layer
        for target in module_imports(name, path, known)
        if target.split(".")[0] == "merging" and not any(target == a or target.startswith(a + ".") for a in allowed))
    assert not offending, f"{layer}/ reaches into merging/ beyond its types, checkpoints, digests and validation: {offending}"


def _folder(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) >= 2 and parts[0] == "merging" and parts[1] in MERGING_FOLDERS else None


def test_merging_folders_use_only_the_folders_below_them():
    known = modules()
    offending = sorted(
        f"{name} → {target}" for name, path in known.items() if name.startswith("merging.") and _folder(name)
        for target in module_imports(name, path, known)
        if _folder(target) and MERGING_FOLDERS.index(_folder(target)) > MERGING_FOLDERS.index(_folder(name)))
    assert not offending, f"a merging/ folder reaches up ({' < '.join(MERGING_FOLDERS)}): {offending}"
    top = sorted(f"{name} → {target}" for name, path in known.items() if name.startswith("merging.")
                 and not _folder(name) for target in module_imports(name, path, known) if _folder(target))
    assert not top, f"merging/'s shared top-level modules import its folders: {top}"


def test_no_module_imports_itself_round_a_circle():
    known = modules()
    graph = {name: module_imports(name, path, known) for name, path in known.items()}
    assert not cycles(graph), f"import cycles: {cycles(graph)}"


def test_the_checks_see_an_import_hidden_inside_a_function_and_a_cycle(tmp_path):
    source = tmp_path / "algorithm.py"
    source.write_text("def f():\n    from prefect import flow\n    import mlflow.tracking\n")
    assert _imports(source) == {"prefect", "mlflow"}
    for package in PACKAGES:
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("")
    (tmp_path / "flows" / "a.py").write_text("def f():\n    from flows.b import g\n")
    (tmp_path / "flows" / "b.py").write_text("from flows import a\n")
    known = modules(tmp_path)
    graph = {name: module_imports(name, path, known) for name, path in known.items()}
    assert cycles(graph) == [["flows.a", "flows.b"]]
