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
    from loralab import textout
    from loralab.report import tables
    from loralab.report.build import report_from_dir

    result = report_from_dir(args.dir, args.out)
    rows, headline = result["rows"], result["headline"]
    # A terminal gets each interval on a second line of its cell (narrower columns); a log file
    # gets one line per target, p-values included.
    compact = textout.is_terminal()
    header, body = tables.summary_table(rows, headline, compact=compact)
    textout.print_table("Comparison (95% bootstrap intervals)", _stacked(header), body)
    header, body = tables.differences_table(rows, headline, compact=compact)
    if body:
        textout.print_table("lift vs best reference; vs base: target − base "
                            "(* distinguishable, p < 0.05)", _stacked(header), body)
    header, body = tables.curve_table(rows, headline)
    if body:
        textout.print_table("by checkpoint step", _stacked(header), body)
    for line in result["best_lines"]:
        textout.print_line(line)
    for note in result["notes"]:
        textout.print_line(f"note: {note}")
    textout.print_line(f"report: {result['html']}")
    return 0


def _stacked(header: list[str]) -> list[str]:
    """'weighted_accuracy vs base' as two header lines, metric name first: narrower columns."""
    return [name.replace(" ", "\n", 1) for name in header]
