"""PNG plots of a comparison, drawn with matplotlib's Agg canvas (no display, no pyplot state).

- metrics.png: each headline metric per target with its interval; reference predictors dashed.
- hyperparams.png: the headline metrics against each hyperparameter that varies across adapters.
- scatter_<target>.png (tag_scores): predicted vs reference score per tag and record.
- per_tag_mae.png (tag_scores): per-tag mean absolute error, targets × tags, references included.
- checkpoints.png: the headline metrics against the training step (`loralab eval --checkpoints`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from loralab.report.tables import LoadedTarget, varying_hyperparams
from loralab.scoring.tag_scores import is_number, parse_tag_json
from loralab.scoring.tasks import higher_is_better

# Fonts that carry CJK glyphs, tried in order; without one, tags are drawn as T1, T2, ...
CJK_FONTS = ("Noto Sans CJK SC", "Noto Sans SC", "Source Han Sans SC", "WenQuanYi Micro Hei",
             "WenQuanYi Zen Hei", "SimHei", "Microsoft YaHei", "PingFang SC", "Heiti SC",
             "Arial Unicode MS")
LOG_AXIS_BASES = {"train.lr": 10, "lora.r": 2}  # lr spans decades; ranks double
COLORS = {"base": "#7f7f7f", "adapter": "#1f77b4"}


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=110, layout="constrained")


def cjk_font() -> str | None:
    from matplotlib import font_manager

    installed = {f.name for f in font_manager.fontManager.ttflist}
    return next((name for name in CJK_FONTS if name in installed), None)


def tag_labels(tags: list[str]) -> dict[str, str]:
    """How each tag is written on plots: itself when drawable, else T1, T2, ..."""
    if all(t.isascii() for t in tags) or cjk_font():
        return {t: t for t in tags}
    return {t: f"T{i}" for i, t in enumerate(tags, 1)}


def coded_tags_note(tags: list[str]) -> str:
    """What T1, T2, ... stand for, in words a font without CJK glyphs can draw."""
    return (f"T1-T{len(tags)}: the eval.tags in config order (T1 = the first). Their names need a "
            "CJK font (apt-get install fonts-wqy-microhei, then loralab report again); "
            "report.html lists them.")


def _font_context():
    import matplotlib

    font = cjk_font()
    rc = {"font.family": ["sans-serif"], "font.sans-serif": [font, "DejaVu Sans"]} if font else {}
    return matplotlib.rc_context(rc)


def safe_filename(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "target"


def plot_metrics(path: Path, rows: list[dict], headline: list[str]) -> Path:
    """(a) Headline metrics per model target with CI bars; references as dashed lines."""
    models = [r for r in rows if r["kind"] != "reference"]
    refs = [r for r in rows if r["kind"] == "reference"]
    ncols = 2 if len(headline) > 1 else 1
    nrows = -(-len(headline) // ncols)
    width = max(4.5, 0.5 * len(models) + 2.5)
    fig = _figure(width * ncols, 3.4 * nrows)
    axes = np.atleast_1d(fig.subplots(nrows, ncols)).ravel()
    for ax, metric in zip(axes, headline, strict=False):
        _metric_panel(ax, metric, models, refs)
    for ax in axes[len(headline):]:
        ax.set_visible(False)
    fig.savefig(path)
    return path


def _metric_panel(ax: Any, metric: str, models: list[dict], refs: list[dict]) -> None:
    x = np.arange(len(models))
    for i, r in enumerate(models):
        value = r.get(metric)
        if value is None:
            continue
        err = None
        if r.get(f"{metric}_low") is not None:
            err = [[value - r[f"{metric}_low"]], [r[f"{metric}_high"] - value]]
        ax.errorbar([i], [value], yerr=err, fmt="o", capsize=4, color=COLORS.get(r["kind"]))
    for j, ref in enumerate(refs):
        if ref.get(metric) is None:
            continue
        color = f"C{(j + 2) % 10}"
        ax.axhline(ref[metric], linestyle="--", linewidth=1, color=color,
                   label=f"{ref['target']} (ref)")
    ax.set_xticks(x, [str(r["target"]) for r in models], rotation=30, ha="right", fontsize=8)
    ax.set_xlim(-0.6, max(len(models) - 0.4, 0.6))
    better = "higher" if higher_is_better(metric) else "lower"
    ax.set_title(f"{metric} ({better} is better)", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    if refs:
        ax.legend(fontsize=7, loc="best")


def plot_hyperparams(path: Path, rows: list[dict], headline: list[str]) -> Path | None:
    """(b) Each headline metric against each hyperparameter that varies across adapters."""
    adapters = [r for r in rows if r["kind"] == "adapter"]
    keys = varying_hyperparams(rows) if len(adapters) > 1 else []
    if not keys:
        return None
    base = next((r for r in rows if r["kind"] == "base"), None)
    refs = [r for r in rows if r["kind"] == "reference"]
    fig = _figure(3.6 * len(keys), 2.8 * len(headline))
    axes = np.array(fig.subplots(len(headline), len(keys), squeeze=False))
    for i, metric in enumerate(headline):
        best = _best_reference(refs, metric)
        for j, key in enumerate(keys):
            _hyper_panel(axes[i, j], adapters, base, best, key, metric)
            axes[i, j].set_xlabel(key if i == len(headline) - 1 else "")
            axes[i, j].set_ylabel(metric if j == 0 else "")
    fig.savefig(path)
    return path


def _best_reference(refs: list[dict], metric: str) -> dict | None:
    scored = [r for r in refs if r.get(metric) is not None]
    if not scored:
        return None
    pick = max if higher_is_better(metric) else min
    return pick(scored, key=lambda r: r[metric])


def _hyper_panel(ax: Any, adapters: list[dict], base: dict | None, best_ref: dict | None,
                 key: str, metric: str) -> None:
    points = [(r.get(key), r) for r in adapters if r.get(metric) is not None]
    numeric = all(is_number(v) for v, _ in points)
    if numeric:
        xs = [float(v) for v, _ in points]
        if key in LOG_AXIS_BASES and all(x > 0 for x in xs):
            ax.set_xscale("log", base=LOG_AXIS_BASES[key])
            values = sorted(set(xs))
            ax.set_xticks(values, [f"{v:g}" for v in values])  # 8, 16 rather than 2^3, 2^4
            ax.minorticks_off()
    else:  # e.g. data.limit with null (= all records): one category per value
        labels = sorted({_category(v) for v, _ in points}, key=_category_order)
        xs = [labels.index(_category(v)) for v, _ in points]
        ax.set_xticks(range(len(labels)), labels)
    for x, (_, r) in zip(xs, points, strict=True):
        err = None
        if r.get(f"{metric}_low") is not None:
            err = [[r[metric] - r[f"{metric}_low"]], [r[f"{metric}_high"] - r[metric]]]
        ax.errorbar([x], [r[metric]], yerr=err, fmt="o", capsize=3, color=COLORS["adapter"])
    if base is not None and base.get(metric) is not None:
        ax.axhline(base[metric], linestyle=":", color=COLORS["base"], label="base")
    if best_ref is not None:
        ax.axhline(best_ref[metric], linestyle="--", linewidth=1, color="C3",
                   label=f"{best_ref['target']} (best ref)")
    if base is not None or best_ref is not None:
        ax.legend(fontsize=7)
    ax.grid(alpha=0.3)


def plot_curve(path: Path, rows: list[dict], headline: list[str]) -> Path | None:
    """(e) Each headline metric against the training step of a run's checkpoints, with
    intervals; the base (dotted) and the best reference predictor (dashed) for scale."""
    points = sorted((r for r in rows if r["kind"] == "adapter" and r.get("step") is not None),
                    key=lambda r: r["step"])
    if len(points) < 2:
        return None
    base = next((r for r in rows if r["kind"] == "base"), None)
    refs = [r for r in rows if r["kind"] == "reference"]
    ncols = 2 if len(headline) > 1 else 1
    nrows = -(-len(headline) // ncols)
    fig = _figure(4.6 * ncols, 3.2 * nrows)
    axes = np.atleast_1d(fig.subplots(nrows, ncols)).ravel()
    for ax, metric in zip(axes, headline, strict=False):
        shown = [r for r in points if r.get(metric) is not None]
        steps = [r["step"] for r in shown]
        values = [r[metric] for r in shown]
        err = None
        if shown and all(r.get(f"{metric}_low") is not None for r in shown):
            err = [[v - r[f"{metric}_low"] for v, r in zip(values, shown, strict=True)],
                   [r[f"{metric}_high"] - v for v, r in zip(values, shown, strict=True)]]
        ax.errorbar(steps, values, yerr=err, marker="o", capsize=3, color=COLORS["adapter"],
                    label="checkpoints")
        if base is not None and base.get(metric) is not None:
            ax.axhline(base[metric], linestyle=":", color=COLORS["base"], label="base")
        best = _best_reference(refs, metric)
        if best is not None:
            ax.axhline(best[metric], linestyle="--", linewidth=1, color="C3",
                       label=f"{best['target']} (best ref)")
        better = "higher" if higher_is_better(metric) else "lower"
        ax.set(xlabel="optimizer step", title=f"{metric} ({better} is better)")
        ax.title.set_fontsize(10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in axes[len(headline):]:
        ax.set_visible(False)
    fig.savefig(path)
    return path


def _category(value: Any) -> str:
    return "all" if value is None else str(value)


def _category_order(label: str) -> tuple[int, float, str]:
    try:
        return (0, float(label), label)
    except ValueError:
        return (1, 0.0, label)


def plot_scatter(path: Path, target: LoadedTarget, tags: list[str], labels: dict[str, str],
                 tolerance: float | None, seed: int = 0) -> Path:
    """(c) Predicted vs reference score for every tag of every record (jittered)."""
    truth, pred, missing = _score_pairs(target.rows, tags)
    rng = np.random.default_rng(seed)
    jitter = rng.uniform(-0.18, 0.18, size=(2, len(truth)))
    fig = _figure(4.6, 4.4)
    ax = fig.subplots()
    lo, hi = min([0.0, *truth, *pred]), max([1.0, *truth, *pred])
    ax.plot([lo, hi], [lo, hi], color="black", linewidth=0.8)
    if tolerance is not None:
        ax.fill_between([lo, hi], [lo - tolerance, hi - tolerance], [lo + tolerance, hi + tolerance],
                        color="green", alpha=0.08, label=f"±{tolerance:g}")
    ok = ~missing
    ax.scatter(truth[ok] + jitter[0, ok], pred[ok] + jitter[1, ok], s=8, alpha=0.4, label="predicted")
    if missing.any():
        ax.scatter(truth[missing] + jitter[0, missing], pred[missing] + jitter[1, missing], s=10,
                   marker="x", color="red", alpha=0.5, label="missing/invalid (as 0)")
    ax.set_xlabel("reference score")
    ax.set_ylabel("predicted score")
    ax.set_title(f"{target.name}: {len(target.rows)} records × {len(tags)} tags", fontsize=9)
    ax.legend(fontsize=7, loc="upper left")
    fig.savefig(path)
    return path


def _score_pairs(rows: list[dict], tags: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    truth, pred, missing = [], [], []
    for row in rows:
        ref = parse_tag_json(row.get("reference")) or {}
        parsed = row.get("parsed") if isinstance(row.get("parsed"), dict) else {}
        for tag in tags:
            if not is_number(ref.get(tag)):
                continue
            truth.append(float(ref[tag]))
            good = is_number(parsed.get(tag))
            pred.append(float(parsed[tag]) if good else 0.0)
            missing.append(not good)
    return np.array(truth), np.array(pred), np.array(missing, dtype=bool)


def plot_tag_mae(path: Path, targets: list[LoadedTarget], tags: list[str],
                 labels: dict[str, str]) -> Path | None:
    """(d) Heatmap of per-tag MAE, one row per target (references included)."""
    shown = [t for t in targets if isinstance(t.metrics.get("per_tag_mae"), dict)]
    if not shown:
        return None
    grid = np.array([[_mae(t, tag) for tag in tags] for t in shown])
    fig = _figure(1.0 + 0.75 * len(tags), 1.2 + 0.38 * len(shown))
    ax = fig.subplots()
    image = ax.imshow(np.ma.masked_invalid(grid), cmap="Reds", aspect="auto")
    ax.set_xticks(range(len(tags)), [labels[t] for t in tags], rotation=30, ha="right")
    names = [f"{t.name} (ref)" if t.kind == "reference" else t.name for t in shown]
    ax.set_yticks(range(len(shown)), names, fontsize=8)
    finite = grid[np.isfinite(grid)]
    middle = (finite.max() + finite.min()) / 2 if finite.size else 0
    for (i, j), value in np.ndenumerate(grid):
        if np.isfinite(value):
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7,
                    color="white" if value > middle else "black")
    ax.set_title("per-tag mean absolute error (lower is better)", fontsize=10)
    if any(labels[t] != t for t in tags):
        fig.supxlabel(coded_tags_note(tags), fontsize=6.5, wrap=True)  # laid out with the axes
    fig.colorbar(image, ax=ax, shrink=0.8)
    fig.savefig(path)
    return path


def _mae(target: LoadedTarget, tag: str) -> float:
    value = target.metrics["per_tag_mae"].get(tag)
    return float(value) if is_number(value) else float("nan")


def write_plots(out_dir: Path, targets: list[LoadedTarget], rows: list[dict], task: str,
                headline: list[str], seed: int = 0) -> tuple[list[Path], dict[str, str]]:
    """Every plot that applies; returns (PNG paths, tag → label used on the plots)."""
    out_dir = Path(out_dir)
    paths: list[Path | None] = []
    labels: dict[str, str] = {}
    with _font_context():
        paths.append(plot_metrics(out_dir / "metrics.png", rows, headline))
        paths.append(plot_hyperparams(out_dir / "hyperparams.png", rows, headline))
        paths.append(plot_curve(out_dir / "checkpoints.png", rows, headline))
        if task == "tag_scores":
            params = next((t.metrics.get("task_params") for t in targets
                           if isinstance(t.metrics.get("task_params"), dict)), {})
            tags = list(params.get("tags") or _tags_from_mae(targets))
            labels = tag_labels(tags)
            paths.append(plot_tag_mae(out_dir / "per_tag_mae.png", targets, tags, labels))
            used: set[str] = set()
            for t in targets:
                if t.kind != "reference":
                    name = _unused(f"scatter_{safe_filename(t.name)}", used) + ".png"
                    paths.append(plot_scatter(out_dir / name, t, tags, labels,
                                              params.get("tolerance"), seed))
    return [p for p in paths if p is not None], labels


def _unused(stem: str, used: set[str]) -> str:
    """Distinct target names can share a safe file name (a b, a_b): number the repeats."""
    unique, i = stem, 2
    while unique in used:
        unique, i = f"{stem}_{i}", i + 1
    used.add(unique)
    return unique


def _tags_from_mae(targets: list[LoadedTarget]) -> list[str]:
    for t in targets:
        if isinstance(t.metrics.get("per_tag_mae"), dict):
            return list(t.metrics["per_tag_mae"])
    return []
