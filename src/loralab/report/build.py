"""Build a comparison report from evaluated folders on disk; never loads a model.

`loralab report DIR` accepts
- a comparison folder: it holds `targets.json` (see loralab.scoring.tasks) listing the targets;
- a sweep folder: `sweep.json` = {"trials": [{"path": trial run dir, ...}, ...]}; each trial's
  `eval/` folder is a target, plus `DIR/comparison/targets.json` (base, references) if present;
- a run folder: `RUN/eval/` is a target, plus `RUN/comparison/targets.json` if present.
The report goes to `--out`, else the comparison folder (`DIR/comparison` for runs and sweeps).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from loralab.errors import UserError
from loralab.io import atomic_write_text
from loralab.layout import (
    COMPARISON,
    EVAL,
    SWEEP_MANIFEST,
    TARGET_METRICS,
    TARGETS_MANIFEST,
    ComparisonDir,
    RunDir,
    SweepDir,
)
from loralab.report import best, html, plots, tables
from loralab.scoring.tasks import headline_metrics, read_target


def resolve_report_dir(path: Path, out: Path | None = None) -> tuple[Path, list[Path]]:
    """(comparison folder to write into, target folders to compare) for a DIR given by the user."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{path} is not a folder")
    if ComparisonDir(path).has_targets():
        return Path(out or path), ComparisonDir(path).read_targets()
    sweep, run = SweepDir(path), RunDir(path)
    if sweep.has_manifest():
        targets = [RunDir(t).eval for _, t in sweep.trial_dirs()]
        evaluated = [t for t in targets if (t / TARGET_METRICS).is_file()]
        if not evaluated:
            raise UserError(f"no trial of {path} has been evaluated: run loralab eval first")
    elif (run.eval / TARGET_METRICS).is_file():
        evaluated = [run.eval]
    else:
        raise UserError(
            f"{path} holds no {TARGETS_MANIFEST}, {SWEEP_MANIFEST} or {EVAL}/{TARGET_METRICS}:"
            " give a comparison, sweep or evaluated run folder"
        )
    comparison = run.comparison  # a sweep's comparison/ sits where a run's does
    if comparison.has_targets():
        evaluated += comparison.read_targets()
    return Path(out or comparison.path), _unique_paths(evaluated)


def _unique_paths(paths: list[Path]) -> list[Path]:
    seen, out = set(), []
    for p in paths:
        key = Path(p).resolve()
        if key not in seen:
            seen.add(key)
            out.append(Path(p))
    return out


def load_targets(folders: list[Path]) -> tuple[list[tables.LoadedTarget], str]:
    """Read every target (base first, then adapters, then references) and their shared task."""
    if not folders:
        raise UserError("no targets to compare")
    loaded, names = [], set()
    for folder in folders:
        metrics, rows = read_target(folder)
        name = _unique_name(str(metrics["target"]), names)
        loaded.append(tables.LoadedTarget(name, str(metrics["kind"]), Path(folder), metrics, rows))
    tasks = {t.metrics["task"] for t in loaded}
    if len(tasks) > 1:
        raise UserError(f"targets were scored with different tasks: {', '.join(sorted(tasks))}")
    loaded.sort(key=lambda t: tables.KIND_ORDER.get(t.kind, 9))  # stable: keeps given order
    return loaded, tasks.pop()


def _unique_name(name: str, taken: set[str]) -> str:
    unique, i = name, 2
    while unique in taken:
        unique, i = f"{name}#{i}", i + 1
    taken.add(unique)
    return unique


def report_notes(targets: list[tables.LoadedTarget]) -> list[str]:
    """Things a reader should know that the tables do not say."""
    notes = []
    base = next((t for t in targets if t.kind == "base"), None)
    if base is None:
        notes.append("no base model among the targets: no paired differences vs base")
    else:
        unpaired = [t.name for t in targets if t is not base and not tables.same_records(t, base)]
        if unpaired:
            notes.append(f"not on the same eval records as base (no paired test): {', '.join(unpaired)}")
    if not any(t.kind == "reference" for t in targets):
        notes.append("no reference predictors among the targets: no lift")
    for t in targets:
        rate = t.metrics.get("finished_rate")
        if isinstance(rate, (int, float)) and rate < 1:
            notes.append(f"{t.name}: {1 - rate:.0%} of generations hit max_new_tokens")
    return notes


def build_report(
    comparison_dir: Path, targets: list[Path], bootstrap: int = 1000, seed: int = 0
) -> dict[str, Any]:
    """Write comparison.csv, comparison.md, PNG plots and report.html into `comparison_dir`."""
    comparison_dir = Path(comparison_dir)
    files = ComparisonDir(comparison_dir)
    loaded, task = load_targets(targets)
    headline = headline_metrics(task)
    rows = tables.comparison_rows(loaded, task, headline, bootstrap=bootstrap, seed=seed)
    comparison_dir.mkdir(parents=True, exist_ok=True)
    columns = tables.csv_columns(headline, tables.extra_metric_names(loaded, headline))
    csv_path = files.csv
    tables.write_csv(csv_path, rows, columns)
    notes = report_notes(loaded)
    verdict = best.best_adapter(loaded, task, headline[0], bootstrap=bootstrap, seed=seed)
    best_lines = best.verdict_lines(verdict)
    markdown = tables.comparison_markdown(rows, headline, notes, best_lines)
    md_path = files.markdown
    atomic_write_text(md_path, markdown)
    pngs, labels = plots.write_plots(comparison_dir, loaded, rows, task, headline, seed=seed)
    header, body = tables.summary_table(rows, headline)
    html_path = html.write_html(
        files.report_html, f"loralab comparison: {_title(comparison_dir)}",
        (header, body, [r["kind"] for r in rows]), tables.differences_table(rows, headline),
        pngs, labels, notes, best_lines, tables.curve_table(rows, headline),
    )
    return {"comparison_dir": comparison_dir, "task": task, "headline": headline, "rows": rows,
            "notes": notes, "best": verdict, "best_lines": best_lines, "csv": csv_path,
            "markdown": md_path, "markdown_text": markdown, "plots": pngs, "html": html_path}


def _title(comparison_dir: Path) -> str:
    """`sweep1/comparison` says more than `comparison`."""
    resolved = comparison_dir.resolve()
    if resolved.name == COMPARISON and resolved.parent.name:
        return f"{resolved.parent.name}/{resolved.name}"
    return resolved.name


def report_from_dir(path: Path, out: Path | None = None) -> dict[str, Any]:
    """`loralab report DIR`: resolve DIR, then build the report."""
    comparison_dir, targets = resolve_report_dir(Path(path), Path(out) if out else None)
    return build_report(comparison_dir, targets)
