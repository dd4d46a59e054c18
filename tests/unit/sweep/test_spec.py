from __future__ import annotations

from pathlib import Path

import pytest

from loralab.errors import UserError
from loralab.sweep.spec import load_sweep


def test_grid_is_the_cartesian_product_with_names_and_run_dirs(write_sweep, tmp_path):
    path = write_sweep({
        "name": "study",
        "overrides": {"train.epochs": 4},
        "grid": {"lora.r": [4, 8], "train.lr": ["1e-4", 1.0e-3], "data.limit": [50, None]},
    })
    spec = load_sweep(path)
    assert len(spec.trials) == 8
    assert spec.varying == ["lora.r", "train.lr", "data.limit"]
    first = spec.trials[0]
    assert first.name == "r4_lr1e-4_limit50"
    assert first.overrides == {"lora.r": 4, "train.lr": 1e-4, "data.limit": 50}
    cfg = first.config
    assert (cfg.lora.r, cfg.train.lr, cfg.data.limit, cfg.train.epochs) == (4, 1e-4, 50, 4)
    assert cfg.output_dir == str(tmp_path / "out" / first.name)
    assert (cfg.tracking.group, cfg.tracking.experiment) == ("study", first.name)
    assert cfg.data.path == str((tmp_path / "records.json").resolve())  # relative to the base file
    assert spec.trials[-1].name == "r8_lr1e-3_limitall" and spec.trials[-1].config.data.limit is None
    assert len({t.name for t in spec.trials}) == 8


def test_trials_list_times_grid_and_cli_overrides(write_sweep, tmp_path):
    path = write_sweep({"grid": {"lora.r": [4, 8]}, "trials": [{"train.lr": 1e-4}, {"train.lr": 1e-3, "train.epochs": 2}]})
    spec = load_sweep(path, ["train.max_steps=3", f"output_dir={tmp_path / 'other'}", "sweep.parallel=2"])
    assert [t.name for t in spec.trials] == ["r4_lr1e-4", "r4_lr1e-3_ep2", "r8_lr1e-4", "r8_lr1e-3_ep2"]
    assert all(t.config.train.max_steps == 3 for t in spec.trials)
    assert spec.trials[1].config.train.epochs == 2 and spec.trials[0].config.train.epochs == 4
    assert spec.output_dir == tmp_path / "other" and spec.parallel == 2
    assert spec.trials[0].config.output_dir == str(tmp_path / "other" / "r4_lr1e-4")


def test_base_relative_to_the_sweep_file_and_name_from_file(base_config, tmp_path):
    sub = tmp_path / "sweeps"
    sub.mkdir()
    path = sub / "ranks.yaml"
    path.write_text("base: ../train.yaml\ngrid:\n  lora.r: [4]\n")
    spec = load_sweep(path)
    assert spec.base == base_config.resolve() and spec.name == "ranks"
    assert spec.output_dir == Path("runs/sweeps/ranks") and spec.parallel == "auto"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"grid": {}}, "grid is empty"),
        ({"grid": {"lora.r": []}}, "grid.lora.r must be a non-empty list"),
        ({"trials": []}, "trials is empty"),
        ({}, "no trials"),
        ({"grid": {"lora.rank": [4]}}, "unknown config key lora.rank; did you mean lora.r?"),
        ({"grid": {"lora.r": [4]}, "overrides": {"train.lrr": 1}}, "did you mean train.lr?"),
        ({"grid": {"lora.r": [4]}, "parallell": 2}, "unknown sweep key parallell"),
        ({"grid": {"lora.r": [4]}, "sweep": {"parallel": 0}}, "sweep.parallel must be auto"),
        ({"grid": {"output_dir": ["a"]}}, "cannot set output_dir"),
        ({"trials": [{"lora.r": 4}, {"lora.r": 4}]}, "share a name"),
        ({"base": "missing.yaml", "grid": {"lora.r": [4]}}, "base config not found"),
    ],
)
def test_bad_sweep_files_are_one_user_error(write_sweep, body, message):
    with pytest.raises(UserError, match="^.*" + message.replace("?", r"\?").replace(".", r"\.")):
        load_sweep(write_sweep(body))


def test_every_error_is_reported_at_once_before_training(write_sweep):
    path = write_sweep({"grid": {"lora.r": [0, -1, 8], "train.lr": [-1.0, 1e-4]}})
    with pytest.raises(UserError) as err:
        load_sweep(path)
    text = str(err.value)
    assert "\n" not in text
    assert "lora.r must be > 0, got 0" in text and "lora.r must be > 0, got -1" in text
    assert "train.lr must be > 0" in text and "r8_lr-1" in text


def test_unknown_keys_and_settings_are_collected_together(write_sweep):
    path = write_sweep({"grid": {"lora.rr": [4]}, "overrides": {"data.limt": 3}, "sweep": {"parallel": "x"}})
    with pytest.raises(UserError) as err:
        load_sweep(path)
    text = str(err.value)
    assert "lora.rr" in text and "data.limt" in text and "sweep.parallel" in text


def test_definition_hash_follows_the_trial_configs_not_tracking(write_sweep):
    path = write_sweep({"grid": {"lora.r": [4, 8]}})
    h = load_sweep(path).definition_hash
    assert h == load_sweep(path).definition_hash
    assert h == load_sweep(path, ["tracking.backend=swanlab"]).definition_hash
    assert h != load_sweep(path, ["train.lr=2e-4"]).definition_hash
    assert h != load_sweep(write_sweep({"grid": {"lora.r": [4, 16]}})).definition_hash
