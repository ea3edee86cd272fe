"""Feature stability: does another seed (or another architecture) learn the same decoder directions?

The measure (Paulo & Belrose 2025, "Sparse Autoencoders Trained on the Same Data Learn Different Features",
arXiv 2501.16615, who match decoders across seeds; threshold as the Switch paper's duplicate cosine): for
dictionaries A and B, the fraction of A's features whose best decoder cosine to any B feature exceeds 0.9, and
the mean of those best cosines. Directional: a dictionary 4x wider than B cannot have all its features matched.
"""
from __future__ import annotations

import itertools
from typing import Mapping

from torch import Tensor

from .similarity import DUPLICATE_COSINE, match_features

SHARED_COSINE = DUPLICATE_COSINE  # a feature "is found again" above this decoder cosine (0.9)


def matched(dirs_a_MD: Tensor, dirs_b_LD: Tensor, threshold: float = SHARED_COSINE) -> dict[str, float]:
    """{'shared_frac': fraction of A's M features with a B feature at cosine > threshold, 'mean_best_cos'}."""
    best = match_features(dirs_a_MD, dirs_b_LD)["best_cos"]
    return {"shared_frac": float((best > threshold).float().mean()), "mean_best_cos": float(best.mean())}


def stability_rows(dirs: Mapping[str, Mapping[int, Tensor]], reference: str = "topk",
                   threshold: float = SHARED_COSINE) -> list[dict]:
    """One row per ordered pair of dictionaries compared, from `dirs[label][seed]` = (M, D) decoder directions:
    kind 'seed' (label vs itself, every ordered pair of distinct seeds) and kind 'cross' (every label vs
    `reference`, both directions, distinct seeds only so that no pair shares an initialisation RNG stream).
    Row: {'kind', 'a', 'b', 'seed_a', 'seed_b', 'shared_frac', 'mean_best_cos'}."""
    rows = []
    for label, by_seed in dirs.items():
        for sa, sb in itertools.permutations(sorted(by_seed), 2):
            rows.append({"kind": "seed", "a": label, "b": label, "seed_a": sa, "seed_b": sb,
                         **matched(by_seed[sa], by_seed[sb], threshold)})
    for label, by_seed in dirs.items():
        if label == reference or reference not in dirs:
            continue
        for sa, sb in itertools.product(sorted(by_seed), sorted(dirs[reference])):
            if sa == sb:
                continue
            rows.append({"kind": "cross", "a": label, "b": reference, "seed_a": sa, "seed_b": sb,
                         **matched(by_seed[sa], dirs[reference][sb], threshold)})
            rows.append({"kind": "cross", "a": reference, "b": label, "seed_a": sb, "seed_b": sa,
                         **matched(dirs[reference][sb], by_seed[sa], threshold)})
    return rows


def summarize(rows: list[dict]) -> list[dict]:
    """Mean and sample std over seed pairs of each (kind, a, b): {'kind', 'a', 'b', 'n', 'shared_frac',
    'shared_frac_std', 'mean_best_cos', 'mean_best_cos_std'}."""
    import statistics

    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["kind"], r["a"], r["b"]), []).append(r)
    out = []
    for (kind, a, b), rs in groups.items():
        row = {"kind": kind, "a": a, "b": b, "n": len(rs)}
        for m in ("shared_frac", "mean_best_cos"):
            vals = [r[m] for r in rs]
            row[m], row[m + "_std"] = statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0
        out.append(row)
    return out
