"""The `tag_scores` task: the model answers a JSON object of integer scores, one per tag.

Metric definitions follow the seed series (part 4), per record then averaged over records:
parse the generation as JSON (invalid → `{}`), a tag missing (or not a number) counts as 0,
d = |pred − truth| per tag, n = number of tags, range = score_max − score_min.

- weighted_accuracy = 1 − Σd / (n · range)
- weighted_error = Σd / n  (mean absolute error per tag)
- precision = (#predicted tags with d ≤ tolerance) / (#tag keys predicted); 0 keys → 0.
  The series divides the count over *all* tags by the predicted keys, which exceeds 1 when keys
  are missing; counting only predicted tags keeps precision ≤ 1 and is identical whenever every
  tag is present (then F1 = share of tags within ±tolerance, as the series notes).
- recall = (#tags with d ≤ tolerance, missing tags counted as 0) / n
- f1 = harmonic mean of precision and recall (0 when both are 0)
- valid = the output parses and holds exactly the expected tags with integer values in range.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from loralab.errors import UserError

HEADLINE = ["weighted_accuracy", "f1", "weighted_error", "valid_rate"]
LOWER_IS_BETTER = {"weighted_error"}
# Per-record field behind each aggregate rate (the others share the aggregate's name).
RECORD_FIELDS = {"valid_rate": "valid", "json_rate": "json_ok", "out_of_range_rate": "out_of_range"}

# Look-alike characters models (and Chinese keyboards) write instead of JSON's ASCII ones.
_FULL_WIDTH = str.maketrans({
    "“": '"', "”": '"', "„": '"', "＂": '"', "「": '"', "」": '"',
    "｛": "{", "｝": "}", "：": ":", "，": ",", "［": "[", "］": "]",
})
_TRAILING_COMMA = re.compile(r",(\s*[}\]])")
_MAX_STARTS = 200  # object starts tried per candidate text: bounds the work on brace-heavy junk


def parse_tag_json(text: Any) -> dict | None:
    """The first JSON object in `text` (code fences, prose, trailing commas, full-width quotes
    tolerated); None when there is none. Never raises."""
    if not isinstance(text, str) or ("{" not in text and "｛" not in text):
        return None
    for candidate in _repairs(text):
        found = _first_object(candidate)
        if found is not None:
            return found
    return None


def _repairs(text: str):
    """The text as written, then progressively repaired versions of it."""
    yield text
    fixed = _TRAILING_COMMA.sub(r"\1", text.translate(_FULL_WIDTH))
    if fixed != text:
        yield fixed
    if "'" in fixed and '"' not in fixed:  # Python-style dict: {'a': 1}
        yield fixed.replace("'", '"')


def _first_object(text: str) -> dict | None:
    decoder = json.JSONDecoder()
    start = text.find("{")
    tries = 0
    while start != -1 and tries < _MAX_STARTS:
        tries += 1
        try:
            obj, _ = decoder.raw_decode(text, start)
        except (ValueError, RecursionError):
            obj = None
        if isinstance(obj, dict):
            return obj
        start = text.find("{", start + 1)
    return None


def is_number(value: Any) -> bool:
    """A finite JSON number (bools are not scores)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class TagScoresTask:
    """Scores JSON tag-score answers against reference answers of the same shape."""

    tags: list[str]
    score_min: int = 0
    score_max: int = 10
    tolerance: int = 2
    name: str = "tag_scores"
    headline: list[str] = field(default_factory=lambda: list(HEADLINE))
    # `loralab predict` writes `parsed` beside the text: the scores as JSON add to the raw text.
    predict_shows_parsed: bool = True

    def parse(self, text: str) -> dict | None:
        return parse_tag_json(text)

    def reference_predictors(self, train_answers: list[str]) -> dict[str, Callable[[dict], str]]:
        """empty, all_zeros, train_mean and train_median (per tag, rounded) predictors."""
        scores = training_scores(train_answers, self.tags)
        mean = {t: _round_half_up(float(np.mean(v))) for t, v in scores.items()}
        median = {t: _round_half_up(float(np.median(v))) for t, v in scores.items()}
        zeros = {t: 0 for t in self.tags}
        return {name: _constant(text) for name, text in (
            ("empty", ""), ("all_zeros", _answer(zeros)),
            ("train_mean", _answer(mean)), ("train_median", _answer(median)))}

    def higher_is_better(self, metric: str) -> bool:
        return metric not in LOWER_IS_BETTER

    def truth(self, reference: str) -> dict[str, float]:
        """The reference scores; a reference without every tag is a data error."""
        obj = parse_tag_json(reference)
        if obj is None:
            raise UserError(f"reference answer is not a JSON object: {reference[:60]!r}")
        missing = [t for t in self.tags if not is_number(obj.get(t))]
        if missing:
            raise UserError(
                f"reference answer lacks a numeric score for {', '.join(missing)} "
                f"(check eval.tags): {reference[:60]!r}"
            )
        return {t: float(obj[t]) for t in self.tags}

    def score(self, generation: str, reference: str) -> dict[str, Any]:
        """Per-record metrics (see the module docstring) plus `parsed` and per-tag `abs_error`."""
        truth = self.truth(reference)
        parsed = parse_tag_json(generation)
        pred = parsed or {}
        predicted = [t for t in self.tags if t in pred]
        values = {t: float(pred[t]) if is_number(pred.get(t)) else 0.0 for t in self.tags}
        abs_error = {t: abs(values[t] - truth[t]) for t in self.tags}
        within = {t: abs_error[t] <= self.tolerance for t in self.tags}
        hits_predicted = sum(within[t] and is_number(pred[t]) for t in predicted)
        n = len(self.tags)
        precision = hits_predicted / len(predicted) if predicted else 0.0
        recall = sum(within.values()) / n
        total = sum(abs_error.values())
        return {
            "parsed": parsed,
            "json_ok": parsed is not None,
            "valid": self._is_valid(parsed),
            "out_of_range": any(
                is_number(pred[t]) and not self.score_min <= pred[t] <= self.score_max
                for t in predicted
            ),
            "weighted_accuracy": 1.0 - total / (n * (self.score_max - self.score_min)),
            "weighted_error": total / n,
            "precision": precision,
            "recall": recall,
            "f1": _f1(precision, recall),
            "abs_error": abs_error,
        }

    def params(self) -> dict[str, Any]:
        """What the numbers depend on, stored in metrics.json for the report."""
        return {"tags": list(self.tags), "score_min": self.score_min,
                "score_max": self.score_max, "tolerance": self.tolerance}

    def _is_valid(self, parsed: dict | None) -> bool:
        if parsed is None or set(parsed) != set(self.tags):
            return False
        return all(
            isinstance(v, int) and not isinstance(v, bool) and self.score_min <= v <= self.score_max
            for v in parsed.values()
        )

    def aggregate(self, rows: list[dict]) -> dict[str, Any]:
        """Means over records of the per-record metrics, rates, and per-tag MAE."""
        n = len(rows)
        if n == 0:
            return {"n": 0, "task_params": self.params()}
        out: dict[str, Any] = {"n": n, "task_params": self.params()}
        for metric in ("weighted_accuracy", "weighted_error", "precision", "recall", "f1"):
            out[metric] = sum(float(r[metric]) for r in rows) / n
        for rate, record_field in RECORD_FIELDS.items():
            out[rate] = sum(bool(r[record_field]) for r in rows) / n
        out["per_tag_mae"] = {
            t: sum(float(r["abs_error"][t]) for r in rows) / n for t in self.tags
        }
        return out


def _f1(precision: float, recall: float) -> float:
    if precision + recall == 0:
        return 0.0
    return 2 * precision * recall / (precision + recall)


def training_scores(train_answers: list[str], tags: list[str]) -> dict[str, list[float]]:
    """Per-tag training scores from the answers that parse; a missing tag counts as 0."""
    parsed = [p for p in (parse_tag_json(a) for a in train_answers) if p is not None]
    if not parsed:
        raise UserError("no training answer is a JSON object: cannot build reference predictors")
    return {t: [float(p[t]) if is_number(p.get(t)) else 0.0 for p in parsed] for t in tags}


def _round_half_up(value: float) -> int:
    """Rounding people expect (2.5 → 3), unlike Python's round-half-to-even."""
    return int(math.floor(value + 0.5))


def _answer(scores: dict[str, int]) -> str:
    return json.dumps(scores, ensure_ascii=False)


def _constant(text: str) -> Callable[[dict], str]:
    return lambda record: text
