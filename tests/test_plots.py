"""Figures: expected file names from files on disk, fixed method colours, Pareto front, CLI input checks."""
from __future__ import annotations

import json

import pytest

from gmr import plots
from gmr.cli import main
from gmr.diagnostics import DiagnoseConfig, ProbeSettings, diagnose, write_diagnosis
from gmr.methods import METHODS

# make_run's default (1 epoch, step schedule) stays at chance; this learns (about 75% clean accuracy)
TRAINED = dict(schedule="constant", lr=0.05)
TINY = ProbeSettings(batch_size=64, n_curve=16, n_surface=2, surface_points=5, line_points=11,
                     pgd_steps=(1, 5), restarts=2, restart_steps=3, sweep_steps=3,
                     eps_factors=(0.0, 1.0), large_eps=(1.0,), attack_steps=5)

DIAGNOSIS_FIGURES = {"attacks", "fgsm_line", "loss_surface", "sanity_curves", "gradient_checks",
                     "training_curves"}
COMPARISON_FIGURES = {"training_curves", "robust_accuracy_vs_cost", "loss_surfaces", "loss_along_fgsm",
                      "accuracy_vs_eps", "accuracy_vs_steps"}


@pytest.fixture(scope="module")
def diagnosed(make_run, tmp_path_factory):
    """(run dir, diagnose dir) for a standard and an FGSM-AT run (small probes)."""
    out = []
    for method in ("standard", "fgsm"):
        run = make_run(method, **TRAINED) if method == "standard" else make_run(method)
        d = tmp_path_factory.mktemp(f"diag-{method}")
        write_diagnosis(diagnose(DiagnoseConfig(run=str(run), n_test=16, device="cpu", settings=TINY)), d)
        out.append((run, d))
    return out


def _stems(paths, ext):
    return {p.stem for p in paths if p.suffix == f".{ext}"}


def test_diagnosis_figures_have_fixed_names(diagnosed):
    _, d = diagnosed[0]
    written = plots.diagnosis_figures(d)
    assert _stems(written, "png") == DIAGNOSIS_FIGURES == _stems(written, "pdf")
    for p in written:
        assert p.parent == d and p.stat().st_size > 1000
    assert not list(d.glob(".tmp-*"))


def test_cli_plots_compares_runs(diagnosed, tmp_path, capsys):
    (r1, d1), (r2, d2) = diagnosed
    ev = tmp_path / "eval-fgsm.json"
    ev.write_text(json.dumps({"run": str(r2), "checkpoint": "best", "n_examples": 16,
                              "attacks": {"pgd": {"accuracy": 0.2}}}))
    out = tmp_path / "figs"
    argv = ["plots", "--runs", str(r1), str(r2), "--out", str(out), "--diagnostics", str(d1), str(d2),
            "--evals", str(ev)]
    assert main(argv) == 0
    names = {p.name for p in out.iterdir()}
    expected = {f"{s}.{e}" for s in COMPARISON_FIGURES for e in ("png", "pdf")} | {"audit_summary.csv"}
    assert names == expected
    summary = (out / "audit_summary.csv").read_text().splitlines()
    assert len(summary) == 3 and "masking" in summary[0]
    assert "Standard" in summary[1] and "FGSM-AT" in summary[2]          # fixed method order


def test_robust_accuracy_source_prefers_autoattack_then_pgd(diagnosed):
    (r1, d1), (r2, d2) = diagnosed
    runs = plots._load_runs([r1, r2])
    diags = plots._load_diagnostics([d1, d2])
    pgd_only = [{"run": str(r), "n_examples": 10, "attacks": {"pgd": {"accuracy": a}}}
                for r, a in ((r1, 0.1), (r2, 0.2))]
    label, ys, _ = plots.robustness_source(runs, diags, pgd_only)
    assert label.startswith("PGD accuracy (test") and ys == [0.1, 0.2]
    with_aa = [dict(e, attacks={**e["attacks"], "autoattack": {"accuracy": 0.05}}) for e in pgd_only]
    label, ys, _ = plots.robustness_source(runs, diags, with_aa)
    assert label.startswith("AutoAttack") and ys == [0.05, 0.05]
    label, ys, ckpts = plots.robustness_source(runs, diags, [])
    assert "gmr diagnose" in label and len(ys) == 2 and ckpts == ["best", "best"]
    label, _, _ = plots.robustness_source(runs, [], [])
    assert "validation" in label


def test_pareto_front():
    xs, ys = [1, 2, 3, 4, 5], [0.1, 0.05, 0.5, 0.4, 0.6]
    assert plots.pareto_front(xs, ys) == [0, 2, 4]


def test_every_method_has_its_own_fixed_colour():
    names = METHODS.names()
    assert set(names) <= set(plots.METHOD_COLORS)
    colours = [plots.method_color(m) for m in names]
    assert len(set(colours)) == len(colours)
    assert plots.method_color("fgsm") == "#d62728" and plots.method_color("gmr") == "#2ca02c"
    assert plots.method_color("pgd") == "#1f77b4" and plots.method_color("unknown") == plots.UNKNOWN_COLOR


@pytest.mark.parametrize("flag", ["--runs", "--diagnostics", "--evals"])
def test_cli_plots_bad_input_exits_2(make_run, tmp_path, capsys, flag):
    run = make_run("standard", **TRAINED)
    args = {"--runs": [str(run)], "--diagnostics": [], "--evals": []}
    args[flag] = [str(tmp_path / "missing")]
    argv = ["plots", "--out", str(tmp_path / "out")] + [t for k, v in args.items() if v for t in [k, *v]]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "missing" in err
    assert not (tmp_path / "out").exists()


def test_labels_tell_runs_of_one_method_apart():
    items = [("fgsm", "/r/a/fgsm/seed0", "best"), ("fgsm", "/r/b/fgsm/seed0", "best"),
             ("gmr", "/r/a/gmr/seed0", "best")]
    assert plots._labels(items) == ["FGSM-AT (a)", "FGSM-AT (b)", "GMR"]
    assert plots._labels([("fgsm", "/r/a", "best"), ("fgsm", "/r/a", "last")]) == \
        ["FGSM-AT (best)", "FGSM-AT (last)"]
    assert plots._labels([("my_method", "/r/a", None)]) == ["my_method"]
