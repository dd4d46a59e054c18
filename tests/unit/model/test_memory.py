"""The memory model: parameter counts, the seed's formula, measured H200 peaks, auto plans."""

from __future__ import annotations

import pytest
from transformers import Qwen2Config

from loralab.model.memory import (
    GIB,
    StepShape,
    count_params,
    estimate,
    lora_params,
    plan_memory,
    shape_of,
    worst_micro_batch,
)

SEVEN_B = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
               num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
               tie_word_embeddings=False)
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def seven_b():
    return shape_of(Qwen2Config(**SEVEN_B))


def test_counts_match_the_seed_printout(seven_b):
    # ../shared/models.md: 7,615,616,512 base parameters, r=8 on 7 projections adds 20,185,088.
    assert count_params(seven_b) == 7_615_616_512
    assert lora_params(seven_b, 8, list(TARGETS)) == 20_185_088


def test_counts_match_a_real_tiny_model():
    import torch
    from transformers import Qwen2ForCausalLM

    from loralab.model.load import TINY_QWEN2

    cfg = Qwen2Config(**{**TINY_QWEN2, "vocab_size": 1000})
    with torch.device("meta"):
        model = Qwen2ForCausalLM(cfg)
    assert count_params(shape_of(cfg)) == sum(p.numel() for p in model.parameters())


def test_seed_formula_is_2p_plus_16_lora(seven_b):
    est = estimate(seven_b, 1000, 250, 4, False, StepShape())
    assert est.seed_formula == 2 * 7_615_616_512 + 16 * 20_185_088
    assert est.total > est.seed_formula  # activations and logits on top


# Peaks measured on one H200 by bench/train_speed.py (docs/benchmarks.md):
# (tokens in the largest micro-batch, labelled, micro, checkpointing, StepShape kwargs, GiB).
MEASURED = [
    (4736, 1180, 16, False, dict(compiled=True), 38.7),  # loralab, dropout 0
    (4736, 1180, 16, False, dict(compiled=True, dropout=0.1), 47.5),  # loralab defaults
    (1408, 352, 4, True, dict(compiled=True, dropout=0.1), 15.5),  # checkpointing, bs 4
    (1360, 340, 4, True, dict(fused_lora=False, dropout=0.1, varlen_attention=False,
                              labelled_only=False, loss_chunk=10**9), 17.5),  # the seed's recipe
]


@pytest.mark.parametrize("tokens,labelled,micro,ckpt,kw,measured", MEASURED)
def test_prediction_within_15_percent_of_h200_measurements(
    seven_b, tokens, labelled, micro, ckpt, kw, measured
):
    est = estimate(seven_b, tokens, labelled, micro, ckpt, StepShape(**kw))
    assert est.total / GIB == pytest.approx(measured, rel=0.15)


def test_checkpointed_7b_run_fits_in_24_gib(seven_b):
    # The seed's micro-batch 4 at the longest lengths (384), dropout 0.1, uncompiled.
    est = estimate(seven_b, 4 * 384, 4 * 96, 4, True, StepShape(dropout=0.1))
    assert est.total < 24 * GIB


def test_auto_plan_prefers_big_micro_batches_then_checkpointing(seven_b):
    def largest(micro):  # every micro-batch of the run at the data's longest sequences
        return micro * 384, micro * 96

    step = StepShape(dropout=0.1)
    sizes = [16, 8, 4, 2, 1]
    big = plan_memory(seven_b, largest, sizes, int(130 * GIB), step)
    assert (big.micro_batch, big.checkpointing) == (16, False)
    small = plan_memory(seven_b, largest, sizes, int(24 * GIB), step)
    assert small.total <= 24 * GIB and small.micro_batch < 16
    tight = plan_memory(seven_b, largest, sizes, int(16.5 * GIB), step)
    assert tight.checkpointing and tight.total <= 16.5 * GIB
    forced = plan_memory(seven_b, largest, sizes, int(130 * GIB), step, checkpointing="on")
    assert forced.checkpointing and forced.micro_batch == 16


def test_auto_plan_tries_only_the_sizes_it_is_given(seven_b):
    asked = []

    def largest(micro):
        asked.append(micro)
        return micro * 384, micro * 96

    chosen = plan_memory(seven_b, largest, [1, 4, 2], int(130 * GIB), StepShape())
    assert chosen.micro_batch == 4 and asked == [4]


def test_worst_micro_batch_counts_padding_or_packing():
    assert worst_micro_batch([10, 30, 20], [1, 5, 2], 2, packed=False) == (60, 7)
    assert worst_micro_batch([10, 30, 20], [1, 5, 2], 2, packed=True) == (50, 7)
    assert worst_micro_batch([10, 30, 20], [1, 5, 2], 2, packed=True, pad_multiple=64) == (64, 7)


def test_card_budget_reads_the_per_process_cap_of_a_bare_cuda_device(monkeypatch):
    """torch.cuda.get_per_process_memory_fraction takes an index only; loralab's default device
    is a bare torch.device("cuda"), which torch's own check refuses (seen on the H200)."""
    import torch

    from loralab.model import memory

    asked: list = []

    def fraction(index):
        if not isinstance(index, int):
            raise ValueError("Expected a torch.device with a specified index or an integer")
        asked.append(index)
        return 0.5

    class Props:
        total_memory = 100 * memory.GIB

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: Props())
    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", fraction)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    expected = int(100 * memory.GIB * 0.5 * memory.CARD_SHARE)
    assert memory.card_budget(torch.device("cuda")) == expected
    assert memory.card_budget("cuda:1") == expected
    assert memory.card_budget(2) == expected
    assert asked == [3, 1, 2]
