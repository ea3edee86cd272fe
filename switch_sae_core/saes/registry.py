"""The SAE architectures by name: `register` a class under `SAEConfig.arch`, `build_sae` one from its config,
`initial_sae` the one every trainer starts from."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from ..config import KNOWN_ARCHS, SAEConfig

if TYPE_CHECKING:
    from .base import BaseSAE


REGISTRY: dict[str, "type[BaseSAE]"] = {}


def register(arch: str):
    """Class decorator: `build_sae(SAEConfig(arch=arch, ...))` builds this class (see docs/architecture.md).
    ValueError if another class already holds the name (a re-imported module may register its class again)."""
    def deco(cls: type[BaseSAE]) -> type[BaseSAE]:
        old = REGISTRY.get(arch)
        if old is not None and (old.__module__, old.__qualname__) != (cls.__module__, cls.__qualname__):
            raise ValueError(f"SAE architecture {arch!r} is already registered by {old.__module__}.{old.__qualname__}: "
                             "pick another name")
        REGISTRY[arch] = cls
        KNOWN_ARCHS.add(arch)
        return cls

    return deco


def build_sae(cfg: SAEConfig | dict[str, Any]) -> BaseSAE:
    if isinstance(cfg, dict):
        cfg = SAEConfig.from_dict(cfg)
    from . import batchtopk, gated, jumprelu, relu, switch, topk  # noqa: F401  (fill the registry)

    return REGISTRY[cfg.arch](cfg)


def initial_sae(cfg: SAEConfig, seed: int) -> BaseSAE:
    """The SAE every trainer starts from: `torch.manual_seed(seed)`, then `build_sae(cfg)` (on CPU; callers move
    it). The one place of that rule, so `analysis.similarity.distance_from_init` can rebuild any initialisation
    (except expert-parallel SAEs too large to build whole, which `distributed.expert_parallel.init_shard` draws
    per rank)."""
    torch.manual_seed(seed)
    return build_sae(cfg)
