"""Reading PEFT adapter folders as tensors, and when the eval falls back to PEFT."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import save_file

from loralab.engine import AdapterSource, GenSettings, LoraWeights, lora_scale, read_lora
from loralab.engine.lora_weights import LoraPrefetch, load_lora_file

Q = "model.layers.0.self_attn.q_proj"


def write_adapter(folder, lm, config=None, tensors=None, rank=4):
    """A minimal adapter folder: LoRA on layer 0's q_proj (PEFT's key names)."""
    folder.mkdir(parents=True, exist_ok=True)
    q = lm.model.layers[0].self_attn.q_proj
    tensors = tensors if tensors is not None else {
        f"base_model.model.{Q}.lora_A.weight": torch.randn(rank, q.in_features),
        f"base_model.model.{Q}.lora_B.weight": torch.randn(q.out_features, rank)}
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    cfg = {"peft_type": "LORA", "r": rank, "lora_alpha": 16, **(config or {})}
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    return folder


@pytest.mark.parametrize("rslora,scale", [(False, 16 / 4), (True, 16 / math.sqrt(4))])
def test_scale_and_shapes(lively_model, tmp_path, rslora, scale):
    lora, why = read_lora(write_adapter(tmp_path, lively_model, {"use_rslora": rslora}),
                          lively_model)
    assert why is None and set(lora) == {Q} and isinstance(lora, LoraWeights)
    a, b, got = lora[Q]
    assert got == pytest.approx(scale) and a.shape[0] == b.shape[1] == 4
    assert lora.max_rank == 4 and lora.source == tmp_path


@pytest.mark.parametrize("rank,alpha,rslora", [(4, 16, False), (8, 8, True), (3, 7, False)])
def test_scaling_rule_is_peft_own(rank, alpha, rslora):
    """Generation's scale (lora_scale) is the one PEFT gives the layers training uses."""
    from peft import LoraConfig, get_peft_model

    model = torch.nn.Sequential()
    model.add_module("proj", torch.nn.Linear(8, 8))
    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=alpha, use_rslora=rslora,
                                                  target_modules=["proj"]))
    layer = peft_model.base_model.model.proj
    assert lora_scale(alpha, rank, rslora) == pytest.approx(layer.scaling["default"])


@pytest.mark.parametrize("config,expected", [
    ({"use_dora": True}, "use_dora"),
    ({"rank_pattern": {"q_proj": 8}}, "rank_pattern"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"bias": "all"}, "bias"),
    ({"alora_invocation_tokens": [5, 6]}, "alora_invocation_tokens"),  # only after the tokens
    ({"trainable_token_indices": [3]}, "trainable_token_indices"),
    ({"some_future_variant": {"on": True}}, "some_future_variant"),
])
def test_what_only_peft_can_apply_is_refused(lively_model, tmp_path, config, expected):
    lora, why = read_lora(write_adapter(tmp_path, lively_model, config), lively_model)
    assert lora is None and expected in why


def test_unknown_weights_and_bad_shapes_are_refused(lively_model, tmp_path):
    head = {"base_model.model.lm_head.lora_A.weight": torch.zeros(4, 64)}
    lora, why = read_lora(write_adapter(tmp_path / "a", lively_model, tensors=head), lively_model)
    assert lora is None and "lm_head" in why
    bad = {f"base_model.model.{Q}.lora_A.weight": torch.zeros(4, 63),
           f"base_model.model.{Q}.lora_B.weight": torch.zeros(64, 4)}
    lora, why = read_lora(write_adapter(tmp_path / "b", lively_model, tensors=bad), lively_model)
    assert lora is None and "do not fit" in why
    assert read_lora(tmp_path / "missing", lively_model) == (
        None, "no adapter_model.safetensors and adapter_config.json")


def test_prefetch_reads_ahead_and_casts_what_it_read_ahead(lively_model, tmp_path):
    folders = [write_adapter(tmp_path / str(i), lively_model) for i in range(3)]
    prefetch = LoraPrefetch(folders, dtype=torch.bfloat16)
    try:
        for i, folder in enumerate(folders):
            loaded, why = prefetch.get(i)
            assert why is None and (i + 1 in prefetch.pending) == (i + 1 < len(folders))
            direct, _ = load_lora_file(folder)
            # the first file is read on the spot as stored; the ones read ahead are cast
            dtype = torch.float32 if i == 0 else torch.bfloat16
            got, want = loaded["pairs"][Q]["A"], direct["pairs"][Q]["A"]
            assert got.dtype == dtype and torch.equal(got, want.to(dtype))
    finally:
        prefetch.close()


def test_adapter_source_folds_or_falls_back_to_peft(lively_model, tmp_path, save_adapter):
    plain = write_adapter(tmp_path / "plain", lively_model)
    save_adapter(lively_model, tmp_path / "dora", 0, r=2, target_modules=["q_proj"],
                 use_dora=True)
    source = AdapterSource(lively_model, [plain, tmp_path / "dora"], GenSettings(8))
    with source.on_base(0, plain, merge=True) as (model, lora, how):
        assert model is lively_model and set(lora) == {Q} and how.startswith("folded")
    with source.on_base(1, tmp_path / "dora", merge=True) as (model, lora, how):
        assert lora is None and "use_dora" in how and hasattr(model, "peft_config")
    source.close()
    assert not hasattr(lively_model, "peft_config")  # PEFT unloaded on exit
    hf = AdapterSource(lively_model, [plain], GenSettings(8, engine="hf"))
    assert hf.reason == "engine=hf" and hf.prefetch is None


def test_an_unreadable_file_becomes_a_reason(lively_model, tmp_path):
    folder = write_adapter(tmp_path / "bad", lively_model)
    (folder / "adapter_model.safetensors").write_bytes(b"not safetensors")
    prefetch = LoraPrefetch([folder])
    try:
        loaded, why = prefetch.get(0)
    finally:
        prefetch.close()
    assert loaded is None and why.startswith("reading it as tensors failed")

