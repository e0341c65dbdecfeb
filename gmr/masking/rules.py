"""The gradient-masking rules as data, the checks built from them, and the verdict.

Each rule (`Rule`) names a check: its threshold and direction, its role in the verdict, its source, a
label for the one-line explanation, where its value is taken from (the probe summary, the evaluation
record, the training log), the sample its value rests on (for its interval) and, where it has one, when
it applies. `build_checks` loops over the registered rules; `register_rule` adds one (a new probe's
headline number becomes a check with one rule).

Checks, thresholds, the sample behind each value and sources (the value is *bad* on the named side of the
threshold; how a check is decided from its interval: "Uncertainty" below):

| check | bad when | interval of the value (n) | role | source of the check (and of the threshold) |
|---|---|---|---|---|
| fgsm_pgd_accuracy_gap | acc(FGSM) - acc(PGD) > 0.2 | paired, FGSM vs PGD correctness per point (audit points) | symptom | Tramer et al. 2018 (single-step AT is strong against FGSM only); 0.2 = the accuracy drop Wong et al. 2020 use to detect catastrophic overfitting |
| zero_gradient_fraction | fraction of points with an all-zero input gradient > 0.01 | Wilson (audit points) | decisive | Athalye et al. 2018 (shattered/vanishing gradients); a smooth model has none |
| fgsm_above_clean | acc(FGSM) - acc(clean) > 0 (the attack helps: label leaking) | paired, exact McNemar test (audit points) | symptom | Kurakin et al. 2017; Tramer et al. 2018 |
| gradient_alignment_fgsm_robust | E cos(grad(x), grad(x + eta)), eta ~ U(-eps, eps), over the points FGSM does not break, < 0.3 | t over the per-point cosines (FGSM-robust points) | mechanism | Andriushchenko & Flammarion 2020 (GradAlign: alignment collapses at catastrophic overfitting) |
| sign_agreement_fgsm_robust | mean fraction of coordinates where sign(grad(x)) = sign(grad(x + eta)), same points, < 0.6 | t over the per-point fractions (FGSM-robust points) | mechanism | sign version of the GradAlign probe (FGSM uses only the sign); 0.5 is chance |
| fgsm_loss_nonmonotone | fraction of points whose CE loss along x + t sign(grad x), t in [0, 2 eps], falls by more than 5% of its range (+0.01 nats) before the point is first misclassified > 0.1 | Wilson (audit points) | mechanism | Tramer et al. 2018, Kim et al. 2021 (the loss of a masked model peaks close to x along the gradient direction) |
| boundary_distortion | fraction of points misclassified at some t < eps along the FGSM direction but correct at t = eps > 0.05 | Wilson (audit points) | mechanism | Kim, Lee & Lee 2021 (AAAI), decision-boundary distortion |
| accuracy_at_large_eps | PGD accuracy at the largest eps of the sweep (1.0 by default) > 0.05 | Wilson (curve points) | decisive | Carlini et al. 2019 and Athalye et al. 2018 (an unbounded attack must reach 100% success) |
| accuracy_vs_eps_increase | largest rise of PGD accuracy between consecutive eps of the sweep > 0.03 | paired, each consecutive pair of eps (curve points) | symptom | Carlini et al. 2019 (a larger budget must not make the attack weaker) |
| transfer_beats_whitebox | acc(white-box PGD) - acc(PGD transferred from --transfer-from) > 0.02 | paired, white-box vs transfer correctness per point (audit points) | decisive | Athalye et al. 2018; Carlini et al. 2019 (black-box stronger than white-box is a red flag) |
| autoattack_square_gain | robust accuracy that AutoAttack's black-box Square removes after its white-box attacks (from --eval) > 0.02 | Wilson on the count Square broke (AutoAttack points) | decisive | Croce & Hein 2020; Carlini et al. 2019 (black-box stronger than white-box); tolerance as transfer_beats_whitebox |
| autoattack_flags | AutoAttack raised any flag (from --eval) | none (a count of warnings) | symptom | Croce & Hein 2020 (AutoAttack's checks, flags_doc.md: they "might indicate" an unreliable evaluation) |
| pgd_autoattack_gap | acc(PGD) - acc(AutoAttack) in the evaluation JSON > 0.1 | paired, from the evaluation's .npz (evaluation points) | symptom | Croce & Hein 2020 (drops of > 10 points expose a broken evaluation) |
| catastrophic_overfitting | val PGD accuracy fell below its earlier best by more than min(0.2, half that best) while val FGSM stayed within 0.1 of its value there, at or before the audited checkpoint | none (a rule on the training log) | symptom | Wong, Rice & Kolter 2020 (early stopping when PGD accuracy drops by 0.2); Kim et al. 2021 (PGD accuracy falls to 0 while FGSM accuracy rises) |
| pgd_steps_plateau | acc(PGD, most steps) < acc(PGD, previous step count) - 0.02 | paired, the two step counts (curve points) | reliability | Carlini et al. 2019 (accuracy vs iterations must plateau) |
| pgd_restarts_plateau | acc(R restarts) < acc(R/2 restarts) - 0.02 | paired, R/2 vs R restarts (curve points) | reliability | Carlini et al. 2019; Mosbach et al. 2018 (restarts) |
| gradient_alignment, gradient_sign_agreement (all points), fgsm_rfgsm_logit_distance, fgsm_pgd_loss_ratio, fgsm_pgd_perturbation_cosine, clean/FGSM/PGD accuracy | never (measurements; accuracies get a Wilson and the per-point means a t interval) | | info | Andriushchenko & Flammarion 2020 (alignment, FGSM-PGD cosine); Vivek et al. 2019 (the GMR penalty) |

Uncertainty (DESIGN.md section 9). A check's value is a sample statistic; at the audit's confidence
(`ProbeSettings.confidence`, 95% by default) it gets an interval, and the check *fails* only when the
whole interval lies on the bad side of the threshold, *passes* when the whole interval lies on the good
side (a bound equal to the threshold counts as good), and is *undecided* otherwise
(`gmr.stats.threshold_decision`). A point estimate beyond a threshold is not enough: at small n it is
often noise (2 of 100 points flipping between step counts is not a plateau failure). The intervals:
- a fraction of points (zero gradient, non-monotone loss, distortion, accuracy at large eps, the points
  Square broke): the Wilson interval of the count (`gmr.stats.accuracy_interval`);
- a mean of per-point values (alignment and sign agreement over the FGSM-robust points): the t-interval
  over the points (`mean_interval`, on scipy.stats.t);
- two attacks, or two settings of one attack, on the same points (FGSM vs PGD, clean vs FGSM, white-box
  vs transfer, PGD vs AutoAttack, step counts, restarts, consecutive eps): the paired comparison of
  the per-point correctness (`gmr.stats.compare_paired`), which only the discordant points inform. With a
  threshold of 0 (fgsm_above_clean) the exact McNemar test decides (fail: the attack detectably helps;
  pass: it detectably hurts); with a tolerance the paired interval of the difference (Newcombe) is
  compared with it. accuracy_vs_eps_increase fails when one consecutive rise fails and passes when all
  pass (each rise at the same confidence, not corrected for the several rises).
An undecided check names `n_needed`: about how many points (of the kind its `n` counts: `n_of`) would
decide it if the observed rates stayed as they are, searched up to MAX_POINTS_NEEDED (null beyond, or
when no number of points decides it, as for a value exactly on the threshold). AutoAttack's per-attack
results are robust accuracies only (its .npz holds the per-point outcome of the whole cascade), so the
Square check uses the Wilson interval of the count Square broke out of the AutoAttack points. This
replaces the earlier rule that a single broken point counted as a symptom only: one of 10 points
(0.1, above 0.02) has the Wilson interval [0.018, 0.40], which is undecided, and the verdict says how
many points would decide it instead of trusting or dismissing one example. Checks without a sample
(AutoAttack's flags, catastrophic overfitting) and checks whose per-point data are missing (a folder or
an evaluation written without them; the explanation says so) compare the value itself with the
threshold.

Why the gradient checks look only at the points FGSM does not break, and the line check only before the
first misclassification: masking means the gradient misleads the attack where the model *looks*
robust. A LeNet+ after one short epoch (1000 MNIST images, near chance) had alignment 0.29 over all points
and a loss that wiggles beyond the decision boundary, yet FGSM breaks it: its gradients are not
misleading. With fewer than 10 (or 5% of the) points resisting FGSM the two restricted checks are not
applicable (passed = null).

Roles: a *decisive* check is one of the red flags of Carlini et al. 2019 (each alone discredits a
gradient-based evaluation); a *symptom* is an attack outcome typical of masking that an honestly
non-linear loss can also produce; a *mechanism* check shows the gradient, or the loss along it, to be
misleading; a *reliability* check says whether the attack converged.

Verdict (a decision of this suite): `yes` when a decisive check fails, or a mechanism check fails
together with at least one more mechanism or symptom check; `inconclusive` when one mechanism check
fails alone, or a reliability check fails (the attack did not converge, so a "no" cannot be trusted);
`no` otherwise. Symptoms that no mechanism check corroborates do not convict (they are listed in the
reasons): each says that a stronger attack finds more than a weaker one, which a loss that is
non-linear over the eps-ball produces without any masking. Seen on real MNIST runs: GMR after 3
epochs had an FGSM-PGD gap of 0.25 and AutoAttack 0.14 below PGD-100 (APGD-T finds more), while its
gradient was informative everywhere (alignment 0.81 where FGSM fails, monotone loss along the FGSM
direction, no boundary distortion, PGD plateaued, eps = 1 breaks every point). AutoAttack's flags are
symptoms (its documentation says they "might indicate" an unreliable evaluation); the one flag that is a
red flag of Carlini et al. 2019, Square beating the white-box attacks, is decisive beyond the same 0.02
tolerance as the transfer check. Info checks never enter the verdict.
Undecided checks: the rule above is applied to the decided failures with every undecided check passing
and with every undecided check failing. The rule only ever moves towards masking as checks fail
(no, then inconclusive, then yes), so when the two agree no undecided check can change the verdict and
it stands (the undecided checks are listed); when they differ the verdict is `inconclusive`, with one
reason "not enough points (n = ..., about N needed)" for each undecided check that changes it when it
alone is decided (the others all passing, or all failing), and `verdict.undecided` names them.

The 0.3 / 0.6 / 0.1 / 0.05 thresholds of the gradient and line checks are this suite's choices: the
papers show the quantities collapse at masking but publish no cut-off; they separate a linear model,
normally and adversarially trained models from masked ones in tests/test_masking.py.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from functools import cached_property
from typing import Callable, Mapping, Sequence

import numpy as np
from scipy import stats as scistats

from ..runs import catastrophic_overfitting_epoch
from ..stats import (A_MORE_ROBUST, CONFIDENCE, NO_DIFFERENCE, Decision, PairedComparison, accuracy_interval,
                     compare_paired, threshold_decision)

ROLES = ("decisive", "mechanism", "symptom", "reliability")
SOURCES = ("summary", "eval", "train_log")
# the gradient checks restricted to the points FGSM does not break need this many of them
MIN_FGSM_ROBUST, MIN_FGSM_ROBUST_FRACTION = 10, 0.05
# n_needed is searched up to here: beyond every test set the suite knows (MNIST, CIFAR-10: 10,000)
MAX_POINTS_NEEDED = 10**6


# --------------------------------------------------------------------------------------------------
# What the rules read

@dataclass
class Evidence:
    """Everything a rule may read: the probe summary and tables, the training log, an evaluation record
    with its per-example arrays (keyed as its `per_example` entries), and the confidence level."""
    summary: dict
    train_rows: Sequence[dict] = ()
    eval_record: dict | None = None
    checkpoint_epoch: int | None = None
    tables: Mapping[str, Sequence[dict]] = field(default_factory=dict)
    eval_correct: Mapping[str, np.ndarray] = field(default_factory=dict)
    confidence: float = CONFIDENCE

    @cached_property
    def autoattack(self) -> dict | None:
        return autoattack_summary(self.eval_record)


@dataclass(frozen=True)
class Reading:
    """A rule's value, and a note for its explanation."""
    value: float | None
    note: str | None = ""


def autoattack_summary(record: dict | None) -> dict | None:
    """The AutoAttack part of an evaluation record: accuracy, per-attack breakdown and flags, or None
    when AutoAttack did not run."""
    if not record:
        return None
    aa = record.get("attacks", {}).get("autoattack")
    if not isinstance(aa, dict) or "accuracy" not in aa:
        return None
    return {"accuracy": float(aa["accuracy"]), "per_attack": dict(aa.get("per_attack") or {}),
            "flags": [str(f) for f in aa.get("flags") or []], "n_examples": aa.get("n_examples")}


def aa_accuracy(v) -> float | None:
    """A per-attack entry of AutoAttack's breakdown (a number or a mapping with `accuracy`)."""
    if isinstance(v, dict):
        v = v.get("accuracy")
    return float(v) if v is not None else None


def square_gain(per_attack: dict) -> float | None:
    """Robust accuracy removed by Square (black-box) after the attacks before it in AutoAttack's cascade
    (`per_attack` holds the robust accuracy after each attack, in order); None without Square."""
    names = list(per_attack)
    if "square" not in names or names.index("square") == 0:
        return None
    before = aa_accuracy(per_attack[names[names.index("square") - 1]])
    after = aa_accuracy(per_attack["square"])
    return None if before is None or after is None else before - after


# --------------------------------------------------------------------------------------------------
# Samples: what a check's value rests on, its interval and the points that would decide it

@dataclass(frozen=True)
class Judgement:
    """How sure a check is: its decision (None for a measurement), the interval of its statistic at
    `confidence`, the points it rests on (`n` of `n_of`), about how many would decide it (undecided
    only) and how the interval was made."""
    decision: Decision | None
    low: float
    high: float
    n: int
    n_of: str
    n_needed: int | None
    how: str
    confidence: float

    def text(self) -> str:
        """'95% interval [0, 0.16], n = 20 audit points, Wilson, 0 of 20; about 381 needed'."""
        text = (f"{self.confidence * 100:g}% interval [{_fmt(self.low)}, {_fmt(self.high)}], "
                f"n = {self.n} {self.n_of}, {self.how}")
        if self.decision is Decision.UNDECIDED:
            text += (f"; about {self.n_needed:,} needed" if self.n_needed is not None else
                     f"; no number of points up to {MAX_POINTS_NEEDED:,} decides it at the observed rates")
        return text


def _points_needed(decides: Callable[[int], bool], n: int) -> int | None:
    """Smallest m > n with `decides(m)` (doubling from n, then bisection), assuming that once decided
    it stays decided; None when no m up to MAX_POINTS_NEEDED decides."""
    low, high = n, min(max(2 * n, n + 1), MAX_POINTS_NEEDED)
    while not decides(high):
        if high >= MAX_POINTS_NEEDED:
            return None
        low, high = high, min(2 * high, MAX_POINTS_NEEDED)
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (low, mid) if decides(mid) else (mid, high)
    return high


def _judge_interval(interval_at: Callable[[int], tuple[float, float]], n: int, n_of: str, how: str,
                    threshold: float | None, fails_above: bool, confidence: float) -> Judgement:
    """Judgement of a statistic whose interval on m points at the observed rates is `interval_at(m)`
    (on its own n: the observed interval)."""
    low, high = interval_at(n)
    decision = needed = None
    if threshold is not None:
        decision = threshold_decision(low, high, threshold, fails_above)
        if decision is Decision.UNDECIDED:
            needed = _points_needed(lambda m: threshold_decision(*interval_at(m), threshold, fails_above)
                                    is not Decision.UNDECIDED, n)
    return Judgement(decision, low, high, n, n_of, needed, how, confidence)


@dataclass(frozen=True)
class Proportion:
    """`count` of `n` points: the Wilson interval of a binomial proportion."""
    count: int
    n: int
    n_of: str = "audit points"

    def judge(self, threshold: float | None, fails_above: bool, confidence: float) -> Judgement:
        return _judge_interval(lambda m: accuracy_interval(round(self.count * m / self.n), m, confidence),
                               self.n, self.n_of, f"Wilson, {self.count} of {self.n}", threshold, fails_above,
                               confidence)


def mean_interval(values: np.ndarray, confidence: float, n: int | None = None) -> tuple[float, float]:
    """t-interval of the mean of per-point values (scipy.stats.t); with `n`, the interval the same mean
    and standard deviation would have on n points. Zero spread gives a zero-width interval."""
    values = np.asarray(values, dtype=float)
    n = len(values) if n is None else n
    mean, sd = float(values.mean()), float(values.std(ddof=1))
    if sd == 0:
        return mean, mean
    half = float(scistats.t.ppf(0.5 + confidence / 2, n - 1)) * sd / math.sqrt(n)
    return mean - half, mean + half


@dataclass(frozen=True, eq=False)
class Mean:
    """Per-point values (at least 2): the t-interval of their mean."""
    values: np.ndarray
    n_of: str = "audit points"

    def judge(self, threshold: float | None, fails_above: bool, confidence: float) -> Judgement:
        n = len(self.values)
        how = f"t over {n} values, sd {_fmt(float(np.std(self.values, ddof=1)))}"
        return _judge_interval(lambda m: mean_interval(self.values, confidence, m), n, self.n_of, how,
                               threshold, fails_above, confidence)


def _scaled_pair(c: PairedComparison, m: int) -> tuple[np.ndarray, np.ndarray]:
    """Two correctness arrays on m points with the concordance and discordance rates of `c`."""
    counts = [round(k * m / c.n) for k in (c.both, c.only_a, c.only_b)]
    counts.append(max(m - sum(counts), 0))
    return (np.repeat([True, True, False, False], counts), np.repeat([True, False, True, False], counts))


@dataclass(frozen=True, eq=False)
class Paired:
    """Per-point correctness under two attacks (a, b) on the same points; the statistic is acc(a) -
    acc(b), or the largest of several such differences (`pairs`, e.g. consecutive eps). Interval: the
    paired difference (gmr.stats.compare_paired); at a threshold of 0 the exact McNemar test decides."""
    pairs: tuple[tuple[np.ndarray, np.ndarray], ...]
    n_of: str = "audit points"

    def judge(self, threshold: float | None, fails_above: bool, confidence: float) -> Judgement:
        judged = [self._judge_pair(a, b, threshold, fails_above, confidence) for a, b in self.pairs]
        severity = {Decision.FAIL: 2, Decision.UNDECIDED: 1, Decision.PASS: 0, None: 0}
        worst = max(judged, key=lambda j: (severity[j.decision], j.high))
        if len(judged) == 1:
            return worst
        how = f"largest of {len(judged)} differences: {worst.how}"
        open_needs = [j.n_needed for j in judged if j.decision is Decision.UNDECIDED]
        needed = None if worst.decision is not Decision.UNDECIDED or None in open_needs else max(open_needs)
        return Judgement(worst.decision, worst.low, worst.high, worst.n, worst.n_of, needed, how, confidence)

    def _judge_pair(self, a: np.ndarray, b: np.ndarray, threshold: float | None, fails_above: bool,
                    confidence: float) -> Judgement:
        c = compare_paired(a, b, confidence)
        how = f"paired, {c.only_a} vs {c.only_b} discordant, McNemar p = {c.p_value:.2g}"
        if threshold != 0:  # a tolerance (or none): the paired interval of the difference decides
            return _judge_interval(lambda m: _paired_interval(c, m, confidence), c.n, self.n_of, how,
                                   threshold, fails_above, confidence)
        if c.reading == NO_DIFFERENCE:
            decision, needed = Decision.UNDECIDED, c.points_needed()
        else:
            decision = Decision.FAIL if (c.reading == A_MORE_ROBUST) == fails_above else Decision.PASS
            needed = None
        return Judgement(decision, c.difference.low, c.difference.high, c.n, self.n_of, needed, how, confidence)


def _paired_interval(c: PairedComparison, m: int, confidence: float) -> tuple[float, float]:
    """The paired interval of the difference on m points at the rates of `c` (c's own on c.n)."""
    d = compare_paired(*_scaled_pair(c, m), confidence).difference
    return d.low, d.high


Sample = Proportion | Mean | Paired


# --------------------------------------------------------------------------------------------------
# Where the samples come from: the probe tables and the evaluation's per-example arrays

def _column(ev: Evidence, table: str, key: str) -> np.ndarray | None:
    """A column of a probe table as floats (0/1 for correctness, NaN where empty); None when absent
    (a folder written before the column existed)."""
    rows = ev.tables.get(table)
    if not rows or key not in rows[0]:
        return None
    return np.array([float(r[key]) for r in rows], dtype=float)


def _count(key: str) -> Callable[[Evidence], Sample | None]:
    """The points of per_example.csv flagged in the 0/1 column `key`."""
    def sample(ev: Evidence) -> Sample | None:
        flags = _column(ev, "per_example", key)
        return None if flags is None or not len(flags) else Proportion(int((flags == 1).sum()), len(flags))
    return sample


def _mean(key: str, fgsm_robust: bool, chance: float | None = None) -> Callable[[Evidence], Sample | None]:
    """The per-point values of per_example.csv's `key` (over the points FGSM does not break when
    `fgsm_robust`); empty values count as `chance` (sign agreement of all-zero gradients) or are left out."""
    def sample(ev: Evidence) -> Sample | None:
        values, fgsm = _column(ev, "per_example", key), _column(ev, "per_example", "fgsm_correct")
        if values is None or fgsm is None:
            return None
        if fgsm_robust:
            values = values[fgsm == 1]
        values = values[~np.isnan(values)] if chance is None else np.where(np.isnan(values), chance, values)
        return Mean(values, "FGSM-robust points" if fgsm_robust else "audit points") if len(values) > 1 else None
    return sample


def _pair(key_a: str, key_b: str) -> Callable[[Evidence], Sample | None]:
    """Correctness columns `key_a` and `key_b` of per_example.csv, paired point by point."""
    def sample(ev: Evidence) -> Sample | None:
        a, b = _column(ev, "per_example", key_a), _column(ev, "per_example", key_b)
        return None if a is None or b is None or not len(a) else Paired(((a == 1, b == 1),))
    return sample


def _curve(ev: Evidence, name: str) -> dict[float, np.ndarray]:
    """Per x of curve `name` in curve_points.csv (eps, steps or restarts): correctness of each point,
    in point order; {} without the table."""
    by_x: dict[float, dict[int, bool]] = {}
    for r in ev.tables.get("curve_points") or ():
        if r["curve"] == name:
            by_x.setdefault(float(r["x"]), {})[int(r["index"])] = float(r["correct"]) == 1
    return {x: np.array([v[i] for i in sorted(v)]) for x, v in sorted(by_x.items())}


def _eps_rises(ev: Evidence) -> Sample | None:
    curve = list(_curve(ev, "eps").values())
    pairs = tuple((hi, lo) for lo, hi in zip(curve, curve[1:]))
    return Paired(pairs, "curve points") if pairs else None


def _steps_pair(ev: Evidence) -> Sample | None:
    curve = list(_curve(ev, "steps").values())
    return Paired(((curve[-2], curve[-1]),), "curve points") if len(curve) > 1 else None


def _restarts_pair(ev: Evidence) -> Sample | None:
    curve = list(_curve(ev, "restarts").values())
    half = curve[max(len(curve) // 2, 1) - 1] if curve else None
    return Paired(((half, curve[-1]),), "curve points") if len(curve) > 1 else None


def _large_eps_count(ev: Evidence) -> Sample | None:
    rows = sorted(ev.tables.get("accuracy_vs_eps") or (), key=lambda r: float(r["eps"]))
    if not rows:
        return None
    n = int(rows[-1]["n"])
    return Proportion(round(float(rows[-1]["accuracy"]) * n), n, "curve points")


def _aa_pgd_pair(ev: Evidence) -> Sample | None:
    """PGD vs AutoAttack per point, from the evaluation's .npz (both on the first n test points)."""
    attacks = (ev.eval_record or {}).get("attacks", {})
    keys = [(attacks.get(name) or {}).get("per_example") for name in ("pgd", "autoattack")]
    if any(k not in ev.eval_correct for k in keys):
        return None
    a, b = (np.asarray(ev.eval_correct[k], dtype=bool) for k in keys)
    m = min(len(a), len(b))
    return Paired(((a[:m], b[:m]),), "evaluation points") if m else None


def _aa_square_count(ev: Evidence) -> Sample | None:
    """The points Square broke after the white-box attacks, out of the AutoAttack points: a count, as
    the .npz holds the outcome of the whole cascade only."""
    aa = ev.autoattack
    gain = None if aa is None else square_gain(aa["per_attack"])
    n = None if aa is None else aa["n_examples"] or (ev.eval_record or {}).get("n_examples")
    if gain is None or not n:
        return None
    return Proportion(min(max(round(gain * n), 0), int(n)), int(n), "AutoAttack points")


def _accuracy(attack: str) -> Callable[[Evidence], Sample | None]:
    return _count(f"{attack}_correct")


# --------------------------------------------------------------------------------------------------
# Rules

@dataclass(frozen=True)
class Rule:
    """One check. `read(evidence)` returns its Reading, or None when the check does not arise (its
    source is missing: no transfer run, no AutoAttack, no training log); by default the summary value
    of the rule's name, when the summary has it. `sample(evidence)` returns the sample its value rests
    on (Proportion, Mean or Paired: the check's interval), or None when the per-point data are missing.
    `applicable(evidence)` returns why the check does not apply (passed = null), or None."""
    name: str
    threshold: float | None
    direction: str               # "above": bad when value > threshold; "below": bad when value < threshold
    role: str                    # decisive | mechanism | symptom | reliability | info
    source: str
    label: str                   # what the value is, for the one-line explanation
    taken_from: str = "summary"  # summary | eval | train_log
    read: Callable[[Evidence], Reading | None] | None = None
    applicable: Callable[[Evidence], str | None] | None = None
    sample: Callable[[Evidence], Sample | None] | None = None

    @property
    def fails_above(self) -> bool:
        return self.direction == "above"

    def reading(self, ev: Evidence) -> Reading | None:
        if self.read is not None:
            return self.read(ev)
        return Reading(ev.summary[self.name]) if self.name in ev.summary else None

    def check(self, ev: Evidence) -> dict | None:
        """The check of this rule on `ev`, or None when it does not arise."""
        reading = self.reading(ev)
        if reading is None:
            return None
        why_not = self.applicable(ev) if self.applicable is not None else None
        if why_not:
            check = make_check(self.name, reading.value)
            check.update(passed=None, decision=None, explanation=f"{self.label}: not applicable, {why_not}")
            return check
        sample = self.sample(ev) if self.sample is not None else None
        judgement = sample.judge(self.threshold, self.fails_above, ev.confidence) if sample is not None else None
        note = reading.note
        if self.sample is not None and sample is None and self.threshold is not None:
            note = "; ".join(filter(None, [note, "no per-point data: compared without its uncertainty"]))
        return make_check(self.name, reading.value, note, judgement)


RULES: dict[str, Rule] = {}


def register_rule(rule: Rule) -> Rule:
    """Add a rule (its check is built after those registered before it); a name registered again
    replaces the old rule in place."""
    if not re.fullmatch(r"[a-z0-9_]+", rule.name):
        raise ValueError(f"rule name {rule.name!r} must be lower-case letters, digits and _")
    if rule.role not in ROLES + ("info",):
        raise ValueError(f"rule {rule.name}: role must be one of {', '.join(ROLES + ('info',))}, got {rule.role!r}")
    if rule.direction not in ("above", "below"):
        raise ValueError(f"rule {rule.name}: direction must be above or below, got {rule.direction!r}")
    if rule.taken_from not in SOURCES:
        raise ValueError(f"rule {rule.name}: taken_from must be one of {', '.join(SOURCES)}")
    if rule.taken_from != "summary" and rule.read is None:
        raise ValueError(f"rule {rule.name}: a value from the {rule.taken_from} needs a read function")
    RULES[rule.name] = rule
    return rule


def _fgsm_robust_read(name: str) -> Callable[[Evidence], Reading]:
    def read(ev: Evidence) -> Reading:
        n_robust = ev.summary.get("fgsm_robust_points")
        return Reading(ev.summary.get(name), None if n_robust is None else f"{n_robust} points resist FGSM")
    return read


def _fgsm_robust_applicable(ev: Evidence) -> str | None:
    n_robust, n_total = ev.summary.get("fgsm_robust_points"), ev.summary.get("n_examples")
    if n_robust is None or n_robust >= max(MIN_FGSM_ROBUST, MIN_FGSM_ROBUST_FRACTION * (n_total or 0)):
        return None
    return (f"only {n_robust} of {n_total} points resist FGSM (its gradient is not misleading where FGSM "
            "succeeds)")


def _with_note(name: str, note: Callable[[dict], str]) -> Callable[[Evidence], Reading | None]:
    def read(ev: Evidence) -> Reading | None:
        return Reading(ev.summary[name], note(ev.summary)) if name in ev.summary else None
    return read


def _aa_flags(ev: Evidence) -> Reading | None:
    if ev.autoattack is None:
        return None
    flags = ev.autoattack["flags"]
    return Reading(float(len(flags)), "; ".join(flags)[:200] if flags else "no flags")


def _aa_square(ev: Evidence) -> Reading | None:
    gain = None if ev.autoattack is None else square_gain(ev.autoattack["per_attack"])
    return None if gain is None else Reading(gain)


def _aa_pgd_gap(ev: Evidence) -> Reading | None:
    if ev.autoattack is None:
        return None
    pgd = (ev.eval_record.get("attacks", {}).get("pgd") or {}).get("accuracy")
    if pgd is None:
        return None
    aa = ev.autoattack["accuracy"]
    return Reading(float(pgd) - aa, f"PGD {float(pgd):.3f}, AutoAttack {aa:.3f}")


def _co_read(ev: Evidence) -> Reading | None:
    if not ev.train_rows:
        return None
    co = catastrophic_overfitting_epoch(ev.train_rows)
    cp = ev.checkpoint_epoch
    relevant = co is not None and (cp is None or co <= cp)
    note = ("no catastrophic overfitting in train_log.csv" if co is None else
            f"catastrophic overfitting at epoch {co}"
            + ("" if relevant else f", after the audited checkpoint (epoch {cp})"))
    return Reading(float(co) if relevant else 0.0, note)


# In the order of the checks in audit.json and checks.csv.
for _rule in (
    Rule("clean_accuracy", None, "above", "info", "-", "clean accuracy", sample=_accuracy("clean")),
    Rule("fgsm_accuracy", None, "above", "info", "Goodfellow et al. 2015", "FGSM accuracy",
         sample=_accuracy("fgsm")),
    Rule("pgd_accuracy", None, "above", "info", "Madry et al. 2018", "PGD accuracy", sample=_accuracy("pgd")),
    Rule("fgsm_pgd_accuracy_gap", 0.2, "above", "symptom",
         "Tramer et al. 2018 (ICLR); threshold: the 0.2 accuracy drop of Wong et al. 2020 (ICLR)",
         "FGSM accuracy minus PGD accuracy", sample=_pair("fgsm_correct", "pgd_correct")),
    Rule("fgsm_above_clean", 0.0, "above", "symptom",
         "Kurakin, Goodfellow & Bengio 2017 (ICLR, label leaking); Tramer et al. 2018 (ICLR)",
         "FGSM accuracy minus clean accuracy", sample=_pair("fgsm_correct", "clean_correct")),
    Rule("fgsm_pgd_loss_ratio", None, "above", "info", "Tramer et al. 2018 (ICLR)", "mean PGD loss / mean FGSM loss"),
    Rule("zero_gradient_fraction", 0.01, "above", "decisive", "Athalye, Carlini & Wagner 2018 (ICML)",
         "fraction of points with an all-zero input gradient", sample=_count("grad_zero")),
    Rule("gradient_alignment", None, "below", "info", "Andriushchenko & Flammarion 2020 (NeurIPS, GradAlign)",
         "E cos(grad(x), grad(x + eta)) over all points", sample=_mean("grad_alignment", False)),
    Rule("gradient_sign_agreement", None, "below", "info", "sign form of the GradAlign probe",
         "mean fraction of coordinates whose gradient sign survives a random step, all points",
         sample=_mean("sign_agreement", False, chance=0.5)),
    Rule("gradient_alignment_fgsm_robust", 0.3, "below", "mechanism",
         "Andriushchenko & Flammarion 2020 (NeurIPS, GradAlign); restriction and threshold: this suite",
         "E cos(grad(x), grad(x + eta)) over the points FGSM does not break",
         read=_fgsm_robust_read("gradient_alignment_fgsm_robust"), applicable=_fgsm_robust_applicable,
         sample=_mean("grad_alignment_fgsm_robust", True)),
    Rule("sign_agreement_fgsm_robust", 0.6, "below", "mechanism",
         "sign form of the GradAlign probe; threshold: this suite (chance = 0.5)",
         "mean fraction of coordinates whose gradient sign survives a random step, points FGSM does not break",
         read=_fgsm_robust_read("sign_agreement_fgsm_robust"), applicable=_fgsm_robust_applicable,
         sample=_mean("sign_agreement", True, chance=0.5)),
    Rule("fgsm_pgd_perturbation_cosine", None, "above", "info", "Andriushchenko & Flammarion 2020 (NeurIPS)",
         "mean cosine between FGSM and PGD perturbations", sample=_mean("fgsm_pgd_cosine", False)),
    Rule("fgsm_rfgsm_logit_distance", None, "above", "info", "Vivek, Baburaj & Babu 2019 (CVPRW; the GMR penalty)",
         "mean ||z(x_fgsm) - z(x_rfgsm)||^2"),
    Rule("fgsm_loss_nonmonotone", 0.1, "above", "mechanism",
         "Tramer et al. 2018 (ICLR); Kim, Lee & Lee 2021 (AAAI); threshold: this suite",
         "fraction of points whose loss along the FGSM direction (0 to 2 eps) falls before they are misclassified",
         sample=_count("line_nonmonotone")),
    Rule("boundary_distortion", 0.05, "above", "mechanism", "Kim, Lee & Lee 2021 (AAAI); threshold: this suite",
         "fraction of points wrong at some eps' < eps but right at eps along the FGSM direction",
         sample=_count("distorted")),
    Rule("accuracy_at_large_eps", 0.05, "above", "decisive", "Carlini et al. 2019 (On Evaluating Adversarial "
         "Robustness); Athalye, Carlini & Wagner 2018 (ICML)", "PGD accuracy at the largest eps",
         read=_with_note("accuracy_at_large_eps", lambda s: f"eps = {s['largest_eps']:.3g}"),
         sample=_large_eps_count),
    Rule("accuracy_vs_eps_increase", 0.03, "above", "symptom",
         "Carlini et al. 2019 (On Evaluating Adversarial Robustness)",
         "largest rise of PGD accuracy between consecutive eps", sample=_eps_rises),
    Rule("transfer_beats_whitebox", 0.02, "above", "decisive",
         "Athalye, Carlini & Wagner 2018 (ICML); Carlini et al. 2019",
         "white-box PGD accuracy minus transferred PGD accuracy",
         read=_with_note("transfer_beats_whitebox", lambda s: f"transfer accuracy {s['transfer_accuracy']:.3f}"),
         sample=_pair("pgd_correct", "transfer_correct")),
    Rule("autoattack_flags", 0, "above", "symptom", "Croce & Hein 2020 (ICML; AutoAttack flags_doc.md)",
         "number of AutoAttack flags", taken_from="eval", read=_aa_flags),
    Rule("autoattack_square_gain", 0.02, "above", "decisive",
         "Croce & Hein 2020 (ICML); Carlini et al. 2019 (black-box stronger than white-box); tolerance as "
         "transfer_beats_whitebox", "robust accuracy removed by Square after the white-box attacks of AutoAttack",
         taken_from="eval", read=_aa_square, sample=_aa_square_count),
    Rule("pgd_autoattack_gap", 0.1, "above", "symptom", "Croce & Hein 2020 (ICML)",
         "PGD accuracy minus AutoAttack accuracy", taken_from="eval", read=_aa_pgd_gap, sample=_aa_pgd_pair),
    Rule("catastrophic_overfitting", 0, "above", "symptom",
         "Wong, Rice & Kolter 2020 (ICLR; early stop at a 0.2 PGD accuracy drop); Kim, Lee & Lee 2021 (AAAI)",
         "epoch of catastrophic overfitting at or before the audited checkpoint (0: none)",
         taken_from="train_log", read=_co_read),
    Rule("pgd_steps_plateau", 0.02, "above", "reliability",
         "Carlini et al. 2019 (accuracy vs iterations must plateau)",
         "accuracy drop between the two largest PGD step counts", sample=_steps_pair),
    Rule("pgd_restarts_plateau", 0.02, "above", "reliability", "Carlini et al. 2019; Mosbach et al. 2018",
         "accuracy drop between R/2 and R restarts", sample=_restarts_pair),
):
    register_rule(_rule)


# --------------------------------------------------------------------------------------------------
# Checks and verdict

_SIGN = {(True, Decision.FAIL): ">", (True, Decision.PASS): "<=", (False, Decision.FAIL): "<",
         (False, Decision.PASS): ">="}


def _point_decision(rule: Rule, value: float) -> Decision:
    """The value itself against the threshold (no sample). A value equal to the threshold passes; 1e-6
    absorbs float error (accuracies are float32 means: 0.44 - 0.42 = 0.02000001) and is far below one
    example's weight (1/n, n <= 1e5)."""
    bad = (value > rule.threshold + 1e-6) if rule.fails_above else (value < rule.threshold - 1e-6)
    return Decision.FAIL if bad else Decision.PASS


def make_check(name: str, value: float | None, note: str | None = "", judgement: Judgement | None = None) -> dict:
    """The check of rule `name` on `value`: decided by `judgement` (its interval against the threshold)
    when given, else by the value itself; an unmeasured value (None, NaN) fails."""
    rule = RULES[name]
    decision = None
    if rule.threshold is None:
        text = f"{rule.label} = {_fmt(value)} (measurement; no threshold)"
    elif value is None or (isinstance(value, float) and math.isnan(value)):
        decision, judgement = Decision.FAIL, None
        text = f"{rule.label} could not be measured (treated as failed)"
    else:
        decision = judgement.decision if judgement is not None else _point_decision(rule, value)
        word = {Decision.FAIL: "FAIL", Decision.PASS: "pass", Decision.UNDECIDED: "undecided"}[decision]
        text = (f"{rule.label} = {_fmt(value)} {_SIGN.get((rule.fails_above, decision), 'vs')} "
                f"{_fmt(rule.threshold)}: {word}")
    if judgement is not None:
        text += f" ({judgement.text()})"
    if note:
        text += f" ({note})"
    j = judgement
    return {"name": name, "value": value, "threshold": rule.threshold,
            "fails_when": None if rule.threshold is None else rule.direction,
            "passed": {Decision.PASS: True, Decision.FAIL: False}.get(decision),
            "decision": None if decision is None else decision.value,
            "interval": None if j is None else [float(j.low), float(j.high)],
            "n": None if j is None else int(j.n), "n_of": None if j is None else j.n_of,
            "n_needed": None if j is None or j.n_needed is None else int(j.n_needed),
            "role": rule.role, "explanation": text, "source": rule.source}


def _fmt(v) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.4g}"
    return str(v)


def build_checks(summary: dict, train_rows: Sequence[dict] = (), eval_record: dict | None = None,
                 checkpoint_epoch: int | None = None, *, tables: Mapping[str, Sequence[dict]] | None = None,
                 eval_correct: Mapping[str, np.ndarray] | None = None,
                 confidence: float = CONFIDENCE) -> list[dict]:
    """The checks of every rule whose value is available, in rule order. `tables` (the probe tables) and
    `eval_correct` (the evaluation's per-example arrays) give the checks their intervals; without them
    each value is compared with its threshold as it is."""
    ev = Evidence(summary, train_rows, eval_record, checkpoint_epoch, tables or {}, eval_correct or {}, confidence)
    checks = [rule.check(ev) for rule in RULES.values()]
    return [c for c in checks if c is not None]


VERDICT_RULE = ("yes: a decisive check fails, or a mechanism check fails together with another mechanism or "
                "symptom check; inconclusive: one mechanism check fails alone, or an attack did not converge "
                "(reliability); no: otherwise (failed symptoms that no mechanism check corroborates are "
                "listed: a stronger attack finds more, the gradient does not mislead). A check fails or passes "
                "only when its confidence interval lies wholly beyond or within its threshold, and is undecided "
                "otherwise; the rule is applied with every undecided check passing and with every undecided check "
                "failing: when the two verdicts differ the verdict is inconclusive (not enough points, naming "
                "the undecided checks that change it and the points that would decide them), else it stands")


def _masking(failed: Sequence[dict]) -> str:
    """The rule on a set of failed checks (the decided ones plus any undecided taken as failed)."""
    n = {role: sum(1 for c in failed if c["role"] == role) for role in ROLES}
    if n["decisive"] or (n["mechanism"] >= 1 and n["mechanism"] + n["symptom"] >= 2):
        return "yes"
    if n["mechanism"] == 1 or n["reliability"]:
        return "inconclusive"
    return "no"


def _pivotal(failed: list[dict], undecided: list[dict]) -> list[dict]:
    """The undecided checks whose decision alone changes the verdict, with the other undecided checks
    all passing or all failing (the rule is monotone: more failures never make it milder)."""
    low, high = _masking(failed), _masking(failed + undecided)
    out = [c for c in undecided
           if _masking(failed + [c]) != low or _masking(failed + [o for o in undecided if o is not c]) != high]
    return out or undecided


def _not_enough(c: dict) -> str:
    needed = (f"about {c['n_needed']:,} needed" if c["n_needed"] is not None
              else f"no number up to {MAX_POINTS_NEEDED:,} decides it")
    return f"not enough points (n = {c['n']} {c['n_of']}, {needed}): {c['role']}: {c['name']}: {c['explanation']}"


def verdict(checks: Sequence[dict]) -> dict:
    """The masking verdict from the checks (rule: VERDICT_RULE and the module docstring)."""
    judged = [c for c in checks if c["role"] in ROLES]
    failed = [c for c in judged if c["decision"] == Decision.FAIL]
    undecided = [c for c in judged if c["decision"] == Decision.UNDECIDED]
    reasons = [f"{c['role']}: {c['name']}: {c['explanation']} [{c['source']}]"
               for role in ROLES for c in failed if c["role"] == role]
    masking, open_ = _masking(failed), []
    if masking != _masking(failed + undecided):
        open_ = _pivotal(failed, undecided)
        reasons = [_not_enough(c) for c in open_] + reasons + [
            f"decided, these checks would make the verdict {masking!r} (all passing) or "
            f"{_masking(failed + undecided)!r} (all failing)"]
        masking = "inconclusive"
    elif masking == "no" and any(c["role"] == "symptom" for c in failed):
        reasons.append("no gradient or loss-surface check corroborates these symptoms: the gradient is "
                       "informative, so stronger attacks find more because the loss is non-linear over "
                       "the eps-ball, not because the gradient misleads; report the strongest attack")
    elif masking == "no":
        reasons = [f"all {sum(1 for c in checks if c['decision'] == Decision.PASS)} decided checks with a "
                   "threshold passed"]
    if undecided and not open_:
        reasons.append("undecided, but no decision of theirs changes the verdict: "
                       + ", ".join(c["name"] for c in undecided))
    return {"masking": masking, "reasons": reasons, "rule": VERDICT_RULE, "undecided": [c["name"] for c in open_]}
