"""Readable, stable trial names built from the keys a sweep varies (e.g. r8_lr1e-4_limit50_ep4)."""

from __future__ import annotations

import math
import re
from typing import Any

# Short labels for the keys people sweep most; any other key uses its last dotted part.
LABELS = {
    "lora.r": "r",
    "lora.alpha": "alpha",
    "lora.dropout": "drop",
    "train.lr": "lr",
    "train.epochs": "ep",
    "train.max_steps": "steps",
    "train.batch_size": "bs",
    "train.grad_accum": "ga",
    "train.seed": "seed",
    "data.limit": "limit",
    "data.sample": "sample",
    "data.max_length": "len",
}
_UNSAFE = re.compile(r"[^A-Za-z0-9.+-]+")


def key_label(key: str, keys: list[str]) -> str:
    """The label of `key`; the full dotted key (dots as dashes) when its last part is ambiguous."""
    if key in LABELS:
        return LABELS[key]
    last = key.rsplit(".", 1)[-1]
    clashes = [k for k in keys if k != key and k.rsplit(".", 1)[-1] == last]
    return key.replace(".", "-") if clashes else last


def format_value(value: Any) -> str:
    """1e-4 → '1e-4', 4.0 → '4', None → 'all' (no limit), lists joined with '+'."""
    if value is None:
        return "all"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return _format_float(value)
    if isinstance(value, list):
        return "+".join(format_value(v) for v in value)
    return _UNSAFE.sub("-", str(value)).strip("-") or "x"


def _format_float(value: float) -> str:
    if not math.isfinite(value):  # the config check refuses it; the name must not crash first
        return str(value)
    if value == int(value) and abs(value) < 1e4:
        return str(int(value))
    if 1e-2 <= abs(value) < 1e4:
        return f"{value:g}"
    mantissa, exponent = f"{value:.6e}".split("e")
    mantissa = mantissa.rstrip("0").rstrip(".")
    return f"{mantissa}e{int(exponent)}"


def trial_name(overrides: dict[str, Any], keys: list[str]) -> str:
    """`label+value` for every key in `keys` (in that order) that this trial sets."""
    parts = []
    for key in keys:
        if key not in overrides:
            continue
        label, value = key_label(key, keys), format_value(overrides[key])
        sep = "-" if value[:1].isalpha() and label[-1:].isalpha() and value != "all" else ""
        parts.append(f"{label}{sep}{value}")
    return "_".join(parts) or "base"
