from __future__ import annotations

import re

from hypothesis import given
from hypothesis import strategies as st

from loralab.sweep.naming import format_value, key_label, trial_name


def test_format_value_reads_like_the_seed():
    assert format_value(1e-4) == "1e-4"
    assert format_value(2.5e-4) == "2.5e-4"
    assert format_value(1e-3) == "1e-3"
    assert format_value(4.0) == "4"
    assert format_value(0.1) == "0.1"
    assert format_value(None) == "all"
    assert format_value(True) == "on"
    assert format_value("a b/c") == "a-b-c"
    assert format_value(["q_proj", "v_proj"]) == "q_proj+v_proj".replace("_", "-")


def test_trial_name_from_the_swept_keys_in_order():
    keys = ["lora.r", "train.lr", "data.limit", "train.epochs"]
    point = {"train.epochs": 4, "data.limit": 50, "lora.r": 8, "train.lr": 1e-4}
    assert trial_name(point, keys) == "r8_lr1e-4_limit50_ep4"
    assert trial_name({**point, "data.limit": None}, keys) == "r8_lr1e-4_limitall_ep4"


def test_unknown_keys_use_their_last_part_or_the_whole_key_when_ambiguous():
    assert trial_name({"train.scheduler": "cosine"}, ["train.scheduler"]) == "scheduler-cosine"
    keys = ["eval.batch_size", "train.batch_size"]
    assert key_label("eval.batch_size", keys) == "eval-batch_size"
    assert trial_name({}, []) == "base"


@given(st.floats(min_value=1e-8, max_value=1e3, allow_nan=False), st.integers(1, 10_000))
def test_names_are_path_safe_and_stable(lr, limit):
    point = {"train.lr": lr, "data.limit": limit}
    name = trial_name(point, ["train.lr", "data.limit"])
    assert re.fullmatch(r"[A-Za-z0-9._+-]+", name)
    assert name == trial_name(dict(point), ["train.lr", "data.limit"])
    assert name.endswith(f"_limit{limit}")


@given(st.lists(st.floats(min_value=1e-7, max_value=1.0), min_size=2, max_size=6, unique=True))
def test_distinct_learning_rates_get_distinct_names(lrs):
    # 7 significant digits are kept: values closer than that may collide (spec reports it).
    names = {format_value(lr) for lr in lrs}
    distinct = {float(f"{lr:.6e}") for lr in lrs}
    assert len(names) == len(distinct)
