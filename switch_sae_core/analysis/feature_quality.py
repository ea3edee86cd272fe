"""What the stability and absorption tables of a profile say (scripts/feature_quality.py writes them).

Stability (`analysis.stability`): per ordered pair of SAEs, the fraction of A's features that B has at decoder
cos > 0.9, beside the mean best cosine and its chance level (two random dictionaries of the same sizes).
Absorption (`analysis.absorption`, SAEBench's first-letter eval): per SAE, the mean absorption fraction and the
mean full-absorption rate over the letters the probe detects. Differences use `checks.seed_comparison` (Welch).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .. import checks
from .stability import summarize
from ..paths import project_root
from ..results import load_records



def table(kind: str, profile: str) -> list[dict[str, Any]]:
    """kind 'stability' or 'absorption': data/results/<kind>/<profile>/records.jsonl ([] when absent)."""
    return load_records(Path(project_root()) / "data" / "results" / kind / profile / "records.jsonl")


def stability_sentences(rows: list[dict]) -> list[str]:
    """One sentence per (kind, a, b) of the table: shared fraction and mean best cosine against chance."""
    out = []
    for s in summarize(rows):
        what = "another seed of the same SAE" if s["kind"] == "seed" else f"{s['b']}"
        out.append(f"{s['a']} -> {what} ({s['n']} pairs): {s['shared_frac']:.1%} +- {s['shared_frac_std']:.1%} "
                   f"of features found again at cos > 0.9; mean best cos {s['mean_best_cos']:.3f} (chance "
                   f"{s['chance_best_cos']:.3f})")
    return out


def absorption_sentences(records: list[dict], baseline: str = "topk",
                         metrics=("mean_absorption_fraction", "mean_full_absorption")) -> list[str]:
    """Each label's absorption over seeds against the baseline's (lower is better): mean +- std, and 'lower' /
    'HIGHER' only when beyond the seed spread with Welch p < checks.P_VALUE."""
    out = []
    scored = [r for r in records if r.get("scored", True)]
    for m in metrics:
        rows = checks.seed_comparison(scored, baseline=baseline, metric=m)
        parts = []
        for r in rows:
            real = checks.is_real(r)
            word = ("" if r["label"] == baseline else
                    f", {'lower' if r['diff'] < 0 else 'HIGHER'} than {baseline} (p = {r['p_value']:.2g})" if real else
                    ", no real difference" + (f" (p = {r['p_value']:.2g})" if r["p_value"] is not None else
                                              " (one seed: no test)"))
            parts.append(f"{r['label']} {r['mean']:.3f} +- {r['std']:.3f} (n = {r['n']}){word}")
        out.append(f"{m}: " + "; ".join(parts))
    return out
