"""Gradient-masking package: probes on constructed models with known answers, every registered probe,
a probe and rule added from a test, the rules, the audit, its schema and the CLI."""
from __future__ import annotations

import json
import math
from dataclasses import replace

import jsonschema
import numpy as np
import pytest
import torch
from scipy import stats as scistats
from torch import nn

from gmr.cli import main
from gmr.data import DataSpec, Split, load_split
from gmr.masking import rules as rules_module
from gmr.masking.audit import DiagnoseConfig, ProbeSettings, diagnose, read_tables, validate_audit, write_audit
from gmr.masking.probes import (PROBES, ProbeContext, line_statistics, probe_seed, register_probe, run_probes,
                                sign_agreement, summarise)
from gmr.masking.rules import (RULES, Mean, Proportion, Rule, build_checks, make_check, mean_interval,
                               register_rule, verdict)
from gmr.report.audit_figures import diagnosis_figures
from gmr.runs import RunDir, catastrophic_overfitting_epoch
from gmr.stats import compare_paired, points_needed_paired

pytestmark = pytest.mark.usefixtures("one_thread")

GRADIENT_CHECKS = ("zero_gradient_fraction", "gradient_alignment_fgsm_robust", "sign_agreement_fgsm_robust",
                   "fgsm_loss_nonmonotone", "boundary_distortion")
# tests use smaller probes still than --quick (2 CPU cores, a few seconds per model)
# make_run's default (1 epoch, step schedule) stays at chance; this learns (about 75% clean accuracy)
TRAINED = dict(schedule="constant", lr=0.05)
TINY = ProbeSettings(batch_size=64, n_curve=24, n_surface=1, surface_points=5, line_points=11,
                     pgd_steps=(1, 5, 10), restarts=2, restart_steps=5, sweep_steps=5,
                     eps_factors=(0.0, 0.5, 1.0), large_eps=(1.0,), attack_steps=10)
# enough points to decide every check of a normally trained model, as cheaply as possible (the Wilson
# bound of 0 of n reaches 0.01 at n = 381; a plateau of 0 flips reaches 0.02 at about 200 curve points,
# one flip needs about 380; PGD still gains from 3 to 6 steps on this model, so the plateau is 10 vs 20)
DECIDING = replace(TINY, batch_size=200, n_curve=400, line_points=7, pgd_steps=(10, 20), restart_steps=3,
                   sweep_steps=3, eps_factors=(0.0, 1.0), attack_steps=5)


def by_name(checks):
    return {c["name"]: c for c in checks}


# --------------------------------------------------------------------------------------------------
# Constructed models

class BinaryLinear(nn.Module):
    """Logits (0, w.x + b): the input gradient of the CE loss is a positive multiple of -+w everywhere."""

    def __init__(self, d: int, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = nn.Parameter(torch.randn(d, generator=g) / d ** 0.5)
        self.b = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        z = x.flatten(1) @ self.w + self.b
        return torch.stack([torch.zeros_like(z), z], 1)


class Quantised(nn.Module):
    """round(4x)/4 before a network: the input gradient is exactly zero (Athalye et al. 2018)."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(torch.round(4 * x) / 4)


class Shattered(nn.Module):
    """A network plus a small, fast-oscillating term: logits barely change, gradients become noise."""

    def __init__(self, net, d=784, classes=10):
        super().__init__()
        self.net = net
        self.register_buffer("r", torch.randn(d, classes, generator=torch.Generator().manual_seed(1)) / d ** 0.5)

    def forward(self, x):
        return self.net(x) + 0.1 * torch.sin(1000 * x.flatten(1)) @ self.r


def mlp():
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 64), nn.ReLU(), nn.Linear(64, 10))


@pytest.fixture(scope="module")
def mnist_test(mnist_root):
    return load_split(DataSpec("mnist", mnist_root, n_test=64), Split.TEST)


@pytest.fixture(scope="module")
def trained_mlp(mnist_root):
    """A small MLP trained normally for 200 steps (about 90% clean accuracy)."""
    torch.manual_seed(0)
    x, y = load_split(DataSpec("mnist", mnist_root, n_train=2000), Split.TRAIN)
    net = mlp()
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        idx = torch.randint(0, len(x), (64,), generator=g)
        loss = nn.functional.cross_entropy(net(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval()


# --------------------------------------------------------------------------------------------------
# Probes with known answers

def test_linear_model_is_aligned_monotone_and_not_masked():
    torch.manual_seed(0)
    d = 64
    model = BinaryLinear(d)
    # interior points and a small eps: no clipping, so the loss along the FGSM direction is convex with
    # a positive slope at 0, hence monotone
    x = 0.4 + 0.2 * torch.rand(48, 1, 8, 8)
    with torch.no_grad():
        y = model(x).argmax(1)
    probes = run_probes(model, x, y, eps=0.05, settings=TINY)
    s = probes.summary
    assert s["gradient_alignment"] == pytest.approx(1.0, abs=1e-5)
    assert s["gradient_sign_agreement"] == pytest.approx(1.0)
    assert s["fgsm_pgd_perturbation_cosine"] == pytest.approx(1.0, abs=1e-4)
    assert s["fgsm_loss_nonmonotone"] == 0.0
    assert s["boundary_distortion"] == 0.0
    assert s["zero_gradient_fraction"] == 0.0
    # every loss curve along the FGSM direction rises
    curves = {}
    for row in probes.tables["fgsm_line"]:
        curves.setdefault(row["index"], []).append(row["loss"])
    assert all(all(b >= a - 1e-6 for a, b in zip(c, c[1:])) for c in curves.values())
    checks = by_name(build_checks(s))
    assert all(checks[name]["passed"] is not False for name in GRADIENT_CHECKS)
    assert verdict(list(checks.values()))["masking"] == "no"


def test_quantised_model_is_judged_masked(trained_mlp, mnist_test):
    x, y = mnist_test
    model = Quantised(trained_mlp)
    probes = run_probes(model, x, y, eps=0.3, settings=TINY, source_model=trained_mlp)
    s = probes.summary
    assert s["clean_accuracy"] > 0.8
    assert s["zero_gradient_fraction"] == 1.0
    assert s["gradient_alignment"] == 0.0
    # the gradient attacks cannot move: PGD is no stronger than doing nothing ...
    assert s["pgd_accuracy"] > 0.7
    # ... while PGD on the smooth twin transfers
    assert s["transfer_beats_whitebox"] > 0.3
    checks = build_checks(s)
    failed = {c["name"] for c in checks if c["passed"] is False}
    assert {"zero_gradient_fraction", "gradient_alignment_fgsm_robust", "transfer_beats_whitebox"} <= failed
    v = verdict(checks)
    assert v["masking"] == "yes"
    assert any("zero_gradient_fraction" in r for r in v["reasons"])


def test_shattered_gradients_are_caught_by_the_gradient_checks(trained_mlp, mnist_test):
    x, y = mnist_test
    # images squeezed into [0.1, 0.9] and eps 0.1: no clipping, so no coordinate keeps its gradient
    x = 0.1 + 0.8 * x
    probes = run_probes(Shattered(trained_mlp), x, y, eps=0.1, settings=TINY)
    s = probes.summary
    assert s["zero_gradient_fraction"] == 0.0       # not the zero-gradient mechanism
    assert s["gradient_alignment"] < 0.1
    assert abs(s["gradient_sign_agreement"] - 0.5) < 0.05
    checks = by_name(build_checks(s))
    assert checks["gradient_alignment_fgsm_robust"]["passed"] is False
    assert checks["sign_agreement_fgsm_robust"]["passed"] is False
    assert verdict(list(checks.values()))["masking"] == "yes"


def test_normally_trained_mlp_passes_the_gradient_checks(trained_mlp, mnist_test):
    x, y = mnist_test
    s = run_probes(trained_mlp, x, y, eps=0.3, settings=TINY).summary
    checks = by_name(build_checks(s))
    assert all(checks[name]["passed"] is not False for name in GRADIENT_CHECKS), \
        [checks[n]["explanation"] for n in GRADIENT_CHECKS]
    assert s["pgd_accuracy"] <= s["fgsm_accuracy"] < 0.3     # not robust: eps 0.3 breaks it
    assert s["accuracy_at_large_eps"] == 0.0


@pytest.fixture(scope="module")
def audits_by_size(make_run):
    """(run, {n: Diagnosis}): one normally trained run audited on its first 20 and first 400 test points."""
    run = make_run("standard", **TRAINED)
    return run, {n: diagnose(DiagnoseConfig(run=str(run), n_test=n, device="cpu",
                                            settings=replace(DECIDING, n_curve=min(n, DECIDING.n_curve))))
                 for n in (20, 400)}


def test_a_check_undecided_at_small_n_is_decided_at_large_n(audits_by_size):
    _, audits = audits_by_size
    small, large = (by_name(audits[n].audit["checks"]) for n in (20, 400))
    z20, z400 = small["zero_gradient_fraction"], large["zero_gradient_fraction"]
    assert z20["value"] == z400["value"] == 0.0           # no zero gradient on either subset
    # 0 of 20 has the Wilson interval [0, 0.16]: it straddles 0.01, so the check is undecided; the upper
    # bound z^2 / (n + z^2) falls to 0.01 at n = 381
    assert z20["decision"] == "undecided" and z20["passed"] is None
    assert z20["n"] == 20 and z20["n_of"] == "audit points" and z20["n_needed"] == 381
    assert z20["interval"][0] == 0 and z20["interval"][1] == pytest.approx(1.959964 ** 2 / (20 + 1.959964 ** 2))
    assert "about 381 needed" in z20["explanation"]
    assert z400["decision"] == "pass" and z400["passed"] is True and z400["n_needed"] is None
    assert z400["n"] == 400 and z400["interval"][1] <= 0.01
    v20 = audits[20].audit["verdict"]
    assert v20["masking"] == "inconclusive" and "zero_gradient_fraction" in v20["undecided"]
    assert any(r.startswith("not enough points (n = 20 audit points, about 381 needed)")
               and "zero_gradient_fraction" in r for r in v20["reasons"])
    for audit in (audits[20].audit, audits[400].audit):
        validate_audit(json.loads(json.dumps(audit)))


def test_normally_trained_run_is_not_judged_masked(audits_by_size):
    run, audits = audits_by_size
    diag = audits[400]
    checks = by_name(diag.audit["checks"])
    assert all(checks[name]["passed"] is not False for name in GRADIENT_CHECKS), \
        [checks[n]["explanation"] for n in GRADIENT_CHECKS]
    open_or_failed = [c["explanation"] for c in checks.values() if c["decision"] in ("fail", "undecided")]
    assert open_or_failed == []
    assert diag.audit["verdict"]["masking"] == "no" and diag.audit["verdict"]["undecided"] == [], diag.audit["verdict"]
    assert diag.audit["run_id"] == RunDir(run).record()["run_id"] and "transfer_run_id" not in diag.audit
    assert diag.audit["settings"]["confidence"] == 0.95
    # the training log was read: per-epoch curves and the CO check are there
    assert diag.tables["training_curves"][0]["epoch"] == 1
    assert checks["catastrophic_overfitting"]["passed"]
    assert checks["catastrophic_overfitting"]["interval"] is None     # a rule on the log, not a sample
    # the curve checks rest on the curve points, paired point by point
    plateau = checks["pgd_steps_plateau"]
    assert plateau["n"] == DECIDING.n_curve and plateau["n_of"] == "curve points" and "discordant" in plateau["explanation"]


# --------------------------------------------------------------------------------------------------
# Building blocks

def test_sign_agreement_counts_only_active_coordinates():
    g1 = torch.tensor([[1.0, -1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    g2 = torch.tensor([[2.0, 1.0, 0.0, 3.0], [0.0, 0.0, 0.0, 0.0]])
    out = sign_agreement(g1, g2)
    assert out[0].item() == pytest.approx(1 / 3)
    assert math.isnan(out[1].item())


def test_line_statistics_monotone_bump_and_distortion():
    t = torch.linspace(0, 0.6, 7)          # eps 0.3 is t[3]
    rising = torch.linspace(0.1, 5.0, 7)
    bump = torch.tensor([0.1, 3.0, 0.5, 0.4, 0.6, 0.8, 1.0])   # peaks near x, then falls: masking
    loss = torch.stack([rising, bump, bump, rising])
    correct = torch.tensor([[1, 1, 1, 0, 0, 0, 0],    # rises until misclassified
                            [1, 1, 1, 1, 1, 1, 1],    # falls while still correct: non-monotone
                            [1, 1, 0, 0, 0, 0, 0],    # falls only after the boundary: not counted
                            [1, 0, 1, 1, 1, 1, 1]],   # wrong at t < eps, right at eps: distorted
                           dtype=torch.bool)
    drop, nonmono, distorted = line_statistics(loss, correct, t, eps=0.3)
    assert nonmono.tolist() == [False, True, False, False]
    assert drop[1].item() == pytest.approx(2.6)
    assert distorted.tolist() == [False, False, False, True]


def test_catastrophic_overfitting_rule():
    row = lambda e, fgsm, pgd: {"epoch": e, "val_fgsm": fgsm, "val_pgd": pgd}
    healthy = [row(1, 0.6, 0.4), row(2, 0.7, 0.5), row(3, 0.75, 0.55)]
    assert catastrophic_overfitting_epoch(healthy) is None
    co = [row(1, 0.6, 0.4), row(2, 0.7, 0.5), row(3, 0.9, 0.1), row(4, 0.95, 0.0)]
    assert catastrophic_overfitting_epoch(co) == 3
    collapse = [row(1, 0.6, 0.5), row(2, 0.1, 0.05)]          # everything fell: divergence, not CO
    assert catastrophic_overfitting_epoch(collapse) is None
    slow = [row(1, 0.7, 0.5), row(2, 0.7, 0.4), row(3, 0.72, 0.25)]   # drop from the best, not the last
    assert catastrophic_overfitting_epoch(slow) == 3
    weak = [row(1, 0.35, 0.19), row(2, 0.78, 0.0)]    # seen on real MNIST: too little to lose 0.2
    assert catastrophic_overfitting_epoch(weak) == 2
    noise = [row(1, 0.35, 0.19), row(2, 0.36, 0.15)]
    assert catastrophic_overfitting_epoch(noise) is None


def test_wong2020_rule_by_name():
    """locuslab/fast_adversarial train_fgsm.py:93,130-139: a drop of more than 0.2 in training-batch
    PGD-5 accuracy from the previous epoch (not the best), starting from 0."""
    from gmr.runs import CO_RULES

    row = lambda e, pgd5: {"epoch": e, "val_fgsm": 0.5, "val_pgd": 0.3, "train_batch_pgd5": pgd5}
    assert set(CO_RULES) == {"ours", "wong2020"}
    assert CO_RULES["wong2020"]([row(1, 0.4), row(2, 0.5), row(3, 0.25)]) == 3
    assert CO_RULES["wong2020"]([row(1, 0.5), row(2, 0.35), row(3, 0.2)]) is None   # ours compares with the best
    assert catastrophic_overfitting_epoch([row(1, 0.5), row(2, 0.35)], rule="wong2020") is None
    assert CO_RULES["wong2020"]([{"epoch": 1, "val_pgd": 0.1}]) is None              # a log without the column


def test_verdict_rule():
    def check(name, value):
        return make_check(name, value)
    clean = [check("gradient_alignment_fgsm_robust", 0.9), check("boundary_distortion", 0.0),
             check("pgd_steps_plateau", 0.0)]
    assert verdict(clean)["masking"] == "no"
    gap = check("fgsm_pgd_accuracy_gap", 0.5)                 # a symptom
    co = check("catastrophic_overfitting", 2.0)               # a symptom
    curved = check("fgsm_loss_nonmonotone", 0.4)              # a mechanism
    distorted = check("boundary_distortion", 0.2)             # a mechanism
    one_symptom = verdict(clean + [gap])
    assert one_symptom["masking"] == "no"
    assert any("fgsm_pgd_accuracy_gap" in r for r in one_symptom["reasons"])
    assert any("corroborates" in r for r in one_symptom["reasons"])
    assert verdict(clean + [gap, co])["masking"] == "no"       # symptoms alone never convict
    assert verdict(clean + [curved])["masking"] == "inconclusive"
    assert verdict(clean + [curved, gap])["masking"] == "yes"
    assert verdict(clean + [curved, distorted])["masking"] == "yes"
    assert verdict(clean + [check("accuracy_at_large_eps", 0.3)])["masking"] == "yes"
    assert verdict(clean + [check("pgd_restarts_plateau", 0.1)])["masking"] == "inconclusive"
    assert verdict(clean + [check("fgsm_rfgsm_logit_distance", 1e6)])["masking"] == "no"
    assert make_check("gradient_alignment_fgsm_robust", float("nan"))["passed"] is False
    assert make_check("pgd_restarts_plateau", 0.525 - 0.505)["passed"] is True   # equal to 0.02 passes
    # the same in float32 accuracies (one example of 50): 0.02000001
    drop = float(torch.tensor(0.44, dtype=torch.float32) - torch.tensor(0.42, dtype=torch.float32))
    assert drop > 0.02 + 1e-9 and make_check("pgd_steps_plateau", drop)["passed"] is True
    assert make_check("pgd_steps_plateau", 0.04)["passed"] is False
    leak = check("fgsm_above_clean", 0.05)
    assert leak["passed"] is False and leak["role"] == "symptom"


def test_every_rule_documents_its_source_and_threshold_in_the_module_and_readme():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Gradient-masking diagnostics", 1)[1].split("\n## ", 1)[0]
    for name, rule in RULES.items():
        assert rule.source and rule.name == name
        assert name in rules_module.__doc__ or rule.role == "info"
        assert name in section, f"README does not document {name}"


def counted(name: str, count: int, n: int) -> dict:
    """The check `name` on count of n points, with its Wilson interval."""
    rule = RULES[name]
    return make_check(name, count / n, judgement=Proportion(count, n).judge(rule.threshold, rule.fails_above, 0.95))


def test_verdict_is_inconclusive_only_when_an_undecided_check_could_change_it():
    passing = [counted("zero_gradient_fraction", 0, 500), counted("boundary_distortion", 0, 500),
               counted("accuracy_at_large_eps", 0, 200), make_check("pgd_steps_plateau", 0.0)]
    assert verdict(passing) == {**verdict(passing), "masking": "no", "undecided": []}
    # an undecided symptom cannot convict alone: the verdict stands, and says the check is undecided
    open_symptom = counted("accuracy_vs_eps_increase", 1, 20)      # 0.05 vs 0.03 on 20 points
    assert open_symptom["decision"] == "undecided" and open_symptom["passed"] is None
    v = verdict(passing + [open_symptom])
    assert v["masking"] == "no" and v["undecided"] == []
    assert any("accuracy_vs_eps_increase" in r and "no decision of theirs changes" in r for r in v["reasons"])
    # an undecided mechanism could make it inconclusive: not enough points, with the number that decides it
    open_mechanism = counted("fgsm_loss_nonmonotone", 3, 20)          # 0.15 on 20 points: [0.05, 0.36]
    assert open_mechanism["decision"] == "undecided" and open_mechanism["n_needed"] > 20
    v = verdict(passing + [open_mechanism])
    assert v["masking"] == "inconclusive" and v["undecided"] == ["fgsm_loss_nonmonotone"]
    assert v["reasons"][0].startswith(f"not enough points (n = 20 audit points, about "
                                      f"{open_mechanism['n_needed']:,} needed): mechanism: fgsm_loss_nonmonotone")
    # ... and so could an undecided symptom next to a failed mechanism (inconclusive or yes)
    failed_mechanism = counted("boundary_distortion", 60, 200)
    assert verdict(passing + [failed_mechanism])["masking"] == "inconclusive"
    v = verdict(passing + [failed_mechanism, open_symptom])
    assert v["masking"] == "inconclusive" and v["undecided"] == ["accuracy_vs_eps_increase"]
    # an undecided check next to a decisive failure changes nothing: yes stands
    v = verdict(passing + [counted("zero_gradient_fraction", 100, 100), open_mechanism, open_symptom])
    assert v["masking"] == "yes" and v["undecided"] == []
    # an undecided reliability check could turn "no" into "inconclusive"
    v = verdict(passing + [counted("accuracy_at_large_eps", 0, 20)])
    assert v["masking"] == "inconclusive" and v["undecided"] == ["accuracy_at_large_eps"]
    # info checks carry an interval but never a decision
    info = counted("clean_accuracy", 9, 10)
    assert info["decision"] is None and info["passed"] is None and info["interval"][0] < 0.9 < info["interval"][1]


def per_example_rows(both: int, only_a: int, only_b: int, n: int, a: str, b: str) -> list[dict]:
    """per_example.csv rows whose columns `a` and `b` hold known concordant and discordant counts."""
    kinds = [(1, 1)] * both + [(1, 0)] * only_a + [(0, 1)] * only_b + [(0, 0)] * (n - both - only_a - only_b)
    return [{"index": i, a: ka, b: kb} for i, (ka, kb) in enumerate(kinds)]


@pytest.mark.parametrize("only_fgsm, only_clean, decision, p_text", [
    (8, 1, "fail", "0.039"),            # exact McNemar: 2 P(X <= 1), X ~ Bin(9, 1/2) = 20/512 < 0.05
    (7, 1, "undecided", "0.07"),        # 2 P(X <= 1), X ~ Bin(8, 1/2) = 18/256
    (1, 8, "pass", "0.039"),            # FGSM detectably below clean
])
def test_paired_check_with_threshold_zero_follows_the_exact_mcnemar_test(only_fgsm, only_clean, decision, p_text):
    rows = per_example_rows(20, only_fgsm, only_clean, 100, "fgsm_correct", "clean_correct")
    summary = {"fgsm_above_clean": (only_fgsm - only_clean) / 100}
    check = by_name(build_checks(summary, tables={"per_example": rows}))["fgsm_above_clean"]
    assert check["decision"] == decision and f"McNemar p = {p_text}" in check["explanation"]
    assert f"{only_fgsm} vs {only_clean} discordant" in check["explanation"]
    a = np.array([r["fgsm_correct"] for r in rows], bool)
    b = np.array([r["clean_correct"] for r in rows], bool)
    diff = compare_paired(a, b).difference
    assert check["interval"] == [diff.low, diff.high] and check["n"] == 100
    assert check["n_needed"] == (points_needed_paired(7, 1, 100) if decision == "undecided" else None)


def curve_rows(curve: str, xs: tuple, flips: int, n: int, correct: int = 20) -> list[dict]:
    """curve_points rows: `correct` of n points right at xs[0]; at xs[1], `flips` of them wrong."""
    rows = []
    for x, right in ((xs[0], correct), (xs[1], correct - flips)):
        rows += [{"curve": curve, "x": x, "index": i, "correct": int(i < right)} for i in range(n)]
    return rows


@pytest.mark.parametrize("flips, n, decision", [(0, 400, "pass"), (1, 24, "undecided"), (30, 100, "fail"),
                                                 (2, 100, "undecided")])
def test_plateau_checks_compare_the_step_counts_point_by_point(flips, n, decision):
    correct = min(40, n)
    tables = {"curve_points": curve_rows("steps", (50, 100), flips, n, correct)}
    check = by_name(build_checks({"pgd_steps_plateau": flips / n}, tables=tables))["pgd_steps_plateau"]
    a = np.arange(n) < correct
    diff = compare_paired(a, np.arange(n) < correct - flips).difference
    assert check["interval"] == [diff.low, diff.high]
    assert check["decision"] == decision and check["n"] == n and check["n_of"] == "curve points"
    # 2 flips in 100 points (0.02, exactly the tolerance) is the case the point rule could not judge:
    # no number of points decides a value that sits on the threshold
    assert (check["n_needed"] is None) == (decision != "undecided" or flips / n == 0.02)
    if check["n_needed"] is not None:
        assert check["n_needed"] > n


def test_a_t_interval_for_means_and_the_points_it_needs():
    low, high = mean_interval(np.array([1.0, 2.0, 3.0, 4.0, 5.0]), 0.95)
    half = scistats.t.ppf(0.975, 4) * math.sqrt(2.5) / math.sqrt(5)     # 2.776 * 1.581 / 2.236 = 1.963
    assert (low, high) == pytest.approx((3 - half, 3 + half)) and half == pytest.approx(1.9632, abs=1e-4)
    assert mean_interval(np.full(7, 0.5), 0.95) == (0.5, 0.5)          # no spread: zero width
    # sign agreement 0.62 +- 0.1 over 16 points vs the 0.6 threshold: undecided; the t-interval's half
    # width t(m-1) 0.1 / sqrt(m) falls to 0.02 at the n_needed it names, not before
    values = 0.62 + 0.1 * np.tile([1.0, -1.0], 8) * math.sqrt(15 / 16)
    j = Mean(values, "FGSM-robust points").judge(0.6, False, 0.95)
    assert j.decision == "undecided" and j.n == 16
    sd = float(np.std(values, ddof=1))
    need = j.n_needed
    assert scistats.t.ppf(0.975, need - 1) * sd / math.sqrt(need) <= 0.02 + 1e-12
    assert scistats.t.ppf(0.975, need - 2) * sd / math.sqrt(need - 1) > 0.02


def test_autoattack_record_flags_and_absence():
    summary = {k: 0.0 for k in RULES if k != "transfer_beats_whitebox"}
    summary.update(largest_eps=1.0, gradient_alignment_fgsm_robust=0.9, sign_agreement_fgsm_robust=0.9)
    record = {"attacks": {"pgd": {"accuracy": 0.9},
                          "autoattack": {"accuracy": 0.5, "per_attack": {"apgd-ce": 0.6},
                                         "flags": ["possibly gradient masking: apgd-ce gave 0.6"]}}}
    checks = by_name(build_checks(summary, eval_record=record))
    assert checks["autoattack_flags"]["passed"] is False and checks["autoattack_flags"]["value"] == 1
    assert checks["pgd_autoattack_gap"]["value"] == pytest.approx(0.4)
    assert "autoattack_square_gain" not in checks                  # no Square in this cascade
    assert verdict(list(checks.values()))["masking"] == "no"         # symptoms only
    # Square (black-box) beating the white-box attacks by more than 0.02 is a red flag
    per_attack = {"apgd-ce": 0.6, "apgd-t": 0.55, "fab-t": 0.55, "square": 0.5}
    record["attacks"]["autoattack"]["per_attack"] = per_attack
    checks = by_name(build_checks(summary, eval_record=record))
    assert checks["autoattack_square_gain"]["value"] == pytest.approx(0.05)
    assert checks["autoattack_square_gain"]["role"] == "decisive"
    assert verdict(list(checks.values()))["masking"] == "yes"
    per_attack["square"] = 0.545                                     # one point in 200: tolerated
    checks = by_name(build_checks(summary, eval_record=record))
    assert checks["autoattack_square_gain"]["passed"] is True
    assert "no per-point data" in checks["autoattack_square_gain"]["explanation"]      # no n in the record
    # on a 10-point subset one point broken by Square is 0.1, but its Wilson interval [0.018, 0.40]
    # straddles 0.02: undecided, and as a decisive check it makes the verdict inconclusive; two convict
    record["attacks"]["autoattack"]["n_examples"] = 10
    per_attack.update({"apgd-ce": 0.4, "apgd-t": 0.3, "fab-t": 0.3, "square": 0.2})
    checks = by_name(build_checks(summary, eval_record=record))
    square = checks["autoattack_square_gain"]
    assert square["decision"] == "undecided" and square["role"] == "decisive" and square["passed"] is None
    assert square["n"] == 10 and square["n_of"] == "AutoAttack points" and "1 of 10" in square["explanation"]
    assert square["interval"] == pytest.approx([0.0179, 0.4042], abs=1e-4) and square["n_needed"] > 10
    v = verdict(list(checks.values()))
    assert v["masking"] == "inconclusive" and v["undecided"] == ["autoattack_square_gain"]
    per_attack["square"] = 0.1
    checks = by_name(build_checks(summary, eval_record=record))
    assert checks["autoattack_square_gain"]["decision"] == "fail"
    assert verdict(list(checks.values()))["masking"] == "yes"
    # PGD vs AutoAttack point by point, from the evaluation's per-example arrays: AutoAttack breaks 60 of
    # 200 points that PGD does not (0.3 [0.23, 0.36] > 0.1: fails); 2 of 10 is undecided
    for n, extra, decision in ((200, 60, "fail"), (10, 2, "undecided")):
        record = {"attacks": {"pgd": {"accuracy": (2 + extra) / n, "per_example": "pgd"},
                              "autoattack": {"accuracy": 2 / n, "per_example": "autoattack", "per_attack": {},
                                             "flags": [], "n_examples": n}}}
        correct = {"pgd": np.arange(n) < 2 + extra, "autoattack": np.arange(n) < 2}
        check = by_name(build_checks(summary, eval_record=record, eval_correct=correct))["pgd_autoattack_gap"]
        diff = compare_paired(correct["pgd"], correct["autoattack"]).difference
        assert check["decision"] == decision and check["interval"] == [diff.low, diff.high]
        assert check["n"] == n and check["n_of"] == "evaluation points"
    # an evaluation without AutoAttack: no AutoAttack checks, nothing breaks
    checks = by_name(build_checks(summary, eval_record={"attacks": {"pgd": {"accuracy": 0.9}}}))
    assert "autoattack_flags" not in checks and "pgd_autoattack_gap" not in checks


# --------------------------------------------------------------------------------------------------
# Files, schema and CLI

def run_id(run) -> str:
    return RunDir(run).record()["run_id"]


def test_cli_diagnose_writes_files_and_a_valid_audit(make_run, tmp_path, capsys):
    run = make_run("standard", **TRAINED)
    ev = tmp_path / "eval.json"
    ev.write_text(json.dumps({"run_id": run_id(run), "attacks": {
        "pgd": {"accuracy": 0.1}, "autoattack": {"accuracy": 0.05, "per_attack": {"apgd-ce": 0.08}, "flags": []}}}))
    out = tmp_path / "diag"
    rc = main(["diagnose", "--run", str(run), "--out", str(out), "--n-test", "16", "--quick",
               "--n-curve", "8", "--eval", str(ev), "--transfer-from", str(run), "--device", "cpu"])
    assert rc == 0
    assert "masking:" in capsys.readouterr().out
    audit = json.loads((out / "audit.json").read_text())
    validate_audit(audit)
    assert audit["run_id"] == audit["transfer_run_id"] == run_id(run)
    for name in ("attack_gap", "per_example", "gradient_alignment", "logit_distance", "fgsm_line",
                 "loss_surface", "accuracy_vs_eps", "accuracy_vs_steps", "accuracy_vs_restarts", "curve_points",
                 "transfer", "training_curves", "autoattack", "checks"):
        assert (out / f"{name}.csv").is_file(), name
    for stem in DIAGNOSIS_FIGURES:
        for ext in ("png", "pdf"):
            assert (out / f"{stem}.{ext}").stat().st_size > 1000
    assert {"fgsm_line.png", "checks.csv"} <= set(audit["files"])
    names = {c["name"] for c in audit["checks"]}
    assert {"autoattack_flags", "pgd_autoattack_gap", "transfer_beats_whitebox"} <= names
    assert not list(out.glob(".tmp-*"))

    # the summary is a function of the CSV files: rebuilding it from disk gives the same numbers
    again = summarise(read_tables(out))
    for key, value in audit["summary"].items():
        if key in again and isinstance(value, float):
            assert again[key] == pytest.approx(value, abs=1e-9, nan_ok=True), key

    # --audit-only: an evaluation that arrived later (Square beat the white-box attacks) changes the verdict,
    # without any model work
    ev.write_text(json.dumps({"run_id": run_id(run), "attacks": {"pgd": {"accuracy": 0.5}, "autoattack": {
        "accuracy": 0.1, "per_attack": {"apgd-ce": 0.3, "square": 0.1},
        "flags": ["Square Attack has decreased the robust accuracy of 20%"]}}}))
    rc = main(["diagnose", "--run", str(run), "--out", str(out), "--eval", str(ev), "--audit-only"])
    assert rc == 0
    redone = json.loads((out / "audit.json").read_text())
    validate_audit(redone)
    assert by_name(redone["checks"])["autoattack_flags"]["passed"] is False
    assert by_name(redone["checks"])["autoattack_square_gain"]["passed"] is False
    assert redone["verdict"]["masking"] == "yes"
    assert redone["summary"]["pgd_accuracy"] == audit["summary"]["pgd_accuracy"]
    assert redone["seconds"] == audit["seconds"] and redone["run_id"] == audit["run_id"]
    other = tmp_path / "empty"
    other.mkdir()
    assert main(["diagnose", "--run", str(run), "--out", str(other), "--audit-only"]) == 2
    # the folder audits another run: refused by run_id
    capsys.readouterr()
    assert main(["diagnose", "--run", str(make_run("standard")), "--out", str(out), "--audit-only"]) == 2
    assert "audits run" in capsys.readouterr().err


DIAGNOSIS_FIGURES = {"attacks", "fgsm_line", "loss_surface", "sanity_curves", "gradient_checks",
                     "training_curves"}


@pytest.fixture(scope="module")
def written(make_run, tmp_path_factory):
    """(run, folder, audit) of one `write_audit` call (the library function behind `gmr diagnose`)."""
    run = make_run("standard", **TRAINED)
    out = tmp_path_factory.mktemp("diag")
    return run, out, write_audit(DiagnoseConfig(run=str(run), n_test=16, device="cpu", settings=TINY), out)


def test_diagnosis_figures_have_fixed_names(written):
    _, d, audit = written
    figures = diagnosis_figures(d, audit)           # drawn from the CSVs and the audit in memory
    for ext in ("png", "pdf"):
        assert {p.stem for p in figures if p.suffix == f".{ext}"} == DIAGNOSIS_FIGURES
    for p in figures:
        assert p.parent == d and p.stat().st_size > 1000
    assert not list(d.glob(".tmp-*"))
    # audit.json, written once after the figures, lists every other file of the folder
    assert audit["files"] == sorted(p.name for p in d.iterdir() if p.name != "audit.json")
    assert json.loads((d / "audit.json").read_text())["files"] == audit["files"]


def test_audit_schema_rejects_bad_audits(written):
    audit = json.loads((written[1] / "audit.json").read_text())
    validate_audit(audit)
    bad = dict(audit, verdict={"masking": "maybe", "reasons": ["x"]})
    with pytest.raises(jsonschema.ValidationError):
        validate_audit(bad)
    bad = dict(audit, checks=[dict(audit["checks"][0], explanation="two\nlines")])
    with pytest.raises(jsonschema.ValidationError):
        validate_audit(bad)
    for key in ("verdict", "run_id"):
        with pytest.raises(jsonschema.ValidationError):
            validate_audit({k: v for k, v in audit.items() if k != key})
    for change in ({"decision": "maybe"}, {"interval": [0.1]}, {"n": 0}):
        with pytest.raises(jsonschema.ValidationError):
            validate_audit(dict(audit, checks=[dict(audit["checks"][0], **change)]))
    with pytest.raises(jsonschema.ValidationError):
        validate_audit(dict(audit, checks=[{k: v for k, v in audit["checks"][0].items() if k != "n_needed"}]))


@pytest.mark.parametrize("extra, message", [
    (["--run", "{missing}"], "no such run directory"),
    (["--checkpoint", "middle"], "checkpoint must be best or last"),
    (["--out", "{file}"], "not a folder"),
    (["--eval", "{missing}/e.json"], "does not exist"),
    (["--transfer-from", "{missing}"], "--transfer-from"),
    (["--n-test", "0"], "n_test must be positive"),
    (["--eval", "{other_eval}"], "not --run"),
    (["--eval", "{no_id_eval}"], "names no run_id"),
])
def test_cli_diagnose_bad_input_exits_2_with_one_line(make_run, tmp_path, capsys, extra, message):
    run = make_run("standard", **TRAINED)
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    other_eval = tmp_path / "other.json"
    other_eval.write_text(json.dumps({"run_id": "another-run", "run": str(run), "attacks": {}}))
    no_id_eval = tmp_path / "no-id.json"
    no_id_eval.write_text(json.dumps({"run": str(run), "attacks": {}}))
    args = {"--run": str(run), "--out": str(tmp_path / "out")}
    it = iter(extra)
    for k in it:
        args[k] = next(it).format(missing=tmp_path / "missing", file=a_file, other_eval=other_eval,
                                  no_id_eval=no_id_eval)
    argv = ["diagnose"] + [t for kv in args.items() for t in kv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "out" / "audit.json").exists()


# --------------------------------------------------------------------------------------------------
# The registries: every probe, a probe and a rule added from here, independent randomness

SMALL = ProbeSettings(batch_size=8, n_curve=6, n_surface=1, surface_points=3, line_points=5, pgd_steps=(1, 3),
                      restarts=2, restart_steps=2, sweep_steps=2, eps_factors=(0.0, 1.0), large_eps=(1.0,),
                      attack_steps=3)


def tiny_context() -> ProbeContext:
    """An untrained MLP and a source model on 12 random MNIST-shaped points (two batches)."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(12, 1, 28, 28, generator=g), torch.randint(0, 10, (12,), generator=g)
    torch.manual_seed(0)
    return ProbeContext(mlp().eval(), x, y, 0.1, "mnist", SMALL, seed=0, source_model=mlp().eval())


@pytest.mark.parametrize("name", PROBES.names_in_order())
def test_every_registered_probe_returns_a_table(name):
    ctx = tiny_context()
    rows = PROBES.get(name)(ctx)
    assert rows and all(isinstance(r, dict) and r for r in rows)
    assert all(isinstance(v, (int, float, str)) for r in rows for v in r.values())
    summary = PROBES.entry(name).meta["summary"]
    if summary is not None:          # its headline numbers come from the tables alone
        tables = {n: PROBES.get(n)(ctx) for n in ("per_example", name)}
        assert all(v is None or isinstance(v, (int, float)) for v in summary(tables).values())


def test_per_point_tables_agree_with_the_curves_and_the_batches():
    """curve_points.csv holds the points behind every accuracy of the curves, and per_example.csv the
    per-point cosines behind gradient_alignment.csv and the transfer correctness behind transfer.csv."""
    ctx = tiny_context()
    tables = {n: PROBES.get(n)(ctx) for n in ("per_example", "gradient_alignment", "accuracy_vs_eps",
                                              "accuracy_vs_steps", "accuracy_vs_restarts", "curve_points", "transfer")}
    for curve in ("eps", "steps", "restarts"):
        for row in tables[f"accuracy_vs_{curve}"]:
            points = [r["correct"] for r in tables["curve_points"] if r["curve"] == curve and r["x"] == row[curve]]
            assert len(points) == row["n"] == SMALL.n_curve and np.mean(points) == pytest.approx(row["accuracy"])
    ex = tables["per_example"]
    for row in tables["gradient_alignment"]:
        batch = ex[row["batch"] * SMALL.batch_size:(row["batch"] + 1) * SMALL.batch_size]
        key = "grad_alignment" if row["subset"] == "all" else "grad_alignment_fgsm_robust"
        values = [r[key] for r in batch if not math.isnan(r[key])]
        assert len(values) == row["n"] and np.mean(values) == pytest.approx(row["gradient_alignment"], abs=1e-6)
    transfer = next(r for r in tables["transfer"] if r["kind"] == "transfer")
    assert np.mean([r["transfer_correct"] for r in ex]) == pytest.approx(transfer["accuracy"])


@pytest.fixture
def own_registries(monkeypatch):
    """Probes and rules registered by a test are gone after it."""
    monkeypatch.setattr(PROBES, "_entries", dict(PROBES._entries))
    monkeypatch.setattr(rules_module, "RULES", dict(rules_module.RULES))


def test_a_probe_and_rule_added_here_reach_audit_json_and_a_csv(make_run, tmp_path, own_registries):
    # the README's example: one function, one rule (its summary key needs no schema entry: a number)
    @register_probe("gradient_l1", summary=lambda t: {"mean_gradient_l1": sum(
        r["n"] * r["mean_gradient_l1"] for r in t["gradient_l1"]) / sum(r["n"] for r in t["gradient_l1"])})
    def probe_gradient_l1(ctx):
        return [{"batch": b.index, "n": len(b.x), "mean_gradient_l1": b.grad.flatten(1).abs().sum(1).mean().item()}
                for b in ctx.batches]

    register_rule(Rule("mean_gradient_l1", 1e-8, "below", "symptom", "this test",
                       "mean L1 norm of the input gradient"))
    run, out = make_run("standard", **TRAINED), tmp_path / "diag"
    argv = ["diagnose", "--run", str(run), "--out", str(out), "--n-test", "16", "--quick", "--n-curve", "8",
            "--device", "cpu"]
    assert main(argv) == 0
    audit = json.loads((out / "audit.json").read_text())
    validate_audit(audit)
    check = by_name(audit["checks"])["mean_gradient_l1"]
    assert check["passed"] is True and check["role"] == "symptom" and check["fails_when"] == "below"
    assert check["value"] == audit["summary"]["mean_gradient_l1"] > 1e-8
    assert "gradient_l1.csv" in audit["files"] and (out / "gradient_l1.csv").read_text().startswith("batch,n,")
    assert by_name(audit["checks"])["pgd_restarts_plateau"]      # the built-in checks are all still there
    # the re-audit reads the new table back from its CSV
    assert main(argv + ["--audit-only"]) == 0
    redone = by_name(json.loads((out / "audit.json").read_text())["checks"])["mean_gradient_l1"]
    assert redone["value"] == pytest.approx(check["value"], rel=1e-12)


def test_removing_a_probe_changes_no_other_probe(own_registries):
    """Each probe has its own generator: without gradient_alignment (which draws noise early in the
    order) every other probe gives exactly the same table."""
    torch.manual_seed(0)
    model, source = BinaryLinear(64), BinaryLinear(64, seed=1)
    x = torch.rand(20, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    y = torch.randint(0, 2, (20,), generator=torch.Generator().manual_seed(3))
    before = run_probes(model, x, y, eps=0.1, settings=SMALL, source_model=source).tables
    del PROBES._entries["gradient_alignment"]
    after = run_probes(model, x, y, eps=0.1, settings=SMALL, source_model=source).tables
    assert set(before) - set(after) == {"gradient_alignment"}
    for name, rows in after.items():
        assert json.dumps(rows) == json.dumps(before[name]), name     # exact floats, NaN equal to NaN
    assert probe_seed(0, "transfer") != probe_seed(0, "logit_distance") != probe_seed(1, "logit_distance")


def test_register_rule_rejects_bad_rules(own_registries):
    with pytest.raises(ValueError, match="role"):
        register_rule(Rule("x_check", 0.1, "above", "fatal", "s", "l"))
    with pytest.raises(ValueError, match="direction"):
        register_rule(Rule("x_check", 0.1, "sideways", "symptom", "s", "l"))
    with pytest.raises(ValueError, match="read function"):
        register_rule(Rule("x_check", 0.1, "above", "symptom", "s", "l", taken_from="eval"))
    with pytest.raises(ValueError, match="probe name"):
        register_probe("Bad Name")
