"""`loralab report DIR`: exit codes, one-line errors, and no torch import."""

from __future__ import annotations

import argparse
import subprocess
import sys

from loralab.cli import main
from loralab.commands.report import register


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="loralab")
    register(p.add_subparsers())
    return p


def test_register_adds_report_with_out():
    args = parser().parse_args(["report", "some/dir", "--out", "elsewhere"])
    assert str(args.dir) == "some/dir" and str(args.out) == "elsewhere" and callable(args.func)


def test_report_command_writes_files_and_prints_table(sweep_dir, tmp_path, capsys):
    out = tmp_path / "out"
    args = parser().parse_args(["report", str(sweep_dir), "--out", str(out)])
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert "r8-lr1e-4" in printed and "report.html" in printed
    assert (out / "comparison.csv").is_file() and (out / "report.html").is_file()


def test_missing_dir_is_one_line_and_exit_2(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("loralab: error:") and "\n" not in err and "Traceback" not in err


def test_report_does_not_import_torch(sweep_dir):
    code = (
        "import sys, argparse\n"
        "from loralab.commands.report import register\n"
        "p = argparse.ArgumentParser(); register(p.add_subparsers())\n"
        f"a = p.parse_args(['report', {str(sweep_dir / 'comparison')!r}])\n"
        "assert a.func(a) == 0\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
