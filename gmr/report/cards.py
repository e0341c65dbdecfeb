"""RobustBench model cards for evaluated runs.

`make_card(record, run_meta)` turns one `gmr evaluate` record (with AutoAttack) and the run's run.json
into a card in RobustBench's `model_info/<dataset>/<threat model>/<name>.json` format: its fields keep
RobustBench's names and text formatting (accuracies as percent strings with two decimals, eps as
"8/255"), so RobustBench's tooling reads them. Our additions: `threat_model`, the run's training cost
(`training_cost`, from run.json's cost ledger) and `evaluation` (the same numbers as numbers, with
n_examples, seed, checkpoint, run_id, versions, device and the AutoAttack flags). The schema is
`gmr/schemas/card.schema.json`. Methods and models appear with their registered titles (gmr/methods.py,
gmr/models), budgets as their dataset writes them (gmr/data.py).

The published numbers (gmr/report/reference.py) and the schema loaders (gmr/schemas) are importable
from here too, beside the cards that are compared and checked against them.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..data import eps_text
from ..io import read_json, write_json
from ..methods import METHODS, method_title
from ..models import model_title
from ..runs import RunDir
from ..schemas import load_schema, validate
from .reference import load_reference, reference_rows

__all__ = ["CardError", "card_from_files", "load_reference", "load_schema", "make_card", "reference_rows",
           "validate", "write_card"]

CARD_SCHEMA = "gmr.card/1"


class CardError(ValueError):
    """The evaluation cannot make a card (e.g. it has no AutoAttack result)."""


def _pct(acc: float | None) -> str | None:
    return None if acc is None else f"{100 * acc:.2f}"


def _method_text(method: str, options: dict | None, detail: str) -> str:
    """"gmr training (GMR: <registered description>; <detail>)": key, title and what the method does."""
    description = METHODS.get(method).description if method in METHODS else ""
    return (f"{method} training ({method_title(method, options)}" + (f": {description}" if description else "")
            + f"; {detail})")


def _recipe(record: dict, meta: dict | None) -> str:
    if meta is None:
        return (f"{_method_text(record['method'], None, 'options unknown')}, {model_title(record['model'])}, "
                f"train seed {record['train_seed']}; training recipe unavailable (run.json not found).")
    cfg = meta["config"]
    data = meta.get("data", {})
    opts = meta.get("method_options") or {}
    opt_text = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in opts.items())
    sel = meta.get("selection", {})
    chosen = (f"epoch {sel.get('best_epoch')} selected by validation {sel.get('criterion', 'I-FGSM-3')}"
              if record["checkpoint"] == "best" else f"last epoch ({sel.get('last_epoch')})")
    return (f"{_method_text(cfg['method'], opts, opt_text or 'default options')} on "
            f"{data.get('n_train', '?')} {cfg['dataset']} training images, {model_title(cfg['model'])}, "
            f"{cfg['epochs']} epochs, batch {cfg['batch_size']}, SGD lr {cfg['lr']:g} momentum "
            f"{cfg['momentum']:g} weight decay {cfg['weight_decay']:g} ({cfg['schedule']} schedule), training "
            f"eps {meta['eps']:g}, seed {cfg['seed']}; {record['checkpoint']} checkpoint ({chosen}).")


def _footnote(record: dict, run_meta: dict | None, auto: dict, whitebox: list[str]) -> str:
    flags = auto.get("flags", [])
    return (_recipe(record, run_meta) + f" Evaluated by gmr-bench on the first {auto['n_examples']} test "
            f"points: AutoAttack {auto['version']} ({auto['norm']}, {auto.get('package', 'pyautoattack')}, "
            f"seed {auto['seed']}); 'reported' is our worst case over the white-box attacks "
            f"{', '.join(a for a in whitebox if a != 'clean') or 'none'}."
            + (f" AutoAttack raised {len(flags)} flag(s): see evaluation.autoattack_flags." if flags else ""))


def _evaluation(record: dict, auto: dict, clean: float | None, reported: float | None) -> dict:
    return {
        "schema": CARD_SCHEMA, "eval_schema": record.get("schema"),
        "run": record["run"], "run_id": record.get("run_id"), "method": record["method"],
        "model": record["model"], "checkpoint": record["checkpoint"],
        "checkpoint_epoch": record.get("checkpoint_epoch"), "train_seed": record["train_seed"],
        "seed": auto["seed"], "eps": auto["eps"], "n_examples": auto["n_examples"], "clean_accuracy": clean,
        "autoattack_accuracy": auto["accuracy"], "whitebox_worst_case_accuracy": reported,
        "autoattack_version": auto["version"], "autoattack_per_attack": auto.get("per_attack", {}),
        "autoattack_flags": auto.get("flags", []), "versions": record.get("versions", {}),
        "device": record.get("device"), "device_name": record.get("device_name"), "seconds": auto.get("seconds"),
    }


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
    arch = model_title(record["model"])
    title = method_title(record["method"], (run_meta or {}).get("method_options"))
    cost = dict(run_meta.get("cost", {})) if run_meta else {}
    if run_meta:
        cost.update(epochs=run_meta["config"]["epochs"], batch_size=run_meta["config"]["batch_size"],
                    n_train=run_meta.get("data", {}).get("n_train"))
    return {
        "name": name or f"gmr-bench {title} {arch} seed {record['train_seed']} ({record['checkpoint']})",
        "additional_data": False,
        "number_forward_passes": 1,
        "dataset": dataset,
        "architecture": arch,
        "eps": eps_text(auto["eps"], dataset),
        "threat_model": auto["norm"],
        "clean_acc": _pct(clean),
        "reported": _pct(reported),
        "autoattack_acc": _pct(auto["accuracy"]),
        "footnote": _footnote(record, run_meta, auto, whitebox),
        "training_cost": cost,
        "evaluation": _evaluation(record, auto, clean, reported),
    }


def card_from_files(eval_json: str | Path, run_dir: str | Path | None = None, name: str | None = None) -> dict:
    """Card from an evaluation file and its run's run.json, read from `run_dir` or else from the
    record's own run path when that holds one. The run must be the one the evaluation measured (same
    run_id); a ValueError says so otherwise."""
    try:
        record = read_json(eval_json)
    except (OSError, ValueError) as err:
        raise ValueError(f"--eval {eval_json} cannot be read: {err}") from None
    if not isinstance(record, dict) or "attacks" not in record:
        raise ValueError(f"--eval {eval_json} is not a `gmr evaluate` result (no attacks)")
    run = RunDir(run_dir if run_dir is not None else record.get("run", ""))
    meta = run.record("--run") if run_dir is not None or run.record_file.is_file() else None
    if meta is not None and record.get("run_id") != meta["run_id"]:
        measured = f"run {record['run_id']}" if record.get("run_id") else "a run it does not name (no run_id)"
        raise ValueError(f"--eval {eval_json} measured {measured}, but {run.path} is run {meta['run_id']}; "
                         "give the run it measured with --run")
    try:
        return make_card(record, meta, name)
    except KeyError as err:
        raise ValueError(f"--eval {eval_json} is not a complete `gmr evaluate` result (no {err})") from None


def write_card(eval_json: str | Path, out: str | Path, run_dir: str | Path | None = None,
               name: str | None = None) -> dict:
    """Make the card of an evaluation file and write it to `out` (nothing is written on bad input)."""
    from ..io import ensure_writable_file

    out = ensure_writable_file(out)
    card = card_from_files(eval_json, run_dir, name)
    write_json(out, card)
    return card
