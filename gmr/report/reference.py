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
                     "pgd20": ("PGD-20", "pgd", 20), "pgd500": ("PGD-500", "pgd", 500),
                     "autoattack": ("AutoAttack", "autoattack", None)}
COLUMNS = ["dataset", "eps", "model", "method", "method_name", "metric", "published", "ours", "delta",
           "our_seeds", "source"]
SETTING = ["dataset", "model", "eps", "method"]


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


def compare(evals: pd.DataFrame, published: pd.DataFrame | None = None, checkpoint: str = "best"
            ) -> pd.DataFrame:
    """One row per published number (source, setting, method, metric) with ours beside it: the
    `checkpoint` model, mean over seeds. Delta = ours - published, in points; NaN where we have no
    matching number. `evals` is the frame of `gmr.report.tables.load_evals`."""
    if published is None:
        published = reference_numbers()
    ours = _ours_by_setting(evals, checkpoint)
    rows = []
    for ref in published.to_dict("records"):
        arch = ARCH_ALIASES.get(str(ref["model"]).lower(), ref["model"])
        match = next((o for o in ours if o["dataset"] == ref["dataset"] and abs(o["eps"] - ref["eps"]) < 1e-4
                      and o["model"] == arch and o["method"] == ref["method"]), None)
        for col, (title, attack, steps) in REFERENCE_COLUMNS.items():
            pub = ref.get(col)
            if pub is None or (isinstance(pub, float) and math.isnan(pub)):
                continue
            mine, seeds = math.nan, 0
            if match and attack in match["acc"] and (steps is None or match["steps"].get(attack) == steps):
                mine, seeds = 100 * match["acc"][attack], match["n_seeds"]
            rows.append({"dataset": ref["dataset"], "eps": ref["eps"], "model": ref["model"],
                         "method": ref["method"], "method_name": ref.get("method_name", ref["method"]),
                         "metric": title, "published": float(pub), "ours": mine,
                         "delta": mine - float(pub) if not math.isnan(mine) else math.nan,
                         "our_seeds": seeds, "source": ref.get("source", "")})
    return pd.DataFrame(rows, columns=COLUMNS)


def _ours_by_setting(evals: pd.DataFrame, checkpoint: str) -> list[dict]:
    """Per setting: mean accuracy per attack, the number of runs, and the PGD step count of each
    attack (None when the runs of the setting used different counts: not one comparable number)."""
    if evals.empty:
        return []
    out = []
    for key, g in evals[evals["checkpoint"] == checkpoint].groupby(SETTING):
        acc = g.groupby("attack")["accuracy"].mean().to_dict()
        steps = {}
        for attack, rows in g.groupby("attack"):
            used = set(rows["steps"].dropna())
            steps[attack] = int(used.pop()) if len(used) == 1 else None
        out.append({**dict(zip(SETTING, key)), "acc": acc, "n_seeds": g["run_id"].nunique(), "steps": steps})
    return out


def format_comparison(t: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """Display columns and notes of the comparison (the reference table)."""
    df = pd.DataFrame({"dataset": [dataset_info(d).title for d in t["dataset"]],
                       "eps": [eps_text(e, d) for e, d in zip(t["eps"], t["dataset"])],
                       "model": t["model"], "method": t["method_name"], "metric": t["metric"],
                       "published": t["published"].map(lambda v: num(v, "{:.2f}")),
                       "ours": t["ours"].map(lambda v: num(v, "{:.2f}")),
                       "Δ": t["delta"].map(lambda v: num(v, "{:+.2f}")),
                       "our seeds": t["our_seeds"].astype(str), "source": t["source"]})
    notes = ["Published accuracies (%) beside ours (selected model, mean over seeds) where dataset, eps, "
             "architecture and method match; PGD-k rows are filled only when our PGD used k steps. "
             "Δ = ours − published, in points. –: no run of this study in that setting."]
    if not t.empty and (t["our_seeds"] == 0).all():
        notes.append("No run of this study matches a published setting (the published rows are CIFAR-10 "
                     "ResNet-18 / PreActResNet-18 at 8/255 and an MNIST small CNN at 0.3; "
                     "config/paper-cifar10.yaml trains the matching ResNet-18 runs).")
    return df, notes
