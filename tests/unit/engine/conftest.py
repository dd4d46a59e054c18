"""Fixtures for the generation tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def lively_model():
    """A tiny random Qwen2 whose greedy outputs vary from token to token (large init)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=151936,
                      tie_word_embeddings=True, initializer_range=0.5)
    cfg._attn_implementation = "sdpa"
    return Qwen2ForCausalLM(cfg).eval()


@pytest.fixture()
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
