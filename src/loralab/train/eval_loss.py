"""Loss on the held-out file every `train.eval_every` steps (no generation: that is `loralab eval`)."""

from __future__ import annotations

from typing import Any

import torch


def held_out_examples(cfg: Any, tokenizer: Any) -> list:
    """The eval file's examples when train.eval_every asks for a held-out loss, else []."""
    if not cfg.train.eval_every or not cfg.data.eval_path:
        return []
    from loralab.data.summary import build_dataset

    examples, _ = build_dataset(
        cfg.data, tokenizer, cfg.train.seed, path=cfg.data.eval_path, select=False
    )
    return examples


@torch.no_grad()
def held_out_loss(
    loss_module: Any,
    peft_model: Any,
    examples: list,
    micro_batch: int,
    pad_id: int,
    device: torch.device,
    packed: bool,
    pad_multiple: int,
) -> float:
    """Mean token loss over `examples`, dropout off; the model goes back to training mode."""
    from loralab.data.batching import collate_for_model, to_device

    peft_model.eval()
    total, tokens = 0.0, 0
    try:
        for start in range(0, len(examples), micro_batch):
            group = examples[start : start + micro_batch]
            batch = to_device(collate_for_model(group, pad_id, packed, pad_multiple), device)
            loss_sum, n = loss_module(**batch)
            total += float(loss_sum)
            tokens += int(n)
    finally:
        peft_model.train()
    return total / max(1, tokens)
