"""Training progress: a rich bar on a terminal, one plain line per logging interval elsewhere.

A 4-hour job under nohup or slurm writes to a file, where rich draws nothing until the end:
there every `every` steps (and at the last step) one flushed line says
`step i/N  loss x  tok/s y  elapsed h:mm:ss  ETA h:mm:ss  [eval_loss z]`.
"""

from __future__ import annotations

import sys
import time
from typing import IO

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from loralab.textout import is_terminal


def clock(seconds: float | None) -> str:
    """h:mm:ss, or '-' when unknown."""
    if seconds is None:
        return "-"
    seconds = max(0, round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def print_split(per_step: int, micro_batch: int, processes: int) -> None:
    """One line at the start of a multi-process run: how a step's sequences are shared."""
    from rich.console import Console

    Console().print(
        f"{processes} processes: each optimizer step's {per_step} sequences are shared, "
        f"~{-(-per_step // processes)} per process (micro-batches of up to {micro_batch}); "
        "gradients summed over processes, so the step equals one process's"
    )


def step_line(step: int, total: int, loss: float, tokens_per_s: float, elapsed: float,
              eta: float | None, eval_loss: float | None = None) -> str:
    """The plain progress line written when the stream is not a terminal."""
    line = (f"step {step}/{total}  loss {loss:.4f}  tok/s {tokens_per_s:,.0f}  "
            f"elapsed {clock(elapsed)}  ETA {clock(eta)}")
    return line if eval_loss is None else f"{line}  eval_loss {eval_loss:.4f}"


class StepProgress:
    """Shows step i/N, the last loss, throughput, ETA and the held-out loss when computed.

    enabled=False: silent (tests, non-main processes). `stream` (default stdout) decides the
    form: a terminal gets the rich bar, anything else a plain line every `log_every` steps."""

    def __init__(self, total: int, done: int = 0, enabled: bool = True, label: str = "train",
                 log_every: int = 1, stream: IO[str] | None = None) -> None:
        self.total, self.start_step = total, done
        self.every = max(1, int(log_every))
        self.stream = stream if stream is not None else sys.stdout
        self.started = time.perf_counter()
        self.progress: Progress | None = None
        self.enabled = enabled
        if not enabled or not is_terminal(self.stream):
            return
        from rich.console import Console

        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn("{task.fields[speed]} tok/s"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            transient=False,
            console=Console(file=self.stream),
        )
        self.task = self.progress.add_task(label, total=total, completed=done, loss="-", speed="-")
        self.progress.start()

    def update(self, step: int, loss: float, tokens_per_s: float,
               eval_loss: float | None = None) -> None:
        """Record optimizer step `step` (1-based); eval_loss when the held-out loss was computed."""
        if not self.enabled:
            return
        if self.progress is not None:
            self.progress.update(self.task, completed=step, loss=f"{loss:.4f}",
                                 speed=f"{tokens_per_s:,.0f}")
            if eval_loss is not None:  # above the bar, kept in the scrollback
                self.progress.console.print(f"step {step}/{self.total}  eval_loss {eval_loss:.4f}",
                                            highlight=False)
            return
        if step % self.every and step != self.total and eval_loss is None:
            return
        elapsed = time.perf_counter() - self.started
        self.stream.write(step_line(step, self.total, loss, tokens_per_s, elapsed,
                                    self._eta(step, elapsed), eval_loss) + "\n")
        self.stream.flush()

    def _eta(self, step: int, elapsed: float) -> float | None:
        """Remaining steps at this run's pace so far (steps done before a resume excluded)."""
        done = step - self.start_step
        return None if done <= 0 else elapsed / done * (self.total - step)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

