"""Model resolution: builtin, local folders, hub ids offline, ModelScope without the package."""

from __future__ import annotations

import pytest

from loralab.config import ModelConfig
from loralab.errors import UserError
from loralab.model.load import resolve_model_path, resolve_tokenizer_path


def test_missing_hub_model_offline_is_one_clear_line(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(UserError, match="model Qwen/Nope-7B not found.*model.path=/path/to/folder"):
        resolve_model_path(ModelConfig(path="Qwen/Nope-7B"))


def test_local_folder_without_config_is_refused(tmp_path):
    with pytest.raises(UserError, match="has no config.json"):
        resolve_model_path(ModelConfig(path=str(tmp_path)))


def test_source_local_needs_a_folder(tmp_path):
    with pytest.raises(UserError, match="is not a folder"):
        resolve_model_path(ModelConfig(path=str(tmp_path / "none"), source="local"))


def test_modelscope_without_the_package(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "modelscope":
            raise ImportError("no modelscope")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(UserError, match="pip install modelscope"):
        resolve_model_path(ModelConfig(path="qwen/Qwen2.5-7B-Instruct", source="modelscope"))


def test_unknown_builtin_model():
    with pytest.raises(UserError, match="unknown builtin model"):
        resolve_tokenizer_path(ModelConfig(path="builtin:huge"))
