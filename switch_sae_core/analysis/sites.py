"""Does the `cpu` verdict generalise? The k = claim_k comparison at every data site (issue 23, docs/sites.md).

A site is a profile made by `profiles.site_profile`: the `cpu` recipe at another model or layer. At each one the
same question is asked of its results table: TopK against FLOP-matched Switch-N (N in profile.flop_matched_experts)
over seeds, on held-out MSE, FVU, dead latents and the LM numbers (ΔCE in nats, KL, loss recovered), with the
project's 2x convergence rule at the same seeds. Every number comes from `results.profile_records`; a site whose
table is still being filled shows how many seeds it has, and its verdict says it is incomplete.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from .. import checks
from ..profiles import Profile, get_profile

SITES = ("cpu", "cpu_wide", "cpu_l10", "cpu_gemma")  # the `cpu` site first: the others are read against it
# record column -> (format of its mean, of its seed std); ΔCE = CE with the SAE spliced in - clean CE (nats/token)
METRICS = {"mse": ("{:.1f}", "{:.1f}"), "fvu": ("{:.4f}", "{:.4f}"), "delta_ce": ("{:.4f}", "{:.4f}"),
           "kl": ("{:.4f}", "{:.4f}"), "loss_recovered": ("{:.4f}", "{:.4f}"), "dead_fraction": ("{:.1%}", "{:.1%}")}


def delta_ce(record: dict[str, Any]) -> Optional[float]:
    """CE with the SAE spliced in minus the clean CE, in nats per token (records before December 2026 have
    no `delta_ce` column; it is the same difference of their two CE columns)."""
    if record.get("delta_ce") is not None:
        return float(record["delta_ce"])
    if record.get("ce_sae") is None or record.get("ce_clean") is None:
        return None
    return float(record["ce_sae"]) - float(record["ce_clean"])


def claim_records(profile: Profile, root: str | Path | None = None, any_steps: bool = False) -> list[dict[str, Any]]:
    """Records of the site's claim at the profile's own steps (`any_steps`: at every step count, e.g. grids
    "convergence" and "schedules"), every seed: TopK (setting 'baseline'), each FLOP-matched Switch (setting
    'flop_matched') and each fixed-width Switch (setting 'fixed_width', relabelled 'fixed-switch-N': the same label
    names a FLOP-matched SAE) at k = profile.claim_k, with `delta_ce` filled in."""
    from ..results import profile_records

    keep = []
    for r in profile_records(profile, root, all_seeds=True, any_steps=any_steps):
        if r["k"] != profile.claim_k or (r["arch"], r["setting"]) not in CLAIM_SETTINGS:
            continue
        label = f"fixed-{r['label']}" if r["setting"] == "fixed_width" else r["label"]
        keep.append({**r, "label": label, "delta_ce": delta_ce(r)})
    return keep


CLAIM_SETTINGS = (("topk", "baseline"), ("switch", "flop_matched"), ("switch", "fixed_width"))


@dataclass(frozen=True)
class SiteRow:
    """One SAE of one site over its seeds: mean and sample std (ddof=1) of each of METRICS, and held-out MSE
    against TopK's (`checks.seed_comparison`: relative difference, Welch p, `real` = beyond the seed spread and
    p < checks.P_VALUE; None for TopK itself)."""

    site: str  # the profile's name
    label: str  # 'topk', 'switch-2', ...
    seeds: tuple[int, ...]
    mean: dict[str, Optional[float]]
    std: dict[str, Optional[float]]
    mse_vs_topk: Optional[float] = None
    p_value: Optional[float] = None
    real: Optional[bool] = None


def site_rows(profile: Profile | str, root: str | Path | None = None) -> list[SiteRow]:
    """TopK first, then each FLOP-matched Switch by its number of experts; a label with no record is left out."""
    profile = get_profile(profile) if isinstance(profile, str) else profile
    records = claim_records(profile, root)
    if not records:
        return []
    labels = sorted({r["label"] for r in records}, key=lambda lb: (lb != "topk", len(lb), lb))
    vs = {}
    if any(r["label"] == "topk" for r in records):
        vs = {row["label"]: row for row in checks.seed_comparison(records, baseline="topk", metric="mse")}
    rows = []
    for label in labels:
        mine = [r for r in records if r["label"] == label]
        mean, std = {}, {}
        for m in METRICS:
            values = [float(r[m]) for r in mine if r.get(m) is not None]
            stats = checks.seed_stats(values) if values else None
            mean[m], std[m] = (stats["mean"], stats["std"]) if stats else (None, None)
        cmp = vs.get(label) if label != "topk" else None
        rows.append(SiteRow(profile.name, label, tuple(sorted(r["seed"] for r in mine)), mean, std,
                            mse_vs_topk=cmp["relative"] if cmp else None, p_value=cmp["p_value"] if cmp else None,
                            real=checks.is_real(cmp) if cmp else None))
    return rows


def convergence_rows(profile: Profile | str, root: str | Path | None = None) -> dict[str, dict[str, Any]]:
    """The 2x rule per label at the site: {label: {'seeds', 'change' (mean relative drop of held-out MSE from
    profile.train.steps to twice that), 'std', 'converged' (checks.is_converged of the mean)}}."""
    from ..results import profile_records

    profile = get_profile(profile) if isinstance(profile, str) else profile
    pairs = checks.convergence_check(profile_records(profile, root, all_seeds=True),
                                     profile_records(profile, root, all_seeds=True, steps_factor=2))
    out: dict[str, dict[str, Any]] = {}
    for label in sorted({p["label"] for p in pairs if p["k"] == profile.claim_k}):
        mine = [p for p in pairs if p["label"] == label and p["k"] == profile.claim_k]
        stats = checks.seed_stats([p["change"] for p in mine])
        out[label] = {"seeds": tuple(sorted(p["seed"] for p in mine)), "change": stats["mean"], "std": stats["std"],
                      "converged": checks.is_converged(stats["mean"])}
    return out


def expected_saes(profile: Profile) -> int:
    """How many SAEs a complete site table holds: (TopK + each FLOP-matched Switch) at every seed, the
    convergence check (TopK and the first FLOP-matched Switch at twice the steps) at every convergence seed, and
    each fixed-width Switch at the profile's own seed where the profile sweeps grid 'fixed_width'."""
    fixed = len(profile.fixed_width_experts) if "fixed_width" in profile.reproduce_grids else 0
    return len(profile.seeds) * (1 + len(profile.flop_matched_experts)) + 2 * len(convergence_seeds(profile)) + fixed


def convergence_seeds(profile: Profile) -> tuple[int, ...]:
    """The seeds of the profile's convergence check (its own seed when the profile names none)."""
    return tuple(profile.convergence_seeds or (profile.train.seed,))


def site_verdict(profile: Profile | str, root: str | Path | None = None) -> str:
    """One computed sentence per site: does every FLOP-matched Switch beat TopK on held-out MSE beyond the seed
    spread, and did the convergence rule pass; 'incomplete' while the table lacks seeds."""
    profile = get_profile(profile) if isinstance(profile, str) else profile
    rows = site_rows(profile, root)
    conv = convergence_rows(profile, root)
    n_have = sum(len(r.seeds) for r in rows) + sum(len(c["seeds"]) for c in conv.values())
    head = f"{profile.name} ({site_name(profile)})"
    if not rows or n_have < expected_saes(profile):
        return f"{head}: incomplete ({n_have} of {expected_saes(profile)} SAEs recorded); no verdict drawn."
    switch = [r for r in rows if r.label.startswith("switch-")]  # the FLOP-matched ones: the claim
    parts = [f"{display(r.label)} {r.mse_vs_topk:+.1%} (p = {r.p_value:.2g})" for r in switch]
    if all(r.real and r.mse_vs_topk < 0 for r in switch):
        verdict = "every FLOP-matched Switch SAE beats TopK on held-out MSE beyond the seed spread"
    elif any(r.real and r.mse_vs_topk > 0 for r in switch):
        verdict = "a FLOP-matched Switch SAE is WORSE than TopK beyond the seed spread"
    else:
        verdict = "not every FLOP-matched Switch SAE beats TopK beyond the seed spread"
    conv_words = ", ".join(f"{display(label)} {-c['change']:+.1%}" + (f" ± {c['std']:.1%}" if len(c["seeds"]) > 1 else "")
                           for label, c in conv.items())
    n_seeds = len(next(iter(conv.values()))["seeds"])
    all_conv = all(c["converged"] for c in conv.values())
    return (f"{head}: {verdict} ({', '.join(parts)}); twice the steps changed held-out MSE by {conv_words} "
            f"({n_seeds} seed{'s' * (n_seeds > 1)}): "
            + ("converged by the rule." if all_conv else "NOT converged by the rule (its numbers are not final)."))


def display(label: str) -> str:
    """'topk' -> 'TopK', 'switch-4' -> 'FLOP-matched Switch-4', 'fixed-switch-16' -> 'fixed-width Switch-16'."""
    if label == "topk":
        return "TopK"
    if label.startswith("fixed-"):
        return f"fixed-width {label.removeprefix('fixed-').replace('switch', 'Switch')}"
    return f"FLOP-matched {label.replace('switch', 'Switch')}"


def site_name(profile: Profile | str) -> str:
    """A site for people: its model, hook and dictionary width, e.g.
    'SmolLM2-135M-Instruct blocks.20.hook_resid_post, M = 4·d'."""
    profile = get_profile(profile) if isinstance(profile, str) else profile
    return f"{profile.data.site_label}, M = {profile.width_multiple}·d"


def table_markdown(sites: tuple[str, ...] = SITES, root_of: Optional[dict[str, str | Path]] = None) -> str:
    """The README's generalisation table: one row per SAE per site (mean ± seed std; the seeds column says how
    many), sites whose table is empty left out. `root_of` maps a site to another results folder (tests)."""
    root_of = root_of or {}
    lines = ["| site | SAE | seeds | held-out MSE | vs TopK | FVU | ΔCE (nats) | KL | loss recovered | dead |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for site in sites:
        for r in site_rows(site, root_of.get(site)):
            def cell(m: str, with_std: bool = False) -> str:
                if r.mean[m] is None:
                    return "—"
                mean_fmt, std_fmt = METRICS[m]
                return mean_fmt.format(r.mean[m]) + (f" ± {std_fmt.format(r.std[m])}" if with_std and len(r.seeds) > 1 else "")
            vs = "—" if r.mse_vs_topk is None else f"{r.mse_vs_topk:+.1%}" + (f" (p = {r.p_value:.2g})" if r.p_value is not None else "")
            lines.append(f"| {site_name(site)} | {display(r.label)} | {len(r.seeds)} | {cell('mse', True)} | {vs} | "
                         f"{cell('fvu')} | {cell('delta_ce', True)} | {cell('kl')} | {cell('loss_recovered')} | "
                         f"{cell('dead_fraction')} |")
    return "\n".join(lines)


def readme_block(sites: tuple[str, ...] = SITES) -> str:
    """What the README shows for issue 23 items 1 and 5: one computed verdict per site, the claims x sites
    matrix, then `table_markdown`
    (tests/test_generalisation.py checks that the README holds exactly this)."""
    return ("\n".join(f"- {site_verdict(site)}" for site in sites) + "\n\n" + claims_matrix_markdown(sites) + "\n\n"
            + table_markdown(sites))


# --- the paper's claims x sites (issue 23 item 5) -------------------------------------------------------------
def _cell(rows: list[dict[str, Any]], label: str, lower: bool = True) -> str:
    """A `checks.seed_comparison` row read as a claim that `label` is LOWER (`lower`; else higher) than the
    baseline: 'held' when the difference is beyond the seed spread with Welch p < checks.P_VALUE and in the
    claimed direction, 'FAILED' when it is so the other way, 'not resolved' otherwise, with the relative effect ±
    the seed spread (the larger std over the baseline mean); one seed on either side: the effect, not judged."""
    row = next((r for r in rows if r["label"] == label), None)
    base = rows[0]
    if row is None:
        return "—"
    if row["n"] < 2 or base["n"] < 2:
        return f"1 seed, not judged: {row['relative']:+.1%}"
    effect = f"{row['relative']:+.1%} ± {row['spread'] / base['mean']:.1%} (p = {row['p_value']:.2g})"
    if checks.is_real(row):
        return ("held: " if (row["diff"] < 0) == lower else "FAILED: ") + effect
    return "not resolved: " + effect


def _compare(records: list[dict], label: str, baseline: str, metric: str, lower: bool = True) -> str:
    mine = [r for r in records if r["label"] in (label, baseline) and r.get(metric) is not None]
    if not any(r["label"] == baseline for r in mine):
        return "—"
    return _cell(checks.seed_comparison(mine, baseline=baseline, metric=metric), label, lower)


def _fewer_steps(records: list[dict], label: str, reference_steps: int) -> str:
    """`checks.schedule_efficiency` over seeds: 'held' when at every seed `label` reaches TopK's final MSE in fewer
    steps than TopK's run (each run with its own decay), with the mean ± std speed-up and steps."""
    rows = checks.schedule_efficiency(records, label, reference_steps)
    runs = {r["steps"] for r in records if r["label"] == label}
    if len(rows) < 2 or not any(s < reference_steps for s in runs):  # no shorter complete run to read
        return "—"
    if any(r["steps"] is None and "at_least" in r for r in rows):
        return f"FAILED: not reached within {max(runs)} steps at some seed"
    if any(r["steps"] is None for r in rows):  # reached by its shortest run already: a bound only
        fewest = max(r.get("at_most") or r["steps"] for r in rows)
        return (f"held: at least {reference_steps / fewest:.2f}× fewer steps (its {min(runs)}-step runs are already "
                f"below at {sum(r['steps'] is None for r in rows)} of {len(rows)} seeds)")
    speed = checks.seed_stats([r["speedup"] for r in rows])
    steps = checks.seed_stats([r["steps"] for r in rows])
    words = "held" if min(r["speedup"] for r in rows) > 1 else ("FAILED" if max(r["speedup"] for r in rows) < 1 else "not resolved")
    return (f"{words}: {speed['mean']:.2f}× ± {speed['std']:.2f} fewer steps ({steps['mean']:.0f} ± {steps['std']:.0f} "
            f"of {reference_steps}; {len(rows)} seeds)")


def _baseline_catches_up(records: list[dict], label: str, reference_steps: int) -> str:
    """The reverse reading of `checks.schedule_efficiency`: how many steps TopK's complete runs need to reach
    `label`'s final MSE at reference_steps ('held' = more than reference_steps at every seed)."""
    rows = checks.schedule_efficiency(records, label, reference_steps)
    runs = {r["steps"] for r in records if r["label"] == "topk"}
    if len(rows) < 2 or not any(s > reference_steps for s in runs):  # no longer TopK run to read
        return "—"
    back = [r["baseline_steps"] for r in rows]
    if all(b["steps"] is None and "at_least" in b for b in back):
        longest = min(b["at_least"] for b in back)
        return f"held: TopK needs more than {longest / reference_steps:.1f}× the steps (its {longest}-step runs are still above at all {len(rows)} seeds)"
    needed = [b["steps"] if b["steps"] is not None else b.get("at_least", b.get("at_most")) for b in back]
    ratio = checks.seed_stats([n / reference_steps for n in needed])
    words = "held" if min(needed) > reference_steps else ("FAILED" if max(needed) < reference_steps else "not resolved")
    bounded = sum(b["steps"] is None for b in back)
    return (f"{words}: TopK needs {ratio['mean']:.2f}× ± {ratio['std']:.2f} the steps"
            + (f" ({bounded} of {len(rows)} seeds a bound)" if bounded else f" ({len(rows)} seeds)"))


def _sooner(records: list[dict], label: str, k: int) -> str:
    """TopK steps / Switch steps to reach TopK's final held-out MSE, per seed (`checks.sample_efficiency`), as
    'held' when every seed's speed-up is above 1."""
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


@dataclass(frozen=True)
class SiteData:
    """What a claim reads of one site: its profile, its claim records at the profile's steps and at every step."""

    profile: Profile
    claim: list[dict[str, Any]]
    all_steps: list[dict[str, Any]]


CLAIMS = {  # the paper's claims that a site's tables can test: row name -> cell(SiteData)
    "FLOP-matched Switch-2 reconstructs better than TopK (held-out MSE)":
        lambda site: _compare(site.claim, "switch-2", "topk", "mse"),
    "FLOP-matched Switch-4 reconstructs better than TopK (held-out MSE)":
        lambda site: _compare(site.claim, "switch-4", "topk", "mse"),
    "More experts is better (Switch-4 vs Switch-2, held-out MSE)":
        lambda site: _compare(site.claim, "switch-4", "switch-2", "mse"),
    "Switch-4 costs the LM less than TopK (ΔCE, nats)":
        lambda site: _compare(site.claim, "switch-4", "topk", "delta_ce"),
    "Switch-4 reaches TopK's final MSE sooner (read mid-run, before its lr decays: the paper's reading)":
        lambda site: _sooner(site.claim, "switch-4", site.profile.claim_k),
    "Switch-4 reaches TopK's final MSE in fewer steps (matched schedules: every run with its own decay)":
        lambda site: _fewer_steps(site.all_steps, "switch-4", site.profile.train.steps),
    "TopK trained longer does not catch up with FLOP-matched Switch-2 (matched schedules)":
        lambda site: _baseline_catches_up(site.all_steps, "switch-2", site.profile.train.steps),
    "At equal width, fixed-width Switch-16 reconstructs worse than TopK (held-out MSE)":
        lambda site: _compare(site.claim, "fixed-switch-16", "topk", "mse", lower=False),
}


def claims_matrix(sites: tuple[str, ...] = SITES, root_of: Optional[dict[str, str | Path]] = None) -> dict[str, dict[str, str]]:
    """{claim: {site: cell}}: each of CLAIMS judged on each site's claim records ('—' where a site has fewer than
    2 seeds of an SAE the claim needs); `root_of` maps a site to another results folder (tests)."""
    root_of = root_of or {}
    data = {site: SiteData(get_profile(site), claim_records(get_profile(site), root_of.get(site)),
                           claim_records(get_profile(site), root_of.get(site), any_steps=True)) for site in sites}
    return {claim: {site: cell(data[site]) for site in sites} for claim, cell in CLAIMS.items()}


def claims_matrix_markdown(sites: tuple[str, ...] = SITES, root_of: Optional[dict[str, str | Path]] = None) -> str:
    """claims_matrix as the README's table: rows = claims, columns = sites (relative effect ± seed spread)."""
    matrix = claims_matrix(sites, root_of)
    lines = ["| the paper's claim | " + " | ".join(site_name(s) for s in sites) + " |",
             "|---|" + "---|" * len(sites)]
    lines += [f"| {claim} | " + " | ".join(cells[s] for s in sites) + " |" for claim, cells in matrix.items()]
    return "\n".join(lines)


README_MARKERS = ("<!-- analysis.sites.readme_block: begin -->", "<!-- analysis.sites.readme_block: end -->")


def update_readme(path: str | Path) -> bool:
    """Write `readme_block()` between README_MARKERS in the file at `path` (after a site's run lands:
    `python -m switch_sae_core.analysis.sites README.md`); True when it changed. Raises ValueError when the
    markers are missing."""
    from ..durable import atomic_write_text

    path = Path(path)
    text = path.read_text()
    begin, end = README_MARKERS
    if begin not in text or end not in text:
        raise ValueError(f"{path}: no {begin} ... {end} markers to write the sites block between")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    new = f"{head}{begin}\n{readme_block()}\n{end}{tail}"
    if new != text:
        atomic_write_text(path, new)
    return new != text


if __name__ == "__main__":
    import sys

    print("README updated" if update_readme(sys.argv[1] if len(sys.argv) > 1 else "README.md") else "README already current")
