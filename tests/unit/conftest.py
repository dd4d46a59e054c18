"""Fixtures the unit tests of several packages share: a lively tiny model and random adapters."""

from __future__ import annotations

import pytest
import torch


def _lively_qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=151936,
                      tie_word_embeddings=True, initializer_range=0.5)
    cfg._attn_implementation = "sdpa"
    return Qwen2ForCausalLM(cfg).eval()


@pytest.fixture(scope="session")
def make_lively_model():
    """make() -> a new tiny random Qwen2 whose greedy outputs vary from token to token (large
    init); the same weights each call (seed 0)."""
    return _lively_qwen2


@pytest.fixture(scope="session")
def lively_model(make_lively_model):
    """One lively model for the session (the generation tests)."""
    return make_lively_model()


@pytest.fixture(scope="session")
def save_adapter():
    """save(model, folder, seed, **LoraConfig kwargs): a PEFT adapter on `model` with random
    non-zero B (PEFT starts B at 0, which would make it a no-op) saved to `folder`; the model
    goes back to plain linears."""
    from peft import LoraConfig, get_peft_model

    def save(model, folder, seed: int, **lora_kwargs):
        peft_model = get_peft_model(model, LoraConfig(**lora_kwargs))
        torch.manual_seed(seed)
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.data.normal_(0, 0.3)
        peft_model.save_pretrained(folder)
        peft_model.unload()
        return folder

    return save


@pytest.fixture(scope="session")
def read_adapters(save_adapter, tmp_path_factory):
    """read(model, specs, first_seed, tag) -> [lora, ...]: one random PEFT adapter of `model`
    per LoraConfig kwargs in `specs` (seeds first_seed, first_seed + 1, ...), saved and read
    back as {module: (A, B, scale)}."""
    from loralab.engine.lora_weights import read_lora

    def read(model, specs: list[dict], first_seed: int, tag: str) -> list[dict]:
        out = []
        for k, spec in enumerate(specs):
            folder = save_adapter(model, tmp_path_factory.mktemp(f"{tag}{k}"), first_seed + k,
                                  **spec)
            lora, reason = read_lora(folder, model)
            assert reason is None, reason
            out.append(lora)
        return out

    return read
