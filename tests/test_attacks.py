"""Attacks are pure functions: outputs in [0, 1] and the eps-ball; model mode and .grad untouched."""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gmr import attacks
from gmr.attacks import fgsm, ifgsm, margin_loss, per_example_loss, pgd, rfgsm
from gmr.models import create_model

TOL = 1e-6


pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny(channels: int, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = create_model("tiny_cnn", "mnist" if channels == 1 else "cifar10")
    # a little BatchNorm state so that eval and train modes differ
    with torch.no_grad():
        model.train()
        model(torch.rand(8, channels, 12, 12))
    return model


MODELS = {1: _tiny(1), 3: _tiny(3)}


def _inputs(seed: int, n: int, channels: int, size: int):
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n, channels, size, size, generator=gen)
    # pixels at the borders of [0, 1], where clipping matters
    edge = torch.rand(x.shape, generator=gen)
    x = torch.where(edge < 0.15, torch.zeros_like(x), torch.where(edge > 0.85, torch.ones_like(x), x))
    y = torch.randint(0, 10, (n,), generator=gen)
    return x, y


def _run(name: str, model, x, y, eps: float, frac: float, steps: int, restarts: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    if name == "fgsm":
        return fgsm(model, x, y, eps)
    if name == "rfgsm":
        return rfgsm(model, x, y, eps, alpha=frac * eps, generator=gen)
    if name == "ifgsm":
        return ifgsm(model, x, y, eps, steps)
    if name in ("pgd", "pgd_cw"):
        return pgd(model, x, y, eps, steps, step_size=max(frac, 0.05) * eps * 2, restarts=restarts,
                   loss="cw" if name == "pgd_cw" else "ce", generator=gen)
    raise AssertionError(name)


ATTACK_NAMES = ["fgsm", "rfgsm", "ifgsm", "pgd", "pgd_cw"]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(ATTACK_NAMES),
       seed=st.integers(0, 2**16),
       n=st.integers(1, 5),
       channels=st.sampled_from([1, 3]),
       size=st.integers(4, 12),
       eps=st.one_of(st.just(0.0), st.just(1.0), st.floats(1e-3, 0.5)),
       frac=st.floats(0.0, 1.0),
       steps=st.integers(1, 3),
       restarts=st.integers(1, 3))
def test_outputs_in_unit_box_and_eps_ball(name, seed, n, channels, size, eps, frac, steps, restarts):
    model = MODELS[channels]
    x, y = _inputs(seed, n, channels, size)
    x_adv = _run(name, model, x, y, eps, frac, steps, restarts, seed)
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype
    assert not x_adv.requires_grad
    assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
    assert (x_adv - x).abs().max() <= eps + TOL
    assert torch.isfinite(x_adv).all()


def test_fgsm_moves_every_free_pixel_by_eps():
    model = MODELS[1]
    x = torch.full((4, 1, 8, 8), 0.5)
    y = torch.arange(4)
    x_adv = fgsm(model, x, y, 0.1)
    grad, _ = attacks.input_gradient(model.eval(), x, y)
    moved = grad != 0
    assert torch.allclose((x_adv - x)[moved].abs(), torch.tensor(0.1), atol=TOL)
    assert torch.equal(torch.sign(x_adv - x)[moved], grad.sign()[moved])


def test_rfgsm_rejects_alpha_above_eps():
    x, y = _inputs(0, 2, 1, 8)
    with pytest.raises(ValueError, match="alpha"):
        rfgsm(MODELS[1], x, y, eps=0.1, alpha=0.2)


def _mixed_modes(model: torch.nn.Module) -> dict[str, bool]:
    model.train()
    for i, m in enumerate(model.modules()):
        if i % 2:
            m.eval()
    return {name: m.training for name, m in model.named_modules()}


@pytest.mark.parametrize("name", ATTACK_NAMES)
@pytest.mark.parametrize("start", ["train", "eval", "mixed"])
def test_module_modes_restored(name, start):
    model = _tiny(1, seed=1)
    if start == "mixed":
        before = _mixed_modes(model)
        assert len(set(before.values())) == 2
    else:
        model.train(start == "train")
        before = {n: m.training for n, m in model.named_modules()}
    seen = []
    model.register_forward_hook(lambda m, i, o: seen.append(all(not s.training for s in m.modules())))
    x, y = _inputs(0, 3, 1, 8)
    _run(name, model, x, y, 0.1, 0.5, 2, 2, 0)
    assert seen and all(seen), "attacks must run every module in eval mode"
    assert {n: m.training for n, m in model.named_modules()} == before


@pytest.mark.parametrize("name", ATTACK_NAMES)
def test_parameter_grads_untouched(name):
    x, y = _inputs(1, 3, 1, 8)
    model = _tiny(1, seed=2)
    _run(name, model, x, y, 0.1, 0.5, 2, 2, 0)
    assert all(p.grad is None for p in model.parameters()), "None grads must stay None"

    model(x).sum().backward()
    before = [p.grad.clone() for p in model.parameters()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    _run(name, model, x, y, 0.1, 0.5, 2, 2, 0)
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), before))
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in state.items()), "parameters and buffers unchanged"


def test_attacks_leave_the_input_unchanged():
    x, y = _inputs(2, 4, 3, 8)
    x0 = x.clone()
    for name in ATTACK_NAMES:
        _run(name, MODELS[3], x, y, 0.2, 0.5, 2, 2, 0)
        assert torch.equal(x, x0), name


@pytest.mark.parametrize("loss", ["ce", "cw"])
def test_pgd_restarts_at_least_as_strong_as_one(loss):
    torch.manual_seed(3)
    model = create_model("tiny_cnn", "mnist").eval()
    x, _ = _inputs(5, 64, 1, 10)
    with torch.no_grad():
        y = model(x).argmax(1)  # every point starts correctly classified
    one = pgd(model, x, y, 0.02, 3, 0.007, restarts=1, loss=loss, generator=torch.Generator().manual_seed(7))
    many = pgd(model, x, y, 0.02, 3, 0.007, restarts=4, loss=loss, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        z1, zm = model(one), model(many)
    wrong1, wrongm = z1.argmax(1) != y, zm.argmax(1) != y
    assert bool((wrongm | ~wrong1).all()), "a point broken by one restart must stay broken"
    assert wrongm.sum() >= wrong1.sum()
    still = ~wrong1 & ~wrongm
    l1, lm = per_example_loss(z1, y, loss), per_example_loss(zm, y, loss)
    assert bool((lm[still] >= l1[still] - 1e-6).all()), "restarts keep the worst case per example"
    assert not torch.equal(one, many), "later restarts should improve some points"


def test_pgd_restart_keeps_misclassified_point_over_higher_loss(monkeypatch):
    """Per example, a misclassifying restart outranks a higher-loss correct one."""
    class Fixed(torch.nn.Module):
        # logits depend on the input mean only: class 1 wins when the mean is above 0.5
        def forward(self, x):
            m = x.flatten(1).mean(1, keepdim=True)
            return torch.cat([torch.zeros_like(m), 20 * (m - 0.5)], 1)

    x = torch.full((1, 1, 2, 2), 0.45)
    y = torch.tensor([0])
    out = pgd(Fixed(), x, y, 0.1, 2, 0.05, restarts=3, generator=torch.Generator().manual_seed(0))
    assert Fixed()(out).argmax(1).item() == 1


def test_margin_loss_hand_example():
    logits = torch.tensor([[1.0, 3.0, 2.0], [0.5, -1.0, 0.25], [2.0, 2.0, -4.0]])
    y = torch.tensor([1, 0, 2])
    expected = torch.tensor([2.0 - 3.0, 0.25 - 0.5, 2.0 - (-4.0)])
    assert torch.allclose(margin_loss(logits, y), expected)
    assert torch.allclose(per_example_loss(logits, y, "cw"), expected)
    # the true class is excluded from the max even when it is the largest
    assert margin_loss(torch.tensor([[5.0, 1.0]]), torch.tensor([0])).item() == -4.0
    # input is not modified in place
    assert logits[0, 1] == 3.0
    with pytest.raises(ValueError, match="cw"):
        per_example_loss(logits, y, "hinge")


def test_run_attack_uses_dataset_defaults():
    assert attacks.attack_defaults("pgd", "mnist") == dict(steps=100, step_size=0.01, restarts=1, loss="ce")
    assert attacks.attack_defaults("pgd", "cifar10")["step_size"] == pytest.approx(2 / 255)
    x, y = _inputs(0, 2, 1, 8)
    out = attacks.run_attack("ifgsm", MODELS[1], x, y, 0.1, steps=2)
    assert (out - x).abs().max() <= 0.1 + TOL


def test_ifgsm_defaults_are_the_paper_codes_k_steps_of_eps_over_k():
    """SAT-Rx tools/attacks.py:77-91 with ifgsm_steps 100 (MNIST) and 20 (CIFAR-10)."""
    assert attacks.attack_defaults("ifgsm", "mnist") == {"steps": 100}
    assert attacks.attack_defaults("ifgsm", "cifar10") == {"steps": 20}
    model = MODELS[1]
    x, y = torch.rand(4, 1, 12, 12), torch.randint(0, 10, (4,))
    out = ifgsm(model, x, y, 0.3, 100)
    assert torch.allclose(out, pgd(model, x, y, 0.3, 100, 0.003, random_start=False))


def test_pgd_cw_hinge_stops_at_kappa():
    """SAT-Rx CW_loss (tools/attacks.py:141-148): -relu(z_y - max_other + kappa); no gradient once a
    point is misclassified by kappa logits."""
    logits = torch.tensor([[5.0, 0.0, 1.0], [0.0, 60.0, 0.0]], requires_grad=True)
    y = torch.tensor([0, 0])
    loss = per_example_loss(logits, y, "cw", kappa=50.0)
    assert loss.tolist() == pytest.approx([-(5.0 - 1.0 + 50.0), 0.0])
    loss.sum().backward()
    assert logits.grad[1].abs().sum() == 0 and logits.grad[0].abs().sum() > 0
    assert attacks.attack_defaults("pgd_cw", "mnist")["kappa"] == 50.0
