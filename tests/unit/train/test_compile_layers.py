"""levers.compile_layers compiles each graph once for a run whose every step has another token
count (packed rows), and keeps the frozen base's sizes constant in the graphs. Dynamo traces on
the CPU with a counting backend (no inductor), through compile_layers as the loop calls it."""

from __future__ import annotations

import random

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


def _tiny_model(layers: int):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from loralab.model.load import TINY_QWEN2

    torch.manual_seed(0)
    config = Qwen2Config(**{**TINY_QWEN2, "vocab_size": 1000, "num_hidden_layers": layers})
    return Qwen2ForCausalLM(config).requires_grad_(False)


def _train_compiled(model, steps: int) -> tuple[list[int], list[int], list[list[tuple]]]:
    """(graphs compiled at each step, each step's token count, every graph's input shapes)."""
    graphs: list[list[tuple]] = []

    def counting_backend(gm, example_inputs):
        graphs.append([tuple(n.meta["example_value"].shape) for n in gm.graph.nodes
                       if n.op == "placeholder" and hasattr(n.meta.get("example_value"), "shape")])
        return gm.forward

    peft_model = attach_lora(model, LoraConfig(r=4, alpha=32, dropout=0.0,
                                               target_modules=["q_proj", "v_proj"]), seed=0)
    enable_fast_lora(peft_model)
    rng, per_step, lengths = random.Random(0), [], []
    torch._dynamo.reset()
    with packed_attention_on(model, "sdpa"):
        uncompile = compile_layers(model, backend=counting_backend)
        try:
            for _ in range(steps):
                batch, before = _packed_batch(rng), len(graphs)
                model.model(**batch, use_cache=False).last_hidden_state.sum().backward()
                per_step.append(len(graphs) - before)
                lengths.append(batch["input_ids"].shape[1])
        finally:
            uncompile()
            disable_fast_lora(peft_model)
            torch._dynamo.reset()
    return per_step, lengths, graphs


def test_packed_steps_of_every_length_compile_only_at_the_first():
    model = _tiny_model(layers=2)
    per_step, lengths, graphs = _train_compiled(model, steps=4)
    assert len(set(lengths)) == 4, lengths  # the test means nothing if the lengths repeat
    assert per_step[0] > 0 and per_step[1:] == [0, 0, 0], per_step
    hidden = model.config.hidden_size
    weights = [shape for graph in graphs for shape in graph if len(shape) == 2 and hidden in shape]
    assert weights and all(isinstance(d, int) for shape in weights for d in shape), weights
    assert model.model.embed_tokens._forward_hooks == {}  # the uncompile call takes its hook


def test_every_layer_shares_the_first_layers_graphs():
    """Three layers compile what one layer compiles: the first layer's input (a frozen
    embedding's output) must not be a variant of its own."""
    one, _, _ = _train_compiled(_tiny_model(layers=1), steps=1)
    three, _, _ = _train_compiled(_tiny_model(layers=3), steps=1)
    assert three == one, (three, one)
