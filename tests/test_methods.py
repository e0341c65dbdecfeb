"""Training methods: smoke steps, counted passes = declared cost, GMR against a hand computation,
eval mode during attacks and train mode during the update, per-dataset option defaults, and the typed
options builder that checks them (gmr.options)."""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gmr.cost import PassCounter
from gmr.methods import METHODS, make_options, method_cost
from gmr.models import create_model
from gmr.options import NonNegativeFloat, PositiveFloat, PositiveInt, build, check, convert_values
from linear_case import B, SEED, W, X, Y, Linear

ALL = METHODS.names()


pytestmark = pytest.mark.usefixtures("one_thread")


def _batch(dataset: str, b: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    shape = (1, 28, 28) if dataset == "mnist" else (3, 32, 32)
    return torch.rand(b, *shape, generator=gen), torch.randint(0, 10, (b,), generator=gen)


def _step(name: str, dataset: str, b: int = 16, seed: int = 0):
    torch.manual_seed(seed)
    model = create_model("tiny_cnn", dataset).train()
    x, y = _batch(dataset, b, seed)
    options = make_options(name, dataset)
    eps = 0.3 if dataset == "mnist" else 8 / 255
    return model, x, y, eps, options


def test_registry_holds_the_issue_methods():
    assert {"standard", "fgsm", "rfgsm", "gmr", "pgd", "fgsm_rs", "n_fgsm", "gradalign",
            "sat_r1", "sat_r3"} <= set(ALL)


@pytest.mark.parametrize("dataset", ["mnist", "cifar10"])
@pytest.mark.parametrize("name", ALL)
def test_smoke_step(name, dataset):
    model, x, y, eps, options = _step(name, dataset)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    before = [p.detach().clone() for p in model.parameters()]
    for _ in range(2):
        out = METHODS.get(name).fn(model, x, y, eps, options)
        assert out.loss.ndim == 0 and torch.isfinite(out.loss)
        assert out.logits.shape == (len(y), 10) and torch.equal(out.targets, y)
        assert all(v.ndim == 0 and torch.isfinite(v) for v in out.probes.values())
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
        opt.step()
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert model.training, "the method must leave the model in train mode"


@pytest.mark.parametrize("name", ALL)
def test_counted_passes_equal_declared_cost(name):
    b = 16
    model, x, y, eps, options = _step(name, "mnist", b)
    counter = PassCounter(model)
    out = METHODS.get(name).fn(model, x, y, eps, options)
    out.loss.backward()
    counter.remove()
    declared = method_cost(name, options, b)
    assert counter.count.forward == pytest.approx(declared.forward * b), "forward passes"
    assert counter.count.backward == pytest.approx(declared.backward * b), "backward passes"


@pytest.mark.parametrize("clean_fraction", [0.25, 0.5])
@pytest.mark.parametrize("name", ["fgsm", "rfgsm"])
def test_counted_passes_with_clean_fraction(name, clean_fraction):
    b = 16
    model, x, y, eps, _ = _step(name, "mnist", b)
    options = make_options(name, "mnist", {"clean_fraction": clean_fraction})
    counter = PassCounter(model)
    METHODS.get(name).fn(model, x, y, eps, options).loss.backward()
    declared = method_cost(name, options, b)
    assert declared.forward < method_cost(name, make_options(name, "mnist"), b).forward
    assert counter.count.forward == pytest.approx(declared.forward * b)
    assert counter.count.backward == pytest.approx(declared.backward * b)


def test_pass_counter_counts_a_known_sequence():
    model = create_model("tiny_cnn", "mnist")
    counter = PassCounter(model)
    x = torch.rand(5, 1, 8, 8)
    with torch.no_grad():
        model(x)
    model(x).sum().backward()
    counter.enabled = False
    model(x).sum().backward()
    assert (counter.count.forward, counter.count.backward) == (10, 5)
    assert counter.count.passes == 7.5


@pytest.mark.parametrize("name", ALL)
def test_attack_forwards_run_in_the_declared_batchnorm_mode(name):
    """Every forward before the update runs in the mode the method declares (`attack_bn`, from its
    official code); the update forward(s) run in train mode; BatchNorm statistics move once per
    train-mode forward (so an eval-mode attack leaves them alone)."""
    model, x, y, eps, options = _step(name, "mnist", 8)
    calls = []

    def hook(module, inputs, output):
        flags = {m.training for m in module.modules()}
        assert len(flags) == 1, "all modules must share one mode within a forward"
        calls.append(module.training)

    model.register_forward_hook(hook)
    bn = next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    tracked = int(bn.num_batches_tracked)
    METHODS.get(name).fn(model, x, y, eps, options)
    declared = METHODS.get(name).attack_bn
    n_update = 2 if name == "rfgsm" else 1            # R-FGSM-AT: a clean and an adversarial forward
    attack, update = calls[:-n_update], calls[-n_update:]
    assert update == [True] * n_update, f"the update forward must run in train mode: {calls}"
    if method_cost(name, options, len(x)).forward > n_update:   # Free-AT's attack is its update forward
        assert attack, "a method with an attack makes at least one attack forward"
    assert attack == [declared == "train"] * len(attack), f"{name} declares {declared}: {calls}"
    assert int(bn.num_batches_tracked) == tracked + sum(calls)
    assert model.training


def test_official_batchnorm_modes():
    """DESIGN.md section 2 (the audit): train mode in FGSM-RS, N-FGSM, GradAlign and Madry's PGD-AT;
    eval mode in SAT-Rx (GMR, SAT-R1, SAT-R3 and the seed paper's FGSM samples)."""
    modes = {name: METHODS.get(name).attack_bn for name in ALL}
    assert {n for n, m in modes.items() if m == "train"} >= {"fgsm_rs", "n_fgsm", "gradalign", "pgd"}
    assert all(modes[n] == "eval" for n in ("gmr", "sat_r1", "sat_r3", "fgsm", "rfgsm"))
    assert all(METHODS.get(n).source for n in ALL), "every method names the code it follows"


def test_gmr_update_sees_both_halves_in_one_forward():
    model, x, y, eps, options = _step("gmr", "mnist", 8)
    sizes = []
    model.register_forward_hook(lambda m, i, o: sizes.append((m.training, len(i[0]))))
    METHODS.get("gmr").fn(model, x, y, eps, options)
    assert sizes == [(False, 16), (True, 16)]


# --------------------------------------------------------------------------------------------------
# GMR against a hand computation

EPS, ALPHA, LAMBDA = 0.3, 0.05, 5.0


def _logits(x):
    return x.reshape(len(x), -1) @ W.T + B


def _ce_input_grad(x, y):
    """d/dx sum_i CE(W x_i + b, y_i) = (softmax(z) - onehot(y)) W, by hand."""
    z = _logits(x)
    p = torch.exp(z - z.max(1, keepdim=True).values)
    p = p / p.sum(1, keepdim=True)
    onehot = torch.zeros_like(p)
    onehot[torch.arange(len(y)), y] = 1.0
    return ((p - onehot) @ W).view_as(x)


def _ce_mean(z, y):
    m = z.max(1, keepdim=True).values
    lse = (m + torch.log(torch.exp(z - m).sum(1, keepdim=True))).squeeze(1)
    return (lse - z[torch.arange(len(y)), y]).mean()


def _expected_gmr(projected: bool):
    torch.manual_seed(SEED)
    noise = torch.randn(X.shape, dtype=X.dtype).sign()       # the sign(N(0, I)) draw of the method
    x_noisy = X + ALPHA * noise                               # not clipped before the gradient
    g, g_noisy = _ce_input_grad(X, Y), _ce_input_grad(x_noisy, Y)
    assert g.abs().min() > 1e-3 and g_noisy.abs().min() > 1e-3, "test data must avoid zero gradients"
    x_fgsm = torch.clamp(X + EPS * torch.sign(g), 0.0, 1.0)
    if projected:  # Tramer et al.: eps - alpha step from the (clipped) noisy point, projection to the ball
        step = torch.clamp(x_noisy, 0.0, 1.0) + (EPS - ALPHA) * torch.sign(g_noisy)
        x_rfgsm = torch.clamp(torch.minimum(torch.maximum(step, X - EPS), X + EPS), 0.0, 1.0)
    else:          # the paper's code: full eps step after the noise, no projection
        x_rfgsm = torch.clamp(x_noisy + EPS * torch.sign(g_noisy), 0.0, 1.0)
    z_fgsm, z_rfgsm = _logits(x_fgsm), _logits(x_rfgsm)
    ce = _ce_mean(z_fgsm, Y)
    reg = ((z_fgsm - z_rfgsm) ** 2).sum(1).mean()
    return dict(loss=ce + LAMBDA * reg, ce=ce, reg=reg, x_fgsm=x_fgsm, x_rfgsm=x_rfgsm, z_fgsm=z_fgsm)


@pytest.mark.parametrize("projected", [False, True])
def test_gmr_loss_matches_hand_computation(projected):
    expected = _expected_gmr(projected)
    model = Linear(W, B).train()
    inputs = []
    model.register_forward_hook(lambda m, i, o: inputs.append(i[0].detach().clone()))
    options = make_options("gmr", "mnist", {"lambda_": LAMBDA, "alpha": ALPHA, "projected": projected})
    torch.manual_seed(SEED)
    out = METHODS.get("gmr").fn(model, X.clone(), Y, EPS, options)

    assert abs(out.loss.item() - expected["loss"].item()) < 1e-6
    assert abs(out.probes["ce"].item() - expected["ce"].item()) < 1e-6
    assert abs(out.probes["reg"].item() - expected["reg"].item()) < 1e-6
    assert torch.allclose(out.logits, expected["z_fgsm"], atol=1e-6, rtol=0)
    # the update forward sees [x_fgsm; x_rfgsm]
    assert len(inputs) == 2
    update = inputs[-1]
    assert torch.allclose(update[:4], expected["x_fgsm"], atol=1e-12, rtol=0)
    assert torch.allclose(update[4:], expected["x_rfgsm"], atol=1e-12, rtol=0)

    dist = (expected["x_rfgsm"] - X).abs().max().item()
    if projected:
        assert dist <= EPS + 1e-12
    else:  # faithful: NOT projected, may lie up to eps + alpha from x (and does here)
        assert EPS + ALPHA / 2 < dist <= EPS + ALPHA + 1e-12
    # the loss is differentiable through both sides
    out.loss.backward()
    assert model.fc.weight.grad is not None and torch.isfinite(model.fc.weight.grad).all()


def test_faithful_and_projected_gmr_differ():
    assert abs(_expected_gmr(False)["loss"] - _expected_gmr(True)["loss"]) > 1e-3


def test_gmr_noise_follows_the_global_seed():
    model = Linear(W, B)
    options = make_options("gmr", "mnist", {"alpha": ALPHA})
    torch.manual_seed(0)
    a = METHODS.get("gmr").fn(model, X, Y, EPS, options).loss
    torch.manual_seed(0)
    b = METHODS.get("gmr").fn(model, X, Y, EPS, options).loss
    assert a.item() == b.item()


# --------------------------------------------------------------------------------------------------
# Options

def test_gmr_defaults_per_dataset():
    mnist = make_options("gmr", "mnist")
    cifar = make_options("gmr", "cifar10")
    assert (mnist.lambda_, mnist.alpha, mnist.projected) == (5.0, 0.01, False)
    assert cifar.lambda_ == 25.0 and cifar.alpha == pytest.approx(2 / 255)
    assert make_options("gmr", "fashion_mnist").lambda_ == 5.0
    assert make_options("gmr", "cifar100").lambda_ == 25.0


def test_other_method_defaults_per_dataset():
    assert make_options("pgd", "mnist").steps == 40 and make_options("pgd", "mnist").step_size == 0.01
    assert make_options("pgd", "cifar10").steps == 7
    # R-FGSM-AT: Tramer et al.'s recipe (alpha 0.05 on MNIST, eps/2 elsewhere; 0.5 clean + 0.5 adv)
    assert make_options("rfgsm", "mnist").alpha == 0.05 and make_options("rfgsm", "cifar10").alpha is None
    assert make_options("rfgsm", "mnist").clean_weight == 0.5
    assert make_options("sat_r1", "mnist").steps == 10 and make_options("sat_r1", "cifar10").steps == 3
    r3 = make_options("sat_r3", "cifar10")
    assert r3.eps_low == pytest.approx(2 / 255) and r3.tau == 0.6 and r3.alpha == pytest.approx(2 / 255)
    assert make_options("sat_r3", "mnist").alpha == 0.01
    assert make_options("gradalign", "mnist").lambda_ == 0.2 and make_options("gradalign", "cifar10").lambda_ is None


def test_gradalign_lambda_follows_the_official_scripts():
    """tml-epfl/understanding-fast-adv-training sh/exps_diff_eps_cifar10.sh:41-56, eps 1..16 (/255)."""
    official = [0.027, 0.036, 0.047, 0.063, 0.084, 0.112, 0.150, 0.200, 0.267, 0.356, 0.474, 0.632,
                0.843, 1.124, 1.500, 2.000]
    from gmr.methods import gradalign_lambda
    # the scripts write three digits, not always rounded (1.1247 at 14/255 is written 1.124)
    assert all(abs(gradalign_lambda(k / 255) - v) < 1e-3 for k, v in zip(range(1, 17), official))
    assert gradalign_lambda(8 / 255) == pytest.approx(0.2) and gradalign_lambda(16 / 255) == pytest.approx(2.0)


# --------------------------------------------------------------------------------------------------
# R-FGSM-AT, SAT-R3 and GradAlign against hand computations on the linear model

def test_rfgsm_loss_is_half_clean_half_adversarial():
    model = Linear(W, B).train()
    inputs = []
    model.register_forward_hook(lambda m, i, o: inputs.append(i[0].detach().clone()))
    options = make_options("rfgsm", "mnist")
    torch.manual_seed(SEED)
    out = METHODS.get("rfgsm").fn(model, X.clone(), Y, EPS, options)
    torch.manual_seed(SEED)
    x_noisy = torch.clamp(X + 0.05 * torch.randn(X.shape, dtype=X.dtype).sign(), 0.0, 1.0)
    step = x_noisy + (EPS - 0.05) * torch.sign(_ce_input_grad(x_noisy, Y))
    x_adv = torch.clamp(torch.minimum(torch.maximum(step, X - EPS), X + EPS), 0.0, 1.0)
    expected = 0.5 * _ce_mean(_logits(X), Y) + 0.5 * _ce_mean(_logits(x_adv), Y)
    assert abs(out.loss.item() - expected.item()) < 1e-9
    assert torch.allclose(inputs[1], x_adv, atol=1e-12, rtol=0) and torch.equal(inputs[2], X)
    seed_paper = make_options("rfgsm", "mnist", {"clean_weight": 0, "alpha": 0.01})
    assert method_cost("rfgsm", seed_paper, 16).forward == 2 and method_cost("rfgsm", options, 16).forward == 3


def test_sat_r3_starts_from_the_noisy_point():
    """SAT-Rx GenerateAdvSamples_sat_r3: x~ = clip(x + alpha sign(N)); x_low, x_high from x~."""
    lam, eps_low, tau, alpha = 1.0, 0.1, 0.4, 0.05
    model = Linear(W, B).train()
    options = make_options("sat_r3", "mnist", {"lambda_": lam, "eps_low": eps_low, "tau": tau, "alpha": alpha})
    torch.manual_seed(SEED)
    out = METHODS.get("sat_r3").fn(model, X.clone(), Y, EPS, options)
    torch.manual_seed(SEED)
    x_noisy = torch.clamp(X + alpha * torch.randn(X.shape, dtype=X.dtype).sign(), 0.0, 1.0)
    sign = torch.sign(_ce_input_grad(x_noisy, Y))
    ce_high = _ce_mean(_logits(torch.clamp(x_noisy + EPS * sign, 0, 1)), Y)
    ce_low = _ce_mean(_logits(torch.clamp(x_noisy + eps_low * sign, 0, 1)), Y)
    expected = ce_high + lam * torch.relu(ce_low - tau * ce_high)
    assert abs(out.loss.item() - expected.item()) < 1e-9


def test_gradalign_second_gradient_is_not_clipped_and_zero_gradients_are_dropped():
    """train.py:193-200 and utils.py:81: g2 at x + eta without clipping to [0, 1]; examples where
    either gradient is zero leave the mean cosine."""
    class Flat(nn.Module):        # zero input gradient for example 0 (its logits do not depend on x)
        def __init__(self):
            super().__init__()
            self.lin = Linear(W, B)

        def forward(self, x):
            z = self.lin(x)
            keep = torch.ones(len(x), 1, dtype=z.dtype)
            keep[0] = 0.0
            return z * keep + B * (1 - keep)

    model = Flat().train()
    seen = []
    model.register_forward_hook(lambda m, i, o: seen.append(i[0].detach().clone()))
    torch.manual_seed(SEED)
    out = METHODS.get("gradalign").fn(model, X.clone(), Y, EPS, make_options("gradalign", "mnist", {"lambda_": 1.0}))
    torch.manual_seed(SEED)
    eta = torch.empty_like(X).uniform_(-EPS, EPS)
    assert torch.allclose(seen[1], X + eta, atol=1e-12, rtol=0), "g2 is taken at x + eta, unclipped"
    assert (seen[1] < 0).any() or (seen[1] > 1).any(), "the test point must leave [0, 1]"
    g1, g2 = _ce_input_grad(X, Y).flatten(1)[1:], _ce_input_grad(X + eta, Y).flatten(1)[1:]
    cos = F.cosine_similarity(g1, g2, dim=1).mean()
    assert abs(out.probes["reg"].item() - (1 - cos.item())) < 1e-9


def test_overrides_and_coercion():
    o = make_options("gmr", "mnist", {"lambda_": "7", "projected": "true"})
    assert o.lambda_ == 7.0 and isinstance(o.lambda_, float) and o.projected is True
    assert make_options("pgd", "cifar10", {"steps": 3}).steps == 3
    with pytest.raises(ValueError, match="lambda_"):
        make_options("gmr", "mnist", {"lambda_": "lots"})


def test_unknown_option_error_lists_valid_options():
    with pytest.raises(ValueError) as info:
        make_options("gmr", "mnist", {"lambda": 5})
    message = str(info.value)
    assert "'lambda'" in message
    for field in dataclasses.fields(METHODS.get("gmr").options):
        assert field.name in message
    with pytest.raises(ValueError, match=r"\(none\)"):
        make_options("standard", "mnist", {"x": 1})


def test_unknown_method_lists_valid_methods():
    with pytest.raises(ValueError) as info:
        make_options("gmrr", "mnist")
    assert all(name in str(info.value) for name in ALL)


# --------------------------------------------------------------------------------------------------
# The typed options builder (gmr.options), shared by method options, configs and attack parameters

@dataclasses.dataclass
class _Opts:
    steps: PositiveInt = 1
    size: float | None = None
    on: bool = False
    loss: Literal["ce", "cw"] = "ce"
    budgets: list[float] = dataclasses.field(default_factory=list)
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)


def test_builder_converts_and_fills_defaults():
    o = build(_Opts, {"steps": 3, "size": 2, "on": True, "budgets": [1, 0.5]})
    assert o == _Opts(steps=3, size=2.0, on=True, budgets=[1.0, 0.5])
    assert isinstance(o.size, float) and all(isinstance(b, float) for b in o.budgets)
    # command-line text is read as the annotated type only when asked for
    o = build(_Opts, {"steps": "4", "size": "none", "on": "yes", "loss": "cw", "budgets": "0.1,0.2"}, strings=True)
    assert o == _Opts(steps=4, size=None, on=True, loss="cw", budgets=[0.1, 0.2])
    with pytest.raises(ValueError, match="option steps must be int >= 1, got '4'"):
        build(_Opts, {"steps": "4"})


def test_builder_unknown_key_lists_the_valid_ones():
    with pytest.raises(ValueError) as info:
        build(_Opts, {"stepz": 3, "on": True})
    assert str(info.value) == "unknown option 'stepz'; valid: steps, size, on, loss, budgets, extra"
    with pytest.raises(ValueError, match=r"unknown parameter 'a', 'b' of attack pgd; valid: steps"):
        convert_values(_Opts, {"a": 1, "b": 2}, kind="parameter", owner="attack", scope="pgd")


@pytest.mark.parametrize("values, message", [
    ({"steps": True}, "option steps must be int >= 1, got True"),      # a switch is not a count
    ({"steps": 2.0}, "option steps must be int >= 1, got 2.0"),
    ({"steps": 0}, "option steps must be int >= 1, got 0"),
    ({"on": 1}, "option on must be bool, got 1"),                       # a count is not a switch
    ({"on": "yes"}, "option on must be bool, got 'yes'"),
    ({"size": True}, "option size must be float or None, got True"),
    ({"size": "0.3"}, "option size must be float or None, got '0.3'"),
    ({"loss": "mse"}, "option loss must be one of ce, cw, got 'mse'"),
    ({"budgets": [0.1, "x"]}, "option budgets must be a list of float, got [0.1, 'x']"),
    ({"extra": [1]}, "option extra must be a mapping of key: value, got [1]"),
])
def test_builder_wrong_type_is_one_line(values, message):
    with pytest.raises(ValueError) as info:
        build(_Opts, values)
    assert str(info.value) == message


def test_builder_bounds_reject_nan_and_inf():
    @dataclasses.dataclass
    class Step:
        size: PositiveFloat = 1.0
        alpha: NonNegativeFloat = 0.0

    assert build(Step, {"size": 0.5, "alpha": 0}).alpha == 0.0
    for bad in ({"size": 0.0}, {"size": math.inf}, {"alpha": -0.1}, {"alpha": math.nan}):
        with pytest.raises(ValueError, match="must be float [>]"):
            build(Step, bad)


def test_check_rechecks_an_instance_built_in_code():
    check(_Opts(steps=2))
    with pytest.raises(ValueError, match="option on must be bool, got 'no'"):
        check(_Opts(on="no"))


def test_method_options_reject_bool_int_confusion():
    with pytest.raises(ValueError, match="option gmr.projected must be bool, got 2"):
        make_options("gmr", "mnist", {"projected": 2})
    with pytest.raises(ValueError, match="option pgd.steps must be int >= 1, got True"):
        make_options("pgd", "mnist", {"steps": True})
    assert make_options("pgd", "mnist", {"steps": "5"}).steps == 5


@pytest.mark.parametrize("method, option, value, bound", [
    ("pgd", "steps", 0, "int >= 1"), ("pgd", "step_size", 0, "float > 0"),
    ("gmr", "alpha", -1, "float >= 0"), ("gmr", "lambda_", -0.5, "float >= 0"),
    ("rfgsm", "alpha", float("nan"), "float >= 0 or None"), ("fgsm", "clean_fraction", 1.5, "float >= 0 and <= 1"),
    ("sat_r1", "steps", 0, "int >= 1"), ("n_fgsm", "step_factor", 0, "float > 0"),
])
def test_method_options_out_of_range_are_refused(method, option, value, bound):
    with pytest.raises(ValueError, match=f"option {method}.{option} must be {bound}, got"):
        make_options(method, "mnist", {option: value})
