"""Reference predictors built from the training answers alone: the floor a model must beat.

On the seed's data most tag scores are 0, so answering all zeros already scores a high weighted
accuracy; a fine-tuned adapter is only interesting by how far it rises above these.
Each predictor maps an eval record to a generation text and is scored exactly like a model.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from loralab.layout import ComparisonDir
from loralab.scoring.tasks import get_task, score_predictions, write_target_results

Predictor = Callable[[dict], str]


def reference_predictors(eval_cfg: Any, train_answers: list[str]) -> dict[str, Predictor]:
    """The reference predictors of the configured task, by name (each task builds its own)."""
    return get_task(eval_cfg).reference_predictors(train_answers)


def score_references(
    eval_cfg: Any,
    train_answers: list[str],
    eval_rows: list[dict],
    comparison_dir: Path,
    bootstrap: int = 1000,
    seed: int = 0,
) -> list[Path]:
    """Score every reference predictor on `eval_rows` (each with `input`, `reference`) and write
    COMP/references/<name>/; returns those folders."""
    task = get_task(eval_cfg)
    folders = []
    for name, predict in reference_predictors(eval_cfg, train_answers).items():
        rows = [
            {"input": r.get("input", ""), "reference": r["reference"], "generation": predict(r)}
            for r in eval_rows
        ]
        scored, metrics = score_predictions(task, rows, bootstrap=bootstrap, seed=seed)
        metrics = {"target": name, "kind": "reference", "run_dir": None, **metrics}
        folder = ComparisonDir(comparison_dir).reference(name)
        folders.append(write_target_results(folder, scored, metrics))
    return folders
