"""RobustBench model-zoo models as subjects of our evaluation and audit: the only module that knows the
`robustbench` package (the `zoo` extra: `pip install 'gmr-bench[zoo]'`).

Importing robustbench 1.1.1. The PyPI release imports AutoAttack by its GitHub name `autoattack`, with
that code's keyword API, while it declares the PyPI repackaging `pyautoattack` (module `pyautoattack`,
keyword-only API); and it imports `pkg_resources`, which setuptools 81 removed. So, when this module is
imported and only when no module of that name can be imported otherwise (a user's real `autoattack` or
`pkg_resources` is never shadowed), it registers in `sys.modules`:

- `autoattack`: `AutoAttack`, a subclass of pyautoattack's translating the GitHub API (`attacks_to_run`
  -> `attacks`, `bs` -> `batch_size`, `log_path` accepted and ignored: pyautoattack logs to the
  `auto-attack` logger; `run_standard_evaluation` returns x_adv alone unless `return_labels`), and
  `autoattack.state.EvaluationState` (pyautoattack's);
- `pkg_resources`: `resource_filename`, the one function robustbench uses (its ImageNet loader).

`SHIMS` names the modules registered this way. Nothing is written to disk and nothing of ours is put on
`sys.path`.

Subjects. `ZooModel(name, dataset, threat_model, model_dir)` stands where a run directory stands in
`gmr evaluate` and `gmr diagnose` (it has the methods of `gmr.runs.RunDir` they call): its record is
run-like (`run_id` "zoo:<dataset>:<threat model>:<name>", method = the zoo name, model = the
architecture, no training seed, checkpoint "published"), and it loads its weights with
`robustbench.utils.load_model`, which downloads a missing checkpoint to
`<model_dir>/<dataset>/<threat model>/<name>.pt` (ensembles: `<name>.pt_m<i>.pt`) and uses one already
there. A missing checkpoint is fetched while the inputs are checked, before any data or attack work; a
failed download (no internet) is one line naming the file to put there.

`list_models` gives the zoo's entries with their architecture and the clean and AutoAttack accuracy the
leaderboard publishes (robustbench ships its leaderboard tables in its package metadata, not the
model_info JSON files of its repository). `robustbench_benchmark` runs `robustbench.eval.benchmark` on
the caller's points (its CIFAR download replaced by them) to cross-check our AutoAttack evaluation.
"""
from __future__ import annotations

import contextlib
import io
import difflib
import functools
import importlib
import importlib.machinery
import importlib.util
import re
import sys
import types
import warnings
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .runs import RunError

INSTALL_HINT = "pip install 'gmr-bench[zoo]' (robustbench==1.1.1)"
ZOO_CHECKPOINT = "published"   # the checkpoint of a zoo model in records (runs have best and last)
DATASETS = ("cifar10", "cifar100")   # robustbench's benchmark datasets that gmr.data also loads
THREAT_MODELS = ("Linf", "L2", "corruptions")
EVAL_THREAT_MODELS = ("Linf",)       # our white-box suite and masking audit attack Linf balls
DEFAULT_MODEL_DIR = "models"         # robustbench.utils.load_model's own default (./models)
SHIMS: list[str] = []                # modules this module registered in sys.modules


class ZooError(RunError):
    """A zoo model that is unknown, cannot be fetched or does not load: like a damaged run directory,
    bad input that the user fixes (exit code 2, one line)."""


# --------------------------------------------------------------------------------------------------
# Making robustbench 1.1.1 importable

def _importable(name: str) -> bool:
    """Whether `import name` would find a module without our help (already imported counts)."""
    if name in sys.modules:
        return True
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _register(name: str, doc: str, attrs: dict[str, Any], package: bool = False) -> types.ModuleType:
    module = types.ModuleType(name, doc)
    module.__dict__.update(attrs)
    module.__spec__ = importlib.machinery.ModuleSpec(name, loader=None, is_package=package)
    if package:
        module.__path__ = []
    sys.modules[name] = module
    SHIMS.append(name)
    return module


def _autoattack_class(base: type) -> type:
    """AutoAttack with the API of github.com/fra31/auto-attack over pyautoattack's `base`."""

    class AutoAttack(base):
        """fra31/auto-attack's AutoAttack signature; `log_path` is ignored (pyautoattack logs to the
        `auto-attack` logger) and a TensorFlow model is refused (pyautoattack attacks torch models)."""

        def __init__(self, model, norm="Linf", eps=0.3, seed=None, verbose=True, attacks_to_run=None,
                     version="standard", is_tf_model=False, device="cuda", log_path=None):
            if is_tf_model:
                raise ValueError("pyautoattack attacks PyTorch models only (is_tf_model=True)")
            super().__init__(model, norm=norm, eps=eps, seed=seed, version=version, device=device,
                             attacks=list(attacks_to_run) if attacks_to_run else None)
            self.verbose = verbose

        def run_standard_evaluation(self, x_orig, y_orig, bs=250, return_labels=False, state_path=None, *,
                                    batch_size=None):
            if batch_size is not None:  # pyautoattack's own callers (its individual evaluation)
                return super().run_standard_evaluation(x_orig, y_orig, batch_size=batch_size, state_path=state_path)
            state = Path(state_path) if state_path is not None else None
            x_adv, y_adv = super().run_standard_evaluation(x_orig, y_orig, batch_size=bs, state_path=state)
            return (x_adv, y_adv) if return_labels else x_adv

        def run_standard_evaluation_individual(self, x_orig, y_orig, bs=250, return_labels=False, *,
                                               batch_size=None):
            adv = super().run_standard_evaluation_individual(x_orig, y_orig, batch_size=batch_size or bs)
            return adv if return_labels else {k: x for k, (x, _) in adv.items()}

    return AutoAttack


def _resource_filename(package: str, resource: str) -> str:
    """pkg_resources.resource_filename: `resource` beside the module or inside the package `package`."""
    spec = importlib.util.find_spec(package)
    if spec is None or (spec.origin is None and not spec.submodule_search_locations):
        raise ImportError(f"no module named {package!r}")
    base = Path(spec.submodule_search_locations[0]) if spec.submodule_search_locations else Path(spec.origin).parent
    return str(base / resource)


def install_import_shims() -> list[str]:
    """Register the `autoattack` and `pkg_resources` modules robustbench 1.1.1 imports, each only when no
    module of that name is importable (module docstring); returns the names registered so far."""
    if not _importable("autoattack") and _importable("pyautoattack"):
        from pyautoattack import AutoAttack as Base
        from pyautoattack.state import EvaluationState

        state = _register("autoattack.state", "pyautoattack's EvaluationState under autoattack's name.",
                          {"EvaluationState": EvaluationState})
        _register("autoattack", "fra31/auto-attack's API over pyautoattack (registered by gmr.zoo).",
                  {"AutoAttack": _autoattack_class(Base), "state": state}, package=True)
    if not _importable("pkg_resources"):
        _register("pkg_resources", "The part of pkg_resources robustbench uses (registered by gmr.zoo).",
                  {"resource_filename": _resource_filename})
    return list(SHIMS)


install_import_shims()


def robustbench() -> types.ModuleType:
    """The robustbench package; ValueError with the install command when it is missing or broken."""
    try:
        with warnings.catch_warnings():  # its architectures use APIs torch deprecates: not the user's concern
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            import robustbench as rb
            import robustbench.eval  # noqa: F401  (benchmark, and the AutoAttack import the shim serves)
    except ImportError as err:
        raise ValueError(f"RobustBench models need the robustbench package ({err}): {INSTALL_HINT}") from None
    return rb


def robustbench_version() -> str | None:
    try:
        return metadata.version("robustbench")
    except metadata.PackageNotFoundError:
        return None


# --------------------------------------------------------------------------------------------------
# The zoo's entries and their published numbers

@dataclass(frozen=True)
class ZooInfo:
    """One zoo entry: the leaderboard's architecture and published accuracies (fractions; None where
    the leaderboard has no row for it)."""
    name: str
    dataset: str
    threat_model: str
    architecture: str
    clean_accuracy: float | None
    robust_accuracy: float | None   # AutoAttack for Linf and L2, mean corruption accuracy otherwise
    paper: str | None
    venue: str | None
    eps: float | None               # the leaderboard's budget (Linf, L2)


_DATASET_TITLES = {"CIFAR-10": "cifar10", "CIFAR-100": "cifar100", "ImageNet": "imagenet"}
_CELL_MARKUP = re.compile(r"<[^>]+>|\*")


def _threat_heading(text: str) -> tuple[str, float | None]:
    """"Linf, eps=8/255" -> ("Linf", 0.0313...); "Common Corruptions" -> ("corruptions", None)."""
    kind = "Linf" if text.startswith("Linf") else "L2" if text.startswith("L2") else "corruptions"
    match = re.search(r"eps\s*=\s*([0-9./]+)", text)
    return kind, float(Fraction(match.group(1))) if match else None


def _percent(cell: str) -> float | None:
    try:
        return float(cell.rstrip("%")) / 100
    except ValueError:
        return None


@lru_cache(maxsize=None)
def leaderboard() -> dict[tuple[str, str], dict[str, dict]]:
    """(dataset, threat model) -> name -> row of the leaderboard tables in robustbench's package
    description (its README as released): architecture, clean and robust accuracy, paper, venue, eps."""
    try:
        text = metadata.metadata("robustbench").get_payload() or ""
    except metadata.PackageNotFoundError:
        return {}
    tables: dict[tuple[str, str], dict[str, dict]] = {}
    dataset = threat = eps = None
    for line in text.splitlines():
        if line.startswith("### ") and not line.startswith("#### "):
            dataset = _DATASET_TITLES.get(line[4:].strip())
        elif line.startswith("#### ") and dataset:
            threat, eps = _threat_heading(line[5:].strip())
        elif line.startswith("|") and dataset and threat:
            cells = [_CELL_MARKUP.sub("", c).strip() for c in line.strip().strip("|").split("|")]
            if len(cells) < 7 or not cells[0].isdigit():
                continue  # the header and the separator rows
            paper = re.sub(r"\]\(.*\)$", "", cells[2]).lstrip("[")
            tables.setdefault((dataset, threat), {})[cells[1]] = dict(
                architecture=cells[5], clean=_percent(cells[3]), robust=_percent(cells[4]), paper=paper,
                venue=cells[6], eps=eps)
    return tables


def _entries(dataset: str, threat_model: str) -> dict[str, dict]:
    """robustbench's model registry for (dataset, threat model): name -> {'model': factory, ...}."""
    from robustbench.model_zoo import model_dicts
    from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel

    return model_dicts[BenchmarkDataset(dataset)][ThreatModel(threat_model)]


def check_setting(dataset: str, threat_model: str, threat_models=THREAT_MODELS) -> None:
    """ValueError (one line) for a dataset or threat model the zoo does not offer for our use."""
    if dataset not in DATASETS:
        raise ValueError(f"RobustBench models on {dataset!r} are not available here; datasets: {', '.join(DATASETS)}")
    if threat_model not in threat_models:
        raise ValueError(f"unknown threat model {threat_model!r}; valid: {', '.join(threat_models)}")


def list_models(dataset: str = "cifar10", threat_model: str = "Linf") -> list[ZooInfo]:
    """Every entry of the zoo for (dataset, threat model), in robustbench's order, with its published
    numbers; ValueError for an unknown setting or without robustbench."""
    check_setting(dataset, threat_model)
    robustbench()
    board = leaderboard().get((dataset, threat_model), {})
    out = []
    for name, entry in _entries(dataset, threat_model).items():
        row = board.get(name, {})
        factory = entry.get("model")
        arch = row.get("architecture") or (factory.__name__ if isinstance(factory, type) else "unknown")
        out.append(ZooInfo(name, dataset, threat_model, arch, row.get("clean"), row.get("robust"),
                           row.get("paper"), row.get("venue"), row.get("eps")))
    return out


def check_subject(name: str, dataset: str | None, threat_model: str, checkpoint: str) -> None:
    """The options of `--zoo NAME` that need no robustbench (ValueError, one line): the name, dataset,
    threat model and checkpoint."""
    if not name.strip():
        raise ValueError("--zoo is empty; give a RobustBench model name (see `gmr zoo list`)")
    if dataset is None:
        raise ValueError("--zoo needs --dataset (e.g. cifar10)")
    check_setting(dataset, threat_model, EVAL_THREAT_MODELS)
    if checkpoint != ZOO_CHECKPOINT:
        raise ValueError(f"a RobustBench model has one checkpoint ({ZOO_CHECKPOINT}), not {checkpoint}")


def check_names(names, dataset: str, threat_model: str = "Linf") -> None:
    """ValueError naming the first unknown zoo name (with close matches) for (dataset, threat model)."""
    check_setting(dataset, threat_model, EVAL_THREAT_MODELS)
    robustbench()
    valid = list(_entries(dataset, threat_model))
    for name in names:
        if name not in valid:
            close = difflib.get_close_matches(name, valid, n=3)
            hint = f"did you mean {', '.join(close)}? " if close else ""
            raise ValueError(f"unknown RobustBench model {name!r} for {dataset} {threat_model}; {hint}"
                             f"`gmr zoo list --dataset {dataset} --threat-model {threat_model}` lists all {len(valid)}")


# --------------------------------------------------------------------------------------------------
# A zoo model as the subject of an evaluation or an audit

@dataclass(frozen=True)
class ZooModel:
    """A RobustBench model where `gmr evaluate` and `gmr diagnose` take a run directory: the methods they
    call on a `gmr.runs.RunDir` (record, require, load_model, checkpoint_epoch, same_weights, train_log)
    with a zoo model's answers (module docstring)."""
    name: str
    dataset: str = "cifar10"
    threat_model: str = "Linf"
    model_dir: str = DEFAULT_MODEL_DIR

    @property
    def run_id(self) -> str:
        return f"zoo:{self.dataset}:{self.threat_model}:{self.name}"

    @property
    def path(self) -> Path:
        """The folder robustbench keeps this model's checkpoint in."""
        return Path(self.model_dir) / self.dataset / self.threat_model

    def checkpoint_files(self) -> list[Path]:
        """The files `robustbench.utils.load_model` reads (it downloads the missing ones); none for a
        model hosted by timm (fetched from the Hugging Face hub)."""
        import timm

        if timm.is_model(f"{self.name.lower().replace('-', '_')}_{self.dataset}_{self.threat_model.lower()}"):
            return []
        ids = _entries(self.dataset, self.threat_model)[self.name]["gdrive_id"]
        base = self.path / f"{self.name}.pt"
        return [Path(f"{base}_m{i}.pt") for i in range(len(ids))] if isinstance(ids, list) else [base]

    def info(self) -> ZooInfo:
        return next(i for i in list_models(self.dataset, self.threat_model) if i.name == self.name)

    def record(self, what: str = "--zoo") -> dict:
        """The run-like record of this model (what evaluate and diagnose read from a run.json)."""
        from .data import dataset_info, default_data_root

        info = self.info()
        eps = info.eps if info.eps is not None else dataset_info(self.dataset).default_eps
        return {"run_id": self.run_id, "eps": eps, "selection": {}, "zoo": self.fields(info),
                "config": {"dataset": self.dataset, "model": info.architecture, "method": self.name,
                           "seed": None, "data_root": str(default_data_root())}}

    def fields(self, info: ZooInfo | None = None) -> dict:
        """The `zoo` object of an evaluation or audit record: which entry, where its weights came from,
        and what the leaderboard publishes for it."""
        info = info or self.info()
        return {"name": self.name, "dataset": self.dataset, "threat_model": self.threat_model,
                "architecture": info.architecture, "model_dir": str(self.model_dir),
                "checkpoint_files": [str(p) for p in self.checkpoint_files()],
                "published_clean_accuracy": info.clean_accuracy, "published_robust_accuracy": info.robust_accuracy,
                "published_eps": info.eps, "paper": info.paper, "robustbench": robustbench_version()}

    @classmethod
    def from_fields(cls, fields: dict) -> "ZooModel":
        """The model an audit's or evaluation's `zoo` object names."""
        return cls(fields["name"], fields["dataset"], fields["threat_model"], fields["model_dir"])

    def require(self, checkpoint: str = ZOO_CHECKPOINT, what: str = "--zoo") -> dict:
        """The record, once the name is known and the checkpoint is on disk (downloaded when missing:
        the one slow step before any data or attack work). ValueError/ZooError with one line."""
        if checkpoint != ZOO_CHECKPOINT:
            raise ZooError(f"a RobustBench model has one checkpoint ({ZOO_CHECKPOINT}), not {checkpoint!r}")
        if not str(self.model_dir).strip():
            raise ZooError("--model-dir is empty; give the folder of RobustBench checkpoints")
        check_names([self.name], self.dataset, self.threat_model)
        for path in self.checkpoint_files():
            if not path.is_file():
                self._download(path)
        return self.record(what)

    def _download(self, path: Path) -> None:
        from robustbench.utils import download_gdrive_new

        ids = _entries(self.dataset, self.threat_model)[self.name]["gdrive_id"]
        gid = ids[int(path.name.rsplit("_m", 1)[1][:-3])] if isinstance(ids, list) else ids
        path.parent.mkdir(parents=True, exist_ok=True)
        chatter = io.StringIO()  # gdown's progress: kept out of the one line an error gets
        try:
            with contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
                download_gdrive_new(gid, path)
            ok = path.is_file() and path.stat().st_size > 0
        except Exception as err:  # no network, a quota page, a DNS error: all the same to the user
            ok, why = False, f"{type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''}"
        else:
            why = "nothing was written"
        if ok:
            print(f"downloaded {path} ({path.stat().st_size / 2**20:.0f} MB)", file=sys.stderr)
        else:
            path.unlink(missing_ok=True)
            raise ZooError(f"RobustBench model {self.name}: no checkpoint at {path} and the download failed "
                           f"({why}); without internet, download it elsewhere and put it there "
                           "(--model-dir is the folder above <dataset>/<threat model>/)")

    def load_model(self, checkpoint: str = ZOO_CHECKPOINT, device="cpu", record: dict | None = None
                   ) -> tuple[nn.Module, dict, None]:
        """(model in eval mode and fp32 on `device`, record, None: a zoo model has no epoch), loaded by
        robustbench.utils.load_model; a checkpoint that does not load is a ZooError."""
        from robustbench.utils import load_model

        record = record if record is not None else self.require(checkpoint)
        try:
            model = load_model(self.name, model_dir=self.model_dir, dataset=self.dataset,
                               threat_model=self.threat_model)
        except Exception as err:  # a damaged or foreign file: pickle, zip, key and shape errors alike
            files = ", ".join(str(p) for p in self.checkpoint_files()) or self.name
            raise ZooError(f"{files} does not load as RobustBench model {self.name}: "
                           f"{type(err).__name__}: {' '.join(str(err).split())[:200]}") from None
        return model.float().to(device).eval(), record, None

    def checkpoint_epoch(self, checkpoint: str = ZOO_CHECKPOINT, record: dict | None = None) -> None:
        return None

    def same_weights(self, record: dict | None = None) -> bool:
        return True  # one set of weights

    def train_log(self, record: dict | None = None) -> list[dict]:
        return []    # trained elsewhere: no training log, so no catastrophic-overfitting check


# --------------------------------------------------------------------------------------------------
# Cross-check: robustbench's own benchmark on our points

def robustbench_benchmark(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, *,
                          dataset: str = "cifar10", threat_model: str = "Linf", batch_size: int = 500,
                          seed: int | None = 0, device="cpu") -> tuple[float, float]:
    """(clean accuracy, robust accuracy) from `robustbench.eval.benchmark` (AutoAttack standard) on the
    points (x, y), which replace its test-set loader (it would download CIFAR); its AutoAttack is seeded
    with `seed` (benchmark itself leaves it to the clock), so that it draws what ours does. No state file:
    with one, robustbench 1.1.1 averages pyautoattack's boolean flags, which torch refuses."""
    robustbench()
    rb_eval = importlib.import_module("robustbench.eval")

    def our_points(dataset_, n_examples, data_dir, prepr):
        return x[:n_examples].detach().float().cpu(), y[:n_examples].detach().long().cpu()

    with contextlib.ExitStack() as stack:
        from unittest import mock

        stack.enter_context(mock.patch.object(rb_eval, "load_clean_dataset", our_points))
        stack.enter_context(mock.patch.object(rb_eval, "AutoAttack", functools.partial(rb_eval.AutoAttack, seed=seed)))
        stack.enter_context(contextlib.redirect_stdout(sys.stderr))  # its progress prints
        return rb_eval.benchmark(model.eval(), n_examples=len(x), dataset=dataset, threat_model=threat_model,
                                 eps=eps, batch_size=batch_size, device=torch.device(device))
