"""The key-agnostic config plumbing, on a toy dataclass (loralab's keys: test_config.py)."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from loralab.config_io import build_dataclass, get_dotted, parse_override, set_dotted
from loralab.errors import UserError

KEYS = ["rate", "flag", "label", "inner.n", "inner.names"]


@dataclass
class Inner:
    n: int = 1
    names: list[str] = field(default_factory=list)


@dataclass
class Outer:
    rate: float = 0.1
    flag: bool = False
    label: str | None = None
    inner: Inner = field(default_factory=Inner)


def test_nested_mappings_become_checked_dataclasses():
    raw = {"rate": "1e-4", "label": None, "inner": {"n": 3.0, "names": "a, b"}}
    assert build_dataclass(Outer, raw, "", KEYS) == Outer(rate=1e-4, inner=Inner(3, ["a", "b"]))


@pytest.mark.parametrize("raw,message", [
    ({"inner": {"n": 1.5}}, "inner.n must be an integer, got 1.5"),
    ({"flag": "yes"}, "flag must be true or false"),
    ({"inner": {"nams": []}}, "unknown config key inner.nams; did you mean inner.names?"),
    ({"inner": 3}, "inner must be a mapping"),
])
def test_bad_values_and_keys_name_the_key(raw, message):
    with pytest.raises(UserError, match=message.replace("?", r"\?")):
        build_dataclass(Outer, raw, "", KEYS)


def test_overrides_set_dotted_values_read_as_yaml():
    raw: dict = {}
    for item in ("a.b=1e-4", "a.c=[1, 2]", "d=null"):
        set_dotted(raw, *parse_override(item))
    assert raw == {"a": {"b": 1e-4, "c": [1, 2]}, "d": None}
    assert get_dotted(raw, "a.b") == 1e-4 and get_dotted(raw, "a.x.y") is None
    with pytest.raises(UserError, match="cannot set a.b.c: b is not a section"):
        set_dotted(raw, "a.b.c", 1)
    with pytest.raises(UserError, match="must look like key=value"):
        parse_override("lora.r")
