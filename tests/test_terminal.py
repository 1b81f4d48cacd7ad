"""Every terminal table goes through `ctvlab.terminal.print_table`."""

from __future__ import annotations

import ast
import io
from pathlib import Path

from rich.console import Console

from ctvlab.terminal import print_table

ROOT = Path(__file__).resolve().parents[1] / "platform" / "ctvlab"


def test_labels_left_figures_right_and_every_cell_shown():
    out = io.StringIO()
    console = Console(file=out, width=80, color_system=None)
    print_table(console, "Two CTVs", ("CTV", "PCC"), [("model", "0.81"), ("rtog", "0.79123")])
    text = out.getvalue()
    assert "Two CTVs" in text and "model" in text and "0.79123" in text
    row = next(line for line in text.splitlines() if "model" in line)
    # the figure is right-aligned in its column: padded on its left up to the widest figure
    assert "   0.81" in row and row.index("model") < row.index("0.81")


def test_no_other_module_builds_a_rich_table():
    builders = []
    for path in ROOT.rglob("*.py"):
        if path.name == "terminal.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "rich.table":
                builders.append(str(path.relative_to(ROOT)))
    assert builders == []
