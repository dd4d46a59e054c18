"""A sweep file → validated trials. Every error is found before any training starts."""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loralab.config import (
    PATH_KEYS,
    Config,
    check_key,
    is_relative_file_path,
    load_config,
    parse_override,
    parse_scalar,
    read_yaml_mapping,
)
from loralab.errors import UserError
from loralab.sweep.naming import trial_name

TOP_KEYS = ("name", "base", "output_dir", "overrides", "grid", "trials", "sweep")
SWEEP_KEYS = ("parallel", "mode")
MODES = ("auto", "packed", "sequential")
# Keys a sweep sets itself: a trial's run directory and its place in the tracker.
OWNED_KEYS = ("output_dir",)


@dataclass
class Trial:
    """One run of the sweep: its name, what it changes, and its full validated config."""

    name: str
    overrides: dict[str, Any]  # the trial's own keys (grid point and/or trials entry)
    config: Config


@dataclass
class SweepSpec:
    """Everything `loralab sweep` needs, checked."""

    name: str
    path: Path  # the sweep file
    base: Path  # the train config every trial starts from
    output_dir: Path
    overrides: dict[str, Any]  # applied to every trial (sweep file, then command line)
    varying: list[str]  # keys named in grid/trials, in order: they make the names
    parallel: str | int
    mode: str = "auto"  # auto | packed | sequential (sweep/mode.py)
    trials: list[Trial] = field(default_factory=list)

    @property
    def definition_hash(self) -> str:
        """Same trials with the same configs → same hash (tracking and output_dir excluded)."""
        return definition_hash(self.trials)


def load_sweep(path: str | Path, cli_overrides: list[str] | tuple[str, ...] = ()) -> SweepSpec:
    """Read and validate a sweep file; all problems are reported together in one UserError."""
    path = Path(path)
    raw = read_yaml_mapping(path)
    errors: list[str] = []
    unknown = [str(k) for k in raw if k not in TOP_KEYS]
    if unknown:
        errors.append(f"unknown sweep key {', '.join(unknown)} (known: {', '.join(TOP_KEYS)})")
    here = path.resolve().parent
    overrides = _typed(_mapping(raw, "overrides", errors))
    _resolve_paths(overrides, here)
    settings = dict(_mapping(raw, "sweep", errors))
    output_dir = raw.get("output_dir") or f"runs/sweeps/{raw.get('name') or path.stem}"
    for item in cli_overrides:
        key, value = parse_override(item)
        if key == "output_dir":
            output_dir = value
        elif key.startswith("sweep."):
            settings[key.split(".", 1)[1]] = value
        else:
            overrides[key] = value
    points = expand_points(raw, errors)
    for point in points:
        _resolve_paths(point, here)
    spec = SweepSpec(
        name=str(raw.get("name") or path.stem),
        path=path,
        base=_base_path(raw, here, errors),
        output_dir=Path(str(output_dir)),
        overrides=overrides,
        varying=_ordered_keys(points),
        parallel=_parallel(settings, errors),
        mode=_mode(settings, errors),
    )
    _check_keys(spec.overrides, points, errors)
    if not errors:
        spec.trials = _build_trials(spec, points, errors)
    if not errors and spec.mode == "packed" and len(spec.trials) > 1:
        from loralab.sweep.mode import unpackable

        errors += [f"sweep.mode=packed: {why} (use sweep.mode=auto or sequential)"
                   for why in unpackable(spec.trials)]
    if errors:
        raise UserError(f"{path}: " + "; ".join(errors))
    return spec


def _mapping(raw: dict[str, Any], key: str, errors: list[str]) -> dict[str, Any]:
    value = raw.get(key) or {}
    if not isinstance(value, dict):
        errors.append(f"{key} must be a mapping of dotted keys, got {value!r}")
        return {}
    return dict(value)


def _base_path(raw: dict[str, Any], here: Path, errors: list[str]) -> Path:
    base = raw.get("base")
    if not base:
        errors.append("base is missing: give the train config every trial starts from")
        return here
    p = Path(str(base)).expanduser()
    p = p if p.is_absolute() else here / p
    if not p.is_file():
        errors.append(f"base config not found: {p}")
    return p.resolve() if p.exists() else p


def _parallel(settings: dict[str, Any], errors: list[str]) -> str | int:
    for key in settings:
        if key not in SWEEP_KEYS:
            errors.append(f"unknown key sweep.{key} (known: {', '.join('sweep.' + k for k in SWEEP_KEYS)})")
    value = settings.get("parallel", "auto")
    ok = value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value > 0)
    if not ok:
        errors.append(f"sweep.parallel must be auto or a number > 0, got {value!r}")
        return 1
    return value


def _mode(settings: dict[str, Any], errors: list[str]) -> str:
    value = settings.get("mode", "auto")
    if value not in MODES:
        errors.append(f"sweep.mode must be one of {', '.join(MODES)}, got {value!r}")
        return "auto"
    return str(value)


def expand_points(raw: dict[str, Any], errors: list[str]) -> list[dict[str, Any]]:
    """grid (Cartesian product) × trials (a list of maps); either alone is fine, not neither."""
    if "grid" not in raw and "trials" not in raw:
        errors.append("no trials: give grid (key → list of values) and/or trials (list of maps)")
        return []
    grid = _grid_points(raw.get("grid"), errors) if "grid" in raw else [{}]
    listed = _listed_points(raw.get("trials"), errors) if "trials" in raw else [{}]
    return [_typed({**g, **t}) for g, t in itertools.product(grid, listed)]


def _typed(point: dict[str, Any]) -> dict[str, Any]:
    # YAML 1.1 reads 1e-4 as a string; people mean the number (as on the command line).
    return {str(k): parse_scalar(v) if isinstance(v, str) else v for k, v in point.items()}


def _grid_points(grid: Any, errors: list[str]) -> list[dict[str, Any]]:
    if not isinstance(grid, dict) or not grid:
        errors.append("grid is empty: give dotted keys with lists of values, e.g. lora.r: [4, 8]")
        return []
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            errors.append(f"grid.{key} must be a non-empty list of values, got {values!r}")
            return []
    keys = list(grid)
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*grid.values())]


def _listed_points(trials: Any, errors: list[str]) -> list[dict[str, Any]]:
    if not isinstance(trials, list) or not trials:
        errors.append("trials is empty: give a list of maps of dotted keys, e.g. [{lora.r: 4}]")
        return []
    bad = [i + 1 for i, t in enumerate(trials) if not isinstance(t, dict)]
    if bad:
        errors.append(f"trials entries {bad} are not maps of dotted keys")
        return []
    return [dict(t) for t in trials]


def _ordered_keys(points: list[dict[str, Any]]) -> list[str]:
    return list(dict.fromkeys(k for p in points for k in p))


def _resolve_paths(point: dict[str, Any], here: Path) -> None:
    """Input paths in a sweep file mean 'next to the sweep file', like in a train config."""
    for key in PATH_KEYS:
        value = point.get(key)
        if isinstance(value, str) and value and is_relative_file_path(value):
            candidate = here / value
            if key == "model.path" and not candidate.exists():
                continue  # a hub id
            point[key] = str(candidate.resolve())


def _check_keys(overrides: dict[str, Any], points: list[dict[str, Any]], errors: list[str]) -> None:
    where = {**{k: "overrides" for k in overrides}, **{k: "grid/trials" for p in points for k in p}}
    for key, origin in where.items():
        if key in OWNED_KEYS or key.startswith("sweep."):
            errors.append(f"{origin} cannot set {key}: the sweep sets it")
            continue
        try:
            check_key(str(key))
        except UserError as exc:
            errors.append(f"{origin}: {exc}")


def _build_trials(spec: SweepSpec, points: list[dict[str, Any]], errors: list[str]) -> list[Trial]:
    trials, by_message = [], {}
    for point in points:
        name = trial_name(point, spec.varying)
        try:
            trials.append(Trial(name, point, load_config(spec.base, trial_overrides(spec, point, name))))
        except UserError as exc:
            by_message.setdefault(str(exc), []).append(name)
    for message, names in by_message.items():
        shown = ", ".join(names[:4]) + (f" (+{len(names) - 4} more)" if len(names) > 4 else "")
        errors.append(f"trial {shown}: {message}")
    names = [t.name for t in trials]
    twins = sorted({n for n in names if names.count(n) > 1})
    if twins:
        errors.append(f"trials share a name (the same overrides twice?): {', '.join(twins)}")
    return trials


def trial_overrides(spec: SweepSpec, point: dict[str, Any], name: str) -> list[str]:
    """`key=value` strings for load_config: tracking defaults, overrides, the trial's keys."""
    values: dict[str, Any] = {"tracking.group": spec.name, "tracking.experiment": name}
    values.update(spec.overrides)
    values.update(point)
    values["output_dir"] = str(spec.output_dir / name)
    # JSON is YAML: the value parse_override reads back is the value the sweep file held.
    return [f"{k}={_as_yaml(v)}" for k, v in values.items()]


def _as_yaml(value: Any) -> str:
    if isinstance(value, float) and not math.isfinite(value):
        return ".nan" if math.isnan(value) else (".inf" if value > 0 else "-.inf")
    return json.dumps(value, ensure_ascii=False)


def definition_hash(trials: list[Trial]) -> str:
    items = []
    for trial in trials:
        cfg = trial.config.to_dict()
        cfg.pop("output_dir", None)
        cfg.pop("tracking", None)
        items.append([trial.name, cfg])
    text = json.dumps(items, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def base_key(cfg: Config) -> str:
    """Trials with the same key can share one loaded base model."""
    return json.dumps({"model": cfg.to_dict()["model"], "precision": cfg.train.precision}, sort_keys=True)
