"""Every table ctvlab prints on the terminal, through one function: the same look everywhere (a title on
the left, labels in the first columns, figures right-aligned), and one place to change it."""

from __future__ import annotations

from collections.abc import Iterable, Sequence


def print_table(
    console,
    title: str,
    columns: Sequence[str],
    rows: Iterable[Sequence[str]],
    *,
    labels: int = 1,
    dim: Iterable[int] = (),
) -> None:
    """Print `rows` under `columns` on a rich `console`. The first `labels` columns are left-aligned, the
    others (figures) right-aligned; the columns at the indices in `dim` are shown dimmed (reference values,
    such as the study's)."""
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    dimmed = set(dim)
    for i, name in enumerate(columns):
        table.add_column(
            name, justify="left" if i < labels else "right", style="dim" if i in dimmed else None
        )
    for row in rows:
        table.add_row(*row)
    console.print(table)
