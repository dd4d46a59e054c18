"""Issue 15, config: duplicate keys, NaN/inf and values of another YAML type are one-line errors
naming the key, found before anything is written."""

from __future__ import annotations

import contextlib
import io
import math
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loralab.config import Config, known_keys, load_config
from loralab.config_io import field_type
from loralab.errors import UserError


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize("text, key", [
    ("train: {lr: 1.0e-3}\nlora: {r: 4}\ntrain: {epochs: 2}\n", "duplicate key train "),
    ("train:\n  lr: 1.0e-3\n  epochs: 2\n  lr: 2.0e-3\n", "duplicate key train.lr "),
    ("output_dir: a\noutput_dir: b\n", "duplicate key output_dir "),
])
def test_a_duplicate_yaml_key_is_an_error_naming_it(tmp_path, text, key):
    with pytest.raises(UserError, match=key):
        load_config(write(tmp_path, text))


def test_yaml_merge_keys_are_not_duplicates(tmp_path):
    cfg = load_config(write(tmp_path, "data: {path: x.json}\ntrain:\n  <<: {lr: 0.5}\n  lr: 0.25\n"))
    assert cfg.train.lr == 0.25


@pytest.mark.parametrize("item, key", [
    ("train.lr=.nan", "train.lr must be a finite number"),
    ("train.lr=.inf", "train.lr must be a finite number"),
    ("train.lr=1e400", "train.lr must be a finite number"),
    ("lora.dropout=-.inf", "lora.dropout must be a finite number"),
    ("lora.r=.inf", "lora.r must be a finite integer"),
    ("train.max_steps=.nan", "train.max_steps must be a finite integer"),
])
def test_nan_and_inf_are_refused(item, key):
    with pytest.raises(UserError, match=key):
        load_config(None, ["data.path=x.json", item])


@pytest.mark.parametrize("text, message", [
    ("data: {path: x.json, system_prompt: no}", "data.system_prompt must be a string, got False"),
    ("tracking: {experiment: 1.50}", "tracking.experiment must be a string, got 1.5"),
    ("model: {path: 7}", "model.path must be a string"),
    ("lora: {target_modules: [q_proj, 1]}", "lora.target_modules must be a string"),
    ("train: {scheduler: yes}", "train.scheduler must be a string"),
])
def test_a_value_yaml_reads_as_another_type_is_an_error_naming_the_key(tmp_path, text, message):
    if not text.startswith("data"):
        text += "\ndata: {path: x.json}"
    with pytest.raises(UserError, match=message):
        load_config(write(tmp_path, text + "\n"))


def test_on_off_switches_and_command_line_strings_keep_working(tmp_path):
    cfg = load_config(write(tmp_path, "data: {path: x.json}\ntrain: {packing: on, compile: off}\n"),
                      ["tracking.experiment=2024", "model.path=Qwen/Qwen2.5-7B"])
    assert (cfg.train.packing, cfg.train.compile) == ("on", "off")
    assert cfg.tracking.experiment == "2024"


def test_nan_in_a_sweep_grid_is_one_line(tmp_path):
    from loralab.sweep.spec import load_sweep

    base = write(tmp_path, "data: {path: x.json}\n")
    sweep = tmp_path / "s.yaml"
    sweep.write_text(f"base: {base}\ngrid: {{train.lr: [1.0e-4, .nan, .inf]}}\n")
    with pytest.raises(UserError, match="train.lr must be a finite number") as info:
        load_sweep(sweep)
    assert "\n" not in str(info.value) and "trial lr-nan" in str(info.value)


# ---------------------------------------------------------------- property: every invalid config

FIELDS = {k: None for k in known_keys()}


def _type_of(key: str):
    cls = Config
    for part in key.split("."):
        cls = field_type(cls, part)
    return cls


def _simple(ftype) -> str | None:
    import types
    import typing

    if typing.get_origin(ftype) in (typing.Union, types.UnionType):
        ftype = [a for a in typing.get_args(ftype) if a is not type(None)][0]
    return {int: "int", float: "float", str: "str", bool: "bool"}.get(ftype)


BY_TYPE = {kind: [k for k in FIELDS if _simple(_type_of(k)) == kind]
           for kind in ("int", "float", "str", "bool")}
SWITCHES = {"train.packing", "train.compile", "train.fused_lora", "train.gradient_checkpointing"}
# YAML texts that are never a valid value of a field of that type.
WRONG = {
    "int": [".nan", ".inf", "-.inf", "1.5", "yes", "[1, 2]", "{a: 1}", "'four'"],
    "float": [".nan", ".inf", "-.inf", "yes", "[1.0]", "{a: 1}", "'fast'"],
    "str": ["yes", "no", "1.5", "3", "[a, b]", "{a: 1}", "null"],
    "bool": ["1", "0.5", "'maybe'", "[true]", "{a: 1}", "null"],
}


def _nest(key: str, value_text: str, indent_style: bool) -> str:
    parts = key.split(".")
    if len(parts) == 1:
        return f"{key}: {value_text}\n"
    if indent_style:
        return f"{parts[0]}:\n  {parts[1]}: {value_text}\n"
    return f"{parts[0]}: {{{parts[1]}: {value_text}}}\n"


@st.composite
def invalid_configs(draw):
    """(YAML text, the key the error must name): a wrong-typed value, a non-finite number, a
    duplicate key, a section that is not a mapping or an unknown key, among valid keys."""
    kind = draw(st.sampled_from(["wrong_type", "duplicate", "section", "unknown"]))
    valid = "output_dir: OUT\ndata:\n  path: x.json\n"
    if kind == "wrong_type":
        ftype = draw(st.sampled_from(list(WRONG)))
        keys = [k for k in BY_TYPE[ftype] if k not in SWITCHES or ftype != "str"]
        key = draw(st.sampled_from(keys))
        text = draw(st.sampled_from(WRONG[ftype]))
        if ftype == "str" and text == "null" and "None" in str(_type_of(key)):
            text = "[x]"  # null is a fine value of an optional string
        if key == "output_dir":
            return _nest(key, text, False) + "data:\n  path: x.json\n", key
        body = _nest(key, text, draw(st.booleans()))
        return (valid + body if not key.startswith("data.") else
                "output_dir: OUT\n" + body.replace("data:\n", "data:\n  path: x.json\n")
                .replace("data: {", "data: {path: x.json, ")), key
    if kind == "duplicate":
        key = draw(st.sampled_from(BY_TYPE["float"] + BY_TYPE["int"]))
        section, name = key.split(".")
        twice = f"  {name}: 1\n  {name}: 2\n"
        return valid + (twice if section == "data" else f"{section}:\n{twice}"), key
    if kind == "section":
        section = draw(st.sampled_from(["model", "lora", "train", "tracking", "eval"]))
        return valid + f"{section}: {draw(st.sampled_from(['5', '[1, 2]', 'text']))}\n", section
    name = draw(st.sampled_from(["learning_rate", "epoch", "ranks", "x"]))
    section = draw(st.sampled_from(["train", "lora", ""]))
    key = f"{section}.{name}" if section else name
    return valid + _nest(key, "1", draw(st.booleans())), key


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(invalid_configs())
def test_every_invalid_config_is_one_line_exit_2_and_writes_nothing(case):
    from loralab.cli import main

    text, key = case
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        path = Path(tmp) / "c.yaml"
        path.write_text(text.replace("OUT", str(out)), encoding="utf-8")
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = main(["train", str(path), "--dry-run"])
        lines = err.getvalue().strip().splitlines()
        assert code == 2, (text, err.getvalue())
        assert len(lines) == 1 and lines[0].startswith("loralab: error:"), lines
        assert key in lines[0], (key, lines[0])
        assert sorted(p.name for p in Path(tmp).iterdir()) == ["c.yaml"], "nothing written"


def test_the_cli_exits_2_with_one_line_for_an_invalid_config(tmp_path):
    import subprocess
    import sys

    cfg = write(tmp_path, f"output_dir: {tmp_path / 'run'}\ndata: {{path: x.json}}\n"
                          "train: {lr: .nan}\n")
    out = subprocess.run([sys.executable, "-m", "loralab.cli", "train", str(cfg)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "loralab: error: train.lr must be a finite number, got nan"]
    assert not (tmp_path / "run").exists()
    assert math.isnan(float("nan"))


def test_a_bug_met_while_handling_a_missing_file_keeps_its_traceback():
    """A KeyError raised inside `except FileNotFoundError` is ours, not the user's file."""
    from loralab.cli import _is_user_file_error

    try:
        try:
            with open("/nonexistent/loralab/file"):
                pass
        except FileNotFoundError:
            {}["missing"]
    except KeyError as exc:
        assert not _is_user_file_error(exc)
    try:
        raise RuntimeError("could not save") from FileNotFoundError(2, "gone", "/x")
    except RuntimeError as exc:
        assert _is_user_file_error(exc)  # an explicit cause: the user's missing file
    try:
        try:
            raise OSError(28, "No space left on device")
        except OSError:
            raise RuntimeError("cleanup failed") from None
    except RuntimeError as exc:
        assert not _is_user_file_error(exc)  # `from None`: the context was suppressed
