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


BN_MODES = ("eval", "train")


@contextlib.contextmanager
def bn_mode(model: nn.Module, mode: str = "eval") -> Iterator[nn.Module]:
    """Run the model in eval or train mode (BatchNorm running statistics or batch statistics); restore
    each module's own flag on exit.

    Evaluation attacks always use eval mode. Inside training a method declares the mode its official
    code attacks in (`register_method(attack_bn=...)`): in train mode the attack's forward passes also
    update BatchNorm's running statistics, as they do in that code.
    """
    if mode not in BN_MODES:
        raise ValueError(f"unknown BatchNorm mode {mode!r}; valid: {', '.join(BN_MODES)}")
    flags = [(m, m.training) for m in model.modules()]
    model.train(mode == "train")
    try:
        yield model
    finally:
        for m, flag in flags:
            m.training = flag


def eval_mode(model: nn.Module):
    """Every module in eval mode for the duration (see `bn_mode`)."""
    return bn_mode(model, "eval")


def margin_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-example CW margin: max_{j != y} z_j - z_y (positive means misclassified)."""
    true = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.clone()
    other.scatter_(1, y[:, None], float("-inf"))
    return other.max(1).values - true


def per_example_loss(logits: torch.Tensor, y: torch.Tensor, loss: str = "ce",
                     kappa: float | None = None) -> torch.Tensor:
    """Cross-entropy, or the CW margin; with `kappa` the margin is capped at kappa as in the hinge
    -relu(z_y - max_{j != y} z_j + kappa) of the paper's PGD-CW (val-iisc/SAT-Rx tools/attacks.py:141-148,
    kappa 50): a point already misclassified by kappa logits gets no gradient and stays where it is."""
    if loss == "ce":
        return F.cross_entropy(logits, y, reduction="none")
    if loss == "cw":
        margin = margin_loss(logits, y)
        return margin if kappa is None else -F.relu(kappa - margin)
    raise ValueError(f"unknown attack loss {loss!r}; valid: ce, cw")


def input_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss: str = "ce",
                   create_graph: bool = False, kappa: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradient of the summed loss w.r.t. the input, and the logits, with the model as it is.

    The sum (not the mean) keeps gradients away from float underflow; every use here takes the sign or a
    cosine, which the scale does not change.
    """
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = model(x)
        value = per_example_loss(logits, y, loss, kappa).sum()
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


def fgsm(model, x, y, eps: float, bn: str = "eval") -> torch.Tensor:
    with bn_mode(model, bn):
        grad, _ = input_gradient(model, x, y)
    return (x + eps * grad.sign()).clamp_(0.0, 1.0).detach()


def rfgsm(model, x, y, eps: float, alpha: float, generator=None, bn: str = "eval") -> torch.Tensor:
    """Tramer et al. 2018: a random alpha-sign step, then an (eps - alpha) gradient-sign step
    (ftramer/ensemble-adv-training simple_eval.py:53-56)."""
    if not 0 <= alpha <= eps:
        raise ValueError(f"R-FGSM needs 0 <= alpha <= eps, got alpha={alpha}, eps={eps}")
    x_noisy = (x + alpha * random_sign_like(x, generator)).clamp(0.0, 1.0)
    with bn_mode(model, bn):
        grad, _ = input_gradient(model, x_noisy, y)
    return project(x_noisy + (eps - alpha) * grad.sign(), x, eps).detach()


def pgd(model, x, y, eps: float, steps: int, step_size: float, restarts: int = 1, loss: str = "ce",
        random_start: bool = True, generator: torch.Generator | None = None, kappa: float | None = None,
        bn: str = "eval") -> torch.Tensor:
    """Madry et al.: (random start), `steps` signed-gradient steps with projection, restarts.

    Over restarts, each example keeps its worst case: a misclassifying point if any restart found one,
    otherwise the point of highest loss. The start is uniform in the eps-ball (Madry et al.); the
    paper's code starts from U(-step, step) (SAT-Rx tools/attacks.py:108), a weaker attack: ours on
    purpose (DESIGN.md section 4). `kappa` caps the CW margin (see `per_example_loss`).
    """
    if steps < 1 or restarts < 1:
        raise ValueError(f"PGD needs steps >= 1 and restarts >= 1, got {steps} and {restarts}")
    best = x.detach().clone()
    best_score = torch.full((len(x),), float("-inf"), device=x.device)
    with bn_mode(model, bn):
        for _ in range(restarts):
            x_adv = x.detach().clone()
            if random_start:
                x_adv = project(x_adv + _uniform_like(x, -eps, eps, generator), x, eps)
            for _ in range(steps):
                grad, _ = input_gradient(model, x_adv, y, loss, kappa=kappa)
                x_adv = project(x_adv + step_size * grad.sign(), x, eps)
            if restarts == 1:  # nothing to compare against: skip the scoring forward
                return x_adv.detach()
            with torch.no_grad():
                logits = model(x_adv)
                # misclassified points outrank any loss value; among the rest, higher loss wins
                score = per_example_loss(logits, y, loss, kappa)
                score = torch.where(logits.argmax(1) != y, torch.full_like(score, float("inf")), score)
                better = score > best_score
                best[better] = x_adv[better]
                best_score = torch.where(better, score, best_score)
    return best.detach()


def ifgsm(model, x, y, eps: float, steps: int, step_size: float | None = None,
          bn: str = "eval") -> torch.Tensor:
    """I-FGSM / BIM (Kurakin et al.): PGD from x itself; step eps/steps unless given, as the paper's
    code (SAT-Rx tools/attacks.py:77-91: k steps of eps/k, clipped to [0, 1]; the projection here
    never binds at that step)."""
    return pgd(model, x, y, eps, steps, step_size if step_size is not None else eps / steps,
               random_start=False, bn=bn)


# --------------------------------------------------------------------------------------------------
# Registry of evaluation attacks with per-dataset defaults, as the paper's code evaluates
# (SAT-Rx MNIST/SAT_REG_2_training.py:45-47 and CIFAR10/SAT_REG_2_training.py:49-51):
# I-FGSM k steps of eps/k and PGD k steps of the dataset's step (MNIST k = 100, step 0.01; CIFAR
# k = 20, step 2/255); PGD-CW with the paper's hinge (kappa 50). "legacy" PGD-50-10 is the field's
# older headline attack.

@dataclass(frozen=True)
class AttackSpec:
    fn: Callable[..., torch.Tensor]
    uses_randomness: bool


ATTACKS: Registry[AttackSpec] = Registry("attack")


# Evaluation steps per dataset family (the paper's code: MNIST 100, CIFAR 20).
_STEPS = {"mnist": 100, "cifar": 20}


def _steps(info) -> dict:
    return dict(steps=_STEPS[info.family], step_size=info.step_size)


def _register_attack(name, fn, randomness, defaults: Callable[[Any], dict], description: str):
    """`defaults` maps the dataset's DatasetInfo to the attack's default parameters."""
    ATTACKS.register(name, defaults=defaults, description=description)(AttackSpec(fn, randomness))


_register_attack("fgsm", fgsm, False, lambda info: {}, "FGSM (Goodfellow et al.)")
_register_attack("rfgsm", rfgsm, True, lambda info: {"alpha": info.probe_alpha},
                 "R-FGSM (Tramer et al.): alpha noise, then eps - alpha step")
_register_attack("ifgsm", ifgsm, False, lambda info: {"steps": _STEPS[info.family]},
                 "I-FGSM/BIM: k steps of eps/k, no random start (the paper's code)")
_register_attack("pgd", pgd, True, lambda info: dict(_steps(info), restarts=1, loss="ce"),
                 "PGD, cross-entropy, uniform random start")
_register_attack("pgd_cw", pgd, True, lambda info: dict(_steps(info), restarts=1, loss="cw", kappa=50.0),
                 "PGD, CW hinge loss (kappa 50, the paper's code), uniform random start")
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
