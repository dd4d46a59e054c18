"""loralab's LoRA forward computes PEFT's function, and its adapters stay plain PEFT files."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from loralab.config import LoraConfig
from loralab.model.fast_lora import disable_fast_lora, enable_fast_lora, is_fast
from loralab.model.load import TINY_QWEN2
from loralab.model.lora import attach_lora


def tiny(dtype=torch.float32):
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(**{**TINY_QWEN2, "vocab_size": 1000})).to(dtype)
    model.requires_grad_(False)
    return model


def with_moved_b(peft_model):
    # lora_B starts at zero (the adapter is a no-op): give it values so the path matters.
    gen = torch.Generator().manual_seed(1)
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            param.data = torch.randn(param.shape, generator=gen, dtype=param.dtype) * 0.05
    return peft_model


def loss_and_grads(peft_model, ids):
    peft_model.zero_grad(set_to_none=True)
    loss = peft_model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in peft_model.named_parameters() if p.requires_grad}
    return loss.detach(), grads


def test_fast_forward_matches_peft_in_fp32():
    peft_model = with_moved_b(attach_lora(tiny(), LoraConfig(dropout=0.0), seed=0)).train()
    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(2))
    want_loss, want_grads = loss_and_grads(peft_model, ids)
    assert enable_fast_lora(peft_model) == 2 * 7  # 2 layers x 7 projections
    got_loss, got_grads = loss_and_grads(peft_model, ids)
    assert torch.allclose(got_loss, want_loss, rtol=1e-6)
    for name, grad in want_grads.items():
        assert torch.allclose(got_grads[name], grad, rtol=1e-4, atol=1e-7), name
    disable_fast_lora(peft_model)
    assert not any(is_fast(m) for m in peft_model.modules())


def test_fast_forward_stays_close_to_peft_in_bf16():
    peft_model = with_moved_b(attach_lora(tiny(torch.bfloat16), LoraConfig(dropout=0.0), 0))
    ids = torch.randint(0, 1000, (1, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = peft_model(input_ids=ids).logits.float()
        enable_fast_lora(peft_model)
        got = peft_model(input_ids=ids).logits.float()
    assert got.dtype == want.dtype
    assert float((got - want).norm() / want.norm()) < 2e-2


def test_dropout_is_applied_in_training_and_skipped_in_eval():
    peft_model = with_moved_b(attach_lora(tiny(), LoraConfig(dropout=0.5), seed=0))
    enable_fast_lora(peft_model)
    ids = torch.randint(0, 1000, (1, 10), generator=torch.Generator().manual_seed(4))
    peft_model.train()
    with torch.no_grad():
        a = peft_model(input_ids=ids).logits
        b = peft_model(input_ids=ids).logits
    assert not torch.allclose(a, b)  # fresh masks each call
    peft_model.eval()
    with torch.no_grad():
        c = peft_model(input_ids=ids).logits
        disable_fast_lora(peft_model)
        d = peft_model(input_ids=ids).logits
    assert torch.allclose(c, d, atol=1e-6)


def test_disabled_adapter_falls_back_to_the_base():
    peft_model = with_moved_b(attach_lora(tiny(), LoraConfig(dropout=0.0), seed=0)).eval()
    enable_fast_lora(peft_model)
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad(), peft_model.disable_adapter():
        plain = peft_model(input_ids=ids).logits
    with torch.no_grad():
        adapted = peft_model(input_ids=ids).logits
        base = peft_model.get_base_model()
    assert not torch.allclose(plain, adapted)
    assert is_fast(base.model.layers[0].self_attn.q_proj)


def test_adapter_saved_from_fast_layers_reloads_in_plain_peft(tmp_path):
    from peft import PeftModel

    peft_model = with_moved_b(attach_lora(tiny(), LoraConfig(dropout=0.0), seed=0)).eval()
    names = sorted(peft_model.state_dict())
    enable_fast_lora(peft_model)
    assert sorted(peft_model.state_dict()) == names  # same parameter names: plain PEFT files
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        want = peft_model(input_ids=ids).logits
    peft_model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(tiny(), str(tmp_path)).eval()
    assert not any(is_fast(m) for m in reloaded.modules())
    with torch.no_grad():
        got = reloaded(input_ids=ids).logits
    assert torch.allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("value,expected", [(True, "on"), (False, "off"), ("auto", "auto")])
def test_yaml_on_off_read_as_booleans_still_mean_on_off(value, expected):
    from loralab.config import config_from_dict

    cfg = config_from_dict({"data": {"path": "x"}, "train": {"fused_lora": value,
                                                              "packing": value}}).validate()
    assert cfg.train.fused_lora == expected and cfg.train.packing == expected
