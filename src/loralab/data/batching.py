"""Epoch plans (optimizer steps of micro-batches) and collation into padded or packed tensors."""

from __future__ import annotations

import random
from typing import Any

import torch

from loralab.data.render import IGNORE_INDEX, Example


def plan_steps(
    lengths: list[int],
    micro_batch: int,
    grad_accum: int,
    seed: int,
    epoch: int,
    shuffle: bool = True,
    group_by_length: bool = True,
) -> list[list[list[int]]]:
    """One epoch as optimizer steps, each a list of micro-batches of example indices.

    The examples of every step depend only on (seed, epoch, micro_batch * grad_accum): the
    order is cut into step groups first and only then split into micro-batches, so
    batch 4 x accumulation 4 and batch 16 x accumulation 1 make the same update.
    """
    if micro_batch <= 0 or grad_accum <= 0:
        raise ValueError("micro_batch and grad_accum must be > 0")
    order = list(range(len(lengths)))
    if shuffle:
        # A string seed is hashed deterministically (sha512), independent of PYTHONHASHSEED.
        random.Random(f"loralab:{seed}:{epoch}").shuffle(order)
    per_step = micro_batch * grad_accum
    steps = []
    for start in range(0, len(order), per_step):
        group = order[start : start + per_step]
        if group_by_length:
            # Longest first: similar lengths share a micro-batch, and memory peaks come early.
            group = sorted(group, key=lambda i: -lengths[i])
        steps.append([group[i : i + micro_batch] for i in range(0, len(group), micro_batch)])
    return steps


def count_labelled(examples: list[Example]) -> int:
    """Positions that carry a loss (the loop normalises a step's loss by this)."""
    return sum(1 for e in examples for label in e.labels if label != IGNORE_INDEX)


def collate_padded(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded rows: input_ids, attention_mask, labels (-100 on pad), position_ids."""
    width = max(len(e.input_ids) for e in examples)
    rows = len(examples)
    input_ids = torch.full((rows, width), pad_id, dtype=torch.long)
    labels = torch.full((rows, width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((rows, width), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        input_ids[row, :n] = torch.tensor(example.input_ids, dtype=torch.long)
        labels[row, :n] = torch.tensor(example.labels, dtype=torch.long)
        attention_mask[row, :n] = 1
    position_ids = torch.arange(width, dtype=torch.long).unsqueeze(0).expand(rows, -1).clone()
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "position_ids": position_ids,
    }


def collate_packed(
    examples: list[Example], pad_id: int, pad_to_multiple: int = 1
) -> dict[str, torch.Tensor | int]:
    """All sequences in one row [1, T] with per-sequence positions and cu_seq_lens.

    Labels are shifted left inside the model, so labels[start_k] is predicted from the last
    token of sequence k-1; it must be -100. Every prompt starts with an unlabelled token.
    With pad_to_multiple > 1 the row is filled up to a multiple of it by one extra, unlabelled
    pad sequence: few distinct row lengths mean few compiled shapes (torch.compile) and
    GEMM-friendly sizes; the pad attends only to itself and carries no loss.
    """
    input_ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    cu_seq_lens = [0]
    for example in examples:
        if example.labels[0] != IGNORE_INDEX:
            raise ValueError(f"record {example.record_index}: first token carries a label")
        input_ids += example.input_ids
        labels += example.labels
        positions += range(len(example.input_ids))
        cu_seq_lens.append(len(input_ids))
    longest = max(len(e.input_ids) for e in examples)
    fill = -len(input_ids) % max(1, pad_to_multiple)
    if fill:
        input_ids += [pad_id] * fill
        labels += [IGNORE_INDEX] * fill
        positions += range(fill)
        cu_seq_lens.append(len(input_ids))
        longest = max(longest, fill)
    return {
        "input_ids": torch.tensor([input_ids], dtype=torch.long),
        "labels": torch.tensor([labels], dtype=torch.long),
        "position_ids": torch.tensor([positions], dtype=torch.long),
        "cu_seq_lens": torch.tensor(cu_seq_lens, dtype=torch.int32),
        "max_length": longest,
    }


def real_tokens(examples: list[Example]) -> int:
    """Tokens of the examples themselves (no padding): what tokens/s counts."""
    return sum(len(e.input_ids) for e in examples)


def collate_for_model(
    examples: list[Example], pad_id: int, packed: bool, pad_to_multiple: int = 1
) -> dict[str, Any]:
    """Padded rows, or one packed row with boundaries under transformers' kwarg names."""
    if not packed:
        return collate_padded(examples, pad_id)
    row = collate_packed(examples, pad_id, pad_to_multiple)
    cu, longest = row.pop("cu_seq_lens"), row.pop("max_length")
    return {**row, "cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest,
            "max_length_k": longest}


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Tensors moved to `device` (one copy of a tensor passed under two names), ints kept."""
    moved: dict[int, torch.Tensor] = {}
    out: dict[str, Any] = {}
    for key, value in batch.items():
        if torch.is_tensor(value):
            if id(value) not in moved:
                moved[id(value)] = value.to(device)
            value = moved[id(value)]
        out[key] = value
    return out
