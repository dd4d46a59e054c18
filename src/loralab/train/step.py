"""One optimizer step's math: token-normalised gradient accumulation over micro-batches."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loralab.train.dist import Dist


@dataclass
class StepStats:
    """One step's figures, summed over every process of the job."""

    loss_sum: float = 0.0
    tokens: int = 0  # labelled tokens
    seen_tokens: int = 0  # all real (unpadded) tokens processed
    largest_batch: tuple[int, int] = (0, 0)  # (tokens incl. padding, labelled), this process


def accumulate_step(
    dist: Dist, loss_module, examples, micro_batches, pad_id, *, packed=False, pad_multiple=1
) -> StepStats:
    """Forward/backward this process's micro-batches of one optimizer step.

    Each micro-batch's summed loss is divided by the labelled-token count of the whole step
    (all processes), and the processes' gradients are then summed (`Dist.sum_gradients`): the
    gradient is the same however the step is split into micro-batches, packed rows or processes.
    """
    from loralab.data.batching import collate_for_model, real_tokens, to_device

    shard = process_shard(micro_batches, dist.rank, dist.world)
    groups = [[examples[i] for i in mb] for mb in shard]
    batches = [collate_for_model(group, pad_id, packed, pad_multiple) for group in groups]
    local = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
    (step_tokens,) = dist.sum([local])
    stats = StepStats()
    for group, batch in zip(groups, batches, strict=True):
        loss_sum, n = loss_module(**to_device(batch, dist.device))
        (loss_sum / max(1.0, step_tokens)).backward()
        stats.loss_sum += float(loss_sum.detach())
        stats.tokens += int(n)
        stats.seen_tokens += real_tokens(group)
        stats.largest_batch = max(stats.largest_batch, (batch["input_ids"].numel(), int(n)))
    loss_sum, tokens, seen = dist.sum([stats.loss_sum, stats.tokens, stats.seen_tokens])
    stats.loss_sum, stats.tokens, stats.seen_tokens = loss_sum, int(tokens), int(seen)
    return stats


def process_shard(micro_batches: list[list[int]], index: int, processes: int) -> list[list[int]]:
    """This process's micro-batches of a step: whole micro-batches dealt round-robin, or, when
    the step has fewer micro-batches than processes, its sequences dealt one by one."""
    if processes > 1 and len(micro_batches) < processes:
        flat = [i for mb in micro_batches for i in mb]
        micro_batches = [flat[k::processes] for k in range(processes)]
    return [mb for mb in micro_batches[index::processes] if mb]


def clip_gradients(params, max_norm: float) -> float:
    """The gradient norm before clipping (clipped to max_norm when > 0)."""
    if max_norm > 0:
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    grads = [p.grad.detach().float().norm() for p in params if p.grad is not None]
    return float(torch.stack(grads).norm()) if grads else 0.0
