"""Shared fixtures: small SAEs of every architecture with non-trivial (random) biases."""
from __future__ import annotations

import pytest
import torch

from switch_sae_core.config import SAEConfig
from switch_sae_core.saes import build_sae

SMALL = dict(d_in=16, n_features=64, k=4)


def randomize_biases(sae: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every 1-D parameter (biases, r_mag) random, so a test cannot pass by a bias being zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in sae.parameters():
            if p.ndim == 1:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return sae


@pytest.fixture
def make_sae():
    """make_sae(arch, **overrides) -> a small SAE with random biases, built with a fixed seed."""

    def make(arch: str, seed: int = 0, **overrides):
        torch.manual_seed(seed)
        cfg = SAEConfig(arch=arch, **{**SMALL, **({"n_experts": 4} if arch == "switch" else {}), **overrides})
        return randomize_biases(build_sae(cfg), seed)

    return make
