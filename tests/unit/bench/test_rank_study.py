"""bench/rank_study.py's readers: per-trial timings from a sweep folder, and the packed vs
sequential comparison of eval intervals."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def rank_study(load_bench):
    return load_bench("rank_study")


def _sweep(folder: Path, step_seconds: list[float], wall: float) -> Path:
    """A sweep folder with one finished trial: sweep.json, metrics.jsonl and eval/metrics.json."""
    run = folder / "r4"
    (run / "eval").mkdir(parents=True)
    (run / "metrics.jsonl").write_text("".join(
        json.dumps({"step": i + 1, "step_seconds": s}) + "\n" for i, s in enumerate(step_seconds)))
    (run / "eval" / "metrics.json").write_text(json.dumps({
        "weighted_accuracy": 0.8, "f1": 0.6, "weighted_error": 2.0, "valid_rate": 1.0,
        "ci": {"weighted_accuracy": [0.7, 0.9], "f1": [0.5, 0.7], "weighted_error": [1.5, 2.5],
               "valid_rate": [1.0, 1.0]}}))
    trial = {"name": "r4", "status": "done", "overrides": {"lora.r": 4}, "path": str(run),
             "result": {"steps": len(step_seconds), "wall_seconds": wall}}
    (folder / "sweep.json").write_text(json.dumps({"trials": [trial]}))
    return folder


def test_steady_state_leaves_out_the_warm_up_steps(rank_study, tmp_path):
    # 5 slow warm-up steps (compilation), then 10 steps of 0.5 s: steady = 15 x 0.5 s
    sweep = _sweep(tmp_path, [20.0] * 5 + [0.5] * 10, wall=30.0)
    (row,) = rank_study.trial_rows(sweep)
    assert row["steady_seconds"] == 7.5
    assert row["wall_over_steady"] == 4.0
    assert row["metrics"]["f1"] == 0.6 and row["ci"]["f1"] == [0.5, 0.7]


def _record(path: Path, mode: str, ci: list[float]) -> Path:
    row = {"trial": "r4", "metrics": {k: 0.8 for k in ("weighted_accuracy", "f1",
                                                       "weighted_error", "valid_rate")},
           "ci": {k: ci for k in ("weighted_accuracy", "f1", "weighted_error", "valid_rate")}}
    path.write_text(json.dumps({"rows": [row], "summary": {"mode": mode, "makespan_s": 1.0}}))
    return path


def test_compare_counts_overlapping_and_disjoint_intervals(rank_study, tmp_path, capsys):
    packed = _record(tmp_path / "p.json", "packed", [0.70, 0.80])
    touching = _record(tmp_path / "s.json", "sequential", [0.80, 0.90])
    rank_study.compare(argparse.Namespace(packed=packed, sequential=touching))
    assert "4/4 metric intervals overlap" in capsys.readouterr().out
    apart = _record(tmp_path / "t.json", "sequential", [0.81, 0.90])
    rank_study.compare(argparse.Namespace(packed=packed, sequential=apart))
    out = capsys.readouterr().out
    assert "0/4 metric intervals overlap" in out and "DISJOINT" in out
