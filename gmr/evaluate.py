"""Evaluation of a trained run on the first n test points (RobustBench's protocol).

`evaluate(EvalConfig(...))` returns one record (the schema is `gmr/schemas/eval.schema.json`) and the
per-example correctness of every attack, so the worst case over attacks is exact:

- white-box attacks of `gmr.attacks` (clean, fgsm, rfgsm, ifgsm, pgd, pgd_cw, pgd_50_10) with the
  dataset's defaults and the caller's overrides, each seeded on its own;
- AutoAttack through `gmr.autoattack_adapter` (`autoattack` in the attack list);
- transfer attacks crafted on another run's model (`transfer_from`);
- an eps sweep of every attack asked for (`eps_list`).

Every accuracy in the record (attacks, transfer, eps sweep, worst case) carries its 95% Wilson interval
(`ci_low`, `ci_high`, from gmr.stats; the record says `confidence` and `interval_method`), so a reader
of one number knows how sure it is without the .npz.

`evaluate_to_file` is what `gmr evaluate` calls: it writes the record, its .npz and optionally a model
card, each once, or copies an evaluation of the same weights (`reuse_from`) without loading the model.
Every record names the `run_id` it measured (transfer entries also the source's `source_run_id`).

A RobustBench model (`zoo`: its name; `dataset`, `threat_model`, `model_dir`) is evaluated in place of a
run directory: `gmr.zoo.ZooModel` answers what a run directory answers, and the record says so in its
`zoo` object (run_id "zoo:<dataset>:<threat model>:<name>", checkpoint "published", no training seed).

The model stays in eval mode and fp32 throughout; clean accuracy is always measured (it bounds every
robust accuracy and enters the worst case).
"""
from __future__ import annotations

import dataclasses
import inspect
import json
import math
import platform
import sys
import time
import typing
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np
import torch

from . import attacks
from . import autoattack_adapter as aa
from .cost import check_threads, device_facts, pick_device
from .data import DataSpec, Split, dataset_info, load_split
from .io import atomic_path, check_folder_path, check_writable_file, ensure_writable_file, read_json, write_json
from .options import NonNegativeFloat, PositiveFloat, PositiveInt, Seed, check, convert_values, field_types
from .runs import RunDir
from .stats import CONFIDENCE, INTERVAL_METHOD, accuracy_interval

EVAL_SCHEMA = "gmr.eval/1"
# Every accuracy of a record carries its interval (ci_low, ci_high) at this level and by this method.
NON_ATTACKS = ("clean",)
AUTOATTACK = "autoattack"
TRANSFER_ATTACKS = ("fgsm", "rfgsm", "pgd")
RESTART_ATTACKS = ("pgd", "pgd_cw")  # --restarts applies to these; pgd_50_10 keeps its 10
# a run's model_best.pt, model_last.pt, model_ema.pt, model_ema_last.pt (weight average); a zoo model's weights
Checkpoint = Literal["best", "last", "ema", "ema_last", "published"]
_SIGNATURE_SKIP = {"model", "x", "y", "eps", "generator", "bn"}  # bn: training attacks only (eval here)
# What a parameter of that name may hold, whichever attack takes it (the attack's signature gives the
# names, defaults and the plain types; these add the value checks).
_PARAM_TYPES = {"steps": PositiveInt, "restarts": PositiveInt, "step_size": PositiveFloat,
                "alpha": NonNegativeFloat, "loss": Literal["ce", "cw"], "kappa": NonNegativeFloat}


def list_attacks() -> list[str]:
    return list(NON_ATTACKS) + attacks.ATTACKS.names() + [AUTOATTACK]


def whitebox_attacks() -> list[str]:
    return attacks.ATTACKS.names()


@lru_cache(maxsize=None)
def attack_params_type(name: str) -> type:
    """The parameters of attack `name` as a dataclass for `gmr.options`: names, defaults and types from
    the attack function's signature (besides model, x, y, eps and its generator), value checks from
    `_PARAM_TYPES`."""
    fn = attacks.ATTACKS.get(name).fn
    hints = typing.get_type_hints(fn, include_extras=True)
    fields = []
    for p in inspect.signature(fn).parameters.values():
        if p.name in _SIGNATURE_SKIP:
            continue
        tp = hints.get(p.name, Any)
        if p.name in _PARAM_TYPES:
            optional = type(None) in typing.get_args(tp)
            tp = typing.Optional[_PARAM_TYPES[p.name]] if optional else _PARAM_TYPES[p.name]
        default = {} if p.default is inspect.Parameter.empty else {"default": p.default}
        fields.append((p.name, tp, field(**default)))
    return dataclasses.make_dataclass(f"{name}_params", fields)


def attack_param_names(name: str) -> list[str]:
    """The parameters an attack takes besides model, x, y, eps and its random generator."""
    return list(field_types(attack_params_type(name)))


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
    run: str | None = None              # a run directory, or None with `zoo`
    attacks: list[str] = field(default_factory=lambda: ["clean", "fgsm", "pgd"])
    n_test: PositiveInt | None = 1000   # first n test points in order; None: the whole test set
    checkpoint: Checkpoint = "best"    # best (the paper's selection), last, ema or ema_last (weight average)
    eps: float | None = None            # None: the eps the run was trained with (Linf)
    eps_list: list[float] = field(default_factory=list)   # extra budgets for every attack asked for
    batch_size: PositiveInt = 500
    seed: Seed = 0                      # every attack is seeded with it on its own
    device: str = "auto"
    data_root: str | None = None        # None: the run's own data root
    attack_params: dict[str, dict[str, Any]] = field(default_factory=dict)  # {"pgd": {"steps": 200}}
    restarts: PositiveInt | None = None  # restarts of pgd and pgd_cw (overrides their default of 1)
    transfer_from: str | None = None    # source run whose model crafts the transfer examples
    transfer_checkpoint: Checkpoint = "best"
    transfer_attacks: list[str] = field(default_factory=lambda: list(TRANSFER_ATTACKS))
    aa_version: str = "standard"        # AutoAttack: standard (RobustBench), plus, custom
    aa_norm: str = "Linf"               # Linf or L2 (L2: --eps is the L2 radius; AutoAttack only)
    aa_attacks: list[str] | None = None  # custom version: the cascade
    state_prefix: str | None = None     # AutoAttack state files `<prefix>.aa-eps<eps>.state.json` (resume)
    threads: PositiveInt | None = None  # torch CPU threads, set before any torch work
    zoo: str | None = None              # a RobustBench model instead of a run (gmr.zoo)
    dataset: str | None = None          # with zoo: its dataset (a run knows its own)
    threat_model: str = "Linf"          # with zoo: the zoo's threat model
    model_dir: str | None = None        # with zoo: robustbench's checkpoint folder (None: ./models)

    # ----------------------------------------------------------------------------------------------
    def validate(self) -> dict:
        """Check everything before any work starts (the models are not loaded: `evaluate` loads each
        once); return the run's run.json. Raises ValueError."""
        check(self)
        self._check_subject()
        for what, path in (("--run", self.run), ("--transfer-from", self.transfer_from)):
            if path is not None and not path.strip():
                raise ValueError(f"{what} is empty; give a run directory")
        self._check_attacks()
        if self.eps is not None:
            self._check_eps(self.eps, "eps")
        for e in self.eps_list:
            self._check_eps(e, "every --eps-list value")
        self._check_autoattack()
        meta = self.subject().require(self.checkpoint, "--zoo" if self.zoo else "--run")
        dataset = meta["config"]["dataset"]
        if self.transfer_from is not None:
            source = RunDir(self.transfer_from).require(self.transfer_checkpoint, "--transfer-from")
            if source["config"]["dataset"] != dataset:
                raise ValueError(f"--transfer-from {self.transfer_from} was trained on "
                                 f"{source['config']['dataset']}, the target on {dataset}")
        n_total = dataset_info(dataset).test_size
        if self.n_test is not None and self.n_test > n_total:
            raise ValueError(f"n_test {self.n_test} is larger than the {n_total} test points of {dataset}")
        if self.data_root is not None:
            check_folder_path(self.data_root, "--data-root")
        pick_device(self.device)
        check_threads(self.threads)
        return meta

    def _check_subject(self) -> None:
        """A run directory or a zoo model, not both; the zoo's options only with a zoo model."""
        if (self.run is None) == (self.zoo is None):
            raise ValueError("give either --run (a run directory) or --zoo (a RobustBench model), not "
                             + ("both" if self.run is not None else "neither"))
        if self.zoo is None:
            if self.dataset is not None or self.model_dir is not None:
                raise ValueError("--dataset and --model-dir go with --zoo; a run directory knows its dataset")
            if self.checkpoint == "published":
                raise ValueError("checkpoint published is a zoo model's; a run has best, last, ema and ema_last")
            return
        from .zoo import check_subject

        check_subject(self.zoo, self.dataset, self.threat_model, self.checkpoint)

    def subject(self):
        """What is evaluated: the run directory, or the zoo model in its place (gmr.zoo.ZooModel)."""
        if self.zoo is None:
            return RunDir(self.run)
        from .zoo import DEFAULT_MODEL_DIR, ZooModel

        return ZooModel(self.zoo, self.dataset, self.threat_model, self.model_dir or DEFAULT_MODEL_DIR)

    def _check_eps(self, eps: float, what: str) -> None:
        if self.aa_norm == "L2":
            if not eps >= 0 or not math.isfinite(eps):
                raise ValueError(f"{what} (an L2 radius) must be >= 0, got {eps}")
        elif not 0 <= eps <= 1:
            raise ValueError(f"{what} must be in [0, 1] (Linf, pixel units; 8/255 = {8 / 255:.4f}), got {eps}")

    def _check_attacks(self) -> None:
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
            convert_values(attack_params_type(name), params, kind="parameter", owner="attack", scope=name)
        for name in self.transfer_attacks:  # checked even without --transfer-from: a typo is a typo
            if name not in whitebox_attacks():
                raise ValueError(f"unknown transfer attack {name!r}; valid: {', '.join(whitebox_attacks())}")

    def _check_autoattack(self) -> None:
        if self.aa_norm == "L2":
            if any(a in whitebox_attacks() for a in self.attacks) or self.transfer_from:
                raise ValueError("L2 AutoAttack cannot share an evaluation with the Linf white-box or transfer "
                                 "attacks; evaluate them in separate calls")
            if self.eps is None:
                raise ValueError("--aa-norm L2 needs --eps (the L2 radius; the run's eps is a Linf budget)")
        if AUTOATTACK in self.attacks or self.aa_version != "standard" or self.aa_attacks or self.aa_norm != "Linf":
            self.autoattack_config(self.eps if self.eps is not None else 0.0, "cpu").validate()
        if AUTOATTACK in self.attacks:
            aa.check_installed()

    def asked(self) -> list[str]:
        """The attacks to run besides clean, each once, in the order given."""
        return [a for a in dict.fromkeys(self.attacks) if a not in NON_ATTACKS]

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


# --------------------------------------------------------------------------------------------------
# Attacking

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


def interval_fields(n_correct: int, n: int, prefix: str = "") -> dict[str, float]:
    """`ci_low`, `ci_high` (with `prefix`) of an accuracy of n_correct out of n points: the interval every
    accuracy of the record carries next to it (CONFIDENCE, INTERVAL_METHOD; gmr.stats)."""
    low, high = accuracy_interval(n_correct, n, CONFIDENCE, INTERVAL_METHOD)
    return {f"{prefix}ci_low": low, f"{prefix}ci_high": high}


def _entry(name: str, ok: np.ndarray, eps: float, params: dict, seed: int, seconds: float, key: str) -> dict:
    n = int(len(ok))
    return {"attack": name, "accuracy": float(ok.mean()) if n else 0.0, **interval_fields(int(ok.sum()), n),
            "n_correct": int(ok.sum()), "n_examples": n, "eps": float(eps), "params": dict(params),
            "seed": seed, "seconds": seconds, "images_per_second": n / seconds if seconds > 0 else None,
            "per_example": key}


def _eps_key(eps: float) -> str:
    return f"eps{eps:.6g}"


def _fraction(ok: np.ndarray) -> float:
    return float(ok.mean()) if len(ok) else 0.0


_SWEEP_KEYS = ("eps", "attack", "accuracy", "ci_low", "ci_high", "n_correct", "n_examples", "params", "seed", "seconds",
               "per_example", "per_attack", "flags", "version", "norm")


class _Evaluation:
    """One evaluation in progress: the model, the test points, and the per-example correctness of
    every entry measured so far (`correct`, keyed as the record's `per_example` keys)."""

    def __init__(self, cfg: EvalConfig, meta: dict, model, device, say: Callable[[str], None]):
        self.cfg, self.meta, self.model, self.device, self.say = cfg, meta, model, device, say
        self.dataset = meta["config"]["dataset"]
        self.eps = float(cfg.eps if cfg.eps is not None else meta["eps"])
        spec = DataSpec(self.dataset, Path(cfg.data_root or meta["config"]["data_root"]), n_test=cfg.n_test)
        self.x, self.y = load_split(spec, Split.TEST)
        self.correct: dict[str, np.ndarray] = {}

    def attack(self, name: str, eps: float, key: str) -> dict:
        """One attack at one budget: its record entry; its correctness goes to `correct[key]`."""
        cfg = self.cfg
        if name == AUTOATTACK:
            res = aa.run_autoattack(self.model, self.x, self.y, cfg.autoattack_config(eps, self.device),
                                    state_path=cfg.state_path(eps))
            self.correct[key] = res.robust
            return {**res.to_record(), "per_example": key}
        params = resolve_params(name, self.dataset, cfg.attack_params, cfg.restarts, eps)
        t = time.perf_counter()
        ok, _ = attack_correct(self.model, self.x, self.y, name, eps, params, cfg.seed, cfg.batch_size,
                               self.device)
        self.correct[key] = ok
        return _entry(name, ok, eps, params, cfg.seed, time.perf_counter() - t, key)

    def main_attacks(self) -> dict[str, dict]:
        """Clean accuracy, then every attack asked for at the main budget."""
        t0 = time.perf_counter()
        self.correct["clean"] = predict_correct(self.model, self.x, self.y, self.cfg.batch_size, self.device)
        results = {"clean": _entry("clean", self.correct["clean"], 0.0, {}, self.cfg.seed,
                                   time.perf_counter() - t0, "clean")}
        self.say(f"clean {results['clean']['accuracy']:.4f}")
        for name in self.cfg.asked():
            results[name] = self.attack(name, self.eps, name)
            self.say(f"{name} {results[name]['accuracy']:.4f} ({results[name]['seconds']:.1f}s)")
        return results

    def transfer(self, source, source_meta: dict) -> dict[str, dict]:
        """Examples crafted on the source model, scored on this model (and on the source)."""
        cfg, transfer = self.cfg, {}
        for name in dict.fromkeys(cfg.transfer_attacks):
            params = resolve_params(name, self.dataset, cfg.attack_params, cfg.restarts, self.eps)
            t = time.perf_counter()
            ok, ok_src = attack_correct(self.model, self.x, self.y, name, self.eps, params, cfg.seed,
                                        cfg.batch_size, self.device, source=source)
            key = f"transfer_{name}"
            self.correct[key] = ok
            entry = _entry(name, ok, self.eps, params, cfg.seed, time.perf_counter() - t, key)
            src = source_meta["config"]
            entry.update(source_run=str(cfg.transfer_from), source_run_id=source_meta["run_id"],
                         source_checkpoint=cfg.transfer_checkpoint, source_method=src["method"],
                         source_model=src["model"], source_train_seed=src["seed"],
                         source_accuracy=_fraction(ok_src))
            transfer[name] = entry
            self.say(f"transfer {name} from {cfg.transfer_from}: {entry['accuracy']:.4f}")
        return transfer

    def eps_sweep(self, results: dict[str, dict]) -> list[dict]:
        """Every attack asked for at every budget of `eps_list` (the main budget is not run again)."""
        sweep = []
        for e in dict.fromkeys(float(v) for v in self.cfg.eps_list):
            for name in self.cfg.asked():
                entry = dict(results[name]) if e == self.eps else self.attack(name, e, f"{_eps_key(e)}_{name}")
                sweep.append({k: entry[k] for k in _SWEEP_KEYS if k in entry})
                self.say(f"eps {e:g} {name} {entry['accuracy']:.4f}")
        return sweep

    def worst_case(self, transfer: dict) -> dict:
        """Exact per-example worst case over every entry, and over clean and our white-box attacks."""
        asked = self.cfg.asked()
        over = ["clean"] + asked + [f"transfer_{t}" for t in transfer]
        worst = np.logical_and.reduce([self.correct[k] for k in over])  # derivable from the npz: not stored
        wb_over = ["clean"] + [a for a in asked if a != AUTOATTACK]
        wb_worst = np.logical_and.reduce([self.correct[k] for k in wb_over])
        n = len(self.y)
        return {"accuracy": _fraction(worst), **interval_fields(int(worst.sum()), n),
                "n_correct": int(worst.sum()), "n_examples": n, "eps": self.eps, "over": over,
                "whitebox_accuracy": _fraction(wb_worst), **interval_fields(int(wb_worst.sum()), n, "whitebox_"),
                "whitebox_over": wb_over}

    def record(self, results: dict, transfer: dict, sweep: list, epoch: int | None, started: float) -> dict:
        cfg, run_cfg, n = self.cfg, self.meta["config"], len(self.y)
        zoo = {"zoo": self.meta["zoo"]} if "zoo" in self.meta else {}
        return {
            "schema": EVAL_SCHEMA, "run": str(cfg.run if cfg.zoo is None else self.meta["run_id"]),
            "run_id": self.meta["run_id"], **zoo,
            "checkpoint": cfg.checkpoint, "checkpoint_epoch": epoch,
            "method": run_cfg["method"], "dataset": self.dataset, "model": run_cfg["model"],
            "train_seed": run_cfg["seed"], "train_eps": self.meta["eps"], "seed": cfg.seed, "n_examples": n,
            "eps": self.eps, "norm": cfg.aa_norm, "batch_size": cfg.batch_size,
            "test_points": f"first {n} of the {self.dataset} test set, in order",
            "confidence": CONFIDENCE, "interval_method": INTERVAL_METHOD,
            "attacks": results, "worst_case": self.worst_case(transfer), "transfer": transfer,
            "eps_sweep": sweep, "versions": package_versions(), **device_facts(self.device),
            "platform": platform.platform(), "seconds": time.perf_counter() - started,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }


def evaluate(cfg: EvalConfig, progress: Callable[[str], None] | None = None
             ) -> tuple[dict, dict[str, np.ndarray]]:
    """Run the evaluation; returns the result record and the per-example correctness arrays.

    `progress`, if given, is called with one line of text as each attack finishes.
    """
    return _evaluate(cfg, cfg.validate(), progress or (lambda text: None))


def _evaluate(cfg: EvalConfig, meta: dict, say: Callable[[str], None]) -> tuple[dict, dict[str, np.ndarray]]:
    started = time.perf_counter()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    device = pick_device(cfg.device)
    model, _, epoch = cfg.subject().load_model(cfg.checkpoint, device, meta)
    source = None
    if cfg.transfer_from is not None:  # loaded before any attack: a damaged file stops the work early
        source, source_meta, _ = RunDir(cfg.transfer_from).load_model(cfg.transfer_checkpoint, device)
    ev = _Evaluation(cfg, meta, model, device, say)
    results = ev.main_attacks()
    transfer = ev.transfer(source, source_meta) if source is not None else {}
    sweep = ev.eps_sweep(results)
    return ev.record(results, transfer, sweep, epoch, started), ev.correct


# --------------------------------------------------------------------------------------------------
# Files: the record, its per-example arrays, the model card; reuse of an evaluation of the same weights

def check_outputs(cfg: EvalConfig, out: str | Path, card: str | Path | None = None,
                  reuse_from: str | Path | None = None) -> Path:
    """Raise ValueError when the result (or the card) cannot be written, creating nothing until every
    check has passed; then create their folders and return the result path.

    The result must be a .json file: its per-example arrays go to the .npz of the same stem, which an
    --out ending in .npz would be itself. `reuse_from` (when given) must be a file or not exist yet."""
    out = check_writable_file(out)
    if out.suffix.lower() != ".json":
        raise ValueError(f"--out must be a .json file (its per-example .npz is written beside it), got {out}")
    if card is not None:
        card = check_writable_file(card, "--card")
        if card.resolve() in (out.resolve(), out.with_suffix(".npz").resolve()):
            raise ValueError(f"--card {card} would overwrite the result {out} or its .npz; give another file")
        if AUTOATTACK not in cfg.attacks:
            raise ValueError("--card needs autoattack in --attacks (a RobustBench card reports AutoAttack accuracy)")
        if cfg.zoo is not None:
            raise ValueError("--card describes a run of ours; a RobustBench model has its card in the zoo")
    if reuse_from is not None and cfg.zoo is not None:
        raise ValueError("--reuse-from copies the evaluation of a run's other checkpoint; a RobustBench model has one")
    if reuse_from is not None and (not str(reuse_from).strip() or Path(reuse_from).is_dir()):
        raise ValueError(f"--reuse-from {str(reuse_from)!r} is not a file; give the evaluation JSON file to copy")
    for path, what in ((out, "--out"), (card, "--card")):
        if path is not None:
            ensure_writable_file(path, what)
    return out


def evaluate_to_file(cfg: EvalConfig, out: str | Path, card: str | Path | None = None,
                     reuse_from: str | Path | None = None, progress: Callable[[str], None] | None = None) -> dict:
    """Evaluate and write `out` (the record), its .npz and optionally the model card `card`, each once;
    remove the AutoAttack state files once done. Return the record. Holds the lock of `out` meanwhile
    (gmr/locks.py: LockHeld when another process writes it) and first removes the temporary files a
    killed writer of these outputs left.

    With `reuse_from`: when that file is an evaluation of the same run and settings for the other
    checkpoint and the run's best epoch is its last (the same weights), copy it instead of evaluating
    (the model is not loaded); otherwise, or when the file does not exist yet, evaluate.
    """
    from .io import remove_stale_temps
    from .locks import lock_file

    say = progress or (lambda text: None)
    meta = cfg.validate()
    out = check_outputs(cfg, out, card)
    with lock_file(out):  # one writer of `out`, its .npz and its AutoAttack state files (LockHeld: exit 2)
        states = [f for p in cfg.state_paths(float(cfg.eps if cfg.eps is not None else meta["eps"]))
                  for f in aa.state_files(p)]
        remove_stale_temps(out.parent, [out.name, out.with_suffix(".npz").name] + [f.name for f in states])
        reused = reusable_evaluation(cfg, meta, Path(reuse_from)) if reuse_from is not None else "not asked"
        if isinstance(reused, str):
            if reuse_from is not None:
                say(f"not reusing {reuse_from}: {reused}")
            reused = _evaluate(cfg, meta, say)
        record, correct = reused
        out.unlink(missing_ok=True)  # an old record must not stand beside a new .npz if a write fails
        _write_outputs(record, correct, out, card, meta)
        for state in cfg.state_paths(record["eps"]):  # finished: nothing left to resume
            aa.remove_state(state)
    return record


def _write_outputs(record: dict, correct: dict[str, np.ndarray], out: Path, card, meta: dict) -> None:
    npz = out.with_suffix(".npz")
    with atomic_path(npz) as tmp:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, **correct)
    record["per_example_file"] = npz.name
    if card is not None:
        from .report.cards import make_card

        record["card_file"] = str(card)
        write_json(card, make_card(record, meta))
    write_json(out, record)


def _settings(record: dict) -> dict:
    """What decides the numbers of an evaluation record, for comparison with another's."""
    keys = ("run_id", "n_examples", "eps", "norm", "seed", "batch_size")
    return json.loads(json.dumps({
        **{k: record.get(k) for k in keys},
        "attacks": {name: entry.get("params") for name, entry in record["attacks"].items()},
        "transfer": {name: [e.get("source_run_id"), e.get("source_checkpoint"), e.get("params")]
                     for name, e in record["transfer"].items()},
        "eps_sweep": [[s["eps"], s["attack"]] for s in record["eps_sweep"]]}))


def _expected_settings(cfg: EvalConfig, meta: dict) -> dict:
    """`_settings` of the record `cfg` would produce on the run `meta`, without running anything."""
    dataset = meta["config"]["dataset"]
    eps = float(cfg.eps if cfg.eps is not None else meta["eps"])
    params = {"clean": {}}
    for name in cfg.asked():
        params[name] = (cfg.autoattack_config(eps, "cpu").record_params() if name == AUTOATTACK
                        else resolve_params(name, dataset, cfg.attack_params, cfg.restarts, eps))
    transfer = {}
    if cfg.transfer_from is not None:
        source_id = RunDir(cfg.transfer_from).record("--transfer-from")["run_id"]
        transfer = {name: {"source_run_id": source_id, "source_checkpoint": cfg.transfer_checkpoint,
                           "params": resolve_params(name, dataset, cfg.attack_params, cfg.restarts, eps)}
                    for name in cfg.transfer_attacks}
    return _settings({
        "run_id": meta["run_id"], "n_examples": cfg.n_test or dataset_info(dataset).test_size, "eps": eps,
        "norm": cfg.aa_norm, "seed": cfg.seed, "batch_size": cfg.batch_size,
        "attacks": {name: {"params": p} for name, p in params.items()}, "transfer": transfer,
        "eps_sweep": [{"eps": e, "attack": name} for e in dict.fromkeys(float(v) for v in cfg.eps_list)
                      for name in cfg.asked()]})


def reusable_evaluation(cfg: EvalConfig, meta: dict, path: Path) -> tuple[dict, dict[str, np.ndarray]] | str:
    """(record for `cfg.checkpoint`, per-example arrays) copied from the evaluation in `path` when it
    measured the same weights with the same settings; otherwise the reason why not."""
    from .schemas import validate

    if not path.is_file():
        return "no such file yet"
    try:
        record = read_json(path)
        validate(record, "eval")
    except Exception as err:  # unreadable JSON or a schema violation: evaluate instead
        return f"not an evaluation record ({str(err).splitlines()[0][:120]})"
    run = RunDir(cfg.run)
    if record["run_id"] != meta["run_id"] or record["checkpoint"] == cfg.checkpoint:
        return f"it evaluates {record['run_id']} ({record['checkpoint']}), not the other checkpoint of this run"
    if not run.same_weights(meta):
        return f"best epoch {run.checkpoint_epoch('best', meta)} is not the last epoch"
    if _settings(record) != _expected_settings(cfg, meta):
        return "other attacks, points, budget, seed or attack parameters"
    npz = path.parent / record.get("per_example_file", path.with_suffix(".npz").name)
    if not npz.is_file():
        return f"its per-example file {npz.name} is missing"
    with np.load(npz) as data:
        correct = {k: data[k] for k in data.files}
    for key in ("per_example_file", "card_file"):
        record.pop(key, None)
    return {**record, "checkpoint": cfg.checkpoint, "reused_from": path.name}, correct
