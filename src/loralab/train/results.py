"""What result.json says about a run: identity, size, losses, speed, memory."""

from __future__ import annotations

import os
import resource
import time
from pathlib import Path
from typing import Any

import torch

from loralab.config import Config
from loralab.io import git_commit, versions


def peak_memory_gb() -> float:
    """Peak CUDA allocation, or the process's peak RSS on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def run_identity(
    cfg: Config, summary: dict, total_steps: int, steps_per_epoch: int, trainable: int, total: int
) -> dict[str, Any]:
    return {
        "run_dir": str(Path(cfg.output_dir).resolve()),
        "total_steps": total_steps,
        "steps_per_epoch": steps_per_epoch,
        "examples": summary.get("kept"),
        "trainable_params": trainable,
        "total_params": total,
        "versions": versions(),
        "git_commit": git_commit(),
        "device": device_name(),
    }


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"cpu ({os.cpu_count()} cores)"


def final_numbers(
    losses: list[float], tokens: int, train_seconds: float, started: float
) -> dict[str, Any]:
    tail = losses[-max(1, len(losses) // 10) :]
    return {
        "steps": len(losses),
        "first_loss": losses[0] if losses else None,
        "final_loss": losses[-1] if losses else None,
        "final_loss_avg": sum(tail) / len(tail) if tail else None,
        "mean_loss": sum(losses) / len(losses) if losses else None,
        "tokens": tokens,
        "train_seconds": round(train_seconds, 3),
        "wall_seconds": round(time.time() - started, 3),
        "tokens_per_s": tokens / train_seconds if train_seconds else None,
        "peak_memory_gb": round(peak_memory_gb(), 3),
    }
