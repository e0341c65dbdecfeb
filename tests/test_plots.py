"""Comparison figures (`gmr plots`): file names from files on disk, methods' registered titles and colours
in the legends, records matched to runs by run_id, Pareto front, CLI input checks. The inputs are
hand-made result files (tests/test_tables.py writes them), so no model is trained here."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from matplotlib.colors import to_hex, to_rgb
from test_tables import make_audit, make_eval, make_run, run_id, toy_method  # noqa: F401 (toy_method: fixture)

from gmr.cli import main
from gmr.io import write_csv
from gmr.methods import METHODS, UNKNOWN_COLOR, method_color
from gmr.report import plots

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
    write_csv(out / "accuracy_vs_eps.csv", [{"eps": e, "accuracy": 1 - e} for e in (0.0, 0.3, 1.0)])
    write_csv(out / "accuracy_vs_steps.csv", [{"steps": k, "accuracy": 0.5 / k} for k in (1, 5, 20)])
    write_csv(out / "accuracy_vs_restarts.csv", [{"restarts": r, "accuracy": 0.1} for r in (1, 2)])
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
    label, ys, _ = plots.robustness_source(items, diag_items, pgd_only)
    assert label.startswith("PGD accuracy (test") and ys == [0.1, 0.2]
    with_aa = [dict(e, attacks={**e["attacks"], "autoattack": {"accuracy": 0.05}}) for e in pgd_only]
    label, ys, _ = plots.robustness_source(items, diag_items, with_aa)
    assert label.startswith("AutoAttack") and ys == [0.05, 0.05]
    label, ys, ckpts = plots.robustness_source(items, diag_items, [])
    assert "gmr diagnose" in label and ys == [0.1, 0.1] and ckpts == ["best", "best"]
    label, _, _ = plots.robustness_source(items, [], [])
    assert "validation" in label


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
    label, ys, _ = plots.robustness_source(items[1:], [], records)   # the FGSM-AT run (after Standard)
    assert label.startswith("PGD accuracy (test") and ys == [0.2]


def test_labels_tell_runs_of_one_method_apart():
    items = [("FGSM-AT", "/r/a/fgsm/seed0", "best"), ("FGSM-AT", "/r/b/fgsm/seed0", "best"),
             ("GMR", "/r/a/gmr/seed0", "best")]
    assert plots._labels(items) == ["FGSM-AT (a)", "FGSM-AT (b)", "GMR"]
    assert plots._labels([("FGSM-AT", "/r/a", "best"), ("FGSM-AT", "/r/a", "last")]) == \
        ["FGSM-AT (best)", "FGSM-AT (last)"]
