"""The run directory: the one module that knows its files, reads and writes them, and checks them.

A run directory written by `gmr train` holds:

    run.json         the run record (gmr/schemas/run.schema.json): run_id, config, resolved method
                     options, data sizes, model selection, metrics of the selected and last model, cost
    train_log.csv    one row per finished epoch (validation probes, train loss/accuracy, lr, seconds)
    model_best.pt    weights with the best validation I-FGSM-3 accuracy (the paper's selection)
    model_last.pt    weights after the last epoch
    checkpoint.pt    resume state (weights, optimizer momentum, RNG); removed when the run finishes
                     unless the run keeps it (`keep_resume_state`)
    epochs/          model_epochNNN.pt per epoch, only with `keep_epoch_checkpoints`

Every evaluation and audit names the `run_id` of the run it measured, so tables link records to runs
by identity rather than by paths (which differ between machines) or by settings (which can coincide).
The catastrophic-overfitting detector lives here because it is a property of a run's training log.
"""
from __future__ import annotations

import math
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from .io import read_csv, read_json, torch_save, write_csv, write_json

RUN_SCHEMA = "gmr.run/1"
CHECKPOINTS = ("best", "last")
# The rule of the training-log detector (Wong et al. 2020); see catastrophic_overfitting_epoch.
CO_PGD_DROP = 0.2
CO_FGSM_SLACK = 0.1


class RunError(ValueError):
    """A run directory that is missing, unfinished or damaged; the message says which and how to fix."""


def new_run_id(method: str, dataset: str, seed: int) -> str:
    """A readable, unique id: what the run is, plus 8 random hex digits (two folders with the same
    settings are still two runs)."""
    return f"{method}-{dataset}-seed{seed}-{uuid.uuid4().hex[:8]}"


@dataclass(frozen=True)
class RunDir:
    """Paths of one run directory, and the checked ways to read it."""
    path: Path

    def __init__(self, path: str | Path):
        object.__setattr__(self, "path", Path(path))

    @property
    def record_file(self) -> Path:
        return self.path / "run.json"

    @property
    def log_file(self) -> Path:
        return self.path / "train_log.csv"

    @property
    def resume_file(self) -> Path:
        return self.path / "checkpoint.pt"

    def model_file(self, checkpoint: str) -> Path:
        return self.path / f"model_{checkpoint}.pt"

    def epoch_file(self, epoch: int) -> Path:
        return self.path / "epochs" / f"model_epoch{epoch:03d}.pt"

    # ----------------------------------------------------------------------------------------------
    def record(self, what: str = "--run") -> dict:
        """run.json of a finished run, checked against its schema; RunError otherwise."""
        if not self.path.is_dir():
            raise RunError(f"{what} {self.path}: no such run directory")
        if not self.record_file.is_file():
            raise RunError(f"{what} {self.path} is not a finished run directory (no run.json); "
                           f"train it with `gmr train --out {self.path}`")
        try:
            record = read_json(self.record_file)
            validate_record(record)
        except Exception as err:  # invalid JSON or a schema violation: one line either way
            raise RunError(f"{what} {self.record_file} is not a gmr run record: "
                           f"{str(err).splitlines()[0][:200]}") from None
        return record

    def require(self, checkpoint: str, what: str = "--run") -> dict:
        """The record of a finished run that has the model file of `checkpoint`, without loading it (a
        caller that will load the model anyway checks it once, when it loads it)."""
        if checkpoint not in CHECKPOINTS:
            raise RunError(f"checkpoint must be best or last, got {checkpoint!r}")
        record = self.record(what)
        if not self.model_file(checkpoint).is_file():
            raise RunError(f"{what} {self.path} has no model_{checkpoint}.pt; the run is incomplete")
        return record

    def check(self, checkpoint: str, what: str = "--run") -> dict:
        """The record of a finished run whose model file of `checkpoint` loads into its model."""
        record = self.require(checkpoint, what)
        self.load_model(checkpoint, torch.device("cpu"), record)  # a damaged file fails here
        return record

    def load_model(self, checkpoint: str, device, record: dict | None = None
                   ) -> tuple[nn.Module, dict, int | None]:
        """(model in eval mode and fp32 on `device`, run record, epoch of the weights)."""
        from .models import create_model

        record = record if record is not None else self.record()
        cfg = record["config"]
        weights = load_weights(self.model_file(checkpoint))
        model = create_model(cfg["model"], cfg["dataset"])
        try:
            model.load_state_dict(weights["state_dict"])
        except (RuntimeError, TypeError, AttributeError) as err:
            raise RunError(f"{self.model_file(checkpoint)} does not fit model {cfg['model']}: "
                           f"{str(err)[:200]}") from None
        return model.float().to(device).eval(), record, weights.get("epoch")

    def checkpoint_epoch(self, checkpoint: str, record: dict | None = None) -> int | None:
        sel = (record if record is not None else self.record()).get("selection", {})
        return sel.get("best_epoch" if checkpoint == "best" else "last_epoch")

    def same_weights(self, record: dict | None = None) -> bool:
        """True when the selected model is the last one (model_best.pt and model_last.pt are equal)."""
        sel = (record if record is not None else self.record()).get("selection", {})
        return sel.get("best_epoch") is not None and sel.get("best_epoch") == sel.get("last_epoch")

    def train_log(self) -> list[dict[str, float]]:
        return read_train_log(self.log_file)

    def co_epoch(self) -> int | None:
        """Epoch of catastrophic overfitting in the training log, or None."""
        return catastrophic_overfitting_epoch(self.train_log())

    def write_record(self, record: dict) -> None:
        validate_record(record)
        write_json(self.record_file, record)

    def save_weights(self, model: nn.Module, epoch: int, model_name: str, dataset: str, *names: str) -> None:
        weights = {"state_dict": model.state_dict(), "epoch": epoch, "model": model_name, "dataset": dataset}
        for name in names:
            torch_save(self.epoch_file(epoch) if name == "epoch" else self.model_file(name), weights)


def validate_record(record: Any) -> None:
    from .schemas import validate

    validate(record, "run")


def load_weights(path: str | Path, map_location="cpu") -> dict:
    """Load a model_*.pt file safely (weights_only=True); raises RunError when it is not one."""
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:
        raise RunError(f"cannot load checkpoint {path}: {type(err).__name__}: {err}"[:300]) from None
    if not isinstance(obj, dict) or "state_dict" not in obj:
        raise RunError(f"{path} is not a gmr model file (no state_dict); was it written by `gmr train`?")
    return obj


# --------------------------------------------------------------------------------------------------
# The training log

def read_train_log(path: str | Path) -> list[dict[str, float]]:
    """Rows of a train_log.csv as floats (empty list when the file does not exist)."""
    path = Path(path)
    if not path.is_file():
        return []
    return [{k: (float(v) if isinstance(v, float) else float("nan")) for k, v in row.items()}
            for row in read_csv(path)]


def write_train_log(path: str | Path, rows: Sequence[dict]) -> None:
    write_csv(path, rows)


def catastrophic_overfitting_epoch(rows: Sequence[dict], pgd_drop: float = CO_PGD_DROP,
                                   fgsm_slack: float = CO_FGSM_SLACK) -> int | None:
    """First epoch whose val PGD accuracy is below the best of the earlier epochs by more than
    min(`pgd_drop`, half that best) while val FGSM accuracy stays within `fgsm_slack` of its value at
    that best epoch; None when there is none.

    Wong et al. 2020 stop training when PGD accuracy falls by 0.2. A model whose PGD accuracy is below
    0.4 cannot lose 0.2 without losing most of it, so there losing half counts too (Kim et al. 2021
    describe catastrophic overfitting as PGD accuracy falling to 0 while FGSM accuracy rises). The FGSM
    condition separates it from a collapse of everything (e.g. divergence)."""
    best_pgd, best_fgsm = -math.inf, None
    for row in rows:
        pgd, fgsm = row.get("val_pgd"), row.get("val_fgsm")
        if pgd is None or fgsm is None or math.isnan(pgd):
            continue
        if (best_fgsm is not None and pgd < best_pgd - min(pgd_drop, best_pgd / 2)
                and fgsm >= best_fgsm - fgsm_slack):
            return int(row["epoch"])
        if pgd > best_pgd:
            best_pgd, best_fgsm = pgd, fgsm
    return None
