"""Experiment trackers behind one small interface: SwanLab (default, local mode), TensorBoard, none.

Every metric is logged exactly once per step, by the loop, through `Tracker.log` (the seed sent
each metric twice: SwanLab's callback plus Trainer's own reporting).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console

from loralab.config import TrackingConfig

console = Console(stderr=True)


class Tracker:
    """No-op tracker; subclasses send metrics somewhere. A failure disables it, once, loudly."""

    name = "none"
    where: str | None = None

    def log(self, metrics: dict[str, float], step: int) -> None:
        pass

    def finish(self) -> None:
        pass

    def _disable(self, why: str) -> None:
        console.print(f"[yellow]tracking: {self.name} stopped ({why}); training continues[/yellow]")
        self.__class__ = Tracker


class SwanLabTracker(Tracker):
    name = "swanlab"

    def __init__(self, cfg: TrackingConfig, run_name: str, log_dir: Path, config: dict[str, Any]) -> None:
        import swanlab

        self.swanlab = swanlab
        mode = "cloud" if cfg.mode == "online" else cfg.mode
        log_dir.mkdir(parents=True, exist_ok=True)
        kwargs: dict[str, Any] = dict(
            project=cfg.project,
            experiment_name=cfg.experiment or run_name,
            config=config,
            mode=mode,
            logdir=str(log_dir),
        )
        if cfg.group:
            kwargs["group"] = cfg.group
        try:
            self.run = swanlab.init(**kwargs)
        except TypeError:  # older swanlab without `group`
            kwargs.pop("group", None)
            self.run = swanlab.init(**kwargs)
        self.where = str(log_dir)

    def log(self, metrics: dict[str, float], step: int) -> None:
        try:
            self.swanlab.log(metrics, step=step)
        except Exception as exc:  # a tracker must never stop training
            self._disable(f"{type(exc).__name__}: {exc}")

    def finish(self) -> None:
        try:
            self.swanlab.finish()
        except Exception as exc:
            self._disable(f"{type(exc).__name__}: {exc}")


class TensorBoardTracker(Tracker):
    name = "tensorboard"

    def __init__(self, log_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(log_dir))
        self.where = str(log_dir)

    def log(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)

    def finish(self) -> None:
        self.writer.close()


def tracker_metrics(row: dict[str, Any]) -> dict[str, float]:
    """A metrics.jsonl row under the trackers' names: train/<key>, and eval/loss."""
    out = {f"train/{k}": v for k, v in row.items() if k not in ("step", "eval_loss")}
    if "eval_loss" in row:
        out["eval/loss"] = row["eval_loss"]
    return out


def start_tracker(cfg: TrackingConfig, run_dir: Path, config: dict[str, Any]) -> Tracker:
    """The configured tracker, or the no-op one with one line saying why it could not start."""
    if cfg.backend == "none" or cfg.mode == "disabled":
        return Tracker()
    default_dir = run_dir.parent / ("swanlog" if cfg.backend == "swanlab" else "tensorboard")
    log_dir = Path(cfg.log_dir) if cfg.log_dir else default_dir
    try:
        if cfg.backend == "swanlab":
            if cfg.mode == "local":
                _require_swanboard()
            return SwanLabTracker(cfg, run_dir.name, log_dir, config)
        return TensorBoardTracker(log_dir / run_dir.name)
    except Exception as exc:  # missing package, no network for online mode, bad key...
        console.print(
            f"[yellow]tracking: {cfg.backend} could not start ({type(exc).__name__}: {exc}); "
            "training continues, metrics go to metrics.jsonl[/yellow]"
        )
        return Tracker()


def _require_swanboard() -> None:
    # swanlab's local mode silently writes nothing viewable without its dashboard package.
    import importlib.util

    if importlib.util.find_spec("swanboard") is None:
        raise ImportError("local mode needs the dashboard: pip install 'swanlab[dashboard]'")
