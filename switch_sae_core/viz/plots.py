"""Static figures (matplotlib). Every figure is saved through `save_figure`: PNG + SVG in `figure_dir(profile)`.

The panels live by subject: `experts.py` (router geometry, expert similarity), `pareto.py` (the paper's Pareto
fronts and sample efficiency), `recovery.py` (synthetic ground truth); their names are importable from here too.
"""
from __future__ import annotations

from pathlib import Path

from ..paths import figures_dir
from .experts import (_heatmap, expert_colors, plot_cosine_histograms, plot_duplication,  # noqa: F401 (re-exported)
                      plot_duplication_by_frequency, plot_expert_similarity, plot_principal_angles,
                      plot_router_alignment, plot_routing_history, plot_tsne_by_expert)
from .pareto import (BASELINE_COLORS, SWITCH_LOG2_RANGE, _no_minor_labels, _plotly_title,  # noqa: F401 (re-exported)
                     label_color, pareto_figure, plot_pareto, plotly_curves, plotly_pareto, sample_efficiency_figure)
from .recovery import RECOVERY_LABELS, plot_ground_truth, plot_recovery_bars, plot_recovery_lines  # noqa: F401


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
