"""White-box evaluation of a trained run on the first n test points (RobustBench's protocol)."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import attacks
from .cost import device_facts, pick_device
from .data import DataSpec, Split, load_split
from .io import read_json
from .models import create_model
from .train import load_weights

EVAL_SCHEMA = "gmr.eval/1"
NON_ATTACKS = ("clean",)


def list_attacks() -> list[str]:
    return list(NON_ATTACKS) + attacks.ATTACKS.names()


@dataclass
class EvalConfig:
    run: str
    attacks: list[str] = field(default_factory=lambda: ["clean", "fgsm", "pgd"])
    n_test: int | None = 1000
    checkpoint: str = "best"            # best (the paper's selection) or last
    eps: float | None = None            # None: the eps the run was trained with
    batch_size: int = 500
    seed: int = 0
    device: str = "auto"
    data_root: str | None = None        # None: the run's own data root
    attack_params: dict[str, dict[str, Any]] = field(default_factory=dict)

    def validate(self) -> dict:
        """Check everything that can be checked before loading data; return the run's run.json."""
        valid = list_attacks()
        for name in self.attacks:
            if name not in valid:
                raise ValueError(f"unknown attack {name!r}; valid attacks: {', '.join(valid)}")
        if not self.attacks:
            raise ValueError("no attack given; pass --attacks, e.g. clean,fgsm,pgd")
        if self.checkpoint not in ("best", "last"):
            raise ValueError(f"checkpoint must be best or last, got {self.checkpoint!r}")
        if self.eps is not None and not 0 <= self.eps <= 1:
            raise ValueError(f"eps must be in [0, 1], got {self.eps}")
        if self.n_test is not None and self.n_test <= 0:
            raise ValueError(f"n_test must be positive, got {self.n_test}")
        if self.batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {self.batch_size}")
        run = Path(self.run)
        if not (run / "run.json").exists():
            raise ValueError(f"{run} is not a finished run directory (no run.json); train it with `gmr train --out {run}`")
        if not (run / f"model_{self.checkpoint}.pt").exists():
            raise ValueError(f"{run} has no model_{self.checkpoint}.pt; the run is incomplete")
        pick_device(self.device)
        return read_json(run / "run.json")


def load_run_model(run: str | Path, checkpoint: str, device) -> tuple[torch.nn.Module, dict]:
    """The model of a run directory (model_best.pt or model_last.pt) in eval mode, and its run.json."""
    meta = read_json(Path(run) / "run.json")
    cfg = meta["config"]
    weights = load_weights(Path(run) / f"model_{checkpoint}.pt")
    model = create_model(cfg["model"], cfg["dataset"])
    try:
        model.load_state_dict(weights["state_dict"])
    except RuntimeError as err:
        raise ValueError(f"{run}/model_{checkpoint}.pt does not fit model {cfg['model']}: {str(err)[:200]}") from None
    return model.to(device).eval(), meta


def evaluate(cfg: EvalConfig) -> tuple[dict, dict[str, np.ndarray]]:
    """Accuracy under each attack; returns the result record and per-example correctness arrays."""
    meta = cfg.validate()
    device = pick_device(cfg.device)
    model, meta = load_run_model(cfg.run, cfg.checkpoint, device)
    run_cfg = meta["config"]
    eps = cfg.eps if cfg.eps is not None else meta["eps"]
    spec = DataSpec(run_cfg["dataset"], Path(cfg.data_root or run_cfg["data_root"]), n_test=cfg.n_test)
    x, y = load_split(spec, Split.TEST)
    results, correct = {}, {}
    for name in cfg.attacks:
        params = {} if name in NON_ATTACKS else {**attacks.attack_defaults(name, run_cfg["dataset"]),
                                                  **cfg.attack_params.get(name, {})}
        gen = torch.Generator(device=device).manual_seed(cfg.seed)
        start = time.perf_counter()
        flags = []
        for lo in range(0, len(x), cfg.batch_size):
            xb, yb = x[lo:lo + cfg.batch_size].to(device), y[lo:lo + cfg.batch_size].to(device)
            if name != "clean":
                xb = attacks.run_attack(name, model, xb, yb, eps, generator=gen, **params)
            with torch.no_grad():
                flags.append((model(xb).argmax(1) == yb).cpu())
        ok = torch.cat(flags).numpy()
        correct[name] = ok
        results[name] = {"accuracy": float(ok.mean()), "n_examples": int(len(ok)), "eps": eps,
                         "params": params, "seconds": time.perf_counter() - start}
    worst = np.logical_and.reduce([correct[a] for a in cfg.attacks])
    record = {
        "schema": EVAL_SCHEMA, "run": str(cfg.run), "checkpoint": cfg.checkpoint,
        "method": run_cfg["method"], "dataset": run_cfg["dataset"], "model": run_cfg["model"],
        "seed": cfg.seed, "train_seed": run_cfg["seed"], "n_examples": int(len(y)), "eps": eps,
        "attacks": results, "worst_case": {"accuracy": float(worst.mean()), "over": list(cfg.attacks)},
        **device_facts(device),
    }
    return record, correct
