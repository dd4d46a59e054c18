"""parse_tag_json on what models actually write: fences, prose, repairs, junk."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from loralab.scoring.tag_scores import parse_tag_json


def test_plain_object():
    assert parse_tag_json('{"其他": 3, "云计算": 0}') == {"其他": 3, "云计算": 0}


def test_code_fence():
    assert parse_tag_json('```json\n{"a": 1, "b": 2}\n```') == {"a": 1, "b": 2}


def test_surrounding_prose():
    assert parse_tag_json('好的，评分如下：{"a": 1} 希望有帮助') == {"a": 1}


def test_trailing_comma_repaired():
    assert parse_tag_json('{"a": 1, "b": 2,}') == {"a": 1, "b": 2}
    assert parse_tag_json('{"a": [1, 2,], }') == {"a": [1, 2]}


def test_full_width_quotes_and_punctuation():
    assert parse_tag_json("{“其他”：3，“云计算”: 0}") == {"其他": 3, "云计算": 0}


def test_python_style_single_quotes():
    assert parse_tag_json("{'a': 1}") == {"a": 1}


def test_first_object_that_parses_wins():
    assert parse_tag_json('{broken} then {"a": 1} and {"b": 2}') == {"a": 1}


def test_nested_object_returned_whole():
    assert parse_tag_json('x {"a": {"b": 1}} y') == {"a": {"b": 1}}


def test_invalid_outputs_are_none():
    for text in ["", "标签: 0.0\n其他: 3", "[1, 2]", '{"a": 1, "b":', "{{{{", "null", "}}"]:
        assert parse_tag_json(text) is None, text
    assert parse_tag_json(None) is None
    assert parse_tag_json(42) is None


def test_truncated_generation_repeating_a_tag_is_none():
    assert parse_tag_json('{"其他": 3, "其他其他其他其他其他其他' * 20) is None


def test_deep_nesting_does_not_raise():
    assert parse_tag_json("{" * 100_000) is None
    deep = '{"a": ' * 5000 + "1" + "}" * 5000
    assert parse_tag_json(deep) is None or isinstance(parse_tag_json(deep), dict)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(), children, max_size=3),
    max_leaves=10,
)


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_never_raises_on_any_text(text):
    result = parse_tag_json(text)
    assert result is None or isinstance(result, dict)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.text(), json_values, max_size=6), st.booleans())
def test_round_trips_json_dumps(obj, ascii_only):
    assert parse_tag_json(json.dumps(obj, ensure_ascii=ascii_only)) == obj


@settings(max_examples=100, deadline=None)
@given(
    st.dictionaries(st.text(min_size=1), st.integers(0, 10), min_size=1, max_size=9),
    st.text().filter(lambda s: "{" not in s and "｛" not in s),
    st.text(),
)
def test_round_trips_inside_prose(obj, before, after):
    assert parse_tag_json(before + json.dumps(obj, ensure_ascii=False) + after) == obj
