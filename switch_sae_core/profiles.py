"""Named scales of the whole pipeline: `ci` (seconds), `quick` (offline SmolLM2 on a 2-core CPU),
`paper` (GPT-2 small layer 8, OpenWebText, 100K steps x 8192, for a GPU with internet).

Select one with the environment variable SWITCH_SAE_PROFILE (notebooks) or `--profile` (CLI).
"""
from __future__ import annotations

import dataclasses
import os

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

    @classmethod
    def from_dict(cls, d):
        d = dict(d)
        d["data"] = DataConfig.from_dict(d.get("data", {}))
        d["train"] = TrainConfig.from_dict(d.get("train", {}))
        return super().from_dict(d)


PROFILES: dict[str, Profile] = {
    "ci": Profile(
        name="ci",
        data=DataConfig(n_train_tokens=4096, n_eval_tokens=1024),
        train=TrainConfig(steps=30, batch_size=256, progress=False),
        width_multiple=2,
        ks=(16,),
        fixed_width_experts=(4, 8),
        flop_matched_experts=(2,),
    ),
    "quick": Profile(name="quick"),
    "paper": Profile(
        name="paper",
        data=DataConfig(model="gpt2", layer=8, dataset="openwebtext", n_train_tokens=820_000_000, n_eval_tokens=131_072),
        train=TrainConfig(steps=100_000, batch_size=8192),
        width_multiple=32,
        ks=(8, 16, 32, 48, 64, 96, 128, 192),
        fixed_width_experts=(16, 32, 64, 128),
        flop_matched_experts=(2, 4, 8),
    ),
}


def get_profile(name: str | None = None) -> Profile:
    """The named profile; default from $SWITCH_SAE_PROFILE, else 'quick'."""
    name = name or os.environ.get("SWITCH_SAE_PROFILE", "quick")
    if name not in PROFILES:
        raise ConfigError(f"unknown profile {name!r}: choose one of {sorted(PROFILES)} (env SWITCH_SAE_PROFILE)")
    return PROFILES[name]
