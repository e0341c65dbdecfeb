"""What every figure shares: matplotlib set-up, atomic saving, axes helpers, each method's colour and
name (from the method registry: `gmr.methods.register_method(..., title=, color=)`), the intervals drawn
as error bars on accuracies, and legends placed where they cover no data (in a panel of their own beside
the axes, or below an axes)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

from ..io import atomic_path  # noqa: E402
from ..methods import method_color, method_rank, method_title  # noqa: E402
from ..stats import accuracy_interval  # noqa: E402

LOSS_FLOOR = 1e-4  # losses below this are drawn at it on log axes (float32 CE can be exactly 0)
FORMATS = ("png", "pdf")

plt.rcParams.update({"figure.dpi": 110, "savefig.dpi": 130, "axes.grid": True, "grid.alpha": 0.3,
                     "axes.titlesize": 10, "axes.labelsize": 9, "legend.fontsize": 8,
                     "xtick.labelsize": 8, "ytick.labelsize": 8, "figure.titlesize": 11})


def method_label(method: str, options: dict | None = None) -> str:
    """The method's registered title (with its options where the title depends on them)."""
    return method_title(method, options)


def _order_key(method: str, path: str) -> tuple:
    return (*method_rank(method), path)


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


def accuracy_bounds(accuracy: float, n) -> tuple[float, float]:
    """95% Wilson interval of an accuracy measured on n points (gmr.stats); (nan, nan) when n is unknown
    or the accuracy is missing, so a figure draws no bar rather than a made-up one."""
    if n is None or accuracy is None or not np.isfinite(n) or n <= 0 or not np.isfinite(accuracy):
        return math.nan, math.nan
    n = int(n)
    return accuracy_interval(min(max(round(accuracy * n), 0), n), n)


def error_bars(values: Sequence[float], bounds: Sequence[tuple[float, float]]) -> np.ndarray:
    """The 2 x N `yerr` of matplotlib's errorbar/bar for values and their (low, high) bounds (0 where a
    bound is missing)."""
    v = np.asarray(values, dtype=float)
    lo, hi = (np.asarray([b[i] for b in bounds], dtype=float) for i in (0, 1))
    return np.nan_to_num(np.stack([v - lo, hi - v]).clip(min=0), nan=0.0)


def draw_intervals(ax, xs, values, bounds, color, **kw) -> None:
    """Error bars of accuracies (their intervals) in the item's colour, without a legend entry."""
    if any(np.isfinite(b[0]) for b in bounds):
        ax.errorbar(xs, values, yerr=error_bars(values, bounds), fmt="none", ecolor=color, elinewidth=1,
                    capsize=3, zorder=2, **kw)


def legend_panel(fig, axes, extra: Sequence = (), title: str | None = None):
    """One legend for `axes` (their entries, each label once, then `extra` handles) in a panel of its own
    right of the figure, so it covers no data however many runs there are. Call after tight_layout:
    the panel lies outside the layout and `save_figure` (bbox_inches="tight") keeps it in the file."""
    handles, labels = [], []
    for ax in axes:
        for h, label in zip(*ax.get_legend_handles_labels()):
            if label not in labels:
                handles.append(h)
                labels.append(label)
    handles += list(extra)
    labels += [h.get_label() for h in extra]
    panel = fig.add_axes((1.0, 0.05, 0.02, 0.9))
    panel.axis("off")
    if handles:
        panel.legend(handles, labels, loc="center left", fontsize=7, title=title, title_fontsize=7,
                     frameon=False)
    return panel


def legend_below(ax, ncol: int = 1) -> None:
    """The axes' legend under its x label, outside the data area (tight_layout makes room for it)."""
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), fontsize=7, ncol=ncol, frameon=False)


def style_key(*entries: tuple[str, dict]) -> list[Line2D]:
    """Legend handles that explain a line style (black), e.g. ("FGSM (dashed)", {"ls": "--"})."""
    return [Line2D([], [], color="k", label=label, **kw) for label, kw in entries]


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


def _title(audit: dict) -> str:
    return (f"{method_label(audit['method'])} ({Path(audit['run']).name}, {audit['checkpoint']}): "
            f"masking {audit['verdict']['masking']}")


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


def _training_axes(axes, rows, color, label, co_epoch, marker="o"):
    """One run's training log on the four panels; the run's legend entry is on the first panel (the
    line styles are explained once, by `training_legend`)."""
    ep = _col(rows, "epoch")
    (a1, a2, a3, a4) = axes
    a1.plot(ep, _col(rows, "val_clean"), marker=marker, ls="-", color=color, label=label)
    a2.plot(ep, _col(rows, "val_fgsm"), marker=marker, ls="--", color=color, alpha=0.6, mfc="none")
    a2.plot(ep, _col(rows, "val_pgd"), marker=marker, ls="-", color=color)
    a3.plot(ep, _col(rows, "val_logit_dist"), marker=marker, ls="-", color=color)
    a4.plot(ep, _col(rows, "val_grad_align"), marker=marker, ls="-", color=color)
    if co_epoch:
        for ax in axes:
            ax.axvline(co_epoch, color=color, ls=":", lw=1.2)
        a1.plot([], [], color=color, ls=":", label=f"{label}: catastrophic overfitting (epoch {co_epoch})")


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
    axes[2].set_yscale("log")
    for ax in (axes[0], axes[1]):
        ax.set_ylim(-0.02, 1.02)


def training_legend(fig, axes):
    """The runs (colour and marker) and the line styles of the training panels, beside the panels."""
    key = style_key(("FGSM accuracy (2nd panel: dashed, open markers)", {"ls": "--", "marker": "o", "mfc": "none"}),
                    ("PGD accuracy (2nd panel: solid)", {"ls": "-", "marker": "o"}),
                    ("catastrophic overfitting (dotted, at its epoch)", {"ls": ":"}))
    return legend_panel(fig, axes, key)


def _co_epoch(rows) -> int | None:
    flagged = [int(r["epoch"]) for r in rows if r.get("catastrophic_overfitting") == 1.0]
    return min(flagged) if flagged else None
