"""Training methods: each is one function (model, x, y, eps, options) -> StepOutput, registered by name
with its options (paper defaults per dataset family) and its cost in sample-passes.

The trainer owns epochs, schedule, timing and checkpoints; a method only builds the training loss of
one batch. A method declares the BatchNorm mode of the attack that makes its training batch
(`attack_bn`: "eval" as the seed paper's code, SAT-Rx; "train" as FGSM-RS, N-FGSM, GradAlign and
Madry's PGD-AT) and passes it to the attack helpers, which switch and restore; the loss forward runs in
the mode the trainer set (train mode). A test checks each method's forwards against its declaration.
Every method names the code its defaults follow (`source`), shown by `gmr methods`.

Adding a method: write a function and an options dataclass, and register them:

    @dataclass
    class MyOptions:
        beta: float = 1.0

    @register_method("my_method", MyOptions, cost=lambda o, b: PassCount(2, 2),
                     description="FGSM-AT with ...", title="My-AT", color="#17becf",
                     attack_bn="eval", source="my-lab/my-repo train.py:40-60")
    def my_method(model, x, y, eps, o: MyOptions) -> StepOutput:
        x_adv = attacks.fgsm(model, x, y, eps, bn="eval")
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
from .attacks import BN_MODES, bn_mode, input_gradient, project, random_sign_like, _uniform_like
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
    attack_bn: str = "eval"                    # BatchNorm mode of the training attack (see module doc)
    source: str = ""                           # the official code the method and its defaults follow


METHODS: Registry[MethodSpec] = Registry("method")
UNKNOWN_COLOR = "#000000"


def register_method(name: str, options: type, cost: Callable[[Any, int], PassCount], description: str,
                    title: str | Callable[[Any], str], color: str,
                    defaults: dict[str, dict[str, Any]] | None = None, attack_bn: str = "eval",
                    source: str = ""):
    """Register a training method: its step function, options, cost, the BatchNorm mode of its
    training attack, the code it follows, and how tables and figures show it (title, colour). Tables
    and figures list methods in registration order."""
    if attack_bn not in BN_MODES:
        raise ValueError(f"method {name!r}: attack_bn must be one of {', '.join(BN_MODES)}, got {attack_bn!r}")

    def decorator(fn):
        METHODS.register(name)(MethodSpec(fn, options, cost, defaults or {}, description, title, color,
                                          attack_bn, source))
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
                 title="Standard", color="#7f7f7f", source="no attack; the paper's recipe (DESIGN.md section 2)")
def standard(model, x, y, eps, o) -> StepOutput:
    return _ce_step(model, x, y)


@dataclass
class FGSMOptions:
    clean_fraction: Fraction = 0.0   # fraction of each batch kept clean (0: adversarial only, as the paper)


@register_method("fgsm", FGSMOptions, description="FGSM-AT (Goodfellow et al. 2015)", title="FGSM-AT", color="#d62728",
                 cost=lambda o, b: PassCount(1 + _n_adv(o, b) / b, 1 + _n_adv(o, b) / b),
                 source="val-iisc/SAT-Rx tools/attacks.py:77-91 (FGSM_Attack_step asserts eval mode, as the "
                        "seed paper builds every training sample)")
def fgsm(model, x, y, eps, o: FGSMOptions) -> StepOutput:
    k = len(x) - _n_adv(o, len(x))
    x_adv = attacks.fgsm(model, x[k:], y[k:], eps, bn="eval") if k < len(x) else x[:0]
    return _ce_step(model, torch.cat([x[:k], x_adv]) if k else x_adv, y)


@dataclass
class RFGSMOptions:
    alpha: NonNegativeFloat | None = None   # None: eps / 2 (Tramer et al. 2018, section 4.1)
    clean_weight: Fraction = 0.5    # loss = w CE(x) + (1 - w) CE(x_adv) (Tramer et al.'s 0.5 / 0.5)
    clean_fraction: Fraction = 0.0  # fraction of each batch kept clean (Kurakin et al.'s mixed batches)


def _rfgsm_cost(o: RFGSMOptions, b: int) -> PassCount:
    passes = 1 + _n_adv(o, b) / b + (1 if o.clean_weight > 0 else 0)
    return PassCount(passes, passes)


@register_method("rfgsm", RFGSMOptions, title="R-FGSM-AT", color="#ff7f0e", cost=_rfgsm_cost,
                 description="R-FGSM-AT (Tramer et al. 2018): alpha noise, eps - alpha step; 0.5 clean + 0.5 adversarial loss",
                 defaults={"mnist": {"alpha": 0.05}},
                 source="ftramer/ensemble-adv-training tf_utils.py:64-73 (loss 0.5 (clean + adversarial)), "
                        "simple_eval.py:53-56 and :114 (alpha 0.05 on MNIST); CIFAR alpha eps/2 (the paper). "
                        "SAT-Rx has no R-FGSM-AT baseline; its alpha and adversarial-only loss: "
                        "--opt alpha=0.01 (CIFAR 2/255) --opt clean_weight=0")
def rfgsm(model, x, y, eps, o: RFGSMOptions) -> StepOutput:
    """Tramer et al.'s recipe: the full batch clean and the full batch adversarial, in two forwards as
    their code (tf_utils.py:64 and :71), loss weighted w and 1 - w. The attack in eval mode (no BN in
    their MNIST models; eval as the seed paper's code)."""
    alpha = eps / 2 if o.alpha is None else o.alpha
    k = len(x) - _n_adv(o, len(x))
    x_adv = attacks.rfgsm(model, x[k:], y[k:], eps, alpha, bn="eval") if k < len(x) else x[:0]
    out = _ce_step(model, torch.cat([x[:k], x_adv]) if k else x_adv, y)
    if o.clean_weight > 0:
        ce_adv = out.loss
        ce_clean = F.cross_entropy(model(x), y)
        out.loss = o.clean_weight * ce_clean + (1 - o.clean_weight) * ce_adv
        out.probes = {"ce": ce_adv.detach(), "ce_clean": ce_clean.detach()}
    return out


@dataclass
class GMROptions:
    lambda_: NonNegativeFloat = 5.0
    alpha: NonNegativeFloat = 0.01
    projected: bool = False   # False: the paper's code (full eps step after the noise, no projection)


@register_method("gmr", GMROptions, cost=lambda o, b: PassCount(4, 4), title="GMR", color="#2ca02c",
                 description="FGSM-AT + lambda * ||z(x_fgsm) - z(x_rfgsm)||^2 (Vivek et al. 2019)",
                 defaults={"mnist": {"lambda_": 5.0, "alpha": 0.01},
                           "cifar": {"lambda_": 25.0, "alpha": 2 / 255}},
                 source="val-iisc/SAT-Rx tools/reg_utils.py:111-166 (train_reg2); lambda and alpha: "
                        "MNIST/SAT_REG_2_training.py:42,49, CIFAR10/SAT_REG_2_training.py:42,48")
def gmr(model, x, y, eps, o: GMROptions) -> StepOutput:
    """DESIGN.md section 2: one input-gradient pass on [x; x~] in eval mode (reg_utils.py:151-153), one
    train forward on [x_fgsm; x_rfgsm] (BatchNorm statistics over both), CE on the FGSM half plus the
    logit distance (reg_utils.py:159-166)."""
    b = len(x)
    x_noisy = x + o.alpha * random_sign_like(x)          # not clipped yet, as the reference code
    with bn_mode(model, "eval"):
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
                 title=lambda o: f"PGD-{o.steps} AT", color="#1f77b4", attack_bn="train",
                 description="PGD-AT (Madry et al. 2018): random start, k steps, projection",
                 defaults={"mnist": {"steps": 40, "step_size": 0.01},
                           "cifar": {"steps": 7, "step_size": 2 / 255}},
                 source="MadryLab/mnist_challenge config.json (40 x 0.01); MadryLab/cifar10_challenge "
                        "config.json (7 x 2/255), train.py:41,57 and model.py:110 (attack on the "
                        "train-mode graph)")
def pgd(model, x, y, eps, o: PGDOptions) -> StepOutput:
    x_adv = attacks.pgd(model, x, y, eps, o.steps, o.step_size, restarts=1, bn="train")
    return _ce_step(model, x_adv, y)


@dataclass
class FGSMRSOptions:
    step_factor: PositiveFloat = 1.25     # step = step_factor * eps (Wong et al. 2020)


@register_method("fgsm_rs", FGSMRSOptions, cost=lambda o, b: PassCount(2, 2), title="FGSM-RS", color="#9467bd",
                 attack_bn="train",
                 description="FGSM-RS (Wong et al. 2020): uniform start, 1.25 eps step, projection",
                 source="locuslab/fast_adversarial CIFAR10/train_fgsm.py:31,73,105-118 (train mode, "
                        "alpha 10/255 at eps 8/255)")
def fgsm_rs(model, x, y, eps, o: FGSMRSOptions) -> StepOutput:
    x_start = (x + _uniform_like(x, -eps, eps, None)).clamp(0, 1)
    with bn_mode(model, "train"):
        grad, _ = input_gradient(model, x_start, y)
    return _ce_step(model, project(x_start + o.step_factor * eps * grad.sign(), x, eps), y)


@dataclass
class NFGSMOptions:
    noise_factor: NonNegativeFloat = 2.0     # noise U(-k eps, k eps)
    step_factor: PositiveFloat = 1.0      # step = step_factor * eps; no projection to the eps-ball


@register_method("n_fgsm", NFGSMOptions, cost=lambda o, b: PassCount(2, 2), title="N-FGSM", color="#8c564b",
                 attack_bn="train",
                 description="N-FGSM (de Jorge et al. 2022): 2 eps noise, eps step, no projection",
                 source="pdejorge/N-FGSM train.py:50-52,173,218-233 (train mode, unif 2, alpha 8/255)")
def n_fgsm(model, x, y, eps, o: NFGSMOptions) -> StepOutput:
    x_start = (x + _uniform_like(x, -o.noise_factor * eps, o.noise_factor * eps, None)).clamp(0, 1)
    with bn_mode(model, "train"):
        grad, _ = input_gradient(model, x_start, y)
    return _ce_step(model, (x_start + o.step_factor * eps * grad.sign()).clamp(0, 1), y)


@dataclass
class GradAlignOptions:
    lambda_: NonNegativeFloat | None = None   # None: the official eps rule (`gradalign_lambda`)


# The official CIFAR-10 lambdas (tml-epfl/understanding-fast-adv-training sh/exps_diff_eps_cifar10.sh:41-56)
# are 0.2 * 10 ** ((eps * 255 - 8) / 8) to three digits for eps = 1/255 ... 16/255 (0.027 ... 2.000):
# log-linear through 0.2 at 8/255 and 2.0 at 16/255.
GRADALIGN_LAMBDA_AT_8 = 0.2
GRADALIGN_DECADE_IN_255THS = 8


def gradalign_lambda(eps: float) -> float:
    """GradAlign's lambda for eps (in [0, 1] pixel units) by the official scripts' log-linear rule;
    outside 1/255 ... 16/255 it extrapolates the rule, which no published run checks."""
    return GRADALIGN_LAMBDA_AT_8 * 10 ** ((eps * 255 - 8) / GRADALIGN_DECADE_IN_255THS)


@register_method("gradalign", GradAlignOptions, cost=lambda o, b: PassCount(3, 4), title="GradAlign",
                 color="#e377c2", attack_bn="train", defaults={"mnist": {"lambda_": 0.2}},
                 description="GradAlign (Andriushchenko & Flammarion 2020): FGSM + lambda (1 - cos(g(x), g(x+eta)))",
                 source="tml-epfl/understanding-fast-adv-training train.py:91,141-200, utils.py:70-91; "
                        "CIFAR lambda by eps (sh/exps_diff_eps_cifar10.sh:41-56); no MNIST lambda is "
                        "published: 0.2 (ours, --opt lambda_=...)")
def gradalign(model, x, y, eps, o: GradAlignOptions) -> StepOutput:
    """As the official train.py: FGSM from zero in train mode, whose gradient g1 (detached, :162) is also
    the first gradient of the alignment term; g2 at x + eta, eta ~ U(-eps, eps), not clipped to [0, 1]
    (utils.py:81), with create_graph for double backprop; examples where either gradient is zero are
    dropped before the mean cosine (:194-200)."""
    lam = gradalign_lambda(eps) if o.lambda_ is None else o.lambda_
    with bn_mode(model, "train"):
        g1, _ = input_gradient(model, x, y)
        g2, _ = input_gradient(model, x + _uniform_like(x, -eps, eps, None), y, create_graph=True)
    g1, g2 = g1.flatten(1), g2.flatten(1)
    nonzero = (g1.norm(dim=1) != 0) & (g2.norm(dim=1) != 0)
    cos = F.cosine_similarity(g1[nonzero], g2[nonzero], dim=1)
    reg = 1.0 - cos.mean() if bool(nonzero.any()) else g2.sum() * 0.0
    out = _ce_step(model, (x + eps * g1.view_as(x).sign()).clamp(0, 1), y)
    out.loss = out.loss + lam * reg
    out.probes = {"reg": reg.detach()}
    return out


@dataclass
class SATR1Options:
    lambda_: NonNegativeFloat = 0.2
    steps: PositiveInt = 10           # I-FGSM steps on the one regularised sample


@register_method("sat_r1", SATR1Options, title="SAT-R1", color="#17becf",
                 cost=lambda o, b: PassCount(2 + (o.steps + 1) / b, 2 + (o.steps + 1) / b),
                 description="SAT-R1 (Vivek et al. 2020): FGSM-AT + lambda ||z(x_fgsm) - z(x_ifgsm)||^2 on one sample",
                 defaults={"mnist": {"steps": 10}, "cifar": {"steps": 3}},
                 source="val-iisc/SAT-Rx tools/reg_utils.py:38-87 (train_reg1; eval-mode attacks :62-70); "
                        "MNIST/SAT_REG_1_training.py:42,44, CIFAR10/SAT_REG_1_training.py:42,44")
def sat_r1(model, x, y, eps, o: SATR1Options) -> StepOutput:
    """The official code regularises the last sample of the batch; a random one here (the same after
    shuffling)."""
    i = int(torch.randint(len(x), ()).item())
    x_fgsm = attacks.fgsm(model, x, y, eps, bn="eval")
    x_ifgsm = attacks.ifgsm(model, x[i:i + 1], y[i:i + 1], eps, o.steps, bn="eval")
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
    alpha: NonNegativeFloat = 0.01     # the noise step before the gradient


@register_method("sat_r3", SATR3Options, cost=lambda o, b: PassCount(3, 3), title="SAT-R3", color="#bcbd22",
                 description="SAT-R3 (Vivek et al. 2020): CE(x_high) + lambda relu(CE(x_low) - tau CE(x_high))",
                 defaults={"mnist": {"eps_low": 0.1, "tau": 0.4, "alpha": 0.01},
                           "cifar": {"eps_low": 2 / 255, "tau": 0.6, "alpha": 2 / 255}},
                 source="val-iisc/SAT-Rx tools/reg_utils.py:192-277 (GenerateAdvSamples_sat_r3, train_reg3); "
                        "MNIST/SAT_REG_3_training.py:42-44,54, CIFAR10/SAT_REG_3_training.py:42-45,53")
def sat_r3(model, x, y, eps, o: SATR3Options) -> StepOutput:
    """As GenerateAdvSamples_sat_r3 (reg_utils.py:199-211): x~ = clip(x + alpha sign(N(0, I))), the
    gradient at x~ in eval mode, x_low and x_high are gradient-sign steps of eps_low and eps from x~,
    clipped to [0, 1] and not projected (so they may lie up to eps + alpha from x)."""
    b = len(x)
    x_noisy = (x + o.alpha * random_sign_like(x)).clamp(0, 1)
    with bn_mode(model, "eval"):
        grad, _ = input_gradient(model, x_noisy, y)
    sign = grad.sign()
    logits = model(torch.cat([(x_noisy + eps * sign).clamp(0, 1), (x_noisy + o.eps_low * sign).clamp(0, 1)]))
    ce_high = F.cross_entropy(logits[:b], y)
    ce_low = F.cross_entropy(logits[b:], y)
    reg = F.relu(ce_low - o.tau * ce_high)
    return StepOutput(ce_high + o.lambda_ * reg, logits[:b], y, {"ce": ce_high.detach(), "reg": reg.detach()})


def list_methods() -> list[str]:
    return METHODS.names()
