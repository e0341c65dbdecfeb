"""The training loop: schedule, per-epoch validation probes, model selection, checkpoints and resume.

Only this module owns epochs, the learning-rate schedule, timing and checkpoints; a method (see
`methods.py`) only builds the loss of one batch. A run directory holds:

    run.json         config, resolved method options, metrics of the selected and last model, cost ledger
    train_log.csv    one row per finished epoch (validation probes, train loss/accuracy, lr, seconds)
    model_best.pt    weights with the best validation I-FGSM-3 accuracy (the paper's selection)
    model_last.pt    weights after the last epoch
    checkpoint.pt    everything needed to resume after the last finished epoch
"""
from __future__ import annotations

import csv
import dataclasses
import io
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from . import attacks
from .cost import PassCounter, Stopwatch, device_facts, peak_memory_mb, pick_device
from .data import BatchIterator, DataSpec, Split, dataset_info, list_datasets, load_split
from .io import torch_save, write_json, write_text, read_json
from .methods import METHODS, dataset_family, make_options, method_cost
from .models import MODELS, create_model
from .masking.probes import fgsm_rfgsm_logit_distance, gradient_alignment

RUN_SCHEMA = "gmr.run/1"


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
    epochs: int = 20
    batch_size: int = 32
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "step"              # step: lr / 5, 25, 125 at 1/4, 1/2, 3/4 (paper); onecycle; constant
    seed: int = 0                       # training randomness (init, shuffling, attack noise)
    method_options: dict[str, Any] = field(default_factory=dict)
    data_root: str = "data"
    val_size: int | None = None         # None: MNIST 50k/10k, CIFAR 40k/10k (paper)
    split_seed: int = 0                 # one train/val split shared by all seeds
    n_train: int | None = None          # None: the whole training split
    n_val: int | None = 1000            # validation examples probed each epoch
    probe_pgd_steps: int | None = None  # None: MNIST 40 x 0.01, CIFAR 10 x 2/255
    probe_pgd_step_size: float | None = None
    probe_batch_size: int = 500
    keep_epoch_checkpoints: bool = False
    device: str = "auto"
    threads: int | None = None

    def resolved_eps(self) -> float:
        return self.eps if self.eps is not None else dataset_info(self.dataset).default_eps

    def validate(self) -> None:
        """Raise ValueError with a one-line reason for any bad value, before any work starts."""
        for registry, value in ((None, self.dataset), (MODELS, self.model), (METHODS, self.method)):
            if registry is None:
                if value not in list_datasets():
                    raise ValueError(f"unknown dataset {value!r}; valid datasets: {', '.join(list_datasets())}")
            else:
                registry.entry(value)
        eps = self.resolved_eps()
        if not 0.0 <= eps <= 1.0:
            raise ValueError(f"eps must be in [0, 1] (pixel units; 8/255 = {8 / 255:.4f}), got {eps}")
        for name in ("epochs", "batch_size", "probe_batch_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; valid schedules: {', '.join(SCHEDULES)}")
        if self.probe_pgd_steps is not None and self.probe_pgd_steps <= 0:
            raise ValueError(f"probe_pgd_steps must be positive, got {self.probe_pgd_steps}")
        if self.threads is not None and self.threads <= 0:
            raise ValueError(f"threads must be positive, got {self.threads}")
        self.data_spec().validate()
        make_options(self.method, self.dataset, self.method_options)
        pick_device(self.device)

    def data_spec(self) -> DataSpec:
        return DataSpec(self.dataset, Path(self.data_root), self.val_size, self.split_seed,
                        self.n_train, self.n_val)

    def probe_pgd(self) -> tuple[int, float]:
        fam = dataset_family(self.dataset)
        steps = self.probe_pgd_steps or (40 if fam == "mnist" else 10)
        size = self.probe_pgd_step_size or (0.01 if fam == "mnist" else 2 / 255)
        return steps, size

    def identity(self) -> dict[str, Any]:
        """The fields that define the result; the others (device, threads) may change on resume."""
        d = dataclasses.asdict(self)
        for key in ("device", "threads", "data_root", "probe_batch_size", "keep_epoch_checkpoints"):
            d.pop(key)
        return d


SCHEDULES = ("step", "onecycle", "constant")


def lr_factor(schedule: str, step: int, total: int) -> float:
    """Multiplier of the base lr at iteration `step` of `total`."""
    t = step / max(total, 1)
    if schedule == "constant":  # short studies: the step schedule's first decay comes too early
        return 1.0
    if schedule == "step":
        return 1.0 if t < 0.25 else 1 / 5 if t < 0.5 else 1 / 25 if t < 0.75 else 1 / 125
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
    alpha = 0.01 if dataset_family(cfg.dataset) == "mnist" else 2 / 255
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


def _write_log(path: Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    fields = list(rows[0].keys())
    for row in rows[1:]:
        fields += [k for k in row if k not in fields]
    writer = csv.DictWriter(buf, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    write_text(path, buf.getvalue())


def _weights(model, epoch: int, cfg: TrainConfig) -> dict:
    return {"state_dict": model.state_dict(), "epoch": epoch, "model": cfg.model, "dataset": cfg.dataset}


def load_weights(path: str | Path, map_location="cpu") -> dict:
    """Load a model_*.pt file safely (weights_only=True); raises ValueError when it is not one."""
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:
        raise ValueError(f"cannot load checkpoint {path}: {type(err).__name__}: {err}"[:300]) from None
    if not isinstance(obj, dict) or "state_dict" not in obj:
        raise ValueError(f"{path} is not a gmr model file (no state_dict); was it written by `gmr train`?")
    return obj


def train(cfg: TrainConfig, out: str | Path, progress: bool = True) -> dict:
    """Train (or resume) a run in `out` and return the content of run.json."""
    cfg.validate()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    run_json, ckpt_path = out / "run.json", out / "checkpoint.pt"
    if run_json.exists():
        done = read_json(run_json)
        if done.get("config_identity") != cfg.identity():
            raise RunConflict(f"{out} holds a finished run with another configuration; use a new --out "
                              "or delete the folder to start over")
        if done.get("status") == "complete":
            return done
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = pick_device(cfg.device)
    eps = cfg.resolved_eps()
    options = make_options(cfg.method, cfg.dataset, cfg.method_options)
    method = METHODS.get(cfg.method).fn
    info = dataset_info(cfg.dataset)

    x_tr, y_tr = (t.to(device) for t in load_split(cfg.data_spec(), Split.TRAIN))
    x_va, y_va = (t.to(device) for t in load_split(cfg.data_spec(), Split.VAL))

    torch.manual_seed(cfg.seed)
    model = create_model(cfg.model, cfg.dataset).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                weight_decay=cfg.weight_decay)
    batches = BatchIterator(x_tr, y_tr, cfg.batch_size, shuffle=True, augment=info.augment,
                            generator=torch.Generator().manual_seed(cfg.seed))
    total_steps = cfg.epochs * len(batches)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(cfg.schedule, step, total_steps))

    start_epoch, best_metric, best_epoch, log = 0, -math.inf, -1, []
    ledger = dict(forward=0.0, backward=0.0, train_seconds=0.0, probe_seconds=0.0, samples=0)
    if ckpt_path.exists():
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        if ckpt["config_identity"] != cfg.identity():
            raise RunConflict(f"{out} holds a run with another configuration; use a new --out "
                              "or delete the folder to start over")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        torch.set_rng_state(ckpt["rng_cpu"])
        if device.type == "cuda" and ckpt.get("rng_cuda") is not None:
            torch.cuda.set_rng_state(ckpt["rng_cuda"], device)
        batches.generator.set_state(ckpt["rng_data"])
        start_epoch, best_metric, best_epoch = ckpt["epoch"], ckpt["best_metric"], ckpt["best_epoch"]
        log, ledger = list(ckpt["log"]), dict(ckpt["ledger"])

    counter = PassCounter(model)
    watch_train, watch_probe = Stopwatch(device), Stopwatch(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        for epoch in range(start_epoch, cfg.epochs):
            model.train()
            counter.enabled = True
            loss_sum = torch.zeros((), device=device)
            correct = torch.zeros((), device=device)
            extra: dict[str, torch.Tensor] = {}
            seen = 0
            epoch_watch = Stopwatch(device)
            bar = tqdm(batches, desc=f"{cfg.method} epoch {epoch + 1}/{cfg.epochs}", leave=False,
                       disable=not progress, mininterval=1.0)
            with epoch_watch:
                for step, (xb, yb) in enumerate(bar):
                    result = method(model, xb, yb, eps, options)
                    optimizer.zero_grad(set_to_none=True)
                    result.loss.backward()
                    optimizer.step()
                    scheduler.step()
                    loss_sum += result.loss.detach() * len(yb)
                    correct += (result.logits.detach().argmax(1) == result.targets).sum()
                    for k, v in result.probes.items():
                        extra[k] = extra.get(k, 0.0) + v * len(yb)
                    seen += len(yb)
                    # checking every step would synchronise the GPU each step
                    if (device.type == "cpu" or step % 50 == 0) and not torch.isfinite(result.loss):
                        raise TrainingDiverged(
                            f"loss became {result.loss.item()} at epoch {epoch + 1}, step {step + 1} "
                            f"({cfg.method}, lr {scheduler.get_last_lr()[0]:.3g}); lower --lr or the "
                            "method's lambda. The last finished epoch is kept in checkpoint.pt")
            if not torch.isfinite(loss_sum):
                raise TrainingDiverged(f"loss became non-finite during epoch {epoch + 1} ({cfg.method}); "
                                       "lower --lr or the method's lambda")
            counter.enabled = False
            ledger["train_seconds"] += epoch_watch.seconds
            ledger["samples"] += seen
            ledger["forward"] += counter.count.forward
            ledger["backward"] += counter.count.backward
            counter.count.forward = counter.count.backward = 0.0

            with Stopwatch(device) as probe_watch:
                probes = validation_probes(model, x_va, y_va, cfg, epoch, device)
            ledger["probe_seconds"] += probe_watch.seconds
            row = {"epoch": epoch + 1, "train_loss": (loss_sum / seen).item(),
                   "train_acc": (correct / seen).item(),
                   **{f"train_{k}": (v / seen).item() for k, v in extra.items()},
                   **probes, "lr": scheduler.get_last_lr()[0],
                   "epoch_seconds": epoch_watch.seconds, "probe_seconds": probe_watch.seconds}
            log.append(row)
            if probes["val_ifgsm3"] > best_metric:
                best_metric, best_epoch = probes["val_ifgsm3"], epoch + 1
                torch_save(out / "model_best.pt", _weights(model, epoch + 1, cfg))
            torch_save(out / "model_last.pt", _weights(model, epoch + 1, cfg))
            if cfg.keep_epoch_checkpoints:
                torch_save(out / "epochs" / f"model_epoch{epoch + 1:03d}.pt", _weights(model, epoch + 1, cfg))
            _write_log(out / "train_log.csv", log)
            torch_save(ckpt_path, {
                "epoch": epoch + 1, "config_identity": cfg.identity(),
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "rng_cpu": torch.get_rng_state(),
                "rng_cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                "rng_data": batches.generator.get_state(),
                "best_metric": best_metric, "best_epoch": best_epoch, "log": log, "ledger": ledger,
            })
            if progress:
                print(f"[{cfg.method}] epoch {epoch + 1}/{cfg.epochs}: loss {row['train_loss']:.3f} "
                      f"val clean {probes['val_clean']:.3f} fgsm {probes['val_fgsm']:.3f} "
                      f"ifgsm3 {probes['val_ifgsm3']:.3f} pgd {probes['val_pgd']:.3f} "
                      f"({epoch_watch.seconds:.1f}s + probes {probe_watch.seconds:.1f}s)", flush=True)
    finally:
        counter.remove()

    n_train = len(x_tr)
    declared = method_cost(cfg.method, options, cfg.batch_size)
    counted = (ledger["forward"] + ledger["backward"]) / 2
    cost = {
        "forward_passes": ledger["forward"], "backward_passes": ledger["backward"],
        "passes": counted, "passes_per_sample": counted / max(ledger["samples"], 1),
        "declared_passes_per_sample": declared.passes,
        "train_seconds": ledger["train_seconds"], "probe_seconds": ledger["probe_seconds"],
        "seconds_per_epoch": ledger["train_seconds"] / cfg.epochs,
        "images_per_second": ledger["samples"] / max(ledger["train_seconds"], 1e-9),
        "peak_memory_mb": peak_memory_mb(device), **device_facts(device),
    }
    by_epoch = {row["epoch"]: row for row in log}
    result = {
        "schema": RUN_SCHEMA, "status": "complete",
        "config": dataclasses.asdict(cfg), "config_identity": cfg.identity(),
        "eps": eps, "method_options": dataclasses.asdict(options),
        "data": {"n_train": n_train, "n_val": len(x_va), "split_seed": cfg.split_seed,
                 "val_size": cfg.val_size or info.default_val_size},
        "selection": {"criterion": "val_ifgsm3", "best_epoch": best_epoch, "last_epoch": cfg.epochs},
        "metrics": {"best": by_epoch[best_epoch], "last": by_epoch[cfg.epochs]},
        "cost": cost,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    write_json(run_json, result)
    return result
