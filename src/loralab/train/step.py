"""One optimizer step's math: token-normalised gradient accumulation over micro-batches."""

from __future__ import annotations

from collections.abc import Mapping
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
    dist: Dist, loss_module, examples, micro_batches, pad_id, *, packed=False, pad_multiple=1,
    lockstep=False,
) -> StepStats:
    """Forward/backward this process's micro-batches of one optimizer step.

    Each micro-batch's summed loss is divided by the labelled-token count of the whole step
    (all processes), and the processes' gradients are then summed (`Dist.sum_gradients`): the
    gradient is the same however the step is split into micro-batches, packed rows or processes.
    With `lockstep` (FSDP: every layer's forward and backward is a collective) all processes run
    as many micro-batches: one with fewer repeats a sequence of the step with weight 0.
    """
    from loralab.data.batching import collate_for_model, real_tokens, to_device

    lengths = ({i: len(examples[i].input_ids) for mb in micro_batches for i in mb}
               if dist.world > 1 else None)  # only dealing a step out to processes needs them
    shard = process_shard(micro_batches, dist.rank, dist.world, lengths)
    weights = [1.0] * len(shard)
    if lockstep and dist.world > 1:
        missing = int(dist.max(len(shard))) - len(shard)
        shard, weights = shard + [micro_batches[0][:1]] * missing, weights + [0.0] * missing
    groups = [[examples[i] for i in mb] for mb in shard]
    batches = [collate_for_model(group, pad_id, packed, pad_multiple) for group in groups]
    local = sum(w * int((b["labels"][:, 1:] != -100).sum()) for w, b in zip(weights, batches, strict=True))
    (step_tokens,) = dist.sum([local])
    stats = StepStats()
    for group, batch, weight in zip(groups, batches, weights, strict=True):
        loss_sum, n = loss_module(**to_device(batch, dist.device))
        (loss_sum * weight / max(1.0, step_tokens)).backward()
        if not weight:
            continue
        stats.loss_sum += float(loss_sum.detach())
        stats.tokens += int(n)
        stats.seen_tokens += real_tokens(group)
        stats.largest_batch = max(stats.largest_batch, (batch["input_ids"].numel(), int(n)))
    loss_sum, tokens, seen = dist.sum([stats.loss_sum, stats.tokens, stats.seen_tokens])
    stats.loss_sum, stats.tokens, stats.seen_tokens = loss_sum, int(tokens), int(seen)
    return stats


def process_shard(
    micro_batches: list[list[int]], index: int, processes: int, lengths: Mapping[int, int] | None = None
) -> list[list[int]]:
    """This process's micro-batches of one step (`process_shards`' share number `index`)."""
    if processes == 1:
        return [mb for mb in micro_batches if mb]
    return process_shards(micro_batches, processes, lengths)[index]


def process_shards(
    micro_batches: list[list[int]], processes: int, lengths: Mapping[int, int] | None = None
) -> list[list[list[int]]]:
    """Every process's micro-batches of one step, in rank order.

    One process: the plan as it is. Several: the step's sequences are dealt longest first to the
    process with the fewest tokens so far (a step waits for its slowest process, and the plan
    sorts by length, so dealing whole micro-batches would give process 0 all the long ones),
    then cut into micro-batches no larger than the plan's.
    """
    if processes == 1:
        return [[mb for mb in micro_batches if mb]]
    flat = [i for mb in micro_batches for i in mb]
    size = max(len(mb) for mb in micro_batches)
    cost = (lambda i: lengths[i]) if lengths is not None else (lambda i: 1)
    mine: list[list[int]] = [[] for _ in range(processes)]
    load = [0] * processes
    for i in sorted(flat, key=lambda i: -cost(i)):  # stable: ties keep the plan's order
        k = min(range(processes), key=lambda k: (load[k], k))
        mine[k].append(i)
        load[k] += cost(i)
    return [[share[j : j + size] for j in range(0, len(share), size)] for share in mine]


def clip_gradients(params, max_norm: float) -> float:
    """The gradient norm before clipping (clipped to max_norm when > 0)."""
    if max_norm > 0:
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    grads = [p.grad.detach().float().norm() for p in params if p.grad is not None]
    return float(torch.stack(grads).norm()) if grads else 0.0
