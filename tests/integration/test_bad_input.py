"""Every user error ends with one clear line on stderr and exit code 2, and touches no run."""

from __future__ import annotations

import json

import pytest

from loralab.cli import main
from loralab.commands.train import demo_config_path


def run_train(capsys, *args) -> tuple[int, str]:
    code = main(["train", *map(str, args), "--quiet"])
    err = capsys.readouterr().err.strip()
    return code, err


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2
    lines = [line for line in err.splitlines() if line.startswith("loralab: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


GOOD = {"instruction": "分类", "input": "一篇文章", "output": '{"其他": 1}'}


@pytest.mark.parametrize(
    "override, needles",
    [
        ("lora.rank=4", ["unknown config key lora.rank", "lora.r"]),
        ("lora.r=0", ["lora.r must be > 0"]),
        ("train.lr=0", ["train.lr must be > 0"]),
        ("train.lr=-1e-4", ["train.lr must be > 0"]),
        ("data.limit=0", ["data.limit must be > 0"]),
        ("train.batch_size=two", ["train.batch_size must be an integer"]),
        ("train.scheduler=exp", ["train.scheduler must be one of"]),
    ],
)
def test_bad_config_values(capsys, overrides, override, needles):
    assert_one_line_error(*run_train(capsys, demo_config_path(), *overrides, override), *needles)


def test_missing_config_file(capsys, tmp_path):
    assert_one_line_error(*run_train(capsys, tmp_path / "nope.yaml"), "config file not found")


def test_invalid_yaml_and_unknown_top_key(capsys, tmp_path, overrides):
    assert_one_line_error(*run_train(capsys, write(tmp_path, "bad.yaml", "train: [1, 2\n")), "not valid YAML")
    cfg = write(tmp_path, "typo.yaml", "ouput_dir: x\n")
    assert_one_line_error(*run_train(capsys, cfg), "unknown config key ouput_dir", "output_dir")


@pytest.mark.parametrize(
    "content, needles",
    [
        ('[{"instruction": "a", "input": "b", "output": "c"},\n {"instruction": }]', ["line 2"]),
        (json.dumps([GOOD, {"instruction": "a", "input": "b"}]), ["record 2"]),
        (json.dumps([GOOD, {**GOOD, "output": ""}]), ["record 2", "empty"]),
        ("[]", ["holds no records"]),
    ],
)
def test_bad_data_files(capsys, tmp_path, overrides, content, needles):
    data = write(tmp_path, "data.json", content)
    code, err = run_train(capsys, demo_config_path(), *overrides, f"data.path={data}")
    assert_one_line_error(code, err, *needles)
    assert not (tmp_path / "run").exists(), "a failed check must not create the run"


def test_missing_data_file(capsys, tmp_path, overrides):
    code, err = run_train(capsys, demo_config_path(), *overrides, f"data.path={tmp_path / 'none.json'}")
    assert_one_line_error(code, err, "none.json")


def test_answer_longer_than_max_length(capsys, overrides):
    assert_one_line_error(*run_train(capsys, demo_config_path(), *overrides, "data.max_length=40"), "max_length")


def test_target_modules_that_match_nothing(capsys, overrides, tmp_path):
    code, err = run_train(capsys, demo_config_path(), *overrides, "lora.target_modules=[query,value]")
    assert_one_line_error(code, err, "match nothing", "q_proj")
    assert not (tmp_path / "run").exists()


def test_empty_after_filtering_sample_and_limit(capsys, overrides):
    code, err = run_train(capsys, demo_config_path(), *overrides, "data.limit=2", "data.sample=2")
    assert_one_line_error(code, err, "exclusive")
