"""`loralab report DIR [--out OUT]`: rebuild tables, plots and report.html from files alone."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "report",
        help="compare evaluated targets: tables, plots and report.html (reads files only)",
        description="Rebuild comparison.csv, comparison.md, PNG plots and report.html from a "
        "comparison folder (targets.json), a sweep folder (sweep.json) or an evaluated run.",
    )
    parser.add_argument("dir", type=Path, help="comparison, sweep or run folder")
    parser.add_argument("--out", type=Path, default=None,
                        help="where to write the report (default: the comparison folder)")
    parser.set_defaults(func=run_report)


def run_report(args: argparse.Namespace) -> int:
    from rich.console import Console

    from loralab.report import tables
    from loralab.report.build import report_from_dir

    result = report_from_dir(args.dir, args.out)
    rows, headline = result["rows"], result["headline"]
    console = Console()
    console.print(_rich_table("Comparison (95% bootstrap intervals)",
                              *tables.summary_table(rows, headline, compact=True)))
    header, body = tables.differences_table(rows, headline, compact=True)
    if body:
        console.print(_rich_table("lift vs best reference; vs base: target − base "
                                  "(* distinguishable, p < 0.05)",
                                  header, body))
    for note in result["notes"]:
        console.print(f"note: {note}", highlight=False)
    console.print(f"report: {result['html']}", highlight=False, soft_wrap=True)
    return 0


def _rich_table(title: str, header: list[str], body: list[list[str]]):
    """Cells wrap rather than being cut: numbers must stay whole on narrow terminals."""
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for i, name in enumerate(header):
        table.add_column(name, justify="left" if i == 0 else "right", overflow="fold",
                         no_wrap=i == 0)
    for cells in body:
        table.add_row(*cells)
    return table
