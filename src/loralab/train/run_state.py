"""What a run has done, and how it survives a kill: checkpoints of the loop's state, --resume."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loralab import layout
from loralab.errors import UserError
from loralab.train import checkpoint as ckpt
from loralab.train.dist import Dist, PeerFailed
from loralab.train.early_stop import BestEval
from loralab.train.schedule import Optim
from loralab.train.step import StepStats


@dataclass
class Progress:
    """What the loop has done so far; checkpoints save it and --resume restores it."""

    step: int = 0
    losses: list[float] = field(default_factory=list)
    tokens: int = 0  # real tokens trained on
    train_seconds: float = 0.0
    largest: tuple[int, int] = (0, 0)  # largest micro-batch: (tokens incl. padding, labelled)
    best: BestEval = field(default_factory=BestEval)  # held-out loss: best so far, early stopping

    def add_step(self, step: int, loss: float, stats: StepStats, seconds: float) -> None:
        """Optimizer step `step` (1-based) is done: its loss, tokens, time and largest batch."""
        self.step = step
        self.losses.append(loss)
        self.tokens += stats.seen_tokens
        self.train_seconds += seconds
        self.largest = max(self.largest, stats.largest_batch)


def restore_progress(
    run_dir: Path, resume: bool, peft_model: Any, opt: Optim, dist: Dist, patience: int
) -> Progress:
    """The last checkpoint's weights, optimizer, schedule and RNG; metrics after it dropped."""
    if not resume:
        return Progress(best=BestEval(patience))
    done = Progress(best=BestEval(patience))
    found = ckpt.list_checkpoints(run_dir)
    if found:
        state = ckpt.load_checkpoint(found[-1], peft_model)
        opt.optimizer.load_state_dict(state["optimizer"])
        opt.scheduler.load_state_dict(state["scheduler"])
        rngs = state.get("rng_by_rank") or [state["rng"]]
        ckpt.set_rng_state(rngs[dist.rank] if dist.rank < len(rngs) else rngs[0])
        done = Progress(
            state["step"],
            list(state["losses"]),
            int(state["tokens"]),
            float(state["train_seconds"]),
            best=BestEval.from_state(patience, state.get("best")),
        )
    _same_step_everywhere(done.step, dist)
    if dist.is_main:  # only the main process writes the run folder
        ckpt.trim_metrics(run_dir / layout.STEP_METRICS, done.step)
    return done


def _same_step_everywhere(step: int, dist: Dist) -> None:
    """Every process must resume from the same checkpoint (each reads the run folder itself)."""
    steps = dist.gather(step)
    if len(set(steps)) > 1:
        message = (f"--resume: the processes found different checkpoints (steps {steps}); with "
                   "several machines, output_dir must be one folder they all share")
        if dist.is_main:
            raise UserError(message)
        raise PeerFailed(message)


def save_progress(
    run_dir: Path, peft_model: Any, opt: Optim, done: Progress, dist: Dist, keep: int
) -> None:
    """Written by the main process; every process's RNG state goes in (dropout differs)."""
    rng_by_rank = dist.gather(ckpt.rng_state())
    if not dist.is_main:
        return
    state = {
        "step": done.step,
        "optimizer": opt.optimizer.state_dict(),
        "scheduler": opt.scheduler.state_dict(),
        "rng": rng_by_rank[0],
        "rng_by_rank": rng_by_rank,
        "losses": list(done.losses),
        "tokens": done.tokens,
        "train_seconds": done.train_seconds,
        "best": done.best.state(),
    }
    ckpt.save_checkpoint(run_dir, done.step, peft_model, state, keep)
