"""generic task: exact match, character F1 and character ROUGE-L."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from loralab.config import EvalConfig
from loralab.scoring.generic import char_f1, lcs_length, rouge_l
from loralab.scoring.tasks import get_task


def lcs_table(a: str, b: str) -> int:
    """The textbook O(n·m) dynamic programme, to check the bit-parallel one against."""
    prev = [0] * (len(b) + 1)
    for ca in a:
        cur = [0]
        for j, cb in enumerate(b):
            cur.append(prev[j] + 1 if ca == cb else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def test_hand_computed_values():
    assert char_f1("abc", "abd") == pytest.approx(2 / 3)
    assert char_f1("aab", "ab") == pytest.approx(2 * 1 * (2 / 3) / (1 + 2 / 3))
    assert rouge_l("abcd", "acbd") == pytest.approx(0.75)
    assert rouge_l("你好世界", "世界你好") == pytest.approx(0.5)
    assert char_f1("xyz", "abc") == 0.0 and rouge_l("xyz", "abc") == 0.0
    assert char_f1("", "") == 1.0 and rouge_l("", "") == 1.0
    assert char_f1("", "a") == 0.0 and rouge_l("a", "") == 0.0


def test_whitespace_is_ignored_by_char_metrics():
    assert char_f1("a b\nc", "abc") == 1.0 and rouge_l(" a bc ", "abc") == 1.0


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="abcde你", max_size=40), st.text(alphabet="abcde你", max_size=40))
def test_bit_parallel_lcs_matches_table(a, b):
    assert lcs_length(a, b) == lcs_table(a, b)


def test_task_score_and_aggregate():
    task = get_task(EvalConfig(task="generic"))
    rows = [task.score("  答案A \n", "答案A"), task.score("", "答案B"), task.score("答案", "答案C")]
    assert [r["exact_match"] for r in rows] == [1.0, 0.0, 0.0]
    assert [r["valid"] for r in rows] == [True, False, True]
    assert rows[0]["parsed"] == "答案A"
    agg = task.aggregate(rows)
    assert agg["exact_match"] == pytest.approx(1 / 3) and agg["valid_rate"] == pytest.approx(2 / 3)
    assert agg["rouge_l"] == pytest.approx((1 + 0 + 2 * 1 * (2 / 3) / (1 + 2 / 3)) / 3)
    assert task.headline == ["exact_match", "char_f1", "rouge_l", "valid_rate"]
