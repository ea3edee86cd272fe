"""The SynthSAEBench figure: one panel per score, one bar per SAE (mean over seeds, the seed std as error bar)."""
from __future__ import annotations

PANELS = (("mcc", "MCC (SAELens)"), ("uniqueness", "uniqueness (SAELens)"), ("f1", "latent F1 (SAELens)"),
          ("recovered_frac_frequent", "frequent true features\nrecovered (cos > 0.9)"),
          ("explained_variance", "explained variance (SAELens)"), ("mse", "held-out MSE (lower is better)"))


def plot_bench(summary_rows: list[dict]):
    """Bars of `ground_truth.summary` rows, in the README table's order (`ground_truth.DISPLAY`, then the other
    arms); the TopK rows (ours and SAELens's) in grey, each Switch SAE in its own colour (never a grey)."""
    import matplotlib.pyplot as plt

    from ..ground_truth import DISPLAY
    from .experts import expert_colors

    order = {label: i for i, label in enumerate(DISPLAY)}
    summary_rows = sorted(summary_rows, key=lambda r: order.get(r["label"], len(order)))  # stable: others keep theirs
    fig, axes = plt.subplots(2, len(PANELS) // 2, figsize=(4.2 * len(PANELS) // 2, 8.0))
    labels = [r["label"] for r in summary_rows]
    palette = iter(expert_colors(sum("topk" not in lab for lab in labels), no_grey=True))
    colors = ["0.45" if "topk" in lab else next(palette) for lab in labels]
    for ax, (metric, title) in zip(axes.flat, PANELS):
        vals = [r.get(metric, float("nan")) for r in summary_rows]
        errs = [r.get(metric + "_std", 0.0) for r in summary_rows]
        ax.bar(range(len(labels)), vals, yerr=errs, color=colors, capsize=2)
        ax.set_xticks(range(len(labels)), labels, rotation=65, ha="right", fontsize=7)
        ax.set_title(title, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    n = max(r["n"] for r in summary_rows)
    fig.suptitle(f"SynthSAEBench scores, mean over {n} seeds (error bars: seed std)", fontsize=10)
    fig.tight_layout()
    return fig
