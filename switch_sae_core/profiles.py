"""Named scales of the whole pipeline: `ci` (seconds), `quick` (offline SmolLM2 on a 2-core CPU),
`paper` (GPT-2 small layer 8, OpenWebText, 100K steps x 8192, for a GPU with internet).

Select one with the environment variable SWITCH_SAE_PROFILE (notebooks) or `--profile` (CLI).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Optional

from .config import Config, ConfigError, DataConfig, TrainConfig


@dataclasses.dataclass
class Profile(Config):
    name: str = "quick"
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    width_multiple: int = 8  # baseline dictionary size M = width_multiple * d_model (paper: 32)
    ks: tuple[int, ...] = (16, 32, 64)  # paper: 8, 16, 32, 48, 64, 96, 128, 192
    fixed_width_experts: tuple[int, ...] = (4, 8, 16, 32)  # paper: 16, 32, 64, 128
    flop_matched_experts: tuple[int, ...] = (2, 4, 8)  # paper: 2, 4, 8
    # ReLU/Gated have no k: their sparsity coefficient lambda spans an L0 range instead, one value per k.
    # Relative values: lambda = value * sqrt(E||x||^2 / d) (the loss is quadratic in x, the L1 term linear).
    relu_l1_coeffs: tuple[float, ...] = (8.0, 4.0, 2.0)
    gated_l1_coeffs: tuple[float, ...] = (8.0, 4.0, 2.0)
    eval_every: int = 10  # steps between held-out MSE evaluations (the sample-efficiency curves)
    n_heldout: int = 8192  # held-out activations for MSE / FVU / L0 of every record
    ce_contexts: Optional[int] = None  # held-out contexts for CE loss recovered / KL of every record; None = all

    @classmethod
    def from_dict(cls, d):
        d = dict(d)
        d["data"] = DataConfig.from_dict(d.get("data", {}))
        d["train"] = TrainConfig.from_dict(d.get("train", {}))
        return super().from_dict(d)


# the sweeps a profile can run (switch_sae_core.sweep.grid_configs builds them)
GRIDS = ("fixed_width", "flop_matched")

PROFILES: dict[str, Profile] = {
    # seconds: the pipeline end to end on a few thousand tokens (tests and `pytest --nbmake` in CI)
    "ci": Profile(
        name="ci",
        data=DataConfig(n_train_tokens=4096, n_eval_tokens=1024),
        train=TrainConfig(steps=30, batch_size=256, progress=False, log_every=10, dead_window_tokens=4096,
                          geometric_median_batch=1024),
        width_multiple=2,
        ks=(16,),
        fixed_width_experts=(4, 8),
        flop_matched_experts=(2,),
        relu_l1_coeffs=(2.0,),
        gated_l1_coeffs=(2.0,),
        eval_every=10,
        n_heldout=1024,
    ),
    # < 45 min on a 2-core CPU: offline SmolLM2-135M layer 20, 100K tokens, 21 SAEs of < 1 min each
    "quick": Profile(
        name="quick",
        # SmolLM2 layer 20 (DataConfig default): blocks.20.hook_resid_post is after 21 of 30 blocks (0.70 depth),
        # like the paper's GPT-2 layer 8 (after 9 of 12); stop_at_layer=21 keeps extraction at ~2/3 of a full
        # forward pass. Deeper layers cost more to extract, shallower ones are less abstract (docs/activations.md).
        data=DataConfig(n_train_tokens=100_000, n_eval_tokens=4096),
        train=TrainConfig(steps=600, batch_size=512, log_every=10, dead_window_tokens=50_000),
        width_multiple=4,
        ks=(16, 32, 64),
        fixed_width_experts=(4, 16),
        flop_matched_experts=(2, 4),
        relu_l1_coeffs=(8.0, 6.0, 4.5),  # measured: 4 -> L0 87, 10 -> L0 1.5 after 100 steps
        gated_l1_coeffs=(24.0, 12.0, 6.0),
        eval_every=10,
        n_heldout=4096,
        ce_contexts=16,
    ),
    # SAEs trained to convergence on a 2-core CPU (docs/convergence.md): 1M tokens of offline SmolLM2 layer 20
    "cpu": Profile(
        name="cpu",
        data=DataConfig(n_train_tokens=1_000_000, n_eval_tokens=16_384),
        train=TrainConfig(steps=2000, batch_size=4096, log_every=50, dead_window_tokens=1_000_000),
        width_multiple=4,
        ks=(16, 32, 64),
        fixed_width_experts=(4, 16),
        flop_matched_experts=(2, 4, 8),
        relu_l1_coeffs=(8.0, 6.0, 4.5),
        gated_l1_coeffs=(24.0, 12.0, 6.0),
        eval_every=100,
        n_heldout=8192,
        ce_contexts=32,
    ),
    # the paper's grid on one H200-class GPU, offline: SmolLM2 layer 20 on every offline corpus (~3.6M tokens,
    # extracted in about a minute on a GPU), bf16 autocast. Sized (not yet measured: no GPU was available) for
    # < 1 hour: 72 SAEs x 4000 steps x 8192 tokens, ~3-6 ms per step for M = 32 d on an H200.
    "gpu": Profile(
        name="gpu",
        data=DataConfig(n_train_tokens=3_400_000, n_eval_tokens=65_536, model_batch_size=64),
        train=TrainConfig(steps=4000, batch_size=8192, log_every=100, autocast_bf16=True),
        width_multiple=32,
        ks=(8, 16, 32, 48, 64, 96, 128, 192),
        fixed_width_experts=(16, 32, 64, 128),
        flop_matched_experts=(2, 4, 8),
        relu_l1_coeffs=(16.0, 11.0, 8.0, 6.0, 5.0, 4.0, 3.0, 2.0),
        gated_l1_coeffs=(48.0, 32.0, 24.0, 16.0, 12.0, 9.0, 6.0, 4.0),
        eval_every=200,
        n_heldout=16_384,
        ce_contexts=64,
    ),
    # scripts/gpu_smoke.sh: the gpu profile's code paths (CUDA grouped_mm, bf16) in a few minutes
    "gpu_smoke": Profile(
        name="gpu_smoke",
        data=DataConfig(n_train_tokens=200_000, n_eval_tokens=8192, model_batch_size=64),
        train=TrainConfig(steps=300, batch_size=8192, log_every=50, autocast_bf16=True),
        width_multiple=8,
        ks=(32,),
        fixed_width_experts=(16,),
        flop_matched_experts=(2,),
        relu_l1_coeffs=(6.0,),
        gated_l1_coeffs=(12.0,),
        eval_every=50,
        n_heldout=8192,
        ce_contexts=32,
    ),
    # the paper's setting (GPT-2 small, OpenWebText, needs the HF hub and a GPU)
    "paper": Profile(
        name="paper",
        # 820M x 768 activations: ~1.26 TB on disk even as float16 (docs/activations.md)
        data=DataConfig(model="gpt2", layer=8, dataset="openwebtext", n_train_tokens=820_000_000, n_eval_tokens=131_072,
                        store_dtype="float16"),
        train=TrainConfig(steps=100_000, batch_size=8192, log_every=100),
        width_multiple=32,
        ks=(8, 16, 32, 48, 64, 96, 128, 192),
        fixed_width_experts=(16, 32, 64, 128),
        flop_matched_experts=(2, 4, 8),
        relu_l1_coeffs=(16.0, 11.0, 8.0, 6.0, 5.0, 4.0, 3.0, 2.0),
        gated_l1_coeffs=(16.0, 11.0, 8.0, 6.0, 5.0, 4.0, 3.0, 2.0),
        eval_every=1000,
        n_heldout=65_536,
    ),
}


def get_profile(name: str | None = None) -> Profile:
    """The named profile; default from $SWITCH_SAE_PROFILE, else 'quick'."""
    name = name or os.environ.get("SWITCH_SAE_PROFILE", "quick")
    if name not in PROFILES:
        raise ConfigError(f"unknown profile {name!r}: choose one of {sorted(PROFILES)} (env SWITCH_SAE_PROFILE)")
    return PROFILES[name]
