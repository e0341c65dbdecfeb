"""RobustBench model cards for evaluated runs, and the published reference numbers.

`make_card(record, run_meta)` turns one `gmr evaluate` record (with AutoAttack) and the run's run.json
into a card in RobustBench's `model_info/<dataset>/<threat model>/<name>.json` format: its fields keep
RobustBench's names and text formatting (accuracies as percent strings with two decimals, eps as
"8/255"), so RobustBench's tooling reads them. Our additions: `threat_model`, the run's training cost
(`training_cost`, from run.json's cost ledger) and `evaluation` (the same numbers as numbers, with
n_examples, seed, checkpoint, versions, device and the AutoAttack flags). The schema is
`gmr/schemas/card.schema.json`.

`load_reference()` / `reference_rows()` give the published numbers of DESIGN.md section 6, shipped as
`gmr/reference/reference.json` (percent).
"""
from __future__ import annotations

import copy
import json
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

from ..io import read_json

CARD_SCHEMA = "gmr.card/1"
ARCHITECTURES = {"lenet_plus": "LeNet+", "preact_resnet18": "PreActResNet-18", "resnet18": "ResNet-18",
                 "wrn_28_10": "WideResNet-28-10", "tiny_cnn": "tiny CNN"}
METHOD_NAMES = {"standard": "standard training", "fgsm": "FGSM-AT", "rfgsm": "R-FGSM-AT",
                "gmr": "GMR (single-step AT + gradient-masking regularizer, Vivek et al. 2019)",
                "pgd": "PGD-AT", "fgsm_rs": "FGSM-RS", "n_fgsm": "N-FGSM", "gradalign": "GradAlign",
                "sat_r1": "SAT-R1", "sat_r3": "SAT-R3"}
_MNIST_LIKE = ("mnist", "fashion_mnist")


class CardError(ValueError):
    """The evaluation cannot make a card (e.g. it has no AutoAttack result)."""


def eps_text(eps: float, dataset: str) -> str:
    """RobustBench writes CIFAR budgets as k/255."""
    k = eps * 255
    if dataset not in _MNIST_LIKE and 0 < eps < 1 and abs(k - round(k)) < 1e-6:
        return f"{round(k)}/255"
    return f"{eps:g}"


def _pct(acc: float | None) -> str | None:
    return None if acc is None else f"{100 * acc:.2f}"


def _recipe(record: dict, meta: dict | None) -> str:
    if meta is None:
        return (f"{METHOD_NAMES.get(record['method'], record['method'])}, {record['model']}, "
                f"train seed {record['train_seed']}; training recipe unavailable (run.json not found).")
    cfg = meta["config"]
    data = meta.get("data", {})
    opts = meta.get("method_options") or {}
    opt_text = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in opts.items())
    sel = meta.get("selection", {})
    chosen = (f"epoch {sel.get('best_epoch')} selected by validation {sel.get('criterion', 'I-FGSM-3')}"
              if record["checkpoint"] == "best" else f"last epoch ({sel.get('last_epoch')})")
    return (f"{METHOD_NAMES.get(cfg['method'], cfg['method'])} ({opt_text or 'default options'}) on "
            f"{data.get('n_train', '?')} {cfg['dataset']} training images, {cfg['model']}, {cfg['epochs']} "
            f"epochs, batch {cfg['batch_size']}, SGD lr {cfg['lr']:g} momentum {cfg['momentum']:g} weight decay "
            f"{cfg['weight_decay']:g} ({cfg['schedule']} schedule), training eps {meta['eps']:g}, seed {cfg['seed']}; "
            f"{record['checkpoint']} checkpoint ({chosen}).")


def make_card(record: dict, run_meta: dict | None = None, name: str | None = None) -> dict[str, Any]:
    """A RobustBench model card (plus our cost and evaluation fields) from one evaluation record."""
    attacks = record.get("attacks", {})
    auto = attacks.get("autoattack")
    if auto is None:
        raise CardError("a model card needs an AutoAttack result: evaluate with autoattack in --attacks")
    clean = attacks.get("clean", {}).get("accuracy")
    whitebox = record.get("worst_case", {}).get("whitebox_over", [])
    reported = record["worst_case"].get("whitebox_accuracy") if len(whitebox) > 1 else None
    dataset = record["dataset"]
    arch = ARCHITECTURES.get(record["model"], record["model"])
    name = name or (f"gmr-bench {METHOD_NAMES.get(record['method'], record['method']).split(' (')[0]} "
                    f"{arch} seed {record['train_seed']} ({record['checkpoint']})")
    flags = auto.get("flags", [])
    footnote = (_recipe(record, run_meta) + f" Evaluated by gmr-bench on the first {auto['n_examples']} test "
                f"points: AutoAttack {auto['version']} ({auto['norm']}, {auto.get('package', 'pyautoattack')}, "
                f"seed {auto['seed']}); 'reported' is our worst case over the white-box attacks "
                f"{', '.join(a for a in whitebox if a != 'clean') or 'none'}."
                + (f" AutoAttack raised {len(flags)} flag(s): see evaluation.autoattack_flags." if flags else ""))
    cost = dict(run_meta.get("cost", {})) if run_meta else {}
    if run_meta:
        cost.update(epochs=run_meta["config"]["epochs"], batch_size=run_meta["config"]["batch_size"],
                    n_train=run_meta.get("data", {}).get("n_train"))
    return {
        "name": name,
        "additional_data": False,
        "number_forward_passes": 1,
        "dataset": dataset,
        "architecture": arch,
        "eps": eps_text(auto["eps"], dataset),
        "threat_model": auto["norm"],
        "clean_acc": _pct(clean),
        "reported": _pct(reported),
        "autoattack_acc": _pct(auto["accuracy"]),
        "footnote": footnote,
        "training_cost": cost,
        "evaluation": {
            "schema": CARD_SCHEMA,
            "eval_schema": record.get("schema"),
            "run": record["run"], "method": record["method"], "model": record["model"],
            "checkpoint": record["checkpoint"], "checkpoint_epoch": record.get("checkpoint_epoch"),
            "train_seed": record["train_seed"], "seed": auto["seed"], "eps": auto["eps"],
            "n_examples": auto["n_examples"], "clean_accuracy": clean, "autoattack_accuracy": auto["accuracy"],
            "whitebox_worst_case_accuracy": reported, "autoattack_version": auto["version"],
            "autoattack_per_attack": auto.get("per_attack", {}), "autoattack_flags": flags,
            "versions": record.get("versions", {}), "device": record.get("device"),
            "device_name": record.get("device_name"), "seconds": auto.get("seconds"),
        },
    }


def card_from_files(eval_json: str | Path, run_dir: str | Path | None = None, name: str | None = None) -> dict:
    """Card from an evaluation file; run.json is read from `run_dir` or the record's own run path."""
    record = read_json(eval_json)
    run = Path(run_dir) if run_dir is not None else Path(record.get("run", ""))
    meta = read_json(run / "run.json") if (run / "run.json").exists() else None
    return make_card(record, meta, name)


# --------------------------------------------------------------------------------------------------
# Schemas and reference numbers (package data)

@lru_cache(maxsize=None)
def _package_json(*parts: str) -> Any:
    return json.loads(resources.files("gmr").joinpath(*parts).read_text())


def load_schema(name: str) -> dict:
    """A JSON Schema shipped in gmr/schemas (e.g. "eval", "card")."""
    return copy.deepcopy(_package_json("schemas", f"{name}.schema.json"))


def validate(instance: dict, name: str) -> None:
    """Raise jsonschema.ValidationError when `instance` does not match schema `name`."""
    import jsonschema

    jsonschema.validate(instance, load_schema(name))


def load_reference() -> dict:
    """The whole reference file: description, units, column meanings, sources and entries."""
    return copy.deepcopy(_package_json("reference", "reference.json"))


def reference_rows(dataset: str | None = None, method: str | None = None) -> list[dict]:
    """Published numbers (percent), one row per (source, method, model); optionally filtered."""
    rows = load_reference()["entries"]
    return [r for r in rows if (dataset is None or r["dataset"] == dataset)
            and (method is None or r["method"] == method)]
