"""Small gradient-masking probes shared by the trainer's per-epoch log and the diagnostics."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..attacks import eval_mode, input_gradient, random_sign_like, _uniform_like


@torch.no_grad()
def accuracy(model, x, y) -> float:
    with eval_mode(model):
        return (model(x).argmax(1) == y).float().mean().item()


def fgsm_rfgsm_logit_distance(model, x, y, eps: float, alpha: float,
                              generator: torch.Generator | None = None) -> float:
    """Mean squared L2 distance between logits of FGSM and (faithful, GMR-style) R-FGSM samples.

    This is the quantity GMR penalises (DESIGN.md section 2): a masked model makes it large.
    """
    noisy = x + alpha * random_sign_like(x, generator)
    with eval_mode(model):
        grad, _ = input_gradient(model, torch.cat([x, noisy]), torch.cat([y, y]))
        g_clean, g_noisy = grad.chunk(2)
        x_fgsm = (x + eps * g_clean.sign()).clamp(0, 1)
        x_rfgsm = (noisy + eps * g_noisy.sign()).clamp(0, 1)
        with torch.no_grad():
            z = model(torch.cat([x_fgsm, x_rfgsm]))
    z1, z2 = z.chunk(2)
    return ((z1 - z2) ** 2).sum(1).mean().item()


def gradient_alignment(model, x, y, eps: float, generator: torch.Generator | None = None) -> float:
    """E cos(grad(x), grad(x + eta)), eta ~ U(-eps, eps) (Andriushchenko & Flammarion 2020)."""
    eta = _uniform_like(x, -eps, eps, generator)
    with eval_mode(model):
        grad, _ = input_gradient(model, torch.cat([x, (x + eta).clamp(0, 1)]), torch.cat([y, y]))
    g1, g2 = grad.flatten(1).chunk(2)
    return F.cosine_similarity(g1, g2, dim=1, eps=1e-12).mean().item()
