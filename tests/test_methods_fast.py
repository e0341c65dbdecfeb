"""The fast-AT methods of issue 13 (ZeroGrad, MultiGrad, GAT, NuAT, ELLE, N-AAER, SSAT) against hand
computations on a linear model: the random draws are replayed from the same seed, the input gradients
are written in closed form (no autograd), and the training batch and loss the method builds are
compared with the ones its official code would build."""
from __future__ import annotations

import pytest
import torch

from gmr.methods import METHODS, _aaer_penalty, _relax_this_batch, elle_lambda, make_options
from linear_case import B, SEED, W, X, Y, Linear

pytestmark = pytest.mark.usefixtures("one_thread")


def _run(name: str, overrides: dict, eps: float, x=X, y=Y):
    """The method's StepOutput on the linear model from SEED, and the inputs of its forwards."""
    model = Linear().train()
    seen = []
    model.register_forward_hook(lambda m, i, o: seen.append(i[0].detach().clone()))
    torch.manual_seed(SEED)
    out = METHODS.get(name).fn(model, x.clone(), y, eps, make_options(name, "mnist", overrides))
    return out, seen


def _logits(x):
    return x.reshape(len(x), -1) @ W.T + B


def _softmax(z):
    e = torch.exp(z - z.max(1, keepdim=True).values)
    return e / e.sum(1, keepdim=True)


def _onehot(y):
    out = torch.zeros(len(y), 3, dtype=torch.float64)
    out[torch.arange(len(y)), y] = 1.0
    return out


def _ce(z, y):
    """Per-example cross-entropy: logsumexp(z) - z_y."""
    m = z.max(1, keepdim=True).values
    return (m + torch.log(torch.exp(z - m).sum(1, keepdim=True))).squeeze(1) - z[torch.arange(len(y)), y]


def _ce_grad(x, y, extra_dz=None):
    """d/dx of sum CE(W x + b) (+ a term whose gradient w.r.t. the logits is extra_dz): (p - e_y + dz) W."""
    dz = _softmax(_logits(x)) - _onehot(y)
    if extra_dz is not None:
        dz = dz + extra_dz
    assert (dz @ W).abs().min() > 1e-6, "test data must avoid zero gradient components"
    return (dz @ W).view_as(x)


def _project(x_adv, x, eps):
    return torch.clamp(torch.minimum(torch.maximum(x_adv, x - eps), x + eps), 0.0, 1.0)


def _batch(n: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 1, 2, 3, generator=gen, dtype=torch.float64),
            torch.randint(0, 3, (n,), generator=gen))


# --------------------------------------------------------------------------------------------------
# ZeroGrad and MultiGrad (rohban-lab/catastrophic_overfitting)

@pytest.mark.parametrize("q", [0.35, 0.4])   # 0.4 of 6 components: the threshold is the third smallest
def test_zerograd_zeroes_the_components_below_the_quantile(q):
    eps = 0.2
    out, seen = _run("zerograd", {"quantile": q}, eps)
    torch.manual_seed(SEED)
    start = torch.clamp(X + torch.empty_like(X).uniform_(-eps, eps), 0.0, 1.0)
    g = _ce_grad(start, Y).flatten(1)
    s = g.abs().sort(1).values                        # torch.quantile's linear rule: position q (n - 1)
    pos = q * (g.shape[1] - 1)
    lo = int(pos)
    threshold = s[:, lo] + (pos - lo) * (s[:, lo + 1] - s[:, lo])
    kept = g.abs() >= threshold[:, None]
    assert (kept.sum(1) == 4).all(), "at q 0.35 of 6 components, the 2 smallest are zeroed"
    step = torch.where(kept, 2 * eps * torch.sign(g), torch.zeros_like(g)).view_as(X)
    x_adv = _project(start + step, X, eps)
    assert torch.allclose(seen[-1], x_adv, atol=1e-12, rtol=0)
    assert abs(out.loss.item() - _ce(_logits(x_adv), Y).mean().item()) < 1e-9
    zeroed = (~kept).view_as(X)
    assert torch.equal(seen[-1][zeroed], _project(start, X, eps)[zeroed]), "zeroed pixels stay at the start"


def _multigrad_expected(x, y, eps, samples, agree, parallel):
    torch.manual_seed(SEED)
    if parallel:
        xs = torch.cat([x] * samples)
        starts = torch.clamp(xs + torch.empty_like(xs).uniform_(-eps, eps), 0, 1).split(len(x))
    else:
        starts = [torch.clamp(x + torch.empty_like(x).uniform_(-eps, eps), 0, 1) for _ in range(samples)]
    total = sum(torch.sign(_ce_grad(s, y)) for s in starts)
    total = torch.where(total.abs() < 2 * agree - samples, torch.zeros_like(total), total)
    return _project(x + 2 * eps * torch.sign(total), x, eps), total


@pytest.mark.parametrize("parallel", [False, True])
@pytest.mark.parametrize("agree", [3, 2])
def test_multigrad_moves_only_where_the_signs_agree(agree, parallel):
    x, y = _batch(16, 7)
    eps = 0.45
    out, seen = _run("multigrad", {"samples": 3, "agree": agree, "parallel": parallel}, eps, x, y)
    x_adv, total = _multigrad_expected(x, y, eps, 3, agree, parallel)
    assert torch.allclose(seen[-1], x_adv, atol=1e-12, rtol=0)
    assert abs(out.loss.item() - _ce(_logits(x_adv), y).mean().item()) < 1e-9
    if agree == 3:  # the test data must exercise both branches
        assert (total == 0).any() and (total != 0).any()
        assert torch.equal(seen[-1][total == 0], x[total == 0]), "components without agreement stay at x"


def test_multigrad_refuses_more_agreement_than_samples():
    model = Linear()
    with pytest.raises(ValueError, match="agree"):
        METHODS.get("multigrad").fn(model, X, Y, 0.1, make_options("multigrad", "mnist", {"agree": 4}))


# --------------------------------------------------------------------------------------------------
# GAT and NuAT (val-iisc): guided single-step attack from a Bernoulli start

def _guided_expected(eps, noise_factor, extra_dz):
    """The official attack: target from x, start clip(x + k eps sign(0.5 - U)), one eps sign step on
    CE + relaxation, projection; extra_dz(z_start, z_clean) is the relaxation's gradient w.r.t. z."""
    torch.manual_seed(SEED)
    start = torch.clamp(X + noise_factor * eps * torch.sign(0.5 - torch.rand_like(X)), 0.0, 1.0)
    dz = None if extra_dz is None else extra_dz(_logits(start), _logits(X))
    step = torch.clamp(start + eps * torch.sign(_ce_grad(start, Y, dz)), 0.0, 1.0)
    return _project(step, X, eps)


def _gat_dz(lam):
    """d/dz of lam ||P - softmax(z)||^2 = -2 lam (diag(r) - r r^T)(P - r), r = softmax(z)."""
    def dz(z_start, z_clean):
        r, p = _softmax(z_start), _softmax(z_clean)
        d = p - r
        return -2 * lam * (r * d - r * (r * d).sum(1, keepdim=True))
    return dz


def _nuat_dz(lam):
    """d/dz of lam ||z_clean - z||_* = -lam U V^T (A = z_clean - z = U S V^T, full column rank)."""
    def dz(z_start, z_clean):
        u, s, vh = torch.linalg.svd(z_clean - z_start, full_matrices=False)
        assert s.min() > 1e-6
        return -lam * (u @ vh)
    return dz


@pytest.mark.parametrize("relax", [True, False])
def test_gat_loss_matches_hand_computation(relax):
    eps, lam, noise = 0.3, 15.0, 1.0
    out, seen = _run("gat", {"lambda_": lam, "noise_factor": noise, "relax_rate": 1.0 if relax else 0.0}, eps)
    x_adv = _guided_expected(eps, noise, _gat_dz(lam) if relax else None)
    assert torch.allclose(seen[-1], torch.cat([x_adv, X]), atol=1e-12, rtol=0), "one update forward on [x_adv; x]"
    reg = ((_softmax(_logits(X)) - _softmax(_logits(x_adv))) ** 2).sum(1).mean()
    expected = _ce(_logits(X), Y).mean() + lam * reg
    assert abs(out.loss.item() - expected.item()) < 1e-9
    assert abs(out.probes["reg"].item() - reg.item()) < 1e-9
    assert torch.allclose(out.logits, _logits(x_adv), atol=1e-9, rtol=0)


def test_gat_relaxation_changes_the_attack():
    eps, lam = 0.3, 15.0
    with_term = _guided_expected(eps, 1.0, _gat_dz(lam))
    without = _guided_expected(eps, 1.0, None)
    assert not torch.allclose(with_term, without), "the test data must make the relaxation term matter"


@pytest.mark.parametrize("lam", [4.5, 1.5])
def test_nuat_loss_matches_hand_computation(lam):
    eps, noise = 0.3, 0.5
    out, seen = _run("nuat", {"lambda_": lam, "noise_factor": noise, "relax_rate": 1.0}, eps)
    x_adv = _guided_expected(eps, noise, _nuat_dz(lam))
    assert not torch.allclose(x_adv, _guided_expected(eps, noise, None)), "the nuclear term must matter here"
    if lam == 1.5:
        assert not torch.allclose(x_adv, _guided_expected(eps, noise, _nuat_dz(lam / 2))), "and its weight"
    assert torch.allclose(seen[-1], torch.cat([x_adv, X]), atol=1e-12, rtol=0)
    nuc = torch.linalg.svdvals(_logits(X) - _logits(x_adv)).sum() / len(X)
    expected = _ce(_logits(X), Y).mean() + lam * nuc
    assert abs(out.loss.item() - expected.item()) < 1e-9
    assert abs(out.probes["reg"].item() - nuc.item()) < 1e-9


def test_relaxation_rate_draws_only_when_it_must():
    torch.manual_seed(0)
    state = torch.get_rng_state()
    assert _relax_this_batch(1.0) is True and _relax_this_batch(0.0) is False
    assert torch.equal(torch.get_rng_state(), state), "rates 0 and 1 draw nothing"
    torch.manual_seed(0)
    draws = [_relax_this_batch(0.5) for _ in range(400)]
    assert 150 < sum(draws) < 250


# --------------------------------------------------------------------------------------------------
# ELLE (LIONS-EPFL/ELLE)

def test_elle_loss_matches_hand_computation():
    eps, lam = 0.3, 1000.0
    out, seen = _run("elle", {"lambda_": lam}, eps)
    torch.manual_seed(SEED)
    x_adv = X + eps * torch.sign(_ce_grad(X, Y))             # from x, not clipped to [0, 1]
    assert (x_adv < 0).any() or (x_adv > 1).any(), "the test point must leave [0, 1]"
    x_ab = torch.cat([X, X])
    x_ab = x_ab + eps * (2 * torch.rand_like(x_ab) - 1)
    a = torch.rand(4, dtype=torch.float64)
    x_c = (1 - a.view(-1, 1, 1, 1)) * x_ab[:4] + a.view(-1, 1, 1, 1) * x_ab[4:]
    la, lb, lc = _ce(_logits(x_ab[:4]), Y), _ce(_logits(x_ab[4:]), Y), _ce(_logits(x_c), Y)
    lin_err = ((lc - ((1 - a) * la + a * lb)) ** 2).mean()
    expected = _ce(_logits(x_adv), Y).mean() + lam * lin_err
    assert torch.allclose(seen[1], x_adv, atol=1e-12, rtol=0)
    assert torch.allclose(seen[2], torch.cat([x_ab, x_c]), atol=1e-12, rtol=0), "one forward of the triplets"
    assert abs(out.probes["reg"].item() - lin_err.item()) < 1e-12
    assert abs(out.loss.item() - expected.item()) < 1e-9


def test_elle_lambda_follows_the_official_scripts():
    """scripts/run_elle_cifar10.sh: 1000 at 2..8/255, 5000 at 10..20/255, 10000 at 22..26/255."""
    official = {2: 1000, 4: 1000, 6: 1000, 8: 1000, 10: 5000, 12: 5000, 14: 5000, 16: 5000, 18: 5000,
                20: 5000, 22: 10000, 24: 10000, 26: 10000}
    assert all(elle_lambda(k / 255) == v for k, v in official.items())
    assert make_options("elle", "cifar10").lambda_ is None and make_options("elle", "mnist").lambda_ == 1000.0


# --------------------------------------------------------------------------------------------------
# N-AAER (tmllab/2023_NeurIPS_AAER)

def test_aaer_penalty_matches_hand_computation():
    o = make_options("n_aaer", "mnist", {"lambda1": 1.0, "lambda2": 1.5, "lambda3": 0.15})
    before = torch.tensor([1.0, 0.5, 2.0, 0.3], dtype=torch.float64)
    after = torch.tensor([0.8, 0.9, 1.5, 0.4], dtype=torch.float64, requires_grad=True)   # 0, 2 abnormal
    z_start = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.5, 0.5, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    z_adv = torch.tensor([[0.0, 1.0, 0.0], [0.0, 1.2, 0.0], [0.5, -1.5, 0.0], [0.0, 0.0, 1.1]],
                         dtype=torch.float64, requires_grad=True)
    penalty = _aaer_penalty(o, before, after, z_start, z_adv)
    decrease = ((1.0 - 0.8) + (2.0 - 1.5)) / 2                 # mean loss decrease of the abnormal ones
    variation = (2.0 + 4.0) / 2                                # their mean squared logit change
    normal = (0.04 + 0.01) / 2
    assert abs(penalty.item() - 2 / 4 * (1.5 * decrease + 0.15 * (variation - normal))) < 1e-12
    penalty.backward()
    assert after.grad[[1, 3]].abs().sum() == 0 and z_adv.grad[[1, 3]].abs().sum() == 0, \
        "normal examples enter only as a constant"
    assert _aaer_penalty(o, before, before + 1, z_start, z_adv).item() == 0.0, "no abnormal: no term"
    assert _aaer_penalty(o, before, before - 0.1, z_start, z_adv).item() == 0.0, "no normal: no term"


def test_n_aaer_attack_and_loss_on_the_linear_model():
    """Cross-entropy of a linear model is convex in x, so a gradient-sign step never lowers it: every
    example is normal and the loss is CE(x_adv) alone."""
    eps = 0.2
    out, seen = _run("n_aaer", {}, eps)
    torch.manual_seed(SEED)
    start = torch.clamp(X + torch.empty_like(X).uniform_(-2 * eps, 2 * eps), 0.0, 1.0)
    x_adv = torch.clamp(start + eps * torch.sign(_ce_grad(start, Y)), 0.0, 1.0)
    assert torch.allclose(seen[1], x_adv, atol=1e-12, rtol=0)
    assert (x_adv - X).abs().max() > eps + 1e-3, "N-AAER does not project to the eps-ball"
    assert (_ce(_logits(x_adv), Y) >= _ce(_logits(start), Y)).all()
    assert abs(out.loss.item() - _ce(_logits(x_adv), Y).mean().item()) < 1e-9 and out.probes["reg"] == 0


# --------------------------------------------------------------------------------------------------
# SSAT (Harry24k/catastrophic-overfitting)

def test_ssat_trains_on_the_first_misclassified_checkpoint():
    x, y = _batch(32, 3)
    eps, c = 0.4, 3
    out, seen = _run("ssat", {"checkpoints": c}, eps, x, y)
    torch.manual_seed(SEED)
    start = torch.clamp(x + torch.empty_like(x).uniform_(-eps, eps), 0.0, 1.0)
    x_adv = _project(start + 1.25 * eps * torch.sign(_ce_grad(start, y)), x, eps)
    pert = x_adv - x
    expected, branch = x_adv.clone(), []
    for i in range(len(x)):
        if _logits(start[i:i + 1]).argmax(1).item() != y[i]:
            expected[i], kind = x[i], "start"
        else:
            kind = "full"
            for k in range(1, c):
                x_k = x[i:i + 1] + k * (pert[i:i + 1] / c)
                if _logits(x_k).argmax(1).item() != y[i]:
                    expected[i], kind = x_k[0], f"checkpoint {k}"
                    break
        branch.append(kind)
    assert {"start", "full", "checkpoint 1"} <= set(branch), f"test data must exercise the branches: {branch}"
    assert torch.allclose(seen[-1], expected, atol=1e-12, rtol=0)
    assert abs(out.loss.item() - _ce(_logits(expected), y).mean().item()) < 1e-9


# --------------------------------------------------------------------------------------------------
# Defaults per dataset family

def test_fast_method_defaults_per_dataset():
    assert make_options("zerograd", "cifar10").quantile == 0.35
    assert make_options("multigrad", "mnist").samples == 3 and make_options("multigrad", "mnist").agree is None
    gat_m, gat_c = make_options("gat", "mnist"), make_options("gat", "cifar10")
    assert (gat_m.lambda_, gat_m.noise_factor, gat_m.relax_rate) == (15.0, 1.0, 1.0)
    assert (gat_c.lambda_, gat_c.noise_factor, gat_c.relax_rate) == (10.0, 0.5, 0.5)
    nuat = make_options("nuat", "cifar10")
    assert (nuat.lambda_, nuat.noise_factor, nuat.relax_rate) == (4.5, 0.5, 0.5)
    aaer = make_options("n_aaer", "cifar10")
    assert (aaer.lambda1, aaer.lambda2, aaer.lambda3, aaer.noise_factor, aaer.projected) == (1.0, 1.5, 0.15, 2.0, False)
    assert make_options("ssat", "cifar10").step_factor == 1.25 and make_options("ssat", "mnist").checkpoints == 3
    modes = {n: METHODS.get(n).attack_bn for n in ("zerograd", "multigrad", "gat", "nuat", "elle", "n_aaer", "ssat")}
    assert modes == {"zerograd": "train", "multigrad": "train", "gat": "eval", "nuat": "eval",
                     "elle": "train", "n_aaer": "train", "ssat": "eval"}
