"""Seeded bootstrap intervals and paired comparisons: the same inputs give the same numbers.

With 77 eval records a 3-point difference in F1 can be noise; these say how much.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

_CHUNK = 200  # resamples drawn at once: bounds memory to _CHUNK × len(values) indices


def _resampled_means(values: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Means of `n` resamples (with replacement) of `values`, from numpy's Generator(seed)."""
    rng = np.random.default_rng(seed)
    means = []
    for size in _chunks(n):
        idx = rng.integers(0, len(values), size=(size, len(values)))
        means.append(values[idx].mean(axis=1))
    return np.concatenate(means) if means else np.empty(0)


def _chunks(n: int) -> Iterator[int]:
    while n > 0:
        yield min(n, _CHUNK)
        n -= _CHUNK


def _as_array(values: Sequence[float]) -> np.ndarray:
    return np.asarray([float(v) for v in values], dtype=np.float64)


def bootstrap_ci(
    values: Sequence[float], n: int = 1000, seed: int = 0, alpha: float = 0.05
) -> tuple[float, float]:
    """Percentile interval (1 − alpha) of the mean; (nan, nan) for no values or n = 0."""
    arr = _as_array(values)
    if arr.size == 0 or n <= 0:
        return (float("nan"), float("nan"))
    means = _resampled_means(arr, n, seed)
    low, high = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return (float(low), float(high))


def paired_bootstrap(
    a: Sequence[float], b: Sequence[float], n: int = 1000, seed: int = 0, alpha: float = 0.05
) -> dict:
    """Mean of a − b over paired records, its interval, a two-sided p-value and a verdict.

    p_value = 2 × share of resampled mean differences on the other side of zero (capped at 1);
    `distinguishable` means p_value < alpha.
    """
    arr_a, arr_b = _as_array(a), _as_array(b)
    if arr_a.shape != arr_b.shape:
        raise ValueError(f"paired samples differ in length: {arr_a.size} vs {arr_b.size}")
    if arr_a.size == 0:
        nan = float("nan")
        return {"diff": nan, "low": nan, "high": nan, "p_value": nan, "distinguishable": False}
    diffs = arr_a - arr_b
    diff = float(diffs.mean())
    if n <= 0:
        return {"diff": diff, "low": float("nan"), "high": float("nan"),
                "p_value": float("nan"), "distinguishable": False}
    means = _resampled_means(diffs, n, seed)
    low, high = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    p_value = _two_sided_p(diff, means)
    return {
        "diff": diff,
        "low": float(low),
        "high": float(high),
        "p_value": p_value,
        "distinguishable": bool(p_value < alpha),
    }


def _two_sided_p(diff: float, means: np.ndarray) -> float:
    if diff == 0:
        return 1.0
    opposite = np.mean(means <= 0) if diff > 0 else np.mean(means >= 0)
    return float(min(1.0, 2 * opposite))
