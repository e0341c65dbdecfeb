"""Result tables, built only from the files the other stages write (run.json, evaluation JSON,
audit.json), and the registry that lists them.

A table is one function registered with its name, title and caption (the caption describes the table
in `snakemake --report`); it takes the loaded results and returns its numbers (the CSV), its display
columns and the notes on how to read them:

    @register_table("seeds", title="Seeds per method", caption="How many training runs each method has.")
    def seeds(results: Results) -> Parts:
        numbers = results.runs.groupby("method").size().rename("n_runs").reset_index()
        return numbers, numbers.astype(str), ["One row per method."]

`gmr tables` writes every registered table in every format of gmr/report/render.py, and the workflow
(workflow/rules/report.smk) takes its list of tables from here. A table registered with
`per_dataset=True` is built once per dataset of the evaluations, named `<name>_<dataset>`, and its
function takes the dataset as a second argument. The tables, in registration order:

    robustness_<dataset>  accuracy under each attack, mean over training seeds with its 95% interval
                          (gmr.stats.aggregate_seeds on the per-example results) and the std, per
                          (model, eps, method) for the selected (`best`) and the `last` model, with the
                          rate of catastrophic overfitting across seeds
    comparisons           paired comparisons of methods under PGD and AutoAttack on the same test
                          points (gmr/report/comparisons.py)
    reference             published numbers beside ours where the setting matches (gmr/report/reference.py)
    cost                  seconds per epoch, training time, passes per sample, images per second, peak
                          memory, training time relative to PGD-AT, device
    masking               the masking audits (`gmr diagnose`) per method: verdicts across seeds, failed
                          checks and key probe values

Evaluations and audits name the `run_id` of the run they measured; that id, and nothing else, links
them to the run directories given. Records of a RobustBench model (`gmr evaluate --zoo`, `gmr diagnose
--zoo`: a `zoo` object, no run directory) join the robustness, comparisons and masking tables as rows of
their own, named "<zoo name> (RobustBench)", with their architecture and the checkpoint "published". Methods appear with their registered titles, in registration order
(gmr/methods.py); models with their registered titles; budgets as their dataset writes them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import pandas as pd

from ..data import dataset_info, eps_text
from ..io import ensure_writable_dir, read_json
from ..methods import method_rank, method_title
from ..models import model_title
from ..registry import Registry
from ..runs import RunDir, RunError, run_warnings
from ..stats import CONFIDENCE, accuracy_interval, aggregate_seeds
from .comparisons import DEFAULT_PAIRS, compare_methods, format_comparisons, zoo_title
from .reference import compare, format_comparison
from .render import Formatted, Table, drop_constant, missing, num, pct_interval, setting_notes, write_tables

# Evaluation attacks in table order, with their column titles (other attacks follow, by name).
ATTACK_TITLES = {"clean": "Clean", "fgsm": "FGSM", "rfgsm": "R-FGSM", "ifgsm": "I-FGSM", "pgd": "PGD",
                 "pgd_cw": "PGD-CW", "autoattack": "AutoAttack"}
CHECKPOINT_TITLES = {"best": "selected", "last": "last", "ema": "weight avg., selected",
                     "ema_last": "weight avg., last", "published": "published"}
CHECKPOINT_ORDER = {"best": 0, "last": 1, "ema": 2, "ema_last": 3, "published": 4}
KEYS = ["dataset", "model", "eps", "method"]
AUDIT_VALUES = ("clean_accuracy", "fgsm_accuracy", "pgd_accuracy", "fgsm_pgd_accuracy_gap",
                "gradient_alignment", "fgsm_rfgsm_logit_distance", "fgsm_loss_nonmonotone")
EVAL_COLUMNS = ["run_id", "checkpoint", "attack", "accuracy", "n_correct", "ci_low", "ci_high", "interval_method",
                "n_examples", "test_points", "dataset", "model", "method", "seed", "eps", "steps", "file",
                "correct", "zoo", "published_clean", "published_robust"]
# The schema (gmr/schemas/<name>.schema.json) of each kind of record the report layer reads.
RECORD_SCHEMAS = {"evaluation": "eval", "audit": "audit"}
ONE_SEED = "wilson, 1 seed: no seed-to-seed spread"   # gmr.stats.aggregate_seeds says the same
BINOMIAL_ONLY = "binomial only"

Parts = tuple[pd.DataFrame, pd.DataFrame, list[str]]   # numbers, display columns, notes


class TableInputError(ValueError):
    """A result file given to the report layer (tables, figures) is missing, unreadable, not of the
    expected kind or not linked to a given run; or the output folder cannot be written. The CLI shows
    the message as one line; other errors are bugs and keep their traceback."""


# --------------------------------------------------------------------------------------------------
# Reading records

def read_record(path: str | Path, kind: str) -> dict:
    """A JSON record (evaluation or audit) that names the run it measured and follows its schema;
    TableInputError otherwise."""
    if not str(path).strip() or Path(path).is_dir():
        raise TableInputError(f"{kind} file {str(path)!r} is {'a folder' if str(path).strip() else 'empty'}; "
                              "give the record's JSON file")
    path = Path(path)
    try:
        data = read_json(path)
    except FileNotFoundError:
        raise TableInputError(f"{kind} file {path} does not exist") from None
    except (OSError, ValueError) as err:
        raise TableInputError(f"{kind} file {path} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise TableInputError(f"{path} is not a {kind} record")
    if not isinstance(data.get("run_id"), str) or not data["run_id"]:
        raise TableInputError(f"{kind} file {path} has no run_id (written before records named their run); "
                              "make it again with this version of gmr")
    check_schema(data, path, kind)
    return data


def check_schema(record: dict, path: str | Path, kind: str) -> None:
    """The record must follow its JSON schema (gmr/schemas/): an accuracy of 5.0, a missing interval or
    a foreign key is refused in one line naming the file and the field, rather than shown as 500%."""
    import jsonschema

    from ..schemas import validate

    name = RECORD_SCHEMAS[kind]
    try:
        validate(record, name)
    except jsonschema.ValidationError as err:
        field = "/".join(str(p) for p in err.absolute_path) or "the record"
        raise TableInputError(f"{kind} file {path} does not follow gmr/schemas/{name}.schema.json at {field}: "
                              f"{err.message[:200]}; write it again with this version of gmr") from None


def read_run(run: RunDir) -> dict:
    """run.json of a finished run (checked against its schema); TableInputError otherwise."""
    try:
        return run.record("--runs")
    except RunError as err:
        raise TableInputError(str(err)) from None


def writable_dir(out: str | Path) -> Path:
    """The output folder, created; TableInputError when it cannot be written."""
    try:
        return ensure_writable_dir(out)
    except ValueError as err:
        raise TableInputError(str(err)) from None


def _zoo(record: dict) -> bool:
    """Whether a record measured a RobustBench model (it carries the `zoo` object of gmr/zoo.py)."""
    return isinstance(record.get("zoo"), dict)


def check_link(record: dict, path: str | Path, run_ids: set[str] | None, kind: str) -> None:
    """The record must name one of the runs given (all pass when `run_ids` is None; a RobustBench model's
    record has no run directory); TableInputError naming the file otherwise."""
    if run_ids is not None and record["run_id"] not in run_ids and not _zoo(record):
        raise TableInputError(f"{kind} file {path} measured run {record['run_id']}, which is none of the runs "
                              "given; pass its run directory too")


@dataclass
class Results:
    """What the tables are built from: one row per run, per (evaluation, attack) and per audit, and the
    pairs of methods (method, baseline) the comparisons table compares (None: its default pairs)."""
    runs: pd.DataFrame
    evals: pd.DataFrame
    audits: pd.DataFrame
    pairs: Sequence[tuple[str, str]] | None = None

    @property
    def datasets(self) -> list[str]:
        return sorted(set(self.evals["dataset"])) if not self.evals.empty else []


def load_results(run_dirs: Sequence[str | Path], eval_files: Sequence[str | Path] = (),
                 audit_files: Sequence[str | Path] = (), pairs: Sequence[tuple[str, str]] | None = None
                 ) -> Results:
    """Load every file and link evaluations and audits to the runs by run_id (TableInputError when a
    record names no given run, or two run directories share an id). `pairs`: (method, baseline) pairs
    for the comparisons table (None: gmr against fgsm, rfgsm and pgd, where present)."""
    runs = load_runs(run_dirs)
    ids = set(runs["run_id"]) if not runs.empty else set()
    return Results(runs, load_evals(eval_files, ids), load_audits(audit_files, ids), pairs)


def load_runs(run_dirs: Iterable[str | Path]) -> pd.DataFrame:
    """One row per run directory: its id, setting, selection, catastrophic overfitting, cost ledger and
    warnings (gmr.runs.run_warnings). A directory given twice counts once; two directories with the same
    run_id (a copied run) are refused, since each would count as a seed."""
    rows, seen = [], {}
    for d in run_dirs:
        if not str(d).strip():
            raise TableInputError("--runs holds an empty path; give run directories")
        run = RunDir(Path(d).parent if Path(d).name == "run.json" else d)
        meta = read_run(run)
        if meta["run_id"] in seen:
            if seen[meta["run_id"]].resolve() == run.path.resolve():
                continue
            raise TableInputError(f"runs {seen[meta['run_id']]} and {run.path} have the same run_id "
                                  f"{meta['run_id']} (a copied run directory?); give each run once")
        seen[meta["run_id"]] = run.path
        cfg, cost, co_epoch = meta["config"], meta["cost"], run.co_epoch()
        rows.append({
            "run_id": meta["run_id"], "dataset": cfg["dataset"], "model": cfg["model"], "eps": float(meta["eps"]),
            "method": cfg["method"], "method_title": method_title(cfg["method"], meta.get("method_options")),
            "seed": cfg["seed"], "epochs": cfg["epochs"], "n_train": meta["data"]["n_train"],
            "best_epoch": meta["selection"]["best_epoch"], "last_epoch": meta["selection"]["last_epoch"],
            "co_epoch": co_epoch, "co": co_epoch is not None, "warnings": run_warnings(meta),
            "precision": cost.get("precision") or "fp32",   # runs recorded before the option: fp32
            **{k: cost.get(k) for k in ("train_seconds", "seconds_per_epoch", "passes_per_sample",
                                        "declared_passes_per_sample", "images_per_second",
                                        "peak_memory_mb", "device", "device_name", "threads")},
        })
    return pd.DataFrame(rows)


def per_example_arrays(f: str | Path, rec: dict) -> dict[str, np.ndarray] | None:
    """The per-example correctness arrays of an evaluation: the .npz its record names in
    `per_example_file`, beside the JSON. None when the record names none or the file is missing (the
    tables then fall back to binomial intervals and say so); TableInputError when it cannot be read."""
    name = rec.get("per_example_file")
    if not name:
        return None
    path = Path(f).parent / name
    if not path.is_file():
        return None
    try:
        with np.load(path) as data:
            return {k: data[k] for k in data.files}
    except (OSError, ValueError) as err:
        raise TableInputError(f"per-example file {path} of {f} cannot be read: {err}") from None


def _correct(f, arrays: dict | None, res: dict, n: int) -> np.ndarray | None:
    """One entry's per-example correctness (bool, one per test point); None without arrays."""
    if arrays is None:
        return None
    key = res.get("per_example")
    if key not in arrays:
        raise TableInputError(f"the per-example file of {f} has no array {key!r} for attack {res.get('attack')!r}")
    ok = np.asarray(arrays[key])
    if ok.shape != (n,) or not (ok.dtype == bool or np.isin(ok, (0, 1)).all()):
        raise TableInputError(f"the per-example array {key!r} of {f} is not {n} correct/incorrect flags")
    return ok.astype(bool)


def _eval_rows(f: str | Path, rec: dict) -> list[dict]:
    rows, arrays = [], per_example_arrays(f, rec)
    published = rec["zoo"] if _zoo(rec) else {}
    for attack, res in rec["attacks"].items():
        if not isinstance(res, dict) or res.get("accuracy") is None:
            continue
        params = res.get("params") or {}
        n = int(res.get("n_examples", rec.get("n_examples", 0)))
        rows.append({"run_id": rec["run_id"], "checkpoint": rec["checkpoint"], "attack": attack,
                     "accuracy": float(res["accuracy"]),
                     "n_correct": int(res.get("n_correct", round(float(res["accuracy"]) * n))),
                     "ci_low": float(res.get("ci_low", math.nan)), "ci_high": float(res.get("ci_high", math.nan)),
                     "interval_method": rec.get("interval_method"), "n_examples": n,
                     "test_points": rec.get("test_points"),
                     "dataset": rec.get("dataset"), "model": rec.get("model"),
                     "method": rec.get("method"), "seed": rec.get("train_seed"),
                     # the record's budget: per-attack entries may carry their own (clean: 0)
                     "eps": float(rec["eps"] if rec.get("eps") is not None else res["eps"]),
                     "steps": int(params["steps"]) if "steps" in params else None, "file": str(f),
                     "correct": _correct(f, arrays, res, n), "zoo": _zoo(rec),
                     "published_clean": published.get("published_clean_accuracy"),
                     "published_robust": published.get("published_robust_accuracy")})
    return rows


def load_evals(files: Iterable[str | Path], run_ids: set[str] | None = None) -> pd.DataFrame:
    """One row per (evaluation file, attack): run_id, checkpoint, accuracy with the record's interval,
    test points, PGD steps and the per-example correctness (`correct`: a bool array, or None when the
    evaluation's .npz is missing). With `run_ids`, every file must have measured one of those runs.

    Several files of one (run, checkpoint) are merged by attack; when two hold the same attack, the one
    on more test points wins (e.g. PGD on 1000 points over PGD on the AutoAttack subset)."""
    rows = []
    for f in files:
        rec = read_record(f, "evaluation")
        if "attacks" not in rec or "checkpoint" not in rec:
            raise TableInputError(f"{f} is not a `gmr evaluate` result (no attacks/checkpoint)")
        check_link(rec, f, run_ids, "evaluation")
        rows += _eval_rows(f, rec)
    df = pd.DataFrame(rows, columns=EVAL_COLUMNS)
    if df.empty:
        return df
    df = df.sort_values("n_examples", ascending=False, kind="stable")
    return df.drop_duplicates(["run_id", "checkpoint", "attack"]).sort_index()


def load_audits(files: Iterable[str | Path], run_ids: set[str] | None = None) -> pd.DataFrame:
    """One row per audit.json (or `gmr diagnose` folder): setting, verdict, failed checks, key probes.
    With `run_ids`, every audit must have measured one of those runs. A file given twice counts once;
    two files auditing the same run and checkpoint are refused (the verdict counts would count it twice)."""
    rows, seen = [], {}
    for f in files:
        if not str(f).strip():
            raise TableInputError("--audits holds an empty path; give audit.json files or their folders")
        f = Path(f) / "audit.json" if Path(f).is_dir() else Path(f)
        audit = read_record(f, "audit")
        if "verdict" not in audit or "checks" not in audit:
            raise TableInputError(f"{f} is not a `gmr diagnose` audit (no verdict/checks)")
        check_link(audit, f, run_ids, "audit")
        key = (audit["run_id"], audit["checkpoint"])
        if key in seen:
            if seen[key].resolve() == f.resolve():
                continue
            raise TableInputError(f"audits {seen[key]} and {f} both audit run {key[0]} ({key[1]}); give one "
                                  "audit per run and checkpoint")
        seen[key] = f
        summary = audit.get("summary", {})
        failed = [c["name"] for c in audit["checks"] if c.get("passed") is False]
        rows.append({"run_id": audit["run_id"], "checkpoint": audit["checkpoint"],
                     "dataset": audit["dataset"], "model": audit["model"], "eps": float(audit["eps"]),
                     "method": audit["method"], "seed": audit.get("train_seed"), "zoo": _zoo(audit),
                     "masking": audit["verdict"]["masking"], "failed": failed,
                     **{k: summary.get(k) for k in AUDIT_VALUES}})
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------------------------------
# The registry

@dataclass(frozen=True)
class TableSpec:
    fn: Callable[..., Parts]
    title: str            # per-dataset tables: "{dataset}" is replaced by the dataset's title
    caption: str          # plain text: what the table shows and how to read it (the report caption)
    per_dataset: bool


TABLES: Registry[TableSpec] = Registry("table")


def register_table(name: str, title: str, caption: str, per_dataset: bool = False):
    """Register a table function (results[, dataset]) -> (numbers, display columns, notes)."""
    def decorator(fn):
        TABLES.register(name)(TableSpec(fn, title, caption, per_dataset))
        return fn
    return decorator


def table_names(datasets: Iterable[str]) -> list[str]:
    """The names (file stems) of every registered table for these datasets, in registration order."""
    names = []
    for name in TABLES.names_in_order():
        if TABLES.get(name).per_dataset:
            names += [f"{name}_{d}" for d in sorted(set(datasets))]
        else:
            names.append(name)
    return names


def build_tables(results: Results) -> dict[str, Table]:
    """name -> Table for every registered table (per-dataset ones for each dataset evaluated)."""
    out = {}
    for name in TABLES.names_in_order():
        spec = TABLES.get(name)
        if spec.per_dataset:
            for d in results.datasets:
                numbers, frame, notes = spec.fn(results, d)
                title = spec.title.format(dataset=dataset_info(d).title)
                out[f"{name}_{d}"] = Table(numbers, Formatted(title, frame, notes), spec.caption)
        else:
            numbers, frame, notes = spec.fn(results)
            out[name] = Table(numbers, Formatted(spec.title, frame, notes), spec.caption)
    return out


def make_tables(run_dirs: Sequence[str | Path], eval_files: Sequence[str | Path],
                audit_files: Sequence[str | Path], out: str | Path,
                pairs: Sequence[tuple[str, str]] | None = None) -> tuple[list[str], list[Path]]:
    """Load the result files, build every registered table and write it in every format into `out`
    (nothing is written when an input is bad). `pairs`: see `load_results`. Returns the table names
    and the files written."""
    tables = build_tables(load_results(run_dirs, eval_files, audit_files, pairs))
    return list(tables), write_tables(tables, writable_dir(out))


# --------------------------------------------------------------------------------------------------
# Shared by the tables

def _sort(df: pd.DataFrame, extra: Sequence[str] = ()) -> pd.DataFrame:
    """Setting columns first, then methods in registration order, then `extra`."""
    if df.empty:
        return df
    by = [c for c in ("dataset", "model", "eps") if c in df] + ["_m"] + list(extra)
    return (df.assign(_m=df["method"].map(method_rank)).sort_values(by, kind="stable").drop(columns="_m")
            .reset_index(drop=True))


def _titles(runs: pd.DataFrame, *records: pd.DataFrame) -> dict[tuple, str]:
    """(dataset, model, eps, method) -> display name with the runs' options, e.g. "PGD-10 AT"; for the
    RobustBench models among `records` (evaluation or audit rows), "<name> (RobustBench)"."""
    titles = {} if runs.empty else {tuple(k): t for k, t in runs.groupby(KEYS)["method_title"].first().items()}
    for frame in records:
        if not frame.empty and "zoo" in frame:
            titles.update({(r.dataset, r.model, r.eps, r.method): zoo_title(r.method)
                           for r in frame[frame["zoo"].astype(bool)].itertuples()})
    return titles


def _setting_columns(t: pd.DataFrame) -> dict[str, list]:
    return {"dataset": [dataset_info(d).title for d in t["dataset"]],
            "model": [model_title(m) for m in t["model"]],
            "eps": [eps_text(e, d) for e, d in zip(t["eps"], t["dataset"])]}


# --------------------------------------------------------------------------------------------------
# robustness_<dataset>

def _attacks(evals: pd.DataFrame) -> list[str]:
    found = set(evals["attack"])
    return [a for a in ATTACK_TITLES if a in found] + sorted(found - set(ATTACK_TITLES))


def seed_interval(rows: pd.DataFrame) -> tuple[float, float, float, str]:
    """(mean, low, high, interval method) of one attack over the seeds of one setting (one row each).

    With every seed's per-example array: `gmr.stats.aggregate_seeds` (seed-to-seed and test-sample
    variation; one seed: its Wilson interval), on the first points common to all seeds (each seed is
    evaluated on the first n test points in order). Without them: one seed keeps its record's interval
    (or the Wilson interval of its count); several seeds get the Wilson interval of their pooled
    counts, named "binomial only" because it leaves out the seed-to-seed spread."""
    arrays = list(rows["correct"])
    if all(a is not None for a in arrays):
        n = min(len(a) for a in arrays)
        est = aggregate_seeds([a[:n] for a in arrays], CONFIDENCE)
        return est.value, est.low, est.high, est.method
    mean = float(rows["accuracy"].mean())
    if len(rows) == 1:
        r = rows.iloc[0]
        if not (missing(r["ci_low"]) or missing(r["ci_high"])):
            method = r["interval_method"] or "wilson"
            return mean, float(r["ci_low"]), float(r["ci_high"]), f"{method}, 1 seed: no seed-to-seed spread"
        return (mean, *accuracy_interval(int(r["n_correct"]), int(r["n_examples"]), CONFIDENCE), ONE_SEED)
    low, high = accuracy_interval(int(rows["n_correct"].sum()), int(rows["n_examples"].sum()), CONFIDENCE)
    return mean, low, high, f"{BINOMIAL_ONLY}: Wilson on the pooled points of {len(rows)} seeds"


def _seed_summary(g: pd.DataFrame, attacks: Sequence[str]) -> dict:
    """Per attack: mean over seeds with its interval, the std over seeds, test points per seed and the
    interval's method; the catastrophic-overfitting count."""
    row: dict = {}
    seeds = g.drop_duplicates("run_id")
    row["n_seeds"] = len(seeds)
    for a in attacks:
        rows = g[g["attack"] == a]
        acc = rows["accuracy"]
        mean, low, high, method = seed_interval(rows) if len(rows) else (math.nan, math.nan, math.nan, "")
        row.update({f"{a}_mean": mean, f"{a}_low": low, f"{a}_high": high,
                    f"{a}_n": int(rows["n_examples"].min()) if len(rows) else 0,
                    f"{a}_std": acc.std(ddof=1) if len(acc) > 1 else (0.0 if len(acc) else math.nan),
                    f"{a}_interval": method})
    co = seeds["co"].dropna()
    row["co_runs"] = int(co.sum()) if len(co) else None
    row["co_rate"] = float(co.mean()) if len(co) else math.nan
    return row


def robustness(results: Results, dataset: str) -> pd.DataFrame:
    """One row per (model, eps, method, checkpoint) of `dataset`: for each attack the mean over seeds
    with its interval (`seed_interval`), the std over seeds, the test points per seed and the interval's
    method; the catastrophic-overfitting rate."""
    ev = results.evals[results.evals["dataset"] == dataset]
    if not results.runs.empty:
        ev = ev.join(results.runs.set_index("run_id")[["co"]], on="run_id")
    else:
        ev = ev.assign(co=float("nan"))
    group, attacks, titles = KEYS + ["checkpoint"], _attacks(results.evals), _titles(results.runs, results.evals)
    rows = []
    for key, g in ev.groupby(group, sort=False):
        row = dict(zip(group, key))
        row["method_title"] = titles.get(tuple(key[:4]), method_title(row["method"]))
        rows.append({**row, **_seed_summary(g, attacks)})
    table = pd.DataFrame(rows)
    table["_c"] = table["checkpoint"].map(CHECKPOINT_ORDER)
    return _sort(table, ["_c"]).drop(columns="_c")


def _interval_notes(t: pd.DataFrame, attacks: Sequence[str]) -> list[str]:
    """How the intervals were made (every method used), naming the cells whose interval is binomial
    only (no per-example arrays), so no cell is a bare point estimate."""
    methods = {m for a in attacks for m in t[f"{a}_interval"] if m}
    notes = [f"[low, high]: {100 * CONFIDENCE:.0f}% interval. Several seeds: mean over seeds, interval from the "
             "per-example results of every seed (gmr.stats.aggregate_seeds: seed-to-seed and test-sample "
             "variation, crossed seeds × test points); one seed: its Wilson interval. Mean ± std over seeds "
             "(as papers report it) is in the CSV (<attack>_std)."]
    binomial = [f"{r.method_title} ({CHECKPOINT_TITLES.get(r.checkpoint, r.checkpoint)}) "
                f"{ATTACK_TITLES.get(a, a)}" for r in t.itertuples() for a in attacks
                if str(getattr(r, f"{a}_interval")).startswith(BINOMIAL_ONLY)]
    if binomial:
        notes.append("Binomial only (the per-example .npz of an evaluation is missing): "
                     + "; ".join(binomial) + ". These intervals hold the test-sample error of the pooled "
                     "points but not the seed-to-seed spread.")
    if any(m.startswith("clopper") for m in methods):
        notes.append("Some one-seed intervals are Clopper-Pearson, as their evaluation records state.")
    return notes


def format_robustness(dataset: str, t: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    attacks = [c[:-5] for c in t.columns if c.endswith("_mean")]
    setting = _setting_columns(t)
    df = pd.DataFrame({"model": setting["model"], "eps": setting["eps"], "method": t["method_title"],
                       "checkpoint": t["checkpoint"].map(CHECKPOINT_TITLES)})
    for a in attacks:
        df[ATTACK_TITLES.get(a, a)] = [pct_interval(m, lo, hi)
                                       for m, lo, hi in zip(t[f"{a}_mean"], t[f"{a}_low"], t[f"{a}_high"])]
    df["CO rate"] = [f"{r}/{n}" if not missing(r) else "–" for r, n in zip(t["co_runs"], t["n_seeds"])]
    df["seeds"] = t["n_seeds"].astype(int).astype(str)
    df, constant = drop_constant(df, ["model", "eps"])
    by_n: dict[int, list[str]] = {}
    for title, n in sorted({(ATTACK_TITLES.get(a, a), int(n)) for a in attacks for n in t[f"{a}_n"] if n}):
        by_n.setdefault(n, []).append(title)
    on = dataset_info(dataset).title + (f" ({', '.join(constant)})" if constant else "")
    notes = [f"Test accuracy (%) on {on}"
             + ", mean over training seeds [95% interval]; selected = the epoch with the best validation "
             "I-FGSM-3 accuracy (the paper's model selection), last = the final epoch.",
             "Test points per seed (n): " + "; ".join(f"{', '.join(v)} on the first {n}"
                                                      for n, v in sorted(by_n.items())) + ".",
             *_interval_notes(t, attacks),
             "CO rate: runs whose training log shows catastrophic overfitting (validation PGD accuracy "
             "fell far below an earlier best while FGSM accuracy held; criterion of "
             "gmr.runs.catastrophic_overfitting_epoch, after Wong et al. 2020) / seeds."]
    return df, notes


@register_table(
    "robustness", per_dataset=True, title="Robustness on {dataset}",
    caption="Test accuracy (%) under each attack: the mean over training seeds with its 95% interval "
            "[low, high], which holds both the seed-to-seed spread and the test-sample error (from every "
            "seed's per-example results; with one seed, its Wilson interval), for the selected model "
            "(the epoch with the best validation I-FGSM-3 accuracy, as in the paper's code) and the last "
            "model. Columns: clean, FGSM, R-FGSM, I-FGSM, PGD (cross-entropy, random start), PGD-CW "
            "(CW-margin loss) and AutoAttack (standard, on its own smaller subset; the numbers of test "
            "points n are given below the table). Gradient masking shows as FGSM accuracy far above PGD "
            "and AutoAttack accuracy (FGSM-AT); a robust model keeps them close (GMR, PGD-AT). CO rate: "
            "runs whose training log shows catastrophic overfitting. The CSV beside this table has every "
            "number in its own column (<attack>_mean, _low, _high, _n, _std, _interval).")
def robustness_table(results: Results, dataset: str) -> Parts:
    t = robustness(results, dataset)
    frame, notes = format_robustness(dataset, t)
    return t, frame, notes + zoo_notes(results.evals, dataset) + warning_notes(results.runs, dataset)


def zoo_notes(evals: pd.DataFrame, dataset: str) -> list[str]:
    """What the RobustBench rows are, with the accuracies the leaderboard publishes for each model."""
    if evals.empty or "zoo" not in evals:
        return []
    zoo = evals[(evals["dataset"] == dataset) & evals["zoo"].astype(bool)].drop_duplicates("method")
    if zoo.empty:
        return []
    def pct(v) -> str:
        return "–" if v is None or missing(v) else f"{100 * v:.2f}"

    published = "; ".join(f"{r.method}: clean {pct(r.published_clean)}, AutoAttack {pct(r.published_robust)}"
                          for r in zoo.itertuples())
    return ["RobustBench rows: models of the RobustBench zoo (robustbench.utils.load_model), evaluated here "
            "by the same attacks on the same test points as our runs; one set of published weights, so no "
            "seeds and no training log (CO rate –). Their leaderboard numbers (%, AutoAttack on the first "
            f"10,000 test points): {published}."]


def warning_notes(runs: pd.DataFrame, dataset: str) -> list[str]:
    """One note naming each run of `dataset` with a warning (gmr.runs.run_warnings), e.g. a training
    accuracy at chance: the accuracies of such a run are in the table but measure nothing."""
    if runs.empty:
        return []
    return [f"Warning: {r.method_title} seed {r.seed} ({r.run_id}): {w}."
            for r in runs[runs["dataset"] == dataset].itertuples() for w in r.warnings]


@register_table(
    "comparisons", title="Paired comparisons of methods",
    caption="Method A against baseline B under PGD and AutoAttack, on the test points both were evaluated "
            "on. Pairing: seed s of A with seed s of B, in the same setting (dataset, model, eps) and "
            "checkpoint, each evaluated on the same first n test points; the paired per-example results "
            "of the seeds present in both are put together, and n counts those pairs (seeds × points). "
            "Difference A − B in points (%) with Newcombe's paired 95% interval; p: exact McNemar test on "
            "the points only one of the two gets right; reading at the 5% level, with the number of points "
            "that would decide an undecided comparison if the observed rates held. Pooling seeds makes this "
            "a statement about these trained models; the seed-to-seed spread is in the robustness tables' "
            "intervals. `gmr tables --comparisons A:B1,B2` chooses the pairs (default: GMR against "
            "FGSM-AT, R-FGSM-AT and PGD-AT).")
def comparisons_table(results: Results) -> Parts:
    pairs = results.pairs if results.pairs is not None else DEFAULT_PAIRS
    t, skipped = compare_methods(results.evals, _titles(results.runs, results.evals), pairs, CONFIDENCE,
                                 explicit=results.pairs is not None)
    return (t, *format_comparisons(t, skipped))


# --------------------------------------------------------------------------------------------------
# reference

@register_table(
    "reference", title="Published reference numbers",
    caption="Published numbers in this study's settings (dataset and eps): CIFAR-10 Linf 8/255 (Sriramanan "
            "et al. NeurIPS 2020 and NuAT 2021, RobustBench cards, FastAT Benchmark) and MNIST Linf 0.3 "
            "(AutoAttack README), with ours beside those whose architecture, method and method title match "
            "and deltas (ours − published, points); matched rows first.")
def reference_table(results: Results) -> Parts:
    t = compare(results.evals, titles=_titles(results.runs, results.evals))
    return (t, *format_comparison(t))


# --------------------------------------------------------------------------------------------------
# cost

COST_COLUMNS = KEYS + ["method_title", "n_runs", "epochs", "n_train", "seconds_per_epoch", "seconds_per_epoch_std",
                       "train_seconds", "passes_per_sample", "declared_passes_per_sample", "images_per_second",
                       "peak_memory_mb", "time_vs_pgd_at", "device", "precision"]


def _devices(g: pd.DataFrame) -> str:
    return "; ".join(sorted({f"{r.device_name or r.device} ({r.device}, {r.threads} threads)"
                             if r.device == "cpu" else f"{r.device_name} ({r.device})" for r in g.itertuples()}))


def cost(runs: pd.DataFrame) -> pd.DataFrame:
    """Training cost per (dataset, model, eps, method), means over seeds, with the ratio of the total
    training time to PGD-AT's in the same setting."""
    if runs.empty:
        return pd.DataFrame(columns=COST_COLUMNS)
    rows = []
    for key, g in runs.groupby(KEYS, sort=False):
        rows.append({**dict(zip(KEYS, key)), "method_title": g["method_title"].iloc[0], "n_runs": len(g),
                     "epochs": int(g["epochs"].iloc[0]), "n_train": int(g["n_train"].iloc[0]),
                     "seconds_per_epoch": g["seconds_per_epoch"].mean(),
                     "seconds_per_epoch_std": g["seconds_per_epoch"].std(ddof=1) if len(g) > 1 else 0.0,
                     **{k: g[k].mean() for k in ("train_seconds", "passes_per_sample",
                                                 "declared_passes_per_sample", "images_per_second")},
                     "peak_memory_mb": g["peak_memory_mb"].max(), "device": _devices(g),
                     "precision": "; ".join(sorted(set(g["precision"])))})
    table = pd.DataFrame(rows)
    pgd = table[table["method"] == "pgd"].set_index(["dataset", "model", "eps"])["train_seconds"]
    table["time_vs_pgd_at"] = [
        r.train_seconds / pgd.loc[(r.dataset, r.model, r.eps)] if (r.dataset, r.model, r.eps) in pgd.index
        else math.nan for r in table.itertuples()]
    return _sort(table)[COST_COLUMNS]


@register_table(
    "cost", title="Training cost",
    caption="Training cost per method (mean over seeds): seconds per epoch and total training time (without "
            "the per-epoch validation probes), forward+backward passes per training sample counted on the "
            "model, images per second, peak memory, the training time relative to PGD-AT in the same "
            "setting, the device and the training precision. GMR costs 4 passes per sample (2 for its two attack gradients, 2 for "
            "the update on the FGSM and R-FGSM batches), FGSM-AT 2, PGD-k AT k + 1.")
def cost_table(results: Results) -> Parts:
    t = cost(results.runs)
    df = pd.DataFrame({
        **_setting_columns(t), "method": t["method_title"], "runs": t["n_runs"].astype(str),
        "s / epoch": [num(m, "{:.1f}") + (f" ± {s:.1f}" if n > 1 else "")
                      for m, s, n in zip(t["seconds_per_epoch"], t["seconds_per_epoch_std"], t["n_runs"])],
        "training s": t["train_seconds"].map(lambda v: num(v, "{:.0f}")),
        "passes / sample": t["passes_per_sample"].map(lambda v: num(v, "{:.2f}")),
        "images / s": t["images_per_second"].map(lambda v: num(v, "{:.0f}")),
        "peak MB": t["peak_memory_mb"].map(lambda v: num(v, "{:.0f}")),
        "time / PGD-AT": t["time_vs_pgd_at"].map(lambda v: num(v, "{:.2f}")),
        "device": t["device"], "precision": t["precision"]})
    df, setting = drop_constant(df, ["dataset", "model", "eps", "device", "precision"])
    notes = ["Training cost, mean over seeds; training time excludes the per-epoch validation probes. "
             "passes / sample: forward+backward passes counted on the model per training example "
             "(FGSM-AT 2, GMR 4, PGD-k AT k+1). time / PGD-AT: total training time relative to PGD-AT "
             "in the same setting."]
    notes += setting_notes(setting)
    return t, df, notes


# --------------------------------------------------------------------------------------------------
# masking

MASKING_COLUMNS = KEYS + ["method_title", "checkpoint", "n_audits", "masking_yes", "masking_inconclusive",
                          "masking_no", "verdict", "failed_checks"] + list(AUDIT_VALUES)


def masking(audits: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    """Audit verdicts per (dataset, model, eps, method, checkpoint), the failed checks with how many
    audits failed each, and the mean of the key probe values."""
    if audits.empty:
        return pd.DataFrame(columns=MASKING_COLUMNS)
    titles = _titles(runs, audits)
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
    return _sort(pd.DataFrame(rows))[MASKING_COLUMNS]


@register_table(
    "masking", title="Gradient-masking audit",
    caption="Gradient-masking audit (gmr diagnose): the verdict (masking yes / inconclusive / no) per "
            "method with how many audited seeds got it, the checks that failed (with how many audits "
            "failed each), and the mean FGSM − PGD accuracy gap, gradient alignment E cos(∇x L(x), "
            "∇x L(x + η)) and FGSM vs R-FGSM logit distance (the quantity GMR penalises). Each check, its "
            "threshold and its source are listed in every diagnostics/*/audit.json.")
def masking_table(results: Results) -> Parts:
    t = masking(results.audits, results.runs)
    df = pd.DataFrame({
        **_setting_columns(t), "method": t["method_title"], "checkpoint": t["checkpoint"].map(CHECKPOINT_TITLES),
        "masking": t["verdict"],
        "FGSM − PGD": t["fgsm_pgd_accuracy_gap"].map(lambda v: num(v, "{:.2f}")),
        "grad. alignment": t["gradient_alignment"].map(lambda v: num(v, "{:.2f}")),
        "FGSM/R-FGSM logit dist.": t["fgsm_rfgsm_logit_distance"].map(lambda v: num(v, "{:.3g}")),
        "failed checks": t["failed_checks"]})
    df, setting = drop_constant(df, ["dataset", "model", "eps", "checkpoint"])
    notes = ["Gradient-masking audit (`gmr diagnose`, checks and thresholds in gmr/masking/rules.py): "
             "verdict counts over the audited seeds, the failed checks with how many audits failed them, "
             "and the mean of key probes (FGSM − PGD accuracy gap, gradient alignment "
             "E cos(grad(x), grad(x + eta)), mean squared FGSM vs R-FGSM logit distance)."]
    notes += setting_notes(setting)
    if "zoo" in results.audits and results.audits["zoo"].astype(bool).any():
        notes.append("RobustBench rows: models of the RobustBench zoo audited by the same probes on the same "
                     "points (no training log: no catastrophic-overfitting check).")
    if t.empty:
        notes.append("No audits were run (diagnose disabled in the config).")
    return t, df, notes
