"""Linf attacks as pure functions of (model, x, y, parameters).

Every attack runs the model in eval mode and restores each module's train/eval flag afterwards; it
takes input gradients with `torch.autograd.grad`, so the parameters' `.grad` fields are untouched.
Outputs are always in [0, 1] and inside the eps-ball around x (R-FGSM's faithful GMR variant in
`methods.py` is the one documented exception, and it is not an evaluation attack).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .data import dataset_info
from .registry import Registry


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every module in eval mode; restore each module's own flag on exit."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, flag in flags:
            m.training = flag


def margin_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-example CW margin: max_{j != y} z_j - z_y (positive means misclassified)."""
    true = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.clone()
    other.scatter_(1, y[:, None], float("-inf"))
    return other.max(1).values - true


def per_example_loss(logits: torch.Tensor, y: torch.Tensor, loss: str = "ce") -> torch.Tensor:
    if loss == "ce":
        return F.cross_entropy(logits, y, reduction="none")
    if loss == "cw":
        return margin_loss(logits, y)
    raise ValueError(f"unknown attack loss {loss!r}; valid: ce, cw")


def input_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss: str = "ce",
                   create_graph: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradient of the summed loss w.r.t. the input, and the logits, with the model as it is.

    The sum (not the mean) keeps gradients away from float underflow; every use here takes the sign or a
    cosine, which the scale does not change.
    """
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = model(x)
        value = per_example_loss(logits, y, loss).sum()
        (grad,) = torch.autograd.grad(value, x, create_graph=create_graph)
    return grad, logits


def project(x_adv: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    """Nearest point to x_adv inside the eps-ball around x and inside [0, 1]."""
    return torch.min(torch.max(x_adv, x - eps), x + eps).clamp_(0.0, 1.0)


def _uniform_like(x: torch.Tensor, low: float, high: float, generator: torch.Generator | None):
    if generator is None:
        return torch.empty_like(x).uniform_(low, high)
    noise = torch.rand(x.shape, generator=generator, device=generator.device, dtype=x.dtype)
    return (noise.to(x.device) * (high - low) + low)


def random_sign_like(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """sign(N(0, I)): +-1 with equal probability (the noise of R-FGSM and GMR)."""
    noise = torch.randn(x.shape, generator=generator, dtype=x.dtype,
                        device=generator.device if generator is not None else x.device)
    return noise.to(x.device).sign()


def fgsm(model, x, y, eps: float) -> torch.Tensor:
    with eval_mode(model):
        grad, _ = input_gradient(model, x, y)
    return (x + eps * grad.sign()).clamp_(0.0, 1.0).detach()


def rfgsm(model, x, y, eps: float, alpha: float, generator=None) -> torch.Tensor:
    """Tramer et al. 2018: a random alpha-sign step, then an (eps - alpha) gradient-sign step."""
    if not 0 <= alpha <= eps:
        raise ValueError(f"R-FGSM needs 0 <= alpha <= eps, got alpha={alpha}, eps={eps}")
    x_noisy = (x + alpha * random_sign_like(x, generator)).clamp(0.0, 1.0)
    with eval_mode(model):
        grad, _ = input_gradient(model, x_noisy, y)
    return project(x_noisy + (eps - alpha) * grad.sign(), x, eps).detach()


def pgd(model, x, y, eps: float, steps: int, step_size: float, restarts: int = 1, loss: str = "ce",
        random_start: bool = True, generator: torch.Generator | None = None) -> torch.Tensor:
    """Madry et al.: (random start), `steps` signed-gradient steps with projection, restarts.

    Over restarts, each example keeps its worst case: a misclassifying point if any restart found one,
    otherwise the point of highest loss.
    """
    if steps < 1 or restarts < 1:
        raise ValueError(f"PGD needs steps >= 1 and restarts >= 1, got {steps} and {restarts}")
    best = x.detach().clone()
    best_score = torch.full((len(x),), float("-inf"), device=x.device)
    with eval_mode(model):
        for _ in range(restarts):
            x_adv = x.detach().clone()
            if random_start:
                x_adv = project(x_adv + _uniform_like(x, -eps, eps, generator), x, eps)
            for _ in range(steps):
                grad, _ = input_gradient(model, x_adv, y, loss)
                x_adv = project(x_adv + step_size * grad.sign(), x, eps)
            if restarts == 1:  # nothing to compare against: skip the scoring forward
                return x_adv.detach()
            with torch.no_grad():
                logits = model(x_adv)
                # misclassified points outrank any loss value; among the rest, higher loss wins
                score = per_example_loss(logits, y, loss)
                score = torch.where(logits.argmax(1) != y, torch.full_like(score, float("inf")), score)
                better = score > best_score
                best[better] = x_adv[better]
                best_score = torch.where(better, score, best_score)
    return best.detach()


def ifgsm(model, x, y, eps: float, steps: int, step_size: float | None = None) -> torch.Tensor:
    """I-FGSM / BIM (Kurakin et al.): PGD from x itself; step eps/steps unless given."""
    return pgd(model, x, y, eps, steps, step_size if step_size is not None else eps / steps,
               random_start=False)


# --------------------------------------------------------------------------------------------------
# Registry of evaluation attacks with per-dataset defaults (the paper's code: MNIST I-FGSM/PGD 100
# steps of 0.01; CIFAR 20 steps of 2/255). "legacy" PGD-50-10 is the field's older headline attack.

@dataclass(frozen=True)
class AttackSpec:
    fn: Callable[..., torch.Tensor]
    uses_randomness: bool


ATTACKS: Registry[AttackSpec] = Registry("attack")


# Evaluation defaults per dataset family: the paper code's I-FGSM/PGD (MNIST 100 x 0.01, CIFAR 20 x 2/255).
_STEPS = {"mnist": 100, "cifar": 20}


def _steps(info) -> dict:
    return dict(steps=_STEPS[info.family], step_size=info.step_size)


def _register_attack(name, fn, randomness, defaults: Callable[[Any], dict], description: str):
    """`defaults` maps the dataset's DatasetInfo to the attack's default parameters."""
    ATTACKS.register(name, defaults=defaults, description=description)(AttackSpec(fn, randomness))


_register_attack("fgsm", fgsm, False, lambda info: {}, "FGSM (Goodfellow et al.)")
_register_attack("rfgsm", rfgsm, True, lambda info: {"alpha": info.probe_alpha},
                 "R-FGSM (Tramer et al.): alpha noise, then eps - alpha step")
_register_attack("ifgsm", ifgsm, False, _steps, "I-FGSM/BIM, no random start")
_register_attack("pgd", pgd, True, lambda info: dict(_steps(info), restarts=1, loss="ce"),
                 "PGD, cross-entropy, uniform random start")
_register_attack("pgd_cw", pgd, True, lambda info: dict(_steps(info), restarts=1, loss="cw"),
                 "PGD, CW-margin loss, uniform random start")
_register_attack("pgd_50_10", pgd, True,
                 lambda info: dict(steps=50, step_size=info.step_size, restarts=10, loss="ce"),
                 "legacy PGD-50-10: 50 steps, 10 restarts")


def attack_defaults(name: str, dataset: str) -> dict:
    return dict(ATTACKS.entry(name).meta["defaults"](dataset_info(dataset)))


def run_attack(name: str, model, x, y, eps: float, generator: torch.Generator | None = None,
               **params) -> torch.Tensor:
    """Run a registered attack; parameters not given take the dataset defaults the caller resolved."""
    spec = ATTACKS.get(name)
    if spec.uses_randomness:
        params["generator"] = generator
    return spec.fn(model, x, y, eps, **params)
