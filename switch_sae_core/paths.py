"""Where things live on disk. Notebooks run from notebooks/, the CLI from anywhere: all paths resolve
from here, never from the current directory.

- project root: the checkout holding pyproject.toml (editable install), else the current directory
- cache (activations, converted models, trained SAEs): $SWITCH_SAE_CACHE, else <root>/.cache/switch-sae
- committed results tables: <root>/data/results/<profile>/; a run's own table: $SWITCH_SAE_RESULTS
  (`switch-sae reproduce` sets it to its output folder)
- figures: see `figures_dir` — a user's run never writes into the committed figures/
"""
from __future__ import annotations

import os
from pathlib import Path

RESULTS_ENV = "SWITCH_SAE_RESULTS"  # a folder holding the records.jsonl to read and extend instead of data/results/<profile>/
FIGURES_ENV = "SWITCH_SAE_FIGURES"  # the folder to write figures to (set by `switch-sae reproduce`)
UPDATE_FIGURES_ENV = "SWITCH_SAE_UPDATE_FIGURES"  # "1": write the committed figures/ (a developer refreshing them)


def project_root() -> Path:
    here = Path(__file__).resolve().parents[1]
    return here if (here / "pyproject.toml").is_file() else Path.cwd()


def cache_dir() -> Path:
    """The cache folder (created if missing); a one-line UnwritablePathError if it is a file or not writable."""
    from .durable import check_writable_dir

    return check_writable_dir(os.environ.get("SWITCH_SAE_CACHE") or project_root() / ".cache" / "switch-sae",
                              "SWITCH_SAE_CACHE")


def figures_root() -> Path:
    """The committed figures (the README's): written only when $SWITCH_SAE_UPDATE_FIGURES=1."""
    return project_root() / "figures"


def figures_dir(profile: str) -> Path:
    """Where figures of `profile` go: $SWITCH_SAE_FIGURES if set; the committed figures/ (profile `quick`) or
    figures/<profile>/ if $SWITCH_SAE_UPDATE_FIGURES=1; else outputs/<profile>/figures/ (git-ignored)."""
    if os.environ.get(FIGURES_ENV):
        return Path(os.environ[FIGURES_ENV])
    if os.environ.get(UPDATE_FIGURES_ENV) == "1":
        return figures_root() if profile == "quick" else figures_root() / profile
    return project_root() / "outputs" / profile / "figures"


def results_root() -> Path:
    return project_root() / "data" / "results"
