"""Reference predictors from training answers, checked against hand-computed scores."""

from __future__ import annotations

import json

import pytest

from loralab.config import EvalConfig
from loralab.errors import UserError
from loralab.scoring.references import reference_predictors, score_references
from loralab.scoring.tasks import read_target

TAGS = ["a", "b", "c"]
CFG = EvalConfig(tags=TAGS)
TRAIN = ['{"a": 1, "b": 0, "c": 10}', '{"a": 2, "b": 0, "c": 0}', '```json\n{"a": 6, "b": 1}\n```',
         "not json at all"]
# a: [1, 2, 6] → mean 3, median 2; b: [0, 0, 1] → mean 0.33 → 0, median 0;
# c: [10, 0, 0 (missing)] → mean 3.33 → 3, median 0


def test_tag_reference_answers():
    preds = reference_predictors(CFG, TRAIN)
    assert set(preds) == {"empty", "all_zeros", "train_mean", "train_median"}
    record = {"input": "x", "reference": "{}"}
    assert preds["empty"](record) == ""
    assert json.loads(preds["all_zeros"](record)) == {"a": 0, "b": 0, "c": 0}
    assert json.loads(preds["train_mean"](record)) == {"a": 3, "b": 0, "c": 3}
    assert json.loads(preds["train_median"](record)) == {"a": 2, "b": 0, "c": 0}


def test_median_rounds_half_up():
    preds = reference_predictors(EvalConfig(tags=["a"]), ['{"a": 2}', '{"a": 3}'])
    assert json.loads(preds["train_median"]({})) == {"a": 3}


def test_generic_most_frequent():
    preds = reference_predictors(EvalConfig(task="generic"), ["x", " y ", "y", "x", "z"])
    assert preds["most_frequent"]({}) == "x"


def test_no_parsable_training_answer_is_user_error():
    with pytest.raises(UserError, match="training answer"):
        reference_predictors(CFG, ["nope"])


def test_scored_references_match_hand_computation(tmp_path):
    rows = [{"input": "1", "reference": '{"a": 3, "b": 0, "c": 0}'},
            {"input": "2", "reference": '{"a": 0, "b": 4, "c": 10}'}]
    folders = score_references(CFG, TRAIN, rows, tmp_path, bootstrap=100)
    assert sorted(f.name for f in folders) == ["all_zeros", "empty", "train_mean", "train_median"]
    metrics, preds = read_target(tmp_path / "references" / "all_zeros")
    assert metrics["kind"] == "reference" and metrics["target"] == "all_zeros"
    # record 1: d = 3, 0, 0 → wa 1 - 3/30, recall 2/3 = f1; record 2: d = 0, 4, 10 → wa 1 - 14/30
    assert metrics["weighted_accuracy"] == pytest.approx(1 - 17 / 60)
    assert metrics["f1"] == pytest.approx((2 / 3 + 1 / 3) / 2)
    assert metrics["valid_rate"] == 1.0
    assert [p["input"] for p in preds] == ["1", "2"]
    empty, _ = read_target(tmp_path / "references" / "empty")
    assert empty["f1"] == 0.0 and empty["weighted_accuracy"] == metrics["weighted_accuracy"]
    mean, _ = read_target(tmp_path / "references" / "train_mean")
    # prediction a=3, b=0, c=3: record 1 d = 0, 0, 3; record 2 d = 3, 4, 7
    assert mean["weighted_error"] == pytest.approx((3 / 3 + 14 / 3) / 2)
