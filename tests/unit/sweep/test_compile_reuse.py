"""Sequential sweeps reuse compiled layers across LoRA ranks: after the second rank, no trial
compiles again. Dynamo traces on the CPU with a counting backend (no inductor, no GPU)."""

from __future__ import annotations

import pytest
import torch

from loralab.config import LoraConfig
from loralab.model.fast_lora import disable_fast_lora, enable_fast_lora
from loralab.model.lora import attach_lora
from loralab.sweep.compile_reuse import REUSE_SETTINGS, compiled_code_reused


def _compilations_per_trial(model, ranks) -> list[int]:
    """Graphs dynamo hands its backend during each trial's forward/backward, per rank."""
    compiled: list[int] = []

    def counting_backend(gm, example_inputs):
        compiled.append(1)
        return gm.forward

    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    per_trial = []
    for r in ranks:
        before = len(compiled)
        peft_model = attach_lora(model, LoraConfig(r=r, alpha=32, dropout=0.0,
                                                   target_modules=["q_proj", "v_proj"]), seed=0)
        enable_fast_lora(peft_model)
        for layer in model.model.layers:  # as levers.compile_layers does, per trial
            layer.compile(backend=counting_backend)
        try:
            for _ in range(2):
                model.model(input_ids=ids).last_hidden_state.sum().backward()
        finally:
            for layer in model.model.layers:
                layer._compiled_call_impl = None
            disable_fast_lora(peft_model)
            peft_model.unload()
        per_trial.append(len(compiled) - before)
    return per_trial


@pytest.fixture
def tiny_model():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from loralab.model.load import TINY_QWEN2

    torch.manual_seed(0)
    torch._dynamo.reset()
    yield Qwen2ForCausalLM(Qwen2Config(**{**TINY_QWEN2, "vocab_size": 1000})).requires_grad_(False)
    torch._dynamo.reset()


def test_after_the_second_rank_no_trial_compiles(tiny_model):
    with compiled_code_reused():
        counts = _compilations_per_trial(tiny_model, [4, 8, 16, 32])
    assert counts[0] > 0 and counts[1] > 0  # the first graph; the second rank makes it dynamic
    assert counts[2:] == [0, 0], counts


def test_dynamo_defaults_compile_every_rank_and_come_back(tiny_model):
    import torch._dynamo as dynamo

    before = {key: getattr(dynamo.config, key) for key in REUSE_SETTINGS}
    counts = _compilations_per_trial(tiny_model, [4, 8, 16])
    assert all(n > 0 for n in counts), counts  # what the sweep's settings remove
    with compiled_code_reused():
        assert all(getattr(dynamo.config, k) == v for k, v in REUSE_SETTINGS.items())
    assert {key: getattr(dynamo.config, key) for key in REUSE_SETTINGS} == before
