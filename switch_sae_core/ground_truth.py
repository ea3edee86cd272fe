"""What the SynthSAEBench table says: per-SAE summaries over seeds, the convergence check, and the verdicts.

The table (`data/results/synthsaebench/<scale>/records.jsonl`, written by scripts/synthsaebench.py) holds one
record per trained SAE with SAELens's own synthetic-benchmark scores (`interop.synthsaebench.evaluate`) beside
our reconstruction numbers. Needs no sae-lens: it only reads the table. Every sentence is chosen by a stated
rule on the numbers: a difference counts when it is beyond the seed spread (|diff| > the larger seed std) AND
Welch's p < checks.P_VALUE (`checks.seed_comparison`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from . import checks
from .paths import project_root
from .results import load_records

BASELINE = "topk"
REFERENCE = "sae-lens topk"  # SAELens's own TopK, trained by SAELens's own trainer on the same stream
EQUAL_FLOPS = ("flop-matched-2", "flop-matched-4")
EQUAL_WIDTH = ("switch-4", "switch-8", "switch-16")
BEYOND_TOP1 = ("flop-matched-4", "top-2 (8x)", "shared (8x)", "scale (8x)")  # equal encoder FLOPs and L0, 4x the width
ALPHA_ONLY = "(alpha*L_aux)"  # label suffix: the same Switch SAE with alpha * L_aux instead of the paper's alpha * d * L_aux
# (metric, higher is better): SAELens's scores, our recovery count and our reconstruction
METRICS = (("mcc", True), ("uniqueness", True), ("f1", True), ("precision", True), ("recall", True),
           ("explained_variance", True), ("recovered_frac_frequent", True), ("recovered_frac", True),
           ("mse", False), ("dead_latents", False), ("cross_expert_duplicate_frac", False))


# the README's names of the grid's SAEs (interop.synthsaebench.grid), in the README table's order
DISPLAY = {
    BASELINE: "TopK", REFERENCE: "SAELens's TopK, its trainer",
    "switch-4": "Switch-4, fixed width", "switch-8": "Switch-8, fixed width", "switch-16": "Switch-16, fixed width",
    "flop-matched-2": "FLOP-matched Switch-2", "flop-matched-4": "FLOP-matched Switch-4",
    "top-2 (8x)": "top-2 of 8 experts, k/2 each", "shared (8x)": "shared expert + 1 of 8 experts, k/2 each",
    "scale (8x)": "Scale SAE: 2 of 8, global TopK, feature scaling",
}


def records_path(scale: str) -> Path:
    return project_root() / "data" / "results" / "synthsaebench" / scale / "records.jsonl"


def bench_records(scale: str = "4k") -> list[dict[str, Any]]:
    """Every record of a scale's table ([] when it does not exist)."""
    return load_records(records_path(scale))


def main_steps(records: list[dict]) -> int:
    """The grid's training length: the longest `steps` S at which the table holds a complete grid — every label and
    seed of the shortest grid at S, and seed 0 of every label at 2 S (its convergence check) — else the shortest
    `steps` (a grid still being trained longer is read at the length it completed); 0 for an empty table."""
    if not records:
        return 0
    shortest = min(r["steps"] for r in records)
    runs = {(r["label"], r.get("seed"), r["steps"]) for r in records}
    grid = {(r["label"], r.get("seed")) for r in records if r["steps"] == shortest}

    def complete(steps: int) -> bool:
        return all((label, seed, steps) in runs for label, seed in grid) \
            and all((label, 0, 2 * steps) in runs for label, _ in grid)

    return max((s for s in {r["steps"] for r in records} if complete(s)), default=shortest)


def at_steps(records: list[dict], steps: int) -> list[dict]:
    return [r for r in records if r["steps"] == steps]


def summary(records: list[dict], metrics=tuple(m for m, _ in METRICS)) -> list[dict[str, Any]]:
    """One row per label at the main length: {'label', 'n', metric: mean, metric + '_std': sample std}."""
    import statistics

    rows = []
    main = at_steps(records, main_steps(records))
    for label in dict.fromkeys(r["label"] for r in main):
        rs = [r for r in main if r["label"] == label]
        row: dict[str, Any] = {"label": label, "n": len(rs)}
        for m in metrics:
            vals = [float(r[m]) for r in rs if r.get(m) is not None]
            if vals:
                row[m] = statistics.fmean(vals)
                row[m + "_std"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
        rows.append(row)
    return rows


def summary_table(rows: list[dict[str, Any]]):
    """`summary` rows as notebook 08 shows them: label, seeds (n), then each metric of METRICS the rows hold and
    its seed standard deviation, 4 decimals."""
    import pandas as pd

    cols = ["label", "n"] + [c for m, _ in METRICS for c in (m, m + "_std") if c in rows[0]]
    return pd.DataFrame(rows)[cols].round(4)


def n_latents(record: dict) -> int:
    """Latents of a record's SAE: M, plus the shared expert's M/N."""
    sae = record["sae"]
    return sae["n_features"] + (sae["n_features"] // sae["n_experts"] if sae.get("shared_expert") else 0)


def table_markdown(records: list[dict]) -> str:
    """The README's SynthSAEBench table: one row per SAE of DISPLAY at the main length, mean +- seed std of
    held-out MSE and MCC (the seed std is 0.00 for one seed: read the seeds column), mean uniqueness, latent F1 and
    cross-expert duplicates; labels of DISPLAY missing from the table are left out (tests/test_ground_truth.py checks
    the README holds exactly this, computed from the committed table)."""
    rows = {r["label"]: r for r in summary(records)}
    latents = {r["label"]: n_latents(r) for r in at_steps(records, main_steps(records))}
    lines = ["| SAE (latents) | seeds | held-out MSE | MCC | uniqueness | latent F1 | cross-expert duplicates |",
             "|---|---|---|---|---|---|---|"]
    for label, name in DISPLAY.items():
        if label in rows:
            r, dup = rows[label], rows[label].get("cross_expert_duplicate_frac")
            lines.append(f"| {name} ({latents[label]}) | {r['n']} | {r['mse']:.2f} ± {r['mse_std']:.2f} | {r['mcc']:.3f} ± "
                         f"{r['mcc_std']:.3f} | {r['uniqueness']:.3f} | {r['f1']:.3f} | "
                         + ("—" if dup is None else f"{dup:.1%}") + " |")
    return "\n".join(lines)


def convergence(records: list[dict]) -> list[dict[str, Any]]:
    """The project's 2x rule per label (`checks.relative_change`, `checks.is_converged`): seed 0 at the main
    length against seed 0 at twice the steps. {'label', 'mse', 'mse_2x', 'change', 'converged'}."""
    s = main_steps(records)
    short = {r["label"]: r for r in records if r["steps"] == s and r["seed"] == 0}
    rows = []
    for r in records:
        if r["steps"] == 2 * s and r["seed"] == 0 and r["label"] in short:
            change = checks.relative_change(short[r["label"]]["mse"], r["mse"])
            rows.append({"label": r["label"], "mse": short[r["label"]]["mse"], "mse_2x": r["mse"], "change": change,
                         "converged": checks.is_converged(change)})
    return rows


def compare(records: list[dict], label: str, baseline: str, metric: str) -> dict[str, Any] | None:
    """`checks.seed_comparison` of one label against a baseline on one metric, at the main length, plus
    'real' (beyond the seed spread and p < checks.P_VALUE); None when either side has no records."""
    main = [r for r in at_steps(records, main_steps(records)) if r["label"] in (label, baseline)]
    if not any(r["label"] == label for r in main) or not any(r["label"] == baseline for r in main):
        return None
    row = next(r for r in checks.seed_comparison(main, baseline=baseline, metric=metric) if r["label"] == label)
    row["real"] = checks.is_real(row)
    return row


def family(records: list[dict], bases) -> list[str]:
    """The labels in the table that are one of `bases`, with or without the ALPHA_ONLY suffix, in `bases` order."""
    present = set(r["label"] for r in records)
    return [lab for b in bases for lab in (b, f"{b} {ALPHA_ONLY}") if lab in present]


def _word(row: dict[str, Any] | None, higher_is_better: bool) -> str:
    if row is None:
        return "not measured"
    p = "one seed: no test" if row["p_value"] is None else f"p = {row['p_value']:.2g}"
    if not row["real"]:
        return f"no real difference ({row['relative']:+.1%}, {p})"
    better = (row["diff"] > 0) == higher_is_better
    return f"{'better' if better else 'WORSE'} ({row['relative']:+.1%}, {p})"


def verdicts(records: list[dict]) -> list[str]:
    """The sentences notebook 08 and the README print, one per question of issue 22, computed from the table."""
    if not records:
        return ["The table is empty: run scripts/synthsaebench.py (README, 'Are the features good?')."]
    higher = dict(METRICS)
    out = []
    conv = convergence(records)
    if conv:
        failed = [c["label"] for c in conv if not c["converged"]]
        out.append(f"Convergence (2x rule, < {checks.CONVERGENCE_TOL:.0%} change of held-out MSE, seed 0): "
                   + ("every SAE converged" if not failed else f"NOT converged: {', '.join(failed)}") + " ("
                   + ", ".join(f"{c['label']} {c['change']:+.1%}" for c in conv) + ").")
    same = [(m, compare(records, REFERENCE, BASELINE, m)) for m in ("mse", "mcc", "f1", "uniqueness")]
    agree = all(r is not None and not r["real"] for _, r in same)
    long = {r["label"]: r for r in records if r["steps"] == 2 * main_steps(records) and r["seed"] == 0}
    longer = ""
    if BASELINE in long and REFERENCE in long:
        a, b = long[BASELINE], long[REFERENCE]
        longer = (f" Trained twice as long (seed 0): MSE {a['mse']:.4g} (ours) vs {b['mse']:.4g} (SAELens's), "
                  f"{b['mse'] / a['mse'] - 1:+.1%}; MCC {a['mcc']:.3f} vs {b['mcc']:.3f}; F1 {a['f1']:.3f} vs "
                  f"{b['f1']:.3f}.")
    out.append(f"Cross-implementation check: our TopK and SAELens's own TopK (its trainer, same stream) "
               + ("agree within the seed spread" if agree else "DIFFER") + " on "
               + "; ".join(f"{m}: {_word(r, higher[m])} for SAELens's" for m, r in same) + "." + longer)
    for title, labels in (("At equal FLOPs", EQUAL_FLOPS), ("At equal width", EQUAL_WIDTH)):
        parts = [f"{lab}: MCC {_word(compare(records, lab, BASELINE, 'mcc'), True)}, F1 "
                 f"{_word(compare(records, lab, BASELINE, 'f1'), True)}, frequent true features recovered "
                 f"{_word(compare(records, lab, BASELINE, 'recovered_frac_frequent'), True)}"
                 for lab in family(records, labels)]
        out.append(f"{title}, against TopK: " + "; ".join(parts) + ".")
    rows = {r["label"]: r for r in summary(records)}
    uniq = [f"{lab} {rows[lab]['uniqueness']:.3f}" for lab in family(records, (BASELINE, *EQUAL_WIDTH, *BEYOND_TOP1))]
    out.append("Uniqueness (SAELens: distinct true features / latents; duplication lowers it): " + ", ".join(uniq) + ".")
    present = [lab for lab in BEYOND_TOP1 if lab in rows]
    if present:
        best = max(present, key=lambda lab: rows[lab]["uniqueness"])
        dup = ", ".join(f"{lab} {rows[lab].get('cross_expert_duplicate_frac', float('nan')):.2%}" for lab in present)
        out.append(f"Beyond top-1 at equal FLOPs and equal L0: the highest uniqueness is {best}'s; features with a cos > 0.9 "
                   f"duplicate in another expert: {dup}.")
    weights = [(lab.removesuffix(f" {ALPHA_ONLY}"), lab) for lab in rows if lab.endswith(ALPHA_ONLY)]
    if weights:
        parts = [f"{lab}: MCC {_word(compare(records, lab, base, 'mcc'), True)}, uniqueness "
                 f"{_word(compare(records, lab, base, 'uniqueness'), True)}, MSE {_word(compare(records, lab, base, 'mse'), False)}"
                 for base, lab in weights if base in rows]
        out.append("The load-balancing weight: alpha * L_aux against the paper's alpha * d * L_aux (same SAE, same "
                   "alpha): " + "; ".join(parts) + ".")
    if "scale (8x)" in rows and "flop-matched-4" in rows:
        mse = compare(records, "scale (8x)", "flop-matched-4", "mse")
        dup_s = rows["scale (8x)"].get("cross_expert_duplicate_frac")
        dup_1 = rows["flop-matched-4"].get("cross_expert_duplicate_frac")
        cut = (1 - dup_s / dup_1) if dup_s is not None and dup_1 else None  # > 0: fewer duplicates than top-1
        held = mse is not None and mse["real"] and mse["diff"] < 0 and cut is not None and cut > 0.5
        dup_words = (f"{dup_s:.1%} vs {dup_1:.1%} of features ({'fewer' if cut > 0 else 'MORE'} by {abs(cut):.0%})"
                     if cut is not None else "not measured")
        out.append("Scale SAE vs top-1 Switch (Scale SAE's claim: lower reconstruction error, far less redundancy): "
                   f"MSE {_word(mse, False)}, cross-expert duplicates {dup_words}"
                   f" -> the claim {'HELD' if held else 'did NOT hold'} here (rule: MSE really lower AND duplicates "
                   "cut by more than half).")
    return out
