"""Where things live on disk. Notebooks run from notebooks/, the CLI from anywhere: all paths resolve
from here, never from the current directory.

- project root: the checkout holding pyproject.toml (editable install), else the current directory
- cache (activations, converted models, trained SAEs): $SWITCH_SAE_CACHE, else <root>/.cache/switch-sae
"""
from __future__ import annotations

import os
from pathlib import Path


def project_root() -> Path:
    here = Path(__file__).resolve().parents[1]
    return here if (here / "pyproject.toml").is_file() else Path.cwd()


def cache_dir() -> Path:
    d = Path(os.environ.get("SWITCH_SAE_CACHE") or project_root() / ".cache" / "switch-sae")
    d.mkdir(parents=True, exist_ok=True)
    return d


def figures_root() -> Path:
    return project_root() / "figures"


def results_root() -> Path:
    return project_root() / "data" / "results"
