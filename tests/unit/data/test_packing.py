"""Packing must not change any sequence's loss: packed rows vs one padded row per sequence."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from loralab.data.batching import collate_packed, collate_padded, real_tokens
from loralab.data.render import IGNORE_INDEX, Example
from loralab.model.attention import block_diagonal_causal_mask, packed_attention_on
from loralab.model.load import TINY_QWEN2
from loralab.model.lora import LabelledLoss


def make_examples(n: int, seed: int, vocab: int = 1000) -> list[Example]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        length = rng.randint(5, 40)
        ids = [rng.randrange(vocab) for _ in range(length)]
        cut = max(1, int(length * 0.6))
        out.append(Example(ids, [IGNORE_INDEX] * cut + ids[cut:], i, 0))
    return out


@pytest.fixture(scope="module")
def tiny_lm():
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(**{**TINY_QWEN2, "vocab_size": 1000}))
    model.config._attn_implementation = "sdpa"
    return model.eval()


class Wrapped(torch.nn.Module):
    """LabelledLoss wants a PeftModel-like object with get_base_model()."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def get_base_model(self):
        return self.lm


def per_sequence_losses(lm, examples) -> list[float]:
    loss = LabelledLoss(Wrapped(lm), chunk=7)
    with torch.no_grad():
        return [float(loss(**collate_padded([e], 0))[0]) for e in examples]


@pytest.mark.parametrize("pad_to_multiple", [1, 16])
def test_packed_row_gives_every_sequence_its_unpacked_loss(tiny_lm, pad_to_multiple):
    examples = make_examples(6, seed=pad_to_multiple)
    expected = sum(per_sequence_losses(tiny_lm, examples))
    row = collate_packed(examples, 0, pad_to_multiple)
    assert row["input_ids"].shape[1] % pad_to_multiple == 0
    cu = row.pop("cu_seq_lens")
    longest = row.pop("max_length")
    with torch.no_grad(), packed_attention_on(tiny_lm, "sdpa"):
        got, n = LabelledLoss(Wrapped(tiny_lm), chunk=7)(
            **row, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=longest, max_length_k=longest
        )
    assert int(n) == sum(1 for e in examples for x in e.labels[1:] if x != IGNORE_INDEX)
    assert float(got) == pytest.approx(expected, rel=1e-5)
    assert tiny_lm.config._attn_implementation == "sdpa"  # switched back


def test_plain_causal_attention_over_a_packed_row_is_wrong(tiny_lm):
    """The reason packing needs its own attention: a plain causal mask mixes the sequences."""
    row = collate_packed(make_examples(4, seed=3), 0)
    cu, ids = row["cu_seq_lens"], row["input_ids"]
    with torch.no_grad():
        plain = tiny_lm.model(input_ids=ids).last_hidden_state
        with packed_attention_on(tiny_lm, "sdpa"):
            packed = tiny_lm.model(input_ids=ids, cu_seq_lens_q=cu).last_hidden_state
    first = int(cu[1])
    assert torch.allclose(plain[:, :first], packed[:, :first], atol=1e-6)  # nothing before it
    assert not torch.allclose(plain[:, first:], packed[:, first:], atol=1e-6)


def test_block_diagonal_mask_keeps_attention_inside_sequences():
    cu = torch.tensor([0, 2, 5], dtype=torch.int32)
    mask = block_diagonal_causal_mask(cu, 5)
    assert mask.tolist() == [
        [True, False, False, False, False],
        [True, True, False, False, False],
        [False, False, True, False, False],
        [False, False, True, True, False],
        [False, False, True, True, True],
    ]
    with pytest.raises(ValueError):
        block_diagonal_causal_mask(cu, 6)


def test_pad_fill_is_an_unlabelled_sequence_of_its_own():
    examples = make_examples(3, seed=5)
    row = collate_packed(examples, pad_id=7, pad_to_multiple=32)
    total = real_tokens(examples)
    width = row["input_ids"].shape[1]
    assert width == total + (-total % 32)
    cu = row["cu_seq_lens"].tolist()
    assert cu[-2] == total and cu[-1] == width
    assert row["labels"][0, total:].eq(IGNORE_INDEX).all()
    assert row["position_ids"][0, total:].tolist() == list(range(width - total))
