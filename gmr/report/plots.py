"""Comparison figures across runs (`gmr plots`), drawn from result files on disk: training_curves,
robust_accuracy_vs_cost and, from diagnose folders, loss_surfaces, loss_along_fgsm, accuracy_vs_eps and
accuracy_vs_steps; plus audit_summary.csv (one row per audit). PNG and PDF each.

Accuracies carry their 95% intervals as error bars (an evaluation's own ci_low/ci_high, else the Wilson
interval of the points it was measured on); legends sit beside or below the axes, never over data.

Every method is drawn in its registered colour and named by its registered title (gmr/methods.py), in
registration order. Evaluations and audits are matched to the runs they measured by `run_id` only.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from ..io import read_csv, write_csv
from ..methods import method_color, method_title
from ..runs import RunDir, catastrophic_overfitting_epoch
from .style import (LOSS_FLOOR, _col, _draw_surface, _finish_training_axes, _log_x, _order_key, _surface_grid,
                    _training_axes, accuracy_bounds, draw_intervals, legend_below, legend_panel, plt,
                    save_figure, training_legend)
from .tables import TableInputError, check_link, read_record, read_run, writable_dir

MARKERS = ("o", "s", "^", "D", "v", "P")
LINESTYLES = ("-", "--", ":", "-.")


def _labels(items: Sequence[tuple[str, str, str | None]]) -> list[str]:
    """Unique display names for (title, run path, checkpoint) items: the method's title, plus what
    tells items of the same title apart (the first differing folder of their paths, the checkpoint)."""
    base = [title for title, _, _ in items]
    out = []
    for i, (_, p, ckpt) in enumerate(items):
        group = [j for j, b in enumerate(base) if b == base[i]]
        parts = []
        if len(group) > 1:
            paths = [Path(items[j][1]).resolve().parts for j in group]
            if len(set(paths)) > 1:
                mine = Path(p).resolve().parts
                depth = min(len(q) for q in paths)
                k = next((k for k in range(depth) if len({q[k] for q in paths}) > 1), None)
                if k is not None:
                    parts.append(mine[k])
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


def _finish_items(items: list[dict], sort_key, path_key: str, ckpt_key) -> list[dict]:
    """Order items by method (registration order), name and style them."""
    items.sort(key=sort_key)
    for item, label in zip(items, _labels([(x["title"], x[path_key], ckpt_key(x)) for x in items])):
        item["label"] = label
    _styles(items)
    return items


def _load_runs(runs: Iterable[str | Path]) -> list[dict]:
    out = []
    for r in runs:
        meta = read_run(RunDir(r))
        method = meta["config"]["method"]
        out.append({"path": str(r), "meta": meta, "run_id": meta["run_id"], "method": method,
                    "title": method_title(method, meta.get("method_options")), "color": method_color(method),
                    "seed": meta["config"].get("seed")})
    return _finish_items(out, lambda x: _order_key(x["method"], x["path"]), "path", lambda x: None)


def _load_diagnostics(dirs: Iterable[str | Path], run_items: Sequence[dict]) -> list[dict]:
    """One item per `gmr diagnose` folder of one of the runs; its method's title is that run's."""
    titles = {it["run_id"]: it["title"] for it in run_items}
    out = []
    for d in dirs:
        path = Path(d) / "audit.json"
        audit = read_record(path, "audit")
        check_link(audit, path, set(titles), "audit")
        out.append({"path": str(d), "audit": audit, "run_id": audit["run_id"], "run_path": audit["run"],
                    "method": audit["method"], "title": titles[audit["run_id"]],
                    "color": method_color(audit["method"]), "seed": audit.get("train_seed")})
    return _finish_items(out, lambda x: _order_key(x["method"], x["audit"]["run"] + x["audit"]["checkpoint"]),
                         "run_path", lambda x: x["audit"]["checkpoint"])


def _load_evals(files: Iterable[str | Path], run_items: Sequence[dict]) -> list[dict]:
    """The evaluation records, each of one of the runs."""
    ids = {it["run_id"] for it in run_items}
    records = []
    for f in files:
        record = read_record(f, "evaluation")
        if "attacks" not in record:
            raise TableInputError(f"{f} is not a `gmr evaluate` result (no 'attacks')")
        check_link(record, f, ids, "evaluation")
        records.append(record)
    return records


def load_inputs(runs: Sequence[str | Path], diagnostics: Sequence[str | Path] = (),
                evals: Sequence[str | Path] = ()) -> tuple[list[dict], list[dict], list[dict]]:
    """(run items, diagnose items, evaluation records), every audit and evaluation linked to one of the
    runs by run_id; TableInputError naming the file otherwise."""
    run_items = _load_runs(runs)
    return run_items, _load_diagnostics(diagnostics, run_items), _load_evals(evals, run_items)


def comparison_figures(runs: Sequence[str | Path], out: str | Path, diagnostics: Sequence[str | Path] = (),
                       evals: Sequence[str | Path] = ()) -> list[Path]:
    """Draw the comparison figures (see the module docstring) into `out`; returns the files written.
    Every input is read and checked first: on bad input nothing is written, not even `out`."""
    run_items, diag_items, records = load_inputs(runs, diagnostics, evals)
    out = writable_dir(out)
    written: list[Path] = []
    if run_items:
        written += _cmp_training(run_items, out)
        written += _cmp_cost(run_items, diag_items, records, out)
    if diag_items:
        written += _cmp_surfaces(diag_items, out)
        written += _cmp_line(diag_items, out)
        written += _cmp_eps(diag_items, out)
        written += _cmp_steps(diag_items, out)
        written.append(_audit_summary(diag_items, out))
    return written


def _cmp_training(items, out) -> list[Path]:
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    axes = axes.ravel()
    for it in items:
        rows = RunDir(it["path"]).train_log()
        if rows:
            _training_axes(axes, rows, it["color"], it["label"], catastrophic_overfitting_epoch(rows),
                           it["marker"])
    _finish_training_axes(axes)
    eps = items[0]["meta"].get("eps")
    ds = items[0]["meta"]["config"]["dataset"]
    fig.suptitle(f"training curves on the validation subset ({ds}, eps = {eps:.3g}); dotted: catastrophic "
                 "overfitting (Wong et al. 2020 rule)")
    fig.tight_layout()
    training_legend(fig, axes)
    return save_figure(fig, out, "training_curves")


def _eval_for(run_id: str, records: Sequence[dict]) -> dict | None:
    """The evaluation of this run, the selected model's first."""
    matches = sorted((r for r in records if r["run_id"] == run_id),
                     key=lambda r: r.get("checkpoint") != "best")
    return matches[0] if matches else None


def _diag_for(run_id: str, items: Sequence[dict]) -> dict | None:
    """The audit of this run, the selected model's first."""
    matches = sorted((d for d in items if d["run_id"] == run_id),
                     key=lambda d: d["audit"].get("checkpoint") != "best")
    return matches[0] if matches else None


@dataclass
class RobustnessSource:
    """Robust accuracy of each run for the cost figure: the axis label, one value per run (None: no
    number), its (low, high) interval and the checkpoint it is of."""
    label: str
    values: list[float | None]
    bounds: list[tuple[float, float]]
    checkpoints: list[str]


def _entry_bounds(entry: dict, n) -> tuple[float, float]:
    """An evaluation entry's interval: its own ci_low/ci_high, else the Wilson interval of its n."""
    if entry.get("ci_low") is not None and entry.get("ci_high") is not None:
        return float(entry["ci_low"]), float(entry["ci_high"])
    return accuracy_bounds(entry.get("accuracy"), entry.get("n_examples", n))


def _from_evals(evals: list[dict | None], attack: str, title: str) -> RobustnessSource | None:
    """The attack's accuracy from every run's evaluation; None unless all runs have it."""
    entries = [((e or {}).get("attacks", {}).get(attack) or {}) for e in evals]
    if not all(en.get("accuracy") is not None for en in entries):
        return None
    ns = sorted({int(en.get("n_examples", e.get("n_examples", 0))) for en, e in zip(entries, evals)})
    return RobustnessSource(f"{title} accuracy (test, n = {', '.join(map(str, ns))})",
                            [en["accuracy"] for en in entries],
                            [_entry_bounds(en, e.get("n_examples")) for en, e in zip(entries, evals)],
                            [e.get("checkpoint", "best") for e in evals])


def robustness_source(items, diag_items, eval_records) -> RobustnessSource:
    """The best robust-accuracy source available for every run, with its intervals: AutoAttack or PGD
    from evaluation JSONs, else PGD of the diagnose audits, else the selected epoch's validation PGD
    from run.json (intervals from the points each was measured on)."""
    evals = [_eval_for(it["run_id"], eval_records) for it in items]
    for attack, title in (("autoattack", "AutoAttack"), ("pgd", "PGD")):
        found = _from_evals(evals, attack, title)
        if found is not None:
            return found
    diags = [_diag_for(it["run_id"], diag_items) for it in items]
    if all(d is not None for d in diags):
        values = [d["audit"]["summary"]["pgd_accuracy"] for d in diags]
        return RobustnessSource(
            f"PGD accuracy (test, n = {diags[0]['audit']['n_examples']}, from gmr diagnose)", values,
            [accuracy_bounds(v, d["audit"]["n_examples"]) for v, d in zip(values, diags)],
            [d["audit"]["checkpoint"] for d in diags])
    values = [it["meta"]["metrics"]["best"].get("val_pgd") for it in items]
    return RobustnessSource("PGD accuracy (validation, selected epoch, from run.json)", values,
                            [accuracy_bounds(v, it["meta"]["data"].get("n_val")) for v, it in zip(values, items)],
                            ["best"] * len(items))


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
    src = robustness_source(items, diag_items, eval_records)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, key, xlabel in ((axes[0], "train_seconds", "training time (seconds, without validation probes)"),
                            (axes[1], "passes", "training cost (forward + backward passes / 2, counted)")):
        pts = [(it["meta"]["cost"][key], y, it, c, b)
               for it, y, c, b in zip(items, src.values, src.checkpoints, src.bounds) if y is not None]
        for x, y, it, ckpt, bounds in pts:
            name = it["label"] + ("" if ckpt == "best" else f" [{ckpt} model]")
            draw_intervals(ax, [x], [y], [bounds], it["color"])
            ax.scatter(x, y, color=it["color"], marker=it["marker"], s=45, zorder=3, label=name)
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
    fig.suptitle("robust accuracy vs training cost (circled: Pareto front; bars: 95% intervals)\n"
                 f"y: {src.label}")
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    legend_panel(fig, axes[:1])
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
            _draw_surface(ax, g1, g2, Z, it["color"],
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
        c = it["color"]
        a1.plot(ts, np.median(L, 0), color=c, lw=2, ls=it["ls"],
                label=f"{it['label']} (non-monotone {s['fgsm_loss_nonmonotone']:.0%})")
        a1.fill_between(ts, np.percentile(L, 25, 0), np.percentile(L, 75, 0), color=c, alpha=0.15)
        a2.plot(ts, C.mean(0), color=c, lw=2, ls=it["ls"],
                label=f"{it['label']} (distorted {s['boundary_distortion']:.0%})")
        draw_intervals(a2, ts, C.mean(0), [accuracy_bounds(v, n) for v in C.mean(0)], c, alpha=0.5)
    eps = items[0]["audit"]["eps"]
    for ax in (a1, a2):
        ax.axvline(eps, color="k", ls="--", lw=1)
        ax.set_xlabel("step t along sign(grad x) (Linf, pixel units)")
        legend_below(ax)
    a1.set_yscale("log")
    a1.set_ylabel("cross-entropy loss (nats, log; median, 25-75% band)")
    a1.set_title("loss along the FGSM direction (dashed: training eps)")
    a2.set_ylabel("accuracy (fraction; bars: 95% intervals)")
    a2.set_ylim(-0.02, 1.02)
    a2.set_title("accuracy along the FGSM direction")
    fig.tight_layout()
    return save_figure(fig, out, "loss_along_fgsm")


def _accuracy_curve(ax, rows, x_key: str, it: dict) -> None:
    """One item's accuracy against `x_key`, with error bars where the CSV gives the points (n)."""
    xs, ys = _col(rows, x_key), _col(rows, "accuracy")
    ax.plot(xs, ys, marker=it["marker"], ls=it["ls"], color=it["color"], label=it["label"])
    if rows and "n" in rows[0]:
        draw_intervals(ax, xs, ys, [accuracy_bounds(y, r["n"]) for y, r in zip(ys, rows)], it["color"])


def _cmp_eps(items, out) -> list[Path]:
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for it in items:
        _accuracy_curve(ax, read_csv(Path(it["path"]) / "accuracy_vs_eps.csv"), "eps", it)
    eps = items[0]["audit"]["eps"]
    ax.axvline(eps, color="k", ls="--", lw=1, label=f"training eps {eps:.3g}")
    ax.set_xlabel("Linf budget eps (pixel units in [0, 1])")
    ax.set_ylabel("PGD accuracy (fraction; bars: 95% intervals)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("accuracy vs eps (must reach 0 at large eps)")
    fig.tight_layout()
    legend_panel(fig, [ax])
    return save_figure(fig, out, "accuracy_vs_eps")


def _cmp_steps(items, out) -> list[Path]:
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.6))
    for it in items:
        _accuracy_curve(a1, read_csv(Path(it["path"]) / "accuracy_vs_steps.csv"), "steps", it)
        _accuracy_curve(a2, read_csv(Path(it["path"]) / "accuracy_vs_restarts.csv"), "restarts", it)
    eps = items[0]["audit"]["eps"]
    _log_x(a1, sorted({int(r["steps"]) for it in items
                       for r in read_csv(Path(it["path"]) / "accuracy_vs_steps.csv")}))
    a1.set_xlabel("PGD steps (log scale)")
    a1.set_title(f"accuracy vs PGD steps (eps = {eps:.3g}; must plateau)")
    a2.set_xlabel("random restarts")
    a2.xaxis.get_major_locator().set_params(integer=True)
    a2.set_title("accuracy vs restarts (must plateau)")
    for ax in (a1, a2):
        ax.set_ylabel("PGD accuracy (fraction; bars: 95% intervals)")
        ax.set_ylim(-0.02, 1.02)
    fig.tight_layout()
    legend_panel(fig, [a1])
    return save_figure(fig, out, "accuracy_vs_steps")


AUDIT_SUMMARY_KEYS = ("clean_accuracy", "fgsm_accuracy", "pgd_accuracy", "fgsm_pgd_accuracy_gap",
                      "gradient_alignment", "gradient_sign_agreement", "fgsm_pgd_perturbation_cosine",
                      "fgsm_rfgsm_logit_distance", "fgsm_loss_nonmonotone", "boundary_distortion",
                      "accuracy_at_large_eps", "zero_gradient_fraction", "autoattack_accuracy",
                      "catastrophic_overfitting_epoch")


def _audit_summary(items, out) -> Path:
    rows = []
    for it in items:
        a = it["audit"]
        failed = [c["name"] for c in a["checks"] if c["passed"] is False]
        rows.append({"label": it["label"], "method": a["method"], "run": a["run"], "run_id": it["run_id"],
                     "checkpoint": a["checkpoint"],
                     "n_examples": a["n_examples"], "eps": a["eps"],
                     **{k: a["summary"].get(k) for k in AUDIT_SUMMARY_KEYS},
                     "masking": a["verdict"]["masking"], "failed_checks": " ".join(failed)})
    path = out / "audit_summary.csv"
    write_csv(path, rows)
    return path
