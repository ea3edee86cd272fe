"""The paper's claims x sites (issue 23 item 5): each claim judged on each site's own tables.

A cell reads a `checks.seed_comparison` (or a sample-efficiency comparison) in the claim's direction: 'held' when
the difference is beyond the seed spread with Welch p < checks.P_VALUE, 'FAILED' when it is so the other way,
'not resolved' otherwise, always with the effect ± the seed spread. A site whose table lacks any expected SAE
(`sites.missing_jobs`) has every cell marked "(site incomplete)", and a complete site whose SAEs fail the 2x rule
"(SAEs not converged)": a first look, not a verdict.

Matched-schedule sample efficiency reads its own table, data/results/schedules/<site>/ (grid "schedules" with a
fresh SAE cache: every run of the ladder trained by the same code, so no run's final MSE carries another code
version's offset, measured at ~0.3% for one key between December 1 and 7).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from .. import checks
from ..profiles import Profile
from .sites import SITES, as_profile, claim_records, convergence_rows, is_complete, site_name


@dataclass(frozen=True)
class SiteData:
    """What a claim reads of one site: its profile, its claim records at the profile's steps (`claim`), at every
    step count of its main table (`all_steps`: the convergence runs too), and of its schedules table."""

    profile: Profile
    claim: list[dict[str, Any]]
    all_steps: list[dict[str, Any]]
    schedules: list[dict[str, Any]]


def site_data(site: str, root: str | Path | None = None, schedules_root: str | Path | None = None) -> SiteData:
    from ..results import results_root

    profile = as_profile(site)
    p = profile.train.steps
    every = tuple(sorted({p, 2 * p, *profile.schedule_steps}))
    sched_root = Path(schedules_root) if schedules_root is not None else results_root() / "schedules" / profile.name
    return SiteData(profile, claim_records(profile, root), claim_records(profile, root, steps=every),
                    claim_records(profile, sched_root, steps=every) if (sched_root / "records.jsonl").is_file() else [])


# --- cells ---------------------------------------------------------------------------------------------------------
def compare_cell(records: list[dict], label: str, baseline: str, metric: str, lower: bool = True) -> str:
    """`label` against `baseline` on `metric` over seeds, read as a claim that it is LOWER (`lower`; else higher).
    '—' without both; one seed on either side: the effect, not judged."""
    mine = [r for r in records if r["label"] in (label, baseline) and r.get(metric) is not None]
    if not any(r["label"] == baseline for r in mine) or not any(r["label"] == label for r in mine):
        return "—"
    rows = checks.seed_comparison(mine, baseline=baseline, metric=metric)
    row, base = next(r for r in rows if r["label"] == label), rows[0]
    if row["n"] < 2 or base["n"] < 2:
        return f"1 seed, not judged: {row['relative']:+.1%}"
    effect = f"{row['relative']:+.1%} ± {row['spread'] / base['mean']:.1%} (p = {row['p_value']:.2g})"
    if checks.is_real(row):
        return ("held: " if (row["diff"] < 0) == lower else "FAILED: ") + effect
    return "not resolved: " + effect


def sooner_midrun_cell(records: list[dict], label: str, k: int) -> str:
    """The paper's reading (`checks.sample_efficiency`): TopK steps / Switch steps to reach TopK's final held-out
    MSE on each run's own curve, Switch's point read before its lr has decayed; 'held' when every seed's speed-up
    is above 1."""
    speedups = []
    for seed in sorted({r["seed"] for r in records}):
        mine = [r for r in records if r["seed"] == seed]
        if {"topk", label} <= {r["label"] for r in mine}:
            speedups.append(checks.sample_efficiency(mine, k)["speedups"].get(label))
    if len(speedups) < 2:
        return "—"
    if any(s is None for s in speedups):
        return f"FAILED: never reached at {sum(s is None for s in speedups)} of {len(speedups)} seeds"
    stats = checks.seed_stats(speedups)
    words = "held" if min(speedups) > 1 else ("FAILED" if max(speedups) < 1 else "not resolved")
    return f"{words}: {stats['mean']:.2f}× ± {stats['std']:.2f} sooner ({len(speedups)} seeds)"


def fewer_steps_cell(records: list[dict], label: str, reference_steps: int) -> str:
    """Matched schedules (`checks.schedule_efficiency`): at each seed the range [lowest, highest] that `label`'s
    speed-up to TopK's final MSE at reference_steps can take given its runs (an interpolated value is both; a
    shortest run already below gives [reference / its steps, inf); a longest run still above gives [0, reference /
    its steps]). 'held' when every seed's lowest speed-up is above 1, 'FAILED' when every seed's highest is at most
    1, else 'not resolved'; the mean ± std when every seed is interpolated."""
    rows = checks.schedule_efficiency(records, label, reference_steps)
    if len(rows) < 2:
        return "—"
    lows, highs = [], []
    for r in rows:
        if r["steps"] is not None:
            lows.append(r["speedup"]), highs.append(r["speedup"])
        elif "at_most" in r:
            lows.append(reference_steps / r["at_most"]), highs.append(float("inf"))
        else:
            lows.append(0.0), highs.append(reference_steps / r["at_least"])
    words = "held" if min(lows) > 1 else ("FAILED" if max(highs) <= 1 else "not resolved")
    if all(r["steps"] is not None for r in rows):
        speed, steps = checks.seed_stats(lows), checks.seed_stats([r["steps"] for r in rows])
        return (f"{words}: {speed['mean']:.2f}× ± {speed['std']:.2f} fewer steps ({steps['mean']:.0f} ± "
                f"{steps['std']:.0f} of {reference_steps}; {len(rows)} seeds)")
    bounds = ", ".join(f"≥ {lo:.2f}×" if hi == float("inf") else (f"≤ {hi:.2f}×" if lo == 0 else f"{lo:.2f}×")
                       for lo, hi in zip(lows, highs))
    return f"{words}: {bounds} fewer steps (per seed; a bound where a run ladder ends)"


def topk_needs_cell(records: list[dict], label: str, reference_steps: int) -> str:
    """The reverse reading of `checks.schedule_efficiency`: TopK's steps (complete runs) to reach `label`'s final
    MSE at reference_steps, as a multiple of reference_steps per seed (≥ where TopK's longest run is still above,
    ≤ where its shortest is already below). 'held' when every seed needs more than reference_steps."""
    rows = checks.schedule_efficiency(records, label, reference_steps)
    if len(rows) < 2 or not any(r["steps"] > reference_steps for r in records if r["label"] == "topk"):
        return "—"
    back = [r["baseline_steps"] for r in rows]
    lows = [b["steps"] / reference_steps if b["steps"] else (b["at_least"] / reference_steps if "at_least" in b else 0.0)
            for b in back]
    highs = [b["steps"] / reference_steps if b["steps"] else (b["at_most"] / reference_steps if "at_most" in b else float("inf"))
             for b in back]
    words = "held" if min(lows) > 1 else ("FAILED" if max(highs) <= 1 else "not resolved")
    each = ", ".join(f"> {lo:.2f}×" if hi == float("inf") else (f"≤ {hi:.2f}×" if lo == 0 else f"{lo:.2f}×")
                     for lo, hi in zip(lows, highs))
    return f"{words}: TopK needs {each} the steps (per seed)"


CLAIMS: dict[str, Callable[[SiteData], str]] = {  # row name -> cell(SiteData)
    "FLOP-matched Switch-2 reconstructs better than TopK (held-out MSE)":
        lambda site: compare_cell(site.claim, "switch-2", "topk", "mse"),
    "FLOP-matched Switch-4 reconstructs better than TopK (held-out MSE)":
        lambda site: compare_cell(site.claim, "switch-4", "topk", "mse"),
    "More experts is better (Switch-4 vs Switch-2, held-out MSE)":
        lambda site: compare_cell(site.claim, "switch-4", "switch-2", "mse"),
    "Switch-4 costs the LM less than TopK (ΔCE, nats)":
        lambda site: compare_cell(site.claim, "switch-4", "topk", "delta_ce"),
    "Switch-4 reaches TopK's final MSE sooner (read mid-run, before its lr decays: the paper's reading)":
        lambda site: sooner_midrun_cell(site.claim, "switch-4", site.profile.claim_k),
    "FLOP-matched Switch-2 reaches TopK's final MSE in fewer steps (matched schedules: every run with its own decay)":
        lambda site: fewer_steps_cell(site.schedules, "switch-2", site.profile.train.steps),
    "Switch-4 reaches TopK's final MSE in fewer steps (matched schedules: every run with its own decay)":
        lambda site: fewer_steps_cell(site.schedules, "switch-4", site.profile.train.steps),
    "TopK needs more steps than FLOP-matched Switch-2 to reach Switch-2's final MSE (complete runs: 2x check)":
        lambda site: topk_needs_cell(site.all_steps, "switch-2", site.profile.train.steps),
    "At equal width, fixed-width Switch-16 reconstructs worse than TopK (held-out MSE)":
        lambda site: compare_cell(site.claim, "fixed-switch-16", "topk", "mse", lower=False),
}


def claims_matrix(sites: tuple[str, ...] = SITES, root_of: Optional[dict[str, str | Path]] = None,
                  schedules_root_of: Optional[dict[str, str | Path]] = None) -> dict[str, dict[str, str]]:
    """{claim: {site: cell}}: each of CLAIMS judged on each site ('—' where a site has no record the claim needs);
    every cell of an incomplete or unconverged site ends with its mark (`_site_mark`). `root_of` / `schedules_root_of` map a site to
    other results folders (tests)."""
    root_of, schedules_root_of = root_of or {}, schedules_root_of or {}
    data = {site: site_data(site, root_of.get(site), schedules_root_of.get(site)) for site in sites}
    marks = {site: _site_mark(site, root_of.get(site)) for site in sites}
    return {claim: {site: (text if not marks[site] or text == "—" else f"{text} ({marks[site]})")
                    for site in sites for text in [cell(data[site])]}
            for claim, cell in CLAIMS.items()}


def _site_mark(site: str, root: str | Path | None) -> str:
    """What every cell of a site says about the site itself: '' for a complete site whose SAEs pass the 2x rule,
    else 'site incomplete' or 'SAEs not converged' (a claim read on SAEs still improving is not final)."""
    if not is_complete(site, root):
        return "site incomplete"
    return "" if all(c["converged"] for c in convergence_rows(site, root).values()) else "SAEs not converged"


def claims_matrix_markdown(sites: tuple[str, ...] = SITES) -> str:
    """claims_matrix as the README's table: rows = claims, columns = sites."""
    matrix = claims_matrix(sites)
    lines = ["| the paper's claim | " + " | ".join(site_name(s) for s in sites) + " |", "|---|" + "---|" * len(sites)]
    lines += [f"| {claim} | " + " | ".join(cells[s] for s in sites) + " |" for claim, cells in matrix.items()]
    return "\n".join(lines)
