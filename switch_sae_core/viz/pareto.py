"""The paper's sections (notebooks 01-03): one colour per SAE family (`label_color`), the Pareto fronts and the
sample-efficiency figure, static (matplotlib) and interactive (plotly)."""
from __future__ import annotations


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
