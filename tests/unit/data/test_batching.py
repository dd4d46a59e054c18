"""Step plans and collation: the semantics the training loop relies on."""

from __future__ import annotations

import random

import pytest
import torch

from loralab.data.batching import collate_packed, collate_padded, count_labelled, plan_steps
from loralab.data.records import Record
from loralab.data.render import IGNORE_INDEX, Example, encode_record


def step_sets(plan):
    return [sorted(i for micro in step for i in micro) for step in plan]


def test_plan_covers_every_example_once_per_epoch():
    lengths = [random.Random(0).randint(5, 50) for _ in range(37)]
    plan = plan_steps(lengths, micro_batch=4, grad_accum=2, seed=1, epoch=0)
    flat = [i for step in plan for micro in step for i in micro]
    assert sorted(flat) == list(range(37))
    assert len(plan) == 5  # ceil(37 / 8): the last, smaller step is kept
    assert all(len(micro) <= 4 for step in plan for micro in step)
    assert sum(len(m) for m in plan[-1]) == 37 - 32


@pytest.mark.parametrize("group_by_length", [True, False])
def test_step_sets_depend_only_on_examples_per_step(group_by_length):
    lengths = [random.Random(1).randint(5, 300) for _ in range(100)]
    a = plan_steps(lengths, 4, 4, seed=7, epoch=2, group_by_length=group_by_length)
    b = plan_steps(lengths, 16, 1, seed=7, epoch=2, group_by_length=group_by_length)
    c = plan_steps(lengths, 2, 8, seed=7, epoch=2, group_by_length=group_by_length)
    assert step_sets(a) == step_sets(b) == step_sets(c)
    assert [len(s) for s in a] == [4] * 6 + [1]


def test_plan_is_deterministic_and_changes_with_seed_and_epoch():
    lengths = list(range(50))
    base = plan_steps(lengths, 2, 2, seed=3, epoch=0)
    assert base == plan_steps(lengths, 2, 2, seed=3, epoch=0)
    assert step_sets(base) != step_sets(plan_steps(lengths, 2, 2, seed=3, epoch=1))
    assert step_sets(base) != step_sets(plan_steps(lengths, 2, 2, seed=4, epoch=0))


def test_no_shuffle_keeps_file_order():
    plan = plan_steps([1] * 10, 2, 2, seed=0, epoch=5, shuffle=False, group_by_length=False)
    assert plan == [[[0, 1], [2, 3]], [[4, 5], [6, 7]], [[8, 9]]]


def test_group_by_length_sorts_within_a_step_only():
    lengths = [random.Random(2).randint(1, 1000) for _ in range(64)]
    plan = plan_steps(lengths, 4, 4, seed=0, epoch=0)
    for step in plan:
        flat = [i for micro in step for i in micro]
        assert [lengths[i] for i in flat] == sorted((lengths[i] for i in flat), reverse=True)


def example(prompt_len: int, answer: list[int], index: int = 1) -> Example:
    prompt = list(range(100, 100 + prompt_len))
    return Example(prompt + answer, [IGNORE_INDEX] * prompt_len + answer, index, 0)


def test_collate_padded():
    batch = collate_padded([example(2, [7, 8]), example(1, [9])], pad_id=0)
    assert batch["input_ids"].tolist() == [[100, 101, 7, 8], [100, 9, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, -100, 7, 8], [-100, 9, -100, -100]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3], [0, 1, 2, 3]]
    assert batch["input_ids"].dtype == torch.long


def test_collate_packed_restarts_positions_and_blocks_cross_sequence_loss():
    batch = collate_packed([example(2, [7, 8]), example(3, [9])], pad_id=0)
    assert batch["input_ids"].tolist() == [[100, 101, 7, 8, 100, 101, 102, 9]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 2, 3]]
    assert batch["cu_seq_lens"].tolist() == [0, 4, 8]
    assert batch["cu_seq_lens"].dtype == torch.int32
    assert batch["max_length"] == 4
    labels = batch["labels"][0]
    # After the model's left shift, the token at each sequence start is never a target.
    assert all(labels[s] == IGNORE_INDEX for s in batch["cu_seq_lens"][:-1].tolist())
    assert count_labelled([example(2, [7, 8]), example(3, [9])]) == int((labels != -100).sum()) == 3


def test_collate_packed_rejects_labelled_first_token():
    bad = Example([1, 2], [1, 2], 4, 0)
    with pytest.raises(ValueError, match="record 4"):
        collate_packed([bad], pad_id=0)


def test_packed_equals_padded_content_for_real_examples(qwen_tokenizer):
    records = [Record(i, None, [{"role": "user", "content": "问" * i}], f"答{i}") for i in (1, 5, 9)]
    examples = [encode_record(qwen_tokenizer, r, 64) for r in records]
    padded = collate_padded(examples, qwen_tokenizer.pad_token_id)
    packed = collate_packed(examples, qwen_tokenizer.pad_token_id)
    mask = padded["attention_mask"].bool()
    assert padded["input_ids"][mask].tolist() == packed["input_ids"][0].tolist()
    assert padded["labels"][mask].tolist() == packed["labels"][0].tolist()
    assert count_labelled(examples) == int((packed["labels"] != -100).sum())
