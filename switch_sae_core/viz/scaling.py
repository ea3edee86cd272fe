"""Scaling-law figures (notebook 07): held-out MSE vs training FLOPs, parameters and wall-clock seconds,
log-log, one colour per architecture, the fitted power laws as lines (`analysis.scaling`)."""
from __future__ import annotations

import numpy as np

from ..analysis.scaling import AXES, ScalingAnalysis
from .pareto import label_color


def plot_scaling_axis(ax, analysis: ScalingAnalysis, x: str, title: str = "") -> None:
    """One panel: every architecture's points of column `x` against MSE, and its fit as a dashed line
    (label: the fit MSE = a X^-b in words, 'falls as X^-0.12' or 'rises as X^0.06', and R^2; '(too few points)' /
    '(poor fit)' where the fit is not trusted). The legend sits below the panel, clear of the data."""
    for label in dict.fromkeys(p["label"] for p in analysis.points):
        pts = [p for p in analysis.points if p["label"] == label and p.get(x) is not None]
        color = label_color(label)
        ax.plot([p[x] for p in pts], [p["mse"] for p in pts], "o", color=color, label=label, ms=5)
        fit = analysis.fits[x].get(label)
        if fit is not None:
            xs = np.geomspace(*fit.x_range, 50)
            note = "" if fit.quality in ("ok", "MSE does not fall") else f", {fit.quality}"  # the trend says it
            r2 = "" if np.isnan(fit.r2) else f", R²={fit.r2:.2f}"
            trend = "falls" if fit.b > 0 else "rises" if fit.b < 0 else "is flat"
            ax.plot(xs, fit.predict(xs), "--", color=color, lw=1.2,
                    label=f"fit: MSE {trend} as X^{-fit.b:.2f}{r2}{note}")
    ax.set(xscale="log", yscale="log", xlabel=AXES[x], ylabel="held-out MSE", title=title)
    lo, hi = ax.get_xlim()
    if hi / lo > 10:  # over a decade the major ticks suffice (minor labels collide); within one, keep them
        from matplotlib.ticker import NullFormatter

        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.grid(alpha=0.3, which="both")
    # below the panel, not inside it: inside, the legend covered points of the FLOPs and wall-clock panels
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=1)


def scaling_figure(analysis: ScalingAnalysis, title: str = ""):
    """1 x 3: MSE vs training FLOPs, vs parameters, vs training wall-clock seconds (the FLOP axis beside
    the time axis shows whether a FLOP saving became a time saving)."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 6.4))
    for ax, (x, name) in zip(axes, AXES.items()):
        plot_scaling_axis(ax, analysis, x, f"MSE vs {name}")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig
