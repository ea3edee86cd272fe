"""Feature stability: does another seed (or another architecture) learn the same decoder directions?

The measure (Paulo & Belrose 2025, "Sparse Autoencoders Trained on the Same Data Learn Different Features",
arXiv 2501.16615, who match decoders across seeds; threshold as the Switch paper's duplicate cosine): for
dictionaries A and B, the fraction of A's features whose best decoder cosine to any B feature exceeds 0.9, and
the mean of those best cosines. Directional: a dictionary 4x wider than B cannot have all its features matched.
"""
from __future__ import annotations

import dataclasses
import itertools
from typing import Mapping, Optional

from torch import Tensor

from ..record import JsonResult
from .similarity import DUPLICATE_COSINE, match_features

SHARED_COSINE = DUPLICATE_COSINE  # a feature "is found again" above this decoder cosine (0.9)


def matched(dirs_a_MD: Tensor, dirs_b_LD: Tensor, threshold: float = SHARED_COSINE) -> dict[str, float]:
    """{'shared_frac': fraction of A's M features with a B feature at cosine > threshold, 'mean_best_cos'}."""
    best = match_features(dirs_a_MD, dirs_b_LD)["best_cos"]
    return {"shared_frac": float((best > threshold).float().mean()), "mean_best_cos": float(best.mean())}


@dataclasses.dataclass
class StabilityPair(JsonResult):
    """One ordered pair of dictionaries compared (a line of data/results/stability/<profile>/records.jsonl)."""

    kind: str
    """'seed' (an SAE vs another seed of itself) or 'cross' (vs the reference architecture)."""
    a: str
    b: str
    seed_a: int
    seed_b: int
    shared_frac: float
    """Fraction of A's features with a B feature at decoder cosine > the threshold."""
    mean_best_cos: float
    chance_best_cos: float
    """`mean_best_cos` of two random dictionaries of the same sizes (`chance_best_cos`)."""
    profile: Optional[str] = None
    """The profile whose SAEs were compared (set by scripts/feature_quality.py when it writes the table)."""


@dataclasses.dataclass
class StabilitySummary(JsonResult):
    """Mean and sample std over the seed pairs of one (kind, a, b)."""

    kind: str
    a: str
    b: str
    n: int
    shared_frac: float
    shared_frac_std: float
    mean_best_cos: float
    mean_best_cos_std: float
    chance_best_cos: float
    chance_best_cos_std: float


def chance_best_cos(n_a: int, n_b: int, d: int, seed: int = 0) -> float:
    """Mean best cosine of n_a random unit directions in R^d to n_b others: what `mean_best_cos` is for
    two dictionaries that share nothing (e.g. untrained ones). ~sqrt(2 ln(n_b) / d) for large n_b."""
    import torch

    g = torch.Generator().manual_seed(seed)
    a, b = (torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=-1) for n in (n_a, n_b))
    return matched(a, b)["mean_best_cos"]


def stability_rows(dirs: Mapping[str, Mapping[int, Tensor]], reference: str = "topk",
                   threshold: float = SHARED_COSINE) -> list[StabilityPair]:
    """One row per ordered pair of dictionaries compared, from `dirs[label][seed]` = (M, D) decoder directions:
    kind 'seed' (label vs itself, every ordered pair of distinct seeds) and kind 'cross' (every label vs
    `reference`, both directions, distinct seeds only so that no pair shares an initialisation RNG stream).
    Rows: `StabilityPair`."""
    rows = []

    def pair(kind, a, b, sa, sb, dirs_a, dirs_b):
        return StabilityPair(kind, a, b, sa, sb, **matched(dirs_a, dirs_b, threshold),
                             chance_best_cos=chance_best_cos(len(dirs_a), len(dirs_b), dirs_a.shape[1]))

    for label, by_seed in dirs.items():
        for sa, sb in itertools.permutations(sorted(by_seed), 2):
            rows.append(pair("seed", label, label, sa, sb, by_seed[sa], by_seed[sb]))
    for label, by_seed in dirs.items():
        if label == reference or reference not in dirs:
            continue
        for sa, sb in itertools.product(sorted(by_seed), sorted(dirs[reference])):
            if sa == sb:
                continue
            rows.append(pair("cross", label, reference, sa, sb, by_seed[sa], dirs[reference][sb]))
            rows.append(pair("cross", reference, label, sb, sa, dirs[reference][sb], by_seed[sa]))
    return rows


def summarize(rows: list[StabilityPair] | list[dict]) -> list[StabilitySummary]:
    """Mean and sample std over seed pairs of each (kind, a, b) of `rows` (StabilityPairs, or their dicts as
    the table holds them)."""
    import statistics

    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["kind"], r["a"], r["b"]), []).append(r)
    out = []
    for (kind, a, b), rs in groups.items():
        row = {"kind": kind, "a": a, "b": b, "n": len(rs)}
        for m in ("shared_frac", "mean_best_cos", "chance_best_cos"):
            vals = [r[m] for r in rs]
            row[m], row[m + "_std"] = statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0
        out.append(StabilitySummary(**row))
    return out
