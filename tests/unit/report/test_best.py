"""The best adapter of a comparison and whether the eval can tell it apart (known answers)."""

from __future__ import annotations

from pathlib import Path

import pytest

from loralab.report.best import best_adapter, verdict_lines
from loralab.report.tables import LoadedTarget

N = 40


def target(name: str, kind: str, metric: str, values: list[float]) -> LoadedTarget:
    rows = [{"input": f"article {i}", "reference": "{}", metric: v} for i, v in enumerate(values)]
    return LoadedTarget(name, kind, Path(name), {metric: sum(values) / len(values)}, rows)


def test_best_is_told_from_the_floor_but_not_from_a_near_twin():
    m = "weighted_accuracy"
    a = [0.9] * N
    b = [0.9] * (N - 2) + [0.8, 0.8]  # differs from a on 2 of 40 records only
    targets = [target("c", "adapter", m, [0.6] * N), target("b", "adapter", m, b),
               target("a", "adapter", m, a), target("zeros", "reference", m, [0.5] * N),
               target("mean", "reference", m, [0.4] * N)]
    verdict = best_adapter(targets, "tag_scores", m, bootstrap=1000, seed=0)
    assert verdict["best"] == "a" and verdict["value"] == pytest.approx(0.9)
    runner = verdict["runner_up"]
    assert runner.other == "b" and runner.lead == pytest.approx(0.2 / N)
    assert not runner.distinguishable and runner.p_value > 0.05 and runner.low == 0
    ref = verdict["reference"]
    assert ref.other == "zeros" and ref.lead == pytest.approx(0.4) and ref.distinguishable
    lines = verdict_lines(verdict)
    assert lines[0].startswith("best adapter by weighted_accuracy (higher is better): a (0.900)")
    assert "NOT distinguishable" in lines[1] and lines[2].endswith(", distinguishable")


def test_lower_is_better_metrics_pick_the_smallest_and_sign_the_lead_positive():
    m = "weighted_error"
    targets = [target("worse", "adapter", m, [0.3] * N), target("better", "adapter", m, [0.1] * N),
               target("zeros", "reference", m, [1.0] * N)]
    verdict = best_adapter(targets, "tag_scores", m, bootstrap=200)
    assert verdict["best"] == "better"
    assert verdict["runner_up"].lead == pytest.approx(0.2) and verdict["runner_up"].distinguishable
    assert verdict["reference"].lead == pytest.approx(0.9)


def test_no_adapter_no_verdict_and_other_records_no_test():
    m = "f1"
    assert best_adapter([target("zeros", "reference", m, [0.5] * N)], "tag_scores", m) is None
    other = target("elsewhere", "adapter", m, [0.1] * (N - 1))
    verdict = best_adapter([target("a", "adapter", m, [0.9] * N), other], "tag_scores", m)
    assert verdict["runner_up"].lead is None and verdict["reference"] is None
    assert "no paired test" in verdict_lines(verdict)[1]


def test_report_names_the_best_trial(built):
    comp, result = built
    assert result["best"]["best"] == "r8-lr1e-4"
    assert result["best"]["runner_up"].other == "r16-lr1e-3"
    assert result["best"]["runner_up"].distinguishable
    assert "## Best adapter" in (comp / "comparison.md").read_text(encoding="utf-8")
    assert "best adapter by weighted_accuracy" in (comp / "report.html").read_text(encoding="utf-8")
