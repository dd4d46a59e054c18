"""The end of a sweep: a table (terminal, sweep.md, sweep.csv) and loss_curves.png."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import IO, Any

from loralab.io import atomic_write_bytes, atomic_write_text, read_json, read_jsonl
from loralab.layout import TARGET_METRICS, RunDir, SweepDir

# Columns taken from TRIAL/eval/metrics.json (written by `loralab eval`) when it exists.
EVAL_METRICS = ("weighted_accuracy", "f1", "weighted_error", "valid_rate")
RESULT_COLUMNS = ("final_loss", "steps", "tokens_per_s", "wall_seconds")
# Short headers for the terminal and sweep.md (sweep.csv keeps the full names).
HEADERS = {"final_loss": "loss", "tokens_per_s": "tok/s", "wall_seconds": "wall s"}


def collect_rows(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per trial: name, the swept values, status, result numbers, eval metrics if any."""
    varying = manifest.get("varying", [])
    rows = []
    for entry in manifest["trials"]:
        row: dict[str, Any] = {"trial": entry["name"], "status": entry["status"]}
        row.update({key: entry["overrides"].get(key) for key in varying})
        result = entry.get("result") or {}
        row.update({key: result.get(key) for key in RESULT_COLUMNS})
        row.update(read_eval_metrics(Path(entry["path"])))
        row["error"] = entry.get("error") or ""
        rows.append(row)
    return rows


def read_eval_metrics(run_dir: Path) -> dict[str, Any]:
    path = RunDir(run_dir).eval / TARGET_METRICS
    if not path.is_file():
        return {}
    try:
        data = read_json(path)
    except (OSError, ValueError):
        return {}
    return {f"eval.{k}": data[k] for k in EVAL_METRICS if isinstance(data.get(k), (int, float))}


def columns(rows: list[dict[str, Any]]) -> list[str]:
    """Union of row keys, first-seen order, with error last; empty eval columns dropped."""
    cols = list(dict.fromkeys(k for row in rows for k in row if k != "error"))
    if any(row.get("error") for row in rows):
        cols.append("error")
    return cols


def format_cell(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        if abs(value) >= 100:
            return f"{value:,.0f}"
        return f"{value:.{digits}g}"
    return str(value)


MAX_DIGITS = 10


def column_digits(values: list[Any]) -> int:
    """Significant digits (4 at least) at which a column's different numbers also read
    differently: four trials' losses 11.5412, 11.5398, ... must not all print as 11.54."""
    numbers = {v for v in values if isinstance(v, float) and abs(v) < 100}
    for digits in range(4, MAX_DIGITS + 1):
        if len({format_cell(v, digits) for v in numbers}) == len(numbers):
            return digits
    return MAX_DIGITS


def formatted_rows(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """(columns, cells as text), each numeric column with its distinguishing digits."""
    cols = columns(rows)
    digits = {c: column_digits([row.get(c) for row in rows]) for c in cols}
    return cols, [[format_cell(row.get(c), digits[c]) for c in cols] for row in rows]


def to_markdown(rows: list[dict[str, Any]], title: str) -> str:
    cols, cells = formatted_rows(rows)
    heads = [HEADERS.get(c, c) for c in cols]
    lines = [f"# Sweep {title}", "", "| " + " | ".join(heads) + " |", "|" + "---|" * len(cols)]
    for row in cells:
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in row) + " |")
    return "\n".join(lines) + "\n"


def to_csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns(rows), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if v is None else v for k, v in row.items()})
    return buf.getvalue()


def print_table(rows: list[dict[str, Any]], title: str, stream: IO[str] | None = None) -> None:
    """The sweep table, cells never split (loralab.textout); colours by status on a terminal."""
    from loralab import textout

    cols, cells = formatted_rows(rows)
    styles = {"done": "green", "failed": "red", "interrupted": "yellow"}
    textout.print_table(
        f"sweep {title}", [HEADERS.get(c, c) for c in cols], cells, stream=stream,
        right={i for i, c in enumerate(cols) if c not in ("trial", "status", "error")},
        row_styles=[styles.get(row["status"]) for row in rows],
        foldable={cols.index("error")} if "error" in cols else set(),
    )


def plot_loss_curves(manifest: dict[str, Any], out: Path) -> Path | None:
    """Every trial's metrics.jsonl loss against step on one figure; None when nothing to plot."""
    curves = []
    for entry in manifest["trials"]:
        path = RunDir(entry["path"]).step_metrics
        rows = read_jsonl(path) if path.is_file() else []
        points = [(r["step"], r["loss"]) for r in rows if "step" in r and "loss" in r]
        if points:
            curves.append((entry["name"], points))
    if not curves:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(9, 5.5))
    for name, points in curves:
        steps, losses = zip(*points, strict=True)
        ax.plot(steps, losses, marker="." if len(points) < 30 else None, label=name)
    ax.set(xlabel="optimizer step", ylabel="training loss", title=f"sweep {manifest['name']}")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", ncol=2 if len(curves) > 8 else 1)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(out, buf.getvalue())
    return out


def write_summary(manifest: dict[str, Any], sweep_dir: Path, show: bool = True) -> list[Path]:
    """sweep.md, sweep.csv and loss_curves.png in the sweep directory; the table on screen."""
    rows = collect_rows(manifest)
    files = SweepDir(sweep_dir)
    atomic_write_text(files.markdown, to_markdown(rows, manifest["name"]))
    atomic_write_text(files.csv, to_csv(rows))
    written = [files.markdown, files.csv]
    plot = plot_loss_curves(manifest, files.loss_curves)
    if plot:
        written.append(plot)
    if show:
        print_table(rows, manifest["name"])
    return written
