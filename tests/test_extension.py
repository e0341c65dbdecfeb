"""A method registered in one file (this one) and nowhere else goes through the whole chain on real
MNIST: it trains, is evaluated and audited, and appears under its registered title in the robustness,
cost and masking tables and under its title and colour in the figures' legends.

This is the promise of the registries (README, "Adding a method"): no other file is touched."""
from __future__ import annotations

import csv
from dataclasses import dataclass

import pytest
import torch.nn.functional as F
from matplotlib.colors import to_hex

from gmr import attacks
from gmr.cost import PassCount
from gmr.evaluate import EvalConfig, evaluate_to_file
from gmr.masking.audit import DiagnoseConfig, ProbeSettings, write_audit
from gmr.methods import METHODS, StepOutput, register_method
from gmr.report import plots
from gmr.report.tables import make_tables

pytestmark = pytest.mark.usefixtures("one_thread")

TITLE, COLOUR = "Half-FGSM-AT", "#0a7e8c"


@dataclass
class HalfOptions:
    fraction: float = 0.5     # of eps


@pytest.fixture(scope="module")
def half_fgsm():
    @register_method("half_fgsm", HalfOptions, cost=lambda o, b: PassCount(2, 2),
                     description="FGSM-AT at a fraction of eps (test only)", title=TITLE, color=COLOUR)
    def half_fgsm(model, x, y, eps, o: HalfOptions) -> StepOutput:
        logits = model(attacks.fgsm(model, x, y, o.fraction * eps))
        return StepOutput(F.cross_entropy(logits, y), logits, y)

    yield "half_fgsm"
    METHODS._entries.pop("half_fgsm")


def _rows(path) -> list[dict]:
    with open(path) as fh:
        return list(csv.DictReader(fh))


def _legends(monkeypatch) -> dict[str, dict[str, str]]:
    """Legend text -> colour of its handle, for every figure `gmr plots` saves."""
    found: dict[str, dict[str, str]] = {}
    save = plots.save_figure

    def recording_save(fig, out, stem):
        entries = found.setdefault(stem, {})
        for ax in fig.axes:
            legend = ax.get_legend()
            for handle, text in zip(legend.legend_handles, legend.get_texts()) if legend else ():
                colour = handle.get_facecolor()[0] if hasattr(handle, "get_offsets") else handle.get_color()
                entries[text.get_text()] = to_hex(colour)
        return save(fig, out, stem)

    monkeypatch.setattr(plots, "save_figure", recording_save)
    return found


@pytest.mark.slow
def test_a_method_registered_in_a_test_goes_through_the_whole_chain(half_fgsm, make_run, tmp_path,
                                                                    monkeypatch):
    runs = [make_run(half_fgsm, n_train=500), make_run("gmr", n_train=500)]
    evals, audits = [], []
    for run in runs:
        out = tmp_path / "eval" / run.name / "best.json"
        evaluate_to_file(EvalConfig(run=str(run), attacks=["clean", "fgsm", "pgd"], n_test=50,
                                    attack_params={"pgd": {"steps": 5, "step_size": 0.1}}), out)
        evals.append(out)
        diag = tmp_path / "diag" / run.name
        write_audit(DiagnoseConfig(run=str(run), n_test=40, settings=ProbeSettings.quick()), diag)
        audits.append(diag / "audit.json")

    names, _ = make_tables(runs, evals, audits, tmp_path / "tables")
    assert {"robustness_mnist", "cost", "masking"} <= set(names)
    for table in ("robustness_mnist", "cost", "masking"):
        titles = {r["method"]: r["method_title"] for r in _rows(tmp_path / "tables" / f"{table}.csv")}
        assert titles[half_fgsm] == TITLE and titles["gmr"] == "GMR", table
        assert TITLE in (tmp_path / "tables" / f"{table}.md").read_text(), table

    legends = _legends(monkeypatch)
    plots.comparison_figures(runs, tmp_path / "figures", [a.parent for a in audits], evals)
    for stem in ("training_curves", "robust_accuracy_vs_cost", "accuracy_vs_eps", "accuracy_vs_steps"):
        assert legends[stem][TITLE] == COLOUR and legends[stem]["GMR"] == "#2ca02c", stem
