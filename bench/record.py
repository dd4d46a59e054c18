"""The one writer of benchmark results: one folder per experiment, one file per run, one schema.

As PEFT's method_comparison keeps its results, every run of a benchmark writes

    <root>/<experiment>/<YYYY-MM-DD>_<HHMM>_<commit>_<hardware>.json

holding exactly these keys (`KEYS`; `summary` may be left out):

    experiment  the folder's name: which benchmark, e.g. "train_speed"
    command     how it was run: "python bench/train_speed.py --out ..."
    commit      loralab's git commit ("-dirty" when the tree had changes; "unknown" outside git)
    date        when the file was written, UTC, ISO 8601
    hardware    {"name", "count", "memory_gib", "driver", "slug"} of the GPUs (or the CPU)
    versions    python, loralab, torch, transformers, peft, ... as installed
    config      what the rows were measured with (model shapes, data, steps, ...)
    rows        one mapping per measured system or setting (the table in docs/benchmarks.md)
    summary     optional: findings over the whole run (an equivalence check, a ratio)

`<root>` is the script's --out folder on the GPU machine; the run's files are then copied into
bench/results/<experiment>/ (bench/results/README.md). A script writes through `write_run`,
after every row if it likes (the same file is rewritten: a timeout keeps what was measured):

    from record import write_run                         # bench/ is on sys.path in scripts
    path = write_run(out, "train_speed", config={...}, rows=rows, summary={...})

No torch import unless a GPU is asked about (`hardware()` imports it lazily), so reading and
checking result files (`read_run`) works anywhere.
"""

from __future__ import annotations

import datetime
import json
import os
import shlex
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

KEYS = ("experiment", "command", "commit", "date", "hardware", "versions", "config", "rows")
OPTIONAL_KEYS = ("summary",)
RESULTS = Path(__file__).resolve().parent / "results"


def write_run(root: Path | str, experiment: str, *, config: dict[str, Any],
              rows: list[dict[str, Any]], summary: dict[str, Any] | None = None,
              commit: str | None = None) -> Path:
    """Write (or rewrite) this process's result file for `experiment` under `root`; `commit`
    when the GPU machine's copy of the tree has no git history (the scripts' --commit)."""
    record = new_run(experiment, config, rows, summary, commit)
    path = Path(root) / experiment / file_name(record)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=1, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def new_run(experiment: str, config: dict[str, Any], rows: list[dict[str, Any]],
            summary: dict[str, Any] | None = None, commit: str | None = None) -> dict[str, Any]:
    """A result record with the schema's keys; the identity (commit, date, hardware) is read
    once per process, so rewrites of one run keep one file name."""
    record = {"experiment": experiment, "command": _command(), **_identity(commit),
              "config": config, "rows": rows}
    if summary is not None:
        record["summary"] = summary
    check(record)
    return record


def file_name(record: dict[str, Any]) -> str:
    """<YYYY-MM-DD>_<HHMM>_<commit>_<hardware>.json: sorted by date, says what ran where."""
    when = datetime.datetime.fromisoformat(record["date"])
    commit = str(record["commit"])[:7] + ("-dirty" if str(record["commit"]).endswith("-dirty")
                                          else "")
    return f"{when:%Y-%m-%d_%H%M}_{commit}_{record['hardware']['slug']}.json"


def check(record: Any) -> None:
    """Raise ValueError unless `record` has exactly the schema's keys, of the right kinds."""
    if not isinstance(record, dict):
        raise ValueError("a result is a JSON object")
    missing = [k for k in KEYS if k not in record]
    unknown = [k for k in record if k not in KEYS + OPTIONAL_KEYS]
    if missing or unknown:
        raise ValueError(f"result keys: missing {missing}, unknown {unknown}")
    if not isinstance(record["rows"], list) or not all(isinstance(r, dict) for r in record["rows"]):
        raise ValueError("rows must be a list of objects")
    for key in ("hardware", "versions", "config"):
        if not isinstance(record[key], dict):
            raise ValueError(f"{key} must be an object")


def read_run(path: Path | str) -> dict[str, Any]:
    """A result file, checked against the schema."""
    record = json.loads(Path(path).read_text(encoding="utf-8"))
    check(record)
    return record


def _command() -> str:
    return shlex.join([Path(sys.executable).name, *sys.argv])


@cache
def _identity(commit: str | None) -> dict[str, Any]:
    from loralab.io import git_commit, versions

    now = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
    found = versions()
    for extra in ("liger-kernel", "flash-attn"):
        try:
            from importlib import metadata

            found[extra] = metadata.version(extra)
        except Exception:  # not installed
            continue
    return {"commit": commit or git_commit() or "unknown", "date": now.isoformat(),
            "hardware": hardware(), "versions": found}


def hardware() -> dict[str, Any]:
    """The GPUs this process sees (name, count, memory, driver), or the CPU; `slug` names it
    in file names: h200, h200x2, cpu."""
    try:
        import torch

        count = torch.cuda.device_count()
    except ImportError:
        count = 0
    if not count:
        return {"name": f"cpu ({os.cpu_count()} cores)", "count": 0, "memory_gib": None,
                "driver": None, "slug": "cpu"}
    name = torch.cuda.get_device_name(0)
    memory = torch.cuda.get_device_properties(0).total_memory / 2**30
    short = name.split()[-1].lower()  # "NVIDIA H200" -> h200
    return {"name": name, "count": count, "memory_gib": round(memory, 1), "driver": _driver(),
            "slug": short if count == 1 else f"{short}x{count}"}


def _driver() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip().splitlines()[0] if out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None
