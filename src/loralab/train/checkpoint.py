"""Run directories, checkpoints and resume: every write atomic, every checkpoint complete or absent."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from loralab import layout, rundir
from loralab.errors import UserError
from loralab.io import (
    atomic_write_bytes,
    atomic_write_text,
    make_temp_dir,
    read_jsonl,
    use_umask,
    write_json,
)

CHECKPOINTS = layout.CHECKPOINTS
STATE_FILE = layout.TRAINER_STATE
KEEP_CHECKPOINTS = 2  # the newest two: one may be mid-write when a run is killed
MARKER = rundir.MARKER
DRY_RUN_FILE = layout.DATA_SUMMARY  # all that --dry-run writes


def is_run_dir(path: Path) -> bool:
    """A loralab run: its marker, or an older loralab's config.yaml + result.json."""
    return rundir.folder_kind(Path(path)) == "run"


def check_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to write over another run unless asked, and into anything that is not a run ever;
    --resume needs a run to resume; --overwrite never clears /, home, the cwd or its parents."""
    run_dir = Path(run_dir)
    if resume and overwrite:
        raise UserError("--resume and --overwrite contradict each other: choose one")
    if resume:
        if not is_run_dir(run_dir):
            raise UserError(f"nothing to resume in {run_dir}: it holds no loralab run")
        return
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"output_dir {run_dir} is a file, not a folder")
    if overwrite:
        rundir.refuse_precious(run_dir)
    if rundir.is_empty(run_dir) or holds_only_a_dry_run(run_dir):
        return
    kind = rundir.folder_kind(run_dir)
    if kind is None:
        raise UserError(
            f"output_dir {run_dir} is not empty and is not a loralab run (no {MARKER}): "
            "loralab writes only into a new or empty folder or one of its runs; "
            "choose another output_dir"
        )
    if kind != "run":
        raise UserError(f"output_dir {run_dir} holds a loralab {kind}, not a run: "
                        "choose another output_dir")
    if not overwrite:
        raise UserError(
            f"output_dir {run_dir} already holds a run; use --overwrite to replace it, "
            "--resume to continue it, or output_dir=... for a new one"
        )


def holds_only_a_dry_run(run_dir: Path) -> bool:
    """A folder `loralab train --dry-run` made: loralab's marker and data_summary.json only
    (the training run that follows writes into it as into a new folder)."""
    run_dir = Path(run_dir)
    if rundir.folder_kind(run_dir) != "run":
        return False
    allowed = {rundir.MARKER, rundir.LOCK, DRY_RUN_FILE}
    return all(p.name in allowed for p in run_dir.iterdir())


def clear_run_dir(run_dir: Path) -> None:
    """--overwrite: the old run goes only now, after config, data and model all checked out.
    Only what loralab wrote goes (other files stay); the checks are made again here."""
    run_dir = Path(run_dir)
    rundir.refuse_precious(run_dir)
    if run_dir.is_dir() and not rundir.is_empty(run_dir):
        if not is_run_dir(run_dir):
            raise UserError(f"--overwrite refuses {run_dir}: it is not a loralab run (no {MARKER})")
        rundir.remove_known(run_dir, "run")
    run_dir.mkdir(parents=True, exist_ok=True)


def save_adapter_files(peft_model: Any, tokenizer: Any, folder: Path) -> None:
    """PEFT adapter + tokenizer into `folder`, via a temporary folder and renames.

    adapter_model.safetensors is moved before adapter_config.json, so a reader that finds the
    config also finds the weights that belong to it.
    """
    folder.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(".adapter.", folder)
    try:
        with os_errors(tmp):
            # save_embedding_layers=False: PEFT would ask the hub about the base on every save.
            peft_model.save_pretrained(tmp, safe_serialization=True, save_embedding_layers=False)
        if tokenizer is not None:
            with os_errors(tmp):  # the tokenizers library says "File too large (os error 27)"
                tokenizer.save_pretrained(tmp)
        names = sorted(p.name for p in tmp.iterdir())
        names.sort(key=lambda n: n == layout.ADAPTER_CONFIG)  # config last
        for name in names:
            os.replace(tmp / name, folder / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def save_checkpoint(run_dir: Path, step: int, peft_model: Any, state: dict[str, Any],
                    keep: int = KEEP_CHECKPOINTS) -> Path:
    """checkpoints/step-N: adapter + optimizer/scheduler/RNG state, renamed into place whole;
    the newest `keep` checkpoints stay (0: all)."""
    final = layout.RunDir(run_dir).checkpoint(step)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(f".{final.name}.", final.parent)
    try:
        with os_errors(tmp):
            # save_embedding_layers=False: PEFT would ask the hub about the base on every save.
            peft_model.save_pretrained(tmp, safe_serialization=True, save_embedding_layers=False)
        # Through memory: torch.save's own writer reports a full disk as "unexpected pos".
        buffer = io.BytesIO()
        torch.save(state, buffer)
        atomic_write_bytes(tmp / STATE_FILE, buffer.getvalue())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        use_umask(final, is_dir=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in (list_checkpoints(run_dir)[:-keep] if keep else []):
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    """The complete checkpoints (their state file written last), oldest first."""
    root = layout.RunDir(run_dir).checkpoints
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir()
            if layout.checkpoint_step(p.name) is not None and (p / STATE_FILE).is_file()]
    return sorted(done, key=lambda p: layout.checkpoint_step(p.name))


def load_checkpoint(path: Path, peft_model: Any) -> dict[str, Any]:
    """Load the adapter weights into `peft_model`; return the trainer state.

    Nothing in the folder is executed: the state loads with weights_only=True (tensors, numbers,
    lists and dicts only), so a pickle planted in a checkpoint is refused, not run."""
    from peft import set_peft_model_state_dict

    weights = read_safetensors(layout.RunDir(path).adapter_weights)
    device = next(p for p in peft_model.parameters() if p.requires_grad).device
    set_peft_model_state_dict(peft_model, {k: v.to(device) for k, v in weights.items()})
    return read_trainer_state(path / STATE_FILE)


def read_safetensors(file: Path) -> dict[str, Any]:
    """All tensors of a safetensors file; a missing, empty, cut or bad-header file is one line."""
    from safetensors.torch import load_file

    try:
        return load_file(str(file))
    except Exception as exc:  # SafetensorError, OSError
        raise UserError(f"cannot read {file}: {_first_line(exc)}") from None


def read_trainer_state(file: Path) -> dict[str, Any]:
    """trainer_state.pt with weights_only=True; anything else in it is one line naming it."""
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError for code or unknown classes, RuntimeError, OSError
        raise UserError(f"cannot load {file} (loralab loads tensors only, weights_only=True): "
                        f"{_first_line(exc)}") from None
    wanted = ("step", "optimizer", "scheduler", "rng", "losses", "tokens", "train_seconds")
    if not isinstance(state, dict) or any(k not in state for k in wanted):
        raise UserError(f"{file} is not a loralab trainer state")
    return state


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


_OS_ERROR = re.compile(r"\(os error (\d+)\)")


@contextlib.contextmanager
def os_errors(where: Path):
    """safetensors reports a full disk as SafetensorError "... (os error 28)": make it the
    OSError it is, so the CLI prints one line and result.json says failed."""
    try:
        yield
    except OSError:
        raise
    except Exception as exc:
        found = _OS_ERROR.search(str(exc))
        if not found:
            raise
        code = int(found.group(1))
        raise OSError(code, os.strerror(code), str(where)) from exc


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

    folder = layout.RunDir(run_dir)
    if not folder.has_config():
        raise UserError(f"cannot resume {run_dir}: its {layout.CONFIG} is missing")
    from loralab.config import Config

    saved = _flatten(read_yaml_mapping(folder.config))
    wanted = _flatten(new_config)
    # A key an older loralab did not write had its default then (it did not exist).
    defaults = _flatten(Config().to_dict())
    # A moved or copied run folder resumes where it is now: output_dir is not a hyperparameter.
    diffs = [k for k, v in wanted.items()
             if saved.get(k, defaults.get(k)) != v and not k.startswith("tracking.")
             and k != "output_dir"]
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


def write_result(run_dir: Path, result: dict[str, Any]) -> None:
    write_json(layout.RunDir(run_dir).result, result)
