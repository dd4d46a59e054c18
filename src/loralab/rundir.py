"""Folders loralab writes: whose they are, what may be deleted in them, and who writes them now.

- A folder is loralab's only if it holds loralab's marker (`.loralab-run.json`, with its kind:
  run, sweep, comparison or merged), or the layout of an older loralab that wrote no marker
  (a run: config.yaml and result.json both loralab's; a sweep: sweep.json; a comparison:
  targets.json; a merged model: merge_check.json and config.json).
- `--overwrite` removes only the known contents of such a folder; `/`, the home folder, the
  working directory and its parents are refused outright.
- One writer per folder: `folder_lock` (an flock on `.loralab.lock` holding the PID; the kernel
  drops it when its process dies, so a dead run's lock is simply taken over).

No torch import: sweeps and `--dry-run` use this too.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from loralab import layout
from loralab.errors import UserError

MARKER = ".loralab-run.json"
LOCK = ".loralab.lock"
KINDS = ("run", "sweep", "comparison", "merged")
_BOOKKEEPING = (MARKER, LOCK)

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
    "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
    "tokenizer.model", "generation_config.json",
)
# What a run folder holds that loralab wrote (PEFT's save_pretrained writes README.md).
RUN_FILES = (
    layout.CONFIG, layout.RESULT, layout.STEP_METRICS, layout.DATA_SUMMARY, layout.ADAPTER_CONFIG,
    layout.ADAPTER_WEIGHTS, layout.ADAPTER_WEIGHTS_BIN, "README.md", *TOKENIZER_FILES,
)
RUN_FOLDERS = (layout.CHECKPOINTS, layout.EVAL)  # plus comparison/ when it is loralab's
MERGED_FILES = (
    "config.json", "model.safetensors", "model.safetensors.index.json", layout.MERGE_CHECK,
    *TOKENIZER_FILES,
)
# Temporary names of an interrupted write (io.atomic_write_bytes, checkpoint.save_*).
TEMP_PREFIXES = (".adapter.", ".step-")


# ---------------------------------------------------------------- which folders are loralab's


def read_marker(folder: Path) -> dict[str, Any] | None:
    path = Path(folder) / MARKER
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("kind") in KINDS else None


def folder_kind(folder: Path) -> str | None:
    """run / sweep / comparison / merged when `folder` is loralab's, else None."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    marker = read_marker(folder)
    if marker is not None:
        return str(marker["kind"])
    if _legacy_run(folder):
        return "run"
    manifest = layout.SweepDir(folder).manifest
    if _json_with(manifest, "trials", list) and _json_with(manifest, "hash", str):
        return "sweep"
    if _json_with(layout.ComparisonDir(folder).targets_manifest, "targets", list):
        return "comparison"
    if _json_with(folder / layout.MERGE_CHECK, "max_abs_logit_diff", (int, float)) and (
            folder / "config.json").is_file():
        return "merged"
    return None


def _legacy_run(folder: Path) -> bool:
    """A run of a loralab without markers: its config.yaml and result.json both loralab's."""
    import yaml

    from loralab.config import Config

    run = layout.RunDir(folder)
    if not _json_with(run.result, "status", str):
        return False
    try:
        raw = yaml.safe_load(run.config.read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError):
        return False
    top = {f for f in Config.__dataclass_fields__}
    return isinstance(raw, dict) and "output_dir" in raw and set(raw) <= top


def _json_with(path: Path, key: str, kind: type | tuple[type, ...]) -> bool:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and isinstance(data.get(key), kind)


def is_empty(folder: Path) -> bool:
    """No entries but loralab's marker and lock (a missing folder is empty)."""
    folder = Path(folder)
    if not folder.is_dir():
        return True
    return all(p.name in _BOOKKEEPING for p in folder.iterdir())


def mark(folder: Path, kind: str) -> None:
    """Create `folder` if needed and write loralab's marker (kept if already there)."""
    from loralab.io import write_json

    assert kind in KINDS, kind
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    marker = read_marker(folder)
    if marker is not None and marker["kind"] == kind:
        return
    if marker is not None and not is_empty(folder):
        raise UserError(f"{folder} holds a loralab {marker['kind']}, not a {kind}")
    write_json(folder / MARKER, {"kind": kind, "loralab": _version(), "created": _now()})


# ---------------------------------------------------------------- refusals


def refuse_precious(folder: Path, what: str = "--overwrite") -> None:
    """`/`, the home folder, the working directory and any of its parents are never cleared."""
    target = Path(folder).expanduser().resolve()
    cwd = Path.cwd().resolve()
    home = Path.home().expanduser().resolve()
    why = None
    if target == Path(target.anchor):
        why = "the file-system root"
    elif target == home:
        why = "your home folder"
    elif target == cwd:
        why = "the working directory"
    elif target in cwd.parents:
        why = "a parent of the working directory"
    elif target in home.parents:
        why = "a parent of your home folder"
    if why:
        raise UserError(f"{what} refuses {folder} ({why}): give output_dir a folder of its own")


def check_output_dir(folder: Path, kind: str, overwrite: bool) -> bool:
    """May loralab write a `kind` into `folder`? True when it already holds one (the caller
    then needs --overwrite or --resume), False when it is missing or empty. Refuses a file,
    a non-empty folder that is not loralab's `kind`, and with --overwrite the folders of
    `refuse_precious`."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"output folder {folder} is a file, not a folder")
    if overwrite:
        refuse_precious(folder)
    if is_empty(folder):
        return False
    found = folder_kind(folder)
    if found is None:
        raise UserError(
            f"{folder} is not empty and is not a loralab {kind} (no {MARKER}): loralab writes "
            "only into a new or empty folder or one of its own; choose another folder"
        )
    if found != kind:
        raise UserError(f"{folder} holds a loralab {found}, not a {kind}: choose another folder")
    return True


def known_contents(folder: Path, kind: str) -> tuple[list[Path], list[Path]]:
    """(entries loralab wrote, other entries) of a `kind` folder; marker and lock in neither."""
    mine, other = [], []
    for item in sorted(Path(folder).iterdir()):
        name = item.name
        if name in _BOOKKEEPING:
            continue
        if is_temp_name(name) or _known(item, kind):
            mine.append(item)
        else:
            other.append(item)
    return mine, other


def _known(item: Path, kind: str) -> bool:
    name, is_dir = item.name, item.is_dir() and not item.is_symlink()
    if kind == "run":
        if is_dir:
            return name in RUN_FOLDERS or (name == layout.COMPARISON
                                            and folder_kind(item) == "comparison")
        return name in RUN_FILES
    if kind == "merged":
        return not is_dir and (name in MERGED_FILES or (
            name.startswith("model-") and name.endswith(".safetensors")))
    return False


def is_temp_name(name: str) -> bool:
    return name.startswith(TEMP_PREFIXES) or (name.startswith(".") and name.endswith(".tmp"))


def remove_known(folder: Path, kind: str) -> list[Path]:
    """Delete what loralab wrote in a `kind` folder; returns the entries left alone."""
    mine, other = known_contents(folder, kind)
    for item in mine:
        _remove(item)
    return other


def claim(folder: Path, kind: str) -> None:
    """Make `folder` loralab's `kind` (its marker) and remove the temporary files an interrupted
    write left there. Call it holding the folder's lock, right after deciding to write there."""
    mark(folder, kind)
    clean_stale_temp(folder)


def clean_stale_temp(folder: Path) -> list[Path]:
    """Remove temporary files of an interrupted write in `folder` and its checkpoints/.
    Call it only while holding the folder's lock (another writer's temp files are live)."""
    removed = []
    for where in (Path(folder), layout.RunDir(folder).checkpoints):
        if not where.is_dir():
            continue
        for item in where.iterdir():
            if is_temp_name(item.name):
                _remove(item)
                removed.append(item)
    return removed


def _remove(item: Path) -> None:
    if item.is_dir() and not item.is_symlink():
        shutil.rmtree(item)
    else:
        item.unlink(missing_ok=True)


# ---------------------------------------------------------------- one writer per folder

_HELD: dict[Path, int] = {}


def job_size() -> int:
    """How many processes the job has (WORLD_SIZE, set by torchrun, accelerate, loralab --nproc)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def process_rank() -> int:
    """This process's rank in a job of several, else 0: a RANK left in the environment without
    a WORLD_SIZE > 1 is not such a job."""
    return int(os.environ.get("RANK", "0") or 0) if job_size() > 1 else 0


@contextlib.contextmanager
def folder_lock(folder: Path) -> Iterator[None]:
    """Hold `folder` for this process: a second process gets UserError "... in use by PID N".

    An flock on FOLDER/.loralab.lock, which holds the PID and host. The kernel releases it when
    the holder dies (kill -9 included), so a dead run's lock is taken over without a check;
    the file is removed on release. Re-entrant within a process. Creates `folder` (and removes
    it again on release if it stayed empty). Under `accelerate launch` only rank 0 locks.
    """
    folder = Path(folder)
    if process_rank() != 0:
        yield
        return
    if folder.exists() and not folder.is_dir():
        raise UserError(f"output folder {folder} is a file, not a folder")
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    key = folder.resolve()
    if key in _HELD:
        _HELD[key] += 1
        try:
            yield
        finally:
            _HELD[key] -= 1
        return
    fd = _acquire(folder / LOCK, folder)
    _HELD[key] = 1
    try:
        yield
    finally:
        del _HELD[key]
        with contextlib.suppress(OSError):
            (folder / LOCK).unlink()  # while still holding it: see _acquire
        os.close(fd)
        if created:
            with contextlib.suppress(OSError):
                folder.rmdir()  # only if empty


@contextlib.contextmanager
def sibling_lock(target: Path) -> Iterator[None]:
    """Hold `target` for this process when the folder itself is replaced whole by a rename (a
    merged model): the lock file sits beside it, `.NAME.loralab.lock`. Same rules as
    folder_lock: a second process gets UserError "... in use by PID N"."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    lock = target.parent / f".{target.name}{LOCK}"
    fd = _acquire(lock, target)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            lock.unlink()  # while still holding it: see _acquire
        os.close(fd)


def _acquire(path: Path, folder: Path) -> int:
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 200).decode("utf-8", "replace").split()
            os.close(fd)
            pid = holder[0] if holder else "?"
            where = f" on {holder[1]}" if len(holder) > 1 and holder[1] != os.uname().nodename else ""
            raise UserError(
                f"{folder} is in use by PID {pid}{where} (another loralab process writes there): "
                "wait for it to end or choose another output folder"
            ) from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:  # else the holder removed the file between our open and our lock: again
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()} {os.uname().nodename}\n".encode())
    return fd


def lock_holder(folder: Path) -> int | None:
    """The PID written in FOLDER/.loralab.lock, if any (informational)."""
    try:
        return int((Path(folder) / LOCK).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _version() -> str:
    from loralab import __version__

    return __version__


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
