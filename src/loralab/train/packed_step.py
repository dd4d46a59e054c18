"""One optimizer step of several trials at once over one frozen base (the packed sweep).

Each trial contributes its own step's sequences (its own data plan); the combined step (every
trial's sequences one after another) is cut into micro-batches of ceil(Σ rows / parts) rows,
the size the memory plan was made for (`planned_rows`). Every token knows
its trial (`owners`), so the packed LoRA layers apply only that trial's adapter, and the loss is
summed per trial. Trial t's backward weight is 1 / (t's labelled tokens in its whole step):
its gradient is exactly the one it would get trained alone (token-normalised accumulation,
`train/step.py`), whatever the other trials in the batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from loralab.data.batching import collate_for_model, real_tokens, to_device


@dataclass
class PackedStats:
    """One combined step's figures, per trial slot."""

    loss_sum: dict[int, float] = field(default_factory=dict)
    tokens: dict[int, int] = field(default_factory=dict)  # labelled tokens
    seen_tokens: dict[int, int] = field(default_factory=dict)
    largest_batch: tuple[int, int] = (0, 0)  # (tokens incl. padding, labelled) of a micro-batch


def planned_rows(rows: int, parts: int) -> int:
    """Rows of one combined micro-batch: what the memory plan sizes (`sweep/packed.py`)."""
    return -(-rows // parts)


def split_combined(steps: dict[int, list[Any]], parts: int) -> list[list[tuple[int, list[Any]]]]:
    """The combined step cut into `parts` micro-batches of (slot, examples) pieces.

    The trials' sequences are cut as one list: slicing each trial separately would round each
    trial up (12 and 16 rows in 7 parts: 2 + 3 = 5 rows, not the planned 4)."""
    flat = [(slot, example) for slot, examples in steps.items() for example in examples]
    size = planned_rows(len(flat), parts)
    cut: list[list[tuple[int, list[Any]]]] = []
    for start in range(0, len(flat), max(1, size)):
        pieces: list[tuple[int, list[Any]]] = []
        for slot, example in flat[start : start + size]:
            if pieces and pieces[-1][0] == slot:
                pieces[-1][1].append(example)
            else:
                pieces.append((slot, [example]))
        cut.append(pieces)
    return cut


def collate_with_owners(
    pieces: list[tuple[int, list[Any]]], pad_id: int, packed: bool, pad_multiple: int
) -> tuple[dict[str, Any], torch.Tensor]:
    """(slot, examples) pieces → one model batch and the owner slot of every token.

    Padded rows: each row's tokens belong to its trial. Packed (one row): each sequence's
    tokens belong to its trial, the fill at the end to nobody (-1).
    """
    examples = [e for _, group in pieces for e in group]
    slots = [slot for slot, group in pieces for _ in group]
    batch = collate_for_model(examples, pad_id, packed, pad_multiple)
    if not packed:
        width = batch["input_ids"].shape[1]
        owners = torch.tensor(slots, dtype=torch.long).unsqueeze(1).expand(-1, width).contiguous()
        return batch, owners
    owner_list: list[int] = []
    for slot, example in zip(slots, examples, strict=True):
        owner_list += [slot] * len(example.input_ids)
    owner_list += [-1] * (batch["input_ids"].shape[1] - len(owner_list))
    return batch, torch.tensor([owner_list], dtype=torch.long)


def per_trial_loss(
    lm: nn.Module, batch: dict[str, Any], owners: torch.Tensor, n_slots: int, chunk: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss sums [n_slots], labelled counts [n_slots]): LabelledLoss split by trial."""
    labels = batch.pop("labels")
    input_ids = batch.pop("input_ids")
    hidden = lm.model(input_ids=input_ids, **batch).last_hidden_state
    targets = labels[:, 1:]
    mask = targets != -100
    picked, wanted, who = hidden[:, :-1][mask], targets[mask], owners[:, 1:][mask]
    losses = hidden.new_zeros(n_slots, dtype=torch.float32)
    for start in range(0, picked.shape[0], chunk):
        h, t = picked[start : start + chunk], wanted[start : start + chunk]
        if torch.is_grad_enabled() and h.requires_grad:
            # As chunked_cross_entropy: logits recomputed in backward, one chunk in memory.
            ce = checkpoint(_token_ce, h, t, lm.lm_head, use_reentrant=False)
        else:
            ce = _token_ce(h, t, lm.lm_head)
        losses = losses.index_add(0, who[start : start + chunk], ce)
    return losses, torch.bincount(who, minlength=n_slots)


def _token_ce(hidden: torch.Tensor, targets: torch.Tensor, head: nn.Module) -> torch.Tensor:
    logits = head(hidden).float()
    return nn.functional.cross_entropy(logits, targets, reduction="none")


def all_finite(groups: list[list[torch.Tensor]]) -> list[bool]:
    """Whether each group of tensors (a trial's weights or gradients) is all finite: one
    fused norm per group, one device sync for all. A norm that overflows (entries ~1e19) also
    reads False: such a trial is then computed alone, which is exact, only slower."""
    flags = [torch.stack(torch._foreach_norm(group)).isfinite().all() if group else None
             for group in groups]
    present = [f for f in flags if f is not None]
    values = iter(torch.stack(present).tolist() if present else [])
    return [True if f is None else bool(next(values)) for f in flags]


def labelled_in(examples: list[Any]) -> int:
    return sum(1 for e in examples for x in e.labels[1:] if x != -100)


def accumulate_packed_step(
    adapters: Any, lm: nn.Module, steps: dict[int, list[Any]], parts: int, pad_id: int,
    device: torch.device, *, packed: bool = False, pad_multiple: int = 1, chunk: int = 2048,
) -> PackedStats:
    """Forward/backward one combined step: `steps` maps each active slot to its step's
    examples (in its plan's order); they are cut into `parts` micro-batches at most."""
    ctx = adapters.ctx
    n_slots = max(steps) + 1
    weights = torch.zeros(n_slots, dtype=torch.float32, device=device)
    for slot, examples in steps.items():
        weights[slot] = 1.0 / max(1, labelled_in(examples))
    stats = PackedStats({s: 0.0 for s in steps}, {s: 0 for s in steps}, {s: 0 for s in steps})
    for pieces in split_combined(steps, parts):
        batch, owners = collate_with_owners(pieces, pad_id, packed, pad_multiple)
        batch, owners = to_device(batch, device), owners.to(device)
        ctx.set_owners(owners)
        try:
            losses, counts = per_trial_loss(lm, batch, owners, n_slots, chunk)
            (losses * weights).sum().backward()
        finally:
            ctx.clear()
        sums, ns = losses.detach().cpu().tolist(), counts.cpu().tolist()
        for slot, group in pieces:
            stats.loss_sum[slot] += sums[slot]
            stats.tokens[slot] += int(ns[slot])
            stats.seen_tokens[slot] += real_tokens(group)
        stats.largest_batch = max(stats.largest_batch, (owners.numel(), int(sum(ns))))
    return stats
