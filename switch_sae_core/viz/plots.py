"""Static figures (matplotlib). Every figure is saved through `save_figure`: PNG + SVG in `figure_dir(profile)`."""
from __future__ import annotations

from pathlib import Path

from ..paths import figures_dir


def figure_dir(profile: str, root: str | Path | None = None) -> Path:
    """`root` if given, else `paths.figures_dir(profile)`: outputs/<profile>/figures/ for a user's run, the
    committed figures/ only when a developer sets SWITCH_SAE_UPDATE_FIGURES=1 (or `reproduce --update-figures`)."""
    d = Path(root) if root is not None else figures_dir(profile)
    d.mkdir(parents=True, exist_ok=True)
    return d


def save_figure(fig, name: str, profile: str, root: str | Path | None = None) -> list[Path]:
    """Save a matplotlib figure as <name>.png and <name>.svg; return the paths."""
    d = figure_dir(profile, root)
    paths = [d / f"{name}.png", d / f"{name}.svg"]
    fig.savefig(paths[0], dpi=150, bbox_inches="tight")
    fig.savefig(paths[1], bbox_inches="tight")
    return paths


# --- router geometry and expert similarity (notebooks 04 and 05) ------------------------------------------


def expert_colors(n: int) -> list:
    """n colours, all distinct: tab10 up to 10 experts, tab20 up to 20, else n evenly spaced on 'turbo'."""
    import matplotlib
    import numpy as np

    if n <= 20:
        cmap = matplotlib.colormaps["tab10" if n <= 10 else "tab20"]
        return [cmap(i) for i in range(n)]
    return [matplotlib.colormaps["turbo"](t) for t in np.linspace(0.05, 0.95, n)]


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


# --- the paper's sections: Pareto fronts and sample efficiency (notebooks 01-03) ------------------------
BASELINE_COLORS = {"relu": "#8c8c8c", "gated": "#a0522d", "topk": "#000000"}


# log2 N of the Switch SAEs each setting spans (paper grids: fixed width N = 2 ... 128, FLOP-matched N = 2 ... 8):
# the shades spread over that span, so neighbouring N differ clearly
SWITCH_LOG2_RANGE = {"fixed_width": (1, 7), "flop_matched": (1, 3)}


def label_color(label: str, setting: str = "fixed_width") -> str:
    """One colour per SAE family; Switch SAEs shade with N (blues fixed width, reds FLOP-matched), from
    light (smallest N of the setting's grid) to dark (largest)."""
    import matplotlib

    if label in BASELINE_COLORS:
        return BASELINE_COLORS[label]
    n = int(label.split("-")[1])
    setting = "flop_matched" if setting == "flop_matched" else "fixed_width"
    lo, hi = SWITCH_LOG2_RANGE[setting]
    t = min(1.0, max(0.0, (n.bit_length() - 1 - lo) / (hi - lo)))
    cmap = matplotlib.colormaps["Reds" if setting == "flop_matched" else "Blues"]
    return matplotlib.colors.to_hex(cmap(0.4 + 0.6 * t))


def plot_pareto(ax, lines: dict, setting: str, xlabel: str, ylabel: str, title: str = "", log_x: bool = True):
    """One line per SAE family from `results.pareto_lines` ({label: [(x, y), ...]})."""
    for label, pts in lines.items():
        xs, ys = zip(*pts)
        ax.plot(xs, ys, "o-", color=label_color(label, setting), label=label, ms=4,
                lw=2.2 if label == "topk" else 1.4)
    if log_x:
        from matplotlib.ticker import NullFormatter, ScalarFormatter

        ax.set_xscale("log")
        xs_all = [x for pts in lines.values() for x, _ in pts]
        ax.set_xticks([2**i for i in range(16) if min(xs_all) / 2 <= 2**i <= max(xs_all) * 2])
        ax.xaxis.set_major_formatter(ScalarFormatter())  # plain L0 values (powers of 2), not 10^x
        ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels collide on short ranges
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def pareto_figure(ours: dict, paper: dict, setting: str, model_label: str, paper_label: str = "GPT-2 small, layer 8"):
    """2x2: top row our L0-vs-MSE and L0-vs-loss-recovered; bottom row the paper's numbers (a different
    model and scale: compare the orderings, not the values). `ours`/`paper` = {'mse': lines, 'loss_recovered': lines}."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 8.5))
    plot_pareto(axes[0, 0], ours["mse"], setting, "L0", "MSE (summed over d)", f"ours: {model_label}")
    plot_pareto(axes[0, 1], ours["loss_recovered"], setting, "L0", "CE loss recovered", f"ours: {model_label}")
    plot_pareto(axes[1, 0], paper["mse"], setting, "k (= L0)", "MSE", f"paper: {paper_label}")
    plot_pareto(axes[1, 1], paper["loss_recovered"], setting, "k (= L0)", "loss recovered", f"paper: {paper_label}")
    for ax in axes[1]:
        ax.set_facecolor("#f7f7f7")
    fig.suptitle(f"{setting.replace('_', ' ')}: bottom row = the paper's reference (different model, "
                 "different axis scales)", fontsize=10)
    fig.tight_layout()
    return fig


def sample_efficiency_figure(curves: list[dict], speedups: dict, paper_speedup: float = 5.0):
    """MSE vs steps, tokens and FLOPs for TopK and FLOP-matched Switch SAEs, the TopK's final MSE as a
    dashed line, a marker where each Switch first reaches it; a 4th panel: our speed-ups vs the paper's.
    `curves`: [{'label', 'step': [...], 'tokens': [...], 'flops': [...], 'mse': [...]}];
    `speedups`: {label: steps_topk / steps_switch or None}."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(17, 4), gridspec_kw={"width_ratios": [1, 1, 1, 0.7]})
    topk = next(c for c in curves if c["label"] == "topk")
    for ax, x, xlabel in zip(axes[:3], ("step", "tokens", "flops"), ("training step", "tokens", "training FLOPs (3x forward)")):
        for c in curves:
            color = label_color(c["label"], "flop_matched")
            ax.plot(c[x], c["mse"], color=color, label=c["label"], lw=2.2 if c["label"] == "topk" else 1.4)
            if c.get("reach_index") is not None:
                i = c["reach_index"]
                ax.plot([c[x][i]], [c["mse"][i]], "*", color=color, ms=12, mec="k")
        ax.axhline(topk["mse"][-1], ls="--", color="k", lw=0.8, label="TopK final MSE")
        ax.set(xlabel=xlabel, ylabel="held-out MSE", xscale="log" if x != "step" else "linear")
        _no_minor_labels(ax)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    labels = list(speedups)
    ours = [speedups[l] or 0.0 for l in labels]
    axes[3].barh(labels, ours, color=[label_color(l, "flop_matched") for l in labels], label="ours")
    for i, label in enumerate(labels):
        if speedups[label] is None:
            axes[3].text(0.1, i, "never reached TopK's final MSE", va="center", fontsize=8)
    axes[3].axvline(paper_speedup, color="k", ls=":", label=f"paper (GPT-2): ~{paper_speedup:g}x")
    axes[3].axvline(1.0, color="gray", lw=0.8)
    axes[3].set(xlabel="speed-up in steps to TopK's final MSE", title="reference: paper ~5x")
    axes[3].legend(fontsize=7)
    fig.tight_layout()
    return fig


def _no_minor_labels(ax) -> None:
    """Log axes: label only the decades (minor labels overlap on narrow ranges)."""
    import matplotlib.ticker as mticker

    ax.xaxis.set_minor_formatter(mticker.NullFormatter())
    ax.yaxis.set_minor_formatter(mticker.NullFormatter())


def plotly_pareto(records: list[dict], x: str = "l0", y: str = "mse", title: str = ""):
    """Interactive version of a Pareto panel: hover shows each SAE's name, k, N, FLOPs and wall-clock."""
    import plotly.graph_objects as go

    fig = go.Figure()
    by_label: dict[str, list[dict]] = {}
    for r in records:
        if r.get(x) is not None and r.get(y) is not None:
            by_label.setdefault(r["label"], []).append(r)
    for label, rs in by_label.items():
        rs = sorted(rs, key=lambda r: r[x])
        fig.add_trace(go.Scatter(
            x=[r[x] for r in rs], y=[r[y] for r in rs], mode="lines+markers", name=label,
            line=dict(color=label_color(label, rs[0]["setting"])),
            text=[f"{r['name']}<br>FLOPs/input {r['flops_per_input']:,}<br>train {r.get('train_seconds') or 0:.0f}s"
                  for r in rs], hoverinfo="text+x+y"))
    fig.update_layout(title=_plotly_title(title, width=620), xaxis_title=x, yaxis_title=y, xaxis_type="log",
                      height=420, width=620)
    return fig


def _plotly_title(title: str, width: int, font_size: int = 14) -> dict:
    """A plotly title wrapped to the figure's width (plotly clips a title wider than the figure)."""
    import textwrap

    chars = max(20, int(0.9 * width / (0.6 * font_size)))  # ~0.6 em per character
    return dict(text="<br>".join(textwrap.wrap(title, chars)), font=dict(size=font_size), x=0.05, xanchor="left")


def plotly_curves(curves: list[dict], x: str = "step"):
    """Interactive MSE-vs-training curves (sample efficiency)."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for c in curves:
        fig.add_trace(go.Scatter(x=c[x], y=c["mse"], mode="lines", name=c["label"],
                                 line=dict(color=label_color(c["label"], "flop_matched"))))
    fig.update_layout(xaxis_title=x, yaxis_title="held-out MSE", yaxis_type="log", height=420, width=620)
    return fig


# --- synthetic ground truth (notebook 06) ---------------------------------------------------------------
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
