"""Result tables from the files the other stages write (run.json, evaluation JSON, audit.json).

`build_tables(runs, evals, audits)` returns named pandas DataFrames; `write_tables` writes each as CSV
(every number, machine-readable), Markdown and LaTeX (formatted for reading) and HTML (for the
Snakemake report). Tables:

    robustness_<dataset>  accuracy (%) under each attack, mean +- std over training seeds, per
                          (model, eps, method) for the selected (`best`) and the `last` model, with
                          the rate of catastrophic overfitting across seeds
    reference             published numbers (DESIGN.md section 6, shipped with gmr.cards) beside ours
                          where the setting matches (dataset, eps, architecture, method), with deltas
    cost                  seconds per epoch, total training time, passes per sample, images per
                          second, peak memory, training time relative to PGD-AT, device
    masking               the masking audit (`gmr diagnose`) per method: verdicts across seeds and the
                          key probe values

A run has *catastrophic overfitting* when its training log shows it (the criterion of
`gmr.diagnostics.catastrophic_overfitting_epoch`: validation PGD accuracy falls far below an earlier best
while FGSM accuracy holds; Wong et al. 2020).
"""
from __future__ import annotations

import html
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import pandas as pd

from ..io import read_json, write_text

# Evaluation attacks in table order, with their column titles.
ATTACK_TITLES = {"clean": "Clean", "fgsm": "FGSM", "rfgsm": "R-FGSM", "ifgsm": "I-FGSM", "pgd": "PGD",
                 "pgd_cw": "PGD-CW", "autoattack": "AutoAttack"}
# Methods in table order, with their display names (unknown methods follow, by name).
METHOD_TITLES = {"standard": "Standard", "fgsm": "FGSM-AT", "rfgsm": "R-FGSM-AT", "fgsm_rs": "FGSM-RS",
                 "n_fgsm": "N-FGSM", "gradalign": "GradAlign", "sat_r1": "SAT-R1", "sat_r3": "SAT-R3",
                 "gmr": "GMR", "pgd": "PGD-AT"}
CHECKPOINT_TITLES = {"best": "selected", "last": "last"}
KEYS = ["dataset", "model", "eps", "method"]


class TableInputError(ValueError):
    """A result file is missing, unreadable or not of the expected kind."""


# --------------------------------------------------------------------------------------------------
# Loading

def _read(path: str | Path, kind: str) -> dict:
    path = Path(path)
    try:
        data = read_json(path)
    except FileNotFoundError:
        raise TableInputError(f"{kind} file {path} does not exist") from None
    except ValueError as err:
        raise TableInputError(f"{kind} file {path} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise TableInputError(f"{path} is not a {kind} record")
    return data


def _key(path: str | Path) -> str:
    return str(Path(path).resolve())


def method_title(method: str, options: dict | None = None) -> str:
    title = METHOD_TITLES.get(method, method)
    if method == "pgd" and options and options.get("steps"):
        title = f"PGD-{options['steps']} AT"
    return title


def load_runs(run_dirs: Iterable[str | Path]) -> pd.DataFrame:
    """One row per run directory: its setting, selection, catastrophic overfitting and cost ledger."""
    from ..runs import catastrophic_overfitting_epoch, read_train_log

    rows = []
    for d in run_dirs:
        d = Path(d)
        if d.name == "run.json":
            d = d.parent
        meta = _read(d / "run.json", "run")
        if "config" not in meta or "cost" not in meta:
            raise TableInputError(f"{d}/run.json is not a finished `gmr train` run")
        cfg, cost = meta["config"], meta["cost"]
        log = d / "train_log.csv"
        co_epoch = catastrophic_overfitting_epoch(read_train_log(log)) if log.exists() else None
        rows.append({
            "run": _key(d), "dataset": cfg["dataset"], "model": cfg["model"], "eps": float(meta["eps"]),
            "method": cfg["method"], "method_title": method_title(cfg["method"], meta.get("method_options")),
            "seed": cfg["seed"], "epochs": cfg["epochs"], "n_train": meta["data"]["n_train"],
            "best_epoch": meta["selection"]["best_epoch"], "last_epoch": meta["selection"]["last_epoch"],
            "co_epoch": co_epoch, "co": co_epoch is not None,
            **{k: cost.get(k) for k in ("train_seconds", "seconds_per_epoch", "passes_per_sample",
                                        "declared_passes_per_sample", "images_per_second",
                                        "peak_memory_mb", "device", "device_name", "threads")},
        })
    return pd.DataFrame(rows)


def load_evals(files: Iterable[str | Path]) -> pd.DataFrame:
    """One row per (evaluation file, attack): run, checkpoint, accuracy and number of test points.

    Several files of one (run, checkpoint) are merged by attack; when two hold the same attack, the one
    on more test points wins (e.g. PGD on 1000 points over PGD on the AutoAttack subset)."""
    rows = []
    for f in files:
        rec = _read(f, "evaluation")
        if "attacks" not in rec or "checkpoint" not in rec:
            raise TableInputError(f"{f} is not a `gmr evaluate` result (no attacks/checkpoint)")
        for attack, res in rec["attacks"].items():
            if not isinstance(res, dict) or res.get("accuracy") is None:
                continue
            rows.append({"run": _key(rec["run"]), "checkpoint": rec["checkpoint"], "attack": attack,
                         "accuracy": float(res["accuracy"]),
                         "n_examples": int(res.get("n_examples", rec.get("n_examples", 0))),
                         "dataset": rec.get("dataset"), "model": rec.get("model"),
                         "method": rec.get("method"), "seed": rec.get("train_seed"),
                         # the record's budget: per-attack entries may carry their own (clean: 0)
                         "eps": float(rec["eps"] if rec.get("eps") is not None else res["eps"]),
                         "file": str(f)})
    df = pd.DataFrame(rows, columns=["run", "checkpoint", "attack", "accuracy", "n_examples", "dataset",
                                     "model", "method", "seed", "eps", "file"])
    if df.empty:
        return df
    df = df.sort_values("n_examples", ascending=False, kind="stable")
    return df.drop_duplicates(["run", "checkpoint", "attack"]).sort_index()


def load_audits(files: Iterable[str | Path]) -> pd.DataFrame:
    rows = []
    for f in files:
        f = Path(f)
        if f.is_dir():
            f = f / "audit.json"
        audit = _read(f, "audit")
        if "verdict" not in audit or "checks" not in audit:
            raise TableInputError(f"{f} is not a `gmr diagnose` audit (no verdict/checks)")
        summary = audit.get("summary", {})
        failed = [c["name"] for c in audit["checks"] if c.get("passed") is False]
        rows.append({"run": _key(audit["run"]), "checkpoint": audit["checkpoint"],
                     "dataset": audit["dataset"], "model": audit["model"], "eps": float(audit["eps"]),
                     "method": audit["method"], "seed": audit.get("train_seed"),
                     "masking": audit["verdict"]["masking"], "failed": failed,
                     **{k: summary.get(k) for k in AUDIT_VALUES}})
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------------------------------
# Tables

def _method_order(methods: Iterable[str]) -> list[str]:
    known = list(METHOD_TITLES)
    return sorted(set(methods), key=lambda m: (known.index(m) if m in known else len(known), m))


def _sort(df: pd.DataFrame, extra: Sequence[str] = ()) -> pd.DataFrame:
    if df.empty:
        return df
    order = {m: i for i, m in enumerate(_method_order(df["method"]))}
    by = [c for c in ("dataset", "model", "eps") if c in df] + ["_m"] + list(extra)
    return df.assign(_m=df["method"].map(order)).sort_values(by, kind="stable").drop(columns="_m") \
             .reset_index(drop=True)


def _titles(runs: pd.DataFrame) -> dict[tuple, str]:
    """(dataset, model, eps, method) -> display name, e.g. "PGD-10 AT"."""
    if runs.empty:
        return {}
    return {tuple(k): t for k, t in runs.groupby(KEYS)["method_title"].first().items()}


def _link_runs(ev: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    """Point each evaluation at its run directory. A record names its run as given to `gmr evaluate`
    (a relative path means: relative to where that ran); when that path is not one of `runs`, the run
    with the same dataset, model, method, seed and eps is taken."""
    if ev.empty or runs.empty:
        return ev
    known = set(runs["run"])
    by_meta = {(r.dataset, r.model, r.method, r.seed, round(r.eps, 6)): r.run for r in runs.itertuples()}
    ev["run"] = [run if run in known else by_meta.get((d, m, me, s, round(e, 6)), run)
                 for run, d, m, me, s, e in zip(ev["run"], ev["dataset"], ev["model"], ev["method"],
                                                ev["seed"], ev["eps"])]
    return ev


def robustness(runs: pd.DataFrame, evals: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Per dataset: one row per (model, eps, method, checkpoint); for each attack the mean and std
    over seeds of the accuracy and the number of test points; the catastrophic-overfitting rate."""
    if evals.empty:
        return {}
    ev = _link_runs(evals.copy(), runs)
    if not runs.empty:
        ev = ev.join(runs.set_index("run")[["co"]], on="run")
    else:
        ev["co"] = float("nan")
    group = KEYS + ["checkpoint"]
    attacks = [a for a in ATTACK_TITLES if a in set(ev["attack"])] + \
              sorted(set(ev["attack"]) - set(ATTACK_TITLES))
    titles = _titles(runs)
    out = {}
    for dataset, part in ev.groupby("dataset"):
        rows = []
        for key, g in part.groupby(group, sort=False):
            row = dict(zip(group, key))
            row["method_title"] = titles.get(tuple(key[:4]), method_title(row["method"]))
            seeds = g.drop_duplicates("run")
            row["n_seeds"] = len(seeds)
            for a in attacks:
                acc = g.loc[g["attack"] == a, "accuracy"]
                row[f"{a}_mean"] = acc.mean() if len(acc) else math.nan
                row[f"{a}_std"] = acc.std(ddof=1) if len(acc) > 1 else (0.0 if len(acc) else math.nan)
                n = g.loc[g["attack"] == a, "n_examples"]
                row[f"{a}_n"] = int(n.min()) if len(n) else 0
            co = seeds["co"].dropna()
            row["co_runs"] = int(co.sum()) if len(co) else None
            row["co_rate"] = float(co.mean()) if len(co) else math.nan
            rows.append(row)
        table = pd.DataFrame(rows)
        table["_c"] = table["checkpoint"].map({"best": 0, "last": 1})
        out[f"robustness_{dataset}"] = _sort(table, ["_c"]).drop(columns="_c")
    return out


def cost(runs: pd.DataFrame) -> pd.DataFrame:
    """Training cost per (dataset, model, eps, method), means over seeds, with the ratio of the total
    training time to PGD-AT's in the same setting."""
    cols = KEYS + ["method_title", "n_runs", "epochs", "n_train", "seconds_per_epoch", "seconds_per_epoch_std",
                   "train_seconds", "passes_per_sample", "declared_passes_per_sample", "images_per_second",
                   "peak_memory_mb", "time_vs_pgd_at", "device"]
    if runs.empty:
        return pd.DataFrame(columns=cols)
    rows = []
    for key, g in runs.groupby(KEYS, sort=False):
        names = sorted({f"{r.device_name or r.device} ({r.device}, {r.threads} threads)"
                        if r.device == "cpu" else f"{r.device_name} ({r.device})" for r in g.itertuples()})
        rows.append({**dict(zip(KEYS, key)), "method_title": g["method_title"].iloc[0], "n_runs": len(g),
                     "epochs": int(g["epochs"].iloc[0]), "n_train": int(g["n_train"].iloc[0]),
                     "seconds_per_epoch": g["seconds_per_epoch"].mean(),
                     "seconds_per_epoch_std": g["seconds_per_epoch"].std(ddof=1) if len(g) > 1 else 0.0,
                     "train_seconds": g["train_seconds"].mean(),
                     "passes_per_sample": g["passes_per_sample"].mean(),
                     "declared_passes_per_sample": g["declared_passes_per_sample"].mean(),
                     "images_per_second": g["images_per_second"].mean(),
                     "peak_memory_mb": g["peak_memory_mb"].max(), "device": "; ".join(names)})
    table = pd.DataFrame(rows)
    pgd = table[table["method"] == "pgd"].set_index(["dataset", "model", "eps"])["train_seconds"]
    table["time_vs_pgd_at"] = [
        r.train_seconds / pgd.loc[(r.dataset, r.model, r.eps)] if (r.dataset, r.model, r.eps) in pgd.index
        else math.nan for r in table.itertuples()]
    return _sort(table)[cols]


AUDIT_VALUES = ("clean_accuracy", "fgsm_accuracy", "pgd_accuracy", "fgsm_pgd_accuracy_gap",
                "gradient_alignment", "fgsm_rfgsm_logit_distance", "fgsm_loss_nonmonotone")


def masking(audits: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    """Audit verdicts per (dataset, model, eps, method, checkpoint), the failed checks with how many
    audits failed each, and the mean of the key probe values."""
    cols = KEYS + ["method_title", "checkpoint", "n_audits", "masking_yes", "masking_inconclusive",
                   "masking_no", "verdict", "failed_checks"] + list(AUDIT_VALUES)
    if audits.empty:
        return pd.DataFrame(columns=cols)
    titles = _titles(runs)
    rows = []
    for key, g in audits.groupby(KEYS + ["checkpoint"], sort=False):
        counts = g["masking"].value_counts()
        n = len(g)
        verdict = ", ".join(f"{v} {counts[v]}/{n}" for v in ("yes", "inconclusive", "no") if v in counts)
        failed = pd.Series([c for lst in g["failed"] for c in lst]).value_counts()
        rows.append({**dict(zip(KEYS + ["checkpoint"], key)),
                     "method_title": titles.get(tuple(key[:4]), method_title(key[3])), "n_audits": n,
                     **{f"masking_{v}": int(counts.get(v, 0)) for v in ("yes", "inconclusive", "no")},
                     "verdict": verdict,
                     "failed_checks": "; ".join(f"{c} ({k}/{n})" for c, k in failed.items()) or "none",
                     **{k: pd.to_numeric(g[k], errors="coerce").mean() for k in AUDIT_VALUES}})
    return _sort(pd.DataFrame(rows))[cols]


# --------------------------------------------------------------------------------------------------
# Reference numbers (DESIGN.md section 6)

ARCH_ALIASES = {"resnet-18": "resnet18", "resnet18": "resnet18", "preactresnet-18": "preact_resnet18",
                "preact_resnet18": "preact_resnet18", "wrn-28-10": "wrn_28_10", "wideresnet-28-10": "wrn_28_10",
                "wrn_28_10": "wrn_28_10"}
# Published column -> (title, our attack, the PGD step count our evaluation must have used; None: any).
REFERENCE_COLUMNS = {"clean": ("clean", "clean", None), "fgsm": ("FGSM", "fgsm", None),
                     "pgd": ("PGD (steps not stated)", "pgd", None), "pgd7": ("PGD-7", "pgd", 7),
                     "pgd20": ("PGD-20", "pgd", 20), "pgd500": ("PGD-500", "pgd", 500),
                     "autoattack": ("AutoAttack", "autoattack", None)}


def reference(runs: pd.DataFrame, evals: pd.DataFrame, published: pd.DataFrame | None = None,
              checkpoint: str = "best") -> pd.DataFrame:
    """One row per published number (source, setting, method, metric) with ours beside it: the
    selected model, mean over seeds, where dataset, eps (to 1e-4), architecture and method match and
    our evaluation measured the same metric (PGD-k only when our PGD used k steps). Delta = ours -
    published, in points; NaN where we have no matching number."""
    if published is None:
        published = reference_numbers()
    ours = _ours_by_setting(evals, runs, checkpoint)
    rows = []
    for ref in published.to_dict("records"):
        arch = ARCH_ALIASES.get(str(ref["model"]).lower(), ref["model"])
        match = [o for o in ours if o["dataset"] == ref["dataset"] and abs(o["eps"] - ref["eps"]) < 1e-4
                 and o["model"] == arch and o["method"] == ref["method"]]
        for col, (title, attack, steps) in REFERENCE_COLUMNS.items():
            pub = ref.get(col)
            if pub is None or (isinstance(pub, float) and math.isnan(pub)):
                continue
            mine, seeds = math.nan, 0
            if match and attack in match[0]["acc"] and (steps is None or match[0]["steps"].get(attack) == steps):
                mine, seeds = 100 * match[0]["acc"][attack], match[0]["n_seeds"]
            rows.append({"dataset": ref["dataset"], "eps": ref["eps"], "model": ref["model"],
                         "method": ref["method"], "method_name": ref.get("method_name", ref["method"]),
                         "metric": title, "published": float(pub), "ours": mine,
                         "delta": mine - float(pub) if not math.isnan(mine) else math.nan,
                         "our_seeds": seeds, "source": ref.get("source", "")})
    return pd.DataFrame(rows, columns=["dataset", "eps", "model", "method", "method_name", "metric",
                                       "published", "ours", "delta", "our_seeds", "source"])


def _ours_by_setting(evals: pd.DataFrame, runs: pd.DataFrame, checkpoint: str) -> list[dict]:
    if evals.empty:
        return []
    ev = evals[evals["checkpoint"] == checkpoint]
    steps = _attack_steps(ev)
    out = []
    for key, g in ev.groupby(KEYS):
        acc = g.groupby("attack")["accuracy"].mean().to_dict()
        out.append({**dict(zip(KEYS, key)), "acc": acc, "n_seeds": g["run"].nunique(),
                    "steps": {a: steps.get((key, a)) for a in acc}})
    return out


def _attack_steps(ev: pd.DataFrame) -> dict:
    """((dataset, model, eps, method), attack) -> PGD step count used by the evaluation files."""
    out = {}
    for f, g in ev.groupby("file"):
        rec = read_json(f)
        for attack, res in rec["attacks"].items():
            params = res.get("params") if isinstance(res, dict) else None
            if params and "steps" in params:
                out[(tuple(g.iloc[0][KEYS]), attack)] = int(params["steps"])
    return out


def reference_numbers() -> pd.DataFrame:
    """The published numbers shipped with the evaluation module (gmr.cards), one row per method."""
    from . import cards

    return pd.DataFrame(cards.reference_rows())


# --------------------------------------------------------------------------------------------------
# Formatting and files

@dataclass
class Formatted:
    title: str
    frame: pd.DataFrame           # display columns, strings
    notes: list[str]


def _pct(mean, std=None, n_seeds=1) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "–"
    text = f"{100 * mean:.1f}"
    if n_seeds and n_seeds > 1 and std is not None and not math.isnan(std):
        text += f" ± {100 * std:.1f}"
    return text


def _num(v, fmt="{:.3g}") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return fmt.format(v)


def _eps(eps: float, dataset: str) -> str:
    """0.3 -> "0.3"; budgets of 3-channel datasets as k/255 (RobustBench's way)."""
    k = float(eps) * 255
    if dataset not in ("mnist", "fashion_mnist") and 0 < eps < 1 and abs(k - round(k)) < 1e-6:
        return f"{round(k)}/255"
    return f"{float(eps):g}"


def _drop_constant(df: pd.DataFrame, cols: Sequence[str]) -> tuple[pd.DataFrame, list[str]]:
    """Drop setting columns with one value; return the frame and 'column: value' notes."""
    notes = []
    for c in cols:
        if c in df and df[c].nunique() <= 1 and len(df):
            notes.append(f"{c} {df[c].iloc[0]}")
            df = df.drop(columns=c)
    return df, notes


def format_robustness(name: str, t: pd.DataFrame) -> Formatted:
    attacks = [a for a in ATTACK_TITLES if f"{a}_mean" in t] + \
              [c[:-5] for c in t.columns if c.endswith("_mean") and c[:-5] not in ATTACK_TITLES]
    df = pd.DataFrame({"model": t["model"], "eps": [_eps(e, d) for e, d in zip(t["eps"], t["dataset"])],
                       "method": t["method_title"], "checkpoint": t["checkpoint"].map(CHECKPOINT_TITLES)})
    for a in attacks:
        df[ATTACK_TITLES.get(a, a)] = [_pct(m, s, n) for m, s, n in zip(t[f"{a}_mean"], t[f"{a}_std"], t["n_seeds"])]
    df["CO rate"] = [f"{r}/{n}" if r is not None and not (isinstance(r, float) and math.isnan(r)) else "–"
                     for r, n in zip(t["co_runs"], t["n_seeds"])]
    df["seeds"] = t["n_seeds"].astype(int).astype(str)
    df, setting = _drop_constant(df, ["model", "eps"])
    dataset = name.split("_", 1)[1]
    sizes = sorted({(ATTACK_TITLES.get(a, a), int(n)) for a in attacks for n in t[f"{a}_n"] if n})
    by_n: dict[int, list[str]] = {}
    for title, n in sizes:
        by_n.setdefault(n, []).append(title)
    notes = [f"Test accuracy (%) on {dataset}" + (f" ({', '.join(setting)})" if setting else "") +
             ", mean ± std over training seeds; selected = the epoch with the best validation I-FGSM-3 "
             "accuracy (the paper's model selection), last = the final epoch.",
             "Test points: " + "; ".join(f"{', '.join(v)} on the first {n}" for n, v in sorted(by_n.items())) + ".",
             "CO rate: runs whose training log shows catastrophic overfitting (validation PGD accuracy "
             "fell far below an earlier best while FGSM accuracy held; criterion of "
             "gmr.diagnostics.catastrophic_overfitting_epoch, after Wong et al. 2020) / seeds."]
    return Formatted(f"Robustness on {dataset}", df, notes)


def format_cost(t: pd.DataFrame) -> Formatted:
    df = pd.DataFrame({
        "dataset": t["dataset"], "model": t["model"], "eps": [_eps(e, d) for e, d in zip(t["eps"], t["dataset"])],
        "method": t["method_title"], "runs": t["n_runs"].astype(str),
        "s / epoch": [_num(m, "{:.1f}") + (f" ± {s:.1f}" if n > 1 else "")
                      for m, s, n in zip(t["seconds_per_epoch"], t["seconds_per_epoch_std"], t["n_runs"])],
        "training s": t["train_seconds"].map(lambda v: _num(v, "{:.0f}")),
        "passes / sample": t["passes_per_sample"].map(lambda v: _num(v, "{:.2f}")),
        "images / s": t["images_per_second"].map(lambda v: _num(v, "{:.0f}")),
        "peak MB": t["peak_memory_mb"].map(lambda v: _num(v, "{:.0f}")),
        "time / PGD-AT": t["time_vs_pgd_at"].map(lambda v: _num(v, "{:.2f}")),
        "device": t["device"]})
    df, setting = _drop_constant(df, ["dataset", "model", "eps", "device"])
    notes = ["Training cost, mean over seeds; training time excludes the per-epoch validation probes. "
             "passes / sample: forward+backward passes counted on the model per training example "
             "(FGSM-AT 2, GMR 4, PGD-k AT k+1). time / PGD-AT: total training time relative to PGD-AT "
             "in the same setting."]
    if setting:
        notes.append("Setting: " + "; ".join(setting) + ".")
    return Formatted("Training cost", df, notes)


def format_masking(t: pd.DataFrame) -> Formatted:
    df = pd.DataFrame({
        "dataset": t["dataset"], "model": t["model"], "eps": [_eps(e, d) for e, d in zip(t["eps"], t["dataset"])],
        "method": t["method_title"], "checkpoint": t["checkpoint"].map(CHECKPOINT_TITLES),
        "masking": t["verdict"],
        "FGSM − PGD": t["fgsm_pgd_accuracy_gap"].map(lambda v: _num(v, "{:.2f}")),
        "grad. alignment": t["gradient_alignment"].map(lambda v: _num(v, "{:.2f}")),
        "FGSM/R-FGSM logit dist.": t["fgsm_rfgsm_logit_distance"].map(lambda v: _num(v, "{:.3g}")),
        "failed checks": t["failed_checks"]})
    df, setting = _drop_constant(df, ["dataset", "model", "eps", "checkpoint"])
    notes = ["Gradient-masking audit (`gmr diagnose`, checks and thresholds in gmr/diagnostics.py): "
             "verdict counts over the audited seeds, the failed checks with how many audits failed them, "
             "and the mean of key probes (FGSM − PGD accuracy gap, gradient alignment "
             "E cos(grad(x), grad(x + eta)), mean squared FGSM vs R-FGSM logit distance)."]
    if setting:
        notes.append("Setting: " + "; ".join(setting) + ".")
    if t.empty:
        notes.append("No audits were run (diagnose disabled in the config).")
    return Formatted("Gradient-masking audit", df, notes)


def format_reference(t: pd.DataFrame) -> Formatted:
    df = pd.DataFrame({"dataset": t["dataset"], "eps": [_eps(e, d) for e, d in zip(t["eps"], t["dataset"])],
                       "model": t["model"], "method": t["method_name"], "metric": t["metric"],
                       "published": t["published"].map(lambda v: _num(v, "{:.2f}")),
                       "ours": t["ours"].map(lambda v: _num(v, "{:.2f}")),
                       "Δ": t["delta"].map(lambda v: _num(v, "{:+.2f}")),
                       "our seeds": t["our_seeds"].astype(str), "source": t["source"]})
    notes = ["Published accuracies (%) beside ours (selected model, mean over seeds) where dataset, eps, "
             "architecture and method match; PGD-k rows are filled only when our PGD used k steps. "
             "Δ = ours − published, in points. –: no run of this study in that setting."]
    if not t.empty and (t["our_seeds"] == 0).all():
        notes.append("No run of this study matches a published setting (the published rows are CIFAR-10 "
                     "ResNet-18 / PreActResNet-18 at 8/255 and an MNIST small CNN at 0.3; "
                     "config/paper-cifar10.yaml trains the matching ResNet-18 runs).")
    return Formatted("Published reference numbers", df, notes)


def to_markdown(f: Formatted) -> str:
    return f.frame.to_markdown(index=False, disable_numparse=True) + "\n\n" + "\n".join(f"*{n}*" for n in f.notes) + "\n"


_LATEX_ESCAPES = {"&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{", "}": r"\}",
                  "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "\\": r"\textbackslash{}",
                  "±": r"$\pm$", "−": r"$-$", "–": "--", "Δ": r"$\Delta$"}


def _tex(text) -> str:
    return "".join(_LATEX_ESCAPES.get(ch, ch) for ch in str(text))


def to_latex(f: Formatted) -> str:
    cols = list(f.frame.columns)
    lines = [r"% " + _tex(f.title) + " (written by `gmr tables`; needs \\usepackage{booktabs})",
             r"\begin{table}[t]", r"\centering", r"\small",
             r"\begin{tabular}{" + "l" * min(len(cols), 1) + "r" * (len(cols) - 1) + "}", r"\toprule",
             " & ".join(_tex(c) for c in cols) + r" \\", r"\midrule"]
    for row in f.frame.itertuples(index=False):
        lines.append(" & ".join(_tex(v) for v in row) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", r"\caption{" + _tex(f.title + ". " + " ".join(f.notes)) + "}",
              r"\end{table}"]
    return "\n".join(lines) + "\n"


def to_html(f: Formatted) -> str:
    table = f.frame.to_html(index=False, border=0, classes="gmr", escape=True)
    notes = "".join(f"<p>{html.escape(n)}</p>" for n in f.notes)
    return ("<!DOCTYPE html><html><head><meta charset='utf-8'><title>" + html.escape(f.title) +
            "</title><style>body{font-family:sans-serif;margin:1em}table.gmr{border-collapse:collapse}"
            "table.gmr th,table.gmr td{padding:3px 8px;border-bottom:1px solid #ccc;text-align:right}"
            "table.gmr td:first-child,table.gmr th:first-child{text-align:left}p{color:#444;max-width:60em}"
            "</style></head><body><h3>" + html.escape(f.title) + "</h3>" + table + notes + "</body></html>\n")


def build_tables(run_dirs: Sequence[str | Path], eval_files: Sequence[str | Path],
                 audit_files: Sequence[str | Path] = ()) -> dict[str, tuple[pd.DataFrame, Formatted]]:
    """name -> (numbers, formatted table) for every table of this module."""
    runs, evals, audits = load_runs(run_dirs), load_evals(eval_files), load_audits(audit_files)
    out = {}
    for name, t in robustness(runs, evals).items():
        out[name] = (t, format_robustness(name, t))
    try:
        ref = reference(runs, evals)
    except ImportError as err:
        warnings.warn(f"no published reference numbers ({err}); reference table left empty")
        ref = reference(runs, evals, published=pd.DataFrame(columns=["dataset", "eps", "model", "method"]))
    out["reference"] = (ref, format_reference(ref))
    c = cost(runs)
    out["cost"] = (c, format_cost(c))
    m = masking(audits, runs)
    out["masking"] = (m, format_masking(m))
    return out


def write_tables(tables: dict[str, tuple[pd.DataFrame, Formatted]], out: str | Path) -> list[Path]:
    """Write NAME.csv (numbers), NAME.md, NAME.tex and NAME.html (formatted) for each table."""
    out = Path(out)
    written = []
    for name, (numbers, formatted) in tables.items():
        for ext, text in (("csv", numbers.to_csv(index=False, float_format="%.6g")),
                          ("md", to_markdown(formatted)), ("tex", to_latex(formatted)),
                          ("html", to_html(formatted))):
            path = out / f"{name}.{ext}"
            write_text(path, text)
            written.append(path)
    return written
