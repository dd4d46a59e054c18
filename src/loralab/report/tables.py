"""The comparison table: one row per evaluated target, its intervals, lift and paired tests.

Conventions (also written under the markdown table):
- `<m>_lift`: the metric minus the best reference predictor's, signed so that > 0 means better
  (for lower-is-better metrics such as weighted_error: best reference − metric).
- `<m>_vs_base`: mean paired difference target − base over the same eval records, with a seeded
  paired-bootstrap interval, p-value, and `<m>_distinguishable` (p < 0.05).
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loralab.io import atomic_write_text
from loralab.scoring.stats import paired_bootstrap
from loralab.scoring.tasks import HYPERPARAM_KEYS, higher_is_better, record_values

KIND_ORDER = {"base": 0, "adapter": 1, "reference": 2}
GEN_KEYS = ("new_tokens", "seconds", "tokens_per_s")


@dataclass
class LoadedTarget:
    """One evaluated folder as read from disk."""

    name: str
    kind: str
    folder: Path
    metrics: dict[str, Any]
    rows: list[dict]


def _is_scalar_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def extra_metric_names(targets: list[LoadedTarget], headline: list[str]) -> list[str]:
    """Scalar metrics besides the headline ones (precision, recall, json_rate, ...)."""
    skip = set(headline) | {"n"}
    names = {k for t in targets for k, v in t.metrics.items() if _is_scalar_number(v)}
    return sorted(names - skip)


def csv_columns(headline: list[str], extras: list[str]) -> list[str]:
    cols = ["target", "kind", "n"]
    for m in headline:
        cols += [m, f"{m}_low", f"{m}_high", f"{m}_lift", f"{m}_vs_base", f"{m}_vs_base_low",
                 f"{m}_vs_base_high", f"{m}_vs_base_p", f"{m}_distinguishable"]
    return cols + extras + list(HYPERPARAM_KEYS) + ["step"] + list(GEN_KEYS) + ["folder"]


def best_reference(targets: list[LoadedTarget], metric: str) -> float | None:
    values = [t.metrics.get(metric) for t in targets if t.kind == "reference"]
    values = [v for v in values if _is_scalar_number(v)]
    if not values:
        return None
    return max(values) if higher_is_better(metric) else min(values)


def same_records(a: LoadedTarget, b: LoadedTarget) -> bool:
    """Paired tests need the same eval records in the same order."""
    if len(a.rows) != len(b.rows):
        return False
    return all(
        ra.get("reference") == rb.get("reference") and ra.get("input") == rb.get("input")
        for ra, rb in zip(a.rows, b.rows, strict=True)
    )


def comparison_rows(
    targets: list[LoadedTarget], task: str, headline: list[str], bootstrap: int = 1000,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """One dict per target (base, adapters, references), keyed by `csv_columns`."""
    base = next((t for t in targets if t.kind == "base"), None)
    extras = extra_metric_names(targets, headline)
    rows = []
    for target in targets:
        row: dict[str, Any] = {"target": target.name, "kind": target.kind,
                               "n": target.metrics.get("n"), "folder": str(target.folder)}
        for m in headline:
            row.update(_metric_cells(target, m, best_reference(targets, m)))
            row.update(_vs_base_cells(target, base, task, m, bootstrap, seed))
        for key in extras:
            row[key] = target.metrics.get(key)
        hyper = target.metrics.get("hyperparams") or {}
        gen = target.metrics.get("gen") or {}
        row.update({k: hyper.get(k) for k in HYPERPARAM_KEYS})
        row["step"] = target.metrics.get("step")  # set for checkpoints (eval --checkpoints)
        row.update({k: gen.get(k) for k in GEN_KEYS})
        rows.append(row)
    return rows


def _metric_cells(target: LoadedTarget, m: str, best_ref: float | None) -> dict[str, Any]:
    value = target.metrics.get(m)
    low, high = (target.metrics.get("ci") or {}).get(m) or (None, None)
    lift = None
    if _is_scalar_number(value) and best_ref is not None:
        lift = value - best_ref if higher_is_better(m) else best_ref - value
    return {m: value, f"{m}_low": low, f"{m}_high": high, f"{m}_lift": lift}


def _vs_base_cells(
    target: LoadedTarget, base: LoadedTarget | None, task: str, m: str, bootstrap: int, seed: int
) -> dict[str, Any]:
    keys = [f"{m}_vs_base", f"{m}_vs_base_low", f"{m}_vs_base_high", f"{m}_vs_base_p",
            f"{m}_distinguishable"]
    if base is None or target is base or not same_records(target, base):
        return dict.fromkeys(keys)
    test = paired_bootstrap(
        record_values(task, target.rows, m), record_values(task, base.rows, m),
        n=bootstrap, seed=seed,
    )
    return dict(zip(keys, (test["diff"], test["low"], test["high"], test["p_value"],
                           test["distinguishable"]), strict=True))


def write_csv(path: Path, rows: list[dict[str, Any]], columns: list[str]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _csv_value(row.get(k)) for k in columns})
    atomic_write_text(path, buffer.getvalue())


def _csv_value(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, (list, dict)):
        return json.dumps(value, ensure_ascii=False)
    return value


# ---------------------------------------------------------------- human-readable tables


def fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1e-2 and value != 0 else f"{value:.{digits}f}"
    return str(value)


def varying_hyperparams(rows: list[dict[str, Any]]) -> list[str]:
    """Hyperparameters that differ between adapters (all set ones when there is one adapter)."""
    adapters = [r for r in rows if r["kind"] == "adapter"]
    keys = []
    for key in HYPERPARAM_KEYS:
        values = {json.dumps(r.get(key)) for r in adapters}
        set_somewhere = any(r.get(key) is not None for r in adapters)
        if len(values) > 1 or (len(adapters) == 1 and set_somewhere):
            keys.append(key)
    return keys


def summary_table(
    rows: list[dict], headline: list[str], compact: bool = False
) -> tuple[list[str], list[list[str]]]:
    """Header and cells: each headline metric as `value [low, high]`, plus varying hyperparams.

    compact (terminals): the interval goes on a second line of the cell."""
    hyper = varying_hyperparams(rows)
    header = ["target", "kind", "n"] + headline + hyper
    body = []
    for r in rows:
        cells = [str(r["target"]), r["kind"], fmt(r["n"])]
        for m in headline:
            sep = "\n" if compact else " "
            ci = "" if r.get(f"{m}_low") is None else (
                f"{sep}[{fmt(r[f'{m}_low'])}, {fmt(r[f'{m}_high'])}]")
            cells.append(fmt(r.get(m)) + ci)
        cells += [fmt(r.get(k)) for k in hyper]
        body.append(cells)
    return header, body


def differences_table(
    rows: list[dict], headline: list[str], compact: bool = False
) -> tuple[list[str], list[list[str]]]:
    """Lift over the best reference and paired difference vs base (* = distinguishable).

    compact (terminals): p-values left out (they are in the csv and markdown)."""
    header = ["target"]
    for m in headline:
        header += [f"{m} lift", f"{m} vs base"]
    body = []
    for r in rows:
        if r["kind"] == "reference":
            continue
        cells = [str(r["target"])]
        for m in headline:
            cells.append(_signed(r.get(f"{m}_lift")))
            diff = r.get(f"{m}_vs_base")
            star = "*" if r.get(f"{m}_distinguishable") else ""
            p = "" if diff is None or compact else f" (p={r.get(f'{m}_vs_base_p'):.3f})"
            cells.append(_signed(diff) + star + p)
        body.append(cells)
    return header, body


def curve_table(rows: list[dict], headline: list[str]) -> tuple[list[str], list[list[str]]]:
    """Adapters that carry a training step (a run's checkpoints), by step: metric vs step."""
    points = sorted((r for r in rows if r["kind"] == "adapter" and r.get("step") is not None),
                    key=lambda r: r["step"])
    header = ["step", "target"] + headline
    body = []
    for r in points:
        cells = [str(r["step"]), str(r["target"])]
        for m in headline:
            ci = "" if r.get(f"{m}_low") is None else f" [{fmt(r[f'{m}_low'])}, {fmt(r[f'{m}_high'])}]"
            cells.append(fmt(r.get(m)) + ci)
        body.append(cells)
    return header, body


def _signed(value: Any) -> str:
    return "–" if value is None else f"{value:+.3f}"


def to_markdown(header: list[str], body: list[list[str]]) -> str:
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    return "\n".join([line(header), line(["---"] * len(header))] + [line(b) for b in body])


def comparison_markdown(rows: list[dict], headline: list[str], notes: list[str],
                        verdict: list[str] | None = None) -> str:
    parts = ["# Comparison", "", to_markdown(*summary_table(rows, headline)), "",
             "Values with 95% bootstrap intervals over eval records.", ""]
    if verdict:
        parts += ["## Best adapter", ""] + [f"- {line}" for line in verdict] + [""]
    header, body = curve_table(rows, headline)
    if body:
        parts += ["## By checkpoint step", "", to_markdown(header, body), ""]
    header, body = differences_table(rows, headline)
    if body:
        parts += ["## Differences", "", to_markdown(header, body), "",
                  "lift: vs the best reference predictor, > 0 is better (for weighted_error: "
                  "lower). vs base: paired bootstrap over the same records, target − base; "
                  "* = distinguishable (p < 0.05).", ""]
    if notes:
        parts += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(parts)
