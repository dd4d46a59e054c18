"""sweep.mode: packed (trials train together over one base) or sequential, and `auto`'s rule.

Trials can share one forward/backward when they share everything the base's pass depends on:
the model and its precision, the target modules, and the fast-path levers. Rank, alpha,
dropout, learning rate, schedule, epochs, batch and data may all differ.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from loralab.sweep.spec import MODES, Trial, base_key

__all__ = ["MODES", "ModeChoice", "choose", "combined_config", "unpackable"]
# auto packs bases up to this size. Measured on one H200, 8 trials at effective batch 16
# (docs/packed_sweeps.md): packed took 0.53x the sequential time on Qwen2.5-0.5B shapes and
# 0.71x on 1.5B, but 1.08x on 7B, whose one-trial step already keeps the card busy.
PACK_MAX_PARAMS = 4_000_000_000
# Levers of the base's pass: one value for every packed trial.
SHARED_TRAIN_KEYS = ("precision", "packing", "attention", "pack_multiple", "compile",
                     "labelled_logits", "loss_chunk", "memory", "gradient_checkpointing",
                     "strategy")


@dataclass
class ModeChoice:
    """What the sweep will do: the mode, how many trials run together, and why."""

    mode: str  # packed | sequential
    together: int  # trials per pass (1: sequential)
    reason: str
    predicted_gib: float | None = None  # packed on a GPU: the combined step's predicted peak
    micro_batches: int | None = None  # packed: micro-batches per combined step


def unpackable(trials: list[Trial]) -> list[str]:
    """Why these trials cannot train packed (empty: they can)."""
    if len(trials) < 2:
        return ["fewer than 2 trials to run"]
    first = trials[0].config
    why = []
    if len({base_key(t.config) for t in trials}) > 1:
        why.append("trials use different base models or precisions")
    if len({tuple(t.config.lora.target_modules) for t in trials}) > 1:
        why.append("trials target different modules")
    if any(t.config.lora.dora for t in trials):
        why.append("DoRA trials need PEFT's own layers")
    if any(t.config.train.eval_every and t.config.data.eval_path for t in trials):
        why.append("held-out loss / early stopping runs only sequentially")
    if first.train.strategy == "fsdp":
        why.append("train.strategy=fsdp")
    for key in SHARED_TRAIN_KEYS:
        if len({str(getattr(t.config.train, key)) for t in trials}) > 1:
            why.append(f"trials differ in train.{key} (a lever of the shared base pass)")
    return why


def combined_config(trials: list[Trial]) -> Any:
    """The first trial's config as one big trial: every trial's step rows in one step, the sum
    of the ranks (what the memory planner needs to size a combined step)."""
    first = trials[0].config
    rows = sum(t.config.train.batch_size * t.config.train.grad_accum for t in trials)
    return dataclasses.replace(
        first,
        train=dataclasses.replace(first.train, batch_size=rows, grad_accum=1),
        lora=dataclasses.replace(first.lora, r=sum(t.config.lora.r for t in trials),
                                 dropout=max(t.config.lora.dropout for t in trials)),
    )


def micro_batches(trials: list[Trial], planned: Any | None) -> int:
    """Micro-batches per combined step: the memory plan's (CUDA, memory auto), else the largest
    grad_accum of the trials (each trial's slice then is about its own micro-batch)."""
    if planned is not None and trials[0].config.train.memory == "auto":
        return max(1, planned.grad_accum)
    return max(t.config.train.grad_accum for t in trials)


def choose(mode: str, trials: list[Trial], cuda: bool, planned: Any | None = None,
           base_params: int | None = None) -> ModeChoice:
    """The mode for these (unfinished) trials. `planned`: the combined step's FastPath on a
    GPU (levers.plan of `combined_config`), for auto's memory rule; `base_params`: the base
    model's parameter count, for auto's size rule (PACK_MAX_PARAMS)."""
    why = unpackable(trials)
    gib = planned.predicted_gib["total"] if planned is not None and planned.predicted_gib else None
    if mode == "sequential" or (mode == "auto" and why):
        reason = "sweep.mode=sequential" if mode == "sequential" else "; ".join(why)
        return ModeChoice("sequential", 1, reason)
    if mode == "packed" and why and len(trials) >= 2:
        from loralab.errors import UserError

        raise UserError("sweep.mode=packed: " + "; ".join(why) + " (sweep.mode=sequential or auto)")
    if mode == "packed":
        return ModeChoice("packed", len(trials), "sweep.mode=packed", gib,
                          micro_batches(trials, planned))
    if not cuda:
        return ModeChoice("sequential", 1, "auto on CPU: packing pays on a GPU (launch overhead)")
    if base_params is not None and base_params > PACK_MAX_PARAMS:
        return ModeChoice("sequential", 1, f"auto: a {base_params / 1e9:.1f}B base is busy with one "
                          "trial's step already (packing measured slower on 7B)", gib)
    parts = micro_batches(trials, planned)
    rows_per_micro = math.ceil(sum(t.config.train.batch_size * t.config.train.grad_accum
                                   for t in trials) / parts)
    if rows_per_micro < len(trials):
        return ModeChoice("sequential", 1, "auto: a combined micro-batch would hold less than one "
                          "row per trial in memory", gib)
    return ModeChoice("packed", len(trials), "auto: same base and targets, fits in memory", gib, parts)
