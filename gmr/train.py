"""The training loop: schedule, per-epoch validation probes, model selection, checkpoints and resume.

Only this module owns epochs, the learning-rate schedule, timing and checkpoints; a method (see
`methods.py`) only builds the loss of one batch. `train()` is a loop over small steps: a resumable
`TrainState` (from scratch, or from checkpoint.pt), `train_epoch`, `end_of_epoch` (validation probes,
selection, saving) and `run_record`. The run directory and its files belong to `gmr.runs.RunDir`:

    run.json         the run record (gmr/schemas/run.schema.json), with the run's `run_id`
    train_log.csv    one row per finished epoch (validation probes, train loss/accuracy, lr, seconds)
    model_best.pt    weights with the best validation I-FGSM-3 accuracy (the paper's selection)
    model_last.pt    weights after the last epoch
    model_ema.pt, model_ema_last.pt   with `ema_decay`: the weight average at its own best epoch (by
                     its validation I-FGSM-3 accuracy) and after the last epoch (`--checkpoint ema`)
    checkpoint.pt    resume state; removed when the run finishes unless `keep_resume_state`

Beyond the paper's recipe, the trainer offers what fast-AT recipes need, each in run.json (`training`)
and in the resume state: label smoothing of the training cross-entropy (`label_smoothing`, read by the
methods through `gmr.methods.loss_context`); an exponential moving average of the weights (`ema_decay`,
torch's AveragedModel, BatchNorm buffers averaged too), probed every epoch (`ema_val_*` columns);
per-example state for methods that register `per_example_state` (the batch's dataset indices and a
store of tensors saved in checkpoint.pt); and minibatch replays for methods that declare them
(Free-AT: each batch trained m times in a row, and the configured epochs, counted as passes over the
data as the paper counts them, divided by m: ceil(epochs / m) epochs of m replays).

`train()` holds the run folder's lock (gmr/locks.py) while it writes, so a second `gmr train` on the same
folder stops with the holder's name instead of mixing two runs' files. A resume checks checkpoint.pt (zip
CRCs, the SHA-256 of its weights, finite weights) and refuses a damaged one; a damaged model_last.pt, or a
damaged model_best.pt whose weights the resume state still has, is rewritten from it.
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

from . import attacks, precision
from .cost import PassCounter, Stopwatch, check_threads, device_facts, peak_memory_mb, pick_device
from .data import BatchIterator, DataSpec, Split, dataset_info, list_datasets, load_split
from .io import check_folder_path, remove_stale_temps, torch_save
from .locks import lock_folder
from .masking.probes import fgsm_rfgsm_logit_distance, gradient_alignment
from .methods import METHODS, StepContext, loss_context, make_options, method_cost, method_replays
from .models import MODELS, create_model
from .options import Fraction, NonNegativeFloat, PositiveFloat, PositiveInt, Seed, check
from .runs import RUN_FILES, RUN_SCHEMA, RunDir, RunError, load_weights, new_run_id, weights_digest, write_train_log

SCHEDULES = ("step", "cyclic", "onecycle", "constant")
# Steps of the per-epoch validation PGD by dataset family (its step is the dataset's usual PGD step).
PROBE_PGD_STEPS = {"mnist": 40, "cifar": 10}


class TrainingDiverged(RuntimeError):
    """The loss became NaN or inf."""


class RunConflict(ValueError):
    """The output folder holds a run with another configuration."""


@dataclass
class TrainConfig:
    dataset: str = "mnist"
    model: str = "lenet_plus"
    method: str = "gmr"
    eps: float | None = None            # Linf budget in [0, 1] pixel units; None: the dataset's usual one
    epochs: PositiveInt = 20
    batch_size: PositiveInt = 32
    lr: PositiveFloat = 0.01
    momentum: NonNegativeFloat = 0.9
    weight_decay: NonNegativeFloat = 5e-4
    schedule: str = "step"              # step: lr / 5, 25, 125 after epoch E/4, E/2, 3E/4 (paper); cyclic; onecycle; constant
    seed: Seed = 0                      # training randomness (init, shuffling, attack noise)
    method_options: dict[str, Any] = field(default_factory=dict)
    data_root: str = "data"
    val_size: int | None = None         # None: MNIST 50k/10k, CIFAR 40k/10k (paper)
    split_seed: Seed = 0                # one train/val split shared by all seeds
    n_train: int | None = None          # None: the whole training split
    n_val: int | None = 1000            # validation examples probed each epoch
    probe_pgd_steps: PositiveInt | None = None  # None: PROBE_PGD_STEPS of the dataset's family
    probe_pgd_step_size: PositiveFloat | None = None  # None: the dataset's usual PGD step
    probe_batch_size: PositiveInt = 500
    keep_epoch_checkpoints: bool = False
    keep_resume_state: bool = False     # keep checkpoint.pt (optimizer momentum, RNG) after the last epoch
    device: str = "auto"
    threads: PositiveInt | None = None
    precision: str = "fp32"             # of the training step: fp32, bf16, fp16 (CUDA), auto (gmr/precision.py)
    compile: bool = False               # torch.compile the model: opt-in, about 2x slower on CPU (gmr/precision.py)
    label_smoothing: Fraction = 0.0     # of the training cross-entropy (FastAT Benchmark: 0.4); 0: none
    ema_decay: Fraction | None = None   # weight average w <- d w + (1 - d) w_model per step (0.9995); None: off

    def resolved_eps(self) -> float:
        return self.eps if self.eps is not None else dataset_info(self.dataset).default_eps

    def validate(self) -> None:
        """Raise ValueError with a one-line reason for any bad value, before any work starts."""
        check(self)  # types and bounds from the annotations
        if self.dataset not in list_datasets():
            raise ValueError(f"unknown dataset {self.dataset!r}; valid datasets: {', '.join(list_datasets())}")
        MODELS.entry(self.model)
        METHODS.entry(self.method)
        eps = self.resolved_eps()
        if not 0.0 <= eps <= 1.0:
            raise ValueError(f"eps must be in [0, 1] (pixel units; 8/255 = {8 / 255:.4f}), got {eps}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; valid schedules: {', '.join(SCHEDULES)}")
        check_folder_path(self.data_root, "data_root")
        self.data_spec().validate()
        self._check_sizes()
        make_options(self.method, self.dataset, self.method_options)
        precision.resolve(self.precision, pick_device(self.device))
        check_threads(self.threads)
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in (0, 1) (e.g. 0.9995), got {self.ema_decay}")
        if self.label_smoothing > 0:
            check_label_smoothing(self)

    def replays(self) -> int:
        """Times each batch is trained in a row (the method's; Free-AT's m)."""
        return method_replays(self.method, make_options(self.method, self.dataset, self.method_options))

    def trained_epochs(self) -> int:
        """Epochs the trainer runs: `epochs` counts passes over the data including replays (Free-AT's
        convention, free_train.py:97-100), so ceil(epochs / m) epochs of m replays each."""
        return math.ceil(self.epochs / self.replays())

    def _check_sizes(self) -> None:
        """n_train and n_val within the split the dataset has, from its facts (no data is loaded): a
        larger one would fail only after the run folder was made."""
        info = dataset_info(self.dataset)
        val = self.val_size if self.val_size is not None else info.default_val_size
        if self.n_train is not None and self.n_train > info.train_pool - val:
            raise ValueError(f"n_train {self.n_train} is larger than the {info.train_pool - val} training examples "
                             f"of {self.dataset} ({info.train_pool} less {val} for validation)")
        if self.n_val is not None and self.n_val > val:
            raise ValueError(f"n_val {self.n_val} is larger than the {val} validation examples of {self.dataset} "
                             "(val_size)")

    def data_spec(self) -> DataSpec:
        return DataSpec(self.dataset, Path(self.data_root), self.val_size, self.split_seed,
                        self.n_train, self.n_val)

    def probe_pgd(self) -> tuple[int, float]:
        info = dataset_info(self.dataset)
        steps = self.probe_pgd_steps if self.probe_pgd_steps is not None else PROBE_PGD_STEPS[info.family]
        size = self.probe_pgd_step_size if self.probe_pgd_step_size is not None else info.step_size
        return steps, size

    def identity(self) -> dict[str, Any]:
        """The fields that define the result; the others (device, threads, what to keep) may change on
        resume."""
        d = dataclasses.asdict(self)
        for key in ("device", "threads", "data_root", "probe_batch_size", "keep_epoch_checkpoints",
                    "keep_resume_state", "compile"):
            d.pop(key)
        if d["precision"] == "fp32":  # runs recorded before the option trained in fp32: still the same run
            d.pop("precision")
        for key, off in (("label_smoothing", 0.0), ("ema_decay", None)):  # the same for runs made before them
            if d[key] == off:
                d.pop(key)
        return d


def check_label_smoothing(cfg: TrainConfig) -> None:
    """Refuse label smoothing for a method whose training loss does not read it (one that calls
    F.cross_entropy itself): one step of a tiny model on two random inputs shows whether it does."""
    info = dataset_info(cfg.dataset)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(2, *info.input_shape, generator=gen)
    y = torch.randint(0, info.num_classes, (2,), generator=gen)
    model = create_model("tiny_cnn", cfg.dataset).train()
    spec = METHODS.get(cfg.method)
    rng = torch.get_rng_state()
    try:
        with loss_context(cfg.label_smoothing) as ctx:
            spec.fn(model, x, y, cfg.resolved_eps(), make_options(cfg.method, cfg.dataset, cfg.method_options),
                    **({"ctx": StepContext.fresh(x)} if spec.per_example_state else {}))
    finally:
        torch.set_rng_state(rng)  # the check must not move the global stream
    if not ctx.applied:
        raise ValueError(f"method {cfg.method} computes its own cross-entropy and would ignore label_smoothing "
                         f"{cfg.label_smoothing}; use label_smoothing 0 with it")


def paper_step_factor(epoch: int, epochs: int) -> float:
    """The paper's step schedule by epoch: lr / 5, / 25, / 125 after epoch index E/4, E/2, 3E/4 (integer
    division, as Python 2 computed them in SAT-Rx tools/reg_utils.py:26-35 and :106; MNIST E = 20: 6, 5,
    5 and 4 epochs)."""
    for threshold, factor in ((epochs // 4, 1.0), (2 * epochs // 4, 1 / 5), (3 * epochs // 4, 1 / 25)):
        if epoch <= threshold:
            return factor
    return 1 / 125


def lr_factor(schedule: str, step: int, total: int, steps_per_epoch: int = 1) -> float:
    """Multiplier of the base lr at iteration `step` of `total` (`steps_per_epoch` iterations an epoch)."""
    t = step / max(total, 1)
    if schedule == "constant":  # short studies: the step schedule's first decay comes too early
        return 1.0
    if schedule == "step":
        return paper_step_factor(step // steps_per_epoch, max(total // steps_per_epoch, 1))
    if schedule == "cyclic":  # Wong et al. 2020: 0 -> lr at half of training -> 0, per iteration
        # (locuslab/fast_adversarial CIFAR10/train_fgsm.py:85-88: CyclicLR, step_size_up = down = total / 2)
        return 1.0 - abs(2 * t - 1.0)
    # one cycle: linear warm-up to the base lr over 40% of training, linear decay to 0
    return t / 0.4 if t < 0.4 else max(0.0, (1.0 - t) / 0.6)


# --------------------------------------------------------------------------------------------------

@torch.no_grad()
def _correct(model, x, y) -> int:
    return int((model(x).argmax(1) == y).sum())


def validation_probes(model, x, y, cfg: TrainConfig, epoch: int, device) -> dict[str, float]:
    """The per-epoch probes on the fixed validation subset (deterministic for a given epoch)."""
    eps = cfg.resolved_eps()
    steps, step_size = cfg.probe_pgd()
    alpha = dataset_info(cfg.dataset).probe_alpha
    gen = torch.Generator(device=device).manual_seed(10_000 * cfg.seed + epoch)
    sums = dict(clean=0.0, fgsm=0.0, ifgsm3=0.0, pgd=0.0, logit_dist=0.0, grad_align=0.0)
    n = len(x)
    with attacks.eval_mode(model):
        for lo in range(0, n, cfg.probe_batch_size):
            xb, yb = x[lo:lo + cfg.probe_batch_size], y[lo:lo + cfg.probe_batch_size]
            k = len(xb)
            sums["clean"] += _correct(model, xb, yb)
            sums["fgsm"] += _correct(model, attacks.fgsm(model, xb, yb, eps), yb)
            sums["ifgsm3"] += _correct(model, attacks.ifgsm(model, xb, yb, eps, 3), yb)
            sums["pgd"] += _correct(model, attacks.pgd(model, xb, yb, eps, steps, step_size, generator=gen), yb)
            sums["logit_dist"] += k * fgsm_rfgsm_logit_distance(model, xb, yb, eps, alpha, gen)
            sums["grad_align"] += k * gradient_alignment(model, xb, yb, eps, gen)
    return {f"val_{k}": v / n for k, v in sums.items()}


def train_batch_pgd5(model, x, y, cfg: TrainConfig, epoch: int, device) -> float:
    """PGD-5 accuracy (step eps/4, one random start) on a training batch: the input of Wong et al.'s
    early-stopping rule (locuslab/fast_adversarial CIFAR10/train_fgsm.py:130-139: 5 steps of 2/255 at
    eps 8/255; `gmr.runs.CO_RULES["wong2020"]`). Deviations, so that a probe neither changes the model
    nor depends on the shuffle: a fixed batch (the first training images) instead of each epoch's first
    batch, and eval mode instead of their train mode (which also updates BatchNorm statistics)."""
    eps = cfg.resolved_eps()
    gen = torch.Generator(device=device).manual_seed(20_000 * cfg.seed + epoch)
    with attacks.eval_mode(model):
        x_adv = attacks.pgd(model, x, y, eps, 5, eps / 4, generator=gen)
        return _correct(model, x_adv, y) / len(x)


# --------------------------------------------------------------------------------------------------
# The resumable state

def _new_ledger() -> dict[str, float]:
    return dict(forward=0.0, backward=0.0, train_seconds=0.0, probe_seconds=0.0, samples=0)


@dataclass
class TrainState:
    """Everything that continues a run after its last finished epoch: saved to checkpoint.pt after
    every epoch, so a resumed run equals an unbroken one (same weights, log and RNG streams)."""
    run_id: str
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    batches: BatchIterator
    epoch: int = 0                      # finished epochs
    best_metric: float = -math.inf      # best validation I-FGSM-3 accuracy so far
    best_epoch: int = -1
    log: list[dict] = field(default_factory=list)
    ledger: dict[str, float] = field(default_factory=_new_ledger)
    scaler: torch.amp.GradScaler | None = None   # fp16 loss scaling (disabled otherwise); its scale is saved
    ema: AveragedModel | None = None    # the weight average (cfg.ema_decay), updated after every step
    ema_best_metric: float = -math.inf  # its best validation I-FGSM-3 accuracy so far
    ema_best_epoch: int = -1
    method_store: dict[str, torch.Tensor] = field(default_factory=dict)  # StepContext.store of the method

    @classmethod
    def create(cls, cfg: TrainConfig, x: torch.Tensor, y: torch.Tensor, device) -> TrainState:
        """A fresh run: seeded model, SGD, the shuffling generator and the lr schedule."""
        torch.manual_seed(cfg.seed)
        model = create_model(cfg.model, cfg.dataset).to(device)
        step_precision = precision.resolve(cfg.precision, device)
        if precision.channels_last(step_precision, device, model):
            model = model.to(memory_format=torch.channels_last)
        optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                    weight_decay=cfg.weight_decay)
        batches = BatchIterator(x, y, cfg.batch_size, shuffle=True, augment=dataset_info(cfg.dataset).augment,
                                generator=torch.Generator().manual_seed(cfg.seed), with_indices=True)
        steps_per_epoch = len(batches) * cfg.replays()  # the lr moves every replay (free_train.py:47, :126)
        total_steps = cfg.trained_epochs() * steps_per_epoch
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_factor(cfg.schedule, step, total_steps, steps_per_epoch))
        ema = (AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay), use_buffers=True)
               if cfg.ema_decay is not None else None)
        return cls(new_run_id(cfg.method, cfg.dataset, cfg.seed), model, optimizer, scheduler, batches,
                   scaler=precision.grad_scaler(step_precision, device), ema=ema)

    def to_checkpoint(self, identity: dict, device) -> dict:
        weights = self.model.state_dict()
        return {
            "run_id": self.run_id, "epoch": self.epoch, "config_identity": identity,
            "model": weights, "weights_sha256": weights_digest(weights), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            "rng_data": self.batches.generator.get_state(),
            "best_metric": self.best_metric, "best_epoch": self.best_epoch, "log": self.log,
            "ledger": self.ledger, "scaler": self.scaler.state_dict() if self.scaler is not None else {},
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "ema_best": [self.ema_best_metric, self.ema_best_epoch], "method_state": dict(self.method_store),
        }

    def load_checkpoint(self, ckpt: dict, device) -> None:
        """Continue from `ckpt` (a checkpoint of a run from before run ids keeps the new id)."""
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        torch.set_rng_state(ckpt["rng_cpu"])
        if device.type == "cuda" and ckpt.get("rng_cuda") is not None:
            torch.cuda.set_rng_state(ckpt["rng_cuda"], device)
        self.batches.generator.set_state(ckpt["rng_data"])
        self.run_id = ckpt.get("run_id", self.run_id)
        self.epoch, self.best_metric, self.best_epoch = ckpt["epoch"], ckpt["best_metric"], ckpt["best_epoch"]
        self.log, self.ledger = list(ckpt["log"]), dict(ckpt["ledger"])
        if ckpt.get("scaler") and self.scaler is not None:  # fp16: the loss scale it had reached
            self.scaler.load_state_dict(ckpt["scaler"])
        if self.ema is not None and ckpt.get("ema") is not None:
            self.ema.load_state_dict(ckpt["ema"])
            self.ema_best_metric, self.ema_best_epoch = ckpt["ema_best"]
        self.method_store = {k: v.to(device) for k, v in ckpt.get("method_state", {}).items()}


def _conflict(run: RunDir) -> RunConflict:
    return RunConflict(f"{run.path} holds a run with another configuration; use a new --out or delete "
                       "the folder to start over")


def _finished_record(cfg: TrainConfig, run: RunDir) -> dict | None:
    """run.json of a run of this configuration that already finished; None when there is none."""
    if not run.record_file.exists():
        return None
    record = run.record("--out")
    if record["config_identity"] != cfg.identity():
        raise _conflict(run)
    return record


def _start(cfg: TrainConfig, run: RunDir, x: torch.Tensor, y: torch.Tensor, device) -> TrainState:
    """A fresh state, continued from checkpoint.pt when the folder holds one of this configuration."""
    state = TrainState.create(cfg, x, y, device)
    if run.resume_file.exists():
        ckpt = run.load_resume_state()  # a damaged one raises RunError naming the fix
        if ckpt["config_identity"] != cfg.identity():
            raise _conflict(run)
        state.load_checkpoint(ckpt, device)
        _repair_run_files(state, cfg, run)
    return state


def _saved_epoch(path: Path) -> tuple[int | None, str | None]:
    """(the epoch a model file holds, None), or (None, why it cannot be used)."""
    if not path.is_file():
        return None, "missing"
    try:
        return load_weights(path).get("epoch"), None
    except RunError as err:
        return None, err.reason or str(err)


def _repair_run_files(state: TrainState, cfg: TrainConfig, run: RunDir) -> None:
    """Rewrite from the resume state what it holds (the log, the last weights, and the best ones when they
    are the last); refuse when model_best.pt is damaged and its weights are kept nowhere else. A model
    file one epoch ahead of the resume state (killed before checkpoint.pt was written) is left as it is:
    that epoch is trained again and rewrites it."""
    write_train_log(run.log_file, state.log)
    last, _ = _saved_epoch(run.model_file("last"))
    if last is None or last < state.epoch:
        run.save_weights(state.model, state.epoch, cfg.model, cfg.dataset, "last")
    ema_last, _ = _saved_epoch(run.model_file("ema_last"))
    if state.ema is not None and (ema_last is None or ema_last < state.epoch):
        run.save_weights(state.ema.module, state.epoch, cfg.model, cfg.dataset, "ema_last")
    best_file, k = run.model_file("best"), state.best_epoch
    best, problem = _saved_epoch(best_file)
    if k < 1 or best == k or (best is not None and best > state.epoch):
        return
    problem = problem or f"it holds epoch {best}, not the best epoch {k}"
    if k == state.epoch:
        run.save_weights(state.model, state.epoch, cfg.model, cfg.dataset, "best")
    elif _saved_epoch(run.epoch_file(k))[0] == k:
        torch_save(best_file, load_weights(run.epoch_file(k)))
    else:
        raise RunError(f"{best_file} is damaged ({problem}) and the best weights (epoch {k}) are kept "
                       f"nowhere else; restore it, or delete {run.path} to train the run again")


# --------------------------------------------------------------------------------------------------
# One epoch

@dataclass
class TrainJob:
    """What every epoch uses and nothing saves: config, device, data, the method and the counters."""
    cfg: TrainConfig
    run: RunDir
    device: torch.device
    x_val: torch.Tensor
    y_val: torch.Tensor
    method: Callable
    options: Any
    counter: PassCounter
    progress: bool
    precision: str = "fp32"             # resolved precision of the training step (gmr/precision.py)
    channels_last: bool = False         # the model's layout (gmr/precision.py)
    co_batch: tuple[torch.Tensor, torch.Tensor] | None = None   # Wong et al.'s training-batch probe
    replays: int = 1                    # times each batch is trained in a row (the method's)
    stateful: bool = False              # the method takes a StepContext (per_example_state)


def train_epoch(state: TrainState, job: TrainJob) -> tuple[dict[str, float], float]:
    """One pass over the shuffled training data (each batch `replays` times in a row); returns
    (train_* columns of the log row, seconds). Raises TrainingDiverged on a non-finite loss (checked
    every step on CPU, every 50 on a GPU)."""
    cfg, device = job.cfg, job.device
    state.model.train()
    job.counter.enabled = True
    sums = {"loss": torch.zeros((), device=device), "correct": torch.zeros((), device=device)}
    seen = 0
    watch = Stopwatch(device)
    bar = tqdm(state.batches, desc=f"{cfg.method} epoch {state.epoch + 1}/{cfg.trained_epochs()}", leave=False,
               disable=not job.progress, mininterval=1.0)
    with watch:
        for step, (xb, yb, idx) in enumerate(bar):
            for replay in range(job.replays):
                result = _train_step(state, job, xb, yb, StepContext(idx, len(state.batches.x), state.method_store,
                                                                     state.epoch, replay))
                sums["loss"] += result.loss.detach().float() * len(yb)  # sums in fp32, not in the step's bf16
                sums["correct"] += (result.logits.detach().argmax(1) == result.targets).sum()
                for k, v in result.probes.items():
                    sums[f"p_{k}"] = sums.get(f"p_{k}", 0.0) + v.detach().float() * len(yb)
                seen += len(yb)
                # checking every step would synchronise the GPU each step
                if (device.type == "cpu" or step % 50 == 0) and not torch.isfinite(result.loss):
                    raise TrainingDiverged(
                        f"loss became {result.loss.item()} at epoch {state.epoch + 1}, step {step + 1} "
                        f"({cfg.method}, lr {state.scheduler.get_last_lr()[0]:.3g}); lower --lr or the "
                        "method's lambda. The last finished epoch is kept in checkpoint.pt")
    if not torch.isfinite(sums["loss"]):
        raise TrainingDiverged(f"loss became non-finite during epoch {state.epoch + 1} ({cfg.method}); "
                               "lower --lr or the method's lambda")
    _count(state.ledger, job.counter, seen, watch.seconds)
    return ({"train_loss": (sums["loss"] / seen).item(), "train_acc": (sums["correct"] / seen).item(),
             **{f"train_{k[2:]}": (v / seen).item() for k, v in sums.items() if k.startswith("p_")}},
            watch.seconds)


def _train_step(state: TrainState, job: TrainJob, xb, yb, ctx: StepContext):
    """One optimizer step: the method's loss (under the step's precision and the trainer's label
    smoothing), backward, the method's after-backward hook, the step, the lr and the weight average."""
    kwargs = {"ctx": ctx} if job.stateful else {}
    with precision.autocast(job.precision, job.device), loss_context(job.cfg.label_smoothing):
        result = job.method(state.model, xb, yb, job.cfg.resolved_eps(), job.options, **kwargs)  # attack included
    state.optimizer.zero_grad(set_to_none=True)
    state.scaler.scale(result.loss).backward()  # a disabled scaler (fp32, bf16) passes through
    if result.after_backward is not None:
        result.after_backward()
    state.scaler.step(state.optimizer)
    state.scaler.update()
    state.scheduler.step()
    if state.ema is not None:
        state.ema.update_parameters(state.model)
    return result


def _count(ledger: dict, counter: PassCounter, samples: int, seconds: float) -> None:
    """Move an epoch's passes, samples and seconds into the ledger (probes are not counted)."""
    counter.enabled = False
    ledger["train_seconds"] += seconds
    ledger["samples"] += samples
    ledger["forward"] += counter.count.forward
    ledger["backward"] += counter.count.backward
    counter.count.forward = counter.count.backward = 0.0


def end_of_epoch(state: TrainState, job: TrainJob, train_row: dict, seconds: float) -> dict:
    """Validation probes, the log row, model selection and saving (weights, log, resume state)."""
    cfg, run, model = job.cfg, job.run, state.model
    with Stopwatch(job.device) as probe_watch:
        probes = validation_probes(model, job.x_val, job.y_val, cfg, state.epoch, job.device)
        if job.co_batch is not None:
            probes["train_batch_pgd5"] = train_batch_pgd5(model, *job.co_batch, cfg, state.epoch, job.device)
        if state.ema is not None:  # the same probes (same seeds) on the weight average
            ema_probes = validation_probes(state.ema.module, job.x_val, job.y_val, cfg, state.epoch, job.device)
            probes.update({f"ema_{k}": v for k, v in ema_probes.items()})
    state.ledger["probe_seconds"] += probe_watch.seconds
    state.epoch += 1
    row = {"epoch": state.epoch, **train_row, **probes, "lr": state.scheduler.get_last_lr()[0],
           "epoch_seconds": seconds, "probe_seconds": probe_watch.seconds}
    state.log.append(row)
    if probes["val_ifgsm3"] > state.best_metric:
        state.best_metric, state.best_epoch = probes["val_ifgsm3"], state.epoch
        run.save_weights(model, state.epoch, cfg.model, cfg.dataset, "best")
    run.save_weights(model, state.epoch, cfg.model, cfg.dataset,
                     "last", *(["epoch"] if cfg.keep_epoch_checkpoints else []))
    if state.ema is not None:
        _save_ema(state, cfg, run, probes["ema_val_ifgsm3"])
    write_train_log(run.log_file, state.log)
    torch_save(run.resume_file, state.to_checkpoint(cfg.identity(), job.device))
    if job.progress:
        print(f"[{cfg.method}] epoch {state.epoch}/{cfg.trained_epochs()}: loss {row['train_loss']:.3f} "
              f"val clean {probes['val_clean']:.3f} fgsm {probes['val_fgsm']:.3f} "
              f"ifgsm3 {probes['val_ifgsm3']:.3f} pgd {probes['val_pgd']:.3f} "
              f"({seconds:.1f}s + probes {probe_watch.seconds:.1f}s)", flush=True)
    return row


def _save_ema(state: TrainState, cfg: TrainConfig, run: RunDir, metric: float) -> None:
    """The weight average after this epoch (model_ema_last.pt), and as model_ema.pt when its own
    validation I-FGSM-3 accuracy is the best so far (selected like model_best.pt)."""
    names = ["ema_last"]
    if metric > state.ema_best_metric:
        state.ema_best_metric, state.ema_best_epoch = metric, state.epoch
        names.append("ema")
    run.save_weights(state.ema.module, state.epoch, cfg.model, cfg.dataset, *names)


# --------------------------------------------------------------------------------------------------
# The run record

def _cost(cfg: TrainConfig, options, ledger: dict, device) -> dict:
    declared = method_cost(cfg.method, options, cfg.batch_size)
    counted = (ledger["forward"] + ledger["backward"]) / 2
    return {
        "forward_passes": ledger["forward"], "backward_passes": ledger["backward"],
        "passes": counted, "passes_per_sample": counted / max(ledger["samples"], 1),
        "declared_passes_per_sample": declared.passes,
        "train_seconds": ledger["train_seconds"], "probe_seconds": ledger["probe_seconds"],
        "seconds_per_epoch": ledger["train_seconds"] / cfg.trained_epochs(),
        "images_per_second": ledger["samples"] / max(ledger["train_seconds"], 1e-9),
        "peak_memory_mb": peak_memory_mb(device), **device_facts(device),
    }


def run_record(state: TrainState, job: TrainJob, n_train: int) -> dict:
    """The content of run.json (gmr/schemas/run.schema.json) of a finished run."""
    cfg = job.cfg
    by_epoch = {row["epoch"]: row for row in state.log}
    return {
        "schema": RUN_SCHEMA, "run_id": state.run_id, "status": "complete",
        "config": dataclasses.asdict(cfg), "config_identity": cfg.identity(),
        "eps": cfg.resolved_eps(), "method_options": dataclasses.asdict(job.options),
        "data": {"n_train": n_train, "n_val": len(job.x_val), "split_seed": cfg.split_seed,
                 "val_size": cfg.val_size or dataset_info(cfg.dataset).default_val_size},
        "selection": {"criterion": "val_ifgsm3", "best_epoch": state.best_epoch, "last_epoch": state.epoch,
                      **({"ema_best_epoch": state.ema_best_epoch} if state.ema is not None else {})},
        "metrics": {"best": by_epoch[state.best_epoch], "last": by_epoch[state.epoch]},
        "training": {"label_smoothing": cfg.label_smoothing, "ema_decay": cfg.ema_decay,
                     "replays": job.replays, "trained_epochs": state.epoch,
                     "method_state": sorted(state.method_store)},
        "cost": {**_cost(cfg, job.options, state.ledger, job.device), "precision": job.precision,
                 "channels_last": job.channels_last},
        "resume_state_kept": cfg.keep_resume_state,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


# --------------------------------------------------------------------------------------------------

def train(cfg: TrainConfig, out: str | Path, progress: bool = True) -> dict:
    """Train (or resume) a run in `out` and return the content of run.json; a finished run of the same
    configuration is returned as it is. Raises LockHeld when another process writes `out`."""
    cfg.validate()
    run = RunDir(out)
    done = _finished_record(cfg, run)
    if done is not None:
        return done
    run.path.mkdir(parents=True, exist_ok=True)
    with lock_folder(run.path):
        done = _finished_record(cfg, run)  # finished by the holder we may have waited for
        if done is not None:
            return done
        remove_stale_temps(run.path, RUN_FILES)  # left by a killed writer: no live one holds the lock
        remove_stale_temps(run.epoch_file(0).parent)
        return _train(cfg, run, progress)


def _train(cfg: TrainConfig, run: RunDir, progress: bool) -> dict:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = pick_device(cfg.device)
    x_tr, y_tr = (t.to(device) for t in load_split(cfg.data_spec(), Split.TRAIN))
    x_va, y_va = (t.to(device) for t in load_split(cfg.data_spec(), Split.VAL))
    state = _start(cfg, run, x_tr, y_tr, device)
    job = TrainJob(cfg, run, device, x_va, y_va, METHODS.get(cfg.method).fn,
                   make_options(cfg.method, cfg.dataset, cfg.method_options), PassCounter(state.model), progress,
                   co_batch=(x_tr[:cfg.batch_size], y_tr[:cfg.batch_size]))
    job.replays, job.stateful = cfg.replays(), METHODS.get(cfg.method).per_example_state
    job.precision = precision.resolve(cfg.precision, device)
    job.channels_last = precision.channels_last(job.precision, device, state.model)
    if cfg.compile:  # in place: the state dict keeps its names; compiled on the first step of each mode
        state.model.compile()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        while state.epoch < cfg.trained_epochs():
            train_row, seconds = train_epoch(state, job)
            end_of_epoch(state, job, train_row, seconds)
    finally:
        job.counter.remove()
    record = run_record(state, job, len(x_tr))
    run.write_record(record)
    if not cfg.keep_resume_state:
        run.resume_file.unlink(missing_ok=True)
    return record
