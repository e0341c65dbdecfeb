"""The run directory: the one module that knows its files, reads and writes them, and checks them.

A run directory written by `gmr train` holds:

    run.json         the run record (gmr/schemas/run.schema.json): run_id, config, resolved method
                     options, data sizes, model selection, metrics of the selected and last model, cost
    train_log.csv    one row per finished epoch (validation probes, train loss/accuracy, lr, seconds)
    model_best.pt    weights with the best validation I-FGSM-3 accuracy (the paper's selection)
    model_last.pt    weights after the last epoch
    checkpoint.pt    resume state (weights, optimizer momentum, RNG, the config identity and a SHA-256
                     of its weights); removed when the run finishes unless the run keeps it
                     (`keep_resume_state`)
    epochs/          model_epochNNN.pt per epoch, only with `keep_epoch_checkpoints`
    .gmr.lock        while `gmr train` writes the folder (gmr/locks.py)

Every file is checked where it is read, and a damaged one is refused with one line naming it and the fix
(RunError): run.json against its schema; the .pt files by their zip CRCs (torch.load does not check them,
so a zero-filled region would load as other weights), finite weights and, for checkpoint.pt, the hash of
its weights; train_log.csv by its columns and its rows against the record.

Every evaluation and audit names the `run_id` of the run it measured, so tables link records to runs
by identity rather than by paths (which differ between machines) or by settings (which can coincide).
The catastrophic-overfitting detector lives here because it is a property of a run's training log.
"""
from __future__ import annotations

import csv
import hashlib
import math
import uuid
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from .io import read_csv, read_json, torch_save, write_csv, write_json

RUN_SCHEMA = "gmr.run/1"
# best, last: the model at its selected and last epoch; ema, ema_last: the weight average (runs trained
# with ema_decay) at its own selected epoch and after the last one.
CHECKPOINTS = ("best", "last", "ema", "ema_last")
# The epoch each checkpoint holds, by its key in run.json's `selection`.
CHECKPOINT_EPOCH_KEYS = {"best": "best_epoch", "last": "last_epoch", "ema": "ema_best_epoch", "ema_last": "last_epoch"}
# The files a run directory holds (beside epochs/); `gmr train` removes their stale temporary files.
RUN_FILES = ("run.json", "train_log.csv", "model_best.pt", "model_last.pt", "model_ema.pt", "model_ema_last.pt",
             "checkpoint.pt")
# What checkpoint.pt must hold to be resumed, and the columns every training log has.
RESUME_KEYS = ("epoch", "config_identity", "model", "optimizer", "scheduler", "rng_cpu", "rng_data",
               "best_metric", "best_epoch", "log", "ledger")
LOG_COLUMNS = ("epoch", "val_clean", "val_fgsm", "val_ifgsm3", "val_pgd")
# Our training-log detector (a variant of Wong et al. 2020's rule); see catastrophic_overfitting_epoch.
CO_PGD_DROP = 0.2
CO_FGSM_SLACK = 0.1
CO_RULE = "ours"   # the rule tables and figures use; CO_RULES lists them all
# A final training accuracy at most this many times chance (1 / classes) counts as "at chance": such a
# model learned nothing, and its robust accuracy says nothing about the method (see run_warnings).
CHANCE_FACTOR = 1.5


class RunError(ValueError):
    """A run directory that is missing, unfinished or damaged; the message says which and how to fix.
    `reason` is the short cause when a file is damaged (for messages that name the fix themselves)."""
    reason: str | None = None

    @classmethod
    def damaged(cls, message: str, reason: str) -> "RunError":
        err = cls(message)
        err.reason = reason
        return err


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
            raise RunError(f"checkpoint must be one of {', '.join(CHECKPOINTS)}, got {checkpoint!r}")
        record = self.record(what)
        if not self.model_file(checkpoint).is_file():
            if checkpoint.startswith("ema") and record.get("config", {}).get("ema_decay") is None:
                raise RunError(f"{what} {self.path} was trained without a weight average (ema_decay); "
                               "use checkpoint best or last")
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
        return sel.get(CHECKPOINT_EPOCH_KEYS.get(checkpoint, "last_epoch"))

    def same_weights(self, record: dict | None = None) -> bool:
        """True when the selected model is the last one (model_best.pt and model_last.pt are equal)."""
        sel = (record if record is not None else self.record()).get("selection", {})
        return sel.get("best_epoch") is not None and sel.get("best_epoch") == sel.get("last_epoch")

    def train_log(self, record: dict | None = None) -> list[dict[str, float]]:
        """The training log of a finished run, checked: its columns, and one row per epoch up to the
        record's last epoch (a truncated or empty log must not read as "no catastrophic overfitting")."""
        record = record if record is not None else self.record()
        last = record.get("selection", {}).get("last_epoch")
        fix = f"train the run again (delete {self.path} and run `gmr train`)"
        if not self.log_file.is_file():
            raise RunError(f"{self.log_file} is missing; {fix}")
        try:
            rows = read_train_log(self.log_file)
        except (OSError, UnicodeDecodeError, csv.Error) as err:
            raise RunError(f"{self.log_file} is not readable ({err}); {fix}") from None
        missing = [c for c in LOG_COLUMNS if not rows or c not in rows[0]]
        if missing:
            what = "has no rows" if not rows else f"lacks the columns {', '.join(missing)}"
            raise RunError(f"{self.log_file} {what}; {fix}")
        epochs = [row["epoch"] for row in rows]
        if epochs != list(range(1, len(rows) + 1)) or (last is not None and len(rows) != last):
            raise RunError(f"{self.log_file} holds epochs {_span(epochs)}, not 1 to {last} as the run's "
                           f"run.json says; {fix}")
        return rows

    def co_epoch(self, record: dict | None = None) -> int | None:
        """Epoch of catastrophic overfitting in the (checked) training log, or None."""
        return catastrophic_overfitting_epoch(self.train_log(record))

    def load_resume_state(self) -> dict:
        """checkpoint.pt, checked: zip CRCs, the keys a resume needs, the hash of its weights and finite
        weights. A damaged one raises RunError: resuming other weights than the saved ones would finish
        a run that was never trained that way."""
        path = self.resume_file

        def damaged(why: str) -> RunError:
            return RunError(f"damaged resume state {path} ({why}); delete it to start the run over")

        try:
            ckpt = _read_torch_file(path)
        except Exception as err:  # empty, truncated, garbage bytes, CRC mismatch: one line each way
            raise damaged(_first_line(err)) from None
        if not isinstance(ckpt, dict) or any(k not in ckpt for k in RESUME_KEYS):
            raise damaged("not a gmr resume state")
        if not isinstance(ckpt["model"], dict) or not _finite(ckpt["model"]):
            raise damaged("non-finite weights")
        digest = ckpt.get("weights_sha256")  # absent in resume states written before it was added
        if digest is not None and digest != weights_digest(ckpt["model"]):
            raise damaged("its weights do not match their SHA-256")
        return ckpt

    def write_record(self, record: dict) -> None:
        """Write run.json, with its `warnings` (run_warnings) added to `record`, after checking it."""
        record["warnings"] = run_warnings(record)
        validate_record(record)
        write_json(self.record_file, record)

    def save_weights(self, model: nn.Module, epoch: int, model_name: str, dataset: str, *names: str) -> None:
        weights = {"state_dict": model.state_dict(), "epoch": epoch, "model": model_name, "dataset": dataset}
        for name in names:
            torch_save(self.epoch_file(epoch) if name == "epoch" else self.model_file(name), weights)


def run_warnings(record: dict) -> list[str]:
    """What a reader of a finished run must know that its numbers do not say: today, a final training
    accuracy at chance (at most CHANCE_FACTOR / number of classes), e.g. a run whose loss blew up to
    large but finite values. Such a model's robust accuracy measures nothing, yet the run is complete.
    Computed from the record, so the tables warn about runs written before run.json had `warnings`."""
    from .data import dataset_info
    from .registry import UnknownNameError

    last = record.get("metrics", {}).get("last", {})
    acc = last.get("train_acc")
    try:
        classes = dataset_info(record["config"]["dataset"]).num_classes
    except (KeyError, UnknownNameError):
        return []
    if not isinstance(acc, (int, float)) or acc > CHANCE_FACTOR / classes:
        return []
    loss = last.get("train_loss")
    loss_text = f", training loss {loss:.4g}" if isinstance(loss, (int, float)) else ""
    return [f"training accuracy at chance: {acc:.3f} in the last epoch ({last.get('epoch')}{loss_text}; chance "
            f"is {1 / classes:.3f} for {classes} classes): the model learned nothing and its robust accuracy "
            "says nothing; lower --lr or check the method's options"]


def validate_record(record: Any) -> None:
    from .schemas import validate

    validate(record, "run")


def load_weights(path: str | Path, map_location="cpu") -> dict:
    """Load a model_*.pt file safely (weights_only=True) after checking its zip CRCs; raises RunError
    when it is not one, is damaged or holds non-finite weights (which would evaluate as chance accuracy
    and audit as masking)."""
    try:
        obj = _read_torch_file(path, map_location)
    except Exception as err:
        reason = _first_line(err)
        raise RunError.damaged(f"cannot load checkpoint {path}: {reason}; the file is damaged or not a model "
                               "file: restore it, or train the run again", reason) from None
    if not isinstance(obj, dict) or not isinstance(obj.get("state_dict"), dict):
        raise RunError.damaged(f"{path} is not a gmr model file (no state_dict); was it written by `gmr train`?",
                               "not a gmr model file")
    if not _finite(obj["state_dict"]):
        raise RunError.damaged(f"{path} holds non-finite weights (NaN or inf): the run diverged or the file is "
                               "damaged; train the run again", "non-finite weights")
    return obj


def _read_torch_file(path: str | Path, map_location="cpu") -> Any:
    """torch.load(weights_only=True) of a file whose zip CRCs are checked first (torch checks none)."""
    with zipfile.ZipFile(path) as zf:
        bad = zf.testzip()
    if bad is not None:
        raise ValueError(f"CRC mismatch in {bad}: the file is damaged")
    return torch.load(path, map_location=map_location, weights_only=True)


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:200]}" if text else type(err).__name__


def _finite(state_dict: dict) -> bool:
    return all(torch.isfinite(t).all() for t in state_dict.values()
               if isinstance(t, torch.Tensor) and t.is_floating_point())


def weights_digest(state_dict: dict) -> str:
    """SHA-256 of the tensors of a state dict (dtypes, shapes and bytes, in order): the fingerprint of the
    weights a resumable state belongs to (checkpoint.pt, AutoAttack's state files). The names are left
    out: a model wrapped in another module still has the same weights."""
    h = hashlib.sha256()
    for t in state_dict.values():
        if isinstance(t, torch.Tensor):
            h.update(f"{t.dtype}:{tuple(t.shape)};".encode())
            h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _span(epochs: list) -> str:
    return f"{int(epochs[0])} to {int(epochs[-1])} ({len(epochs)} rows)" if epochs else "none"


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


def wong2020_co_epoch(rows: Sequence[dict], drop: float = CO_PGD_DROP) -> int | None:
    """Wong et al. 2020's early-stopping rule (locuslab/fast_adversarial CIFAR10/train_fgsm.py:93,
    130-139): the first epoch whose training-batch PGD-5 accuracy is below the previous epoch's by more
    than 0.2 (the previous value starts at 0). Reads the `train_batch_pgd5` column (see
    gmr.train.train_batch_pgd5); None for a log without it or without such a drop."""
    previous = 0.0
    for row in rows:
        value = row.get("train_batch_pgd5")
        if value is None or math.isnan(value):
            continue
        if value - previous < -drop:
            return int(row["epoch"])
        previous = value
    return None


def catastrophic_overfitting_epoch(rows: Sequence[dict], pgd_drop: float = CO_PGD_DROP,
                                   fgsm_slack: float = CO_FGSM_SLACK, rule: str | None = None) -> int | None:
    """First epoch whose val PGD accuracy is below the best of the earlier epochs by more than
    min(`pgd_drop`, half that best) while val FGSM accuracy stays within `fgsm_slack` of its value at
    that best epoch; None when there is none.

    Wong et al. 2020 stop training when PGD accuracy falls by 0.2. A model whose PGD accuracy is below
    0.4 cannot lose 0.2 without losing most of it, so there losing half counts too (Kim et al. 2021
    describe catastrophic overfitting as PGD accuracy falling to 0 while FGSM accuracy rises). The FGSM
    condition separates it from a collapse of everything (e.g. divergence). This is our rule ("ours");
    `rule="wong2020"` applies Wong et al.'s own (`wong2020_co_epoch`)."""
    if (rule or CO_RULE) != "ours":
        return CO_RULES[rule or CO_RULE](rows)
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


# Catastrophic-overfitting rules by name: "ours" (val PGD vs the best earlier epoch, with the FGSM
# condition) and "wong2020" (training-batch PGD-5 vs the previous epoch, as their code).
CO_RULES = {"ours": catastrophic_overfitting_epoch, "wong2020": wong2020_co_epoch}
