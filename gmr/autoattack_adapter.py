"""AutoAttack (Croce & Hein 2020) through `pyautoattack==0.2.0`: the only module that imports it.

`run_autoattack(model, x, y, AutoAttackConfig(...))` runs the standard protocol on the points given (the
caller passes the first n test points in order), with the model in eval mode, in fp32, autocast off and
the parameters frozen (no weight gradients are computed; input gradients are unchanged). It returns an
`AutoAttackResult` with the per-example robust flags, the robust accuracy after each attack of the
cascade and every flag AutoAttack's sanity checks raised.

What AutoAttack reports goes to the `auto-attack` logger only: the per-attack progress at DEBUG and the
masking flags (zero gradients, randomised or dynamic defence, probability outputs, Square beating the
white-box attacks, too many target classes) at WARNING. A `logging.Handler` captures both during the run;
the per-attack robust accuracies are counted exactly from the "k out of m successfully perturbed" lines,
not parsed back from rounded percentages.

Resume. pyautoattack writes its evaluation state (robust flags after every batch, the attacks already
run) to `state_path`, but version 0.2.0 cannot read it back (the attack set is saved as a string, so
every restore fails with "different set of attacks"; a restored run would also return an unbound
`y_adv`). This module therefore resumes on top of that file: the cascade continues with the attacks not
yet finished on the points still robust according to the state file, in a sub-run with its own state
file, whose flags are merged back. A progress file beside the state keeps the per-attack counts and flags
of the interrupted process. The three files are named by `state_files(state_path)`.

A state is resumed only for the same evaluation: the settings (eps, norm, version, attacks, seed, batch
size, number of points), the number of clean-correct points, and SHA-256 fingerprints of the weights
attacked and of the points. Anything else (a retrained model in the same folder, other points, a progress
file that cannot be read) starts afresh and says why in one line (a warning on the `gmr` logger, which
the command prints on stderr, and the first line of the result's `log`).
"""
from __future__ import annotations

import contextlib
import copy
import json
import logging
import re
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn

from .io import write_json
from .runs import weights_digest

LOGGER_NAME = "auto-attack"
VERSIONS = ("standard", "plus", "custom")
NORMS = ("Linf", "L2")
ATTACKS = ("apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t")
# The cascades the two fixed versions run (pyautoattack's AutoAttack._set_version).
VERSION_ATTACKS = {"standard": ("apgd-ce", "apgd-t", "fab-t", "square"),
                   "plus": ("apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t")}
INSTALL_HINT = "pip install --no-deps pyautoattack==0.2.0 (or pip install 'gmr-bench[autoattack]')"

_PERTURBED = re.compile(r"^(\S+) - \d+/\d+ - (\d+) out of (\d+) successfully perturbed$")
_FINISHED = re.compile(r"^robust accuracy after (\S+): ")
_SQUARE_FLAG = "Square Attack has decreased"

log = logging.getLogger("gmr")


def pyautoattack_version() -> str | None:
    try:
        return metadata.version("pyautoattack")
    except metadata.PackageNotFoundError:
        return None


def check_installed() -> None:
    """Raise ValueError with the install command when pyautoattack cannot be imported."""
    try:
        import pyautoattack  # noqa: F401
    except ImportError:
        raise ValueError(f"autoattack needs the pyautoattack package: {INSTALL_HINT}") from None


@dataclass
class AutoAttackConfig:
    eps: float                                # radius in [0, 1] pixel units (Linf) or L2 norm
    norm: str = "Linf"                        # Linf or L2
    version: str = "standard"                 # standard (RobustBench), plus, or custom
    attacks: tuple[str, ...] | None = None    # custom only: the cascade, in order
    apgd_restarts: int | None = None          # custom only: restarts of APGD-CE/DLR (pyautoattack: 5)
    seed: int = 0
    batch_size: int = 500
    device: str | torch.device = "cpu"

    def validate(self) -> None:
        if self.version not in VERSIONS:
            raise ValueError(f"unknown AutoAttack version {self.version!r}; valid versions: {', '.join(VERSIONS)}")
        if self.norm not in NORMS:
            raise ValueError(f"unknown AutoAttack norm {self.norm!r}; valid norms: {', '.join(NORMS)}")
        if not (self.eps >= 0 and np.isfinite(self.eps)) or (self.norm == "Linf" and self.eps > 1):
            bound = "[0, 1]" if self.norm == "Linf" else ">= 0"
            raise ValueError(f"AutoAttack {self.norm} eps must be {bound}, got {self.eps}")
        if self.version == "custom":
            if not self.attacks:
                raise ValueError(f"AutoAttack version custom needs attacks, e.g. apgd-ce,square; valid: {', '.join(ATTACKS)}")
            for name in self.attacks:
                if name not in ATTACKS:
                    raise ValueError(f"unknown AutoAttack attack {name!r}; valid attacks: {', '.join(ATTACKS)}")
            if len(set(self.attacks)) != len(self.attacks):
                raise ValueError(f"AutoAttack attacks repeat a name: {', '.join(self.attacks)}")
        elif self.attacks is not None or self.apgd_restarts is not None:
            raise ValueError(f"AutoAttack attacks and apgd_restarts apply to version custom only, not {self.version}")
        if self.apgd_restarts is not None and self.apgd_restarts < 1:
            raise ValueError(f"apgd_restarts must be >= 1, got {self.apgd_restarts}")
        if self.batch_size <= 0:
            raise ValueError(f"AutoAttack batch size must be positive, got {self.batch_size}")

    def cascade(self) -> tuple[str, ...]:
        return tuple(self.attacks) if self.version == "custom" else VERSION_ATTACKS[self.version]

    def record_params(self) -> dict[str, Any]:
        """The `params` of the record entry: what, besides eps and seed, decides the result."""
        return {"version": self.version, "norm": self.norm, "attacks": list(self.cascade()),
                "apgd_restarts": self.apgd_restarts, "batch_size": self.batch_size}

    def identity(self, n: int) -> dict[str, Any]:
        """What a state file must match to be resumed."""
        return {"eps": float(self.eps), "norm": self.norm, "version": self.version,
                "attacks": list(self.cascade()), "apgd_restarts": self.apgd_restarts,
                "seed": self.seed, "batch_size": self.batch_size, "n_examples": int(n)}


@dataclass
class AutoAttackResult:
    accuracy: float                      # robust accuracy after the whole cascade
    clean_accuracy: float
    n_examples: int
    robust: np.ndarray                   # bool per example: correct and not broken by any attack
    clean: np.ndarray                    # bool per example: correct on the clean input
    per_attack: dict[str, float]         # robust accuracy after each attack of the cascade, in order
    skipped: list[str]                   # attacks not run because no robust point was left
    flags: list[str]                     # WARNING messages of AutoAttack's checks, in order, unique
    log: list[str]                       # every message of the `auto-attack` logger
    seconds: float
    resumed: bool
    config: AutoAttackConfig
    x_adv: torch.Tensor | None = field(default=None, repr=False)

    def to_record(self) -> dict[str, Any]:
        """The JSON entry of the evaluation record (`record["attacks"]["autoattack"]`), with the interval
        every accuracy carries (gmr.stats defaults)."""
        from .stats import accuracy_interval

        c = self.config
        low, high = accuracy_interval(int(self.robust.sum()), self.n_examples)
        return {
            "attack": "autoattack", "accuracy": self.accuracy, "ci_low": low, "ci_high": high,
            "n_correct": int(self.robust.sum()),
            "n_examples": self.n_examples, "eps": float(c.eps), "norm": c.norm, "version": c.version,
            "attacks_run": list(c.cascade()), "per_attack": dict(self.per_attack),
            "skipped": list(self.skipped), "clean_accuracy": self.clean_accuracy,
            "flags": list(self.flags), "seed": c.seed, "seconds": self.seconds, "resumed": self.resumed,
            "params": c.record_params(),
            "package": f"pyautoattack {pyautoattack_version()}",
        }


def state_files(state_path: str | Path) -> tuple[Path, Path, Path]:
    """(pyautoattack's state, the sub-run's state, our progress file) of one resumable evaluation."""
    p = Path(state_path)
    return p, p.with_name(p.name + ".resume.json"), p.with_name(p.name + ".progress.json")


def remove_state(state_path: str | Path) -> None:
    for p in state_files(state_path):
        p.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------------

class _Capture(logging.Handler):
    """Collects the `auto-attack` logger's messages; counts broken points per attack exactly.

    `robust` is the running number of robust points; it starts at the number of clean-correct points of
    the (sub-)run and falls by k on each "k out of m successfully perturbed" line. When an attack ends,
    its robust count is stored and `on_progress` is called so the progress file survives a crash.
    """

    def __init__(self, robust: int, on_progress=None):
        super().__init__(logging.DEBUG)
        self.robust = robust
        self.after: dict[str, int] = {}
        self.flags: list[str] = []
        self.messages: list[str] = []
        self.on_progress = on_progress

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        self.messages.append(msg)
        if record.levelno >= logging.WARNING:
            self.flags.append(msg)
            if self.on_progress:
                self.on_progress(self)
            return
        hit = _PERTURBED.match(msg)
        if hit:
            self.robust -= int(hit.group(2))
            return
        hit = _FINISHED.match(msg)
        if hit:
            self.after[hit.group(1).lower()] = self.robust
            if self.on_progress:
                self.on_progress(self)


@contextlib.contextmanager
def _captured(handler: _Capture) -> Iterator[None]:
    logger = logging.getLogger(LOGGER_NAME)
    level = logger.level
    logger.setLevel(logging.DEBUG)
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


@contextlib.contextmanager
def _prepared(model: nn.Module, device: torch.device) -> Iterator[nn.Module]:
    """The model in eval mode and fp32 on `device`, parameters frozen, autocast off, global RNG kept."""
    if any(t.is_floating_point() and t.dtype != torch.float32
           for t in list(model.parameters()) + list(model.buffers())):
        model = copy.deepcopy(model).float()  # attacks in low precision fake robustness (DESIGN.md 4)
    model = model.to(device)
    modes = [(m, m.training) for m in model.modules()]
    grads = [(p, p.requires_grad) for p in model.parameters()]
    rng_devices = ([device.index if device.index is not None else torch.cuda.current_device()]
                   if device.type == "cuda" else [])
    # AutoAttack's Square and FAB reseed torch's global generator: keep the caller's stream intact
    with torch.random.fork_rng(devices=rng_devices), torch.autocast(device.type, enabled=False):
        model.eval()
        for p, _ in grads:
            p.requires_grad_(False)
        try:
            yield model
        finally:
            for m, flag in modes:
                m.training = flag
            for p, flag in grads:
                p.requires_grad_(flag)


@torch.no_grad()
def _clean_correct(model, x, y, batch_size, device) -> torch.Tensor:
    out = [model(x[i:i + batch_size].to(device)).argmax(1).cpu() == y[i:i + batch_size].cpu()
           for i in range(0, len(x), batch_size)]
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.bool)


def _adversary(model, cfg: AutoAttackConfig, device, attacks: list[str]):
    from pyautoattack import AutoAttack

    if cfg.version == "custom":
        adversary = AutoAttack(model, norm=cfg.norm, eps=cfg.eps, version="custom", seed=cfg.seed,
                               device=device, attacks=list(attacks))
        if cfg.apgd_restarts is not None:
            adversary.apgd.n_restarts = cfg.apgd_restarts
    else:
        adversary = AutoAttack(model, norm=cfg.norm, eps=cfg.eps, version=cfg.version, seed=cfg.seed,
                               device=device)
        adversary.attacks_to_run = list(attacks)  # a resumed run continues the cascade
    return adversary


def _read_state(path: Path) -> tuple[torch.Tensor | None, set[str]]:
    """Robust flags and finished attacks of a pyautoattack state file (its JSON, read directly: 0.2.0's
    `EvaluationState.from_disk` fails on a state saved before the clean pass)."""
    try:
        d = json.loads(path.read_text())
        flags = d.get("_robust_flags")
        return (None if flags is None else torch.tensor(flags, dtype=torch.bool)), set(d.get("_run_attacks") or [])
    except (OSError, ValueError, TypeError):
        return None, set()


def _write_state(path: Path, attacks: list[str], flags: torch.Tensor, run: set[str], clean_acc: float) -> None:
    from pyautoattack.state import EvaluationState

    state = EvaluationState(set(attacks), path=path)
    state._run_attacks = set(run)
    state._clean_accuracy = clean_acc
    state.robust_flags = flags.cpu().bool()  # the setter writes the file (forced)


def run_autoattack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: AutoAttackConfig,
                   state_path: str | Path | None = None, keep_adv: bool = False) -> AutoAttackResult:
    """Run AutoAttack on (x, y) in the order given; resume from `state_path` when it holds a state."""
    cfg.validate()
    check_installed()
    device = torch.device(cfg.device)
    x, y = x.detach().float().cpu(), y.detach().long().cpu()
    n = len(x)
    cascade = list(cfg.cascade())
    start = time.perf_counter()
    with _prepared(model, device) as model:
        clean = _clean_correct(model, x, y, cfg.batch_size, device)
        if state_path is None:
            robust, progress, x_adv, messages, resumed = _fresh(model, x, y, cfg, device, None, clean, cascade, None)
        else:
            robust, progress, x_adv, messages, resumed = _resumable(model, x, y, cfg, device, Path(state_path),
                                                                    clean, cascade)
    seconds = time.perf_counter() - start

    after = progress["after"]
    per_attack, skipped = {}, []
    for name in cascade:
        if name in after:
            per_attack[name] = after[name] / n
        else:  # AutoAttack stops the cascade when no robust point is left
            per_attack[name] = 0.0
            skipped.append(name)
    flags = list(dict.fromkeys(progress["flags"]))
    robust_np = robust.numpy().astype(bool)
    counted = after[cascade[-1]] if cascade[-1] in after else 0
    if int(robust_np.sum()) != counted:  # AutoAttack's own clean pass disagreed with ours
        flags.append(f"gmr: the per-attack counts end at {counted} robust points but the final flags hold "
                     f"{int(robust_np.sum())}; is the model deterministic?")
    return AutoAttackResult(
        accuracy=float(robust_np.mean()) if n else 0.0, clean_accuracy=float(clean.float().mean()) if n else 0.0,
        n_examples=n, robust=robust_np, clean=clean.numpy().astype(bool), per_attack=per_attack,
        skipped=skipped, flags=flags, log=messages, seconds=seconds, resumed=resumed, config=cfg,
        x_adv=x_adv if keep_adv else None)


def _fresh(model, x, y, cfg, device, state_path, clean, attacks, on_progress):
    """One pyautoattack call on (x, y); returns flags, progress dict, x_adv, messages."""
    handler = _Capture(int(clean.sum()), on_progress)
    adversary = _adversary(model, cfg, device, attacks)
    with _captured(handler):
        x_adv, y_adv = adversary.run_standard_evaluation(x, y, batch_size=cfg.batch_size, state_path=state_path)
    robust = (y_adv.cpu() == y) & clean
    return robust, {"after": dict(handler.after), "flags": list(handler.flags)}, x_adv.cpu(), handler.messages, False


def _check_progress(saved: Any) -> None:
    """Raise ValueError when a progress file does not have the shape this module writes."""
    if not isinstance(saved, dict) or not isinstance(saved.get("identity"), dict):
        raise ValueError("no identity mapping")
    after, flags = saved.get("after"), saved.get("flags")
    if not isinstance(after, dict) or not all(isinstance(v, int) and v >= 0 for v in after.values()):
        raise ValueError("'after' is not a mapping of attack: robust count")
    if not isinstance(flags, list) or not all(isinstance(f, str) for f in flags):
        raise ValueError("'flags' is not a list of texts")
    if not isinstance(saved.get("clean"), int):
        raise ValueError("'clean' is not a count")


def _saved_progress(main: Path, progress_path: Path, progress: dict, n: int) -> tuple[dict | None, str | None]:
    """(the progress of an interrupted evaluation of the same configuration, weights and points, None),
    or (None, why it is not resumed); why is None when there is nothing to resume."""
    if not (main.exists() and progress_path.exists()):
        return None, None
    try:
        saved = json.loads(progress_path.read_text())
        _check_progress(saved)
    except (OSError, ValueError) as err:
        return None, f"{progress_path} is not a progress file of gmr ({str(err)[:120]})"
    ident = saved["identity"]
    if ident.get("weights_sha256") != progress["identity"]["weights_sha256"]:
        return None, (f"{main} belongs to other model weights" if "weights_sha256" in ident else
                      f"{main} names no fingerprint of the weights it attacked")
    if ident != progress["identity"] or saved["clean"] != progress["clean"]:
        return None, f"{main} belongs to another evaluation (eps, version, attacks, seed, points or batch size)"
    flags, _ = _read_state(main)
    if flags is None or len(flags) != n:
        return None, f"{main} is not a readable AutoAttack state of {n} points"
    return saved, None


def _identity(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: AutoAttackConfig) -> dict[str, Any]:
    """What a state must match to be resumed: the settings, and fingerprints of the weights and points."""
    return {**cfg.identity(len(x)), "weights_sha256": weights_digest(model.state_dict()),
            "data_sha256": weights_digest({"x": x, "y": y})}


def _fold_sub_run(main: Path, sub: Path, cascade, clean) -> torch.Tensor:
    """Robust flags of the main state with a finished or interrupted sub-run folded in."""
    flags, run = _read_state(main)
    flags = flags.cpu().bool() & clean
    if sub.exists():
        sub_flags, sub_run = _read_state(sub)
        idx = flags.nonzero().squeeze(1)
        if sub_flags is not None and len(sub_flags) == len(idx):
            flags[idx] = sub_flags.cpu().bool()
            run |= sub_run
        _write_state(main, cascade, flags, run, float(clean.float().mean()))
        sub.unlink()
    return flags


def _resumable(model, x, y, cfg: AutoAttackConfig, device, state_path: Path, clean, cascade):
    main, sub, progress_path = state_files(state_path)
    progress = {"identity": _identity(model, x, y, cfg), "after": {}, "flags": [], "clean": int(clean.sum())}
    saved, why_not = _saved_progress(main, progress_path, progress, len(x))
    if saved is None:
        note = [f"gmr: not resuming AutoAttack: {why_not}; starting afresh"] if why_not else []
        for line in note:
            log.warning(line)
        remove_state(main)
        progress_path.parent.mkdir(parents=True, exist_ok=True)

        def save_fresh(h: _Capture) -> None:
            write_json(progress_path, {**progress, "after": h.after, "flags": h.flags})

        write_json(progress_path, progress)
        robust, done, x_adv, messages, _ = _fresh(model, x, y, cfg, device, main, clean, cascade, save_fresh)
        return robust, done, x_adv, note + messages, False

    # Resume: fold a finished or interrupted sub-run into the main state, then continue the cascade.
    progress.update(after=saved["after"], flags=saved["flags"])
    flags = _fold_sub_run(main, sub, cascade, clean)
    messages = [f"resuming from {main}: done {', '.join(progress['after']) or 'nothing'}; "
                f"{int(flags.sum())} robust points left"]
    x_adv = x.clone()
    remaining = [a for a in cascade if a not in progress["after"]]
    if remaining and flags.any():
        messages += _continue(model, x, y, cfg, device, (main, sub, progress_path), progress, flags, x_adv,
                              remaining, clean, cascade)
    n = len(x)
    accs = {"clean": float(clean.float().mean())}
    accs.update({a: progress["after"][a] / n for a in cascade if a in progress["after"]})
    square = _square_check(accs)
    if square:
        progress["flags"].append(square)
        messages.append(square)
    write_json(progress_path, progress)
    return flags, progress, x_adv, messages, True


def _continue(model, x, y, cfg, device, files, progress, flags, x_adv, remaining, clean, cascade) -> list[str]:
    """Run the `remaining` attacks on the points still robust (in a sub-run with its own state file) and
    merge the results into `progress`, `flags` and `x_adv` (in place); returns the sub-run's messages."""
    main, sub, progress_path = files
    idx = flags.nonzero().squeeze(1)
    # the sub-run's Square check sees only part of the cascade; it is redone on the merged numbers
    sub_progress = {"after": {}, "flags": []}

    def save_sub(h: _Capture) -> None:
        sub_progress.update(after=dict(h.after), flags=[f for f in h.flags if not f.startswith(_SQUARE_FLAG)])
        write_json(progress_path, {**progress, "after": {**progress["after"], **sub_progress["after"]},
                                   "flags": progress["flags"] + sub_progress["flags"]})

    sub_robust, _, sub_adv, sub_messages, _ = _fresh(model, x[idx], y[idx], cfg, device, sub,
                                                      flags[idx], remaining, save_sub)
    flags[idx] = sub_robust
    x_adv[idx] = sub_adv
    progress["after"].update(sub_progress["after"])
    progress["flags"] += sub_progress["flags"]
    _write_state(main, cascade, flags, set(cascade), float(clean.float().mean()))
    sub.unlink(missing_ok=True)
    return sub_messages


def _square_check(accs: dict[str, float]) -> str | None:
    """pyautoattack's Square check on merged per-attack accuracies; returns its message if it fires."""
    from pyautoattack import checks

    handler = _Capture(0)
    logger = logging.getLogger(LOGGER_NAME + ".resume")
    logger.propagate = False
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        checks.check_square_sr(accs, logger=logger)
    finally:
        logger.removeHandler(handler)
    return handler.flags[0] if handler.flags else None

