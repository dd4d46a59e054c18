"""The `generic` task: free-text answers compared with the reference as character strings.

Character-level metrics, because the seed's data is Chinese (no spaces to split words on):
- exact_match: the stripped texts are equal.
- char_f1: F1 of the two bags of characters (whitespace ignored).
- rouge_l: F1 of the longest common subsequence of characters (whitespace ignored).
- valid: the stripped output is not empty.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from loralab.errors import UserError

HEADLINE = ["exact_match", "char_f1", "rouge_l", "valid_rate"]
RECORD_FIELDS = {"valid_rate": "valid"}


def _chars(text: str) -> str:
    return "".join(ch for ch in text if not ch.isspace())


def char_f1(generation: str, reference: str) -> float:
    """F1 of shared characters, counted with multiplicity; two empty texts match."""
    pred, ref = Counter(_chars(generation)), Counter(_chars(reference))
    if not pred and not ref:
        return 1.0
    common = sum((pred & ref).values())
    if common == 0:
        return 0.0
    precision, recall = common / sum(pred.values()), common / sum(ref.values())
    return 2 * precision * recall / (precision + recall)


def lcs_length(a: str, b: str) -> int:
    """Length of the longest common subsequence, bit-parallel (Hyyrö 2004): O(len(b)) big-int
    operations instead of an O(len(a)·len(b)) Python table."""
    if not a or not b:
        return 0
    masks: dict[str, int] = {}
    for i, ch in enumerate(a):
        masks[ch] = masks.get(ch, 0) | (1 << i)
    full = (1 << len(a)) - 1
    row = full
    for ch in b:
        match = row & masks.get(ch, 0)
        row = ((row + match) | (row - match)) & full
    return len(a) - row.bit_count()


def rouge_l(generation: str, reference: str) -> float:
    """ROUGE-L F1 over characters; two empty texts match."""
    pred, ref = _chars(generation), _chars(reference)
    if not pred and not ref:
        return 1.0
    common = lcs_length(pred, ref)
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


@dataclass
class GenericTask:
    """Any text answer: exact match and character overlap with the reference."""

    name: str = "generic"
    headline: list[str] = field(default_factory=lambda: list(HEADLINE))
    # The parse is the stripped text: `loralab predict` would only repeat the generation.
    predict_shows_parsed: bool = False

    def parse(self, text: str) -> str:
        return text.strip()

    def reference_predictors(self, train_answers: list[str]) -> dict[str, Callable[[dict], str]]:
        """most_frequent: the commonest (stripped) training answer; ties go to the first seen."""
        if not train_answers:
            raise UserError("no training answers: cannot build reference predictors")
        counts = Counter(a.strip() for a in train_answers)
        top = max(counts.values())
        most = next(a.strip() for a in train_answers if counts[a.strip()] == top)
        return {"most_frequent": lambda record: most}

    def higher_is_better(self, metric: str) -> bool:
        return True

    def score(self, generation: str, reference: str) -> dict[str, Any]:
        parsed = self.parse(generation)
        return {
            "parsed": parsed,
            "valid": bool(parsed),
            "exact_match": float(parsed == reference.strip()),
            "char_f1": char_f1(generation, reference),
            "rouge_l": rouge_l(generation, reference),
        }

    def aggregate(self, rows: list[dict]) -> dict[str, Any]:
        n = len(rows)
        if n == 0:
            return {"n": 0}
        out: dict[str, Any] = {"n": n}
        for metric in ("exact_match", "char_f1", "rouge_l"):
            out[metric] = sum(float(r[metric]) for r in rows) / n
        out["valid_rate"] = sum(bool(r["valid"]) for r in rows) / n
        return out
