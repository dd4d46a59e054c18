"""Run directories, checkpoints and resume: every write atomic, every checkpoint complete or absent."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from loralab.errors import UserError
from loralab.io import atomic_write_text, read_json, read_jsonl, write_json

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.pt"
KEEP_CHECKPOINTS = 2  # the newest two: one may be mid-write when a run is killed
RUN_MARKERS = ("config.yaml", "result.json", "adapter_config.json")


def is_run_dir(path: Path) -> bool:
    return any((path / m).exists() for m in RUN_MARKERS)


def check_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to write over another run unless asked; --resume needs a run to resume."""
    if resume and overwrite:
        raise UserError("--resume and --overwrite contradict each other: choose one")
    if resume:
        if not is_run_dir(run_dir):
            raise UserError(f"nothing to resume in {run_dir}: it holds no run")
        return
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"output_dir {run_dir} is a file, not a folder")
    if run_dir.is_dir() and is_run_dir(run_dir) and not overwrite:
        raise UserError(
            f"output_dir {run_dir} already holds a run; use --overwrite to replace it, "
            "--resume to continue it, or output_dir=... for a new one"
        )


def clear_run_dir(run_dir: Path) -> None:
    """--overwrite: the old run goes only now, after config, data and model all checked out."""
    if run_dir.is_dir():
        for item in run_dir.iterdir():
            if item.is_dir() and not item.is_symlink():
                shutil.rmtree(item)
            else:
                item.unlink()
    run_dir.mkdir(parents=True, exist_ok=True)


def save_adapter_files(peft_model: Any, tokenizer: Any, folder: Path) -> None:
    """PEFT adapter + tokenizer into `folder`, via a temporary folder and renames.

    adapter_model.safetensors is moved before adapter_config.json, so a reader that finds the
    config also finds the weights that belong to it.
    """
    folder.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".adapter.", dir=folder))
    try:
        peft_model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        names = sorted(p.name for p in tmp.iterdir())
        names.sort(key=lambda n: n == "adapter_config.json")  # config last
        for name in names:
            os.replace(tmp / name, folder / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def save_checkpoint(run_dir: Path, step: int, peft_model: Any, state: dict[str, Any]) -> Path:
    """checkpoints/step-N: adapter + optimizer/scheduler/RNG state, renamed into place whole."""
    root = run_dir / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:07d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".step-{step:07d}.", dir=root))
    try:
        peft_model.save_pretrained(tmp, safe_serialization=True)
        torch.save(state, tmp / STATE_FILE)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(run_dir)[:-KEEP_CHECKPOINTS]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    root = run_dir / CHECKPOINTS
    if not root.is_dir():
        return []
    done = [p for p in root.glob("step-*") if (p / STATE_FILE).is_file()]
    return sorted(done, key=lambda p: int(p.name.split("-")[1]))


def load_checkpoint(path: Path, peft_model: Any) -> dict[str, Any]:
    """Load the adapter weights into `peft_model`; return the trainer state."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    weights = load_file(str(path / "adapter_model.safetensors"))
    device = next(p for p in peft_model.parameters() if p.requires_grad).device
    set_peft_model_state_dict(peft_model, {k: v.to(device) for k, v in weights.items()})
    return torch.load(path / STATE_FILE, map_location="cpu", weights_only=False)


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def trim_metrics(path: Path, last_step: int) -> None:
    """On resume, drop metric rows logged after the checkpoint (they will be logged again)."""
    if not path.is_file():
        return
    rows = [r for r in read_jsonl(path) if r.get("step", 0) <= last_step]
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def check_resume_config(run_dir: Path, new_config: dict[str, Any]) -> None:
    """Resuming with changed hyperparameters would silently mix two runs: refuse."""
    from loralab.config import read_yaml_mapping

    if not (run_dir / "config.yaml").is_file():
        raise UserError(f"cannot resume {run_dir}: its config.yaml is missing")
    saved = _flatten(read_yaml_mapping(run_dir / "config.yaml"))
    wanted = _flatten(new_config)
    diffs = [k for k, v in wanted.items() if saved.get(k) != v and not k.startswith("tracking.")]
    if diffs:
        raise UserError(
            f"cannot resume {run_dir} with a different config: {', '.join(diffs[:5])} changed"
        )


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def read_result(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / "result.json"
    return read_json(path) if path.is_file() else None


def write_result(run_dir: Path, result: dict[str, Any]) -> None:
    write_json(run_dir / "result.json", result)
