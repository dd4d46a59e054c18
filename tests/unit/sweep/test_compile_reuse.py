"""Sequential sweeps reuse compiled layers across LoRA ranks: after the first trial, no trial
compiles again (rank and alpha/r differ per trial). Dynamo traces on the CPU with a counting
backend (no inductor, no GPU), through levers.compile_layers as the training loop calls it."""

from __future__ import annotations

import pytest
import torch

from loralab.config import LoraConfig
from loralab.model.fast_lora import disable_fast_lora, enable_fast_lora
from loralab.model.lora import attach_lora
from loralab.sweep.compile_reuse import REUSE_SETTINGS, compiled_code_reused
from loralab.train.levers import compile_layers


def _compilations_per_trial(model, ranks) -> list[int]:
    """Graphs dynamo hands its backend during each trial's forward/backward, per rank."""
    compiled: list[int] = []

    def counting_backend(gm, example_inputs):
        compiled.append(1)
        return gm.forward

    lengths = (12, 17)  # the second length makes the token dimension dynamic (first trial)
    per_trial = []
    for r in ranks:
        before = len(compiled)
        peft_model = attach_lora(model, LoraConfig(r=r, alpha=32, dropout=0.0,
                                                   target_modules=["q_proj", "v_proj"]), seed=0)
        enable_fast_lora(peft_model)
        uncompile = compile_layers(model, backend=counting_backend)
        try:
            for n in lengths:
                ids = torch.randint(0, 1000, (2, n), generator=torch.Generator().manual_seed(0))
                model.model(input_ids=ids).last_hidden_state.sum().backward()
        finally:
            uncompile()
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


def test_after_the_first_trial_no_trial_compiles(tiny_model):
    with compiled_code_reused():
        counts = _compilations_per_trial(tiny_model, [4, 8, 16, 32])
    # alpha stays 32, so alpha/r changes with every rank as well as the weights' shapes
    assert counts[0] > 0 and counts[1:] == [0, 0, 0], counts


def test_dynamo_defaults_compile_every_rank_and_come_back(tiny_model):
    import torch._dynamo as dynamo

    before = {key: getattr(dynamo.config, key) for key in REUSE_SETTINGS}
    counts = _compilations_per_trial(tiny_model, [4, 8, 16])
    assert all(n > 0 for n in counts), counts  # what the sweep's settings remove
    with compiled_code_reused():
        assert all(getattr(dynamo.config, k) == v for k, v in REUSE_SETTINGS.items())
    assert {key: getattr(dynamo.config, key) for key in REUSE_SETTINGS} == before
