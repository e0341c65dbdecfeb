"""Matplotlib figures drawn from result files on disk (never from objects in memory).

Two entry points, both writing PNG and PDF with fixed file names:

- `diagnosis_figures(diag_dir)`: the figures of one `gmr diagnose` output folder (reads audit.json and
  the probe CSVs there): attacks, fgsm_line, loss_surface, sanity_curves, gradient_checks and, when the
  run has a training log, training_curves.
- `comparison_figures(runs, out, diagnostics, evals)`: comparisons across runs (`gmr plots`):
  training_curves, robust_accuracy_vs_cost and, from diagnose folders, loss_surfaces, loss_along_fgsm,
  accuracy_vs_eps and accuracy_vs_steps; plus audit_summary.csv (one row per audit).

Every method has one colour everywhere (`METHOD_COLORS`).
"""
from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Iterable, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .io import atomic_path, read_json, write_text  # noqa: E402

# One fixed colour and display name per method (tab10 colours; FGSM-AT red, GMR green, PGD-AT blue).
METHOD_COLORS: dict[str, str] = {
    "standard": "#7f7f7f", "fgsm": "#d62728", "rfgsm": "#ff7f0e", "gmr": "#2ca02c", "pgd": "#1f77b4",
    "fgsm_rs": "#9467bd", "n_fgsm": "#8c564b", "gradalign": "#e377c2", "sat_r1": "#17becf",
    "sat_r3": "#bcbd22",
}
METHOD_LABELS: dict[str, str] = {
    "standard": "Standard", "fgsm": "FGSM-AT", "rfgsm": "R-FGSM-AT", "gmr": "GMR", "pgd": "PGD-AT",
    "fgsm_rs": "FGSM-RS", "n_fgsm": "N-FGSM", "gradalign": "GradAlign", "sat_r1": "SAT-R1",
    "sat_r3": "SAT-R3",
}
METHOD_ORDER = list(METHOD_COLORS)
UNKNOWN_COLOR = "#000000"
LOSS_FLOOR = 1e-4  # losses below this are drawn at it on log axes (float32 CE can be exactly 0)
FORMATS = ("png", "pdf")

plt.rcParams.update({"figure.dpi": 110, "savefig.dpi": 130, "axes.grid": True, "grid.alpha": 0.3,
                     "axes.titlesize": 10, "axes.labelsize": 9, "legend.fontsize": 8,
                     "xtick.labelsize": 8, "ytick.labelsize": 8, "figure.titlesize": 11})


def method_color(method: str) -> str:
    return METHOD_COLORS.get(method, UNKNOWN_COLOR)


def method_label(method: str) -> str:
    return METHOD_LABELS.get(method, method)


def _order_key(method: str, path: str) -> tuple:
    return (METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER), method, path)


def save_figure(fig, out: str | Path, stem: str) -> list[Path]:
    """Write `stem`.png and `stem`.pdf into `out` atomically; close the figure."""
    out = Path(out)
    paths = []
    for fmt in FORMATS:
        path = out / f"{stem}.{fmt}"
        meta = {"CreationDate": None} if fmt == "pdf" else {"Software": None}
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format=fmt, bbox_inches="tight", metadata=meta)
        paths.append(path)
    plt.close(fig)
    return paths


def read_csv(path: str | Path) -> list[dict[str, float | str]]:
    """Rows of a CSV with numbers converted to float (empty cells: nan)."""
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    out = []
    for row in rows:
        conv = {}
        for k, v in row.items():
            try:
                conv[k] = float(v) if v != "" else float("nan")
            except (TypeError, ValueError):
                conv[k] = v
        out.append(conv)
    return out


def _log_x(ax, ticks: Sequence[float] | None = None) -> None:
    """Log x axis with plain numbers (1, 10, 100 or the given ticks) instead of 10^k labels."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.set_xscale("log")
    if ticks is not None:
        ax.set_xticks(list(ticks))
    else:
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())


def _epoch_ticks(ax, epochs: Sequence[float]) -> None:
    epochs = sorted(set(int(e) for e in epochs))
    if epochs and len(epochs) <= 25:
        ax.set_xticks(epochs)
        ax.set_xlim(epochs[0] - 0.5, epochs[-1] + 0.5)


def _col(rows, key) -> np.ndarray:
    return np.array([r[key] for r in rows], dtype=float)


# --------------------------------------------------------------------------------------------------
# Figures of one diagnose folder

def _title(audit: dict) -> str:
    return (f"{method_label(audit['method'])} ({Path(audit['run']).name}, {audit['checkpoint']}): "
            f"masking {audit['verdict']['masking']}")


def diagnosis_figures(diag_dir: str | Path) -> list[Path]:
    """Draw every figure of one `gmr diagnose` output folder into that folder."""
    d = Path(diag_dir)
    audit = read_json(d / "audit.json")
    written: list[Path] = []
    written += _fig_attacks(d, audit)
    written += _fig_fgsm_line(d, audit)
    written += _fig_loss_surface(d, audit)
    written += _fig_sanity(d, audit)
    written += _fig_gradient_checks(d, audit)
    if (d / "training_curves.csv").exists():
        written += _fig_training(d, audit)
    return written


def _fig_attacks(d: Path, audit: dict) -> list[Path]:
    rows = read_csv(d / "attack_gap.csv")
    names = [str(r["attack"]).upper() if r["attack"] != "clean" else "clean" for r in rows]
    accs = [r["accuracy"] for r in rows]
    colors = ["#999999", "#f4a582", "#b2182b"]
    if (d / "transfer.csv").exists():
        for r in read_csv(d / "transfer.csv"):
            if r["kind"] == "transfer":
                names.append("PGD transfer")
                accs.append(r["accuracy"])
                colors.append("#92c5de")
    if (d / "autoattack.csv").exists():
        for r in read_csv(d / "autoattack.csv"):
            n_aa = r.get("n", float("nan"))
            suffix = f" (n={int(n_aa)})" if not math.isnan(n_aa) and int(n_aa) != audit["n_examples"] else ""
            names.append(("AA" if r["attack"] == "autoattack" else f"AA: {r['attack']}") + suffix)
            accs.append(r["accuracy"])
            colors.append("#5e3c99" if r["attack"] == "autoattack" else "#b2abd2")
    fig, ax = plt.subplots(figsize=(max(4.5, 0.8 * len(names) + 1.5), 3.4))
    bars = ax.bar(range(len(names)), accs, color=colors[:len(names)] + ["#cccccc"] * (len(names) - len(colors)))
    for b, a in zip(bars, accs):
        if not math.isnan(a):
            ax.text(b.get_x() + b.get_width() / 2, a + 0.01, f"{a:.2f}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(names)), names, rotation=20)
    ax.set_ylim(0, 1.08)
    ax.set_ylabel("accuracy (fraction of test points)")
    gap = audit["summary"]["fgsm_pgd_accuracy_gap"]
    ax.set_title(f"{_title(audit)}\naccuracy under attack, eps = {audit['eps']:.3g}, "
                 f"n = {audit['n_examples']}; FGSM - PGD gap {gap:.2f}")
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


def _surface_grid(rows, image):
    sel = [r for r in rows if int(r["image"]) == image]
    g1, g2 = np.unique(_col(sel, "eps_grad")), np.unique(_col(sel, "eps_random"))
    Z = _col(sel, "loss").reshape(len(g1), len(g2))
    return g1, g2, Z, int(sel[0]["label"])


def _draw_surface(ax, g1, g2, Z, color, title):
    from matplotlib.colors import LinearSegmentedColormap

    A, B = np.meshgrid(g1, g2, indexing="ij")
    # the method's colour, light where the loss is low and full where it is high
    cmap = LinearSegmentedColormap.from_list("method", ["#f4f4f4", color])
    span = float(Z.max() - Z.min()) or 1.0
    faces = cmap(0.15 + 0.85 * (Z - Z.min()) / span)
    ax.plot_surface(A, B, Z, facecolors=faces, shade=False, linewidth=0.25, edgecolor="#555555",
                    antialiased=True)
    ax.set_xlabel("eps1: gradient sign", fontsize=7, labelpad=-2)
    ax.set_ylabel("eps2: random sign", fontsize=7, labelpad=-2)
    ax.set_zlabel("CE loss (nats)", fontsize=7, labelpad=-2)
    ax.tick_params(labelsize=6, pad=-2)
    ax.set_title(title, fontsize=8)
    ax.view_init(elev=25, azim=-135)


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


def _fig_sanity(d: Path, audit: dict) -> list[Path]:
    color = method_color(audit["method"])
    fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(12, 3.4))
    rows = read_csv(d / "accuracy_vs_eps.csv")
    a1.plot(_col(rows, "eps"), _col(rows, "accuracy"), "o-", color=color, label="PGD")
    a1.axvline(audit["eps"], color="k", ls="--", lw=1, label=f"training eps {audit['eps']:.3g}")
    a1.axhline(0.05, color="#999999", ls=":", lw=1, label="must fall below 0.05")
    a1.set_xlabel("Linf budget eps (pixel units in [0, 1])")
    a1.set_ylabel("accuracy (fraction)")
    a1.set_ylim(-0.02, 1.02)
    a1.set_title(f"accuracy vs eps (PGD-{int(rows[-1]['steps'])}, n = {int(rows[0]['n'])})")
    a1.legend()
    rows = read_csv(d / "accuracy_vs_steps.csv")
    a2.plot(_col(rows, "steps"), _col(rows, "accuracy"), "o-", color=color)
    _log_x(a2, _col(rows, "steps"))
    a2.set_xlabel("PGD steps (log scale; step size max(default, 2.5 eps / steps))")
    a2.set_ylabel("accuracy (fraction)")
    a2.set_title(f"accuracy vs PGD steps at eps = {audit['eps']:.3g}")
    rows = read_csv(d / "accuracy_vs_restarts.csv")
    a3.plot(_col(rows, "restarts"), _col(rows, "accuracy"), "o-", color=color)
    a3.set_xlabel(f"random restarts (PGD-{int(rows[0]['steps'])} each)")
    a3.set_ylabel("accuracy (fraction; worst case)")
    a3.xaxis.get_major_locator().set_params(integer=True)
    a3.set_title("accuracy vs restarts")
    for ax in (a2, a3):
        lo = min(ax.get_lines()[0].get_ydata())
        hi = max(ax.get_lines()[0].get_ydata())
        ax.set_ylim(max(-0.02, lo - 0.1), min(1.02, hi + 0.1))
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


def _training_axes(axes, rows, color, label, co_epoch, marker="o"):
    ep = _col(rows, "epoch")
    (a1, a2, a3, a4) = axes
    a1.plot(ep, _col(rows, "val_clean"), marker=marker, ls="-", color=color, label=label)
    a2.plot(ep, _col(rows, "val_fgsm"), marker=marker, ls="--", color=color, alpha=0.6, mfc="none",
            label=f"{label}: FGSM")
    a2.plot(ep, _col(rows, "val_pgd"), marker=marker, ls="-", color=color, label=f"{label}: PGD")
    a3.plot(ep, _col(rows, "val_logit_dist"), marker=marker, ls="-", color=color, label=label)
    a4.plot(ep, _col(rows, "val_grad_align"), marker=marker, ls="-", color=color, label=label)
    if co_epoch:
        for ax in axes:
            ax.axvline(co_epoch, color=color, ls=":", lw=1.2)
        a2.plot([], [], color=color, ls=":", label=f"{label}: catastrophic overfitting (epoch {co_epoch})")


def _finish_training_axes(axes):
    titles = ("validation clean accuracy", "validation FGSM (dashed) and PGD (solid) accuracy",
              "FGSM vs R-FGSM logit distance (GMR's penalty)", "gradient alignment E cos(grad x, grad(x+eta))")
    ylabels = ("accuracy (fraction)", "accuracy (fraction)", "mean squared L2 distance of logits (log)",
               "cosine")
    for ax, t, yl in zip(axes, titles, ylabels):
        ax.set_title(t)
        ax.set_xlabel("epoch")
        ax.set_ylabel(yl)
        _epoch_ticks(ax, [x for line in ax.get_lines() for x in line.get_xdata()])
        ax.legend(fontsize=7)
    axes[2].set_yscale("log")
    for ax in (axes[0], axes[1]):
        ax.set_ylim(-0.02, 1.02)


def _co_epoch(rows) -> int | None:
    flagged = [int(r["epoch"]) for r in rows if r.get("catastrophic_overfitting") == 1.0]
    return min(flagged) if flagged else None


def _fig_training(d: Path, audit: dict) -> list[Path]:
    rows = read_csv(d / "training_curves.csv")
    fig, axes = plt.subplots(2, 2, figsize=(10, 6.4))
    axes = axes.ravel()
    _training_axes(axes, rows, method_color(audit["method"]), method_label(audit["method"]), _co_epoch(rows))
    _finish_training_axes(axes)
    fig.suptitle(f"{_title(audit)}: training log (rule for catastrophic overfitting: Wong et al. 2020)")
    fig.tight_layout()
    return save_figure(fig, d, "training_curves")


# --------------------------------------------------------------------------------------------------
# Comparisons across runs (`gmr plots`)

MARKERS = ("o", "s", "^", "D", "v", "P")
LINESTYLES = ("-", "--", ":", "-.")


def _labels(items: Sequence[tuple[str, str, str | None]]) -> list[str]:
    """Unique display names for (method, run path, checkpoint) items: the method's name, plus what
    tells items of the same method apart (the first differing folder of their paths, the checkpoint)."""
    base = [method_label(m) for m, _, _ in items]
    out = []
    for i, (m, p, ckpt) in enumerate(items):
        group = [j for j, b in enumerate(base) if b == base[i]]
        parts = []
        if len(group) > 1:
            paths = [Path(items[j][1]).resolve().parts for j in group]
            if len({q for q in paths}) > 1:
                mine = Path(p).resolve().parts
                depth = min(len(q) for q in paths)
                for k in range(depth):
                    if len({q[k] for q in paths}) > 1:
                        parts.append(mine[k])
                        break
            if len({items[j][2] for j in group}) > 1 and ckpt:
                parts.append(ckpt)
        out.append(base[i] + (f" ({', '.join(parts)})" if parts else ""))
    return out


def _styles(items: list[dict]) -> None:
    """One marker and line style per item among the items of its method (colour = method)."""
    seen: dict[str, int] = {}
    for it in items:
        k = seen.get(it["method"], 0)
        seen[it["method"]] = k + 1
        it["marker"], it["ls"] = MARKERS[k % len(MARKERS)], LINESTYLES[k % len(LINESTYLES)]


def _load_runs(runs: Iterable[str | Path]) -> list[dict]:
    out = []
    for r in runs:
        meta = read_json(Path(r) / "run.json")
        out.append({"path": str(r), "meta": meta, "method": meta["config"]["method"],
                    "seed": meta["config"].get("seed")})
    out.sort(key=lambda x: _order_key(x["method"], x["path"]))
    for item, label in zip(out, _labels([(x["method"], x["path"], None) for x in out])):
        item["label"] = label
    _styles(out)
    return out


def _load_diagnostics(dirs: Iterable[str | Path]) -> list[dict]:
    out = []
    for d in dirs:
        audit = read_json(Path(d) / "audit.json")
        out.append({"path": str(d), "audit": audit, "method": audit["method"], "seed": audit.get("train_seed")})
    out.sort(key=lambda x: _order_key(x["method"], x["audit"]["run"] + x["audit"]["checkpoint"]))
    for item, label in zip(out, _labels([(x["method"], x["audit"]["run"], x["audit"]["checkpoint"])
                                         for x in out])):
        item["label"] = label
    _styles(out)
    return out


def _same_path(a: str | Path, b: str | Path) -> bool:
    return Path(a).resolve() == Path(b).resolve()


def comparison_figures(runs: Sequence[str | Path], out: str | Path, diagnostics: Sequence[str | Path] = (),
                       evals: Sequence[str | Path] = ()) -> list[Path]:
    """Draw the comparison figures (see the module docstring) into `out`; returns the files written."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    run_items = _load_runs(runs)
    diag_items = _load_diagnostics(diagnostics)
    eval_records = [read_json(e) for e in evals]
    written: list[Path] = []
    if run_items:
        written += _cmp_training(run_items, out)
        written += _cmp_cost(run_items, diag_items, eval_records, out)
    if diag_items:
        written += _cmp_surfaces(diag_items, out)
        written += _cmp_line(diag_items, out)
        written += _cmp_eps(diag_items, out)
        written += _cmp_steps(diag_items, out)
        written.append(_audit_summary(diag_items, out))
    return written


def _cmp_training(items, out) -> list[Path]:
    from .diagnostics import catastrophic_overfitting_epoch, read_train_log

    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    axes = axes.ravel()
    for it in items:
        rows = read_train_log(Path(it["path"]) / "train_log.csv")
        if rows:
            _training_axes(axes, rows, method_color(it["method"]), it["label"], catastrophic_overfitting_epoch(rows),
                           it["marker"])
    _finish_training_axes(axes)
    eps = items[0]["meta"].get("eps")
    ds = items[0]["meta"]["config"]["dataset"]
    fig.suptitle(f"training curves on the validation subset ({ds}, eps = {eps:.3g}); dotted: catastrophic "
                 "overfitting (Wong et al. 2020 rule)")
    fig.tight_layout()
    return save_figure(fig, out, "training_curves")


def _eval_for(run_path: str, records: Sequence[dict]) -> dict | None:
    matches = [r for r in records if r.get("run") and _same_path(r["run"], run_path)]
    matches.sort(key=lambda r: r.get("checkpoint") != "best")
    return matches[0] if matches else None


def _diag_for(run_path: str, items: Sequence[dict]) -> dict | None:
    matches = [d for d in items if _same_path(d["audit"]["run"], run_path)]
    matches.sort(key=lambda d: d["audit"].get("checkpoint") != "best")
    return matches[0] if matches else None


def robustness_source(items, diag_items, eval_records) -> tuple[str, list[float | None], list[str]]:
    """The best robust-accuracy source available for every run: AutoAttack or PGD from evaluation JSONs,
    else PGD of the diagnose audits, else the selected epoch's validation PGD from run.json. Returns the
    axis label, one value per run and the checkpoint each value is of."""
    evals = [_eval_for(it["path"], eval_records) for it in items]
    eval_ckpts = [(e or {}).get("checkpoint", "best") for e in evals]
    aa = [((e or {}).get("attacks", {}).get("autoattack") or {}).get("accuracy") for e in evals]
    if all(a is not None for a in aa):
        n = evals[0].get("n_examples")
        return f"AutoAttack accuracy (test, n = {n})", aa, eval_ckpts
    pgd = [((e or {}).get("attacks", {}).get("pgd") or {}).get("accuracy") for e in evals]
    if all(p is not None for p in pgd):
        n = evals[0].get("n_examples")
        return f"PGD accuracy (test, n = {n})", pgd, eval_ckpts
    diags = [_diag_for(it["path"], diag_items) for it in items]
    if all(d is not None for d in diags):
        return (f"PGD accuracy (test, n = {diags[0]['audit']['n_examples']}, from gmr diagnose)",
                [d["audit"]["summary"]["pgd_accuracy"] for d in diags],
                [d["audit"]["checkpoint"] for d in diags])
    return ("PGD accuracy (validation, selected epoch, from run.json)",
            [it["meta"]["metrics"]["best"].get("val_pgd") for it in items], ["best"] * len(items))


def pareto_front(xs: Sequence[float], ys: Sequence[float]) -> list[int]:
    """Indices of the points no other point beats (lower or equal cost and higher accuracy), by cost."""
    order = sorted(range(len(xs)), key=lambda i: (xs[i], -ys[i]))
    front, best = [], -math.inf
    for i in order:
        if ys[i] > best:
            front.append(i)
            best = ys[i]
    return front


def _cmp_cost(items, diag_items, eval_records, out) -> list[Path]:
    ylabel, ys, ckpts = robustness_source(items, diag_items, eval_records)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, key, xlabel in ((axes[0], "train_seconds", "training time (seconds, without validation probes)"),
                            (axes[1], "passes", "training cost (forward + backward passes / 2, counted)")):
        pts = [(it["meta"]["cost"][key], y, it, c) for it, y, c in zip(items, ys, ckpts) if y is not None]
        for x, y, it, ckpt in pts:
            name = it["label"] + ("" if ckpt == "best" else f" [{ckpt} model]")
            ax.scatter(x, y, color=method_color(it["method"]), marker=it["marker"], s=45, zorder=3, label=name)
            ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        if pts:
            front = pareto_front([p[0] for p in pts], [p[1] for p in pts])
            fx, fy = [pts[i][0] for i in front], [pts[i][1] for i in front]
            ax.step(fx, fy, where="post", color="k", lw=1, ls="--", zorder=2, label="Pareto front")
            ax.scatter(fx, fy, facecolors="none", edgecolors="k", s=120, zorder=4)
        _log_x(ax)
        ax.set_xlabel(xlabel + " (log)")
        ax.set_ylabel("robust accuracy (fraction)")
        ax.set_ylim(-0.02, 1.02)
        ax.legend(fontsize=7, loc="best")
    fig.suptitle(f"robust accuracy vs training cost (circled: Pareto front)\ny: {ylabel}")
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    return save_figure(fig, out, "robust_accuracy_vs_cost")


def _cmp_surfaces(items, out) -> list[Path]:
    per = [read_csv(Path(it["path"]) / "loss_surface.csv") for it in items]
    common = sorted(set.intersection(*[{int(r["image"]) for r in rows} for rows in per]))[:2]
    if not common:
        return []
    fig = plt.figure(figsize=(3.4 * len(items), 3.3 * len(common)))
    for row, image in enumerate(common):
        for col, (it, rows) in enumerate(zip(items, per)):
            g1, g2, Z, label = _surface_grid(rows, image)
            ax = fig.add_subplot(len(common), len(items), row * len(items) + col + 1, projection="3d")
            _draw_surface(ax, g1, g2, Z, method_color(it["method"]),
                          f"{it['label']}\ntest image {image} (label {label})")
    eps = items[0]["audit"]["eps"]
    fig.suptitle("loss surfaces at x + eps1 sign(grad x) + eps2 sign(random), eps1, eps2 in "
                 f"[0, {eps:.3g}] (Tramer et al. 2018)")
    return save_figure(fig, out, "loss_surfaces")


def _cmp_line(items, out) -> list[Path]:
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.6))
    for it in items:
        rows = read_csv(Path(it["path"]) / "fgsm_line.csv")
        idx, t, loss, ok = (_col(rows, k) for k in ("index", "eps", "loss", "correct"))
        ts = np.unique(t)
        n = len(np.unique(idx))
        L, C = np.maximum(loss.reshape(n, len(ts)), LOSS_FLOOR), ok.reshape(n, len(ts))
        s = it["audit"]["summary"]
        c = method_color(it["method"])
        a1.plot(ts, np.median(L, 0), color=c, lw=2, ls=it["ls"],
                label=f"{it['label']} (non-monotone {s['fgsm_loss_nonmonotone']:.0%})")
        a1.fill_between(ts, np.percentile(L, 25, 0), np.percentile(L, 75, 0), color=c, alpha=0.15)
        a2.plot(ts, C.mean(0), color=c, lw=2, ls=it["ls"], label=f"{it['label']} (distorted {s['boundary_distortion']:.0%})")
    eps = items[0]["audit"]["eps"]
    for ax in (a1, a2):
        ax.axvline(eps, color="k", ls="--", lw=1)
        ax.set_xlabel("step t along sign(grad x) (Linf, pixel units)")
        ax.legend(fontsize=7)
    a1.set_yscale("log")
    a1.set_ylabel("cross-entropy loss (nats, log; median, 25-75% band)")
    a1.set_title("loss along the FGSM direction (dashed: training eps)")
    a2.set_ylabel("accuracy (fraction)")
    a2.set_ylim(-0.02, 1.02)
    a2.set_title("accuracy along the FGSM direction")
    fig.tight_layout()
    return save_figure(fig, out, "loss_along_fgsm")


def _cmp_eps(items, out) -> list[Path]:
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for it in items:
        rows = read_csv(Path(it["path"]) / "accuracy_vs_eps.csv")
        ax.plot(_col(rows, "eps"), _col(rows, "accuracy"), marker=it["marker"], ls=it["ls"],
                color=method_color(it["method"]), label=it["label"])
    eps = items[0]["audit"]["eps"]
    ax.axvline(eps, color="k", ls="--", lw=1, label=f"training eps {eps:.3g}")
    ax.set_xlabel("Linf budget eps (pixel units in [0, 1])")
    ax.set_ylabel("PGD accuracy (fraction)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("accuracy vs eps (must reach 0 at large eps)")
    ax.legend(fontsize=7)
    return save_figure(fig, out, "accuracy_vs_eps")


def _cmp_steps(items, out) -> list[Path]:
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.6))
    for it in items:
        c = method_color(it["method"])
        rows = read_csv(Path(it["path"]) / "accuracy_vs_steps.csv")
        a1.plot(_col(rows, "steps"), _col(rows, "accuracy"), marker=it["marker"], ls=it["ls"], color=c,
                label=it["label"])
        rows = read_csv(Path(it["path"]) / "accuracy_vs_restarts.csv")
        a2.plot(_col(rows, "restarts"), _col(rows, "accuracy"), marker=it["marker"], ls=it["ls"], color=c,
                label=it["label"])
    eps = items[0]["audit"]["eps"]
    _log_x(a1, sorted({int(r["steps"]) for it in items
                       for r in read_csv(Path(it["path"]) / "accuracy_vs_steps.csv")}))
    a1.set_xlabel("PGD steps (log scale)")
    a1.set_title(f"accuracy vs PGD steps (eps = {eps:.3g}; must plateau)")
    a2.set_xlabel("random restarts")
    a2.xaxis.get_major_locator().set_params(integer=True)
    a2.set_title("accuracy vs restarts (must plateau)")
    for ax in (a1, a2):
        ax.set_ylabel("PGD accuracy (fraction)")
        ax.set_ylim(-0.02, 1.02)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, out, "accuracy_vs_steps")


AUDIT_SUMMARY_KEYS = ("clean_accuracy", "fgsm_accuracy", "pgd_accuracy", "fgsm_pgd_accuracy_gap",
                      "gradient_alignment", "gradient_sign_agreement", "fgsm_pgd_perturbation_cosine",
                      "fgsm_rfgsm_logit_distance", "fgsm_loss_nonmonotone", "boundary_distortion",
                      "accuracy_at_large_eps", "zero_gradient_fraction", "autoattack_accuracy",
                      "catastrophic_overfitting_epoch")


def _audit_summary(items, out) -> Path:
    from .diagnostics import rows_to_csv

    rows = []
    for it in items:
        a = it["audit"]
        failed = [c["name"] for c in a["checks"] if c["passed"] is False]
        rows.append({"label": it["label"], "method": a["method"], "run": a["run"], "checkpoint": a["checkpoint"],
                     "n_examples": a["n_examples"], "eps": a["eps"],
                     **{k: a["summary"].get(k) for k in AUDIT_SUMMARY_KEYS},
                     "masking": a["verdict"]["masking"], "failed_checks": " ".join(failed)})
    path = out / "audit_summary.csv"
    write_text(path, rows_to_csv(rows))
    return path
