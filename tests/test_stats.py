"""The statistics module against published values, hand-computed p-values, edge cases and coverage
simulations (each simulation uses a fixed seed, so the tolerances are checked on one fixed draw)."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as sps
from scipy.special import expit

from gmr import stats


def _pairs(both: int, only_a: int, only_b: int, neither: int) -> tuple[np.ndarray, np.ndarray]:
    """Correctness arrays with the given 2x2 counts of (a right, b right)."""
    a = np.repeat([True, True, False, False], [both, only_a, only_b, neither])
    b = np.repeat([True, False, True, False], [both, only_a, only_b, neither])
    return a, b


# Newcombe (1998), "Two-sided confidence intervals for the single proportion", Stat Med 17:857, Table II:
# method 3 (Wilson score) and method 5 (Clopper-Pearson exact), 95%.
NEWCOMBE_1998 = [
    # n_correct, n, wilson, clopper-pearson
    (81, 263, (0.2553, 0.3662), (0.2527, 0.3676)),
    (15, 148, (0.0624, 0.1605), (0.0578, 0.1617)),
    (0, 20, (0.0, 0.1611), (0.0, 0.1684)),
    (1, 29, (0.0061, 0.1718), (0.0009, 0.1776)),
]


@pytest.mark.parametrize("k, n, wilson, exact", NEWCOMBE_1998)
def test_intervals_match_newcombe_1998(k, n, wilson, exact):
    assert stats.accuracy_interval(k, n) == pytest.approx(wilson, abs=6e-5)
    assert stats.accuracy_interval(k, n, method="clopper-pearson") == pytest.approx(exact, abs=6e-5)


@pytest.mark.parametrize("k, n, low, high", [(2, 10, 0.06, 0.51), (38, 100, 0.29, 0.48), (430, 1000, 0.40, 0.46)])
def test_wilson_matches_design_examples(k, n, low, high):
    assert stats.accuracy_interval(k, n) == pytest.approx((low, high), abs=0.005)


def test_clopper_pearson_closed_forms():
    """At 0 or n correct the exact interval has a closed form: 1 - (alpha/2)^(1/n)."""
    assert stats.accuracy_interval(0, 10, method="clopper-pearson") == pytest.approx((0.0, 0.3085), abs=5e-5)
    assert stats.accuracy_interval(10, 10, method="clopper-pearson") == pytest.approx((0.6915, 1.0), abs=5e-5)


def test_estimate_text_and_options():
    est = stats.estimate_accuracy(38, 100)
    assert est.text() == "38.0 [29.1, 47.8]"
    assert est.text(scale=1, digits=3) == "0.380 [0.291, 0.478]"
    assert (est.n, est.confidence, est.method) == (100, 0.95, "wilson")
    narrower = stats.estimate_accuracy(38, 100, confidence=0.90)
    assert est.low < narrower.low < narrower.high < est.high
    assert stats.estimate_accuracy(38, 100, method=stats.Interval.CLOPPER_PEARSON).method == "clopper-pearson"


def test_accuracy_interval_edge_cases():
    with pytest.raises(ValueError, match="0 test points"):
        stats.accuracy_interval(0, 0)
    with pytest.raises(ValueError, match="n_correct"):
        stats.accuracy_interval(11, 10)
    with pytest.raises(ValueError, match="valid: wilson, clopper-pearson"):
        stats.accuracy_interval(1, 10, method="wald")
    with pytest.raises(ValueError, match="confidence"):
        stats.accuracy_interval(1, 10, confidence=95)
    low, high = stats.accuracy_interval(50, 50)
    assert high == 1.0 and 0.9 < low < 1.0


def test_mcnemar_hand_computed():
    # 10 vs 2 discordant: 2 * P(X <= 2 | 12, 1/2) = 2 * (1 + 12 + 66) / 4096
    assert stats.mcnemar_p(10, 2) == pytest.approx(2 * 79 / 4096)
    assert stats.mcnemar_p(10, 2) == pytest.approx(0.0386, abs=5e-5)
    assert stats.mcnemar_p(2, 10) == stats.mcnemar_p(10, 2)
    # 6 vs 16: 2 * P(X <= 6 | 22, 1/2); the exact conditional test of Fagerland et al. gives 0.052479
    assert stats.mcnemar_p(6, 16) == pytest.approx(0.052479, abs=5e-7)
    assert stats.mcnemar_p(0, 0) == 1.0


def test_compare_paired_counts_reading_and_interval():
    cmp = stats.compare_paired(*_pairs(80, 10, 2, 8))
    assert (cmp.n, cmp.both, cmp.only_a, cmp.only_b) == (100, 80, 10, 2)
    assert cmp.difference.value == pytest.approx(0.08)
    assert cmp.reading == stats.A_MORE_ROBUST and cmp.decided
    assert cmp.difference.low > 0
    assert stats.compare_paired(*_pairs(80, 2, 10, 8)).reading == stats.B_MORE_ROBUST
    # At 99% the same counts are not enough.
    assert stats.compare_paired(*_pairs(80, 10, 2, 8), confidence=0.99).reading == stats.NO_DIFFERENCE


def test_newcombe_paired_interval_published_example():
    """Cavo et al. (2012) table as analysed in Fagerland, Lydersen & Laake, Statistical Analysis of
    Contingency Tables (2017), ch. 8: Newcombe square-and-add -0.0621 (-0.1186 to -0.0046)."""
    cmp = stats.compare_paired(*_pairs(59, 6, 16, 80))
    assert cmp.difference.value == pytest.approx(-0.0621, abs=5e-5)
    assert (cmp.difference.low, cmp.difference.high) == pytest.approx((-0.1186, -0.0046), abs=5e-5)
    # The exact test does not reject here although the interval just excludes 0: the reading follows the test.
    assert cmp.p_value == pytest.approx(0.052479, abs=5e-7)
    assert cmp.reading == stats.NO_DIFFERENCE


def test_compare_paired_edge_cases():
    same = stats.compare_paired(*_pairs(80, 0, 0, 20))
    assert same.p_value == 1.0 and same.reading == stats.NO_DIFFERENCE
    assert same.difference.low < 0 < same.difference.high  # no zero-width interval without discordance
    assert same.points_needed() is None
    all_right = stats.compare_paired(np.ones(30, bool), np.ones(30, bool))
    assert all_right.difference.value == 0 and all_right.p_value == 1.0
    with pytest.raises(ValueError, match="same test points"):
        stats.compare_paired(np.ones(10, bool), np.ones(11, bool))
    with pytest.raises(ValueError, match="no test points"):
        stats.compare_paired(np.ones(0, bool), np.ones(0, bool))
    with pytest.raises(ValueError, match="correctness"):
        stats.compare_paired(np.array([0, 2]), np.array([1, 1]))
    ints = stats.compare_paired(np.array([1, 0, 1]), np.array([1, 1, 0]))
    assert (ints.both, ints.only_a, ints.only_b) == (1, 1, 1)


def test_paired_interval_coverage():
    """Newcombe's interval covers the true difference near 95% on correlated pairs (n = 200)."""
    rng = np.random.default_rng(7)
    cells = np.array([0.40, 0.08, 0.04, 0.48])  # both, only a, only b, neither
    truth, hits, studies = cells[1] - cells[2], 0, 2000
    for counts in rng.multinomial(200, cells, size=studies):
        d = stats.compare_paired(*_pairs(*counts)).difference
        hits += d.low <= truth <= d.high
    assert 0.93 <= hits / studies <= 0.98


def test_points_needed_for_precision():
    # DESIGN.md: at n = 100, 38% has an interval about +-9.5 points wide.
    assert 90 <= stats.points_needed_for_precision(0.38, 0.095) <= 110
    n = stats.points_needed_for_precision(0.38, 0.02)
    assert stats.estimate_accuracy(round(0.38 * n), n).half_width <= 0.02
    assert stats.estimate_accuracy(round(0.38 * (n - 1)), n - 1).half_width > 0.02
    assert 3.5 < n / stats.points_needed_for_precision(0.38, 0.04) < 4.5  # precision goes with sqrt(n)
    assert stats.points_needed_for_precision(1.0, 0.02) > 0  # defined at the edges, unlike n = z^2 p(1-p)/h^2
    with pytest.raises(ValueError):
        stats.points_needed_for_precision(0.5, 0.0)


def test_points_needed_paired():
    assert stats.points_needed_paired(10, 2, 100) <= 100  # already decided at n = 100
    m = stats.points_needed_paired(6, 16, 161)  # undecided at 161
    assert m > 161
    assert stats.mcnemar_p(round(6 * m / 161), round(16 * m / 161)) < 0.05
    assert stats.mcnemar_p(round(6 * (m - 1) / 161), round(16 * (m - 1) / 161)) >= 0.05
    assert stats.points_needed_paired(3, 3, 100) is None
    with pytest.raises(ValueError):
        stats.points_needed_paired(60, 60, 100)


def test_aggregate_one_seed_is_its_wilson_interval():
    correct = np.arange(100) < 38
    est = stats.aggregate_seeds([correct])
    assert (est.low, est.high) == stats.accuracy_interval(38, 100)
    assert "1 seed" in est.method and est.n_seeds == 1 and np.isnan(est.seed_std)


def test_aggregate_seeds_values_and_edges():
    seeds = [np.arange(100) < c for c in (40, 44, 42)]
    est = stats.aggregate_seeds(seeds)
    assert est.value == pytest.approx(0.42) and est.n == 100 and est.n_seeds == 3
    assert est.seed_std == pytest.approx(0.02) and est.mean_std_text() == "42.0 ± 2.0"
    assert est.low < 0.40 and est.high > 0.44 and "3 seeds" in est.method
    perfect = stats.aggregate_seeds([np.ones(100, bool)] * 3)  # no spread at all: pooled Wilson floor
    assert perfect.high == 1.0 and perfect.low < 1.0
    with pytest.raises(ValueError, match="same test points"):
        stats.aggregate_seeds([np.ones(10, bool), np.ones(12, bool)])
    with pytest.raises(ValueError, match="no seeds"):
        stats.aggregate_seeds([])


def _seed_studies(rng, k: int, n: int, studies: int, mu=-0.3, sd_point=2.0, sd_seed=0.15):
    """Simulated studies: point difficulty and seed skill on the logit scale, all seeds on the same
    points; the target is the accuracy expected over points and seeds (Gauss-Hermite integral)."""
    x, w = np.polynomial.hermite_e.hermegauss(80)
    truth = float(w @ expit(mu + np.hypot(sd_point, sd_seed) * x) / np.sqrt(2 * np.pi))
    point = rng.normal(mu, sd_point, (studies, 1, n))
    seed = rng.normal(0.0, sd_seed, (studies, k, 1))
    return truth, rng.random((studies, k, n)) < expit(point + seed)


@pytest.mark.parametrize("k, lowest, highest", [(5, 0.93, 0.98), (2, 0.93, 0.995)])
def test_aggregate_seeds_coverage(k, lowest, highest):
    """About 95% coverage from several seeds (conservative with 2), where the t-interval over seed
    accuracies alone falls short because the seeds share their test points."""
    truth, tables = _seed_studies(np.random.default_rng(11 + k), k, 200, 2000)
    hits = t_hits = 0
    for table in tables:
        est = stats.aggregate_seeds(table)
        hits += est.low <= truth <= est.high
        acc = table.mean(axis=1)
        t_half = sps.t.ppf(0.975, k - 1) * acc.std(ddof=1) / np.sqrt(k)
        t_hits += abs(acc.mean() - truth) <= t_half
    assert lowest <= hits / len(tables) <= highest
    if k == 5:
        assert t_hits / len(tables) < 0.9


@pytest.mark.parametrize("low, high, threshold, fails_above, expected", [
    (0.10, 0.20, 0.05, True, "fail"),
    (0.10, 0.20, 0.25, True, "pass"),
    (0.10, 0.20, 0.15, True, "undecided"),
    (0.10, 0.20, 0.20, True, "pass"),        # touching the threshold from the good side is not beyond it
    (0.10, 0.20, 0.10, True, "undecided"),
    (0.10, 0.20, 0.25, False, "fail"),
    (0.10, 0.20, 0.05, False, "pass"),
    (0.10, 0.20, 0.15, False, "undecided"),
])
def test_threshold_decision(low, high, threshold, fails_above, expected):
    assert stats.threshold_decision(low, high, threshold, fails_above) == expected


def test_threshold_decision_rejects_bad_intervals():
    with pytest.raises(ValueError, match="reversed"):
        stats.threshold_decision(0.3, 0.2, 0.1, True)
    with pytest.raises(ValueError, match="finite"):
        stats.threshold_decision(float("nan"), 0.2, 0.1, True)
