"""Paired comparisons of two training methods on the same test points: the `comparisons` table.

Two separate intervals can overlap while the paired results on the same points decide clearly, because
most points are answered alike by both models and only the points one model gets right and the other
wrong carry the difference (DESIGN.md section 9). So a method A and a baseline B are compared on the
per-example arrays of their evaluations (`gmr.stats.compare_paired`: difference with Newcombe's paired
interval, exact McNemar test):

- in each setting (dataset, model, eps) and checkpoint, and under each attack of COMPARISON_ATTACKS;
- seed s of A is paired with seed s of B, when both have per-example arrays on the same test points
  (same n and the same `test_points` of their records); the paired arrays of every seed present in
  both are concatenated, so n counts seeds x points.

Pooling seeds this way makes the test a statement about these trained models on these points; the
seed-to-seed spread of training is in the robustness tables' intervals, not here. The pairs come from
`gmr tables --comparisons A:B1,B2 ...` (the workflow: `report: comparisons:` of the config); by default
GMR against FGSM-AT, R-FGSM-AT and PGD-AT, wherever both were evaluated.

RobustBench models (evaluations with a `zoo` object, `gmr evaluate --zoo`) are baselines of every method
A of the pairs: a zoo model has one set of weights and its own architecture, so its per-example results
are paired with those of each seed of A, in each setting and checkpoint of A, on the same test points.
"""
from __future__ import annotations

import math
from typing import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from ..data import dataset_info, eps_text
from ..methods import method_rank, method_title
from ..models import model_title
from ..stats import A_MORE_ROBUST, B_MORE_ROBUST, accuracy_interval, aggregate_seeds, compare_paired
from .render import drop_constant, num, pct_interval, setting_notes

COMPARISON_ATTACKS = {"pgd": "PGD", "autoattack": "AutoAttack"}
DEFAULT_PAIRS = (("gmr", "fgsm"), ("gmr", "rfgsm"), ("gmr", "pgd"))
SETTING = ["dataset", "model", "eps", "checkpoint", "attack"]
COLUMNS = SETTING + ["method_a", "method_b", "title_a", "title_b", "seeds", "n_seeds", "n", "accuracy_a",
                     "accuracy_a_low", "accuracy_a_high", "accuracy_b", "accuracy_b_low", "accuracy_b_high",
                     "difference", "difference_low", "difference_high", "confidence", "both",
                     "only_a", "only_b", "p_value", "reading", "points_needed"]
CHECKPOINTS = {"best": "selected", "last": "last"}
ZOO_MARK = " (RobustBench)"   # after a RobustBench model's name in every table


def parse_pairs(specs: Iterable[str]) -> list[tuple[str, str]]:
    """(method, baseline) pairs from 'A:B1,B2' texts, in the order given, each pair once. ValueError
    with one line for a malformed text or a method compared with itself."""
    pairs: list[tuple[str, str]] = []
    for spec in specs:
        a, sep, rest = str(spec).partition(":")
        baselines = [b.strip() for b in rest.split(",") if b.strip()]
        if not sep or not a.strip() or not baselines:
            raise ValueError(f"--comparisons takes METHOD:BASELINE[,BASELINE...], e.g. gmr:fgsm,pgd; got {spec!r}")
        for b in baselines:
            if b == a.strip():
                raise ValueError(f"--comparisons {spec!r} compares {b} with itself")
            if (a.strip(), b) not in pairs:
                pairs.append((a.strip(), b))
    return pairs


def pair_specs(mapping: Mapping[str, Sequence[str]] | None) -> list[str]:
    """The 'A:B1,B2' texts of a mapping method -> baselines (the config's `report: comparisons:`)."""
    return [f"{a}:{','.join(bs)}" for a, bs in (mapping or {}).items()]


def zoo_title(name: str) -> str:
    """How the tables name a RobustBench model beside our methods."""
    return f"{name}{ZOO_MARK}"


def _zoo_baselines(evals: pd.DataFrame, pairs: Sequence[tuple[str, str]]) -> tuple[pd.DataFrame, list]:
    """The evaluations with each zoo row copied into every (model, checkpoint, seed) of ours evaluated in
    its dataset, eps and attack (so it pairs like a baseline of that setting), and the pairs with every
    method A of `pairs` against every zoo model added."""
    if evals.empty or "zoo" not in evals or not evals["zoo"].any():
        return evals, list(pairs)
    zoo, ours = evals[evals["zoo"].astype(bool)], evals[~evals["zoo"].astype(bool)]
    targets = ours[["dataset", "eps", "attack", "model", "checkpoint", "seed"]].drop_duplicates()
    copies = zoo.drop(columns=["model", "checkpoint", "seed"]).merge(targets, on=["dataset", "eps", "attack"])
    names = list(dict.fromkeys(zoo["method"]))
    added = [(a, z) for a in dict.fromkeys(a for a, _ in pairs) for z in names if (a, z) not in pairs]
    return pd.concat([ours, copies[ours.columns]], ignore_index=True), list(pairs) + added


def _by_seed(rows: pd.DataFrame) -> dict:
    """seed -> the evaluation row of that training seed (the first, should a seed appear twice)."""
    return {r["seed"]: r for _, r in reversed(list(rows.iterrows()))}


def _accuracy(arrays: list[np.ndarray], confidence: float) -> tuple[float, float, float]:
    """Accuracy of one side over its paired seeds with the interval the robustness tables use (seeds on
    the same points: gmr.stats.aggregate_seeds; otherwise the Wilson interval of the pooled points)."""
    if len({len(a) for a in arrays}) == 1:
        est = aggregate_seeds(arrays, confidence)
        return est.value, est.low, est.high
    ok = np.concatenate(arrays)
    return (float(ok.mean()), *accuracy_interval(int(ok.sum()), len(ok), confidence))


def _paired(rows_a: pd.DataFrame, rows_b: pd.DataFrame, names: tuple[str, str]
            ) -> tuple[list, list, list, list[str]]:
    """Seeds paired, A's and B's arrays of those seeds, and why any seed of one could not be paired
    (`names`: the titles of A and B, for those reasons)."""
    a_seeds, b_seeds = _by_seed(rows_a), _by_seed(rows_b)
    seeds, arrays_a, arrays_b, skipped = [], [], [], []
    for seed in sorted(set(a_seeds) | set(b_seeds), key=str):
        ra, rb = a_seeds.get(seed), b_seeds.get(seed)
        if ra is None or rb is None:
            skipped.append(f"seed {seed}: only {names[0] if rb is None else names[1]} was evaluated")
        elif ra["correct"] is None or rb["correct"] is None:
            skipped.append(f"seed {seed}: no per-example file for {names[0] if ra['correct'] is None else names[1]}")
        elif ra["n_examples"] != rb["n_examples"] or ra["test_points"] != rb["test_points"]:
            skipped.append(f"seed {seed}: other test points (n = {ra['n_examples']} and {rb['n_examples']})")
        else:
            seeds.append(seed)
            arrays_a.append(ra["correct"])
            arrays_b.append(rb["correct"])
    return seeds, arrays_a, arrays_b, skipped


def _title(titles: Mapping[tuple, str], key: tuple, method: str) -> str:
    """The method's display title in the setting of `key` (dataset, model, eps, ...)."""
    return titles.get((*key[:3], method), method_title(method))


def _row(key: tuple, a: str, b: str, titles: Mapping, seeds: list, arr_a: list, arr_b: list,
         confidence: float) -> dict:
    """One comparison: the counts, the difference with its interval, the p-value and the reading."""
    c = compare_paired(np.concatenate(arr_a), np.concatenate(arr_b), confidence)
    setting = dict(zip(SETTING, key))
    title_a, title_b = _title(titles, key, a), _title(titles, key, b)
    needed = c.points_needed() if not c.decided else None
    acc_a, acc_b = _accuracy(arr_a, confidence), _accuracy(arr_b, confidence)
    return {**setting, "method_a": a, "method_b": b, "title_a": title_a, "title_b": title_b,
            "seeds": ", ".join(str(s) for s in seeds), "n_seeds": len(seeds), "n": c.n,
            **dict(zip(("accuracy_a", "accuracy_a_low", "accuracy_a_high"), acc_a)),
            **dict(zip(("accuracy_b", "accuracy_b_low", "accuracy_b_high"), acc_b)),
            "difference": c.difference.value, "difference_low": c.difference.low,
            "difference_high": c.difference.high, "confidence": confidence, "both": c.both,
            "only_a": c.only_a, "only_b": c.only_b, "p_value": c.p_value, "reading": c.reading,
            "points_needed": math.nan if needed is None else needed}


def compare_methods(evals: pd.DataFrame, titles: Mapping[tuple, str], pairs: Sequence[tuple[str, str]],
                    confidence: float = 0.95, explicit: bool = True) -> tuple[pd.DataFrame, list[str]]:
    """One row per (pair, setting, checkpoint, attack) where A and B have paired per-example arrays
    (module docstring); and notes on what could not be compared: seeds left unpaired, and, when the
    pairs were asked for (`explicit`), pairs with no evaluation of both. `evals`: the frame of
    `gmr.report.tables.load_evals`; `titles`: (dataset, model, eps, method) -> display title."""
    rows, notes, asked = [], [], set(pairs)
    evals = evals[evals["attack"].isin(list(COMPARISON_ATTACKS))] if not evals.empty else evals
    evals, pairs = _zoo_baselines(evals, pairs)
    if not evals.empty and "zoo" in evals:
        titles = {**titles, **{(r.dataset, r.model, r.eps, r.method): zoo_title(r.method)
                               for r in evals[evals["zoo"].astype(bool)].itertuples()}}
    for a, b in pairs:
        found = False
        sub = evals[evals["method"].isin([a, b])] if not evals.empty else evals
        for key, g in (sub.groupby(SETTING, sort=False) if not sub.empty else ()):
            rows_a, rows_b = g[g["method"] == a], g[g["method"] == b]
            if rows_a.empty or rows_b.empty:
                continue
            found = True
            names = (_title(titles, key, a), _title(titles, key, b))
            seeds, arr_a, arr_b, skipped = _paired(rows_a, rows_b, names)
            where = (f"{names[0]} vs {names[1]} ({dataset_info(key[0]).title}, {model_title(key[1])}, eps "
                     f"{eps_text(key[2], key[0])}, {CHECKPOINTS.get(key[3], key[3])}, {COMPARISON_ATTACKS[key[4]]})")
            if skipped:
                notes.append(f"{where}: " + "; ".join(skipped) + ".")
            if seeds:
                rows.append(_row(key, a, b, titles, seeds, arr_a, arr_b, confidence))
        if explicit and not found and (a, b) in asked:
            notes.append(f"{a} vs {b}: no setting has evaluations of both under PGD or AutoAttack.")
    return _sorted(pd.DataFrame(rows, columns=COLUMNS)), notes


def _sorted(t: pd.DataFrame) -> pd.DataFrame:
    if t.empty:
        return t
    order = t.assign(_a=t["method_a"].map(method_rank), _b=t["method_b"].map(method_rank),
                     _c=t["checkpoint"].map({"best": 0, "last": 1}),
                     _k=t["attack"].map({k: i for i, k in enumerate(COMPARISON_ATTACKS)}))
    by = ["dataset", "model", "eps", "_a", "_b", "_c", "_k"]
    return order.sort_values(by, kind="stable").drop(columns=["_a", "_b", "_c", "_k"]).reset_index(drop=True)


def reading_text(r) -> str:
    """The reading of one comparison row in plain words, with the method titles."""
    if r.reading == A_MORE_ROBUST:
        return f"{r.title_a} more robust than {r.title_b}"
    if r.reading == B_MORE_ROBUST:
        return f"{r.title_b} more robust than {r.title_a}"
    text = f"no detectable difference at n = {r.n}"
    if math.isnan(r.points_needed):
        return text + " (as many points won by each: no n would decide it)"
    per_seed = f" ({math.ceil(r.points_needed / r.n_seeds):,} per seed)" if r.n_seeds > 1 else ""
    return text + f"; about {int(r.points_needed):,} points{per_seed} would decide it"


def format_comparisons(t: pd.DataFrame, skipped: Sequence[str] = ()) -> tuple[pd.DataFrame, list[str]]:
    """Display columns (percent, the difference with its interval, p, the plain-words reading) and
    notes: how to read the table, and what could not be compared."""
    df = pd.DataFrame({
        "dataset": [dataset_info(d).title for d in t["dataset"]],
        "model": [model_title(m) for m in t["model"]],
        "eps": [eps_text(e, d) for e, d in zip(t["eps"], t["dataset"])],
        "checkpoint": t["checkpoint"].map(CHECKPOINTS), "attack": t["attack"].map(COMPARISON_ATTACKS),
        "A vs B": [f"{a} vs {b}" for a, b in zip(t["title_a"], t["title_b"])],
        "n (seeds)": [f"{n} ({k})" for n, k in zip(t["n"], t["n_seeds"])],
        "A": [pct_interval(*v) for v in zip(t["accuracy_a"], t["accuracy_a_low"], t["accuracy_a_high"])],
        "B": [pct_interval(*v) for v in zip(t["accuracy_b"], t["accuracy_b_low"], t["accuracy_b_high"])],
        "A − B (points)": [pct_interval(v, lo, hi, signed=True)
                           for v, lo, hi in zip(t["difference"], t["difference_low"], t["difference_high"])],
        "only A / only B": [f"{a} / {b}" for a, b in zip(t["only_a"], t["only_b"])],
        "p": t["p_value"].map(lambda v: num(v, "{:.2g}")),
        "reading": [reading_text(r) for r in t.itertuples()]})
    df, setting = drop_constant(df, ["dataset", "model", "eps"])
    confidence = float(t["confidence"].iloc[0]) if not t.empty else 0.95
    notes = [f"A and B: accuracy (%) of each on the paired points [{100 * confidence:.0f}% interval over its "
             "seeds] (seed s of A with seed s of B, on the same first n test points; n = seeds × points). "
             f"A − B: difference in points with its {100 * confidence:.0f}% paired interval (Newcombe). "
             "only A / only B: points one of the two gets right and the other wrong; p: exact McNemar test "
             f"on them. Reading: A (or B) more robust when p < {1 - confidence:.2g}; otherwise no "
             "detectable difference at this n, with about how many points would decide it if the observed "
             "rates held."]
    notes += setting_notes(setting)
    if not t.empty and t["title_b"].str.endswith(ZOO_MARK).any():
        notes.append("RobustBench rows: a model of the RobustBench zoo (its own architecture and training, "
                     "see the robustness table) on the same points, paired with each seed of A.")
    if t.empty:
        notes.append("No pair of methods was evaluated on the same points under PGD or AutoAttack.")
    notes += list(skipped)
    return df, notes
