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

Methods that keep state across steps (FGSM-PGI's per-example perturbations, Free-AT's perturbation
carried between replays, ELLE-A's lambda) register with `per_example_state=True` and take a keyword
`ctx: StepContext`: the batch's dataset indices and a store of tensors the trainer saves in
checkpoint.pt, so a resumed run equals an unbroken one. Called without one (as the registry tests
do), such a method gets a fresh context. `replays` (options -> m) makes the trainer run each batch m
times in a row (Free-AT). Label smoothing is the trainer's: it sets `loss_context` around each step,
and `train_ce` (which `_ce_step` uses) reads it; a method that computes its training cross-entropy
with F.cross_entropy does not see it, and the trainer refuses label smoothing for such a method.
"""
from __future__ import annotations

import contextlib
import contextvars
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
    after_backward: Callable[[], None] | None = None   # run by the trainer after loss.backward() (Free-AT)


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
    per_example_state: bool = False            # takes `ctx: StepContext` (indices, saved state store)
    replays: Callable[[Any], int] | None = None  # options -> times each batch is trained in a row (None: 1)


@dataclass
class StepContext:
    """What a stateful method sees beyond (x, y): the dataset indices of the batch, the trainer's epoch
    and replay counters, and `store`, tensors that persist across steps and are saved in checkpoint.pt
    (so per-example memories and adaptive weights resume exactly)."""
    indices: torch.Tensor                  # positions of the batch's examples in the training split
    n_examples: int                        # size of the training split: first dim of per-example tensors
    store: dict[str, torch.Tensor] = field(default_factory=dict)
    epoch: int = 0                         # finished epochs (as the trainer counts them)
    replay: int = 0                        # 0 .. replays - 1: which repetition of this batch

    @classmethod
    def fresh(cls, x: torch.Tensor) -> "StepContext":
        """A new run's context for one batch: indices 0..B-1 and an empty store."""
        return cls(torch.arange(len(x), device=x.device), len(x))

    def per_example(self, name: str, like: torch.Tensor) -> torch.Tensor:
        """The per-example tensor `name` (n_examples x like's example shape), zeros when first asked."""
        if name not in self.store:
            self.store[name] = torch.zeros((self.n_examples, *like.shape[1:]), dtype=torch.float32,
                                           device=like.device)
        return self.store[name]

    def tensor(self, name: str, init: Callable[[], torch.Tensor]) -> torch.Tensor:
        """A run-level tensor `name` (e.g. an adaptive weight), created by `init` when first asked."""
        if name not in self.store:
            self.store[name] = init()
        return self.store[name]


@dataclass
class LossContext:
    """Set by the trainer around a training step: what the training cross-entropy applies."""
    label_smoothing: float = 0.0
    applied: bool = False                  # a train_ce call read it (the trainer checks it)


_LOSS_CONTEXT: contextvars.ContextVar[LossContext | None] = contextvars.ContextVar("gmr_loss", default=None)


@contextlib.contextmanager
def loss_context(label_smoothing: float = 0.0):
    """Training steps inside see `label_smoothing` in `train_ce`; yields the context to inspect."""
    ctx = LossContext(label_smoothing)
    token = _LOSS_CONTEXT.set(ctx)
    try:
        yield ctx
    finally:
        _LOSS_CONTEXT.reset(token)


def train_ce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of a training loss, with the trainer's label smoothing (none outside a
    loss_context)."""
    ctx = _LOSS_CONTEXT.get()
    if ctx is None:
        return F.cross_entropy(logits, y)
    ctx.applied = True
    return F.cross_entropy(logits, y, label_smoothing=ctx.label_smoothing)


METHODS: Registry[MethodSpec] = Registry("method")
UNKNOWN_COLOR = "#000000"


def register_method(name: str, options: type, cost: Callable[[Any, int], PassCount], description: str,
                    title: str | Callable[[Any], str], color: str,
                    defaults: dict[str, dict[str, Any]] | None = None, attack_bn: str = "eval",
                    source: str = "", per_example_state: bool = False,
                    replays: Callable[[Any], int] | None = None):
    """Register a training method: its step function, options, cost, the BatchNorm mode of its
    training attack, the code it follows, and how tables and figures show it (title, colour). Tables
    and figures list methods in registration order. `per_example_state` and `replays`: see the
    module docstring."""
    if attack_bn not in BN_MODES:
        raise ValueError(f"method {name!r}: attack_bn must be one of {', '.join(BN_MODES)}, got {attack_bn!r}")

    def decorator(fn):
        METHODS.register(name)(MethodSpec(fn, options, cost, defaults or {}, description, title, color,
                                          attack_bn, source, per_example_state, replays))
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
    return StepOutput(train_ce(logits, y), logits, y)


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


# --------------------------------------------------------------------------------------------------
# Fast-AT methods of the FastAT Benchmark's list (issue 13), each following its official repository.

def _per_example(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-example vector shaped to broadcast against a batch of inputs."""
    return v.view(-1, *([1] * (like.ndim - 1)))


@dataclass
class ZeroGradOptions:
    quantile: Fraction = 0.35        # per example, input-gradient components below this quantile of |g| are zeroed
    step_factor: PositiveFloat = 2.0  # step = step_factor * eps from the start, then projection (fgsm-alpha 2)


@register_method("zerograd", ZeroGradOptions, cost=lambda o, b: PassCount(2, 2), title="ZeroGrad",
                 color="#393b79", attack_bn="train",
                 description="ZeroGrad (Golgooni et al. 2023): FGSM from a uniform start, the smallest "
                             "input-gradient components of each example zeroed",
                 defaults={"mnist": {"quantile": 0.35}, "cifar": {"quantile": 0.35}},
                 source="rohban-lab/catastrophic_overfitting train_cifar.py:55-70 (zero_grad), :167,171,173 "
                        "(fgsm-alpha 2 x eps, zero-qval 0.35, random init), :265-288 (attack in train mode); "
                        "CIFAR-100 q 0.45 (train_cifar100.py:152), SVHN 0.7 (train_svhn.py:172); no MNIST "
                        "value is published: 0.35 (the CIFAR-10 value)")
def zerograd(model, x, y, eps, o: ZeroGradOptions) -> StepOutput:
    """As zero_grad (train_cifar.py:55-70): a start U(-eps, eps) kept in [0, 1], the gradient there in
    train mode, components with |g| under the example's `quantile` of |g| set to zero (so their pixels
    do not move), a sign step of 2 eps, projection to the eps-ball and [0, 1]. Why: small gradient
    components are the ones whose sign flips first when the loss surface curves, the paper's cause of
    catastrophic overfitting."""
    x_start = (x + _uniform_like(x, -eps, eps, None)).clamp(0, 1)
    with bn_mode(model, "train"):
        grad, _ = input_gradient(model, x_start, y)
    threshold = torch.quantile(grad.abs().flatten(1), o.quantile, dim=1)
    grad = torch.where(grad.abs() < _per_example(threshold, grad), torch.zeros_like(grad), grad)
    return _ce_step(model, project(x_start + o.step_factor * eps * grad.sign(), x, eps), y)


@dataclass
class MultiGradOptions:
    samples: PositiveInt = 3           # random starts whose gradient signs are compared (multi-samps)
    agree: PositiveInt | None = None   # a component moves when this many signs agree (None: all; multi-th)
    step_factor: PositiveFloat = 2.0   # step = step_factor * eps from x, clipped to the eps-ball
    parallel: bool = False             # one forward of all starts (multi-parallel; off in the README runs)


@register_method("multigrad", MultiGradOptions, cost=lambda o, b: PassCount(o.samples + 1, o.samples + 1),
                 title="MultiGrad", color="#637939", attack_bn="train",
                 description="MultiGrad (Golgooni et al. 2023): FGSM from x along the input-gradient signs "
                             "that agree at several random starts",
                 defaults={"mnist": {"samples": 3}, "cifar": {"samples": 3}},
                 source="rohban-lab/catastrophic_overfitting train_cifar.py:72-103 (multi_grad), :167-170 "
                        "(fgsm-alpha 2 x eps, 3 samples, threshold = samples, sequential by default), "
                        ":265-288 (train mode); README commands (3 samples on CIFAR-10/100, SVHN); no MNIST "
                        "value is published: 3")
def multigrad(model, x, y, eps, o: MultiGradOptions) -> StepOutput:
    """As multi_grad (train_cifar.py:72-103): gradients in train mode at `samples` starts U(-eps, eps)
    kept in [0, 1]; their signs summed; a component whose |sum| is below 2 agree - samples (all
    samples must agree by default) is zeroed; the step starts from x itself (not from a start) and is
    clipped to the eps-ball and [0, 1]."""
    agree = o.samples if o.agree is None else o.agree
    if agree > o.samples:
        raise ValueError(f"multigrad: agree ({agree}) must be at most samples ({o.samples})")
    xs = torch.cat([x] * o.samples) if o.parallel else None
    signs = torch.zeros_like(x)
    with bn_mode(model, "train"):
        if o.parallel:
            grad, _ = input_gradient(model, (xs + _uniform_like(xs, -eps, eps, None)).clamp(0, 1),
                                     torch.cat([y] * o.samples))
            signs = grad.sign().view(o.samples, *x.shape).sum(0)
        else:
            for _ in range(o.samples):
                grad, _ = input_gradient(model, (x + _uniform_like(x, -eps, eps, None)).clamp(0, 1), y)
                signs = signs + grad.sign()
    signs = torch.where(signs.abs() < 2 * agree - o.samples, torch.zeros_like(signs), signs)
    return _ce_step(model, project(x + o.step_factor * eps * signs.sign(), x, eps), y)


# GAT and NuAT (val-iisc) share one attack: a clean forward gives the target, a Bernoulli start of
# +-noise_factor * eps, one eps sign step on CE plus a relaxation term, projection to the eps-ball.

def _relax_this_batch(rate: float) -> bool:
    """Whether this batch's attack includes the relaxation term. The official CIFAR-10 code turns it on
    in alternate batches (counter % 2); a method sees no batch index, so a batch draws it with
    probability `rate` from the global generator (resumed exactly with the trainer's RNG state)."""
    if rate >= 1:
        return True
    return rate > 0 and bool(torch.rand(()) < rate)


def _guided_attack(model, x, y, eps, noise_factor: float, relax: Callable | None) -> torch.Tensor:
    """x_adv: the clean logits in eval mode without gradient (the target of the
    relaxation term), a start clip(x + noise_factor eps sign(0.5 - U)), the gradient in eval mode of
    sum CE + relax(logits) there (the official batch means times B: same signs), one eps sign step,
    clipped to [0, 1], projected to the eps-ball and [0, 1] (GAT_cifar10.py:188-200)."""
    with torch.no_grad(), bn_mode(model, "eval"):
        z_clean = model(x)
    x_start = (x + noise_factor * eps * torch.sign(0.5 - torch.rand_like(x))).clamp(0, 1)
    x_start.requires_grad_(True)
    with torch.enable_grad(), bn_mode(model, "eval"):
        logits = model(x_start)
        value = F.cross_entropy(logits, y, reduction="sum")
        if relax is not None:
            value = value + relax(logits, z_clean)
        (grad,) = torch.autograd.grad(value, x_start)
    x_step = (x_start.detach() + eps * grad.sign()).clamp(0, 1)
    return project(x_step, x, eps)


def _softmax_distance(z_a: torch.Tensor, z_b: torch.Tensor) -> torch.Tensor:
    """Per-example squared L2 distance between the softmax outputs (GAT's relaxation term)."""
    return (F.softmax(z_a, dim=1) - F.softmax(z_b, dim=1)).pow(2).sum(1)


def _guided_step(model, x, y, eps, o, attack_term: Callable, loss_term: Callable) -> StepOutput:
    """The step GAT and NuAT share; they differ only in the distance between clean and adversarial
    logits. The attack adds lambda * attack_term(z(x), z(x~)) on the batches `relax_rate` picks; the
    update minimises CE(z(x)) + lambda * loss_term(z(x), z(x_adv)) on one train-mode forward of
    [x_adv; x]."""
    relax = None
    if _relax_this_batch(o.relax_rate):
        def relax(logits, z_clean):
            return o.lambda_ * attack_term(z_clean, logits)
    x_adv = _guided_attack(model, x, y, eps, o.noise_factor, relax)
    logits = model(torch.cat([x_adv, x]))
    z_adv, z_clean = logits[:len(x)], logits[len(x):]
    ce = F.cross_entropy(z_clean, y)
    reg = loss_term(z_clean, z_adv)
    return StepOutput(ce + o.lambda_ * reg, z_adv, y, {"ce": ce.detach(), "reg": reg.detach()})


@dataclass
class GATOptions:
    lambda_: NonNegativeFloat = 10.0       # l2_reg: weight of the softmax distance, in the attack and the loss
    noise_factor: NonNegativeFloat = 0.5   # Bernoulli start +-noise_factor * eps (B_val)
    relax_rate: Fraction = 0.5             # fraction of batches whose attack has the relaxation term


@register_method("gat", GATOptions, cost=lambda o, b: PassCount(4, 3), title="GAT", color="#8c6d31",
                 description="GAT (Sriramanan et al. 2020): guided single-step attack; CE(x) + lambda "
                             "||softmax(x) - softmax(x_adv)||^2",
                 defaults={"mnist": {"lambda_": 15.0, "noise_factor": 1.0, "relax_rate": 1.0},
                           "cifar": {"lambda_": 10.0, "noise_factor": 0.5, "relax_rate": 0.5}},
                 source="val-iisc/GAMA-GAT CIFAR10/GAT_cifar10.py:43-50,90-104,184-218 (l2_reg 10, B_val "
                        "4/255, Feps 8/255, relaxation on alternate batches :195, attack in eval mode :194); "
                        "MNIST/GAT-MNIST.py:40-47,86-100,167-202 (l2_reg 15, B_val 0.3, every batch); "
                        "lambda x4 at epoch 85 (CIFAR :249-254), x3 at the lr drop (MNIST :227-231): the trainer's")
def gat(model, x, y, eps, o: GATOptions) -> StepOutput:
    """Guided Adversarial Training. The attack maximises CE + lambda ||P(x) - softmax(z(x~))||^2 from a
    Bernoulli start in eval mode; the update minimises CE(x) + lambda mean ||softmax(z(x)) -
    softmax(z(x_adv))||^2 in train mode. Differences from the official code, only for BatchNorm
    models (the MNIST network has none): the target P(x) comes from an eval-mode forward (the official
    one is a train-mode forward before the attack), and x_adv and x share one train-mode forward (two
    in the official code), because a method's last forward is its only train-mode one here. The
    official lambda grows during training (x4 at CIFAR epoch 85; x3 at MNIST's lr drop): that needs the
    epoch, which the trainer holds; this is the constant-lambda form."""
    return _guided_step(model, x, y, eps, o, attack_term=lambda z, z_t: _softmax_distance(z, z_t).sum(),
                        loss_term=lambda z, z_adv: _softmax_distance(z, z_adv).mean())


@dataclass
class NuATOptions:
    lambda_: NonNegativeFloat = 4.5        # Nuc_max: weight of the nuclear norm, in the attack and the loss
    noise_factor: NonNegativeFloat = 0.5   # Bernoulli start +-noise_factor * eps (B_val 4/255 at 8/255)
    relax_rate: Fraction = 0.5             # fraction of batches whose attack has the nuclear-norm term


def _nuclear(z_a: torch.Tensor, z_b: torch.Tensor) -> torch.Tensor:
    """||z_a - z_b||_*: the sum of singular values of the B x classes difference of logits (in fp32:
    the SVD has no bf16 kernel, and mixed-precision training runs this under autocast)."""
    diff = z_a - z_b
    return torch.linalg.matrix_norm(diff.float() if diff.dtype in (torch.bfloat16, torch.float16) else diff,
                                    ord="nuc")


@register_method("nuat", NuATOptions, cost=lambda o, b: PassCount(4, 3), title="NuAT", color="#843c39",
                 description="NuAT (Sriramanan et al. 2021): nuclear-norm guided single-step attack; "
                             "CE(x) + lambda ||z(x) - z(x_adv)||_* / B",
                 defaults={"mnist": {"lambda_": 4.5, "noise_factor": 0.5, "relax_rate": 0.5},
                           "cifar": {"lambda_": 4.5, "noise_factor": 0.5, "relax_rate": 0.5}},
                 source="val-iisc/NuAT CIFAR10/NuAT_cifar10.py:35-43,102-119,197-237,274-275 (Nuc_max 4.5, "
                        "B_val 4/255, Feps 8/255, nuclear term on alternate batches :215, attack in eval "
                        "mode :213; lambda ramps 0 -> Nuc_max over epochs 0..E-10: the trainer's); no MNIST "
                        "code or value is published: the CIFAR-10 values, noise relative to eps")
def nuat(model, x, y, eps, o: NuATOptions) -> StepOutput:
    """Nuclear Norm Adversarial Training, single step (NuAT_cifar10.py:204-237): the attack maximises
    CE + lambda ||z(x) - z(x~)||_* / B from a Bernoulli start in eval mode; the update minimises
    CE(x) + lambda ||z(x) - z(x_adv)||_* / B in train mode (B: this batch's size; the official code
    divides by the nominal 64 even in the short last batch). The official lambda rises linearly from
    0 at epoch 0 to Nuc_max at epoch E-10 (:197, :274-275); a method does not see the epoch, so this
    is the constant-lambda form at Nuc_max, and the ramp is left to the trainer. BatchNorm models
    differ from the official code as in GAT (eval-mode target, one shared update forward)."""
    return _guided_step(model, x, y, eps, o, attack_term=_nuclear,
                        loss_term=lambda z, z_adv: _nuclear(z, z_adv) / len(z))


@dataclass
class ELLEOptions:
    lambda_: NonNegativeFloat | None = None   # None: the official scripts' value for eps (`elle_lambda`)


def elle_lambda(eps: float) -> float:
    """ELLE's lambda by eps as the official CIFAR-10 scripts set it (scripts/run_elle_cifar10.sh): 1000
    for eps <= 8/255, 5000 for 10/255 ... 20/255, 10000 for 22/255 ... 26/255 (eps between two
    published values takes the lower step's lambda; beyond 26/255, 10000, which no published run checks)."""
    in_255ths = eps * 255
    if in_255ths <= 8 + 1e-6:
        return 1000.0
    return 5000.0 if in_255ths <= 20 + 1e-6 else 10000.0


@register_method("elle", ELLEOptions, cost=lambda o, b: PassCount(5, 5), title="ELLE", color="#7b4173",
                 attack_bn="train", defaults={"mnist": {"lambda_": 1000.0}},
                 description="ELLE (Abad Rocamora et al. 2024): FGSM-AT + lambda * local linearity error "
                             "of the loss on random triplets in the eps-ball",
                 source="LIONS-EPFL/ELLE core/utils/train.py:288-339 (loss: FGSM from x, no clipping; "
                        "triplet x_a, x_b ~ x + U(-eps, eps), x_c between, one forward), :132-137 (train "
                        "mode); lambda by eps: scripts/run_elle_cifar10.sh; no MNIST value is published: "
                        "1000 (the CIFAR-10 value at 8/255)")
def elle(model, x, y, eps, o: ELLEOptions) -> StepOutput:
    """As the official loss() with reg 'ELLE' and the scripts' flags (attack-iter 1, step eps,
    input_noise_rate 0, clamp off): x_adv = x + eps sign(grad CE at x) in train mode, not clipped to
    [0, 1]; x_a, x_b = x + U(-eps, eps) (not clipped), x_c = (1 - a) x_a + a x_b with a ~ U(0, 1) per
    example; the penalty is the mean squared gap between CE(x_c) and (1 - a) CE(x_a) + a CE(x_b),
    gradients through all three (train.py:325-339). Not reproduced: the official trainer steps the
    optimizer twice per batch (train.py:231, :237) and runs a clean forward for its log (:362); ELLE-A
    (the adaptive lambda, which keeps the history of the error over training) needs per-run state in
    the trainer and is not this method."""
    lam = elle_lambda(eps) if o.lambda_ is None else o.lambda_
    b = len(x)
    with bn_mode(model, "train"):
        grad, _ = input_gradient(model, x, y)
    out = _ce_step(model, x + eps * grad.sign(), y)
    x_ab = torch.cat([x, x])
    x_ab = x_ab + eps * (2 * torch.rand_like(x_ab) - 1)
    a = torch.rand(b, dtype=x.dtype, device=x.device)
    x_c = (1 - _per_example(a, x)) * x_ab[:b] + _per_example(a, x) * x_ab[b:]
    losses = F.cross_entropy(model(torch.cat([x_ab, x_c])), torch.cat([y, y, y]), reduction="none")
    lin_err = F.mse_loss(losses[2 * b:], (1 - a) * losses[:b] + a * losses[b:2 * b])
    out.probes = {"ce": out.loss.detach(), "reg": lin_err.detach()}
    out.loss = out.loss + lam * lin_err
    return out


@dataclass
class AAEROptions:
    lambda1: NonNegativeFloat = 1.0        # weight of the whole term, times the abnormal fraction
    lambda2: NonNegativeFloat = 1.5        # weight of the abnormal examples' loss decrease
    lambda3: NonNegativeFloat = 0.15       # weight of their logit variation beyond the normal ones'
    noise_factor: NonNegativeFloat = 2.0   # start U(-k eps, k eps) (N-FGSM's; RS-AAER: 1)
    step_factor: PositiveFloat = 1.0       # step = step_factor * eps (RS-AAER: 1.25)
    projected: bool = False                # project to the eps-ball (RS-AAER: true)


def _aaer_penalty(o: AAEROptions, ce_before, ce_after, z_start, z_adv) -> torch.Tensor:
    """The AAER term (AAER.py:127-142): examples whose loss fell after the attack step are abnormal;
    lambda1 * (n_abnormal / B) * (lambda2 * their mean loss decrease + lambda3 * relu(their mean
    squared logit change - the normal examples' (a constant))). Zero unless both kinds are present."""
    abnormal = ce_before > ce_after.detach()
    n_abnormal = int(abnormal.sum())
    if n_abnormal in (0, len(abnormal)):
        return ce_after.sum() * 0.0
    decrease = (ce_before[abnormal] - ce_after[abnormal]).sum() / n_abnormal
    variation = (z_start[abnormal] - z_adv[abnormal]).pow(2).sum(1).mean()
    normal = (z_start[~abnormal] - z_adv[~abnormal]).pow(2).sum(1).mean().detach()
    return o.lambda1 * n_abnormal / len(abnormal) * (o.lambda2 * decrease + o.lambda3 * F.relu(variation - normal))


@register_method("n_aaer", AAEROptions, cost=lambda o, b: PassCount(2, 2), title="N-AAER", color="#aec7e8",
                 attack_bn="train",
                 description="N-AAER (Lin et al. 2023): N-FGSM + a penalty on abnormal adversarial "
                             "examples (loss lower after the attack step)",
                 defaults={"mnist": {"lambda2": 1.5, "lambda3": 0.15}, "cifar": {"lambda2": 1.5, "lambda3": 0.15}},
                 source="tmllab/2023_NeurIPS_AAER CIFAR10/AAER.py:93-153 (train mode :83; noise 2 eps, "
                        "clamp 0, alpha 1.0 eps), utils.py:20-24 (l2_square); README: CIFAR-10/100 eps 8/255 "
                        "lamda 1 / 1.5 / 0.15 (12/255: 5.0, 0.55; 16/255: 8.5, 1.5; 32/255: 2.75, 0.75, "
                        "--opt lambda2=... --opt lambda3=...); no MNIST value is published: the 8/255 values")
def n_aaer(model, x, y, eps, o: AAEROptions) -> StepOutput:
    """As AAER.py:95-149 with the N-AAER flags: start x + U(-2 eps, 2 eps) kept in [0, 1], the gradient
    there in train mode (its CE and logits are the 'before' values, detached), a sign step of eps, no
    projection, [0, 1]; loss CE(x_adv) + the AAER penalty."""
    x_start = (x + _uniform_like(x, -o.noise_factor * eps, o.noise_factor * eps, None)).clamp(0, 1)
    with bn_mode(model, "train"):
        grad, z_start = input_gradient(model, x_start, y)
    z_start = z_start.detach()
    x_adv = x_start + o.step_factor * eps * grad.sign()
    x_adv = project(x_adv, x, eps) if o.projected else x_adv.clamp(0, 1)
    z_adv = model(x_adv)
    ce_after = F.cross_entropy(z_adv, y, reduction="none")
    ce = ce_after.mean()
    reg = _aaer_penalty(o, F.cross_entropy(z_start, y, reduction="none"), ce_after, z_start, z_adv)
    return StepOutput(ce + reg, z_adv, y, {"ce": ce.detach(), "reg": reg.detach()})


@dataclass
class SSATOptions:
    step_factor: PositiveFloat = 1.25   # FGSM-RS step = step_factor * eps (alpha 10/255 at 8/255)
    checkpoints: PositiveInt = 3        # c: x + k (x_adv - x) / c, k = 1 .. c-1, are checked before x_adv


@register_method("ssat", SSATOptions, cost=lambda o, b: PassCount(o.checkpoints + 1, 2), title="SSAT",
                 color="#ffbb78",
                 description="SSAT (Kim et al. 2021): FGSM-RS, then the smallest checked step along the "
                             "perturbation that already misclassifies",
                 defaults={"mnist": {"step_factor": 1.25, "checkpoints": 3},
                           "cifar": {"step_factor": 1.25, "checkpoints": 3}},
                 source="Harry24k/catastrophic-overfitting defenses/trainers/co_adv_trainer.py:48-160 "
                        "(checkpoints in eval mode :80; the FFGSM attack runs through torchattacks 2.12 "
                        "Attack.__call__, which sets eval mode), README (eps 8, alpha 10, c 3); no MNIST "
                        "value is published: the CIFAR-10 ratios")
def ssat(model, x, y, eps, o: SSATOptions) -> StepOutput:
    """As COAdvTrainer._do_iter: FGSM-RS in eval mode (start U(-eps, eps) in [0, 1], step 1.25 eps,
    projection); an example misclassified at the start trains on x itself; for the others the
    checkpoints x + k (x_adv - x) / c are classified in eval mode and the first misclassified one
    replaces x_adv. Every example's checkpoints are classified (the official code skips those already
    settled: same samples, a declared cost that does not depend on the data)."""
    x_start = (x + _uniform_like(x, -eps, eps, None)).clamp(0, 1)
    with bn_mode(model, "eval"):
        grad, z_start = input_gradient(model, x_start, y)
        x_adv = project(x_start + o.step_factor * eps * grad.sign(), x, eps)
        pert = x_adv - x
        wrong_at_start = z_start.detach().argmax(1) != y
        chosen = torch.where(_per_example(wrong_at_start, x), x, x_adv)
        pending = ~wrong_at_start
        with torch.no_grad():
            for k in range(1, o.checkpoints):
                x_k = x + k * (pert / o.checkpoints)
                take = pending & (model(x_k).argmax(1) != y)
                chosen = torch.where(_per_example(take, x), x_k, chosen)
                pending = pending & ~take
    return _ce_step(model, chosen.detach(), y)


# --------------------------------------------------------------------------------------------------
# Methods that keep state across steps (the trainer's StepContext; see the module docstring).

@dataclass
class FreeATOptions:
    replays: PositiveInt = 8           # m: each batch trained m times in a row (replay_m)
    step_factor: PositiveFloat = 1.0   # perturbation step = step_factor * eps (the official step is eps)


@register_method("free_at", FreeATOptions, cost=lambda o, b: PassCount(1, 1), title="Free-AT", color="#e7ba52",
                 attack_bn="train", per_example_state=True, replays=lambda o: o.replays,
                 description="Free-AT (Shafahi et al. 2019): each batch replayed m times; one backward gives "
                             "the weight gradient and the perturbation's, which carries over to the next step",
                 source="ashafahi/free_adv_train free_train.py:54-64 (pert + eps sign(grad), clipped to +-eps, "
                        "updated with the same backward as the weights), :97-100 (a new batch every replay_m "
                        "steps; train_steps counts replays), free_model.py:46-51 (one perturbation variable of "
                        "the batch's shape, input clipped to the image range; train-mode graph), config.py:15,23 "
                        "(m 8); no MNIST value is published: m 8")
def free_at(model, x, y, eps, o: FreeATOptions, ctx: StepContext | None = None) -> StepOutput:
    """One replay: the loss at clip(x + delta) in train mode, where delta is the run's single
    batch-shaped perturbation (never reset, as the official variable); after the trainer's backward,
    delta += step sign(its gradient), clipped to [-eps, eps] (for the next replay or batch). A short
    last batch uses the first rows of delta, as the official PyTorch code does. The trainer divides the
    epochs by m (`replays`), so the number of passes over the data stays the configured epochs."""
    ctx = ctx if ctx is not None else StepContext.fresh(x)
    delta = ctx.tensor("free_at_delta", lambda: torch.zeros_like(x, dtype=torch.float32))
    b = len(x)
    noise = delta[:b].clone().requires_grad_(True)
    out = _ce_step(model, (x + noise).clamp(0, 1), y)

    def after_backward():
        if noise.grad is not None:
            with torch.no_grad():
                delta[:b] += o.step_factor * eps * noise.grad.sign()
                delta.clamp_(-eps, eps)
    out.after_backward = after_backward
    return out


@dataclass
class PGIOptions:
    lambda_: NonNegativeFloat = 10.0          # lamda: weight of the MSE between the two forwards' logits
    step_factor: PositiveFloat = 1.0          # alpha = step_factor * eps (8/255 at 8/255)
    momentum_decay: NonNegativeFloat = 0.3    # decay of the per-example gradient momentum
    factor: Fraction = 0.6                    # label smoothing: the true class's target probability (1: none)
    own_smoothing: bool = True                # False: the trainer's label_smoothing instead of `factor`
    reset_every: PositiveInt = 40             # epochs_reset: memories re-initialised at epochs 0, k, 2k, ...


def _pgi_ce(logits: torch.Tensor, y: torch.Tensor, o: PGIOptions) -> torch.Tensor:
    """FGSM-PGI's cross-entropy with its own label smoothing (true class `factor`, the rest share
    1 - factor: torch's smoothing s = (1 - factor) C / (C - 1)); the trainer's with own_smoothing off."""
    if not o.own_smoothing:
        return train_ce(logits, y)
    factor = o.factor
    classes = logits.shape[1]
    smoothing = (1 - factor) * classes / (classes - 1)
    if smoothing > 1:
        raise ValueError(f"fgsm_pgi: factor must be at least 1/{classes} for {classes} classes, got {factor}")
    return F.cross_entropy(logits, y, label_smoothing=smoothing)


@register_method("fgsm_pgi", PGIOptions, cost=lambda o, b: PassCount(2, 3), title="FGSM-PGI", color="#d6616b",
                 attack_bn="train", per_example_state=True,
                 description="FGSM-PGI (Jia et al. 2022): FGSM from each example's prior perturbation (its "
                             "momentum step of the last epoch) + lambda MSE(z(x_adv), z(x + prior))",
                 source="jiaxiaojunQAQ/FGSM-PGI FGSM_MEP.py:187-197 (memory reset every 40 epochs to "
                        "+-alpha), :240-260 (gradient at x + prior in train mode :117, L1-normalised momentum, "
                        "decay 0.3), :271-293 (loss: smoothed CE + lamda MSE of logits, memory written), "
                        ":40-41 and :233 (factor 0.6, lamda 10), :29-32 (eps 8, alpha 8); no MNIST value is "
                        "published: the CIFAR-10 values, alpha relative to eps")
def fgsm_pgi(model, x, y, eps, o: PGIOptions, ctx: StepContext | None = None) -> StepOutput:
    """FGSM-MEP, the code's main variant: delta = the example's stored prior (at a reset epoch a fresh
    +-alpha sign draw: every example is visited once per epoch, so drawing at the visit equals the
    official whole-set draw); the gradient g of the smoothed CE at x + delta (not clipped, as the
    official first forward); momentum = g / ||g||_1 (over the batch) + decay * momentum; the training
    point x + clip(delta + alpha sign g) and the next prior clip(delta + alpha sign momentum), both
    within eps and [0, 1]; loss CE(z_adv) + lambda MSE(z_adv, z_start), gradients through both."""
    ctx = ctx if ctx is not None else StepContext.fresh(x)
    alpha = o.step_factor * eps
    memory, moments = ctx.per_example("pgi_delta", x), ctx.per_example("pgi_momentum", x)
    if ctx.epoch % o.reset_every == 0:
        delta = (alpha * torch.sign(_uniform_like(x, -eps, eps, None))).clamp(-eps, eps)
        momentum = torch.zeros_like(x)
    else:
        delta, momentum = memory[ctx.indices].to(x.dtype), moments[ctx.indices].to(x.dtype)
    delta.requires_grad_(True)
    with bn_mode(model, "train"):
        z_start = model(x + delta)
        (grad,) = torch.autograd.grad(_pgi_ce(z_start, y, o), delta, retain_graph=True)
    delta = delta.detach()
    momentum = grad / grad.abs().sum().clamp(min=1e-12) + momentum * o.momentum_decay  # 0/0 guard only

    def step(direction):
        return torch.max(torch.min((delta + alpha * direction.sign()).clamp(-eps, eps), 1 - x), -x)
    x_adv = x + step(grad)
    memory[ctx.indices], moments[ctx.indices] = step(momentum).float(), momentum.float()
    z_adv = model(x_adv)
    ce = _pgi_ce(z_adv, y, o)
    reg = F.mse_loss(z_adv.float(), z_start.float())
    return StepOutput(ce + o.lambda_ * reg, z_adv, y, {"ce": ce.detach(), "reg": reg.detach()})


@dataclass
class ELLEAOptions:
    lambda_max: NonNegativeFloat = 4000.0   # lambda_aux: the weight set when the error spikes
    decay: Fraction = 0.99                  # decay_rate: lambda *= decay at every other step
    sensitivity: NonNegativeFloat = 2.0     # a spike: error > mean + sensitivity * std of all earlier errors


@register_method("elle_a", ELLEAOptions, cost=lambda o, b: PassCount(5, 5), title="ELLE-A", color="#ce6dbd",
                 attack_bn="train", per_example_state=True,
                 description="ELLE-A (Abad Rocamora et al. 2024): ELLE with an adaptive lambda, 0 until the "
                             "linearity error spikes, then lambda_max decaying by 0.99 a step",
                 source="LIONS-EPFL/ELLE train.py:124-127 (lambda starts at 0, lambda_aux = lin_reg), "
                        "core/utils/train.py:216-227 (spike rule: more than 2 earlier errors and error > mean "
                        "+ 2 std of all of them; else lambda *= 0.99), parser.py:75-77 (decay 0.99, "
                        "sensitivity 2), scripts/run_elle-a_cifar10.sh (lin_reg 4000 at every eps); the loss "
                        "is ELLE's (see elle); no MNIST value is published: 4000")
def elle_a(model, x, y, eps, o: ELLEAOptions, ctx: StepContext | None = None) -> StepOutput:
    """ELLE's loss with the current lambda, then the official update for the next step from this
    step's error. The history of errors is kept as count, sum and sum of squares in float64 (the
    official code keeps the list; same mean and population std up to rounding), in the trainer's
    store so a resumed run continues it."""
    ctx = ctx if ctx is not None else StepContext.fresh(x)
    st = ctx.tensor("elle_a", lambda: torch.zeros(4, dtype=torch.float64, device=x.device))  # lambda, n, sum, sum sq
    lam = float(st[0])
    out = elle(model, x, y, eps, ELLEOptions(lambda_=lam))
    err = out.probes["reg"].double()
    n = st[1].clamp(min=1)
    mean = st[2] / n
    std = (st[3] / n - mean * mean).clamp(min=0).sqrt()
    spike = (st[1] > 2) & (err > mean + o.sensitivity * std)
    st[0] = torch.where(spike, torch.full_like(st[0], o.lambda_max), st[0] * o.decay)
    st[1:] += torch.stack([torch.ones_like(err), err, err * err])
    out.probes["lambda"] = torch.tensor(lam)
    return out


def method_replays(method: str, options) -> int:
    """How many times in a row the trainer trains each batch (Free-AT's m; 1 for other methods)."""
    spec = METHODS.get(method)
    return 1 if spec.replays is None else int(spec.replays(options))


def list_methods() -> list[str]:
    return METHODS.names()
