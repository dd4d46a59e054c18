"""Atomic file writes and run-directory bookkeeping shared by every command."""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import tempfile
from pathlib import Path
from typing import Any

_UMASK: int | None = None


def user_umask() -> int:
    """The process umask, read once (from /proc without changing it; else set and restored)."""
    global _UMASK
    if _UMASK is None:
        try:
            text = Path("/proc/self/status").read_text()
            _UMASK = int(re.search(r"^Umask:\s*([0-7]+)", text, re.M).group(1), 8)
        except (OSError, AttributeError, ValueError):
            _UMASK = os.umask(0o022)
            os.umask(_UMASK)
    return _UMASK


def use_umask(path: Path, is_dir: bool | None = None) -> None:
    """Give `path` the mode a plain open()/mkdir() would have: mkstemp makes files 0600 and
    mkdtemp folders 0700, which a teammate or a serving account cannot read."""
    path = Path(path)
    if is_dir is None:
        is_dir = path.is_dir()
    os.chmod(path, (0o777 if is_dir else 0o666) & ~user_umask())


def make_temp_dir(prefix: str, parent: Path) -> Path:
    """tempfile.mkdtemp in `parent`, with the user's umask instead of 0700."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    use_umask(tmp, is_dir=True)
    return tmp


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over `path`.

    A killed process leaves either the old file or the new one, never a torn one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~user_umask())
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def append_jsonl(path: Path, obj: Any) -> None:
    """Append one line; a line cut by a kill is skipped by `read_jsonl`."""
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(obj, ensure_ascii=False, default=str) + "\n")


def read_jsonl(path: Path) -> list[Any]:
    rows = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def git_commit() -> str | None:
    """The commit of the loralab checkout (None outside a git checkout)."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"],
        cwd=here, capture_output=True, text=True, timeout=5,
    ).stdout.strip()
    return out.stdout.strip() + ("-dirty" if dirty else "")


def versions() -> dict[str, str]:
    """Versions of what shapes the numbers: python, torch, transformers, peft, accelerate."""
    from importlib import metadata

    found = {"python": platform.python_version(), "loralab": _version("loralab")}
    for name in ("torch", "transformers", "peft", "accelerate", "swanlab"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def _version(name: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "unknown"
