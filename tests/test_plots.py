"""Comparison figures (`gmr plots`): file names from files on disk, methods' registered titles and colours
in the legends, records matched to runs by run_id, Pareto front, CLI input checks. The inputs are
hand-made result files (tests/test_tables.py writes them), so no model is trained here."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from matplotlib.colors import to_hex, to_rgb
from matplotlib.container import ErrorbarContainer
from test_tables import make_audit, make_eval, make_run, run_id, toy_method  # noqa: F401 (toy_method: fixture)

from gmr.cli import main
from gmr.io import write_csv
from gmr.methods import METHODS, UNKNOWN_COLOR, method_color
from gmr.report import audit_figures, plots

COMPARISON_FIGURES = {"training_curves", "robust_accuracy_vs_cost", "loss_surfaces", "loss_along_fgsm",
                      "accuracy_vs_eps", "accuracy_vs_steps"}


def make_diagnosis(run: Path, out: Path, masking: str = "no") -> Path:
    """A `gmr diagnose` folder of the run's selected model: audit.json and the probe CSVs the
    comparison figures read (column names as gmr/masking/probes.py writes them)."""
    make_audit(run, masking, out=out, fgsm_loss_nonmonotone=0.1, boundary_distortion=0.2)
    grid = (0.0, 0.15, 0.3)
    write_csv(out / "loss_surface.csv", [{"image": i, "label": i, "eps_grad": a, "eps_random": b,
                                          "loss": a + b + i, "correct": 1}
                                         for i in (0, 1) for a in grid for b in grid])
    write_csv(out / "fgsm_line.csv", [{"index": i, "eps": t, "loss": 0.1 + t, "correct": float(t < 0.3)}
                                      for i in (0, 1) for t in (0.0, 0.3, 0.6)])
    write_csv(out / "accuracy_vs_eps.csv", [{"eps": e, "accuracy": 1 - e, "n": 16} for e in (0.0, 0.3, 1.0)])
    write_csv(out / "accuracy_vs_steps.csv", [{"steps": k, "accuracy": 0.5 / k, "n": 16} for k in (1, 5, 20)])
    write_csv(out / "accuracy_vs_restarts.csv", [{"restarts": r, "accuracy": 0.1, "n": 16} for r in (1, 2)])
    return out


@pytest.fixture
def compared(tmp_path):
    """(run dirs, diagnose dirs, evaluation files) of a standard and an FGSM-AT run."""
    runs = [make_run(tmp_path / "runs", m, 0, train_seconds=s) for m, s in (("fgsm", 10.0), ("standard", 5.0))]
    diags = [make_diagnosis(r, tmp_path / "diag" / r.name) for r in runs]
    evals = [make_eval(runs[0], "best", {"clean": 0.9, "pgd": 0.2}, n=16)]
    return runs, diags, evals


def test_cli_plots_compares_runs(compared, tmp_path, capsys):
    runs, diags, evals = compared
    out = tmp_path / "figs"
    argv = ["plots", "--runs", *map(str, runs), "--out", str(out), "--diagnostics", *map(str, diags),
            "--evals", *map(str, evals)]
    assert main(argv) == 0
    names = {p.name for p in out.iterdir()}
    assert names == {f"{s}.{e}" for s in COMPARISON_FIGURES for e in ("png", "pdf")} | {"audit_summary.csv"}
    summary = (out / "audit_summary.csv").read_text().splitlines()
    assert len(summary) == 3 and "masking" in summary[0] and "run_id" in summary[0]
    assert "Standard" in summary[1] and "FGSM-AT" in summary[2]          # registration order
    assert capsys.readouterr().out.startswith(f"{len(names)} files -> {out}")


def test_robust_accuracy_source_prefers_autoattack_then_pgd(compared):
    runs, diags, _ = compared
    items = plots._load_runs(runs)
    diag_items = plots._load_diagnostics(diags, items)
    ids = [it["run_id"] for it in items]
    pgd_only = [{"run_id": i, "run": "elsewhere", "n_examples": 10, "attacks": {"pgd": {"accuracy": a}}}
                for i, a in zip(ids, (0.1, 0.2))]
    src = plots.robustness_source(items, diag_items, pgd_only)
    assert src.label.startswith("PGD accuracy (test, n = 10") and src.values == [0.1, 0.2]
    # no interval in these records: the Wilson interval of 1/10 and 2/10
    assert src.bounds == [pytest.approx((0.017876, 0.404150), abs=1e-6), pytest.approx((0.056682, 0.509838), abs=1e-6)]
    with_aa = [dict(e, attacks={**e["attacks"], "autoattack": {"accuracy": 0.05, "ci_low": 0.01, "ci_high": 0.2}})
               for e in pgd_only]
    src = plots.robustness_source(items, diag_items, with_aa)
    assert src.label.startswith("AutoAttack") and src.values == [0.05, 0.05] and src.bounds == [(0.01, 0.2)] * 2
    src = plots.robustness_source(items, diag_items, [])
    assert "gmr diagnose" in src.label and src.values == [0.1, 0.1] and src.checkpoints == ["best", "best"]
    assert src.bounds[0] == pytest.approx((0.034977, 0.360228), abs=1e-6)      # 2 (0.1 rounded) of 16 points
    src = plots.robustness_source(items, [], [])
    assert "validation" in src.label and all(lo < v < hi for v, (lo, hi) in zip(src.values, src.bounds))


def test_pareto_front():
    xs, ys = [1, 2, 3, 4, 5], [0.1, 0.05, 0.5, 0.4, 0.6]
    assert plots.pareto_front(xs, ys) == [0, 2, 4]


def test_every_method_has_its_own_colour():
    colours = [method_color(m) for m in METHODS.names()]
    assert len(set(colours)) == len(colours) and UNKNOWN_COLOR not in colours
    assert method_color("fgsm") == "#d62728" and method_color("gmr") == "#2ca02c"
    assert method_color("pgd") == "#1f77b4" and method_color("unknown") == UNKNOWN_COLOR


def _record_figures(monkeypatch) -> dict[str, list]:
    """Collect, for every figure saved, its axes (legend text -> colour of its handle, title, colours)."""
    found: dict[str, list] = {}
    save = plots.save_figure

    def recording_save(fig, out, stem):
        found[stem] = []
        for ax in fig.axes:
            legend = ax.get_legend()
            pairs = zip(legend.legend_handles, legend.get_texts()) if legend else ()
            entries = {text.get_text(): to_hex(handle.get_facecolor()[0] if hasattr(handle, "get_offsets")
                                               else handle.get_color()) for handle, text in pairs}
            colours = {to_hex(c) for coll in ax.collections for c in coll.get_facecolor()}
            found[stem].append({"legend": entries, "title": ax.get_title(), "colours": colours})
        return save(fig, out, stem)

    monkeypatch.setattr(plots, "save_figure", recording_save)
    return found


def test_a_method_registered_in_a_test_is_in_the_legends(tmp_path, monkeypatch, toy_method):
    runs = [make_run(tmp_path, m, 0, train_seconds=s) for m, s in ((toy_method, 5.0), ("gmr", 20.0))]
    diags = [make_diagnosis(r, tmp_path / "diag" / r.name) for r in runs]
    figures = _record_figures(monkeypatch)
    plots.comparison_figures(runs, tmp_path / "figs", diags)
    assert set(figures) == COMPARISON_FIGURES
    legends = {stem: {k: v for ax in axes for k, v in ax["legend"].items()} for stem, axes in figures.items()}
    for stem in ("training_curves", "robust_accuracy_vs_cost", "accuracy_vs_eps", "accuracy_vs_steps"):
        assert legends[stem]["Toy-AT"] == "#123456" and legends[stem]["GMR"] == "#2ca02c", stem
    assert legends["loss_along_fgsm"]["Toy-AT (non-monotone 10%)"] == "#123456"
    # 3-D surfaces have no legend: the method's title heads each panel, its faces are shades of its colour
    surfaces = [ax for ax in figures["loss_surfaces"] if ax["title"].startswith("Toy-AT\n")]
    assert len(surfaces) == 2 and all(_shades_of("#123456", ax["colours"]) for ax in surfaces)


def _shades_of(colour: str, colours: set[str]) -> bool:
    """Every colour lies between the surfaces' light grey and `colour` (on the line through both)."""
    light, target = np.array(to_rgb("#f4f4f4")), np.array(to_rgb(colour))
    direction = (target - light) / np.linalg.norm(target - light)
    steps = [np.array(to_rgb(c)) - light for c in colours]
    return bool(colours) and all(np.linalg.norm(v - (v @ direction) * direction) < 0.01 for v in steps)


@pytest.mark.parametrize("case", ["--runs", "--diagnostics", "--evals", "evaluation of another run"])
def test_cli_plots_bad_input_exits_2(compared, tmp_path, capsys, case):
    runs, diags, evals = compared
    args = {"--runs": runs[:1], "--diagnostics": [], "--evals": []}
    missing = tmp_path / "missing"
    if case == "evaluation of another run":
        args["--evals"] = evals                     # measured runs[0], which is not given
        args["--runs"] = runs[1:]
    else:
        args[case] = [missing]
    argv = ["plots", "--out", str(tmp_path / "out")] + [str(t) for k, v in args.items() if v for t in [k, *v]]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert ("missing" in err) if case != "evaluation of another run" else (run_id(runs[0]) in err)
    assert not (tmp_path / "out").exists()


def test_plots_match_records_by_run_id_not_path(compared):
    runs, _, evals = compared
    rec = json.loads(evals[0].read_text())
    evals[0].write_text(json.dumps({**rec, "run": "/somewhere/else"}))
    items, _, records = plots.load_inputs(runs, (), evals)
    src = plots.robustness_source(items[1:], [], records)   # the FGSM-AT run (after Standard)
    assert src.label.startswith("PGD accuracy (test") and src.values == [0.2]


def test_labels_tell_runs_of_one_method_apart():
    items = [("FGSM-AT", "/r/a/fgsm/seed0", "best"), ("FGSM-AT", "/r/b/fgsm/seed0", "best"),
             ("GMR", "/r/a/gmr/seed0", "best")]
    assert plots._labels(items) == ["FGSM-AT (a)", "FGSM-AT (b)", "GMR"]
    assert plots._labels([("FGSM-AT", "/r/a", "best"), ("FGSM-AT", "/r/a", "last")]) == \
        ["FGSM-AT (best)", "FGSM-AT (last)"]


def _inspect_figures(monkeypatch, module) -> dict[str, dict]:
    """For every figure `module` saves: the error bars on each data axes (by title) and every legend that
    covers a data axes (its window overlaps the axes' data area), measured on the drawn figure."""
    found: dict[str, dict] = {}
    save = module.save_figure

    def recording_save(fig, out, stem):
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        data_axes = [ax for ax in fig.axes if ax.axison]
        legends = [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]
        found[stem] = {
            "errorbars": [(ax.get_title(), sum(isinstance(c, ErrorbarContainer) for c in ax.containers))
                          for ax in data_axes],
            "covering": [(stem, ax.get_title()) for legend in legends for ax in data_axes
                         if legend.get_window_extent(renderer).overlaps(ax.get_window_extent(renderer))]}
        return save(fig, out, stem)

    monkeypatch.setattr(module, "save_figure", recording_save)
    return found


def test_accuracies_have_error_bars_and_no_legend_covers_data(compared, tmp_path, monkeypatch):
    runs, diags, evals = compared
    runs.append(make_run(tmp_path / "runs", "gmr", 0, pgd_curve=(0.3, 0.05, 0.0)))  # catastrophic overfitting
    figures = _inspect_figures(monkeypatch, plots)
    plots.comparison_figures(runs, tmp_path / "figs", diags, evals)
    assert set(figures) == COMPARISON_FIGURES
    assert [c for f in figures.values() for c in f["covering"]] == []
    bars = {stem: [n for _, n in f["errorbars"]] for stem, f in figures.items()}
    # robust accuracy of every run with its interval (the validation PGD: not every run has an audit)
    assert bars["robust_accuracy_vs_cost"] == [3, 3]
    assert bars["accuracy_vs_eps"] == [2] and bars["accuracy_vs_steps"] == [2, 2]   # one curve per audit
    assert dict(figures["loss_along_fgsm"]["errorbars"])["accuracy along the FGSM direction"] == 2
    assert bars["training_curves"] == [0, 0, 0, 0]                                  # curves: no bars


def test_audit_accuracy_figures_have_error_bars(tmp_path, monkeypatch):
    run = make_run(tmp_path, "fgsm", 0)
    d = make_diagnosis(run, tmp_path / "diag")
    write_csv(d / "attack_gap.csv", [{"attack": a, "accuracy": v, "mean_loss": 0.1, "n": 16}
                                     for a, v in (("clean", 0.9), ("fgsm", 0.8), ("pgd", 0.1))])
    write_csv(d / "autoattack.csv", [{"attack": "autoattack", "accuracy": 0.0, "n": 8}])
    write_csv(d / "accuracy_vs_eps.csv", [{"eps": e, "accuracy": 1 - e, "steps": 5, "n": 16} for e in (0.0, 0.3)])
    write_csv(d / "accuracy_vs_restarts.csv", [{"restarts": r, "steps": 5, "accuracy": 0.1, "n": 16} for r in (1, 2)])
    audit = json.loads((d / "audit.json").read_text())
    figures = _inspect_figures(monkeypatch, audit_figures)
    audit_figures._fig_attacks(d, audit)
    audit_figures._fig_sanity(d, audit)
    assert [n for _, n in figures["attacks"]["errorbars"]] == [1]    # one set: clean, FGSM, PGD, AA (n=8)
    assert [n for _, n in figures["sanity_curves"]["errorbars"]] == [1, 1, 1]
