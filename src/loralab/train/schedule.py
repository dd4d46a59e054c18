"""The optimizer and learning-rate schedule of one run (AdamW on the LoRA weights), and which
examples each of its steps trains on."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from loralab.config import Config


@dataclass
class Schedule:
    """How many optimizer steps, derived from the data size and the config."""

    steps_per_epoch: int
    total_steps: int
    warmup_steps: int


def make_schedule(cfg: Config, n_examples: int) -> Schedule:
    per_step = cfg.train.batch_size * cfg.train.grad_accum
    steps_per_epoch = max(1, math.ceil(n_examples / per_step))
    total = cfg.train.max_steps or max(1, math.ceil(cfg.train.epochs * steps_per_epoch))
    warmup = cfg.train.warmup_steps or int(cfg.train.warmup_ratio * total)
    return Schedule(steps_per_epoch, total, warmup)


def lr_factor(step: int, schedule: Schedule, kind: str) -> float:
    """Warmup then linear/cosine decay to 0 (as HF's schedulers), or constant."""
    if step < schedule.warmup_steps:
        return (step + 1) / (schedule.warmup_steps + 1)
    if kind == "constant":
        return 1.0
    span = max(1, schedule.total_steps - schedule.warmup_steps)
    progress = (step - schedule.warmup_steps) / span
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return max(0.0, 1.0 - progress)


@dataclass
class Optim:
    params: list
    optimizer: Any
    scheduler: Any
    schedule: Schedule


def make_optimizer(cfg: Config, peft_model: Any, n_examples: int) -> Optim:
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    schedule = make_schedule(cfg, n_examples)
    kind = cfg.train.scheduler
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, schedule, kind))
    return Optim(params, optimizer, scheduler, schedule)


class StepPlan:
    """Which examples each optimizer step trains on, as micro-batches of example indices.

    A pure function of the data's lengths, the seed and the batch sizes (`plan_steps`, one
    epoch at a time, epochs following each other): --resume recomputes it, and memory planning
    (`levers.plan`, `loralab estimate`) reads the run's largest micro-batch from it before any
    weights are loaded.
    """

    def __init__(self, lengths: Sequence[int], micro_batch: int, grad_accum: int, seed: int,
                 shuffle: bool = True, group_by_length: bool = True) -> None:
        self.lengths = list(lengths)
        self.micro_batch, self.grad_accum = micro_batch, grad_accum
        self.seed, self.shuffle, self.group_by_length = seed, shuffle, group_by_length
        self.steps_per_epoch = max(1, math.ceil(len(self.lengths) / (micro_batch * grad_accum)))
        self._epoch: tuple[int, list[list[list[int]]]] = (-1, [])  # the last epoch planned

    @classmethod
    def for_run(cls, cfg: Config, lengths: Sequence[int], micro_batch: int,
                grad_accum: int) -> StepPlan:
        return cls(lengths, micro_batch, grad_accum, cfg.train.seed, cfg.data.shuffle,
                   cfg.train.group_by_length)

    def step(self, index: int) -> list[list[int]]:
        """The micro-batches of step `index` (0-based, counted from the run's first step)."""
        from loralab.data.batching import plan_steps

        epoch, within = divmod(index, self.steps_per_epoch)
        if self._epoch[0] != epoch:
            self._epoch = (epoch, plan_steps(self.lengths, self.micro_batch, self.grad_accum,
                                             self.seed, epoch, self.shuffle, self.group_by_length))
        return self._epoch[1][within]
