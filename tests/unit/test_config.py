"""Config: YAML + overrides, types, validation, nearest-key hints, path resolution, round trip."""

from __future__ import annotations

import pytest

from loralab.config import Config, config_from_dict, load_config, parse_override, save_config
from loralab.errors import UserError


def test_defaults_are_the_seed_recipe():
    cfg = Config()
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout) == (8, 32, 0.1)
    assert cfg.lora.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert (cfg.train.lr, cfg.train.epochs, cfg.train.batch_size, cfg.train.grad_accum) == (1e-4, 4, 4, 4)
    assert (cfg.train.scheduler, cfg.data.max_length, cfg.train.seed) == ("linear", 384, 42)


@pytest.mark.parametrize(
    "text, value",
    [("1e-4", 1e-4), ("16", 16), ("null", None), ("true", True), ("[a, b]", ["a", "b"]), ("x", "x")],
)
def test_override_values_are_read_as_yaml(text, value):
    assert parse_override(f"k={text}") == ("k", value)


def test_overrides_apply_and_are_typed(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  path: d.json\nlora:\n  r: 4\n", encoding="utf-8")
    cfg = load_config(path, ["lora.r=16", "train.lr=2e-4", "data.limit=50", "train.epochs=2"])
    assert (cfg.lora.r, cfg.train.lr, cfg.data.limit, cfg.train.epochs) == (16, 2e-4, 50, 2.0)
    # Input paths in a YAML file are relative to it; output_dir stays relative to the cwd.
    assert cfg.data.path == str(tmp_path / "d.json")
    assert cfg.output_dir == "runs/run"


def test_unknown_keys_suggest_the_nearest():
    with pytest.raises(UserError, match="unknown config key train.learning_rate"):
        config_from_dict({"data": {"path": "x"}, "train": {"learning_rate": 1}})
    with pytest.raises(UserError, match="did you mean lora.dropout"):
        config_from_dict({"data": {"path": "x"}, "lora": {"droput": 0.1}})


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"lora": {"r": 0}}, "lora.r must be > 0"),
        ({"train": {"lr": 0}}, "train.lr must be > 0"),
        ({"data": {"path": "x", "limit": -1}}, "data.limit must be > 0"),
        ({"train": {"batch_size": 1.5}}, "must be an integer"),
        ({"lora": {"rslora": "yes"}}, "true or false"),
        ({"lora": {"target_modules": []}}, "target_modules is empty"),
        ({"data": {"path": "x", "max_length": 8}}, "max_length"),
    ],
)
def test_validation_names_the_key(raw, message):
    raw.setdefault("data", {}).setdefault("path", "x")
    with pytest.raises(UserError, match=message):
        config_from_dict(raw).validate()


def test_saved_config_reads_back_equal(tmp_path):
    cfg = load_config(None, ["data.path=/d.json", "lora.r=16", "train.lr=3e-4", "data.system_prompt=系统"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg


def test_hub_ids_are_not_turned_into_paths(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  path: Qwen/Qwen2.5-7B-Instruct\ndata:\n  path: d.json\n", encoding="utf-8")
    assert load_config(path).model.path == "Qwen/Qwen2.5-7B-Instruct"
