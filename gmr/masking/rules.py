"""The gradient-masking rules as data, the checks built from them, and the verdict.

Each rule (`Rule`) names a check: its threshold and direction, its role in the verdict, its source, a
label for the one-line explanation, where its value is taken from (the probe summary, the evaluation
record, the training log) and, where it has one, when it applies. `build_checks` loops over the
registered rules; `register_rule` adds one (a new probe's headline number becomes a check with one rule).

Checks, thresholds and sources (a check *fails* when its value is on the bad side of the threshold):

| check | fails when | role | source of the check (and of the threshold) |
|---|---|---|---|
| fgsm_pgd_accuracy_gap | acc(FGSM) - acc(PGD) > 0.2 | symptom | Tramer et al. 2018 (single-step AT is strong against FGSM only); 0.2 = the accuracy drop Wong et al. 2020 use to detect catastrophic overfitting |
| zero_gradient_fraction | fraction of points with an all-zero input gradient > 0.01 | decisive | Athalye et al. 2018 (shattered/vanishing gradients); a smooth model has none |
| fgsm_above_clean | acc(FGSM) - acc(clean) > 0 (the attack helps: label leaking) | symptom | Kurakin et al. 2017; Tramer et al. 2018 |
| gradient_alignment_fgsm_robust | E cos(grad(x), grad(x + eta)), eta ~ U(-eps, eps), over the points FGSM does not break, < 0.3 | mechanism | Andriushchenko & Flammarion 2020 (GradAlign: alignment collapses at catastrophic overfitting) |
| sign_agreement_fgsm_robust | mean fraction of coordinates where sign(grad(x)) = sign(grad(x + eta)), same points, < 0.6 | mechanism | sign version of the GradAlign probe (FGSM uses only the sign); 0.5 is chance |
| fgsm_loss_nonmonotone | fraction of points whose CE loss along x + t sign(grad x), t in [0, 2 eps], falls by more than 5% of its range (+0.01 nats) before the point is first misclassified > 0.1 | mechanism | Tramer et al. 2018, Kim et al. 2021 (the loss of a masked model peaks close to x along the gradient direction) |
| boundary_distortion | fraction of points misclassified at some t < eps along the FGSM direction but correct at t = eps > 0.05 | mechanism | Kim, Lee & Lee 2021 (AAAI), decision-boundary distortion |
| accuracy_at_large_eps | PGD accuracy at the largest eps of the sweep (1.0 by default) > 0.05 | decisive | Carlini et al. 2019 and Athalye et al. 2018 (an unbounded attack must reach 100% success) |
| accuracy_vs_eps_increase | largest rise of PGD accuracy between consecutive eps of the sweep > 0.03 | symptom | Carlini et al. 2019 (a larger budget must not make the attack weaker) |
| transfer_beats_whitebox | acc(white-box PGD) - acc(PGD transferred from --transfer-from) > 0.02 | decisive | Athalye et al. 2018; Carlini et al. 2019 (black-box stronger than white-box is a red flag) |
| autoattack_square_gain | robust accuracy that AutoAttack's black-box Square removes after its white-box attacks (from --eval) > 0.02 | decisive (a symptom when it is a single example) | Croce & Hein 2020; Carlini et al. 2019 (black-box stronger than white-box); tolerance as transfer_beats_whitebox |
| autoattack_flags | AutoAttack raised any flag (from --eval) | symptom | Croce & Hein 2020 (AutoAttack's checks, flags_doc.md: they "might indicate" an unreliable evaluation) |
| pgd_autoattack_gap | acc(PGD) - acc(AutoAttack) in the evaluation JSON > 0.1 | symptom | Croce & Hein 2020 (drops of > 10 points expose a broken evaluation) |
| catastrophic_overfitting | val PGD accuracy fell below its earlier best by more than min(0.2, half that best) while val FGSM stayed within 0.1 of its value there, at or before the audited checkpoint | symptom | Wong, Rice & Kolter 2020 (early stopping when PGD accuracy drops by 0.2); Kim et al. 2021 (PGD accuracy falls to 0 while FGSM accuracy rises) |
| pgd_steps_plateau | acc(PGD, most steps) < acc(PGD, previous step count) - 0.02 | reliability | Carlini et al. 2019 (accuracy vs iterations must plateau) |
| pgd_restarts_plateau | acc(R restarts) < acc(R/2 restarts) - 0.02 | reliability | Carlini et al. 2019; Mosbach et al. 2018 (restarts) |
| gradient_alignment, gradient_sign_agreement (all points), fgsm_rfgsm_logit_distance, fgsm_pgd_loss_ratio, fgsm_pgd_perturbation_cosine, clean/FGSM/PGD accuracy | never (measurements) | info | Andriushchenko & Flammarion 2020 (alignment, FGSM-PGD cosine); Vivek et al. 2019 (the GMR penalty) |

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

The 0.3 / 0.6 / 0.1 / 0.05 thresholds of the gradient and line checks are this suite's choices: the
papers show the quantities collapse at masking but publish no cut-off; they separate a linear model,
normally and adversarially trained models from masked ones in tests/test_masking.py.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import cached_property
from typing import Callable, Sequence

from ..runs import catastrophic_overfitting_epoch

ROLES = ("decisive", "mechanism", "symptom", "reliability")
SOURCES = ("summary", "eval", "train_log")
# the gradient checks restricted to the points FGSM does not break need this many of them
MIN_FGSM_ROBUST, MIN_FGSM_ROBUST_FRACTION = 10, 0.05
MIN_DECISIVE_EXAMPLES = 2  # the AutoAttack Square check needs this many broken points to be decisive


# --------------------------------------------------------------------------------------------------
# What the rules read

@dataclass
class Evidence:
    """Everything a rule may read: the probe summary, the training log and an evaluation record."""
    summary: dict
    train_rows: Sequence[dict] = ()
    eval_record: dict | None = None
    checkpoint_epoch: int | None = None

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
# Rules

@dataclass(frozen=True)
class Rule:
    """One check. `read(evidence)` returns its Reading, or None when the check does not arise (its
    source is missing: no transfer run, no AutoAttack, no training log); by default the summary value
    of the rule's name, when the summary has it. `applicable(evidence)` returns why the check does not
    apply (passed = null), or None. `adjust(check, evidence)` may change the role of a built check."""
    name: str
    threshold: float | None
    direction: str               # "above": fails when value > threshold; "below": fails when value < threshold
    role: str                    # decisive | mechanism | symptom | reliability | info
    source: str
    label: str                   # what the value is, for the one-line explanation
    taken_from: str = "summary"  # summary | eval | train_log
    read: Callable[[Evidence], Reading | None] | None = None
    applicable: Callable[[Evidence], str | None] | None = None
    adjust: Callable[[dict, Evidence], None] | None = None

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
            check["passed"] = None
            check["explanation"] = f"{self.label}: not applicable, {why_not}"
        else:
            check = make_check(self.name, reading.value, reading.note)
        if self.adjust is not None:
            self.adjust(check, ev)
        return check


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


def _square_single_example(check: dict, ev: Evidence) -> None:
    # On the small AutoAttack subsets of quick studies one point can exceed the threshold (1 of 10
    # = 0.1), and whether Square's random search finds it varies between runs: a single example is
    # reported as a symptom, not as decisive evidence.
    n = ev.autoattack["n_examples"]
    broken = round(check["value"] * n) if n else None
    if check["passed"] is False and n and broken < MIN_DECISIVE_EXAMPLES:
        check["role"] = "symptom"
        check["explanation"] += (f" ({broken} of {n} points: fewer than {MIN_DECISIVE_EXAMPLES} examples "
                                 "count as a symptom)")


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
    Rule("clean_accuracy", None, "above", "info", "-", "clean accuracy"),
    Rule("fgsm_accuracy", None, "above", "info", "Goodfellow et al. 2015", "FGSM accuracy"),
    Rule("pgd_accuracy", None, "above", "info", "Madry et al. 2018", "PGD accuracy"),
    Rule("fgsm_pgd_accuracy_gap", 0.2, "above", "symptom",
         "Tramer et al. 2018 (ICLR); threshold: the 0.2 accuracy drop of Wong et al. 2020 (ICLR)",
         "FGSM accuracy minus PGD accuracy"),
    Rule("fgsm_above_clean", 0.0, "above", "symptom",
         "Kurakin, Goodfellow & Bengio 2017 (ICLR, label leaking); Tramer et al. 2018 (ICLR)",
         "FGSM accuracy minus clean accuracy"),
    Rule("fgsm_pgd_loss_ratio", None, "above", "info", "Tramer et al. 2018 (ICLR)", "mean PGD loss / mean FGSM loss"),
    Rule("zero_gradient_fraction", 0.01, "above", "decisive", "Athalye, Carlini & Wagner 2018 (ICML)",
         "fraction of points with an all-zero input gradient"),
    Rule("gradient_alignment", None, "below", "info", "Andriushchenko & Flammarion 2020 (NeurIPS, GradAlign)",
         "E cos(grad(x), grad(x + eta)) over all points"),
    Rule("gradient_sign_agreement", None, "below", "info", "sign form of the GradAlign probe",
         "mean fraction of coordinates whose gradient sign survives a random step, all points"),
    Rule("gradient_alignment_fgsm_robust", 0.3, "below", "mechanism",
         "Andriushchenko & Flammarion 2020 (NeurIPS, GradAlign); restriction and threshold: this suite",
         "E cos(grad(x), grad(x + eta)) over the points FGSM does not break",
         read=_fgsm_robust_read("gradient_alignment_fgsm_robust"), applicable=_fgsm_robust_applicable),
    Rule("sign_agreement_fgsm_robust", 0.6, "below", "mechanism",
         "sign form of the GradAlign probe; threshold: this suite (chance = 0.5)",
         "mean fraction of coordinates whose gradient sign survives a random step, points FGSM does not break",
         read=_fgsm_robust_read("sign_agreement_fgsm_robust"), applicable=_fgsm_robust_applicable),
    Rule("fgsm_pgd_perturbation_cosine", None, "above", "info", "Andriushchenko & Flammarion 2020 (NeurIPS)",
         "mean cosine between FGSM and PGD perturbations"),
    Rule("fgsm_rfgsm_logit_distance", None, "above", "info", "Vivek, Baburaj & Babu 2019 (CVPRW; the GMR penalty)",
         "mean ||z(x_fgsm) - z(x_rfgsm)||^2"),
    Rule("fgsm_loss_nonmonotone", 0.1, "above", "mechanism",
         "Tramer et al. 2018 (ICLR); Kim, Lee & Lee 2021 (AAAI); threshold: this suite",
         "fraction of points whose loss along the FGSM direction (0 to 2 eps) falls before they are misclassified"),
    Rule("boundary_distortion", 0.05, "above", "mechanism", "Kim, Lee & Lee 2021 (AAAI); threshold: this suite",
         "fraction of points wrong at some eps' < eps but right at eps along the FGSM direction"),
    Rule("accuracy_at_large_eps", 0.05, "above", "decisive", "Carlini et al. 2019 (On Evaluating Adversarial "
         "Robustness); Athalye, Carlini & Wagner 2018 (ICML)", "PGD accuracy at the largest eps",
         read=_with_note("accuracy_at_large_eps", lambda s: f"eps = {s['largest_eps']:.3g}")),
    Rule("accuracy_vs_eps_increase", 0.03, "above", "symptom",
         "Carlini et al. 2019 (On Evaluating Adversarial Robustness)",
         "largest rise of PGD accuracy between consecutive eps"),
    Rule("transfer_beats_whitebox", 0.02, "above", "decisive",
         "Athalye, Carlini & Wagner 2018 (ICML); Carlini et al. 2019",
         "white-box PGD accuracy minus transferred PGD accuracy",
         read=_with_note("transfer_beats_whitebox", lambda s: f"transfer accuracy {s['transfer_accuracy']:.3f}")),
    Rule("autoattack_flags", 0, "above", "symptom", "Croce & Hein 2020 (ICML; AutoAttack flags_doc.md)",
         "number of AutoAttack flags", taken_from="eval", read=_aa_flags),
    Rule("autoattack_square_gain", 0.02, "above", "decisive",
         "Croce & Hein 2020 (ICML); Carlini et al. 2019 (black-box stronger than white-box); tolerance as "
         "transfer_beats_whitebox", "robust accuracy removed by Square after the white-box attacks of AutoAttack",
         taken_from="eval", read=_aa_square, adjust=_square_single_example),
    Rule("pgd_autoattack_gap", 0.1, "above", "symptom", "Croce & Hein 2020 (ICML)",
         "PGD accuracy minus AutoAttack accuracy", taken_from="eval", read=_aa_pgd_gap),
    Rule("catastrophic_overfitting", 0, "above", "symptom",
         "Wong, Rice & Kolter 2020 (ICLR; early stop at a 0.2 PGD accuracy drop); Kim, Lee & Lee 2021 (AAAI)",
         "epoch of catastrophic overfitting at or before the audited checkpoint (0: none)",
         taken_from="train_log", read=_co_read),
    Rule("pgd_steps_plateau", 0.02, "above", "reliability",
         "Carlini et al. 2019 (accuracy vs iterations must plateau)",
         "accuracy drop between the two largest PGD step counts"),
    Rule("pgd_restarts_plateau", 0.02, "above", "reliability", "Carlini et al. 2019; Mosbach et al. 2018",
         "accuracy drop between R/2 and R restarts"),
):
    register_rule(_rule)


# --------------------------------------------------------------------------------------------------
# Checks and verdict

def make_check(name: str, value: float | None, note: str | None = "") -> dict:
    rule = RULES[name]
    if rule.threshold is None:
        passed = None
        text = f"{rule.label} = {_fmt(value)} (measurement; no threshold)"
    elif value is None or (isinstance(value, float) and math.isnan(value)):
        passed = False
        text = f"{rule.label} could not be measured (treated as failed)"
    else:
        # a value equal to the threshold passes; 1e-6 absorbs float error (accuracies are float32
        # means: 0.44 - 0.42 = 0.02000001) and is far below one example's weight (1/n, n <= 1e5)
        bad = (value > rule.threshold + 1e-6) if rule.fails_above else (value < rule.threshold - 1e-6)
        passed = not bad
        op = (">" if bad else "<=") if rule.fails_above else ("<" if bad else ">=")
        text = f"{rule.label} = {_fmt(value)} {op} {_fmt(rule.threshold)}: {'FAIL' if bad else 'pass'}"
    if note:
        text += f" ({note})"
    return {"name": name, "value": value, "threshold": rule.threshold,
            "fails_when": None if rule.threshold is None else rule.direction,
            "passed": passed, "role": rule.role, "explanation": text, "source": rule.source}


def _fmt(v) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.4g}"
    return str(v)


def build_checks(summary: dict, train_rows: Sequence[dict] = (), eval_record: dict | None = None,
                 checkpoint_epoch: int | None = None) -> list[dict]:
    """The checks of every rule whose value is available, in rule order."""
    ev = Evidence(summary, train_rows, eval_record, checkpoint_epoch)
    checks = [rule.check(ev) for rule in RULES.values()]
    return [c for c in checks if c is not None]


VERDICT_RULE = ("yes: a decisive check fails, or a mechanism check fails together with another mechanism or "
                "symptom check; inconclusive: one mechanism check fails alone, or an attack did not converge "
                "(reliability); no: otherwise (failed symptoms that no mechanism check corroborates are "
                "listed: a stronger attack finds more, the gradient does not mislead)")


def verdict(checks: Sequence[dict]) -> dict:
    """The masking verdict from the checks (rule: VERDICT_RULE and the module docstring)."""
    failed = {role: [c for c in checks if c["role"] == role and c["passed"] is False] for role in ROLES}
    reasons = [f"{c['role']}: {c['name']}: {c['explanation']} [{c['source']}]"
               for role in ROLES for c in failed[role]]
    n_mech, n_sym = len(failed["mechanism"]), len(failed["symptom"])
    if failed["decisive"] or (n_mech >= 1 and n_mech + n_sym >= 2):
        masking = "yes"
    elif n_mech == 1 or failed["reliability"]:
        masking = "inconclusive"
    else:
        masking = "no"
        n = sum(1 for c in checks if c["passed"] is not None)
        if n_sym:
            reasons.append("no gradient or loss-surface check corroborates these symptoms: the gradient is "
                           "informative, so stronger attacks find more because the loss is non-linear over "
                           "the eps-ball, not because the gradient misleads; report the strongest attack")
        else:
            reasons = [f"all {n} checks with a threshold passed"]
    return {"masking": masking, "reasons": reasons, "rule": VERDICT_RULE}
