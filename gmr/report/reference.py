"""Published numbers (DESIGN.md section 6) and how ours compare with them.

The numbers ship as gmr/reference/reference.json (percent, one entry per source, setting and method,
with the source of each). `compare` puts ours beside every published number whose setting we ran:
same dataset, eps (to 1e-4), architecture and method, and the same metric (a PGD-k number only when
our PGD used k steps), so a delta is never between two different measurements.
"""
from __future__ import annotations

import copy
import json
import math
from functools import lru_cache
from importlib import resources

import pandas as pd

from ..data import dataset_info, eps_text
from .render import num

# Published architecture names -> our model keys (the published tables name architectures their way).
ARCH_ALIASES = {"resnet-18": "resnet18", "resnet18": "resnet18", "preactresnet-18": "preact_resnet18",
                "preact_resnet18": "preact_resnet18", "wrn-28-10": "wrn_28_10", "wideresnet-28-10": "wrn_28_10",
                "wrn_28_10": "wrn_28_10"}
# Published column -> (title, our attack, the PGD step count our evaluation must have used; None: any).
REFERENCE_COLUMNS = {"clean": ("clean", "clean", None), "fgsm": ("FGSM", "fgsm", None),
                     "pgd": ("PGD (steps not stated)", "pgd", None), "pgd7": ("PGD-7", "pgd", 7),
                     "pgd20": ("PGD-20", "pgd", 20), "pgd50": ("PGD-50", "pgd", 50),
                     "pgd500": ("PGD-500", "pgd", 500), "autoattack": ("AutoAttack", "autoattack", None),
                     "reported": ("reported by the authors", "none", None)}
COLUMNS = ["dataset", "eps", "model", "method", "method_name", "metric", "published", "ours", "delta",
           "our_seeds", "source", "note"]
SETTING = ["dataset", "model", "eps", "method"]
NOT_STATED = "not stated"          # an entry whose source gives no architecture
REFERENCE_FILE = "gmr/reference/reference.json"


@lru_cache(maxsize=None)
def _reference_file() -> dict:
    return json.loads(resources.files("gmr").joinpath("reference", "reference.json").read_text())


def load_reference() -> dict:
    """The whole reference file: description, units, column meanings, sources and entries."""
    return copy.deepcopy(_reference_file())


def reference_rows(dataset: str | None = None, method: str | None = None) -> list[dict]:
    """Published numbers (percent), one row per (source, method, model); optionally filtered."""
    rows = load_reference()["entries"]
    return [r for r in rows if (dataset is None or r["dataset"] == dataset)
            and (method is None or r["method"] == method)]


def reference_numbers() -> pd.DataFrame:
    """The published numbers as a frame, one row per (source, method, model)."""
    return pd.DataFrame(reference_rows())


def _given(value) -> bool:
    """A field an entry sets (absent fields read as None or NaN from a frame)."""
    return value is not None and not (isinstance(value, float) and math.isnan(value))


def _in_study(ref: dict, ours: list[dict]) -> bool:
    return any(o["dataset"] == ref["dataset"] and abs(o["eps"] - ref["eps"]) < 1e-4 for o in ours)


def _match(ref: dict, ours: list[dict]) -> dict | None:
    """Our setting that this published entry measures the same thing as: dataset, eps, method,
    architecture (any of ours when the source does not state one) and, where the entry names one, the
    method's title (PGD-40 AT is not PGD-3 AT). An entry trained by another recipe matches nothing."""
    if _given(ref.get("recipe")):
        return None
    arch = ARCH_ALIASES.get(str(ref["model"]).lower(), ref["model"])
    title = ref.get("our_title")
    return next((o for o in ours if o["dataset"] == ref["dataset"] and abs(o["eps"] - ref["eps"]) < 1e-4
                 and o["method"] == ref["method"] and (arch == NOT_STATED or o["model"] == arch)
                 and (not _given(title) or o.get("title") == title)), None)


def compare(evals: pd.DataFrame, published: pd.DataFrame | None = None, checkpoint: str = "best",
            titles: dict[tuple, str] | None = None) -> pd.DataFrame:
    """The published numbers in this study's settings (dataset and eps of one of its runs), one row per
    (source, method, model, metric), with ours beside each where `_match` finds our setting: the
    `checkpoint` model, mean over seeds, the same metric (a PGD-k number only when our PGD used k
    steps). Rows with ours come first. Delta = ours - published, in points. `evals` is the frame of
    `gmr.report.tables.load_evals`; `titles` maps (dataset, model, eps, method) to our method titles."""
    if published is None:
        published = reference_numbers()
    ours = _ours_by_setting(evals, checkpoint, titles or {})
    rows = []
    for ref in published.to_dict("records"):
        if not _in_study(ref, ours):
            continue
        match = _match(ref, ours)
        for col, (title, attack, steps) in REFERENCE_COLUMNS.items():
            pub = ref.get(col)
            if not _given(pub):
                continue
            mine, seeds = math.nan, 0
            if match and attack in match["acc"] and (steps is None or match["steps"].get(attack) == steps):
                mine, seeds = 100 * match["acc"][attack], match["n_seeds"]
            rows.append({"dataset": ref["dataset"], "eps": ref["eps"], "model": ref["model"],
                         "method": ref["method"], "method_name": ref.get("method_name", ref["method"]),
                         "metric": title, "published": float(pub), "ours": mine,
                         "delta": mine - float(pub) if not math.isnan(mine) else math.nan,
                         "our_seeds": seeds, "source": ref.get("source", ""),
                         "note": ref["note"] if _given(ref.get("note")) else ""})
    t = pd.DataFrame(rows, columns=COLUMNS)
    return t.sort_values("our_seeds", ascending=False, kind="stable").reset_index(drop=True)


def _ours_by_setting(evals: pd.DataFrame, checkpoint: str, titles: dict[tuple, str]) -> list[dict]:
    """Per setting: mean accuracy per attack, the number of runs, the PGD step count of each attack
    (None when the runs of the setting used different counts: not one comparable number) and the
    method's title."""
    if evals.empty:
        return []
    out = []
    for key, g in evals[evals["checkpoint"] == checkpoint].groupby(SETTING):
        acc = g.groupby("attack")["accuracy"].mean().to_dict()
        steps = {}
        for attack, rows in g.groupby("attack"):
            used = set(rows["steps"].dropna())
            steps[attack] = int(used.pop()) if len(used) == 1 else None
        out.append({**dict(zip(SETTING, key)), "acc": acc, "n_seeds": g["run_id"].nunique(), "steps": steps,
                    "title": titles.get(tuple(key))})
    return out


def format_comparison(t: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """Display columns and notes of the comparison (the reference table)."""
    df = pd.DataFrame({"dataset": [dataset_info(d).title for d in t["dataset"]],
                       "eps": [eps_text(e, d) for e, d in zip(t["eps"], t["dataset"])],
                       "model": t["model"], "method": t["method_name"], "metric": t["metric"],
                       "published": t["published"].map(lambda v: num(v, "{:.2f}")),
                       "ours": t["ours"].map(lambda v: num(v, "{:.2f}")),
                       "Δ": t["delta"].map(lambda v: num(v, "{:+.2f}")),
                       "our seeds": t["our_seeds"].astype(str), "source": t["source"], "note": t["note"]})
    if t.empty:
        return df, [f"No published number is in this study's settings (dataset and eps of its runs). The "
                    f"references (CIFAR-10 8/255, MNIST 0.3) live in {REFERENCE_FILE}; "
                    "config/paper-mnist.yaml and config/paper-cifar10.yaml run studies in those settings."]
    notes = ["Published accuracies (%) in this study's settings (dataset and eps), ours (selected model, "
             "mean over seeds) beside those whose architecture (any, where the source states none), "
             "method and method title match; PGD-k rows are filled only when our PGD used k steps. "
             "Δ = ours − published, in points. –: no run of this study in that setting; "
             "'reported by the authors' is their own attack's number, never ours to fill. Rows with ours "
             f"come first. Sources: {REFERENCE_FILE}."]
    if (t["our_seeds"] == 0).all():
        notes.append("None of this study's runs matches a published entry's method, architecture and title.")
    return df, notes
