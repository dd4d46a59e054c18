"""Which run an adapter folder belongs to, its checkpoints, and which base model it names.

A checkpoint (`RUN/checkpoints/step-N/`) holds an adapter but not the run's config.yaml: the
config is two levels up. Base models are compared by what they resolve to, so
`builtin:tiny-qwen2` and its cache folder, or a hub id and its HF cache snapshot, are one base.
"""

from __future__ import annotations

import re
from pathlib import Path

from loralab.errors import UserError
from loralab.layout import CHECKPOINTS, CONFIG, RunDir

STEP_DIR = re.compile(r"^step-(\d+)$")
HF_SNAPSHOT = re.compile(r"models--(.+?)--(.+)$")


def checkpoint_step(folder: Path) -> int | None:
    """N for `.../checkpoints/step-N` (zero-padded or not), else None."""
    match = STEP_DIR.match(Path(folder).name)
    if match is None or Path(folder).parent.name != CHECKPOINTS:
        return None
    return int(match.group(1))


def display_name(adapter_dir: Path) -> str:
    """A run's folder name; `RUN@step-N` for a checkpoint of RUN."""
    adapter_dir = Path(adapter_dir).resolve()
    step = checkpoint_step(adapter_dir)
    return adapter_dir.name if step is None else f"{adapter_dir.parent.parent.name}@step-{step}"


def config_dir(adapter_dir: Path) -> Path:
    """The folder whose config.yaml describes `adapter_dir`: itself, or for a checkpoint, its
    run (two levels up). A bare PEFT folder has none: then `adapter_dir` itself."""
    adapter_dir = Path(adapter_dir)
    if RunDir(adapter_dir).has_config() or checkpoint_step(adapter_dir) is None:
        return adapter_dir
    run = adapter_dir.parent.parent
    return run if RunDir(run).has_config() else adapter_dir


def checkpoint_curve(run_dir: Path) -> list[tuple[Path, str, int | None]]:
    """(adapter folder, name, step) for every checkpoint of a run, by step, then the final
    adapter (its step from result.json). Only the newest checkpoints exist: training keeps
    train/checkpoint.KEEP_CHECKPOINTS of them."""
    from loralab.train.checkpoint import list_checkpoints

    run_dir, run = Path(run_dir), RunDir(run_dir)
    if not run.has_config():
        raise UserError(f"{run_dir} is not a training run folder (no {CONFIG})")
    name = run_dir.resolve().name
    points: list[tuple[Path, str, int | None]] = []
    for folder in list_checkpoints(run_dir):
        if RunDir(folder).has_adapter():
            points.append((folder, display_name(folder), checkpoint_step(folder)))
    points.sort(key=lambda p: p[2] or 0)
    if run.has_adapter():
        result = run.read_result()
        steps = result.get("steps") if isinstance(result.get("steps"), int) else None
        points.append((run_dir, name, steps))
    if not points:
        raise UserError(f"{run_dir} has no checkpoint and no final adapter to evaluate yet")
    return points


def base_identity(model_path: str) -> str:
    """What a base model name resolves to: a folder's real path, builtin models their cache
    folder, an HF cache snapshot folder the hub id it is a download of."""
    from loralab.model.load import BUILTIN_PREFIX, builtin_model_path

    if model_path.startswith(BUILTIN_PREFIX):
        return str(builtin_model_path(model_path).resolve())
    path = Path(model_path).expanduser()
    if path.parent.name == "snapshots":
        match = HF_SNAPSHOT.search(path.parent.parent.name)
        if match:
            return f"{match.group(1)}/{match.group(2)}"
    return str(path.resolve()) if path.exists() else model_path


def same_base(a: str, b: str) -> bool:
    """Equal names, or two names of the same base (see base_identity)."""
    return a == b or base_identity(a) == base_identity(b)
