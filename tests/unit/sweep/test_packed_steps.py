"""The packed sweep's combined step: micro-batch sizes against the memory plan."""

from __future__ import annotations

from types import SimpleNamespace

import torch

import loralab.train.packed_step as packed_step


def _examples(n: int) -> list:
    return [SimpleNamespace(input_ids=[1, 2, 3], labels=[1, 2, 3]) for _ in range(n)]


def test_no_combined_micro_batch_holds_more_rows_than_the_plan(monkeypatch):
    """12 and 16 rows in 7 micro-batches: the plan sized ceil(28 / 7) = 4 rows; slicing each
    trial on its own ran 2 + 3 = 5."""
    rows: list[list[tuple[int, int]]] = []

    def collate(pieces, *args):
        rows.append([(slot, len(group)) for slot, group in pieces])
        return {}, torch.zeros(1, 1, dtype=torch.long)

    def loss(lm, batch, owners, n_slots, chunk):
        return torch.zeros(n_slots, requires_grad=True) * 1.0, torch.zeros(n_slots, dtype=torch.long)

    monkeypatch.setattr(packed_step, "collate_with_owners", collate)
    monkeypatch.setattr(packed_step, "per_trial_loss", loss)
    adapters = SimpleNamespace(ctx=SimpleNamespace(set_owners=lambda owners: None, clear=lambda: None))
    steps = {0: _examples(12), 1: _examples(16)}
    stats = packed_step.accumulate_packed_step(adapters, None, steps, 7, 0, torch.device("cpu"))
    assert max(sum(n for _, n in mb) for mb in rows) == 4  # ceil(28 / 7), computed here
    assert len(rows) <= 7
    per_slot = {0: 0, 1: 0}
    for mb in rows:
        for slot, n in mb:
            per_slot[slot] += n
    assert per_slot == {0: 12, 1: 16}  # every sequence once
    assert stats.seen_tokens == {0: 36, 1: 48}
    assert packed_step.planned_rows(28, 7) == 4
