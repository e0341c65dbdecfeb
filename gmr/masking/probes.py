"""Gradient-masking probes: one registered function per probe, each returning its table (one CSV).

A probe is `fn(ctx: ProbeContext) -> list[dict]` registered with `register_probe(name, summary=...)`;
its rows become `<name>.csv` of a `gmr diagnose` folder, and its optional `summary(tables) -> dict`
adds headline numbers to the audit's summary (from the tables alone, so `reaudit` can rebuild them from
the CSV files). A rule in `gmr/masking/rules.py` turns a headline number into a check.

Work that several probes need (each batch's input gradient, its FGSM and PGD examples, losses and
correctness under each, the loss along the FGSM direction, the per-point gradient cosines, the transfer
attack and the per-point correctness along the sanity curves) is computed once per audit by the
`ProbeContext` and cached there. The checks put intervals on their values from per-point data, so the
per-point results are tables too: `per_example` (one row per audit point, with the gradient cosines
behind `gradient_alignment` and the transfer correctness behind `transfer`) and `curve_points` (one row
per point and x of each sanity curve).

Randomness: every probe draws from its own `torch.Generator`, seeded from (audit seed, crc32 of the
probe's name) by `probe_seed`, and so does the shared work of the context ("pgd_examples"; the cached
cosines, transfer and curves draw from the generator of the probe they first belonged to, so their
numbers are those of the probes before the per-point tables existed).
Adding, removing or reordering a probe therefore never changes another probe's numbers. (Before the
masking package one generator ran through all probes in turn, so the random draws, and the numbers that
depend on them, differ from audits written before it.) The accuracy-vs-eps and accuracy-vs-steps curves
use common random numbers: every point of one curve starts PGD from the same draws (a fresh generator
with the curve's seed), so neighbouring points differ by eps or steps only, not by the luck of the
random start; the restarts curve draws new starts on purpose.

`fgsm_rfgsm_logit_distance` and `gradient_alignment` are also the trainer's per-epoch probes.
"""
from __future__ import annotations

import re
import zlib
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .. import attacks
from ..attacks import _uniform_like, eval_mode, input_gradient, random_sign_like
from ..data import dataset_info
from ..registry import Registry

Table = list[dict[str, Any]]
ATTACK_NAMES = ("clean", "fgsm", "pgd")
# a fall of the loss along the FGSM line counts when it exceeds this share of the loss range (+ nats)
LINE_TOL_REL, LINE_TOL_ABS = 0.05, 0.01


# --------------------------------------------------------------------------------------------------
# The trainer's per-epoch probes (also used by the audit)

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
    return gradient_cosines(model, x, y, eps, generator).mean().item()


def gradient_cosines(model, x, y, eps: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Per point: cos(grad(x), grad(x + eta)), eta ~ U(-eps, eps); the audit keeps them so that the
    alignment check can put an interval on their mean."""
    eta = _uniform_like(x, -eps, eps, generator)
    with eval_mode(model):
        grad, _ = input_gradient(model, torch.cat([x, (x + eta).clamp(0, 1)]), torch.cat([y, y]))
    g1, g2 = grad.flatten(1).chunk(2)
    return F.cosine_similarity(g1, g2, dim=1, eps=1e-12)


# --------------------------------------------------------------------------------------------------
# Settings, registry and the shared context

@dataclass
class ProbeSettings:
    """Sizes of the probes. The defaults are those of a real audit; tests shrink them."""
    batch_size: int = 250
    n_curve: int = 200                 # points for the sanity curves (a prefix of the test subset)
    n_surface: int = 4                 # images for the 2-D loss surface
    surface_points: int = 21           # grid points per axis of the loss surface, over [0, eps]
    line_points: int = 41              # grid points of the FGSM line over [0, 2 eps] (odd: eps on it)
    pgd_steps: tuple[int, ...] = (1, 2, 5, 10, 20, 50, 100)
    restarts: int = 10
    restart_steps: int = 20
    sweep_steps: int = 20              # PGD steps per eps of the accuracy-vs-eps curve
    eps_factors: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0)
    large_eps: tuple[float, ...] = (0.5, 0.75, 1.0)  # absolute budgets: 1.0 allows any image
    alpha: float | None = None         # noise of the R-FGSM probe; None: the dataset's probe_alpha
    attack_steps: int | None = None    # steps of the main PGD; None: the evaluation default (MNIST 100
                                       # x 0.01, CIFAR 20 x 2/255); else step 2.5 eps / steps
    confidence: float = 0.95           # level of the checks' intervals (gmr/masking/rules.py)

    @classmethod
    def quick(cls) -> "ProbeSettings":
        """Small probes for smoke tests and CI (seconds on a CPU for a few dozen points)."""
        return cls(n_curve=50, n_surface=2, surface_points=11, line_points=21, pgd_steps=(1, 5, 20),
                   restarts=2, restart_steps=5, sweep_steps=5, attack_steps=20)

    def validate(self) -> None:
        for name in ("batch_size", "n_curve", "n_surface", "restarts", "restart_steps", "sweep_steps"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.surface_points < 2:
            raise ValueError(f"surface_points must be at least 2, got {self.surface_points}")
        if self.line_points < 3 or self.line_points % 2 == 0:
            raise ValueError(f"line_points must be odd and >= 3 (eps lies on the grid), got {self.line_points}")
        if not 0 < self.confidence < 1:
            raise ValueError(f"confidence must lie strictly between 0 and 1, got {self.confidence}")
        if self.attack_steps is not None and self.attack_steps <= 0:
            raise ValueError(f"attack_steps must be positive, got {self.attack_steps}")
        if not self.pgd_steps or min(self.pgd_steps) < 1:
            raise ValueError(f"pgd_steps must be positive step counts, got {self.pgd_steps}")
        if any(e < 0 for e in self.eps_factors) or any(not 0 < e <= 1 for e in self.large_eps):
            raise ValueError("eps_factors must be >= 0 and large_eps in (0, 1]")


Probe = Callable[["ProbeContext"], Table]
PROBES: Registry[Probe] = Registry("probe")


def register_probe(name: str, *, summary: Callable[[dict[str, Table]], dict] | None = None,
                   optional: bool = False, description: str = "") -> Callable[[Probe], Probe]:
    """Register `fn(ctx) -> rows` as probe `name` (its table is `name`.csv). `summary(tables)` returns
    the probe's headline numbers for the audit; `optional`: the probe may return no rows (e.g. it needs
    a source model), so a folder without its CSV is still complete."""
    if not re.fullmatch(r"[a-z0-9_]+", name):
        raise ValueError(f"probe name {name!r} must be lower-case letters, digits and _ (a file name)")
    return PROBES.register(name, summary=summary, optional=optional, description=description)


def probe_seed(seed: int, name: str) -> int:
    """The seed of `name`'s generator: the audit seed and a stable hash of the name, in one integer."""
    return ((seed & 0x7FFFFFFF) << 32) | zlib.crc32(name.encode())


@dataclass
class Batch:
    """One batch of the test subset with the attacks every probe shares (computed once)."""
    index: int
    sl: slice
    x: torch.Tensor
    y: torch.Tensor
    grad: torch.Tensor                 # input gradient of the CE loss at x
    adv: dict[str, torch.Tensor]       # clean / fgsm / pgd inputs
    loss: dict[str, torch.Tensor]      # per-point CE loss under each
    correct: dict[str, torch.Tensor]   # per-point correctness under each


@dataclass
class ProbeContext:
    """The model, the fixed test subset and the probe settings, with the shared work cached."""
    model: nn.Module
    x: torch.Tensor
    y: torch.Tensor
    eps: float
    dataset: str = "mnist"
    settings: ProbeSettings = field(default_factory=ProbeSettings)
    seed: int = 0
    source_model: nn.Module | None = None
    _lines: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict, repr=False)

    def generator(self, name: str) -> torch.Generator:
        """A fresh generator for `name` (a probe, or shared work of the context)."""
        return torch.Generator(device=self.x.device).manual_seed(probe_seed(self.seed, name))

    @cached_property
    def alpha(self) -> float:
        return self.settings.alpha if self.settings.alpha is not None else dataset_info(self.dataset).probe_alpha

    @cached_property
    def default_step(self) -> float:
        return attacks.attack_defaults("pgd", self.dataset)["step_size"]

    @cached_property
    def pgd_params(self) -> dict:
        """The main PGD: the evaluation default, or `attack_steps` steps of 2.5 eps / steps."""
        params = attacks.attack_defaults("pgd", self.dataset)
        if self.settings.attack_steps is not None:
            steps = self.settings.attack_steps
            params.update(steps=steps, step_size=2.5 * self.eps / steps)
        return params

    @cached_property
    def batches(self) -> list[Batch]:
        """Every batch with its gradient, FGSM and PGD examples (PGD from the "pgd_examples" generator,
        batch after batch, so the draws do not depend on which probe asks first)."""
        gen = self.generator("pgd_examples")
        return [self._attack_batch(b, sl, gen) for b, sl in enumerate(batches(len(self.x), self.settings.batch_size))]

    def _attack_batch(self, b: int, sl: slice, gen: torch.Generator) -> Batch:
        xb, yb = self.x[sl], self.y[sl]
        with eval_mode(self.model):
            grad, _ = input_gradient(self.model, xb, yb)
            adv = {"clean": xb, "fgsm": (xb + self.eps * grad.sign()).clamp(0.0, 1.0).detach(),
                   "pgd": attacks.pgd(self.model, xb, yb, self.eps, generator=gen, **self.pgd_params)}
            evals = {a: loss_and_correct(self.model, xa, yb) for a, xa in adv.items()}
        return Batch(b, sl, xb, yb, grad, adv, {a: v[0] for a, v in evals.items()},
                     {a: v[1] for a, v in evals.items()})

    def stacked(self, kind: str, attack: str) -> torch.Tensor:
        """Per-point `loss` or `correct` under `attack` over the whole subset (on the CPU)."""
        return torch.cat([getattr(b, kind)[attack] for b in self.batches]).cpu()

    @cached_property
    def t_line(self) -> torch.Tensor:
        return torch.linspace(0, 2 * self.eps, self.settings.line_points, device=self.x.device)

    def line(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Loss and correctness (points x t) at x + t sign(grad x), t in [0, 2 eps]."""
        if batch.index not in self._lines:
            sgn = batch.grad.sign()
            with eval_mode(self.model):
                out = [loss_and_correct(self.model, (batch.x + t * sgn).clamp(0, 1), batch.y) for t in self.t_line]
            self._lines[batch.index] = (torch.stack([o[0] for o in out], 1), torch.stack([o[1] for o in out], 1))
        return self._lines[batch.index]

    @cached_property
    def curve_points(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The first n_curve points: the subset of the sanity curves."""
        nc = min(self.settings.n_curve, len(self.x))
        return self.x[:nc], self.y[:nc]

    @cached_property
    def alignment_cosines(self) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """Per batch: cos(grad x, grad(x + eta)) of every point, then of the points FGSM does not break
        with a second draw of eta (None when FGSM breaks them all), from the "gradient_alignment"
        generator batch after batch (the per-batch means are the trainer's alignment probe)."""
        gen = self.generator("gradient_alignment")
        out = []
        for b in self.batches:
            every = gradient_cosines(self.model, b.x, b.y, self.eps, gen)
            robust = b.correct["fgsm"]
            out.append((every, gradient_cosines(self.model, b.x[robust], b.y[robust], self.eps, gen)
                        if robust.any() else None))
        return out

    @cached_property
    def transfer_correct(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Per point: is the model (and is the source model) right on the PGD examples crafted on the
        source model (the "transfer" generator)? None without a source model."""
        if self.source_model is None:
            return None
        gen = self.generator("transfer")
        target, source = [], []
        with eval_mode(self.source_model), eval_mode(self.model):
            for b in self.batches:
                xa = attacks.pgd(self.source_model, b.x, b.y, self.eps, generator=gen, **self.pgd_params)
                target.append(loss_and_correct(self.model, xa, b.y)[1].cpu())
                source.append(loss_and_correct(self.source_model, xa, b.y)[1].cpu())
        return torch.cat(target), torch.cat(source)

    @cached_property
    def eps_curve(self) -> dict[float, torch.Tensor]:
        """Per eps of the sweep: per-point correctness of the curve points under PGD (clean at eps 0).
        Every eps starts from the same draws (a fresh "accuracy_vs_eps" generator)."""
        s, (xc, yc) = self.settings, self.curve_points
        grid = sorted({round(f * self.eps, 6) for f in s.eps_factors} | {float(e) for e in s.large_eps})
        return {e: pgd_correct(self.model, xc, yc, e, s.sweep_steps, 2.5 * e / s.sweep_steps,
                               self.generator("accuracy_vs_eps"), s.batch_size)
                if e > 0 else clean_correct(self.model, xc, yc, s.batch_size) for e in grid}

    @cached_property
    def steps_curve(self) -> dict[int, tuple[float, torch.Tensor]]:
        """Per PGD step count: its step size and the per-point correctness of the curve points. Every
        count starts from the same draws (a fresh "accuracy_vs_steps" generator)."""
        s, (xc, yc) = self.settings, self.curve_points
        out = {}
        for k in sorted(set(s.pgd_steps)):
            step = max(self.default_step, 2.5 * self.eps / k)
            out[k] = step, pgd_correct(self.model, xc, yc, self.eps, k, step,
                                       self.generator("accuracy_vs_steps"), s.batch_size)
        return out

    @cached_property
    def restarts_curve(self) -> list[torch.Tensor]:
        """After 1, 2, ... R restarts: per point, whether every restart so far failed (worst case); each
        restart draws new starts from the "accuracy_vs_restarts" generator."""
        s, (xc, yc) = self.settings, self.curve_points
        gen = self.generator("accuracy_vs_restarts")
        robust = torch.ones(len(xc), dtype=torch.bool)
        out = []
        for _ in range(s.restarts):
            robust = robust & pgd_correct(self.model, xc, yc, self.eps, s.restart_steps,
                                          2.5 * self.eps / s.restart_steps, gen, s.batch_size)
            out.append(robust)
        return out


# --------------------------------------------------------------------------------------------------
# Building blocks

@torch.no_grad()
def loss_and_correct(model, x, y) -> tuple[torch.Tensor, torch.Tensor]:
    logits = model(x)
    return F.cross_entropy(logits, y, reduction="none"), logits.argmax(1) == y


def batches(n: int, size: int):
    for lo in range(0, n, size):
        yield slice(lo, min(lo + size, n))


def sign_agreement(g1: torch.Tensor, g2: torch.Tensor) -> torch.Tensor:
    """Per example: fraction of coordinates, among those where either gradient is nonzero, whose signs
    agree; NaN when both gradients are zero everywhere."""
    g1, g2 = g1.flatten(1), g2.flatten(1)
    active = (g1 != 0) | (g2 != 0)
    agree = (torch.sign(g1) == torch.sign(g2)) & active
    count = active.sum(1)
    out = agree.sum(1).float() / count.clamp(min=1)
    return torch.where(count > 0, out, torch.full_like(out, float("nan")))


def line_statistics(loss: torch.Tensor, correct: torch.Tensor, t: torch.Tensor, eps: float
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """From loss/correctness on a grid t (n x k), per point: the largest fall of the loss after a
    higher value while the point is still correctly classified (before its first misclassification
    along the line), whether that fall is a non-monotonicity (> LINE_TOL_REL of the loss range on that
    stretch + LINE_TOL_ABS nats), and whether the point is distorted (wrong at some t < eps, right at
    t = eps; Kim et al. 2021).

    Only the stretch before the first misclassification counts: up to the decision boundary a
    gradient-ascent direction must raise the loss, beyond it the true-class loss is no longer what the
    attack needs (a non-robust model's loss may wiggle there without any masking)."""
    n, k = loss.shape
    wrong = ~correct
    first_wrong = torch.where(wrong.any(1), wrong.float().argmax(1), torch.full((n,), k, device=loss.device))
    valid = torch.arange(k, device=loss.device)[None, :] < first_wrong[:, None]
    inf = torch.tensor(float("inf"), device=loss.device, dtype=loss.dtype)
    running_max = torch.cummax(torch.where(valid, loss, -inf), dim=1).values
    drop = torch.where(valid, running_max - loss, torch.zeros_like(loss)).max(1).values
    span = torch.where(valid, loss, -inf).max(1).values - torch.where(valid, loss, inf).min(1).values
    span = torch.where(valid.any(1), span, torch.zeros_like(span))
    nonmonotone = drop > LINE_TOL_REL * span + LINE_TOL_ABS
    at_eps = int(torch.argmin((t - eps).abs()))
    before = t < eps - 1e-12
    distorted = (~correct[:, before]).any(1) & correct[:, at_eps]
    return drop, nonmonotone, distorted


def pgd_correct(model, x, y, eps, steps, step_size, gen, batch_size) -> torch.Tensor:
    out = []
    with eval_mode(model):
        for sl in batches(len(x), batch_size):
            xa = attacks.pgd(model, x[sl], y[sl], eps, steps, step_size, generator=gen)
            out.append(loss_and_correct(model, xa, y[sl])[1].cpu())
    return torch.cat(out)


def clean_correct(model, x, y, batch_size) -> torch.Tensor:
    with eval_mode(model):
        return torch.cat([loss_and_correct(model, x[sl], y[sl])[1].cpu() for sl in batches(len(x), batch_size)])


def _num(v: torch.Tensor):
    v = v.item()
    return int(v) if isinstance(v, bool) else v


def _mean(rows: Sequence[dict], key: str) -> float | None:
    vals = [float(r[key]) for r in rows]
    return sum(vals) / len(vals) if vals else None


def _weighted(rows: Sequence[dict], key: str) -> float | None:
    total = sum(float(r["n"]) for r in rows)
    return sum(float(r["n"]) * float(r[key]) for r in rows) / total if total else None


def _isnan(v) -> bool:
    return v is None or v == "" or (isinstance(v, float) and v != v)


# --------------------------------------------------------------------------------------------------
# The probes, in the order they run and their tables are written

def _per_example_summary(tables: dict[str, Table]) -> dict:
    ex = tables["per_example"]
    acc = {a: _mean(ex, f"{a}_correct") for a in ATTACK_NAMES}
    loss = {a: _mean(ex, f"{a}_loss") for a in ("fgsm", "pgd")}
    robust = [r for r in ex if float(r["fgsm_correct"]) == 1]
    # points whose gradients are zero everywhere agree on nothing: count them as 0.5 (chance)
    agree = [{"a": 0.5 if _isnan(r["sign_agreement"]) else float(r["sign_agreement"]),
              "robust": float(r["fgsm_correct"]) == 1} for r in ex]
    return {
        "n_examples": len(ex),
        "clean_accuracy": acc["clean"], "fgsm_accuracy": acc["fgsm"], "pgd_accuracy": acc["pgd"],
        "fgsm_pgd_accuracy_gap": acc["fgsm"] - acc["pgd"],
        "fgsm_above_clean": acc["fgsm"] - acc["clean"],
        "fgsm_pgd_loss_ratio": loss["pgd"] / max(loss["fgsm"], 1e-12),
        "zero_gradient_fraction": _mean(ex, "grad_zero"),
        "fgsm_robust_points": len(robust),
        "gradient_sign_agreement": _mean(agree, "a"),
        "sign_agreement_fgsm_robust": _mean([r for r in agree if r["robust"]], "a") if robust else None,
        "fgsm_pgd_perturbation_cosine": _mean(ex, "fgsm_pgd_cosine"),
        "fgsm_loss_nonmonotone": _mean(ex, "line_nonmonotone"),
        "boundary_distortion": _mean(ex, "distorted"),
    }


@register_probe("per_example", summary=_per_example_summary,
                description="per point: loss and correctness under each attack, zero gradient, sign agreement, "
                "FGSM-PGD cosine, loss drop along the FGSM line, non-monotone, distorted")
def probe_per_example(ctx: ProbeContext) -> Table:
    gen = ctx.generator("per_example")
    cols: dict[str, list[torch.Tensor]] = {}
    for b in ctx.batches:
        for key, value in _per_example_columns(ctx, b, gen).items():
            cols.setdefault(key, []).append(value)
    ex = {k: torch.cat(v).cpu() for k, v in cols.items()}
    return [{"index": i, "label": int(ctx.y[i]), **{k: _num(v[i]) for k, v in ex.items()}}
            for i in range(len(ctx.x))]


def _per_example_columns(ctx: ProbeContext, b: Batch, gen: torch.Generator) -> dict[str, torch.Tensor]:
    cols = {}
    for a in ATTACK_NAMES:
        cols[f"{a}_loss"], cols[f"{a}_correct"] = b.loss[a], b.correct[a]
    cols["grad_zero"] = (b.grad.flatten(1) != 0).sum(1) == 0
    eta = _uniform_like(b.x, -ctx.eps, ctx.eps, gen)
    with eval_mode(ctx.model):
        grad_eta, _ = input_gradient(ctx.model, (b.x + eta).clamp(0, 1), b.y)
    cols["sign_agreement"] = sign_agreement(b.grad, grad_eta)
    cols["fgsm_pgd_cosine"] = F.cosine_similarity((b.adv["fgsm"] - b.x).flatten(1),
                                                  (b.adv["pgd"] - b.x).flatten(1), dim=1, eps=1e-12)
    loss, correct = ctx.line(b)
    cols["line_max_drop"], cols["line_nonmonotone"], cols["distorted"] = line_statistics(
        loss, correct, ctx.t_line, ctx.eps)
    every, robust = ctx.alignment_cosines[b.index]
    cols["grad_alignment"] = every
    cols["grad_alignment_fgsm_robust"] = torch.full_like(every, float("nan"))
    if robust is not None:
        cols["grad_alignment_fgsm_robust"][b.correct["fgsm"]] = robust
    if ctx.transfer_correct is not None:
        cols["transfer_correct"] = ctx.transfer_correct[0][b.sl]
    return cols


@register_probe("attack_gap", description="clean / FGSM / PGD accuracy and mean loss")
def probe_attack_gap(ctx: ProbeContext) -> Table:
    pgd = " ".join(f"{k}={v}" for k, v in ctx.pgd_params.items())
    return [{"attack": a, "accuracy": ctx.stacked("correct", a).float().mean().item(),
             "mean_loss": ctx.stacked("loss", a).mean().item(), "n": len(ctx.x),
             "params": pgd if a == "pgd" else ""} for a in ATTACK_NAMES]


def _alignment_summary(tables: dict[str, Table]) -> dict:
    rows = tables["gradient_alignment"]
    return {"gradient_alignment": _weighted([r for r in rows if r["subset"] == "all"], "gradient_alignment"),
            "gradient_alignment_fgsm_robust": _weighted([r for r in rows if r["subset"] == "fgsm_robust"],
                                                        "gradient_alignment")}


@register_probe("gradient_alignment", summary=_alignment_summary,
                description="per batch: E cos(grad(x), grad(x + eta)), all points and those FGSM does not break")
def probe_gradient_alignment(ctx: ProbeContext) -> Table:
    rows = []
    for b, (every, robust) in zip(ctx.batches, ctx.alignment_cosines):
        rows.append({"batch": b.index, "subset": "all", "n": len(b.x), "gradient_alignment": every.mean().item()})
        if robust is not None:
            rows.append({"batch": b.index, "subset": "fgsm_robust", "n": len(robust),
                         "gradient_alignment": robust.mean().item()})
    return rows


@register_probe("logit_distance",
                summary=lambda t: {"fgsm_rfgsm_logit_distance": _weighted(t["logit_distance"], "logit_distance")},
                description="per batch: mean ||z(x_fgsm) - z(x_rfgsm)||^2 (the GMR penalty)")
def probe_logit_distance(ctx: ProbeContext) -> Table:
    gen = ctx.generator("logit_distance")
    return [{"batch": b.index, "n": len(b.x), "alpha": ctx.alpha,
             "logit_distance": fgsm_rfgsm_logit_distance(ctx.model, b.x, b.y, ctx.eps, ctx.alpha, gen)}
            for b in ctx.batches]


@register_probe("fgsm_line", description="loss and correctness at x + t sign(grad x), t in [0, 2 eps]")
def probe_fgsm_line(ctx: ProbeContext) -> Table:
    rows = []
    ts = ctx.t_line.tolist()
    for b in ctx.batches:
        loss, correct = ctx.line(b)
        ls, cs = loss.tolist(), correct.int().tolist()
        for i in range(len(b.x)):
            rows += [{"index": b.sl.start + i, "eps": t, "loss": ls[i][j], "correct": cs[i][j]}
                     for j, t in enumerate(ts)]
    return rows


@register_probe("loss_surface", description="loss at x + eps1 sign(grad x) + eps2 sign(random) on a grid "
                "over [0, eps]^2 (Tramer et al. 2018), first images")
def probe_loss_surface(ctx: ProbeContext) -> Table:
    m = min(ctx.settings.n_surface, len(ctx.x))
    xs, ys = ctx.x[:m], ctx.y[:m]
    d1 = torch.cat([b.grad for b in ctx.batches])[:m].sign()
    d2 = random_sign_like(xs, ctx.generator("loss_surface"))
    grid = torch.linspace(0, ctx.eps, ctx.settings.surface_points, device=ctx.x.device)
    t1, t2 = (t.reshape(-1) for t in torch.meshgrid(grid, grid, indexing="ij"))
    rows = []
    for i in range(m):
        pts = (xs[i] + t1.reshape(-1, 1, 1, 1) * d1[i] + t2.reshape(-1, 1, 1, 1) * d2[i]).clamp(0, 1)
        with eval_mode(ctx.model):
            out = [loss_and_correct(ctx.model, pts[sl], ys[i].expand(len(pts[sl])))
                   for sl in batches(len(pts), ctx.settings.batch_size)]
        loss, ok = torch.cat([o[0] for o in out]).tolist(), torch.cat([o[1] for o in out]).int().tolist()
        rows += [{"image": i, "label": int(ys[i]), "eps_grad": a, "eps_random": c, "loss": loss[j], "correct": ok[j]}
                 for j, (a, c) in enumerate(zip(t1.tolist(), t2.tolist()))]
    return rows


def _eps_summary(tables: dict[str, Table]) -> dict:
    rows = sorted(tables["accuracy_vs_eps"], key=lambda r: float(r["eps"]))
    rises = [float(b["accuracy"]) - float(a["accuracy"]) for a, b in zip(rows, rows[1:])]
    return {"accuracy_at_large_eps": float(rows[-1]["accuracy"]), "largest_eps": float(rows[-1]["eps"]),
            "accuracy_vs_eps_increase": max(rises) if rises else 0.0}


@register_probe("accuracy_vs_eps", summary=_eps_summary,
                description="PGD accuracy from eps 0 to 1 (common random numbers across eps)")
def probe_accuracy_vs_eps(ctx: ProbeContext) -> Table:
    s, eps = ctx.settings, ctx.eps
    n = len(ctx.curve_points[1])
    return [{"eps": e, "eps_over_train_eps": e / eps if eps else float("nan"),
             "accuracy": correct.float().mean().item(), "steps": s.sweep_steps if e > 0 else 0,
             "step_size": 2.5 * e / s.sweep_steps, "n": n} for e, correct in ctx.eps_curve.items()]


def _steps_summary(tables: dict[str, Table]) -> dict:
    rows = sorted(tables["accuracy_vs_steps"], key=lambda r: float(r["steps"]))
    return {"pgd_steps_plateau": float(rows[-2]["accuracy"]) - float(rows[-1]["accuracy"]) if len(rows) > 1 else 0.0}


@register_probe("accuracy_vs_steps", summary=_steps_summary,
                description="PGD accuracy for each step count (common random numbers across counts)")
def probe_accuracy_vs_steps(ctx: ProbeContext) -> Table:
    return [{"steps": k, "step_size": step, "n": len(correct), "accuracy": correct.float().mean().item()}
            for k, (step, correct) in ctx.steps_curve.items()]


def _restarts_summary(tables: dict[str, Table]) -> dict:
    rows = sorted(tables["accuracy_vs_restarts"], key=lambda r: float(r["restarts"]))
    half = float(rows[max(len(rows) // 2, 1) - 1]["accuracy"])
    return {"pgd_restarts_plateau": half - float(rows[-1]["accuracy"]) if len(rows) > 1 else 0.0}


@register_probe("accuracy_vs_restarts", summary=_restarts_summary,
                description="worst-case PGD accuracy over 1 to R random restarts")
def probe_accuracy_vs_restarts(ctx: ProbeContext) -> Table:
    s = ctx.settings
    return [{"restarts": r, "steps": s.restart_steps, "step_size": 2.5 * ctx.eps / s.restart_steps,
             "n": len(robust), "accuracy": robust.float().mean().item()}
            for r, robust in enumerate(ctx.restarts_curve, 1)]


@register_probe("curve_points", description="per point of the sanity curves: correct (1) or not at each eps "
                "(curve eps), PGD step count (steps) and number of restarts (restarts); the paired checks "
                "of the curves compare these point by point")
def probe_curve_points(ctx: ProbeContext) -> Table:
    curves = {"eps": ctx.eps_curve, "steps": {k: c for k, (_, c) in ctx.steps_curve.items()},
              "restarts": dict(enumerate(ctx.restarts_curve, 1))}
    return [{"curve": name, "x": x, "index": i, "correct": int(ok)}
            for name, curve in curves.items() for x, correct in curve.items() for i, ok in enumerate(correct.tolist())]


def _transfer_summary(tables: dict[str, Table]) -> dict:
    transfer = [float(r["accuracy"]) for r in tables["transfer"] if r["kind"] == "transfer"]
    if not transfer:
        return {}
    pgd = _mean(tables["per_example"], "pgd_correct")
    return {"transfer_accuracy": transfer[0], "transfer_beats_whitebox": pgd - transfer[0]}


@register_probe("transfer", summary=_transfer_summary, optional=True,
                description="white-box vs transferred PGD accuracy (needs a source model: --transfer-from)")
def probe_transfer(ctx: ProbeContext) -> Table:
    if ctx.transfer_correct is None:
        return []
    target, source = ctx.transfer_correct
    acc = {"white-box": ctx.stacked("correct", "pgd").float().mean().item(),
           "transfer": target.float().mean().item(), "source white-box": source.float().mean().item()}
    return [{"attack": "pgd", "kind": kind, "accuracy": a, "n": len(ctx.x)} for kind, a in acc.items()]


# --------------------------------------------------------------------------------------------------
# Running them

@dataclass
class Probes:
    """Everything measured on the model; tables are lists of row dicts (one CSV each)."""
    eps: float
    summary: dict[str, float | None]
    tables: dict[str, Table]


def run_probes(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, *, dataset: str = "mnist",
               settings: ProbeSettings | None = None, seed: int = 0,
               source_model: nn.Module | None = None) -> Probes:
    """Run every registered probe on (x, y) (the fixed test subset, on the model's device)."""
    ctx = ProbeContext(model, x, y, eps, dataset, settings or ProbeSettings(), seed, source_model)
    tables = {}
    with eval_mode(model):
        for name in PROBES.names_in_order():
            rows = PROBES.get(name)(ctx)
            if rows:
                tables[name] = rows
    return Probes(eps=eps, summary=summarise(tables), tables=tables)


def summarise(tables: dict[str, Table]) -> dict[str, Any]:
    """Every headline number, from the probe tables alone (so an audit can be rebuilt from its CSV
    files, see `reaudit`): each probe with a table contributes its `summary`."""
    summary: dict[str, Any] = {}
    for name in PROBES.names_in_order():
        fn = PROBES.entry(name).meta["summary"]
        if fn is not None and tables.get(name):
            summary.update(fn(tables))
    return summary
