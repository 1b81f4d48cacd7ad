"""The package's layers point one way: no module imports a package above its own (function-level imports
included), no two packages import each other, and no module grows past ~400 lines without saying why."""

from __future__ import annotations

import ast
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "platform" / "ctvlab"

# Bottom to top. A component (a sub-package or a top-level module of ctvlab) may import its own layer's
# components and those below; the package graph must also be acyclic within a layer.
LAYERS: list[set[str]] = [
    {"__init__", "errors", "study", "stage_table"},
    {"config"},
    {
        "atomic",
        "lock",
        "progress",
        "terminal",
        "statistics",
        "spool",
        "tracking",
        "outages",
        "resources",
        "runtime",
    },
    {"data"},
    {"splits", "ingest"},
    {"synth", "preprocess", "dicom"},
    {"voxel_models", "ctv"},
    {"unet"},
    {"stages"},
    {"pipeline"},
    {"jobkit", "schemas"},
    {"cli", "docsgen"},
]
LAYER_OF = {name: k for k, names in enumerate(LAYERS) for name in names}
SIZE_LIMIT = 400


def component(path: Path) -> str:
    rel = path.relative_to(ROOT)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def is_component(name: str) -> bool:
    """A sub-package or module of ctvlab (not a name imported from the package, like `__version__`)."""
    return (ROOT / name).is_dir() or (ROOT / f"{name}.py").is_file()


def imported_components(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names if node.module == "ctvlab"]
        for name in names:
            parts = name.split(".")
            if parts[0] == "ctvlab" and len(parts) > 1 and is_component(parts[1]):
                found.add(parts[1])
    return found


MODULES = sorted(ROOT.rglob("*.py"))


def test_every_component_has_a_layer():
    assert {component(p) for p in MODULES} <= set(LAYER_OF), "add new packages to LAYERS"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_module_imports_a_layer_above_its_own(path):
    own = component(path)
    above = sorted(c for c in imported_components(path) - {own} if LAYER_OF[c] > LAYER_OF[own])
    assert not above, f"{path.relative_to(ROOT)} ({own}, layer {LAYER_OF[own]}) imports {above}"


def test_no_two_packages_import_each_other():
    graph: dict[str, set[str]] = {}
    for path in MODULES:
        graph.setdefault(component(path), set()).update(imported_components(path) - {component(path)})
    try:
        tuple(TopologicalSorter(graph).static_order())
    except CycleError as e:
        pytest.fail(f"import cycle between packages: {' -> '.join(e.args[1])}")


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_a_long_module_says_why(path):
    lines = path.read_text().count("\n")
    if lines <= SIZE_LIMIT:
        return
    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    assert "lines" in doc, f"{path.relative_to(ROOT)} has {lines} lines: split it or say why in its docstring"
