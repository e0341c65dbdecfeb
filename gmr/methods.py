"""Training methods: each is one function (model, x, y, eps, options) -> StepOutput, registered by name
with its options (paper defaults per dataset family) and its cost in sample-passes.

The trainer owns epochs, schedule, timing and checkpoints; a method only builds the training loss of
one batch. Attack steps run in eval mode (the attack helpers switch and restore); the loss forward runs
in the mode the trainer set (train mode).

Adding a method: write a function and an options dataclass, and register them:

    @dataclass
    class MyOptions:
        beta: float = 1.0

    @register_method("my_method", MyOptions, cost=lambda o, b: PassCount(2, 2),
                     description="FGSM-AT with ...", title="My-AT", color="#17becf")
    def my_method(model, x, y, eps, o: MyOptions) -> StepOutput:
        x_adv = attacks.fgsm(model, x, y, eps)
        logits = model(x_adv)
        return StepOutput(F.cross_entropy(logits, y), logits, y)
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F

from . import attacks
from .attacks import eval_mode, input_gradient, project, random_sign_like, _uniform_like
from .cost import PassCount
from .data import dataset_family
from .options import Fraction, NonNegativeFloat, PositiveFloat, PositiveInt, convert_values
from .registry import Registry


@dataclass
class StepOutput:
    loss: torch.Tensor                 # scalar to backpropagate
    logits: torch.Tensor               # logits of the training samples (for train accuracy)
    targets: torch.Tensor
    probes: dict[str, torch.Tensor] = field(default_factory=dict)  # extra scalars to log (e.g. reg)


@dataclass(frozen=True)
class MethodSpec:
    fn: Callable[..., StepOutput]
    options: type
    cost: Callable[[Any, int], PassCount]      # (options, batch size) -> sample-passes per batch / B
    defaults: dict[str, dict[str, Any]]        # dataset family -> option overrides (paper values)
    description: str
    title: str | Callable[[Any], str]          # display name, or options -> name (e.g. "PGD-10 AT")
    color: str                                 # one colour in every figure


METHODS: Registry[MethodSpec] = Registry("method")
UNKNOWN_COLOR = "#000000"


def register_method(name: str, options: type, cost: Callable[[Any, int], PassCount], description: str,
                    title: str | Callable[[Any], str], color: str,
                    defaults: dict[str, dict[str, Any]] | None = None):
    """Register a training method: its step function, options, cost, and how tables and figures show
    it (title, colour). Tables and figures list methods in registration order."""
    def decorator(fn):
        METHODS.register(name)(MethodSpec(fn, options, cost, defaults or {}, description, title, color))
        return fn
    return decorator


def method_title(method: str, options: dict | Any | None = None) -> str:
    """The display name of a method (with its options where the title depends on them, e.g. PGD-k AT);
    a method not registered in this process shows as its key."""
    if method not in METHODS:
        return method
    spec = METHODS.get(method)
    if not callable(spec.title):
        return spec.title
    if isinstance(options, dict):
        try:
            options = make_options(method, "mnist", {k: v for k, v in options.items()
                                                     if k in {f.name for f in dataclasses.fields(spec.options)}})
        except ValueError:
            options = None
    return spec.title(options if options is not None else spec.options())


def method_color(method: str) -> str:
    return METHODS.get(method).color if method in METHODS else UNKNOWN_COLOR


def method_rank(method: str) -> tuple[int, str]:
    """Sort key: registration order, then unregistered methods by name."""
    order = METHODS.names_in_order()
    return (order.index(method) if method in order else len(order), method)


def make_options(method: str, dataset: str, overrides: dict[str, Any] | None = None):
    """The method's options: dataclass defaults, then the paper's values for the dataset, then overrides.

    Overrides are checked against the options' annotations by `gmr.options` (text such as "7" or
    "true" from a command line is read as the annotated type); an unknown name raises, listing the
    valid ones.
    """
    spec = METHODS.get(method)
    values = dict(spec.defaults.get(dataset_family(dataset), {}))
    values.update(convert_values(spec.options, overrides or {}, owner="method", scope=method, strings=True))
    return spec.options(**values)


def method_cost(method: str, options, batch_size: int) -> PassCount:
    return METHODS.get(method).cost(options, batch_size)


def _ce_step(model, x_train, y) -> StepOutput:
    logits = model(x_train)
    return StepOutput(F.cross_entropy(logits, y), logits, y)


def _mix_clean(x, x_adv, clean_fraction: float) -> torch.Tensor:
    """Kurakin et al.'s mixed batches: the first round(f * B) examples stay clean."""
    k = int(round(clean_fraction * len(x)))
    return x_adv if k == 0 else torch.cat([x[:k], x_adv[k:]])


def _n_adv(o, b):
    return b - int(round(getattr(o, "clean_fraction", 0.0) * b))


# --------------------------------------------------------------------------------------------------

@dataclass
class NoOptions:
    pass


@register_method("standard", NoOptions, cost=lambda o, b: PassCount(1, 1), description="clean training",
                 title="Standard", color="#7f7f7f")
def standard(model, x, y, eps, o) -> StepOutput:
    return _ce_step(model, x, y)


@dataclass
class FGSMOptions:
    clean_fraction: Fraction = 0.0   # fraction of each batch kept clean (0: adversarial only, as the paper)


@register_method("fgsm", FGSMOptions, description="FGSM-AT (Goodfellow et al. 2015)", title="FGSM-AT", color="#d62728",
                 cost=lambda o, b: PassCount(1 + _n_adv(o, b) / b, 1 + _n_adv(o, b) / b))
def fgsm(model, x, y, eps, o: FGSMOptions) -> StepOutput:
    k = len(x) - _n_adv(o, len(x))
    x_adv = attacks.fgsm(model, x[k:], y[k:], eps) if k < len(x) else x[:0]
    return _ce_step(model, torch.cat([x[:k], x_adv]) if k else x_adv, y)


@dataclass
class RFGSMOptions:
    alpha: NonNegativeFloat = 0.01
    clean_fraction: Fraction = 0.0


@register_method("rfgsm", RFGSMOptions, description="R-FGSM-AT (Tramer et al. 2018): alpha noise, eps - alpha step",
                 title="R-FGSM-AT", color="#ff7f0e",
                 defaults={"mnist": {"alpha": 0.01}, "cifar": {"alpha": 2 / 255}},
                 cost=lambda o, b: PassCount(1 + _n_adv(o, b) / b, 1 + _n_adv(o, b) / b))
def rfgsm(model, x, y, eps, o: RFGSMOptions) -> StepOutput:
    k = len(x) - _n_adv(o, len(x))
    x_adv = attacks.rfgsm(model, x[k:], y[k:], eps, o.alpha) if k < len(x) else x[:0]
    return _ce_step(model, torch.cat([x[:k], x_adv]) if k else x_adv, y)


@dataclass
class GMROptions:
    lambda_: NonNegativeFloat = 5.0
    alpha: NonNegativeFloat = 0.01
    projected: bool = False   # False: the paper's code (full eps step after the noise, no projection)


@register_method("gmr", GMROptions, cost=lambda o, b: PassCount(4, 4), title="GMR", color="#2ca02c",
                 description="FGSM-AT + lambda * ||z(x_fgsm) - z(x_rfgsm)||^2 (Vivek et al. 2019)",
                 defaults={"mnist": {"lambda_": 5.0, "alpha": 0.01},
                           "cifar": {"lambda_": 25.0, "alpha": 2 / 255}})
def gmr(model, x, y, eps, o: GMROptions) -> StepOutput:
    """DESIGN.md section 2: one input-gradient pass on [x; x~] in eval mode, one train forward on
    [x_fgsm; x_rfgsm] (BatchNorm statistics over both), CE on the FGSM half plus the logit distance."""
    b = len(x)
    x_noisy = x + o.alpha * random_sign_like(x)          # not clipped yet, as the reference code
    with eval_mode(model):
        grad, _ = input_gradient(model, torch.cat([x, x_noisy]), torch.cat([y, y]))
    g_clean, g_noisy = grad[:b], grad[b:]
    x_fgsm = (x + eps * g_clean.sign()).clamp(0, 1)
    if o.projected:
        x_rfgsm = project(x_noisy.clamp(0, 1) + (eps - o.alpha) * g_noisy.sign(), x, eps)
    else:
        x_rfgsm = (x_noisy + eps * g_noisy.sign()).clamp(0, 1)
    logits = model(torch.cat([x_fgsm, x_rfgsm]))
    z_fgsm, z_rfgsm = logits[:b], logits[b:]
    ce = F.cross_entropy(z_fgsm, y)
    reg = (z_fgsm - z_rfgsm).pow(2).sum(1).mean()
    return StepOutput(ce + o.lambda_ * reg, z_fgsm, y, {"ce": ce.detach(), "reg": reg.detach()})


@dataclass
class PGDOptions:
    steps: PositiveInt = 40
    step_size: PositiveFloat = 0.01


@register_method("pgd", PGDOptions, cost=lambda o, b: PassCount(o.steps + 1, o.steps + 1),
                 title=lambda o: f"PGD-{o.steps} AT", color="#1f77b4",
                 description="PGD-AT (Madry et al. 2018): random start, k steps, projection",
                 defaults={"mnist": {"steps": 40, "step_size": 0.01},
                           "cifar": {"steps": 7, "step_size": 2 / 255}})
def pgd(model, x, y, eps, o: PGDOptions) -> StepOutput:
    x_adv = attacks.pgd(model, x, y, eps, o.steps, o.step_size, restarts=1)
    return _ce_step(model, x_adv, y)


@dataclass
class FGSMRSOptions:
    step_factor: PositiveFloat = 1.25     # step = step_factor * eps (Wong et al. 2020)


@register_method("fgsm_rs", FGSMRSOptions, cost=lambda o, b: PassCount(2, 2), title="FGSM-RS", color="#9467bd",
                 description="FGSM-RS (Wong et al. 2020): uniform start, 1.25 eps step, projection")
def fgsm_rs(model, x, y, eps, o: FGSMRSOptions) -> StepOutput:
    x_start = (x + _uniform_like(x, -eps, eps, None)).clamp(0, 1)
    with eval_mode(model):
        grad, _ = input_gradient(model, x_start, y)
    return _ce_step(model, project(x_start + o.step_factor * eps * grad.sign(), x, eps), y)


@dataclass
class NFGSMOptions:
    noise_factor: NonNegativeFloat = 2.0     # noise U(-k eps, k eps)
    step_factor: PositiveFloat = 1.0      # step = step_factor * eps; no projection to the eps-ball


@register_method("n_fgsm", NFGSMOptions, cost=lambda o, b: PassCount(2, 2), title="N-FGSM", color="#8c564b",
                 description="N-FGSM (de Jorge et al. 2022): 2 eps noise, eps step, no projection")
def n_fgsm(model, x, y, eps, o: NFGSMOptions) -> StepOutput:
    x_start = (x + _uniform_like(x, -o.noise_factor * eps, o.noise_factor * eps, None)).clamp(0, 1)
    with eval_mode(model):
        grad, _ = input_gradient(model, x_start, y)
    return _ce_step(model, (x_start + o.step_factor * eps * grad.sign()).clamp(0, 1), y)


@dataclass
class GradAlignOptions:
    lambda_: NonNegativeFloat = 0.2


@register_method("gradalign", GradAlignOptions, cost=lambda o, b: PassCount(3, 4), title="GradAlign",
                 color="#e377c2",
                 description="GradAlign (Andriushchenko & Flammarion 2020): FGSM + lambda (1 - cos(g(x), g(x+eta)))")
def gradalign(model, x, y, eps, o: GradAlignOptions) -> StepOutput:
    """The gradient at x serves both the FGSM step and the alignment term (one pass saved); the
    gradient at x + eta is taken with create_graph for double backprop. Both in eval mode, so the
    cosine compares gradients of the same function."""
    with eval_mode(model):
        g1, _ = input_gradient(model, x, y)
        eta = _uniform_like(x, -eps, eps, None)
        g2, _ = input_gradient(model, (x + eta).clamp(0, 1), y, create_graph=True)
    cos = F.cosine_similarity(g1.flatten(1), g2.flatten(1), dim=1, eps=1e-12).mean()
    out = _ce_step(model, (x + eps * g1.sign()).clamp(0, 1), y)
    reg = 1.0 - cos
    out.loss = out.loss + o.lambda_ * reg
    out.probes = {"reg": reg.detach()}
    return out


@dataclass
class SATR1Options:
    lambda_: NonNegativeFloat = 0.2
    steps: PositiveInt = 10           # I-FGSM steps on the one regularised sample


@register_method("sat_r1", SATR1Options, title="SAT-R1", color="#17becf",
                 cost=lambda o, b: PassCount(2 + (o.steps + 1) / b, 2 + (o.steps + 1) / b),
                 description="SAT-R1 (Vivek et al. 2020): FGSM-AT + lambda ||z(x_fgsm) - z(x_ifgsm)||^2 on one sample",
                 defaults={"mnist": {"steps": 10}, "cifar": {"steps": 3}})
def sat_r1(model, x, y, eps, o: SATR1Options) -> StepOutput:
    i = int(torch.randint(len(x), ()).item())
    x_fgsm = attacks.fgsm(model, x, y, eps)
    x_ifgsm = attacks.ifgsm(model, x[i:i + 1], y[i:i + 1], eps, o.steps)
    logits = model(torch.cat([x_fgsm, x_ifgsm]))
    z = logits[:-1]
    ce = F.cross_entropy(z, y)
    reg = (z[i] - logits[-1]).pow(2).sum()
    return StepOutput(ce + o.lambda_ * reg, z, y, {"ce": ce.detach(), "reg": reg.detach()})


@dataclass
class SATR3Options:
    lambda_: NonNegativeFloat = 1.0
    eps_low: NonNegativeFloat = 0.1
    tau: NonNegativeFloat = 0.4


@register_method("sat_r3", SATR3Options, cost=lambda o, b: PassCount(3, 3), title="SAT-R3", color="#bcbd22",
                 description="SAT-R3 (Vivek et al. 2020): CE(x_high) + lambda relu(CE(x_low) - tau CE(x_high))",
                 defaults={"mnist": {"eps_low": 0.1, "tau": 0.4}, "cifar": {"eps_low": 2 / 255, "tau": 0.6}})
def sat_r3(model, x, y, eps, o: SATR3Options) -> StepOutput:
    b = len(x)
    with eval_mode(model):
        grad, _ = input_gradient(model, x, y)
    sign = grad.sign()
    logits = model(torch.cat([(x + eps * sign).clamp(0, 1), (x + o.eps_low * sign).clamp(0, 1)]))
    ce_high = F.cross_entropy(logits[:b], y)
    ce_low = F.cross_entropy(logits[b:], y)
    reg = F.relu(ce_low - o.tau * ce_high)
    return StepOutput(ce_high + o.lambda_ * reg, logits[:b], y, {"ce": ce_high.detach(), "reg": reg.detach()})


def list_methods() -> list[str]:
    return METHODS.names()
