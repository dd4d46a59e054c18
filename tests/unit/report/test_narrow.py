"""Tables at 80 columns and redirected: every number and name printed whole on one line."""

from __future__ import annotations

import csv
import io
import re
import sys

import pytest

from loralab.commands.report import run_report
from loralab.sweep.summary import print_table


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _three_places(value: float) -> str:
    return f"{value:.3g}" if 0 < abs(value) < 0.01 else f"{value:.3f}"


def _expected_cells(comparison_dir) -> set[str]:
    """Names and numbers as the csv holds them, formatted here, not by the code under test."""
    with open(comparison_dir / "comparison.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    metrics = ("weighted_accuracy", "f1", "weighted_error", "valid_rate")
    cells = set()
    for row in rows:
        cells.add(row["target"])
        for m in metrics:
            for key in (m, f"{m}_low", f"{m}_high"):
                if row[key]:
                    cells.add(_three_places(float(row[key])))
            if row[f"{m}_lift"] and row["kind"] != "reference":  # references: no lift row
                cells.add(f"{float(row[f'{m}_lift']):+.3f}")
    assert len(cells) > 20
    return cells


def _print_report(comparison_dir, stream, monkeypatch) -> list[str]:
    import argparse

    monkeypatch.setattr(sys, "stdout", stream)
    run_report(argparse.Namespace(dir=comparison_dir, out=None))
    monkeypatch.undo()
    return re.sub(r"\x1b\[[0-9;]*m", "", stream.getvalue()).splitlines()


@pytest.mark.parametrize("stream_type", [Terminal, io.StringIO], ids=["terminal", "redirected"])
def test_report_tables_keep_every_number_whole_at_80_columns(built, monkeypatch, stream_type):
    comparison_dir, _ = built
    monkeypatch.setenv("COLUMNS", "80")
    lines = _print_report(comparison_dir, stream_type(), monkeypatch)
    tokens = {t for line in lines for t in re.split(r"[\s│┃|,\[\]()*]+", line) if t}
    missing = sorted(c for c in _expected_cells(comparison_dir) if c not in tokens)
    assert not missing, f"not printed whole: {missing}"
    table_lines = [line for line in lines if "│" in line or "┃" in line]  # sentences may wrap
    if stream_type is Terminal:
        assert max(len(line) for line in table_lines) <= 80
    else:  # one line per target: its name and its value with the interval together
        assert any(re.search(r"r8-lr1e-4 .*\d\.\d{3} \[\d\.\d{3}, \d\.\d{3}\]", ln) for ln in lines)


def _sweep_rows() -> list[dict]:
    losses = [11.541234, 11.540987, 11.5449, 11.53]
    return [{"trial": f"r{r}_lr1e-4_limit50_ep4_dropout0.05_{i}", "status": "done", "lora.r": r,
             "train.lr": 1e-4, "data.limit": 50, "final_loss": loss, "steps": 120,
             "tokens_per_s": 2843.7 + i, "wall_seconds": 612.25, "eval.weighted_accuracy": 0.8125}
            for i, (r, loss) in enumerate(zip((4, 8, 16, 32), losses, strict=True))]


@pytest.mark.parametrize("stream_type", [Terminal, io.StringIO], ids=["terminal", "redirected"])
def test_sweep_table_keeps_names_and_distinct_losses_whole(monkeypatch, stream_type):
    monkeypatch.setenv("COLUMNS", "80")
    rows = _sweep_rows()
    stream = stream_type()
    print_table(rows, "demo", stream=stream)
    text = re.sub(r"\x1b\[[0-9;]*m", "", stream.getvalue())
    tokens = {t for line in text.splitlines() for t in re.split(r"[\s│┃|]+", line) if t}
    for row in rows:
        assert row["trial"] in tokens
        assert f"{row['tokens_per_s']:,.0f}" in tokens
    printed = [t for t in tokens if t.startswith("11.5")]
    assert len(printed) == len(rows), printed  # four different losses read differently
    for row in rows:
        assert any(abs(float(t) - row["final_loss"]) < 5e-5 for t in printed)
    if stream_type is Terminal:
        assert max(len(line) for line in text.splitlines()) <= 80
