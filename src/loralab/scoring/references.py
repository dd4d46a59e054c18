"""Reference predictors built from the training answers alone: the floor a model must beat.

On the seed's data most tag scores are 0, so answering all zeros already scores a high weighted
accuracy; a fine-tuned adapter is only interesting by how far it rises above these.
Each predictor maps an eval record to a generation text and is scored exactly like a model.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from loralab.errors import UserError
from loralab.evaluate.tag_scores import is_number, parse_tag_json
from loralab.evaluate.tasks import get_task, score_predictions, write_target_results

Predictor = Callable[[dict], str]
REFERENCES_DIRNAME = "references"


def _round_half_up(value: float) -> int:
    """Rounding people expect (2.5 → 3), unlike Python's round-half-to-even."""
    return int(math.floor(value + 0.5))


def _constant(text: str) -> Predictor:
    return lambda record: text


def training_scores(train_answers: list[str], tags: list[str]) -> dict[str, list[float]]:
    """Per-tag training scores from the answers that parse; a missing tag counts as 0."""
    parsed = [p for p in (parse_tag_json(a) for a in train_answers) if p is not None]
    if not parsed:
        raise UserError("no training answer is a JSON object: cannot build reference predictors")
    return {t: [float(p[t]) if is_number(p.get(t)) else 0.0 for p in parsed] for t in tags}


def _answer(scores: dict[str, int]) -> str:
    return json.dumps(scores, ensure_ascii=False)


def tag_score_references(train_answers: list[str], tags: list[str]) -> dict[str, Predictor]:
    """empty, all_zeros, train_mean and train_median (per tag, rounded) predictors."""
    scores = training_scores(train_answers, tags)
    mean = {t: _round_half_up(float(np.mean(v))) for t, v in scores.items()}
    median = {t: _round_half_up(float(np.median(v))) for t, v in scores.items()}
    return {
        "empty": _constant(""),
        "all_zeros": _constant(_answer({t: 0 for t in tags})),
        "train_mean": _constant(_answer(mean)),
        "train_median": _constant(_answer(median)),
    }


def generic_references(train_answers: list[str]) -> dict[str, Predictor]:
    """most_frequent: the commonest (stripped) training answer; ties go to the first seen."""
    if not train_answers:
        raise UserError("no training answers: cannot build reference predictors")
    counts = Counter(a.strip() for a in train_answers)
    top = max(counts.values())
    most = next(a.strip() for a in train_answers if counts[a.strip()] == top)
    return {"most_frequent": _constant(most)}


def reference_predictors(eval_cfg: Any, train_answers: list[str]) -> dict[str, Predictor]:
    """The reference predictors of the configured task, by name."""
    if eval_cfg.task == "tag_scores":
        return tag_score_references(train_answers, list(eval_cfg.tags))
    return generic_references(train_answers)


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
        folder = Path(comparison_dir) / REFERENCES_DIRNAME / name
        folders.append(write_target_results(folder, scored, metrics))
    return folders
