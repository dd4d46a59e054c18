"""tag_scores metrics on hand-computed cases (series part 4 definitions)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from loralab.config import SEED_TAGS, EvalConfig
from loralab.errors import UserError
from loralab.scoring.tag_scores import TagScoresTask
from loralab.scoring.tasks import get_task

TRUTH = {"其他": 3, "云计算": 0, "架构师": 0, "计算机": 0, "个人娱乐": 0, "人工智能": 0,
         "商业案例": 7, "汽车行业": 0, "经济观察": 5}
REF = json.dumps(TRUTH, ensure_ascii=False)


@pytest.fixture
def task() -> TagScoresTask:
    return get_task(EvalConfig())


def dumps(obj) -> str:
    return json.dumps(obj, ensure_ascii=False)


def test_perfect_prediction(task):
    m = task.score(REF, REF)
    assert m["weighted_accuracy"] == 1.0 and m["weighted_error"] == 0.0
    assert m["precision"] == m["recall"] == m["f1"] == 1.0
    assert m["valid"] and m["json_ok"] and not m["out_of_range"]
    assert m["parsed"] == TRUTH


def test_all_zeros_prediction(task):
    m = task.score(dumps(dict.fromkeys(SEED_TAGS, 0)), REF)
    # d = 3 + 7 + 5 = 15; 6 of 9 tags within ±2
    assert m["weighted_accuracy"] == pytest.approx(1 - 15 / 90)
    assert m["weighted_error"] == pytest.approx(15 / 9)
    assert m["precision"] == pytest.approx(6 / 9)
    assert m["recall"] == pytest.approx(6 / 9)
    assert m["f1"] == pytest.approx(6 / 9)
    assert m["valid"]
    assert m["abs_error"]["商业案例"] == 7 and m["abs_error"]["云计算"] == 0


def test_invalid_json_counts_as_empty(task):
    m = task.score("标签: 0.0 其他 其他 其他", REF)
    assert not m["json_ok"] and not m["valid"] and m["parsed"] is None
    assert m["weighted_accuracy"] == pytest.approx(1 - 15 / 90)
    assert m["precision"] == 0.0 and m["recall"] == pytest.approx(6 / 9) and m["f1"] == 0.0


def test_partial_prediction(task):
    m = task.score(dumps({"其他": 3, "商业案例": 4}), REF)
    # d: 其他 0, 商业案例 3, 经济观察 5 (missing → 0); predicted keys 2, one within ±2
    assert m["weighted_error"] == pytest.approx(8 / 9)
    assert m["precision"] == pytest.approx(1 / 2)
    assert m["recall"] == pytest.approx(7 / 9)
    assert m["f1"] == pytest.approx(2 * (1 / 2) * (7 / 9) / (1 / 2 + 7 / 9))
    assert m["json_ok"] and not m["valid"]


def test_non_number_score_counts_as_zero(task):
    for bad in ("3", None, True, [3]):
        m = task.score(dumps({**TRUTH, "其他": bad}), REF)
        assert m["abs_error"]["其他"] == 3, bad
        assert m["precision"] == pytest.approx(8 / 9) and m["recall"] == pytest.approx(8 / 9)
        assert not m["valid"]


def test_out_of_range_kept_not_clamped(task):
    m = task.score(dumps({**TRUTH, "商业案例": 12}), REF)
    assert m["abs_error"]["商业案例"] == 5
    assert m["out_of_range"] and not m["valid"]


def test_float_and_extra_keys_score_but_are_not_valid(task):
    m = task.score(dumps({**TRUTH, "商业案例": 7.0}), REF)
    assert m["weighted_accuracy"] == 1.0 and not m["valid"]
    m = task.score(dumps({**TRUTH, "体育": 1}), REF)
    assert m["f1"] == 1.0 and not m["valid"]


def test_score_range_and_tolerance_from_config():
    task = get_task(EvalConfig(tags=["a", "b"], score_min=1, score_max=5, tolerance=0))
    m = task.score('{"a": 1, "b": 5}', '{"a": 2, "b": 5}')
    assert m["weighted_accuracy"] == pytest.approx(1 - 1 / (2 * 4))
    assert m["f1"] == pytest.approx(0.5)


def test_bad_reference_is_user_error(task):
    with pytest.raises(UserError, match="not a JSON object"):
        task.score(REF, "just text")
    with pytest.raises(UserError, match="经济观察"):
        task.score(REF, dumps({k: v for k, v in TRUTH.items() if k != "经济观察"}))


def test_aggregate_means_and_per_tag_mae(task):
    rows = [task.score(REF, REF), task.score(dumps(dict.fromkeys(SEED_TAGS, 0)), REF),
            task.score("", REF)]
    agg = task.aggregate(rows)
    assert agg["n"] == 3
    assert agg["weighted_accuracy"] == pytest.approx((1 + 2 * (1 - 15 / 90)) / 3)
    assert agg["f1"] == pytest.approx((1 + 6 / 9 + 0) / 3)
    assert agg["valid_rate"] == pytest.approx(2 / 3)
    assert agg["json_rate"] == pytest.approx(2 / 3)
    assert agg["per_tag_mae"]["商业案例"] == pytest.approx(14 / 3)
    assert agg["per_tag_mae"]["云计算"] == 0
    assert agg["task_params"]["tolerance"] == 2


def test_headline_and_direction(task):
    assert task.headline == ["weighted_accuracy", "f1", "weighted_error", "valid_rate"]
    assert task.higher_is_better("f1") and not task.higher_is_better("weighted_error")


scores = st.integers(0, 10)


@settings(max_examples=200, deadline=None)
@given(st.lists(scores, min_size=9, max_size=9), st.lists(scores, min_size=9, max_size=9))
def test_f1_equals_share_within_tolerance_when_all_keys_present(pred, truth):
    task = get_task(EvalConfig())
    m = task.score(dumps(dict(zip(SEED_TAGS, pred, strict=True))), dumps(dict(zip(SEED_TAGS, truth, strict=True))))
    share = sum(abs(p - t) <= 2 for p, t in zip(pred, truth, strict=True)) / 9
    assert m["f1"] == pytest.approx(share)
    assert m["weighted_error"] == pytest.approx(sum(abs(p - t) for p, t in zip(pred, truth, strict=True)) / 9)
    assert 0 <= m["weighted_accuracy"] <= 1 and m["valid"]
