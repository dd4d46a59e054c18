"""Seeded bootstrap: reproducible, and right on sets whose answer is known."""

from __future__ import annotations

import math

import numpy as np
import pytest

from loralab.scoring.stats import bootstrap_ci, paired_bootstrap


def test_ci_is_reproducible_and_seed_dependent():
    values = np.random.default_rng(1).random(50)
    assert bootstrap_ci(values, seed=3) == bootstrap_ci(list(values), seed=3)
    assert bootstrap_ci(values, seed=3) != bootstrap_ci(values, seed=4)


def test_ci_of_constant_values_is_a_point():
    assert bootstrap_ci([0.7] * 20) == pytest.approx((0.7, 0.7))


def test_ci_of_half_ones_matches_normal_approximation():
    low, high = bootstrap_ci([0.0, 1.0] * 50, n=2000)
    # mean 0.5, standard error 0.05: about 0.5 ± 0.098
    assert 0.38 < low < 0.44 and 0.56 < high < 0.62


def test_ci_edge_cases():
    assert all(math.isnan(v) for v in bootstrap_ci([]))
    assert all(math.isnan(v) for v in bootstrap_ci([1.0, 2.0], n=0))


def test_identical_runs_are_not_distinguishable():
    a = [0.2, 0.9, 0.5, 1.0, 0.0] * 4
    result = paired_bootstrap(a, list(a))
    assert result["diff"] == 0 and result["p_value"] == 1.0
    assert result["low"] == result["high"] == 0 and not result["distinguishable"]


def test_clearly_separated_runs_are_distinguishable():
    result = paired_bootstrap([1.0] * 30, [0.0] * 30)
    assert result["diff"] == 1.0 and result["p_value"] == 0.0 and result["distinguishable"]


def test_one_flipped_record_is_noise():
    a = [1.0, 0.0] * 10
    b = list(a)
    b[1] = 1.0
    result = paired_bootstrap(b, a, n=2000, seed=0)
    assert result["diff"] == pytest.approx(0.05)
    assert result["p_value"] > 0.5 and not result["distinguishable"]


def test_paired_is_antisymmetric_and_reproducible():
    rng = np.random.default_rng(0)
    a, b = rng.random(40), rng.random(40) + 0.1
    ab, ba = paired_bootstrap(a, b, seed=5), paired_bootstrap(b, a, seed=5)
    assert ab == paired_bootstrap(a, b, seed=5)
    assert ab["diff"] == pytest.approx(-ba["diff"]) and ab["p_value"] == pytest.approx(ba["p_value"])
    assert ab["low"] == pytest.approx(-ba["high"])


def test_paired_needs_equal_lengths():
    with pytest.raises(ValueError, match="length"):
        paired_bootstrap([1.0, 2.0], [1.0])
