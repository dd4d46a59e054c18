"""sweep.json: the sweep's definition hash and every trial's status, result and path
(`loralab.layout.SweepDir` names and reads it).

The parent process owns it and rewrites it atomically after every change, so a killed sweep
leaves a consistent file that `--resume` trusts.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from loralab import rundir
from loralab.errors import UserError
from loralab.io import write_json
from loralab.layout import SWEEP_MANIFEST, SweepDir
from loralab.sweep.spec import SweepSpec

STATUSES = ("pending", "running", "done", "failed", "interrupted")
RESULT_KEYS = ("final_loss", "steps", "tokens_per_s", "wall_seconds", "train_seconds")


def save_manifest(sweep_dir: Path, manifest: dict[str, Any]) -> None:
    """Write sweep.json (and loralab's marker, which makes the folder a sweep it may clear)."""
    manifest["updated"] = _now()
    if rundir.read_marker(Path(sweep_dir)) is None:
        rundir.mark(Path(sweep_dir), "sweep")
    write_json(SweepDir(sweep_dir).manifest, manifest)


def new_manifest(spec: SweepSpec) -> dict[str, Any]:
    return {
        "name": spec.name,
        "hash": spec.definition_hash,
        "sweep_file": str(spec.path.resolve()),
        "base": str(spec.base),
        "overrides": spec.overrides,
        "varying": spec.varying,
        "created": _now(),
        "trials": [
            {
                "name": t.name,
                "overrides": t.overrides,
                "path": str(Path(t.config.output_dir).resolve()),
                "status": "pending",
                "error": None,
                "result": None,
            }
            for t in spec.trials
        ],
    }


def start_manifest(spec: SweepSpec, resume: bool, overwrite: bool) -> dict[str, Any]:
    """The manifest this run starts from; refuses to mix two sweeps or overwrite silently."""
    if resume and overwrite:
        raise UserError("--resume and --overwrite contradict each other: choose one")
    if not overwrite and rundir.folder_kind(spec.output_dir) is None:
        _refuse_foreign_runs(spec)
    rundir.check_output_dir(spec.output_dir, "sweep", overwrite)
    old = SweepDir(spec.output_dir).read_manifest()
    fresh = new_manifest(spec)
    if old is None or overwrite:
        if not overwrite:
            _refuse_foreign_runs(spec)
        return fresh
    if old.get("hash") != fresh["hash"]:
        raise UserError(
            f"{spec.output_dir} holds a different sweep ({old.get('name')}, definition "
            f"{old.get('hash')} vs {fresh['hash']}); use --overwrite to replace it or "
            "output_dir=... for a new one"
        )
    if not resume:
        raise UserError(
            f"{spec.output_dir} already holds this sweep; use --resume to finish it or "
            "--overwrite to run it again"
        )
    return _carry_done(old, fresh)


def _refuse_foreign_runs(spec: SweepSpec) -> None:
    taken = [t.name for t in spec.trials if not rundir.is_empty(Path(t.config.output_dir))]
    if taken:
        raise UserError(
            f"{spec.output_dir} has run directories but no {SWEEP_MANIFEST} ({', '.join(taken[:3])}); "
            "use --overwrite to replace them or output_dir=... for a new sweep"
        )


def _carry_done(old: dict[str, Any], fresh: dict[str, Any]) -> dict[str, Any]:
    """Keep finished trials; everything else (failed, interrupted, running when killed) reruns."""
    done = {t["name"]: t for t in old["trials"] if t.get("status") == "done"}
    fresh["trials"] = [done.get(t["name"], t) for t in fresh["trials"]]
    fresh["created"] = old.get("created", fresh["created"])
    return fresh


def trial_entry(manifest: dict[str, Any], name: str) -> dict[str, Any]:
    for entry in manifest["trials"]:
        if entry["name"] == name:
            return entry
    raise KeyError(name)


def mark(manifest: dict[str, Any], name: str, status: str, **fields: Any) -> None:
    """Set a trial's status (and error/result/...); times are stamped here."""
    assert status in STATUSES, status
    entry = trial_entry(manifest, name)
    entry["status"] = status
    stamp = "started" if status == "running" else "finished"
    entry[stamp] = _now()
    if status == "running":
        entry["error"] = None
    entry.update(fields)


def result_summary(result: dict[str, Any]) -> dict[str, Any]:
    return {k: result.get(k) for k in RESULT_KEYS}


def counts(manifest: dict[str, Any]) -> dict[str, int]:
    out = {s: 0 for s in STATUSES}
    for entry in manifest["trials"]:
        out[entry["status"]] = out.get(entry["status"], 0) + 1
    return {k: v for k, v in out.items() if v}


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
