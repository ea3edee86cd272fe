"""switch_sae_core: Switch Sparse Autoencoders (mixture-of-expert SAEs) and their baselines.

    from switch_sae_core import SwitchSAE, TopKSAE, ReLUSAE, GatedSAE, SAEConfig, TrainConfig, DataConfig
    from switch_sae_core import train_sae, load_sae, ActivationStore, get_profile

Importing the package is light: only the configs (no torch) load here; every other name is imported from
its module on first use (PEP 562 module `__getattr__`), so transformer_lens and plotting libraries load
only when a function that needs them runs.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .config import ConfigError, DataConfig, SAEConfig, TrainConfig

__version__ = "0.1.0"

# public name -> the module (relative to this package) that defines it
_LAZY = {
    "SwitchSAE": "saes",
    "TopKSAE": "saes",
    "ReLUSAE": "saes",
    "GatedSAE": "saes",
    "load_sae": "saes",
    "train_sae": "train",
    "ActivationStore": "data.store",
    "get_profile": "profiles",
}

__all__ = ["ConfigError", "DataConfig", "SAEConfig", "TrainConfig", *_LAZY]

if TYPE_CHECKING:  # for type checkers and IDEs; at runtime these come from __getattr__
    from .data.store import ActivationStore  # noqa: F401
    from .profiles import get_profile  # noqa: F401
    from .saes import GatedSAE, ReLUSAE, SwitchSAE, TopKSAE, load_sae  # noqa: F401
    from .train import train_sae  # noqa: F401


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value  # later look-ups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
