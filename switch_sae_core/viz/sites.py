"""The generalisation figure (notebook 09): at every data site, each Switch SAE against TopK."""
from __future__ import annotations

PANELS = (("mse", "held-out MSE vs TopK (%)"), ("delta_ce", "ΔCE vs TopK (%), nats of CE added"))


def plot_sites(rows_by_site: dict[str, list]):
    """One group of bars per site (`analysis.sites.site_rows`), one bar per Switch SAE: its mean over seeds
    relative to TopK's mean at the same site, in %, with the seed std of that SAE over TopK's mean as the error
    bar; below 0 = better than TopK. None when no site has a TopK row and another SAE."""
    import matplotlib.pyplot as plt

    from ..analysis.sites import display, site_name
    from .experts import expert_colors

    sites = {s: rows for s, rows in rows_by_site.items()
             if any(r.label == "topk" for r in rows) and any(r.label != "topk" for r in rows)}
    if not sites:
        return None
    labels = sorted({r.label for rows in sites.values() for r in rows if r.label != "topk"},
                    key=lambda lb: (lb.startswith("fixed-"), len(lb), lb))
    colors = dict(zip(labels, expert_colors(len(labels), no_grey=True)))
    fig, axes = plt.subplots(1, len(PANELS), figsize=(6.5 * len(PANELS), 4.6))
    width = 0.8 / len(labels)
    for ax, (metric, title) in zip(axes, PANELS):
        for j, label in enumerate(labels):
            xs, ys, errs = [], [], []
            for i, rows in enumerate(sites.values()):
                topk = next(r for r in rows if r.label == "topk")
                mine = next((r for r in rows if r.label == label), None)
                if mine is None or mine.mean[metric] is None or not topk.mean[metric]:
                    continue
                xs.append(i + (j - (len(labels) - 1) / 2) * width)
                ys.append(100 * (mine.mean[metric] / topk.mean[metric] - 1))
                errs.append(100 * (mine.std[metric] or 0.0) / topk.mean[metric])
            ax.bar(xs, ys, width, yerr=errs, color=colors[label], capsize=2, label=display(label))
        ax.axhline(0, color="0.3", lw=0.8)
        ax.set_xlim(-0.5, len(sites) - 0.5)
        ax.set_xticks(range(len(sites)), [site_name(s).replace(" blocks", "\nblocks") for s in sites], fontsize=7)
        ax.set_title(title, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("change against TopK at the same site (%)")
    fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    fig.suptitle("Does it generalise? Each Switch SAE against TopK at each site (mean over seeds; error bars: "
                 "the SAE's seed std)", fontsize=10)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    return fig
