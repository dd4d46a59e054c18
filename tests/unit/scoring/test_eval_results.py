"""score_predictions and the on-disk contract: write, read back, manifests, hyperparams."""

from __future__ import annotations

import json

import pytest

from loralab.config import Config, EvalConfig, save_config
from loralab.errors import UserError
from loralab.layout import ComparisonDir
from loralab.scoring.tasks import (
    get_task,
    hyperparams_from_run,
    read_target,
    record_values,
    score_predictions,
    write_target_results,
)

REF = '{"a": 2, "b": 0}'
CFG = EvalConfig(tags=["a", "b"])


def rows():
    return [
        {"input": "x1", "reference": REF, "generation": '{"a": 2, "b": 0}', "finished": True},
        {"input": "x2", "reference": REF, "generation": '{"a": 9, "b": 0}', "finished": True},
        {"input": "x3", "reference": REF, "generation": "a a a a", "finished": False},
    ]


def test_score_predictions_keeps_fields_and_adds_metrics():
    scored, metrics = score_predictions(get_task(CFG), rows(), bootstrap=200, seed=0)
    assert [r["input"] for r in scored] == ["x1", "x2", "x3"]
    assert [r["valid"] for r in scored] == [True, True, False]
    assert metrics["task"] == "tag_scores" and metrics["n"] == 3
    assert metrics["finished_rate"] == pytest.approx(2 / 3)
    assert metrics["valid_rate"] == pytest.approx(2 / 3)
    for m in ("weighted_accuracy", "f1", "weighted_error", "valid_rate"):
        low, high = metrics["ci"][m]
        assert low <= metrics[m] <= high
    assert record_values("tag_scores", scored, "valid_rate") == [1.0, 1.0, 0.0]


def test_score_predictions_is_reproducible_and_bootstrap_can_be_off():
    a = score_predictions(get_task(CFG), rows(), bootstrap=200, seed=1)[1]
    assert a == score_predictions(get_task(CFG), rows(), bootstrap=200, seed=1)[1]
    assert "ci" not in score_predictions(get_task(CFG), rows(), bootstrap=0)[1]


def test_bad_reference_names_the_record():
    bad = rows()
    bad[1]["reference"] = "oops"
    with pytest.raises(UserError, match="record 2"):
        score_predictions(get_task(CFG), bad)


def test_write_then_read_target(tmp_path):
    scored, metrics = score_predictions(get_task(CFG), rows(), bootstrap=50)
    metrics = {"target": "run1", "kind": "adapter", "run_dir": None, **metrics}
    write_target_results(tmp_path / "eval", scored, metrics)
    back_metrics, back_rows = read_target(tmp_path / "eval")
    assert back_metrics == json.loads(json.dumps(metrics))
    assert back_rows == json.loads(json.dumps(scored, ensure_ascii=False))


def test_write_rejects_incomplete_metrics(tmp_path):
    with pytest.raises(ValueError, match="kind"):
        write_target_results(tmp_path, [], {"target": "x", "task": "generic", "n": 0})


def test_read_target_errors_are_one_line_user_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        read_target(tmp_path)
    (tmp_path / "predictions.jsonl").write_text("{}\n")
    (tmp_path / "metrics.json").write_text("{oops")
    with pytest.raises(UserError, match="not valid JSON"):
        read_target(tmp_path)
    (tmp_path / "metrics.json").write_text('{"target": "t", "kind": "base", "task": "generic"}')
    with pytest.raises(UserError, match="lacks n"):
        read_target(tmp_path)
    (tmp_path / "metrics.json").write_text(
        '{"target": "t", "kind": "base", "task": "generic", "n": 2}')
    with pytest.raises(UserError, match="1 readable rows"):
        read_target(tmp_path)


def test_targets_manifest_round_trip_relative(tmp_path):
    comp = tmp_path / "sweep" / "comparison"
    targets = [comp / "base", tmp_path / "sweep" / "t1" / "eval"]
    ComparisonDir(comp).write_targets(targets)
    stored = json.loads((comp / "targets.json").read_text())["targets"]
    assert stored == ["base", "../t1/eval"]
    assert ComparisonDir(comp).read_targets() == [t.resolve() for t in targets]


def test_bad_targets_manifest(tmp_path):
    (tmp_path / "targets.json").write_text('{"targets": "base"}')
    with pytest.raises(UserError, match="targets"):
        ComparisonDir(tmp_path).read_targets()


def test_hyperparams_from_run_config(tmp_path):
    cfg = Config()
    cfg.lora.r, cfg.train.lr, cfg.data.limit = 16, 3e-4, 100
    save_config(cfg, tmp_path / "config.yaml")
    hp = hyperparams_from_run(tmp_path)
    assert hp["lora.r"] == 16 and hp["train.lr"] == pytest.approx(3e-4)
    assert hp["data.limit"] == 100 and hp["train.epochs"] == 4 and hp["train.max_steps"] is None


def test_unknown_task_name_is_user_error():
    from loralab.scoring.tasks import headline_metrics

    with pytest.raises(UserError):
        headline_metrics("nope")


def test_compile_on_off_and_automatic():
    from loralab.evaluate.runner import COMPILE_AUTO_TOKENS, want_compile

    assert want_compile("on", False, 0) and not want_compile("off", True, 10**9)
    assert want_compile("auto", True, COMPILE_AUTO_TOKENS)
    assert not want_compile("auto", True, COMPILE_AUTO_TOKENS - 1)
    assert not want_compile("auto", False, 10**9)  # never on the CPU unless asked
