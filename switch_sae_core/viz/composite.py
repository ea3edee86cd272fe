"""The notebooks' multi-panel figures, built from the single panels of `plots.py`.

A figure that would show nothing (every value zero) is not drawn: the function returns None and
`nothing_to_show` gives the sentence to print instead.
"""
from __future__ import annotations

import math
from typing import Iterable, Optional, Sequence

from . import plots


def nothing_to_show(values: Iterable[float]) -> bool:
    """True when every (non-NaN) value is zero or there is none: a chart of them would be empty."""
    vals = [float(v) for v in values if not math.isnan(float(v))]
    return not vals or all(v == 0 for v in vals)


def quickstart_figure(curve: dict, load_N: Sequence[float]):
    """Notebook 00: the held-out MSE over training (left) and the router load per expert (right), the
    busiest expert in orange; the orange bar and the balanced level (dashed) are named in the title, so no
    legend covers a bar."""
    import matplotlib.pyplot as plt

    load = [float(v) for v in load_N]
    n = len(load)
    busiest = max(range(n), key=load.__getitem__)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    axes[0].plot(curve["step"], curve["mse"], "o-", ms=3)
    axes[0].set(xlabel="training step", ylabel="held-out MSE", yscale="log", title="training")
    axes[1].bar(range(n), load, color=["tab:orange" if e == busiest else "tab:blue" for e in range(n)])
    axes[1].axhline(1 / n, ls="--", color="k", lw=0.8)
    axes[1].set(xlabel="expert", ylabel="fraction of tokens", xticks=range(n),
                title=f"router load (orange: the busiest expert, #{busiest}; dashed: balanced, 1/N)")
    fig.tight_layout()
    return fig


def pareto_comparison(ours: list[dict], paper: list[dict], setting: str, profile):
    """Notebooks 01 and 02: L0 vs MSE and vs CE loss recovered, our records (top) and the paper's (bottom)."""
    from ..results import pareto_lines

    lines = [{m: pareto_lines(rs, "l0", m) for m in ("mse", "loss_recovered")} for rs in (ours, paper)]
    return plots.pareto_figure(*lines, setting, profile.data.site_label)


NO_DUPLICATES = ("No feature of any of these SAEs has a nearest neighbour above cosine 0.9 (in another expert "
                 "or anywhere): there is no duplication to plot.")


def duplication_figure(rows: list[dict], by_frequency: dict[str, list[dict]], control: float,
                       ns: Sequence[int], k0: int, n0: int):
    """Notebook 05: the duplicated fraction across experts vs N (at k0, with the TopK random-block
    control) and vs k (at n0), and by feature-frequency quartile; None when every value is zero."""
    import matplotlib.pyplot as plt

    values = [r["other_expert"] for r in rows] + [control] + [b["frac_duplicated"] for bins in by_frequency.values() for b in bins]
    if nothing_to_show(values):
        return None
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
    plots.plot_duplication([r for r in rows if r["k"] == k0], x="N", series="k", y="other_expert", ax=axes[0])
    axes[0].axhline(control, color="gray", ls="--", label="TopK, random blocks")
    axes[0].set_xscale("log", base=2)
    axes[0].set_xticks(list(ns), [str(n) for n in ns])
    axes[0].set(title="duplicated across experts vs N", ylabel="fraction of features")
    axes[0].legend(fontsize=8)
    plots.plot_duplication([r for r in rows if r["N"] == n0], x="k", series="N", y="other_expert", ax=axes[1])
    axes[1].set(title="duplicated across experts vs k", ylabel="fraction of features")
    plots.plot_duplication_by_frequency(by_frequency, ax=axes[2])
    axes[2].set(title="duplicates by feature frequency")
    for ax in axes:
        ax.set_ylim(bottom=0)  # a fraction: no negative axis
    fig.tight_layout()
    return fig


def variant_duplication_figure(by_frequency: dict[str, list[dict]]):
    """Notebook 05: duplicated fraction by frequency quartile for the plain, shared-expert and top-2
    Switch SAEs; None when every value is zero."""
    import matplotlib.pyplot as plt

    if nothing_to_show(b["frac_duplicated"] for bins in by_frequency.values() for b in bins):
        return None
    fig, ax = plt.subplots(figsize=(7, 3.8))
    plots.plot_duplication_by_frequency(by_frequency, ax=ax)
    ax.set(title="duplicated across experts, by feature frequency")
    ax.set_ylim(bottom=0)
    return fig


def show(fig, name: str, profile: str, output_dir: Optional[str] = None, empty_message: str = NO_DUPLICATES) -> None:
    """Save and show a figure, or print `empty_message` when the figure function returned None."""
    import matplotlib.pyplot as plt

    if fig is None:
        print(empty_message)
        return
    plots.save_figure(fig, name, profile, output_dir)
    plt.show()
