"""Static figures (matplotlib). Every figure is saved through `save_figure`: PNG + SVG in figures/<profile>/."""
from __future__ import annotations

from pathlib import Path

from ..paths import figures_root


def figure_dir(profile: str, root: str | Path | None = None) -> Path:
    """figures/ for the committed `quick` profile; figures/<profile>/ otherwise (ci output is git-ignored)."""
    base = Path(root) if root is not None else figures_root()
    d = base if profile == "quick" else base / profile
    d.mkdir(parents=True, exist_ok=True)
    return d


def save_figure(fig, name: str, profile: str, root: str | Path | None = None) -> list[Path]:
    """Save a matplotlib figure as <name>.png and <name>.svg; return the paths."""
    d = figure_dir(profile, root)
    paths = [d / f"{name}.png", d / f"{name}.svg"]
    fig.savefig(paths[0], dpi=150, bbox_inches="tight")
    fig.savefig(paths[1], bbox_inches="tight")
    return paths
