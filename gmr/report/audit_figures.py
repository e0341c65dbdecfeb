"""The figures of one `gmr diagnose` folder, drawn from its probe CSVs and the audit (in memory, so
audit.json is written once, after them): attacks, fgsm_line, loss_surface, sanity_curves,
gradient_checks and, when the run has a training log, training_curves. PNG and PDF each."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ..io import read_csv
from .style import (LOSS_FLOOR, _col, _co_epoch, _draw_surface, _finish_training_axes, _log_x, _surface_grid,
                    _title, _training_axes, accuracy_bounds, draw_intervals, error_bars, method_color,
                    method_label, plt, save_figure, training_legend)


def diagnosis_figures(diag_dir: str | Path, audit: dict) -> list[Path]:
    """Draw every figure of one `gmr diagnose` output folder into that folder, from its probe CSVs and
    `audit` (with summary and verdict, not yet written)."""
    d = Path(diag_dir)
    written: list[Path] = []
    written += _fig_attacks(d, audit)
    written += _fig_fgsm_line(d, audit)
    written += _fig_loss_surface(d, audit)
    written += _fig_sanity(d, audit)
    written += _fig_gradient_checks(d, audit)
    if (d / "training_curves.csv").exists():
        written += _fig_training(d, audit)
    return written


def _attack_bars(d: Path, audit: dict) -> tuple[list[str], list[float], list, list[str]]:
    """Names, accuracies, 95% intervals (from each row's n) and colours of the attacks bar chart."""
    rows = read_csv(d / "attack_gap.csv")
    names = [str(r["attack"]).upper() if r["attack"] != "clean" else "clean" for r in rows]
    accs = [r["accuracy"] for r in rows]
    bounds = [accuracy_bounds(r["accuracy"], r.get("n", audit["n_examples"])) for r in rows]
    colors = ["#999999", "#f4a582", "#b2182b"]
    if (d / "transfer.csv").exists():
        for r in read_csv(d / "transfer.csv"):
            if r["kind"] == "transfer":
                names.append("PGD transfer")
                accs.append(r["accuracy"])
                bounds.append(accuracy_bounds(r["accuracy"], r.get("n", audit["n_examples"])))
                colors.append("#92c5de")
    if (d / "autoattack.csv").exists():
        for r in read_csv(d / "autoattack.csv"):
            n_aa = r.get("n", float("nan"))
            suffix = f" (n={int(n_aa)})" if not math.isnan(n_aa) and int(n_aa) != audit["n_examples"] else ""
            names.append(("AA" if r["attack"] == "autoattack" else f"AA: {r['attack']}") + suffix)
            accs.append(r["accuracy"])
            bounds.append(accuracy_bounds(r["accuracy"], n_aa))
            colors.append("#5e3c99" if r["attack"] == "autoattack" else "#b2abd2")
    return names, accs, bounds, colors[:len(names)] + ["#cccccc"] * (len(names) - len(colors))


def _fig_attacks(d: Path, audit: dict) -> list[Path]:
    names, accs, bounds, colors = _attack_bars(d, audit)
    fig, ax = plt.subplots(figsize=(max(4.5, 0.8 * len(names) + 1.5), 3.4))
    bars = ax.bar(range(len(names)), accs, color=colors, yerr=error_bars(accs, bounds), capsize=3,
                  error_kw={"elinewidth": 1, "ecolor": "#333333"})
    for b, a, (_, high) in zip(bars, accs, bounds):
        if not math.isnan(a):
            top = high if not math.isnan(high) else a
            ax.text(b.get_x() + b.get_width() / 2, top + 0.01, f"{a:.2f}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(names)), names, rotation=20)
    ax.set_ylim(0, 1.12)
    ax.set_ylabel("accuracy (fraction of test points)")
    gap = audit["summary"]["fgsm_pgd_accuracy_gap"]
    ax.set_title(f"{_title(audit)}\naccuracy under attack, eps = {audit['eps']:.3g}, "
                 f"n = {audit['n_examples']} (bars: 95% intervals); FGSM - PGD gap {gap:.2f}")
    return save_figure(fig, d, "attacks")


def _fig_fgsm_line(d: Path, audit: dict) -> list[Path]:
    rows = read_csv(d / "fgsm_line.csv")
    idx, t, loss, ok = (_col(rows, k) for k in ("index", "eps", "loss", "correct"))
    ts = np.unique(t)
    n = len(np.unique(idx))
    L = np.maximum(loss.reshape(n, len(ts)), LOSS_FLOOR)
    C = ok.reshape(n, len(ts))
    eps = audit["eps"]
    s = audit["summary"]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.4))
    for i in range(min(n, 12)):
        a1.plot(ts, L[i], color="#bbbbbb", lw=0.7, zorder=1)
    a1.fill_between(ts, np.percentile(L, 25, 0), np.percentile(L, 75, 0), color=method_color(audit["method"]),
                    alpha=0.25, label="25-75% of points", zorder=2)
    a1.plot(ts, np.median(L, 0), color=method_color(audit["method"]), lw=2, label="median", zorder=3)
    a1.plot([], [], color="#bbbbbb", lw=0.7, label="single points")
    a1.axvline(eps, color="k", ls="--", lw=1, label=f"training eps {eps:.3g}")
    a1.set_yscale("log")
    a1.set_xlabel("step t along sign(grad x) (Linf, pixel units in [0, 1])")
    a1.set_ylabel(f"cross-entropy loss (nats, log; floor {LOSS_FLOOR:g})")
    a1.set_title(f"loss along the FGSM direction\nnon-monotone: {s['fgsm_loss_nonmonotone']:.1%} of points")
    a1.legend(loc="best")
    a2.plot(ts, C.mean(0), color=method_color(audit["method"]), lw=2, label="accuracy at x + t sign(grad)")
    a2.axvline(eps, color="k", ls="--", lw=1, label=f"training eps {eps:.3g}")
    a2.set_ylim(-0.02, 1.02)
    a2.set_xlabel("step t along sign(grad x) (Linf, pixel units in [0, 1])")
    a2.set_ylabel("accuracy (fraction of points)")
    a2.set_title(f"decision boundary along the FGSM direction\n"
                 f"distorted (wrong before eps, right at eps): {s['boundary_distortion']:.1%}")
    a2.legend(loc="best")
    fig.suptitle(_title(audit), y=1.04)
    return save_figure(fig, d, "fgsm_line")


def _fig_loss_surface(d: Path, audit: dict) -> list[Path]:
    rows = read_csv(d / "loss_surface.csv")
    images = sorted({int(r["image"]) for r in rows})
    fig = plt.figure(figsize=(3.2 * len(images), 3.4))
    for k, i in enumerate(images):
        g1, g2, Z, label = _surface_grid(rows, i)
        ax = fig.add_subplot(1, len(images), k + 1, projection="3d")
        _draw_surface(ax, g1, g2, Z, method_color(audit["method"]), f"test image {i} (label {label})")
    fig.suptitle(f"{_title(audit)}\nloss at x + eps1 sign(grad x) + eps2 sign(random), eps1, eps2 in "
                 f"[0, {audit['eps']:.3g}] (Tramer et al. 2018)")
    return save_figure(fig, d, "loss_surface")


def _accuracy_points(ax, rows, x_key: str, color: str, **kw) -> list[tuple[float, float]]:
    """Accuracy against `x_key` with its 95% intervals (from each row's n) as error bars; the bounds."""
    xs, ys = _col(rows, x_key), _col(rows, "accuracy")
    bounds = [accuracy_bounds(y, r.get("n")) for y, r in zip(ys, rows)]
    ax.plot(xs, ys, "o-", color=color, **kw)
    draw_intervals(ax, xs, ys, bounds, color)
    return bounds


def _fig_sanity(d: Path, audit: dict) -> list[Path]:
    color = method_color(audit["method"])
    fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(12, 3.4))
    rows = read_csv(d / "accuracy_vs_eps.csv")
    _accuracy_points(a1, rows, "eps", color, label="PGD")
    a1.axvline(audit["eps"], color="k", ls="--", lw=1, label=f"training eps {audit['eps']:.3g}")
    a1.axhline(0.05, color="#999999", ls=":", lw=1, label="must fall below 0.05")
    a1.set_xlabel("Linf budget eps (pixel units in [0, 1])")
    a1.set_ylabel("accuracy (fraction; bars: 95% intervals)")
    a1.set_ylim(-0.02, 1.02)
    a1.set_title(f"accuracy vs eps (PGD-{int(rows[-1]['steps'])}, n = {int(rows[0]['n'])})")
    a1.legend()
    rows = read_csv(d / "accuracy_vs_steps.csv")
    spans = [(rows, _accuracy_points(a2, rows, "steps", color))]
    _log_x(a2, _col(rows, "steps"))
    a2.set_xlabel("PGD steps (log scale; step size max(default, 2.5 eps / steps))")
    a2.set_ylabel("accuracy (fraction)")
    a2.set_title(f"accuracy vs PGD steps at eps = {audit['eps']:.3g}")
    rows = read_csv(d / "accuracy_vs_restarts.csv")
    spans.append((rows, _accuracy_points(a3, rows, "restarts", color)))
    a3.set_xlabel(f"random restarts (PGD-{int(rows[0]['steps'])} each)")
    a3.set_ylabel("accuracy (fraction; worst case)")
    a3.xaxis.get_major_locator().set_params(integer=True)
    a3.set_title("accuracy vs restarts")
    for ax, (rows, bounds) in zip((a2, a3), spans):
        values = [v for r, (lo, hi) in zip(rows, bounds) for v in (r["accuracy"], lo, hi) if not math.isnan(v)]
        ax.set_ylim(max(-0.02, min(values) - 0.1), min(1.02, max(values) + 0.1))
    fig.suptitle(_title(audit), y=1.02)
    fig.tight_layout()
    return save_figure(fig, d, "sanity_curves")


def _fig_gradient_checks(d: Path, audit: dict) -> list[Path]:
    rows = read_csv(d / "per_example.csv")
    color = method_color(audit["method"])
    s = audit["summary"]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.2))
    agree = _col(rows, "sign_agreement")
    agree = agree[~np.isnan(agree)]
    a1.hist(agree, bins=np.linspace(0, 1, 41), color=color, alpha=0.8)
    a1.axvline(0.5, color="#999999", ls=":", label="chance (0.5)")
    a1.set_xlabel("fraction of coordinates with sign(grad x) = sign(grad(x + eta))")
    a1.set_ylabel("test points (count)")
    a1.set_title(f"gradient sign agreement: mean {s['gradient_sign_agreement']:.2f}; "
                 f"alignment {s['gradient_alignment']:.2f}")
    a1.legend()
    a2.hist(_col(rows, "fgsm_pgd_cosine"), bins=np.linspace(-1, 1, 41), color=color, alpha=0.8)
    a2.set_xlabel("cosine(FGSM perturbation, PGD perturbation)")
    a2.set_ylabel("test points (count)")
    a2.set_title(f"FGSM-PGD perturbation cosine: mean {s['fgsm_pgd_perturbation_cosine']:.2f}")
    fig.suptitle(_title(audit), y=1.03)
    return save_figure(fig, d, "gradient_checks")


def _fig_training(d: Path, audit: dict) -> list[Path]:
    rows = read_csv(d / "training_curves.csv")
    fig, axes = plt.subplots(2, 2, figsize=(10, 6.4))
    axes = axes.ravel()
    _training_axes(axes, rows, method_color(audit["method"]), method_label(audit["method"]), _co_epoch(rows))
    _finish_training_axes(axes)
    fig.suptitle(f"{_title(audit)}: training log (rule for catastrophic overfitting: Wong et al. 2020)")
    fig.tight_layout()
    training_legend(fig, axes)
    return save_figure(fig, d, "training_curves")
