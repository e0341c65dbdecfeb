"""gmr.tables and `gmr tables` on hand-made result files with known answers (no training)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest

from gmr.report import tables
from gmr.cli import main

CIFAR_EPS = 8 / 255


def make_run(root: Path, method: str, seed: int, *, dataset="mnist", model="lenet_plus", eps=0.3,
             train_seconds=10.0, pgd_curve=(0.3, 0.4, 0.45), fgsm_curve=(0.5, 0.6, 0.65), options=None) -> Path:
    d = root / f"{dataset}-{model}-{method}-{eps:.4f}-s{seed}"
    d.mkdir(parents=True)
    epochs = len(pgd_curve)
    meta = {
        "schema": "gmr.run/1", "status": "complete",
        "config": {"dataset": dataset, "model": model, "method": method, "seed": seed, "epochs": epochs},
        "eps": eps, "method_options": options or {}, "data": {"n_train": 1000},
        "selection": {"best_epoch": epochs, "last_epoch": epochs},
        "cost": {"train_seconds": train_seconds, "seconds_per_epoch": train_seconds / epochs,
                 "passes_per_sample": {"pgd": 11.0, "gmr": 4.0}.get(method, 2.0),
                 "declared_passes_per_sample": {"pgd": 11.0, "gmr": 4.0}.get(method, 2.0),
                 "images_per_second": 1000 / train_seconds, "peak_memory_mb": 900.0,
                 "device": "cpu", "device_name": "x86_64", "threads": 1},
    }
    (d / "run.json").write_text(json.dumps(meta))
    lines = ["epoch,val_clean,val_fgsm,val_ifgsm3,val_pgd"]
    lines += [f"{e + 1},0.9,{f},{p},{p}" for e, (p, f) in enumerate(zip(pgd_curve, fgsm_curve))]
    (d / "train_log.csv").write_text("\n".join(lines) + "\n")
    return d


def make_eval(run: Path, checkpoint: str, accs: dict[str, float], n=500, name=None, steps=None) -> Path:
    meta = json.loads((run / "run.json").read_text())
    cfg = meta["config"]
    rec = {"schema": "gmr.eval/1", "run": str(run), "checkpoint": checkpoint, "method": cfg["method"],
           "dataset": cfg["dataset"], "model": cfg["model"], "train_seed": cfg["seed"], "n_examples": n,
           "eps": meta["eps"],
           "attacks": {a: {"accuracy": v, "n_examples": n, "eps": 0.0 if a == "clean" else meta["eps"],
                           "params": {"steps": steps} if steps and a.startswith("pgd") else {}}
                       for a, v in accs.items()}}
    path = run / (name or f"{checkpoint}.json")
    path.write_text(json.dumps(rec))
    return path


def make_audit(run: Path, masking: str, failed=()) -> Path:
    meta = json.loads((run / "run.json").read_text())
    cfg = meta["config"]
    checks = [{"name": c, "value": 1.0, "threshold": 0.5, "passed": False, "role": "evidence",
               "explanation": "x", "source": "s"} for c in failed]
    checks.append({"name": "clean_accuracy", "value": 0.9, "threshold": None, "passed": None, "role": "info",
                   "explanation": "x", "source": "s"})
    audit = {"schema": "gmr.audit/1", "run": str(run), "checkpoint": "best", "method": cfg["method"],
             "dataset": cfg["dataset"], "model": cfg["model"], "train_seed": cfg["seed"], "eps": meta["eps"],
             "summary": {"clean_accuracy": 0.9, "fgsm_accuracy": 0.8, "pgd_accuracy": 0.1,
                         "fgsm_pgd_accuracy_gap": 0.7, "gradient_alignment": 0.2},
             "checks": checks, "verdict": {"masking": masking, "reasons": ["r"]}}
    path = run / "audit.json"
    path.write_text(json.dumps(audit))
    return path


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
        audits.append(make_audit(r, "no" if seed == 0 else "inconclusive", [] if seed == 0 else ["gradient_alignment"]))
    r = make_run(tmp_path, "pgd", 0, train_seconds=100, options={"steps": 10})
    runs.append(r)
    evals += [make_eval(r, "best", {"clean": 0.9, "fgsm": 0.7, "pgd": 0.6})]
    return runs, evals, audits


def test_robustness_means_stds_and_co_rate(study):
    runs, evals, audits = study
    out = tables.robustness(tables.load_runs(runs), tables.load_evals(evals))
    t = out["robustness_mnist"].set_index(["method", "checkpoint"])
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
    ref = tables.reference(tables.load_runs([run]), tables.load_evals([ev]), published)
    got = {(r.model, r.metric): (r.ours, r.delta) for r in ref.itertuples()}
    assert got[("ResNet-18", "clean")] == pytest.approx((80.0, 80.0 - 82.29))
    assert got[("ResNet-18", "PGD-20")] == pytest.approx((45.0, 45.0 - 46.23))
    assert all(math.isnan(v) for v in got[("ResNet-18", "PGD-7")])          # we ran PGD-20, not PGD-7
    assert all(math.isnan(v) for v in got[("ResNet-18", "AutoAttack")])     # not evaluated
    assert all(math.isnan(v) for v in got[("PreActResNet-18", "clean")])    # other architecture


def test_shipped_reference_numbers_load():
    ref = tables.reference_numbers()
    gmr = ref[(ref["method"] == "gmr") & (ref["model"] == "ResNet-18")].iloc[0]
    assert gmr["autoattack"] == pytest.approx(43.72)


def test_cli_writes_every_format(study, tmp_path, capsys):
    runs, evals, audits = study
    out = tmp_path / "tables"
    assert main(["tables", "--runs", *map(str, runs), "--evals", *map(str, evals),
                 "--audits", *map(str, audits), "--out", str(out)]) == 0
    for name in ("robustness_mnist", "reference", "cost", "masking"):
        for ext in ("csv", "md", "tex", "html"):
            assert (out / f"{name}.{ext}").stat().st_size > 0
    md = (out / "robustness_mnist.md").read_text()
    assert "| FGSM-AT   | selected" in md and "80.0 ± 14.1" in md and "1/2" in md
    tex = (out / "robustness_mnist.tex").read_text()
    assert r"\begin{tabular}" in tex and r"$\pm$" in tex and "±" not in tex
    assert "<table" in (out / "masking.html").read_text()
    csv = pd.read_csv(out / "robustness_mnist.csv")
    assert {"fgsm_mean", "fgsm_std", "fgsm_n", "co_rate"} <= set(csv.columns)


def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    run = make_run(tmp_path, "gmr", 0)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert main(["tables", "--runs", str(run), "--evals", str(bad), "--out", str(tmp_path / "t")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bad.json" in err[0]
    assert main(["tables", "--runs", str(tmp_path / "missing"), "--out", str(tmp_path / "t")]) == 2
    assert not (tmp_path / "t" / "cost.csv").exists()


def test_evaluation_linked_to_its_run_by_setting_when_the_path_differs(tmp_path):
    """A record written elsewhere names its run by a path relative to where `gmr evaluate` ran."""
    run = make_run(tmp_path, "fgsm", 0, pgd_curve=(0.3, 0.05, 0.0), fgsm_curve=(0.5, 0.6, 0.9))
    ev = make_eval(run, "best", {"clean": 0.9, "fgsm": 0.8, "pgd": 0.0})
    rec = json.loads(ev.read_text())
    rec["run"] = "results/runs/somewhere/else"
    ev.write_text(json.dumps(rec))
    t = tables.robustness(tables.load_runs([run]), tables.load_evals([ev]))["robustness_mnist"]
    assert t.loc[0, "co_runs"] == 1 and t.loc[0, "clean_mean"] == 0.9 and t.loc[0, "eps"] == 0.3
