"""gmr.report.tables and `gmr tables` on hand-made result files with known answers (no training).

The helpers here write schema-valid run directories and records (checked as they are written, since the
tables refuse records that do not follow their schemas); tests/test_plots.py uses them too."""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from gmr import methods
from gmr.cli import main
from gmr.cost import PassCount
from gmr.report import comparisons, reference, tables
from gmr.report.render import FORMATS
from gmr.runs import validate_record
from gmr.schemas import validate
from gmr.stats import accuracy_interval

CIFAR_EPS = 8 / 255


def make_run(root: Path, method: str, seed: int, *, dataset="mnist", model="lenet_plus", eps=0.3,
             train_seconds=10.0, pgd_curve=(0.3, 0.4, 0.45), fgsm_curve=(0.5, 0.6, 0.65), options=None) -> Path:
    """A finished run directory: run.json (valid against its schema) and train_log.csv."""
    d = root / f"{dataset}-{model}-{method}-{eps:.4f}-s{seed}"
    d.mkdir(parents=True)
    epochs = len(pgd_curve)
    passes = {"pgd": 11.0, "gmr": 4.0}.get(method, 2.0)
    log = [{"epoch": e + 1, "val_clean": 0.9, "val_fgsm": f, "val_ifgsm3": p, "val_pgd": p,
            "val_logit_dist": 0.1 * (e + 1), "val_grad_align": 0.5}
           for e, (p, f) in enumerate(zip(pgd_curve, fgsm_curve))]
    meta = {
        "schema": "gmr.run/1", "run_id": f"{method}-{dataset}-seed{seed}-{hashlib.sha1(bytes(d)).hexdigest()[:8]}",
        "status": "complete",
        "config": {"dataset": dataset, "model": model, "method": method, "seed": seed, "epochs": epochs,
                   "batch_size": 32, "lr": 0.01, "momentum": 0.9, "weight_decay": 5e-4, "schedule": "step"},
        "config_identity": {}, "eps": eps, "method_options": options or {},
        "data": {"n_train": 1000, "n_val": 100},
        "selection": {"criterion": "val_ifgsm3", "best_epoch": epochs, "last_epoch": epochs},
        "metrics": {"best": log[-1], "last": log[-1]},
        "cost": {"train_seconds": train_seconds, "seconds_per_epoch": train_seconds / epochs,
                 "passes": passes * 1000 * epochs / 2, "passes_per_sample": passes,
                 "declared_passes_per_sample": passes, "images_per_second": 1000 / train_seconds,
                 "peak_memory_mb": 900.0, "device": "cpu", "device_name": "x86_64", "threads": 1},
        "finished": "2026-01-01T00:00:00",
    }
    validate_record(meta)
    (d / "run.json").write_text(json.dumps(meta))
    lines = [",".join(log[0])] + [",".join(str(v) for v in row.values()) for row in log]
    (d / "train_log.csv").write_text("\n".join(lines) + "\n")
    return d


def run_id(run: Path) -> str:
    return json.loads((run / "run.json").read_text())["run_id"]


def make_eval(run: Path, checkpoint: str, accs: dict[str, float], n=500, name=None, steps=None,
              correct: dict[str, np.ndarray] | None = None, ci: dict[str, tuple[float, float]] | None = None
              ) -> Path:
    """An evaluation record of the run. With `correct` (attack -> per-example bool array), the accuracies
    and n come from the arrays and the .npz is written beside the record as `gmr evaluate` writes it;
    `ci` (attack -> (low, high)) puts an interval into the record's entries."""
    meta = json.loads((run / "run.json").read_text())
    cfg = meta["config"]
    path = run / (name or f"{checkpoint}.json")
    if correct is not None:
        accs = {a: float(np.mean(ok)) for a, ok in correct.items()}
        n = len(next(iter(correct.values())))
    if correct is not None and "clean" not in correct:  # `gmr evaluate` always measures clean accuracy
        correct = {"clean": np.logical_or.reduce(list(correct.values())), **correct}
        accs = {"clean": float(np.mean(correct["clean"])), **accs}
    elif "clean" not in accs:
        accs = {"clean": max(accs.values(), default=1.0), **accs}
    attacks = {a: _entry(a, v, n, 0.0 if a == "clean" else meta["eps"], steps,
                         None if correct is None else correct[a], (ci or {}).get(a)) for a, v in accs.items()}
    worst = min(accs.values(), default=0.0)
    rec = {"schema": "gmr.eval/1", "run": str(run), "run_id": meta["run_id"], "checkpoint": checkpoint,
           "checkpoint_epoch": meta["selection"]["best_epoch" if checkpoint == "best" else "last_epoch"],
           "method": cfg["method"], "dataset": cfg["dataset"], "model": cfg["model"], "train_seed": cfg["seed"],
           "seed": 0, "n_examples": n, "eps": meta["eps"], "norm": "Linf", "confidence": 0.95,
           "interval_method": "wilson", "test_points": f"first {n} of the {cfg['dataset']} test set, in order",
           "attacks": attacks,
           "worst_case": {"accuracy": worst, "ci_low": worst, "ci_high": worst, "n_correct": round(worst * n),
                          "n_examples": n, "eps": meta["eps"], "over": list(accs) or ["clean"],
                          "whitebox_accuracy": worst, "whitebox_ci_low": worst, "whitebox_ci_high": worst,
                          "whitebox_over": list(accs)},
           "transfer": {}, "eps_sweep": [], "versions": {"gmr": "0", "torch": "0", "pyautoattack": None},
           "device": "cpu", "seconds": 1.0}
    if correct is not None:
        np.savez_compressed(path.with_suffix(".npz"), **{a: np.asarray(ok, bool) for a, ok in correct.items()})
        rec["per_example_file"] = path.with_suffix(".npz").name
    validate(rec, "eval")
    path.write_text(json.dumps(rec))
    return path


def _entry(attack: str, acc: float, n: int, eps: float, steps, ok, ci) -> dict:
    """One attack entry of an evaluation record: its interval is `ci`, else the Wilson interval of
    its count (what `gmr evaluate` writes)."""
    n_correct = int(np.sum(ok)) if ok is not None else round(acc * n)
    low, high = ci if ci is not None else accuracy_interval(n_correct, n)
    entry = {"attack": attack, "accuracy": acc, "ci_low": low, "ci_high": high, "n_correct": n_correct,
             "n_examples": n, "eps": eps, "params": {"steps": steps} if steps and attack.startswith("pgd") else {},
             "seed": 0, "seconds": 1.0, "per_example": attack}
    if attack == "autoattack":
        entry.update(norm="Linf", version="standard", attacks_run=["apgd-ce"], per_attack={"apgd-ce": acc},
                     flags=[], package="pyautoattack")
    return entry


def flags(n_correct: int, n: int, first: int = 0) -> np.ndarray:
    """n correctness flags, `n_correct` of them True, starting at point `first` (wrapping around)."""
    ok = np.zeros(n, bool)
    ok[(first + np.arange(n_correct)) % n] = True
    return ok


def make_audit(run: Path, masking: str, failed=(), out: Path | None = None, **summary) -> Path:
    """audit.json of the run's selected model, in `out` (default: the run directory)."""
    meta = json.loads((run / "run.json").read_text())
    cfg = meta["config"]
    undecided = {"interval": None, "n": None, "n_of": None, "n_needed": None}
    checks = [{"name": c, "value": 1.0, "threshold": 0.5, "passed": False, "decision": "fail", "role": "decisive",
               "explanation": "x", "source": "s", **undecided} for c in failed]
    checks.append({"name": "clean_accuracy", "value": 0.9, "threshold": None, "passed": None, "decision": None,
                   "role": "info", "explanation": "x", "source": "s", **undecided})
    audit = {"schema": "gmr.audit/1", "run": str(run), "run_id": meta["run_id"], "checkpoint": "best",
             "method": cfg["method"], "dataset": cfg["dataset"], "model": cfg["model"], "train_seed": cfg["seed"],
             "eps": meta["eps"], "n_examples": 16, "seed": 0,
             "summary": {"clean_accuracy": 0.9, "fgsm_accuracy": 0.8, "pgd_accuracy": 0.1,
                         "fgsm_pgd_accuracy_gap": 0.7, "gradient_alignment": 0.2, **summary},
             "checks": checks, "verdict": {"masking": masking, "reasons": ["r"]}}
    out = out or run
    out.mkdir(parents=True, exist_ok=True)
    path = out / "audit.json"
    validate(audit, "audit")
    path.write_text(json.dumps(audit))
    return path


@pytest.fixture
def toy_method(monkeypatch):
    """A method registered only here, with its title and colour (the registry is restored afterwards)."""
    monkeypatch.setattr(methods.METHODS, "_entries", dict(methods.METHODS._entries))

    @methods.register_method("toy_at", methods.NoOptions, cost=lambda o, b: PassCount(2, 2),
                             description="clean training under another name", title="Toy-AT", color="#123456")
    def toy_at(model, x, y, eps, o):
        return methods.standard(model, x, y, eps, o)

    return "toy_at"


@pytest.fixture
def study(tmp_path):
    runs, evals, audits = [], [], []
    for seed, (fg, pg, co) in enumerate([(0.9, 0.0, True), (0.7, 0.1, False)]):
        curve = (0.3, 0.05, 0.0) if co else (0.3, 0.35, 0.4)
        r = make_run(tmp_path, "fgsm", seed, pgd_curve=curve, fgsm_curve=(0.5, 0.6, 0.9), train_seconds=10)
        runs.append(r)
        evals += [make_eval(r, "best", {"clean": 0.98, "fgsm": fg, "pgd": pg}),
                  make_eval(r, "last", {"clean": 0.97, "fgsm": fg, "pgd": pg}),
                  make_eval(r, "best", {"pgd": 0.5, "autoattack": 0.0}, n=40, name="best-autoattack.json")]
        audits.append(make_audit(r, "yes", ["fgsm_pgd_accuracy_gap", "gradient_alignment"]))
    for seed in (0, 1):
        r = make_run(tmp_path, "gmr", seed, train_seconds=20)
        runs.append(r)
        evals += [make_eval(r, "best", {"clean": 0.95, "fgsm": 0.6, "pgd": 0.5}),
                  make_eval(r, "last", {"clean": 0.95, "fgsm": 0.6, "pgd": 0.5})]
        audits.append(make_audit(r, "no" if seed == 0 else "inconclusive",
                                 [] if seed == 0 else ["gradient_alignment"]))
    r = make_run(tmp_path, "pgd", 0, train_seconds=100, options={"steps": 10})
    runs.append(r)
    evals += [make_eval(r, "best", {"clean": 0.9, "fgsm": 0.7, "pgd": 0.6})]
    return runs, evals, audits


def test_robustness_means_stds_and_co_rate(study):
    t = tables.robustness(tables.load_results(*study), "mnist").set_index(["method", "checkpoint"])
    assert list(t.index) == [("fgsm", "best"), ("fgsm", "last"), ("gmr", "best"), ("gmr", "last"), ("pgd", "best")]
    assert t.loc[("fgsm", "best"), "fgsm_mean"] == pytest.approx(0.8)
    assert t.loc[("fgsm", "best"), "fgsm_std"] == pytest.approx(pd.Series([0.9, 0.7]).std())
    # PGD comes from the 500-point white-box file, not the 40-point AutoAttack file
    assert t.loc[("fgsm", "best"), "pgd_mean"] == pytest.approx(0.05)
    assert t.loc[("fgsm", "best"), "pgd_n"] == 500
    assert t.loc[("fgsm", "best"), "autoattack_mean"] == 0.0 and t.loc[("fgsm", "best"), "autoattack_n"] == 40
    assert math.isnan(t.loc[("fgsm", "last"), "autoattack_mean"])
    assert t.loc[("fgsm", "best"), "co_rate"] == 0.5 and t.loc[("fgsm", "best"), "co_runs"] == 1
    assert t.loc[("gmr", "best"), "co_rate"] == 0.0
    assert t.loc[("pgd", "best"), "method_title"] == "PGD-10 AT"


def test_cost_ratio_to_pgd_at(study):
    runs, _, _ = study
    c = tables.cost(tables.load_runs(runs)).set_index("method")
    assert c.loc["pgd", "time_vs_pgd_at"] == pytest.approx(1.0)
    assert c.loc["gmr", "time_vs_pgd_at"] == pytest.approx(0.2)
    assert c.loc["fgsm", "time_vs_pgd_at"] == pytest.approx(0.1)
    assert c.loc["gmr", "passes_per_sample"] == 4.0


def test_masking_counts_verdicts_and_failed_checks(study):
    runs, _, audits = study
    m = tables.masking(tables.load_audits(audits), tables.load_runs(runs)).set_index("method")
    assert m.loc["fgsm", "verdict"] == "yes 2/2"
    assert m.loc["gmr", "verdict"] == "inconclusive 1/2, no 1/2"
    assert "gradient_alignment (2/2)" in m.loc["fgsm", "failed_checks"]
    assert m.loc["gmr", "failed_checks"] == "gradient_alignment (1/2)"


def test_reference_matches_setting_and_step_count(tmp_path):
    published = pd.DataFrame([
        {"source": "s", "dataset": "cifar10", "eps": CIFAR_EPS, "model": "ResNet-18", "method": "gmr",
         "method_name": "GMR", "clean": 82.29, "pgd20": 46.23, "pgd7": 50.03, "autoattack": 43.72},
        {"source": "s", "dataset": "cifar10", "eps": CIFAR_EPS, "model": "PreActResNet-18", "method": "gmr",
         "method_name": "GMR", "clean": 80.0},
    ])
    run = make_run(tmp_path, "gmr", 0, dataset="cifar10", model="resnet18", eps=CIFAR_EPS)
    ev = make_eval(run, "best", {"clean": 0.80, "pgd": 0.45}, steps=20)
    ref = reference.compare(tables.load_evals([ev]), published)
    got = {(r.model, r.metric): (r.ours, r.delta) for r in ref.itertuples()}
    assert got[("ResNet-18", "clean")] == pytest.approx((80.0, 80.0 - 82.29))
    assert got[("ResNet-18", "PGD-20")] == pytest.approx((45.0, 45.0 - 46.23))
    assert all(math.isnan(v) for v in got[("ResNet-18", "PGD-7")])          # we ran PGD-20, not PGD-7
    assert all(math.isnan(v) for v in got[("ResNet-18", "AutoAttack")])     # not evaluated
    assert all(math.isnan(v) for v in got[("PreActResNet-18", "clean")])    # other architecture


def test_reference_shows_only_the_study_settings_matched_first(tmp_path):
    """Only entries in the study's (dataset, eps); an unstated architecture matches ours; a title, when
    the entry names one, must match (PGD-40 AT is not PGD-3 AT); another recipe is shown, not compared."""
    published = pd.DataFrame([
        {"source": "cifar", "dataset": "cifar10", "eps": CIFAR_EPS, "model": "ResNet-18", "method": "gmr",
         "method_name": "GMR", "clean": 82.29},
        {"source": "aa", "dataset": "mnist", "eps": 0.3, "model": "not stated", "method": "pgd",
         "method_name": "Madry", "our_title": "PGD-40 AT", "clean": 98.53, "autoattack": 88.5},
        {"source": "aa", "dataset": "mnist", "eps": 0.3, "model": "not stated", "method": "gmr",
         "method_name": "GMR elsewhere", "clean": 99.0},
        {"source": "fast", "dataset": "mnist", "eps": 0.3, "model": "not stated", "method": "gmr",
         "method_name": "GMR other recipe", "recipe": "r", "clean": 97.0},
    ])
    gmr_run = make_run(tmp_path, "gmr", 0)
    pgd_run = make_run(tmp_path, "pgd", 0)
    evals = tables.load_evals([make_eval(gmr_run, "best", {"clean": 0.98}), make_eval(pgd_run, "best", {"clean": 0.97})])
    titles = {("mnist", "lenet_plus", 0.3, "pgd"): "PGD-3 AT", ("mnist", "lenet_plus", 0.3, "gmr"): "GMR"}
    ref = reference.compare(evals, published, titles=titles)
    assert set(ref["source"]) == {"aa", "fast"}, "CIFAR-10 rows are not in an MNIST study"
    assert ref.iloc[0]["method_name"] == "GMR elsewhere" and ref.iloc[0]["ours"] == pytest.approx(98.0)
    assert ref["ours"].iloc[1:].isna().all(), "PGD-3 AT is not compared with PGD-40 AT; the other recipe never"
    titles[("mnist", "lenet_plus", 0.3, "pgd")] = "PGD-40 AT"
    ref = reference.compare(evals, published, titles=titles)
    assert ref.set_index("method_name").loc["Madry"].set_index("metric").loc["clean", "ours"] == pytest.approx(97.0)


def test_reference_table_says_so_when_no_setting_matches():
    t = reference.compare(tables.load_evals([]), reference.reference_numbers())
    df, notes = reference.format_comparison(t)
    assert t.empty and len(notes) == 1 and "gmr/reference/reference.json" in notes[0]


def test_shipped_reference_numbers_load():
    ref = reference.reference_numbers()
    gmr = ref[(ref["method"] == "gmr") & (ref["model"] == "ResNet-18")].iloc[0]
    assert gmr["autoattack"] == pytest.approx(43.72)


def test_cli_writes_every_format(study, tmp_path, capsys):
    runs, evals, audits = study
    out = tmp_path / "tables"
    assert main(["tables", "--runs", *map(str, runs), "--evals", *map(str, evals),
                 "--audits", *map(str, audits), "--out", str(out)]) == 0
    names = ("robustness_mnist", "comparisons", "reference", "cost", "masking")
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{name}.{ext}" for name in names for ext in FORMATS)
    for p in out.iterdir():
        assert p.stat().st_size > 0
    md = (out / "robustness_mnist.md").read_text()
    # no .npz beside these records: FGSM-AT's 2 seeds x 500 points (0.9 and 0.7) get the Wilson interval of
    # the pooled 800/1000, and the notes say it is binomial only
    assert "| FGSM-AT   | selected" in md and "80.0 [77.4, 82.4]" in md and "1/2" in md
    assert "Binomial only" in md and "FGSM-AT (selected) FGSM" in md
    tex = (out / "robustness_mnist.tex").read_text()
    assert r"\begin{tabular}" in tex and "80.0 [77.4, 82.4]" in tex and r"$\pm$" in tex and "±" not in tex
    assert "<table" in (out / "masking.html").read_text()
    assert "80.0 [77.4, 82.4]" in (out / "robustness_mnist.html").read_text()
    assert (out / "cost.rst").read_text().startswith("**Training cost**\n\nTraining cost per method")
    csv = pd.read_csv(out / "robustness_mnist.csv")
    assert {"fgsm_mean", "fgsm_low", "fgsm_high", "fgsm_n", "fgsm_std", "fgsm_interval", "co_rate"} <= set(csv.columns)
    # nothing to pair without per-example files: the comparisons table is empty and says why
    comparisons = (out / "comparisons.md").read_text()
    assert "No pair of methods" in comparisons and "seed 0: no per-example file for GMR" in comparisons
    assert capsys.readouterr().out.startswith(f"5 tables ({', '.join(names)})")


def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    run = make_run(tmp_path, "gmr", 0)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert main(["tables", "--runs", str(run), "--evals", str(bad), "--out", str(tmp_path / "t")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bad.json" in err[0]
    assert main(["tables", "--runs", str(tmp_path / "missing"), "--out", str(tmp_path / "t")]) == 2
    assert not (tmp_path / "t").exists()


def test_records_are_linked_to_runs_by_run_id_only(tmp_path):
    """A record names its run by id; where `gmr evaluate` saw the run (its path) does not matter."""
    run = make_run(tmp_path, "fgsm", 0, pgd_curve=(0.3, 0.05, 0.0), fgsm_curve=(0.5, 0.6, 0.9))
    ev = make_eval(run, "best", {"clean": 0.9, "fgsm": 0.8, "pgd": 0.0})
    rec = json.loads(ev.read_text())
    ev.write_text(json.dumps({**rec, "run": "results/runs/somewhere/else"}))
    t = tables.robustness(tables.load_results([run], [ev]), "mnist")
    assert t.loc[0, "co_runs"] == 1 and t.loc[0, "clean_mean"] == 0.9 and t.loc[0, "eps"] == 0.3


@pytest.mark.parametrize("case, text", [
    ("no run_id", "has no run_id"),
    ("unknown run_id", "none of the runs given"),
    ("copied run", "have the same run_id"),
])
def test_unlinked_records_are_one_clear_error(tmp_path, capsys, case, text):
    run = make_run(tmp_path, "gmr", 0)
    ev = make_eval(run, "best", {"clean": 0.9})
    runs = [run]
    rec = json.loads(ev.read_text())
    if case == "no run_id":
        del rec["run_id"]
    elif case == "unknown run_id":
        rec["run_id"] = "gmr-mnist-seed0-00000000"
    else:
        copy = tmp_path / "copy"
        copy.mkdir()
        (copy / "run.json").write_text((run / "run.json").read_text())
        runs.append(copy)
    ev.write_text(json.dumps(rec))
    with pytest.raises(tables.TableInputError, match=text):
        tables.load_results(runs, [ev])
    assert main(["tables", "--runs", *map(str, runs), "--evals", str(ev), "--out", str(tmp_path / "t")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and text in err[0] and (case == "copied run" or str(ev) in err[0])


def test_a_method_registered_in_a_test_shows_its_title(tmp_path, toy_method):
    runs = [make_run(tmp_path, m, 0, train_seconds=s) for m, s in ((toy_method, 5.0), ("pgd", 50.0))]
    evals = [make_eval(r, "best", {"clean": 0.9, "pgd": 0.4}) for r in runs]
    built = tables.build_tables(tables.load_results(runs, evals))
    robust, cost = built["robustness_mnist"], built["cost"]
    assert list(robust.numbers["method_title"]) == ["PGD-40 AT", "Toy-AT"]      # registration order
    assert list(cost.numbers["method_title"]) == ["PGD-40 AT", "Toy-AT"]
    assert cost.numbers.set_index("method").loc[toy_method, "time_vs_pgd_at"] == pytest.approx(0.1)
    assert "Toy-AT" in list(robust.formatted.frame["method"]) and "Toy-AT" in list(cost.formatted.frame["method"])


def test_a_registered_table_is_written_with_its_caption(study, tmp_path, monkeypatch):
    monkeypatch.setattr(tables.TABLES, "_entries", dict(tables.TABLES._entries))

    @tables.register_table("seeds", title="Seeds per method", caption="How many runs each method has.")
    def seeds(results):
        numbers = results.runs.groupby("method").size().rename("n_runs").reset_index()
        return numbers, numbers.astype(str), ["One row per method."]

    @tables.register_table("runs", title="Runs on {dataset}", caption="Runs per dataset.", per_dataset=True)
    def runs_of(results, dataset):
        numbers = results.runs[results.runs["dataset"] == dataset][["run_id"]]
        return numbers, numbers, []

    assert tables.table_names(["mnist", "cifar10"]) == [
        "robustness_cifar10", "robustness_mnist", "comparisons", "reference", "cost", "masking", "seeds",
        "runs_cifar10", "runs_mnist"]
    names, written = tables.make_tables(*study, tmp_path / "t")
    assert names == ["robustness_mnist", "comparisons", "reference", "cost", "masking", "seeds", "runs_mnist"]
    assert len(written) == len(names) * len(FORMATS)
    assert pd.read_csv(tmp_path / "t" / "seeds.csv").to_dict("list") == {"method": ["fgsm", "gmr", "pgd"],
                                                                         "n_runs": [2, 2, 1]}
    assert (tmp_path / "t" / "seeds.rst").read_text() == "**Seeds per method**\n\nHow many runs each method has.\n"
    assert "<h3>Runs on MNIST</h3>" in (tmp_path / "t" / "runs_mnist.html").read_text()


# --------------------------------------------------------------------------------------------------
# Intervals and paired comparisons (known answers)

def test_robustness_intervals_from_the_per_example_arrays(tmp_path):
    """One seed: the Wilson interval of 38/100, [29.1, 47.8] (DESIGN.md section 9). Two seeds right on the
    same 38 of 100 points: no seed-to-seed spread, so the crossed estimator is the t-interval over the
    points, 0.38 +- t(0.975, 99) sqrt(0.38 * 0.62 / 99) = [28.3, 47.7], wider than the pooled Wilson
    interval of 76/200 ([31.6, 44.9]), which it must contain."""
    gmr = make_run(tmp_path, "gmr", 0)
    pgd = [make_run(tmp_path, "pgd", s) for s in (0, 1)]
    evals = [make_eval(gmr, "best", {}, correct={"clean": flags(90, 100), "fgsm": flags(60, 100),
                                                 "pgd": flags(38, 100)})]
    evals += [make_eval(r, "best", {}, correct={"clean": flags(90, 100), "pgd": flags(38, 100)}) for r in pgd]
    t = tables.robustness(tables.load_results([gmr, *pgd], evals), "mnist")
    by = t.set_index("method")
    cols = ["pgd_mean", "pgd_low", "pgd_high", "pgd_n", "pgd_std"]
    assert list(by.loc["gmr", cols]) == pytest.approx([0.38, 0.290976, 0.477902, 100, 0.0], abs=1e-6)
    assert list(by.loc["pgd", cols]) == pytest.approx([0.38, 0.283204, 0.476796, 100, 0.0], abs=1e-6)
    assert by.loc["gmr", "pgd_interval"] == "wilson, 1 seed: no seed-to-seed spread"
    assert by.loc["pgd", "pgd_interval"] == "crossed: 2 seeds x 100 points"
    frame, notes = tables.format_robustness("mnist", t)
    cells = frame.set_index("method")
    assert cells.loc["GMR", "PGD"] == "38.0 [29.1, 47.8]" and cells.loc["GMR", "Clean"] == "90.0 [82.6, 94.5]"
    assert cells.loc["PGD-40 AT", "PGD"] == "38.0 [28.3, 47.7]" and cells.loc["PGD-40 AT", "FGSM"] == "–"
    text = " ".join(notes)
    assert "on the first 100" in text and "95% interval" in text and "aggregate_seeds" in text
    assert "Binomial only" not in text


def test_robustness_without_per_example_files_keeps_the_records_interval(tmp_path):
    """No .npz: one seed keeps the interval its record states; several seeds get the Wilson interval of
    their pooled points, marked binomial only in the CSV and the notes (never a bare point estimate)."""
    one = make_run(tmp_path, "gmr", 0)
    two = [make_run(tmp_path, "fgsm", s) for s in (0, 1)]
    evals = [make_eval(one, "best", {"pgd": 0.3}, n=100, ci={"pgd": (0.2, 0.5)})]
    evals += [make_eval(r, "best", {"pgd": a}, n=10) for r, a in zip(two, (1.0, 0.8))]
    t = tables.robustness(tables.load_results([one, *two], evals), "mnist")
    by = t.set_index("method")
    assert list(by.loc["gmr", ["pgd_mean", "pgd_low", "pgd_high"]]) == [0.3, 0.2, 0.5]
    assert by.loc["gmr", "pgd_interval"] == "wilson, 1 seed: no seed-to-seed spread"
    assert list(by.loc["fgsm", ["pgd_low", "pgd_high"]]) == pytest.approx([0.698966, 0.972134], abs=1e-6)  # Wilson 18/20
    assert by.loc["fgsm", "pgd_interval"].startswith("binomial only")
    _, notes = tables.format_robustness("mnist", t)
    binomial = next(n for n in notes if n.startswith("Binomial only"))
    assert "FGSM-AT (selected) PGD" in binomial and "GMR" not in binomial


def test_a_bad_per_example_file_is_one_clear_error(tmp_path):
    run = make_run(tmp_path, "gmr", 0)
    ev = make_eval(run, "best", {}, correct={"pgd": flags(3, 10)})
    rec = json.loads(ev.read_text())
    rec["attacks"]["pgd"]["per_example"] = "autoattack"
    ev.write_text(json.dumps(rec))
    with pytest.raises(tables.TableInputError, match="has no array 'autoattack'"):
        tables.load_evals([ev])
    ev.with_suffix(".npz").write_text("not a zip file")
    with pytest.raises(tables.TableInputError, match="best.npz of .* cannot be read"):
        tables.load_evals([ev])


def _duel(tmp_path) -> tuple[list[Path], list[Path]]:
    """GMR (seeds 0, 1, 2) against FGSM-AT (seeds 0, 1) and R-FGSM-AT (seed 0, other points), on 50 points
    per seed under PGD and, for seed 0, on 10 points under AutoAttack.
    PGD, seed 0: GMR right on points 0-19, FGSM-AT on 0-12 and 30: 7 points only GMR, 1 only FGSM-AT;
    seed 1: GMR on 0-14, FGSM-AT on 0-9 and 40: 5 and 1. Paired over both seeds: 12 against 2 of 100.
    AutoAttack, seed 0: GMR right on 2 points, FGSM-AT on none of the 10."""
    def plus(n_correct, extra):
        ok = flags(n_correct, 50)
        ok[extra] = True
        return ok

    gmr = [make_run(tmp_path, "gmr", s) for s in (0, 1, 2)]
    fgsm = [make_run(tmp_path, "fgsm", s) for s in (0, 1)]
    rfgsm = make_run(tmp_path, "rfgsm", 0)
    evals = [make_eval(gmr[0], "best", {}, correct={"pgd": flags(20, 50)}),
             make_eval(gmr[1], "best", {}, correct={"pgd": flags(15, 50)}),
             make_eval(gmr[2], "best", {}, correct={"pgd": flags(30, 50)}),
             make_eval(fgsm[0], "best", {}, correct={"pgd": plus(13, 30)}),
             make_eval(fgsm[1], "best", {}, correct={"pgd": plus(10, 40)}),
             make_eval(rfgsm, "best", {}, correct={"pgd": flags(10, 40)}),
             make_eval(gmr[0], "best", {}, correct={"autoattack": flags(2, 10)}, name="best-autoattack.json"),
             make_eval(fgsm[0], "best", {}, correct={"autoattack": flags(0, 10)}, name="best-autoattack.json")]
    return [*gmr, *fgsm, rfgsm], evals


def test_comparison_rows_known_answers(tmp_path):
    runs, evals = _duel(tmp_path)
    table = tables.build_tables(tables.load_results(runs, evals))["comparisons"]
    rows = table.numbers.set_index(["method_b", "attack"])
    assert set(rows.index) == {("fgsm", "pgd"), ("fgsm", "autoattack")}      # R-FGSM-AT: other points
    pgd = rows.loc[("fgsm", "pgd")]
    assert (pgd["method_a"], pgd["seeds"], pgd["n_seeds"], pgd["n"]) == ("gmr", "0, 1", 2, 100)
    assert (pgd["both"], pgd["only_a"], pgd["only_b"]) == (23, 12, 2)
    assert pgd["accuracy_a"] == pytest.approx(0.35) and pgd["accuracy_b"] == pytest.approx(0.25)
    assert pgd["difference"] == pytest.approx(0.10)
    assert pgd["p_value"] == pytest.approx(2 * (1 + 14 + 91) / 2 ** 14)    # exact McNemar: 2 P(X <= 2 | 14, 1/2)
    assert pgd["reading"] == "A more robust" and math.isnan(pgd["points_needed"])
    assert 0 < pgd["difference_low"] < 0.10 < pgd["difference_high"] < 0.2
    aa = rows.loc[("fgsm", "autoattack")]
    assert (aa["n"], aa["only_a"], aa["only_b"], aa["p_value"]) == (10, 2, 0, 0.5)
    # 20% against 0% of the points decides once 6 points go one way only (p = 2 / 2^6): at 28 points
    assert aa["reading"] == "no detectable difference at this n" and aa["points_needed"] == 28
    shown = table.formatted.frame.set_index("attack")
    assert shown.loc["PGD", "reading"] == "GMR more robust than FGSM-AT"
    assert shown.loc["PGD", "A − B (points)"].startswith("+10.0 [") and shown.loc["PGD", "p"] == "0.013"
    assert shown.loc["AutoAttack", "reading"] == "no detectable difference at n = 10; about 28 points would decide it"
    notes = " ".join(table.formatted.notes)
    assert "GMR vs FGSM-AT (MNIST, LeNet+, eps 0.3, selected, PGD): seed 2: only GMR was evaluated." in notes
    assert "seed 0: other test points (n = 50 and 40)" in notes
    assert "seed s of A with seed s of B" in table.caption


def test_comparisons_take_the_pairs_given(tmp_path, capsys):
    runs, evals = _duel(tmp_path)
    t = tables.build_tables(tables.load_results(runs, evals, pairs=[("fgsm", "gmr"), ("gmr", "pgd")]))
    numbers, notes = t["comparisons"].numbers, " ".join(t["comparisons"].formatted.notes)
    assert set(zip(numbers["method_a"], numbers["method_b"])) == {("fgsm", "gmr")}
    assert set(numbers["reading"]) == {"B more robust", "no detectable difference at this n"}
    assert "gmr vs pgd: no setting has evaluations of both" in notes
    out = tmp_path / "t"
    argv = ["tables", "--runs", *map(str, runs), "--evals", *map(str, evals), "--out", str(out)]
    assert main(argv + ["--comparisons", "fgsm:gmr"]) == 0
    assert "FGSM-AT vs GMR" in (out / "comparisons.md").read_text()
    for bad in ("gmr", "gmr:", "gmr:gmr"):
        assert main(argv + ["--comparisons", bad]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "--comparisons" in err[0]


def test_comparison_pairs_from_text_and_config():
    assert comparisons.parse_pairs(["gmr:fgsm,pgd", "pgd:fgsm", "gmr:pgd"]) == [
        ("gmr", "fgsm"), ("gmr", "pgd"), ("pgd", "fgsm")]
    assert comparisons.pair_specs({"gmr": ["fgsm", "rfgsm"], "pgd": ["fgsm"]}) == ["gmr:fgsm,rfgsm", "pgd:fgsm"]
    assert comparisons.pair_specs(None) == []
