"""Typed configuration: `Config`, one run's whole config (its sections, with the seed's defaults
and their validation, are config_sections.py's and importable here), loralab's key names for
other tools' keys, YAML + dotted overrides, paths relative to the file, and saving.

This module must not import torch: `loralab train --dry-run` and `loralab sweep --dry-run`
validate configs without paying for it.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from loralab.config_io import (  # noqa: F401 - re-exported: callers read config helpers here
    build_dataclass,
    field_type,
    get_dotted,
    is_relative_file_path,
    parse_override,
    parse_scalar,
    read_yaml_mapping,
    set_dotted,
    unknown_key_message,
)
from loralab.config_sections import (  # noqa: F401 - re-exported: callers import sections here
    SEED_SYSTEM_PROMPT,
    SEED_TAGS,
    SEED_TARGETS,
    DataConfig,
    EvalConfig,
    LoraConfig,
    ModelConfig,
    TrackingConfig,
    TrainConfig,
)
from loralab.errors import UserError

# Names LLaMA-Factory and HF TrainingArguments (and loralab's own short forms) give loralab's
# keys. An unknown key named so gets an error naming loralab's key: suggested, not accepted
# (docs/safety.md says why).
ALIASES = {
    "learning_rate": "train.lr", "num_train_epochs": "train.epochs",
    "per_device_train_batch_size": "train.batch_size", "train_batch_size": "train.batch_size",
    "gradient_accumulation_steps": "train.grad_accum", "lr_scheduler_type": "train.scheduler",
    "warmup_ratio": "train.warmup_ratio", "warmup_steps": "train.warmup_steps",
    "weight_decay": "train.weight_decay", "max_grad_norm": "train.max_grad_norm",
    "max_steps": "train.max_steps", "seed": "train.seed", "logging_steps": "train.log_every",
    "save_steps": "train.save_every", "eval_steps": "train.eval_every",
    "bf16": "train.precision", "fp16": "train.precision",
    "gradient_checkpointing": "train.gradient_checkpointing", "epochs": "train.epochs",
    "lr": "train.lr", "batch_size": "train.batch_size",
    "lora_rank": "lora.r", "lora_r": "lora.r", "lora_alpha": "lora.alpha",
    "lora_dropout": "lora.dropout",
    "lora_target": "lora.target_modules", "target_modules": "lora.target_modules",
    "use_rslora": "lora.rslora", "use_dora": "lora.dora",
    "cutoff_len": "data.max_length", "max_seq_length": "data.max_length",
    "max_length": "data.max_length", "model_max_length": "data.max_length",
    "max_samples": "data.limit", "dataset": "data.path", "train_file": "data.path",
    "eval_dataset": "data.eval_path", "model_name_or_path": "model.path",
    "trust_remote_code": "model.trust_remote_code", "output_dir": "output_dir",
    "report_to": "tracking.backend", "run_name": "tracking.experiment",
}
# Input paths written in a YAML file resolve against its folder; output_dir stays relative to
# the working directory (where people expect runs/ to appear).
PATH_KEYS = ("model.path", "data.path", "data.eval_path")


@dataclass
class Config:
    """One training run."""

    output_dir: str = "runs/run"  # run directory
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def validate(self) -> Config:
        if not self.output_dir:
            raise UserError("output_dir is empty")
        for section in (self.model, self.data, self.lora, self.train, self.tracking, self.eval):
            section.validate()
        if self.train.early_stopping_patience and not (self.train.eval_every and self.data.eval_path):
            raise UserError("train.early_stopping_patience needs a held-out loss: set "
                            "train.eval_every > 0 and data.eval_path")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------- loading and overrides


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML config, apply `a.b=value` overrides, validate. Errors are UserError."""
    raw: dict[str, Any] = {}
    base_dir = Path.cwd()
    if path is not None:
        raw = read_yaml_mapping(path)
        base_dir = Path(path).resolve().parent
    _resolve_paths(raw, base_dir)
    for item in overrides:
        key, value = parse_override(item)
        set_dotted(raw, key, _override_text(key, item, value))
    return config_from_dict(raw).validate()


def _override_text(key: str, item: str, value: Any) -> Any:
    """On the command line a string key takes the text as typed: tracking.experiment=2024 is
    the name "2024" (shell quotes would not survive to quote it for YAML)."""
    if isinstance(value, str) or value is None:
        return value
    ftype = _key_type(key)
    if isinstance(value, list) and list in {typing.get_origin(a) for a in typing.get_args(ftype)}:
        return value  # data.path=[a.json, {path: b.json, limit: 100}]: a mix of files
    if ftype is str or (typing.get_origin(ftype) in (typing.Union, types.UnionType)
                        and str in typing.get_args(ftype)):
        return item.partition("=")[2].strip()
    return value


def _key_type(key: str) -> Any:
    cls: Any = Config
    for part in key.split("."):
        if not dataclasses.is_dataclass(cls) or part not in {f.name for f in dataclasses.fields(cls)}:
            return None
        cls = field_type(cls, part)
    return cls


def _resolve_paths(raw: dict[str, Any], base_dir: Path) -> None:
    """Relative paths written in a YAML file mean 'next to that file', as in docker-compose."""
    mix = get_dotted(raw, "data.path")
    if isinstance(mix, list):  # each file of a mix, as data.path itself
        raw["data"]["path"] = [_resolved_part(part, base_dir) for part in mix]
    for key in PATH_KEYS:
        value = get_dotted(raw, key)
        if isinstance(value, str) and value and is_relative_file_path(value):
            candidate = base_dir / value
            # A bare hub id like Qwen/Qwen2.5-7B-Instruct stays as it is unless it exists here.
            if key == "model.path" and not candidate.exists():
                continue
            set_dotted(raw, key, str(candidate.resolve()) if candidate.exists() else str(candidate))


def _resolved_part(part: Any, base_dir: Path) -> Any:
    path = part.get("path") if isinstance(part, dict) else part
    if not isinstance(path, str) or not path or not is_relative_file_path(path):
        return part
    candidate = base_dir / path
    resolved = str(candidate.resolve()) if candidate.exists() else str(candidate)
    return {**part, "path": resolved} if isinstance(part, dict) else resolved


def config_from_dict(raw: dict[str, Any]) -> Config:
    """Build a Config; unknown keys are errors that suggest the nearest known key."""
    return build_dataclass(Config, raw, "", known_keys(), ALIASES)


def known_keys(cls: type = Config, prefix: str = "") -> list[str]:
    keys = []
    for f in dataclasses.fields(cls):
        name = prefix + f.name
        ftype = field_type(cls, f.name)
        if dataclasses.is_dataclass(ftype):
            keys.extend(known_keys(ftype, name + "."))
        else:
            keys.append(name)
    return keys


def check_key(key: str) -> None:
    """Raise UserError unless `key` (dotted) is a config key."""
    keys = known_keys()
    if key not in keys:
        raise UserError(unknown_key_message(key, keys, ALIASES))


def save_config(cfg: Config, path: str | Path) -> None:
    """The resolved config, in a form `load_config` reads back."""
    from loralab.io import atomic_write_text

    text = yaml.safe_dump(cfg.to_dict(), sort_keys=False, allow_unicode=True)
    atomic_write_text(Path(path), text)
