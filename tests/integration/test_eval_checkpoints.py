"""Checkpoints evaluated on the tiny model: one alone without --config, and a run as a curve."""

from __future__ import annotations

import csv

import pytest

from loralab.cli import main
from loralab.io import read_json


@pytest.fixture(scope="module")
def run_with_checkpoints(train_tiny_run):
    """3 steps, a checkpoint after each of the first two (the last step is the final adapter)."""
    return train_tiny_run("ckpt", "data.eval_path={small_data}", "train.max_steps=3", "train.save_every=1",
                          "eval.max_new_tokens=4", "eval.bootstrap=20")[0]


def _checkpoints(run):
    return sorted((run / "checkpoints").glob("step-*"))


def test_a_checkpoint_evaluates_without_config(run_with_checkpoints, tmp_path, capsys):
    ckpt = _checkpoints(run_with_checkpoints)[-1]
    code = main(["eval", "--adapters", str(ckpt), "--limit", "2", "--out", str(tmp_path / "a")])
    assert code == 0, capsys.readouterr().err
    metrics = read_json(ckpt / "eval" / "metrics.json")
    assert metrics["target"] == "run@step-2" and metrics["step"] == 2
    assert metrics["hyperparams"]["lora.r"] == 8  # from the run's config.yaml, two levels up
    # the run's config names builtin:tiny-qwen2, the checkpoint its cache folder: one base
    code = main(["eval", "--adapters", str(ckpt), "--limit", "2", "--out", str(tmp_path / "b"),
                 "--config", str(run_with_checkpoints / "config.yaml")])
    assert code == 0, capsys.readouterr().err


def test_checkpoints_of_a_run_as_a_curve(run_with_checkpoints, capsys):
    run = run_with_checkpoints
    assert len(_checkpoints(run)) == 2
    assert main(["eval", "--checkpoints", str(run), "--base", "--limit", "2"]) == 0
    out = capsys.readouterr().out
    curve = run / "checkpoint_curve"
    with open(curve / "comparison.csv", encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f) if r["kind"] == "adapter"]
    assert [(r["target"], r["step"]) for r in rows] == [
        ("run@step-1", "1"), ("run@step-2", "2"), ("run", "3")]
    assert (curve / "checkpoints.png").read_bytes()[:4] == b"\x89PNG"
    assert "by checkpoint step" in out and "best adapter by weighted_accuracy" in out
    assert "By checkpoint step" in (curve / "report.html").read_text(encoding="utf-8")
