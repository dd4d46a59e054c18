"""Which adapter is best, and whether the eval can tell it from the runner-up and the floor.

With 77 eval records two trials a point apart are usually noise: the verdict pairs the best
adapter with the runner-up and with the best reference predictor record by record (paired
bootstrap, scoring/stats.py) and says whether each difference is distinguishable (p < 0.05).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from loralab.report.tables import LoadedTarget, fmt, same_records
from loralab.scoring.stats import paired_bootstrap
from loralab.scoring.tasks import higher_is_better, record_values


@dataclass
class Duel:
    """The best adapter against one other target on `metric`: its lead, signed so > 0 = ahead."""

    other: str
    other_value: float
    lead: float | None  # None: not on the same records, no paired test
    low: float | None
    high: float | None
    p_value: float | None
    distinguishable: bool


def _ranked(targets: list[LoadedTarget], kind: str, metric: str) -> list[LoadedTarget]:
    scored = [t for t in targets if t.kind == kind and isinstance(t.metrics.get(metric), (int, float))]
    return sorted(scored, key=lambda t: t.metrics[metric], reverse=higher_is_better(metric))


def duel(best: LoadedTarget, other: LoadedTarget, task: str, metric: str, bootstrap: int,
         seed: int) -> Duel:
    value = float(other.metrics[metric])
    if not same_records(best, other) or bootstrap <= 0:
        return Duel(other.name, value, None, None, None, None, False)
    test = paired_bootstrap(record_values(task, best.rows, metric),
                            record_values(task, other.rows, metric), n=bootstrap, seed=seed)
    sign = 1.0 if higher_is_better(metric) else -1.0
    low, high = sorted((sign * test["low"], sign * test["high"]))
    return Duel(other.name, value, sign * test["diff"], low, high, test["p_value"],
                test["distinguishable"])


def best_adapter(targets: list[LoadedTarget], task: str, metric: str, bootstrap: int = 1000,
                 seed: int = 0) -> dict[str, Any] | None:
    """{"metric", "best", "value", "runner_up": Duel | None, "reference": Duel | None};
    None without adapters."""
    adapters = _ranked(targets, "adapter", metric)
    if not adapters:
        return None
    best = adapters[0]
    references = _ranked(targets, "reference", metric)
    return {
        "metric": metric, "best": best.name, "value": float(best.metrics[metric]),
        "runner_up": duel(best, adapters[1], task, metric, bootstrap, seed)
        if len(adapters) > 1 else None,
        "reference": duel(best, references[0], task, metric, bootstrap, seed)
        if references else None,
    }


def verdict_lines(verdict: dict[str, Any] | None) -> list[str]:
    """The verdict in sentences (terminal, comparison.md, report.html)."""
    if verdict is None:
        return []
    metric = verdict["metric"]
    better = "higher" if higher_is_better(metric) else "lower"
    lines = [f"best adapter by {metric} ({better} is better): {verdict['best']} "
             f"({fmt(verdict['value'])})"]
    for role, d in (("runner-up", verdict["runner_up"]),
                    ("best reference predictor", verdict["reference"])):
        if d is None:
            continue
        head = f"vs {role} {d.other} ({fmt(d.other_value)}): "
        if d.lead is None:
            lines.append(head + "not on the same eval records, no paired test")
            continue
        said = ("distinguishable" if d.distinguishable
                else "NOT distinguishable: this eval cannot tell them apart")
        lines.append(head + f"lead {d.lead:+.3f} [{d.low:+.3f}, {d.high:+.3f}] "
                     f"(> 0: the best adapter is better), p={d.p_value:.3f}, {said}")
    return lines
