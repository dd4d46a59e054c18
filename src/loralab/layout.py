"""The on-disk contract between train, sweep, eval and report: every file name in loralab's
folders, and the one reader of each shared file.

- A run folder (`RunDir`): `config.yaml` (resolved config), `result.json` (status, steps, losses,
  ...), `metrics.jsonl` (one row per step), `data_summary.json`, the adapter in PEFT format
  (`adapter_config.json`, `adapter_model.safetensors`), `checkpoints/step-N/`, `eval/` (its
  evaluated target) and `comparison/` (a comparison folder).
- A sweep folder (`SweepDir`): `sweep.json` (definition hash, every trial's status, result and
  path), `sweep.md`, `sweep.csv`, `loss_curves.png`, one run folder per trial and `comparison/`.
- A comparison folder (`ComparisonDir`): `targets.json` listing the evaluated targets it compares
  (paths relative to it), `base/`, `references/<name>/`, and the report: `comparison.csv`,
  `comparison.md`, `*.png`, `report.html`.
- An evaluated target (run `eval/`, `base/`, a reference): `predictions.jsonl` + `metrics.json`;
  what they hold is `loralab.scoring.tasks`'s.
- A merged model: a transformers folder plus `merge_check.json` (`loralab.model.merge`).

No torch import (checked in CI): report, sweeps and `--dry-run` use this.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loralab.errors import UserError
from loralab.io import read_json, write_json

# A run folder
CONFIG = "config.yaml"
RESULT = "result.json"
STEP_METRICS = "metrics.jsonl"
DATA_SUMMARY = "data_summary.json"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_WEIGHTS_BIN = "adapter_model.bin"  # older PEFT
CHECKPOINTS = "checkpoints"
TRAINER_STATE = "trainer_state.pt"  # in checkpoints/step-N/: optimizer, schedule, RNG, progress
EVAL = "eval"
# A sweep folder
SWEEP_MANIFEST = "sweep.json"
SWEEP_MARKDOWN = "sweep.md"
SWEEP_CSV = "sweep.csv"
LOSS_CURVES = "loss_curves.png"
# A comparison folder (also the default `comparison/` inside a run or sweep folder)
COMPARISON = "comparison"
TARGETS_MANIFEST = "targets.json"
BASE = "base"
REFERENCES = "references"
COMPARISON_CSV = "comparison.csv"
COMPARISON_MARKDOWN = "comparison.md"
REPORT_HTML = "report.html"
CHECKPOINT_CURVE = "checkpoint_curve"  # `eval --checkpoints RUN` compares into RUN/checkpoint_curve
# An evaluated target
PREDICTIONS = "predictions.jsonl"
TARGET_METRICS = "metrics.json"
# A merged model (`loralab merge`): a transformers folder plus the check of the merge
MERGE_CHECK = "merge_check.json"


@dataclass(frozen=True)
class _Folder:
    """A folder of loralab's, by its path (a str is taken too)."""

    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))


@dataclass(frozen=True)
class RunDir(_Folder):
    """A training run's folder (also a checkpoint's: `checkpoints/step-N/` holds an adapter)."""

    @property
    def config(self) -> Path:
        return self.path / CONFIG

    @property
    def result(self) -> Path:
        return self.path / RESULT

    @property
    def step_metrics(self) -> Path:
        return self.path / STEP_METRICS

    @property
    def data_summary(self) -> Path:
        return self.path / DATA_SUMMARY

    @property
    def adapter_config(self) -> Path:
        return self.path / ADAPTER_CONFIG

    @property
    def adapter_weights(self) -> Path:
        return self.path / ADAPTER_WEIGHTS

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS

    def checkpoint(self, step: int) -> Path:
        """checkpoints/step-N (zero-padded: names sort as steps do)."""
        return self.path / CHECKPOINTS / checkpoint_name(step)

    @property
    def eval(self) -> Path:
        """The run's evaluated target: predictions.jsonl + metrics.json."""
        return self.path / EVAL

    @property
    def comparison(self) -> ComparisonDir:
        return ComparisonDir(self.path / COMPARISON)

    def has_config(self) -> bool:
        return self.config.is_file()

    def has_adapter(self) -> bool:
        return self.adapter_config.is_file()

    def read_result(self) -> dict[str, Any]:
        """result.json as a mapping; {} when the run wrote none yet or it is unreadable."""
        try:
            data = json.loads(self.result.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}


def checkpoint_name(step: int) -> str:
    return f"step-{step:07d}"


def checkpoint_step(name: str) -> int | None:
    """N of a `step-N` folder name; None for any other name (a temporary folder, a file)."""
    prefix, _, number = name.partition("-")
    return int(number) if prefix == "step" and number.isdigit() else None


@dataclass(frozen=True)
class SweepDir(_Folder):
    """A sweep's folder: sweep.json, its summaries and one run folder per trial."""

    @property
    def manifest(self) -> Path:
        return self.path / SWEEP_MANIFEST

    @property
    def markdown(self) -> Path:
        return self.path / SWEEP_MARKDOWN

    @property
    def csv(self) -> Path:
        return self.path / SWEEP_CSV

    @property
    def loss_curves(self) -> Path:
        return self.path / LOSS_CURVES

    @property
    def comparison(self) -> ComparisonDir:
        return ComparisonDir(self.path / COMPARISON)

    def has_manifest(self) -> bool:
        return self.manifest.is_file()

    def read_manifest(self) -> dict[str, Any] | None:
        """sweep.json, None when there is none; a damaged one is a one-line UserError."""
        path = self.manifest
        if not path.is_file():
            return None
        again = "loralab sweep --overwrite starts again"
        try:
            data = read_json(path)
        except ValueError as exc:
            raise UserError(f"{path} is not valid JSON ({exc}); {again}") from None
        if not isinstance(data, dict) or not isinstance(data.get("trials"), list):
            raise UserError(f"{path} is not a sweep manifest; {again}")
        return data

    def trial_dirs(self, only_done: bool = False) -> list[tuple[str, Path]]:
        """(name, run folder) of the trials, or of the finished ones: what eval and report read."""
        manifest = self.read_manifest()
        trials = manifest["trials"] if manifest else []
        if not all(isinstance(t, dict) and isinstance(t.get("path"), str) for t in trials):
            raise UserError(f'{self.manifest} must hold {{"trials": [{{"path": ...}}, ...]}}')
        chosen = [t for t in trials if not only_done or t.get("status") == "done"]
        return [(str(t.get("name") or Path(t["path"]).name), (self.path / t["path"]).resolve())
                for t in chosen]


@dataclass(frozen=True)
class ComparisonDir(_Folder):
    """Where targets are compared: targets.json, base/, references/ and the report."""

    @property
    def targets_manifest(self) -> Path:
        return self.path / TARGETS_MANIFEST

    @property
    def base(self) -> Path:
        return self.path / BASE

    def reference(self, name: str) -> Path:
        return self.path / REFERENCES / name

    @property
    def csv(self) -> Path:
        return self.path / COMPARISON_CSV

    @property
    def markdown(self) -> Path:
        return self.path / COMPARISON_MARKDOWN

    @property
    def report_html(self) -> Path:
        return self.path / REPORT_HTML

    def has_targets(self) -> bool:
        return self.targets_manifest.is_file()

    def write_targets(self, targets: list[Path]) -> Path:
        """Record the evaluated folders compared here, relative to this folder (it can move)."""
        entries = [_relative_or_absolute(Path(t), self.path) for t in targets]
        write_json(self.targets_manifest, {"targets": entries})
        return self.targets_manifest

    def read_targets(self) -> list[Path]:
        """The target folders listed in targets.json, resolved against this folder."""
        path = self.targets_manifest
        try:
            data = read_json(path)
        except FileNotFoundError:
            raise UserError(f"{path} not found") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise UserError(f"{path} is not valid JSON: {exc}") from None
        entries = data.get("targets") if isinstance(data, dict) else None
        if not isinstance(entries, list) or not all(isinstance(e, str) for e in entries):
            raise UserError(f'{path} must look like {{"targets": ["path", ...]}}')
        return [(self.path / e).resolve() for e in entries]


def _relative_or_absolute(target: Path, base: Path) -> str:
    try:
        return os.path.relpath(target.resolve(), base.resolve())
    except ValueError:  # another drive on Windows
        return str(target.resolve())
