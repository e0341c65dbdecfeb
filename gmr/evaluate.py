"""Evaluation of a trained run on the first n test points (RobustBench's protocol).

`evaluate(EvalConfig(...))` returns one record (the schema is `gmr/schemas/eval.schema.json`) and the
per-example correctness of every attack, so the worst case over attacks is exact:

- white-box attacks of `gmr.attacks` (clean, fgsm, rfgsm, ifgsm, pgd, pgd_cw, pgd_50_10) with the
  dataset's defaults and the caller's overrides, each seeded on its own;
- AutoAttack through `gmr.autoattack_adapter` (`autoattack` in the attack list);
- transfer attacks crafted on another run's model (`transfer_from`);
- an eps sweep of every attack asked for (`eps_list`).

The model stays in eval mode and fp32 throughout; clean accuracy is always measured (it bounds every
robust accuracy and enters the worst case).
"""
from __future__ import annotations

import inspect
import math
import platform
import sys
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import attacks
from . import autoattack_adapter as aa
from .cost import device_facts, pick_device
from .data import DataSpec, Split, dataset_info, load_split
from .io import read_json
from .models import create_model
from .train import load_weights

EVAL_SCHEMA = "gmr.eval/1"
NON_ATTACKS = ("clean",)
AUTOATTACK = "autoattack"
TRANSFER_ATTACKS = ("fgsm", "rfgsm", "pgd")
RESTART_ATTACKS = ("pgd", "pgd_cw")  # --restarts applies to these; pgd_50_10 keeps its 10
_SIGNATURE_SKIP = {"model", "x", "y", "eps", "generator"}


def list_attacks() -> list[str]:
    return list(NON_ATTACKS) + attacks.ATTACKS.names() + [AUTOATTACK]


def whitebox_attacks() -> list[str]:
    return attacks.ATTACKS.names()


def attack_param_names(name: str) -> list[str]:
    """The parameters an attack takes besides model, x, y, eps and its random generator."""
    fn = attacks.ATTACKS.get(name).fn
    return [p for p in inspect.signature(fn).parameters if p not in _SIGNATURE_SKIP]


def _check_param(attack: str, key: str, value: Any) -> None:
    def fail(what: str):
        raise ValueError(f"attack parameter {attack}.{key} must be {what}, got {value!r}")

    if key in ("steps", "restarts"):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            fail("an integer >= 1")
    elif key in ("step_size", "alpha"):
        if value is None and key == "step_size" and attack == "ifgsm":
            return
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or value < 0 or (key == "step_size" and value == 0):
            fail("a positive number" if key == "step_size" else "a number >= 0")
    elif key == "loss":
        if value not in ("ce", "cw"):
            fail("ce or cw")
    elif key == "random_start":
        if not isinstance(value, bool):
            fail("true or false")


def resolve_params(name: str, dataset: str, overrides: dict[str, dict[str, Any]],
                   restarts: int | None = None, eps: float | None = None) -> dict[str, Any]:
    """Dataset defaults, then --restarts (PGD and PGD-CW), then --attack-param overrides.

    R-FGSM needs alpha <= eps: below its alpha (small budgets of an eps sweep) alpha becomes eps, which
    the entry's params record.
    """
    params = attacks.attack_defaults(name, dataset)
    if restarts is not None and name in RESTART_ATTACKS:
        params["restarts"] = restarts
    params.update(overrides.get(name, {}))
    if eps is not None and "alpha" in params and params["alpha"] > eps:
        params["alpha"] = eps
    return params


def package_versions() -> dict[str, str | None]:
    def version(name):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    from . import __version__

    return {"gmr": __version__, "torch": torch.__version__, "pyautoattack": aa.pyautoattack_version(),
            "numpy": np.__version__, "python": sys.version.split()[0], "torchvision": version("torchvision")}


# --------------------------------------------------------------------------------------------------

@dataclass
class EvalConfig:
    run: str
    attacks: list[str] = field(default_factory=lambda: ["clean", "fgsm", "pgd"])
    n_test: int | None = 1000           # first n test points in order; None: the whole test set
    checkpoint: str = "best"            # best (the paper's selection) or last
    eps: float | None = None            # None: the eps the run was trained with (Linf)
    eps_list: list[float] = field(default_factory=list)   # extra budgets for every attack asked for
    batch_size: int = 500
    seed: int = 0                       # every attack is seeded with it on its own
    device: str = "auto"
    data_root: str | None = None        # None: the run's own data root
    attack_params: dict[str, dict[str, Any]] = field(default_factory=dict)  # {"pgd": {"steps": 200}}
    restarts: int | None = None         # restarts of pgd and pgd_cw (overrides their default of 1)
    transfer_from: str | None = None    # source run whose model crafts the transfer examples
    transfer_checkpoint: str = "best"
    transfer_attacks: list[str] = field(default_factory=lambda: list(TRANSFER_ATTACKS))
    aa_version: str = "standard"        # AutoAttack: standard (RobustBench), plus, custom
    aa_norm: str = "Linf"               # Linf or L2 (L2: --eps is the L2 radius; AutoAttack only)
    aa_attacks: list[str] | None = None  # custom version: the cascade
    state_prefix: str | None = None     # AutoAttack state files `<prefix>.aa-eps<eps>.state.json` (resume)

    # ----------------------------------------------------------------------------------------------
    def _check_eps(self, eps: float, what: str) -> None:
        if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not math.isfinite(eps):
            raise ValueError(f"{what} must be a number, got {eps!r}")
        if self.aa_norm == "L2":
            if eps < 0:
                raise ValueError(f"{what} (an L2 radius) must be >= 0, got {eps}")
        elif not 0 <= eps <= 1:
            raise ValueError(f"{what} must be in [0, 1] (Linf, pixel units; 8/255 = {8 / 255:.4f}), got {eps}")

    def validate(self) -> dict:
        """Check everything before any work starts; return the run's run.json. Raises ValueError."""
        valid = list_attacks()
        if not self.attacks:
            raise ValueError("no attack given; pass --attacks, e.g. clean,fgsm,pgd")
        for name in self.attacks:
            if name not in valid:
                raise ValueError(f"unknown attack {name!r}; valid attacks: {', '.join(valid)}")
        for name, params in self.attack_params.items():
            if name == AUTOATTACK:
                raise ValueError("autoattack takes --aa-version, --aa-norm and --aa-attacks, not --attack-param")
            if name not in whitebox_attacks():
                raise ValueError(f"--attack-param for unknown attack {name!r}; attacks with parameters: "
                                 f"{', '.join(whitebox_attacks())}")
            names = attack_param_names(name)
            for key, value in params.items():
                if key not in names:
                    raise ValueError(f"unknown parameter {key!r} of attack {name}; valid: {', '.join(names) or 'none'}")
                _check_param(name, key, value)
        if self.restarts is not None and (isinstance(self.restarts, bool) or self.restarts < 1):
            raise ValueError(f"restarts must be >= 1, got {self.restarts}")
        for name, value in (("checkpoint", self.checkpoint), ("transfer checkpoint", self.transfer_checkpoint)):
            if value not in ("best", "last"):
                raise ValueError(f"{name} must be best or last, got {value!r}")
        if self.eps is not None:
            self._check_eps(self.eps, "eps")
        for e in self.eps_list:
            self._check_eps(e, "every --eps-list value")
        if self.n_test is not None and self.n_test <= 0:
            raise ValueError(f"n_test must be positive, got {self.n_test}")
        if self.batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {self.batch_size}")
        whitebox = [a for a in self.attacks if a in whitebox_attacks()]
        if self.aa_norm == "L2":
            if whitebox or self.transfer_from:
                raise ValueError("L2 AutoAttack cannot share an evaluation with the Linf white-box or transfer "
                                 "attacks; evaluate them in separate calls")
            if self.eps is None:
                raise ValueError("--aa-norm L2 needs --eps (the L2 radius; the run's eps is a Linf budget)")
        if AUTOATTACK in self.attacks or self.aa_version != "standard" or self.aa_attacks or self.aa_norm != "Linf":
            self.autoattack_config(self.eps if self.eps is not None else 0.0, "cpu").validate()
        if AUTOATTACK in self.attacks:
            aa.check_installed()
        meta = _check_run(self.run, self.checkpoint, "--run")
        if self.transfer_from is not None:
            for name in self.transfer_attacks:
                if name not in whitebox_attacks():
                    raise ValueError(f"unknown transfer attack {name!r}; valid: {', '.join(whitebox_attacks())}")
            source = _check_run(self.transfer_from, self.transfer_checkpoint, "--transfer-from")
            if source["config"]["dataset"] != meta["config"]["dataset"]:
                raise ValueError(f"--transfer-from {self.transfer_from} was trained on "
                                 f"{source['config']['dataset']}, the target on {meta['config']['dataset']}")
        n_total = _test_size(meta["config"]["dataset"])
        if self.n_test is not None and n_total is not None and self.n_test > n_total:
            raise ValueError(f"n_test {self.n_test} is larger than the {n_total} test points of "
                             f"{meta['config']['dataset']}")
        pick_device(self.device)
        if self.eps is None:
            self._check_eps(meta["eps"], "the run's eps")
        return meta

    def autoattack_config(self, eps: float, device) -> aa.AutoAttackConfig:
        return aa.AutoAttackConfig(
            eps=eps, norm=self.aa_norm, version=self.aa_version,
            attacks=tuple(self.aa_attacks) if self.aa_attacks else None, seed=self.seed,
            batch_size=self.batch_size, device=device)

    def state_path(self, eps: float) -> Path | None:
        if self.state_prefix is None:
            return None
        return Path(f"{self.state_prefix}.aa-eps{eps:.6g}.state.json")

    def state_paths(self, main_eps: float) -> list[Path]:
        """Every AutoAttack state path this evaluation may use (to remove them once it is done)."""
        epss = [main_eps] + list(self.eps_list)
        return [p for p in (self.state_path(e) for e in dict.fromkeys(epss)) if p is not None]


def _test_size(dataset: str) -> int | None:
    return {"mnist": 10000, "fashion_mnist": 10000, "cifar10": 10000, "cifar100": 10000,
            "svhn": 26032}.get(dataset)


def _check_run(run: str | Path, checkpoint: str, what: str) -> dict:
    """run.json of a finished run whose checkpoint loads into its model; ValueError otherwise."""
    run = Path(run)
    if not run.is_dir():
        raise ValueError(f"{what} {run}: no such run directory")
    if not (run / "run.json").exists():
        raise ValueError(f"{what} {run} is not a finished run directory (no run.json); "
                         f"train it with `gmr train --out {run}`")
    try:
        meta = read_json(run / "run.json")
        cfg = meta["config"]
        cfg["model"], cfg["dataset"], meta["eps"]
    except (ValueError, KeyError, TypeError):
        raise ValueError(f"{what} {run}/run.json is not a gmr run record") from None
    path = run / f"model_{checkpoint}.pt"
    if not path.exists():
        raise ValueError(f"{what} {run} has no model_{checkpoint}.pt; the run is incomplete")
    _load_model(run, checkpoint, meta, torch.device("cpu"))  # a corrupt checkpoint fails here
    return meta


def _load_model(run: Path, checkpoint: str, meta: dict, device) -> tuple[torch.nn.Module, int | None]:
    cfg = meta["config"]
    weights = load_weights(Path(run) / f"model_{checkpoint}.pt")
    model = create_model(cfg["model"], cfg["dataset"])
    try:
        model.load_state_dict(weights["state_dict"])
    except (RuntimeError, TypeError, AttributeError) as err:
        raise ValueError(f"{run}/model_{checkpoint}.pt does not fit model {cfg['model']}: {str(err)[:200]}") from None
    return model.float().to(device).eval(), weights.get("epoch")


def load_run_model(run: str | Path, checkpoint: str, device) -> tuple[torch.nn.Module, dict]:
    """The model of a run directory (model_best.pt or model_last.pt) in eval mode, and its run.json."""
    meta = read_json(Path(run) / "run.json")
    model, _ = _load_model(Path(run), checkpoint, meta, device)
    return model, meta


# --------------------------------------------------------------------------------------------------

def _batches(n: int, size: int):
    return (slice(lo, min(lo + size, n)) for lo in range(0, n, size))


@torch.no_grad()
def predict_correct(model, x: torch.Tensor, y: torch.Tensor, batch_size: int, device) -> np.ndarray:
    out = [(model(x[s].to(device)).argmax(1) == y[s].to(device)).cpu() for s in _batches(len(x), batch_size)]
    return torch.cat(out).numpy().astype(bool) if out else np.zeros(0, bool)


def attack_correct(model, x, y, name: str, eps: float, params: dict, seed: int, batch_size: int, device,
                   source=None) -> tuple[np.ndarray, np.ndarray | None]:
    """Per-example correctness of `model` on attack `name`'s examples (crafted on `source` if given).

    Returns (target correctness, source correctness or None). One generator seeded with `seed` runs
    through the batches in order, so a result is reproducible for a given seed and batch size.
    """
    crafter = source if source is not None else model
    gen = torch.Generator(device=device).manual_seed(seed)
    ok, ok_src = [], []
    for s in _batches(len(x), batch_size):
        xb, yb = x[s].to(device), y[s].to(device)
        xa = attacks.run_attack(name, crafter, xb, yb, eps, generator=gen, **params)
        with torch.no_grad():
            ok.append((model(xa).argmax(1) == yb).cpu())
            if source is not None:
                ok_src.append((source(xa).argmax(1) == yb).cpu())
    target = torch.cat(ok).numpy().astype(bool)
    return target, (torch.cat(ok_src).numpy().astype(bool) if source is not None else None)


def _entry(name: str, ok: np.ndarray, eps: float, params: dict, seed: int, seconds: float, key: str) -> dict:
    n = int(len(ok))
    return {"attack": name, "accuracy": float(ok.mean()) if n else 0.0, "n_correct": int(ok.sum()),
            "n_examples": n, "eps": float(eps), "params": dict(params), "seed": seed,
            "seconds": seconds, "images_per_second": n / seconds if seconds > 0 else None,
            "per_example": key}


def _eps_key(eps: float) -> str:
    return f"eps{eps:.6g}"


def evaluate(cfg: EvalConfig, progress=None) -> tuple[dict, dict[str, np.ndarray]]:
    """Run the evaluation; returns the result record and the per-example correctness arrays.

    `progress`, if given, is called with one line of text as each attack finishes.
    """
    say = progress or (lambda text: None)
    meta = cfg.validate()
    started = time.perf_counter()
    device = pick_device(cfg.device)
    run_cfg = meta["config"]
    dataset = run_cfg["dataset"]
    model, ckpt_epoch = _load_model(Path(cfg.run), cfg.checkpoint, meta, device)
    eps = float(cfg.eps if cfg.eps is not None else meta["eps"])
    spec = DataSpec(dataset, Path(cfg.data_root or run_cfg["data_root"]), n_test=cfg.n_test)
    x, y = load_split(spec, Split.TEST)
    n = len(y)

    correct: dict[str, np.ndarray] = {}
    results: dict[str, dict] = {}
    t0 = time.perf_counter()
    correct["clean"] = predict_correct(model, x, y, cfg.batch_size, device)
    results["clean"] = _entry("clean", correct["clean"], 0.0, {}, cfg.seed, time.perf_counter() - t0, "clean")
    say(f"clean {results['clean']['accuracy']:.4f}")

    def run_one(name: str, e: float, key: str) -> dict:
        if name == AUTOATTACK:
            res = aa.run_autoattack(model, x, y, cfg.autoattack_config(e, device), state_path=cfg.state_path(e))
            correct[key] = res.robust
            entry = res.to_record()
            entry["per_example"] = key
            return entry
        params = resolve_params(name, dataset, cfg.attack_params, cfg.restarts, e)
        t = time.perf_counter()
        ok, _ = attack_correct(model, x, y, name, e, params, cfg.seed, cfg.batch_size, device)
        correct[key] = ok
        return _entry(name, ok, e, params, cfg.seed, time.perf_counter() - t, key)

    asked = [a for a in dict.fromkeys(cfg.attacks) if a not in NON_ATTACKS]
    for name in asked:
        results[name] = run_one(name, eps, name)
        say(f"{name} {results[name]['accuracy']:.4f} ({results[name]['seconds']:.1f}s)")

    transfer: dict[str, dict] = {}
    if cfg.transfer_from is not None:
        source, source_meta = load_run_model(cfg.transfer_from, cfg.transfer_checkpoint, device)
        for name in dict.fromkeys(cfg.transfer_attacks):
            params = resolve_params(name, dataset, cfg.attack_params, cfg.restarts, eps)
            t = time.perf_counter()
            ok, ok_src = attack_correct(model, x, y, name, eps, params, cfg.seed, cfg.batch_size, device,
                                        source=source)
            key = f"transfer_{name}"
            correct[key] = ok
            entry = _entry(name, ok, eps, params, cfg.seed, time.perf_counter() - t, key)
            entry.update(source_run=str(cfg.transfer_from), source_checkpoint=cfg.transfer_checkpoint,
                         source_method=source_meta["config"]["method"], source_model=source_meta["config"]["model"],
                         source_train_seed=source_meta["config"]["seed"],
                         source_accuracy=float(ok_src.mean()) if n else 0.0)
            transfer[name] = entry
            say(f"transfer {name} from {cfg.transfer_from}: {entry['accuracy']:.4f}")

    sweep: list[dict] = []
    for e in dict.fromkeys(float(v) for v in cfg.eps_list):
        for name in asked:
            if e == eps:  # the main evaluation already measured it
                entry = dict(results[name])
            else:
                entry = run_one(name, e, f"{_eps_key(e)}_{name}")
            sweep.append({k: entry[k] for k in _SWEEP_KEYS if k in entry})
            say(f"eps {e:g} {name} {entry['accuracy']:.4f}")

    over = ["clean"] + asked + [f"transfer_{t}" for t in transfer]
    worst = np.logical_and.reduce([correct[k] for k in over])  # derivable from the npz: not stored
    wb_over = ["clean"] + [a for a in asked if a != AUTOATTACK]
    wb_worst = np.logical_and.reduce([correct[k] for k in wb_over])
    record = {
        "schema": EVAL_SCHEMA, "run": str(cfg.run), "checkpoint": cfg.checkpoint, "checkpoint_epoch": ckpt_epoch,
        "method": run_cfg["method"], "dataset": dataset, "model": run_cfg["model"],
        "train_seed": run_cfg["seed"], "train_eps": meta["eps"], "seed": cfg.seed, "n_examples": n,
        "eps": eps, "norm": cfg.aa_norm, "batch_size": cfg.batch_size,
        "test_points": f"first {n} of the {dataset} test set, in order",
        "attacks": results,
        "worst_case": {"accuracy": float(worst.mean()) if n else 0.0, "n_correct": int(worst.sum()),
                       "n_examples": n, "eps": eps, "over": over,
                       "whitebox_accuracy": float(wb_worst.mean()) if n else 0.0, "whitebox_over": wb_over},
        "transfer": transfer,
        "eps_sweep": sweep,
        "versions": package_versions(),
        **device_facts(device),
        "platform": platform.platform(),
        "seconds": time.perf_counter() - started,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    return record, correct


_SWEEP_KEYS = ("eps", "attack", "accuracy", "n_correct", "n_examples", "params", "seed", "seconds",
               "per_example", "per_attack", "flags", "version", "norm")
