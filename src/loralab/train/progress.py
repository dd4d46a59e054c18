"""A progress bar for optimizer steps with loss, tokens/s and ETA (rich)."""

from __future__ import annotations

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


class StepProgress:
    """Shows step i/N, the last loss and throughput; silent when disabled (tests, workers)."""

    def __init__(self, total: int, done: int = 0, enabled: bool = True, label: str = "train") -> None:
        self.progress = None
        if not enabled:
            return
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
        )
        self.task = self.progress.add_task(label, total=total, completed=done, loss="-", speed="-")
        self.progress.start()

    def update(self, step: int, loss: float, tokens_per_s: float) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=step, loss=f"{loss:.4f}", speed=f"{tokens_per_s:,.0f}")

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
