"""Tables that stay readable at any width and when redirected.

Rich wraps a cell when its table is wider than the terminal, which splits numbers and names
over lines (`-0.00` / `8`). Here no cell is ever wrapped: a table too wide for the terminal is
cut into several tables of whole columns, each repeating the first (name) column. On a terminal
the pieces are drawn with rich; when the stream is not a terminal (a log file, CI, nohup,
slurm) they are plain aligned text, at a wide width, so each row is one greppable line.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Sequence
from typing import IO, Any

PLAIN_WIDTH = 200  # not a terminal: nobody reads it at 80 columns, and lines stay whole
FOLD_WIDTH = 60  # a free-text column (an error message) wraps at this width on a terminal
RICH_CELL_EXTRA = 3  # rich's default box: one space each side of a cell plus one border


def is_terminal(stream: IO[str] | None = None) -> bool:
    stream = stream if stream is not None else sys.stdout
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def output_width(stream: IO[str] | None = None) -> int:
    """The terminal's width; a wide fixed width when the stream is not a terminal."""
    if not is_terminal(stream):
        return max(PLAIN_WIDTH, _env_columns())
    return shutil.get_terminal_size((80, 24)).columns


def _env_columns() -> int:
    try:
        return int(os.environ.get("COLUMNS", "0"))
    except ValueError:
        return 0


def cell_width(text: str) -> int:
    from rich.cells import cell_len

    return max((cell_len(line) for line in str(text).split("\n")), default=0)


def column_groups(header: Sequence[str], body: Sequence[Sequence[str]], width: int,
                  extra: int = RICH_CELL_EXTRA, foldable: set[int] | None = None) -> list[list[int]]:
    """Column indices per piece: column 0 in every piece, the others in order, whole, so that
    each piece's drawn width (cells + `extra` per column + 1) stays within `width`."""
    widths = [max([cell_width(header[i])] + [cell_width(row[i]) for row in body])
              for i in range(len(header))]
    widths = [min(w, FOLD_WIDTH) if i in (foldable or set()) else w for i, w in enumerate(widths)]
    key = widths[0] + extra + 1 if widths else 0
    groups: list[list[int]] = []
    current: list[int] = [0]
    used = key
    for i in range(1, len(header)):
        need = widths[i] + extra
        if len(current) > 1 and used + need > width:
            groups.append(current)
            current, used = [0], key
        current.append(i)
        used += need
    groups.append(current)
    return groups


def plain_table(header: Sequence[str], body: Sequence[Sequence[str]], right: set[int]) -> str:
    """Markdown-like aligned text; a multi-line cell becomes extra lines of its row."""
    widths = [max([cell_width(header[i])] + [cell_width(r[i]) for r in body])
              for i in range(len(header))]

    def lines_of(cells: Sequence[str]) -> list[str]:
        split = [str(c).split("\n") for c in cells]
        height = max(len(s) for s in split)
        out = []
        for k in range(height):
            parts = []
            for i, s in enumerate(split):
                text = s[k] if k < len(s) else ""
                pad = " " * (widths[i] - cell_width(text))
                parts.append(pad + text if i in right else text + pad)
            out.append("| " + " | ".join(parts) + " |")
        return out

    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    rows = lines_of(header) + [rule]
    for cells in body:
        rows += lines_of(cells)
    return "\n".join(rows)


def print_table(title: str, header: Sequence[str], body: Sequence[Sequence[str]],
                stream: IO[str] | None = None, right: set[int] | None = None,
                row_styles: Sequence[str | None] | None = None, foldable: set[int] | None = None,
                width: int | None = None) -> None:
    """Print a table whose cells are never split: pieces of whole columns fit the width.

    right: columns aligned right (default: all but the first); row_styles: rich styles per row
    (terminal only); foldable: free-text columns that may wrap (an error message)."""
    stream = stream if stream is not None else sys.stdout
    right = set(range(1, len(header))) if right is None else right
    foldable = foldable or set()
    width = width or output_width(stream)
    terminal = is_terminal(stream)
    groups = column_groups(header, body, width, foldable=foldable)
    for n, group in enumerate(groups):
        piece_title = title if len(groups) == 1 else f"{title} ({n + 1}/{len(groups)})"
        head = [header[i] for i in group]
        cells = [[row[i] for i in group] for row in body]
        if terminal:
            _print_rich(piece_title, head, cells, stream, width,
                        {k for k, i in enumerate(group) if i in right},
                        {k for k, i in enumerate(group) if i in foldable}, row_styles)
        else:
            text = plain_table(head, cells, {k for k, i in enumerate(group) if i in right})
            stream.write(f"{piece_title}\n{text}\n\n")
    stream.flush()


def _print_rich(title: str, header: list[str], body: list[list[str]], stream: IO[str], width: int,
                right: set[int], foldable: set[int], row_styles: Sequence[str | None] | None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(file=stream, width=width)
    console.print(title, style="italic", highlight=False)  # wraps between words only
    table = Table()
    for i, name in enumerate(header):
        fold = i in foldable
        table.add_column(name, justify="right" if i in right else "left",
                         no_wrap=not fold, overflow="fold" if fold else "ellipsis",
                         min_width=None if fold else cell_width(name), max_width=FOLD_WIDTH if fold else None)
    for k, cells in enumerate(body):
        table.add_row(*cells, style=row_styles[k] if row_styles else None)
    console.print(table)


def print_line(text: Any, stream: IO[str] | None = None) -> None:
    """One line, never wrapped by a console width (paths, notes)."""
    stream = stream if stream is not None else sys.stdout
    print(text, file=stream, flush=True)
