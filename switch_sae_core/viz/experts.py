"""Panels of router geometry and expert similarity (notebooks 04 and 05): expert-by-expert heatmaps, router
alignment, t-SNE by expert, routing over training, principal angles, duplication and cosine histograms."""
from __future__ import annotations


def expert_colors(n: int, no_grey: bool = False) -> list:
    """n colours, all distinct: tab10 up to 10 experts, tab20 up to 20, else n evenly spaced on 'turbo'.
    `no_grey`: without tab10/tab20's greys (for figures where grey marks the TopK baseline)."""
    import matplotlib
    import numpy as np

    for name in ("tab10", "tab20"):
        cmap = matplotlib.colormaps[name]
        colors = [cmap(i) for i in range(cmap.N) if not (no_grey and _is_grey(cmap(i)))]
        if n <= len(colors):
            return colors[:n]
    return [matplotlib.colormaps["turbo"](t) for t in np.linspace(0.05, 0.95, n)]


def _is_grey(rgba) -> bool:
    r, g, b = rgba[:3]
    return max(r, g, b) - min(r, g, b) < 0.02


def _heatmap(ax, M, title, vmin=None, vmax=None, cmap="viridis", xlabel="expert j", ylabel="expert i",
             cbar_label: str = "cosine"):
    import numpy as np
    from matplotlib.ticker import MaxNLocator

    im = ax.imshow(np.asarray(M), vmin=vmin, vmax=vmax, cmap=cmap)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    for axis in (ax.xaxis, ax.yaxis):  # rows and columns are experts: whole numbers only
        axis.set_major_locator(MaxNLocator(integer=True))
    ax.figure.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label=cbar_label)  # the metric, named
    return im


def plot_expert_similarity(S_switch, S_control, title_switch="Switch SAE experts", title_control="TopK SAE, random blocks"):
    """Two expert x expert heatmaps on one colour scale: cell (i, j) = mean over i's features of the
    best decoder cosine to a feature of j (diagonal: self-match excluded)."""
    import matplotlib.pyplot as plt

    lo = float(min(S_switch.min(), S_control.min()))
    hi = float(max(S_switch.max(), S_control.max()))
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    metric = "mean best decoder cosine, i's features to j's"
    _heatmap(axes[0], S_switch, title_switch, lo, hi, cbar_label=metric)
    _heatmap(axes[1], S_control, title_control, lo, hi, xlabel="block j", ylabel="block i", cbar_label=metric)
    fig.tight_layout()
    return fig


def plot_router_alignment(vs_encoder, vs_decoder):
    """Cosine of router row i with expert j's mean encoder / decoder direction (both centred)."""
    import matplotlib.pyplot as plt

    lim = float(max(abs(vs_encoder).max(), abs(vs_decoder).max()))
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    _heatmap(axes[0], vs_encoder, "router row i vs mean encoder of expert j", -lim, lim, "RdBu_r", "expert j", "router row i",
             "cosine (router row, mean encoder direction)")
    _heatmap(axes[1], vs_decoder, "router row i vs mean decoder of expert j", -lim, lim, "RdBu_r", "expert j", "router row i",
             "cosine (router row, mean decoder direction)")
    fig.tight_layout()
    return fig


def plot_tsne_by_expert(xy_enc, experts_enc, xy_dec, experts_dec, silhouette_enc=None, silhouette_dec=None):
    """t-SNE of encoder and decoder feature directions, coloured by the expert that owns each feature
    (one colour per expert, all distinct (`expert_colors`), the same in both panels, named in the legend)."""
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.lines import Line2D

    experts = sorted(set(np.asarray(experts_enc).tolist()) | set(np.asarray(experts_dec).tolist()))
    palette = dict(zip(experts, expert_colors(len(experts))))
    fig, axes = plt.subplots(1, 2, figsize=(12, 5))
    for ax, xy, e, name, sil in ((axes[0], xy_enc, experts_enc, "encoder", silhouette_enc),
                                 (axes[1], xy_dec, experts_dec, "decoder", silhouette_dec)):
        ax.scatter(xy[:, 0], xy[:, 1], c=[palette[i] for i in np.asarray(e).tolist()], s=3, alpha=0.8)
        ax.set(title=f"{name} features" + (f" (silhouette by expert {sil:.3f})" if sil is not None else ""), xticks=[], yticks=[])
    handles = [Line2D([], [], ls="", marker="o", color=palette[i], label=f"expert {i}") for i in experts]
    fig.tight_layout(rect=(0, 0, 0.88, 1))
    fig.legend(handles=handles, loc="center right", title="owner", fontsize=7, ncol=1 + len(experts) // 25)
    return fig


def plot_routing_history(steps, load_SN, router_entropy_S, n_experts):
    """Expert load (fraction of tokens per expert, one distinct colour each: `expert_colors`) and mean router
    entropy over training."""
    import math

    import matplotlib.pyplot as plt
    import numpy as np

    load_SN = np.asarray(load_SN)
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    axes[0].set_prop_cycle(color=expert_colors(load_SN.shape[1]))
    axes[0].plot(steps, load_SN, lw=0.8)
    axes[0].axhline(1 / n_experts, color="k", ls="--", lw=1, label="uniform 1/N")
    axes[0].set(xlabel="step", ylabel="fraction of tokens", title="expert load (one line per expert)")
    axes[0].legend()
    axes[1].plot(steps, router_entropy_S, color="tab:purple")
    axes[1].axhline(math.log(n_experts), color="k", ls="--", lw=1, label="log N (uniform router)")
    axes[1].set(xlabel="step", ylabel="nats", title="mean router entropy per token", ylim=(0, math.log(n_experts) * 1.05))
    axes[1].legend()
    fig.tight_layout()
    return fig


def plot_principal_angles(named_angles_deg: dict, random_angles_deg):
    """Principal angles (degrees, ascending) of the router's row space vs reference subspaces."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.8))
    for name, a in named_angles_deg.items():
        ax.plot(range(1, len(a) + 1), a, marker="o", ms=3, label=name)
    ax.plot(range(1, len(random_angles_deg) + 1), random_angles_deg, color="gray", ls="--", label="random subspace")
    ax.set(xlabel="principal angle #", ylabel="degrees", ylim=(0, 90), title="router row space vs top principal subspace")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_duplication(rows: list, x: str, series: str, y: str = "frac_duplicated", ax=None, label_fmt="{}={}"):
    """Lines of `y` against `x`, one per value of `series`, from a list of dict rows."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(5, 3.6))
    for s in sorted({r[series] for r in rows}):
        pts = sorted((r[x], r[y]) for r in rows if r[series] == s)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label_fmt.format(series, s))
    ax.set(xlabel=x, ylabel=y)
    ax.legend(fontsize=8)
    return ax


def plot_duplication_by_frequency(named_bins: dict, y: str = "frac_duplicated", ax=None):
    """Grouped bars: per frequency quartile (rarest first), the duplicated fraction of each SAE."""
    import matplotlib.pyplot as plt
    import numpy as np

    if ax is None:
        _, ax = plt.subplots(figsize=(6, 3.6))
    names = list(named_bins)
    n_bins = len(next(iter(named_bins.values())))
    width = 0.8 / max(len(names), 1)
    for i, name in enumerate(names):
        vals = [b[y] for b in named_bins[name]]
        ax.bar(np.arange(n_bins) + i * width, vals, width, label=name)
    ax.set_xticks(np.arange(n_bins) + 0.4 - width / 2, [f"q{b + 1}" for b in range(n_bins)])
    ax.set(xlabel="firing-frequency quartile (q1 = rarest)", ylabel=y)
    ax.legend(fontsize=8)
    return ax


def plot_cosine_histograms(named_cos: dict, title: str, xlabel: str = "cosine", threshold=None, ax=None):
    """Overlaid histograms of per-feature cosines (e.g. best match to another SAE, nearest neighbour)."""
    import matplotlib.pyplot as plt
    import numpy as np

    if ax is None:
        _, ax = plt.subplots(figsize=(6, 3.6))
    for name, c in named_cos.items():
        ax.hist(np.asarray(c), bins=50, range=(-0.1, 1.0), histtype="step", lw=1.5, label=name, density=True)
    if threshold is not None:
        ax.axvline(threshold, color="k", ls="--", lw=1, label=f"cosine {threshold:g} (near-duplicate)")
    ax.set(xlabel=xlabel, ylabel="density", title=title)
    ax.legend(fontsize=8)
    return ax
