"""levers.compile_layers compiles each graph once for a run whose every step has another token
count (packed rows), and keeps the frozen base's sizes constant in the graphs. Dynamo traces on
the CPU with a counting backend (no inductor), through compile_layers as the loop calls it."""

from __future__ import annotations

import random

import pytest
import torch

from loralab.config import LoraConfig
from loralab.data.batching import collate_for_model
from loralab.data.render import Example
from loralab.model.attention import packed_attention_on
from loralab.model.fast_lora import disable_fast_lora, enable_fast_lora
from loralab.model.lora import attach_lora
from loralab.train.levers import compile_layers


def _packed_batch(rng: random.Random) -> dict:
    examples = []
    for _ in range(rng.randint(2, 5)):  # another number of sequences and tokens every step
        n = rng.randint(5, 11)  # rows under 64 tokens: not the hidden size (dynamo would
        # give a token count equal to a static size that size's symbol, a constant)
        ids = [rng.randint(2, 999) for _ in range(n)]
        examples.append(Example(input_ids=ids, labels=[-100] + ids[1:], record_index=0, truncated=0))
    batch = collate_for_model(examples, 0, packed=True)
    batch.pop("labels")
    return batch


@pytest.fixture
def tiny_model():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from loralab.model.load import TINY_QWEN2

    torch.manual_seed(0)
    torch._dynamo.reset()
    yield Qwen2ForCausalLM(Qwen2Config(**{**TINY_QWEN2, "vocab_size": 1000})).requires_grad_(False)
    torch._dynamo.reset()


def test_packed_steps_of_every_length_compile_only_at_the_first(tiny_model):
    graphs: list[list[tuple]] = []

    def counting_backend(gm, example_inputs):
        graphs.append([tuple(n.meta["example_value"].shape) for n in gm.graph.nodes
                       if n.op == "placeholder" and hasattr(n.meta.get("example_value"), "shape")])
        return gm.forward

    peft_model = attach_lora(tiny_model, LoraConfig(r=4, alpha=32, dropout=0.0,
                                                    target_modules=["q_proj", "v_proj"]), seed=0)
    enable_fast_lora(peft_model)
    rng, per_step, lengths = random.Random(0), [], []
    with packed_attention_on(tiny_model, "sdpa"):
        uncompile = compile_layers(tiny_model, backend=counting_backend)
        try:
            for _ in range(4):
                batch, before = _packed_batch(rng), len(graphs)
                tiny_model.model(**batch, use_cache=False).last_hidden_state.sum().backward()
                per_step.append(len(graphs) - before)
                lengths.append(batch["input_ids"].shape[1])
        finally:
            uncompile()
            disable_fast_lora(peft_model)
    assert len(set(lengths)) == 4, lengths  # the test means nothing if the lengths repeat
    assert per_step[0] > 0 and per_step[1:] == [0, 0, 0], per_step
    hidden = tiny_model.config.hidden_size
    weights = [shape for graph in graphs for shape in graph if len(shape) == 2 and hidden in shape]
    assert weights and all(isinstance(d, int) for shape in weights for d in shape), weights
