"""One optimizer step's math: token-normalised gradient accumulation over micro-batches."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch


@dataclass
class StepStats:
    loss_sum: float = 0.0
    tokens: int = 0  # labelled tokens
    seen_tokens: int = 0  # all real (unpadded) tokens processed
    largest_batch: tuple[int, int] = (0, 0)  # (tokens incl. padding, labelled) of the largest


def accumulate_step(
    accelerator, loss_module, examples, micro_batches, pad_id, *, packed=False, pad_multiple=1
) -> StepStats:
    """Forward/backward every micro-batch of one optimizer step, normalised by the step's tokens.

    Dividing each micro-batch's summed loss by the labelled-token count of the whole step (all
    processes) gives the same gradient however the step is split into micro-batches (or packed).
    """
    from loralab.data.batching import collate_for_model, real_tokens, to_device

    shard = process_shard(micro_batches, accelerator.process_index, accelerator.num_processes)
    # A process left without a sequence (a step smaller than the process count) must still join
    # DDP's gradient all-reduce: it runs one sequence of the step with weight 0.
    weight = 1.0 if shard else 0.0
    shard = shard or [micro_batches[0][:1]]
    groups = [[examples[i] for i in mb] for mb in shard]
    batches = [collate_for_model(group, pad_id, packed, pad_multiple) for group in groups]
    local = weight * sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
    step_tokens = int(accelerator.reduce(torch.tensor(local, device=accelerator.device), "sum"))
    stats = StepStats()
    for i, (group, batch) in enumerate(zip(groups, batches, strict=True)):
        batch = to_device(batch, accelerator.device)
        sync = i == len(batches) - 1
        with accelerator.no_sync(loss_module) if not sync else contextlib.nullcontext():
            loss_sum, n = loss_module(**batch)
            accelerator.backward(loss_sum * weight / max(1, step_tokens))
        if weight:
            stats.loss_sum += float(loss_sum.detach())
            stats.tokens += int(n)
            stats.seen_tokens += real_tokens(group)
            stats.largest_batch = max(stats.largest_batch, (batch["input_ids"].numel(), int(n)))
    return stats


def process_shard(micro_batches: list[list[int]], index: int, processes: int) -> list[list[int]]:
    """This process's micro-batches of a step. Under DDP every process must run a backward, so
    a step planned as fewer micro-batches than processes (memory auto plans one) is re-split."""
    if processes > 1 and len(micro_batches) < processes:
        flat = [i for mb in micro_batches for i in mb]
        micro_batches = [flat[k::processes] for k in range(processes)]
    return [mb for mb in micro_batches[index::processes] if mb]


def clip_gradients(accelerator, params, max_norm: float) -> float:
    if max_norm > 0:
        return float(accelerator.clip_grad_norm_(params, max_norm))
    grads = [p.grad.detach().float().norm() for p in params if p.grad is not None]
    return float(torch.stack(grads).norm()) if grads else 0.0
