"""A base loaded from a hub id: its adapter names the id and commit, not the cache folder."""

from __future__ import annotations

import json
import shutil

import pytest


@pytest.fixture
def hub_cache(monkeypatch, tmp_path, isolated_cache):
    """The tiny model as the HF cache holds a download of `loralab-test/tiny` at commit abc123,
    the hub unreachable (mocked)."""
    from huggingface_hub import constants

    from loralab.model import hub
    from loralab.model.load import builtin_model_dir

    repo = tmp_path / "hub" / "models--loralab-test--tiny"
    shutil.copytree(builtin_model_dir("tiny-qwen2"), repo / "snapshots" / "abc123")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hub, "can_connect", lambda *a, **k: False)
    hub.hub_reachable.cache_clear()
    yield repo
    hub.hub_reachable.cache_clear()


def test_adapter_of_a_hub_base_records_the_id_and_revision(hub_cache, tmp_path):
    from loralab.config import LoraConfig, ModelConfig
    from loralab.model.load import load_base_model
    from loralab.model.lora import attach_lora

    model, _ = load_base_model(ModelConfig(path="loralab-test/tiny"), "cpu")
    peft_model = attach_lora(model, LoraConfig(r=2, target_modules=["q_proj"]), seed=0)
    peft_model.save_pretrained(tmp_path / "adapter", save_embedding_layers=False)
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == "loralab-test/tiny"
    assert saved["revision"] == "abc123"


def test_adapter_of_a_local_folder_keeps_the_folder(hub_cache, tmp_path):
    from loralab.config import LoraConfig, ModelConfig
    from loralab.model.load import load_base_model
    from loralab.model.lora import attach_lora

    folder = hub_cache / "snapshots" / "abc123"
    model, _ = load_base_model(ModelConfig(path=str(folder)), "cpu")
    peft_model = attach_lora(model, LoraConfig(r=2, target_modules=["q_proj"]), seed=0)
    peft_model.save_pretrained(tmp_path / "adapter", save_embedding_layers=False)
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == str(folder.resolve())
    assert saved.get("revision") is None
