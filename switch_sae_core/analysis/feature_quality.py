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
                    (f", no real difference (p = {r['p_value']:.2g})" if r["p_value"] is not None else
                     ", one seed: not tested"))
            parts.append(f"{r['label']} {r['mean']:.3f} +- {r['std']:.3f} (n = {r['n']}){word}")
        out.append(f"{m}: " + "; ".join(parts))
    return out


# --- beyond top-1 routing on real activations (issue 22 item 4): the `variants` grid --------------------------
def variants_table_markdown(profile: str) -> str:
    """The README's table of the `variants` grid of `profile` (data/results/variants/<profile>/records.jsonl
    from the sweep, at each seed it was run at; duplication.jsonl from scripts/feature_quality.py --variants),
    joined on the SAE's key: per SAE over its seeds, mean ± seed std of held-out MSE and its change against TopK
    and top-1 FLOP-matched Switch-4 (Welch p where both sides have 2+ seeds: `checks.seed_comparison`), mean L0,
    ΔCE (nats), KL, dead latents, and the fractions of features duplicated (cos > 0.9) anywhere and in another
    expert. '' when either table is missing. Rows in `sweep.variant_configs` order."""
    from ..sweep import variant_configs
    from ..profiles import get_profile

    records, dup = table("variants", profile), _variant_duplication(profile)
    if not records or not dup:
        return ""
    latest = {r["key"]: r for r in records}
    joined = [{**latest[d["key"]], **d} for d in dup if d["key"] in latest]
    d_in = int(next(iter(latest.values()))["sae_config"]["d_in"])
    labels = [lab for lab in variant_configs(get_profile(profile), d_in) if any(r["label"] == lab for r in joined)]
    lines = ["| SAE (latents) | seeds | held-out MSE | vs TopK | vs top-1 | L0 | ΔCE (nats) | KL | dead | duplicated | "
             "in another expert |", "|---|---|---|---|---|---|---|---|---|---|---|"]

    def mean(rows: list[dict], key: str, fmt: str) -> str:
        values = [r[key] for r in rows if r.get(key) is not None]
        return "—" if not values else format(checks.seed_stats(values)["mean"], fmt)

    def versus(label: str, ref: str) -> str:
        if label == ref or not any(r["label"] == ref for r in joined):
            return "—"
        row = next(r for r in checks.seed_comparison([r for r in joined if r["label"] in (label, ref)], baseline=ref)
                   if r["label"] == label)
        return f"{row['relative']:+.1%}" + (f" (p = {row['p_value']:.2g})" if row["p_value"] is not None else "")

    for lab in labels:
        rows = [r for r in joined if r["label"] == lab]
        mse = checks.seed_stats([r["mse"] for r in rows])
        spread = f" ± {mse['std']:.0f}" if mse["n"] > 1 else ""
        lines.append(f"| {VARIANT_NAMES.get(lab, lab)} ({rows[0]['n_latents']}) | {mse['n']} | {mse['mean']:.0f}{spread} | "
                     f"{versus(lab, 'topk')} | {versus(lab, 'flop-matched-4')} | {mean(rows, 'l0', '.1f')} | "
                     f"{mean(rows, 'delta_ce', '.4f')} | {mean(rows, 'kl', '.4f')} | {mean(rows, 'dead_fraction', '.1%')} | "
                     f"{mean(rows, 'duplicate_frac', '.2%')} | {mean(rows, 'cross_expert_duplicate_frac', '.2%')} |")
    return "\n".join(lines)


VARIANT_NAMES = {"topk": "TopK", "flop-matched-4": "top-1 FLOP-matched Switch-4",
                 "top-2 (8x)": "top-2 of 8 experts, k/2 each", "shared (8x)": "shared expert + 1 of 8, k/2 each",
                 "scale (8x)": "Scale SAE: 2 of 8, global TopK, feature scaling"}


def _variant_duplication(profile: str) -> list[dict[str, Any]]:
    return load_records(Path(project_root()) / "data" / "results" / "variants" / profile / "duplication.jsonl")
