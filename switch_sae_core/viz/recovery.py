"""Synthetic ground truth (notebook 06): how well each SAE recovers the true features, and the true features'
frequencies and cosines."""
from __future__ import annotations

from .pareto import label_color


RECOVERY_LABELS = {"recovered_frac": "true features recovered (cos > 0.9)", "mmcs": "MMCS (truth -> learned)",
                   "fvu": "FVU", "expert_nmi": "NMI(expert, cluster)", "expert_purity": "expert purity",
                   "cross_expert_duplicate_frac": "features duplicated in another expert",
                   "duplicate_frac": "features with a duplicate", "dead_frac": "dead fraction",
                   "load_balance": "load entropy / log N", "redundant_frac": "recovered features learned twice+"}


def plot_recovery_bars(rows: list, ys=("recovered_frac", "mmcs", "fvu", "expert_nmi")):
    """One panel per metric, one bar per SAE (`name`, coloured by `setting`); NMI panel shows chance."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(ys), figsize=(3.3 * len(ys), 3.4))
    names = [r["name"] for r in rows]
    for ax, y in zip(axes, ys):
        vals = [r.get(y, float("nan")) for r in rows]
        ax.bar(range(len(rows)), vals, color=[label_color(r["name"].removesuffix("-fm"), r["setting"]) for r in rows])
        ax.set_xticks(range(len(rows)), names, rotation=60, ha="right", fontsize=8)
        ax.set_title(RECOVERY_LABELS.get(y, y), fontsize=9)
        if y == "expert_nmi" and any("random_nmi" in r for r in rows):
            ax.axhline(max(r.get("random_nmi", 0) for r in rows), color="gray", ls="--", lw=1, label="random routing")
            ax.legend(fontsize=7)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def plot_recovery_lines(rows: list, x: str, ys=("recovered_frac", "mmcs", "expert_nmi"), series: str = "name",
                        xscale: str = "linear", title: str = ""):
    """One panel per metric: `y` against `x`, one line per `series` value (rows without `y` skipped).
    xscale: "linear", "log" (base 2) or "symlog" (for grids that include 0)."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(ys), figsize=(3.6 * len(ys), 3.3))
    values = sorted({r[series] for r in rows}, key=str)
    colors = {v: f"C{i}" for i, v in enumerate(values)}
    for ax, y in zip(axes, ys):
        have = [r for r in rows if r.get(y) is not None]
        if xscale == "log":
            ax.set_xscale("log", base=2)
        elif xscale == "symlog":
            ax.set_xscale("symlog", linthresh=min((r[x] for r in have if r[x] > 0), default=1.0))
        for value in values:  # the same colour for a series in every panel
            pts = sorted((r[x], r[y]) for r in have if r[series] == value)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color=colors[value], label=str(value))
        ax.set_xlabel(x)
        ax.legend(fontsize=7)
        if y == "expert_nmi" and any("random_nmi" in r for r in have):
            xlim = ax.get_xlim()
            ax.axhline(max(r["random_nmi"] for r in have), color="gray", ls="--", lw=1, label="random routing")
            ax.set_xlim(xlim)
            ax.legend(fontsize=7)
        ax.set_ylabel(RECOVERY_LABELS.get(y, y), fontsize=9)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def plot_ground_truth(freq_F, expected_F, cos_FF, cluster_F):
    """Left: measured vs expected feature frequency by rank (log-log). Right: cosines between the true
    features, sorted by cluster (blocks on the diagonal = the clusters' shared mean directions)."""
    import matplotlib.pyplot as plt
    import numpy as np

    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.6))
    rank = np.arange(1, len(freq_F) + 1)
    a.loglog(rank, np.asarray(freq_F), ".", ms=3, label="measured")
    a.loglog(rank, np.asarray(expected_F), "-", color="k", lw=1, label="expected")
    a.set(xlabel="feature rank", ylabel="P(active)", title="feature frequencies")
    a.legend(fontsize=8)
    order = np.argsort(np.asarray(cluster_F), kind="stable")
    im = b.imshow(np.asarray(cos_FF)[order][:, order], cmap="RdBu_r", vmin=-1, vmax=1)
    b.set(title="true features' cosines, sorted by cluster", xlabel="feature", ylabel="feature")
    fig.colorbar(im, ax=b, fraction=0.046, label="cosine between two true features")
    fig.tight_layout()
    return fig
