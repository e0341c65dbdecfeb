"""How sure a number is: intervals for accuracies, aggregation over seeds, paired comparisons, verdicts.

Everything the suite reports about an accuracy goes through this module, so a table, a model card and an
audit state the same uncertainty for the same number. It is built on scipy.stats; the few pieces written
here are the ones scipy does not offer, and each says so where it is written.

Accuracy on n test points. A binomial proportion: Wilson score interval by default (close to nominal
coverage even at small n and near 0% or 100%, where the Wald interval fails), Clopper-Pearson ("exact",
never below nominal, wider) as an option; both from `scipy.stats.binomtest(...).proportion_ci`. An
accuracy on 0 points has no interval: that is a bug upstream, so it raises ValueError rather than
returning NaN into a table.

Aggregation over training seeds (`aggregate_seeds`). Every seed of a configuration is evaluated on the
same test points (the first n of the test set), so the seeds share one draw of test points. The spread of
the seed accuracies therefore holds the seed-to-seed variation but not the test-sample variation the seeds
have in common: a t-interval over seed accuracies alone covered the truth in only 66-83% of simulated
studies with 5 seeds when points differ much in difficulty, as adversarial test points do. The estimator
here treats the k x n table of per-example correctness as a crossed design (seeds x points) and adds the
two variance components of its grand mean:
    V_seed   = var(seed accuracies) / k                 (what the t-interval over seeds uses; k-1 df)
    V_points = (MS_points - MS_residual) / (n k)  >= 0  (test-sample variance shared by all seeds; n-1 df)
    half-width = sqrt(t(k-1)^2 V_seed + t(n-1)^2 V_points)
Each component is scaled by the t quantile of its own degrees of freedom. The usual pooling of degrees of
freedom (Welch-Satterthwaite) under-covered with two seeds (87-89% in our simulations, because the seed
term is then known with one degree of freedom); the per-component scaling stayed at 93% or above in
every simulated case (no lower than the t-interval where seeds dominate), near 95% from 3 seeds on and
conservative with 2 (the honest price of 2 seeds). The interval is never narrower than the Wilson
interval of all k n outcomes pooled (a mean of k n binary outcomes positively correlated by seed and
point cannot vary less), which matters only when every seed gets every point right (or wrong) and both
variances are estimated as zero. With one seed there is no
seed-to-seed spread to estimate: the result is the Wilson interval of that seed and its `method` says so.
The mean and standard deviation over seeds are kept as well, to compare with papers that report them.

Paired comparisons (`compare_paired`). Two correctness arrays on the same points: model A vs model B
under one attack, or one model under attack A vs attack B (PGD vs AutoAttack, 20 vs 100 steps, 1 vs 10
restarts). Only the discordant points carry information about the difference, so this is far more
sensitive than comparing two separate intervals. The verdict is the exact McNemar test (a two-sided
binomial test of the discordant counts against 1/2, `scipy.stats.binomtest`). The difference a - b comes
with Newcombe's hybrid score interval for paired proportions (method 10 of Newcombe 1998, Stat Med 17:2635,
the "square-and-add" of the two Wilson intervals with the correlation of the pairs): it stays within
[-1, 1], does not collapse to zero width when there are no discordant points (the Wald interval does), and
is close to nominal in Newcombe's and Fagerland, Lydersen & Laake's (2014) evaluations. scipy has no
interval for paired proportions, so it is written here. The test and the interval can disagree at the
margin (6 vs 16 discordant of 161: p = 0.052 while the interval just excludes 0); the verdict follows the
exact test, the interval reports the size.

Thresholds (`threshold_decision`). A sample statistic compared with a threshold fails only when its whole
interval lies beyond the threshold, passes when the whole interval lies on the good side, and is otherwise
undecided; `points_needed_for_precision` and `points_needed_paired` say how many points would decide it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum
from typing import Callable, Sequence

import numpy as np
from scipy import stats


class Interval(StrEnum):
    """Interval methods for one accuracy (a closed vocabulary, converted from strings on entry)."""
    WILSON = "wilson"
    CLOPPER_PEARSON = "clopper-pearson"


class Decision(StrEnum):
    """Outcome of a threshold check that accounts for sample size."""
    FAIL = "fail"
    PASS = "pass"
    UNDECIDED = "undecided"


CONFIDENCE = 0.95      # of every interval the suite reports unless a caller asks otherwise
INTERVAL_METHOD = "wilson"
A_MORE_ROBUST = "A more robust"
B_MORE_ROBUST = "B more robust"
NO_DIFFERENCE = "no detectable difference at this n"

# scipy's names for the interval methods
_SCIPY_METHOD = {Interval.WILSON: "wilson", Interval.CLOPPER_PEARSON: "exact"}
# Upper end of the search for a deciding number of points: beyond any test set, so "never" in practice.
_MAX_POINTS = 10**12


@dataclass(frozen=True)
class Estimate:
    """A number with its interval, the points it rests on and how the interval was made, so a table cell
    can always be traced to what it claims."""
    value: float
    low: float
    high: float
    n: int
    confidence: float
    method: str

    def text(self, scale: float = 100, digits: int = 1) -> str:
        """'38.0 [29.1, 47.8]': value and interval in percent by default, for tables and one-line output."""
        v, lo, hi = (f"{x * scale:.{digits}f}" for x in (self.value, self.low, self.high))
        return f"{v} [{lo}, {hi}]"

    @property
    def half_width(self) -> float:
        """Half the interval's width: the precision a user asks for when choosing n."""
        return (self.high - self.low) / 2


@dataclass(frozen=True)
class SeedEstimate(Estimate):
    """An accuracy over several training seeds; `n` is the test points per seed. The per-seed accuracies
    are kept because papers report mean and standard deviation over seeds, which we compare against."""
    seed_accuracies: tuple[float, ...]

    @property
    def n_seeds(self) -> int:
        """Number of seeds aggregated."""
        return len(self.seed_accuracies)

    @property
    def seed_std(self) -> float:
        """Sample standard deviation of the seed accuracies (ddof 1, as papers use); NaN for one seed."""
        if self.n_seeds < 2:
            return math.nan
        return float(np.std(self.seed_accuracies, ddof=1))

    def mean_std_text(self, scale: float = 100, digits: int = 1) -> str:
        """'45.2 ± 0.8': the form papers print, for side-by-side comparison with their tables."""
        return f"{self.value * scale:.{digits}f} ± {self.seed_std * scale:.{digits}f}"


@dataclass(frozen=True)
class PairedComparison:
    """Two correctness arrays on the same points: counts, the difference a - b with its interval, the exact
    McNemar p-value and the reading at the chosen level."""
    n: int
    both: int
    only_a: int
    only_b: int
    difference: Estimate
    p_value: float
    reading: str

    @property
    def decided(self) -> bool:
        """Whether the test detected a difference at the comparison's confidence level."""
        return self.reading != NO_DIFFERENCE

    def points_needed(self) -> int | None:
        """Points at which the observed discordance rates would be decided (see `points_needed_paired`)."""
        return points_needed_paired(self.only_a, self.only_b, self.n, self.difference.confidence)


def _check_confidence(confidence: float) -> float:
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie strictly between 0 and 1, got {confidence}")
    return float(confidence)


def _interval_method(method: str | Interval) -> Interval:
    try:
        return Interval(method)
    except ValueError:
        valid = ", ".join(m.value for m in Interval)
        raise ValueError(f"unknown interval method {method!r}; valid: {valid}") from None


def accuracy_interval(n_correct: int, n: int, confidence: float = CONFIDENCE,
                      method: str | Interval = Interval.WILSON) -> tuple[float, float]:
    """(low, high) for an accuracy of n_correct out of n points. Raises ValueError for n = 0: an accuracy
    on no points is an upstream bug, and a NaN interval would travel silently into tables."""
    if int(n) != n or int(n_correct) != n_correct:
        raise ValueError(f"counts must be whole numbers, got n_correct={n_correct}, n={n}")
    if n <= 0:
        raise ValueError("an accuracy on 0 test points has no interval")
    if not 0 <= n_correct <= n:
        raise ValueError(f"n_correct must lie in [0, n], got n_correct={n_correct}, n={n}")
    ci = stats.binomtest(int(n_correct), int(n)).proportion_ci(
        confidence_level=_check_confidence(confidence), method=_SCIPY_METHOD[_interval_method(method)])
    return float(ci.low), float(ci.high)


def estimate_accuracy(n_correct: int, n: int, confidence: float = CONFIDENCE,
                      method: str | Interval = Interval.WILSON) -> Estimate:
    """The accuracy n_correct / n with its interval, as an Estimate (the form tables and cards print)."""
    low, high = accuracy_interval(n_correct, n, confidence, method)
    return Estimate(n_correct / n, low, high, int(n), float(confidence), _interval_method(method).value)


def _as_correct(x, name: str) -> np.ndarray:
    """A 1-D boolean array from bools or 0/1 numbers; anything else is a caller's mistake, not data."""
    arr = np.asarray(x)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional (one entry per test point), got shape {arr.shape}")
    if arr.dtype != bool and not np.isin(arr, (0, 1)).all():
        raise ValueError(f"{name} must hold per-example correctness (booleans or 0/1)")
    return arr.astype(bool)


def _seed_table(correct: Sequence) -> np.ndarray:
    """Per-seed correctness arrays as a k x n float table; they must cover the same test points."""
    rows = [_as_correct(c, f"seed {i}") for i, c in enumerate(correct)]
    if not rows:
        raise ValueError("no seeds to aggregate")
    lengths = {len(r) for r in rows}
    if len(lengths) != 1:
        raise ValueError(f"seeds must be evaluated on the same test points; got lengths {sorted(lengths)}")
    if lengths == {0}:
        raise ValueError("an accuracy on 0 test points has no interval")
    return np.stack(rows).astype(float)


def _crossed_half_width(table: np.ndarray, confidence: float) -> float:
    """Half-width of the crossed seeds x points interval (module docstring). scipy has no variance
    components for a crossed design, so the mean squares of the two-way table are computed here."""
    k, n = table.shape
    seed_means, point_means = table.mean(axis=1), table.mean(axis=0)
    residual = table - seed_means[:, None] - point_means[None, :] + table.mean()
    ms_residual = float((residual ** 2).sum()) / ((k - 1) * (n - 1)) if n > 1 else 0.0
    v_seed = float(seed_means.var(ddof=1)) / k
    v_points = max(k * float(point_means.var(ddof=1)) - ms_residual, 0.0) / (n * k) if n > 1 else 0.0
    q = 0.5 + confidence / 2
    t_points = stats.t.ppf(q, n - 1) if n > 1 else 0.0
    return math.sqrt(stats.t.ppf(q, k - 1) ** 2 * v_seed + t_points ** 2 * v_points)


def aggregate_seeds(correct: Sequence, confidence: float = CONFIDENCE) -> SeedEstimate:
    """Mean accuracy over training seeds with an interval holding both seed-to-seed and test-sample
    variation. `correct`: one per-example correctness array per seed, all on the same test points (the
    suite evaluates every seed on the first n test points). Estimator and its justification: module
    docstring. With one seed the interval is that seed's Wilson interval, and `method` says so."""
    confidence = _check_confidence(confidence)
    table = _seed_table(correct)
    k, n = table.shape
    accuracies = tuple(float(a) for a in table.mean(axis=1))
    mean = float(table.mean())
    n_correct = int(table.sum())
    if k == 1:
        low, high = accuracy_interval(n_correct, n, confidence)
        return SeedEstimate(mean, low, high, n, confidence, "wilson, 1 seed: no seed-to-seed spread",
                            accuracies)
    half = _crossed_half_width(table, confidence)
    pooled_low, pooled_high = accuracy_interval(n_correct, k * n, confidence)
    low = max(0.0, min(mean - half, pooled_low))
    high = min(1.0, max(mean + half, pooled_high))
    return SeedEstimate(mean, low, high, n, confidence, f"crossed: {k} seeds x {n} points", accuracies)


def _newcombe_paired(both: int, only_a: int, only_b: int, neither: int,
                     confidence: float) -> tuple[float, float]:
    """Newcombe's (1998) method 10 interval for the difference of paired proportions, with the phi
    correction as he defines it. scipy has no interval for paired proportions, hence written here."""
    n = both + only_a + only_b + neither
    p_a, p_b = (both + only_a) / n, (both + only_b) / n
    low_a, high_a = accuracy_interval(both + only_a, n, confidence)
    low_b, high_b = accuracy_interval(both + only_b, n, confidence)
    margins = (both + only_a) * (only_b + neither) * (both + only_b) * (only_a + neither)
    cross = both * neither - only_a * only_b
    if margins == 0 or 0 <= cross <= n / 2:
        phi = 0.0
    else:
        phi = (cross - n / 2 if cross > n / 2 else cross) / math.sqrt(margins)
    da, ua, db, ub = p_a - low_a, high_a - p_a, p_b - low_b, high_b - p_b
    diff = p_a - p_b
    low = diff - math.sqrt(max(da ** 2 - 2 * phi * da * ub + ub ** 2, 0.0))
    high = diff + math.sqrt(max(ua ** 2 - 2 * phi * ua * db + db ** 2, 0.0))
    return max(low, -1.0), min(high, 1.0)


def mcnemar_p(only_a: int, only_b: int) -> float:
    """Exact two-sided McNemar p-value from the discordant counts; 1 when there are none (no evidence
    either way, and scipy's binomial test is undefined on 0 trials)."""
    if only_a + only_b == 0:
        return 1.0
    return float(stats.binomtest(int(only_a), int(only_a + only_b), 0.5).pvalue)


def compare_paired(a, b, confidence: float = CONFIDENCE) -> PairedComparison:
    """Compare two per-example correctness arrays on the same test points.

    Model A vs model B: pass each model's correctness under one attack; "A more robust" means A keeps more
    points. Attack A vs attack B on one model (PGD vs AutoAttack, 20 vs 100 steps, 1 vs 10 restarts):
    pass the model's correctness under each attack; "A more robust" then means the model holds more points
    under attack A, i.e. attack B is the stronger one. The reading follows the exact McNemar test at level
    1 - confidence; the difference a - b comes with Newcombe's paired interval (module docstring)."""
    confidence = _check_confidence(confidence)
    a, b = _as_correct(a, "a"), _as_correct(b, "b")
    if len(a) != len(b):
        raise ValueError(f"paired arrays must cover the same test points; lengths {len(a)} and {len(b)}")
    if len(a) == 0:
        raise ValueError("no test points to compare")
    both, only_a = int((a & b).sum()), int((a & ~b).sum())
    only_b, neither = int((~a & b).sum()), int((~a & ~b).sum())
    n = len(a)
    low, high = _newcombe_paired(both, only_a, only_b, neither, confidence)
    difference = Estimate((only_a - only_b) / n, low, high, n, confidence, "newcombe-paired")
    p = mcnemar_p(only_a, only_b)
    if p >= 1 - confidence:
        reading = NO_DIFFERENCE
    else:
        reading = A_MORE_ROBUST if only_a > only_b else B_MORE_ROBUST
    return PairedComparison(n, both, only_a, only_b, difference, p, reading)


def _smallest_deciding(decides: Callable[[int], bool]) -> int | None:
    """Smallest n in [1, _MAX_POINTS] at which `decides(n)` holds, assuming it holds from some n on
    (doubling, then bisection); None if it never does in that range."""
    high = 1
    while not decides(high):
        if high >= _MAX_POINTS:
            return None
        high = min(2 * high, _MAX_POINTS)
    low = high // 2  # decides(low) is false (or low is 0)
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (low, mid) if decides(mid) else (mid, high)
    return high


def points_needed_for_precision(accuracy: float, half_width: float, confidence: float = CONFIDENCE,
                                method: str | Interval = Interval.WILSON) -> int:
    """About how many test points give an interval of at most `half_width` around `accuracy`, with the
    same interval method the suite reports. For a threshold check, pass half_width = |accuracy -
    threshold| to learn the n that would decide it if the accuracy stayed where it is."""
    if not 0 <= accuracy <= 1:
        raise ValueError(f"accuracy must lie in [0, 1], got {accuracy}")
    if half_width <= 0:
        raise ValueError(f"half_width must be positive, got {half_width}")

    def decides(n: int) -> bool:
        low, high = accuracy_interval(round(accuracy * n), n, confidence, method)
        return (high - low) / 2 <= half_width

    return _smallest_deciding(decides)


def points_needed_paired(only_a: int, only_b: int, n: int, confidence: float = CONFIDENCE) -> int | None:
    """About how many test points would make the exact McNemar test decide, if the discordance rates
    only_a / n and only_b / n stayed as observed; None when they are equal (no n decides a zero
    difference). Used to say 'undecided at n = 100, about N needed'."""
    if n <= 0 or only_a < 0 or only_b < 0 or only_a + only_b > n:
        raise ValueError(f"need 0 <= only_a + only_b <= n and n > 0; got {only_a}, {only_b}, {n}")
    if only_a == only_b:
        return None
    alpha = 1 - _check_confidence(confidence)

    def decides(m: int) -> bool:
        a, b = round(only_a * m / n), round(only_b * m / n)
        return mcnemar_p(a, b) < alpha

    return _smallest_deciding(decides)


def threshold_decision(estimate_low: float, estimate_high: float, threshold: float,
                       fails_above: bool) -> Decision:
    """Verdict of a check that compares an uncertain statistic with a threshold. With fails_above, values
    above the threshold are bad: FAIL when the whole interval lies above it, PASS when the whole interval
    lies at or below it, UNDECIDED otherwise (mirrored when not fails_above). A point estimate beyond the
    threshold is not enough to fail: at small n it is often noise."""
    if not (math.isfinite(estimate_low) and math.isfinite(estimate_high) and math.isfinite(threshold)):
        raise ValueError(f"interval and threshold must be finite, got [{estimate_low}, {estimate_high}], "
                         f"{threshold}")
    if estimate_low > estimate_high:
        raise ValueError(f"interval bounds reversed: [{estimate_low}, {estimate_high}]")
    bad_low, bad_high = (estimate_low, estimate_high) if fails_above else (-estimate_high, -estimate_low)
    limit = threshold if fails_above else -threshold
    if bad_low > limit:
        return Decision.FAIL
    if bad_high <= limit:
        return Decision.PASS
    return Decision.UNDECIDED
