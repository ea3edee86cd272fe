"""Does the `cpu` verdict generalise? The k = claim_k comparison at every data site (issue 23, docs/sites.md).

A site is a profile made by `profiles.site_profile`: the `cpu` recipe at another model, layer or width. At each one
the same question is asked of its own results table (data/results/<site>/, never $SWITCH_SAE_RESULTS: a site must
not read another's records): TopK against FLOP-matched Switch-N over seeds, on held-out MSE, FVU, dead latents and
the LM numbers (ΔCE in nats, KL, loss recovered), with the project's 2x convergence rule at the same seeds. A
record belongs to the site when its key is one of the site's claim jobs (`claim_jobs`), so another width's or
grid's SAEs in the same table are never mixed in. A site whose table lacks any of its jobs says which are missing
and draws no verdict. The claims x sites matrix is analysis/site_claims.py.
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


def as_profile(profile: Profile | str) -> Profile:
    return get_profile(profile) if isinstance(profile, str) else profile


def site_root(profile: Profile | str, root: str | Path | None = None) -> Path:
    """The folder of a site's table: `root` if given, else the committed data/results/<site>/ (not the
    environment's $SWITCH_SAE_RESULTS, which `switch-sae reproduce` points at ONE profile's table)."""
    from ..results import results_root

    return Path(root) if root is not None else results_root() / as_profile(profile).name


# --- which records are the site's ------------------------------------------------------------------------------
def claim_jobs(profile: Profile, d_in: int, steps: Optional[tuple[int, ...]] = None) -> dict[str, dict[str, Any]]:
    """{key (keys.config_hash): {'label', 'seed', 'steps', 'setting'}} of the site's claim SAEs: TopK and each
    FLOP-matched Switch at k = claim_k at every seed of profile.seeds, and each fixed-width Switch at claim_k at the
    profile's seed where it sweeps grid 'fixed_width' (label 'fixed-switch-N': 'switch-N' names the FLOP-matched
    one); at each of `steps` (default: the profile's steps only)."""
    from ..config import SAEConfig
    from ..keys import config_hash
    from ..results import baseline_width, sae_label
    from ..sweep import grid_configs

    steps = steps or (profile.train.steps,)
    m = baseline_width(profile, d_in)
    claim = [(cfg, profile.seeds) for cfg in grid_configs(profile, "seeds", d_in)]
    if "fixed_width" in profile.reproduce_grids:
        claim += [(SAEConfig(arch="switch", d_in=d_in, n_features=m, n_experts=n, k=profile.claim_k), (profile.train.seed,))
                  for n in profile.fixed_width_experts if m % n == 0]
    jobs = {}
    for cfg, seeds in claim:
        fixed = cfg.arch == "switch" and cfg.n_features == m
        label = ("fixed-" if fixed else "") + sae_label(cfg)
        setting = "fixed_width" if fixed else ("baseline" if cfg.arch == "topk" else "flop_matched")
        for seed in seeds:
            for s in steps:
                key = config_hash(cfg, profile.train.replace(seed=seed, steps=s), profile.data)
                jobs[key] = {"label": label, "seed": seed, "steps": s, "setting": setting}
    return jobs


def site_d_in(profile: Profile) -> int:
    """The residual width of the site's model (config.MODELS)."""
    from ..config import MODELS

    return MODELS[profile.data.model].d_model


def claim_records(profile: Profile | str, root: str | Path | None = None,
                  steps: Optional[tuple[int, ...]] = None) -> list[dict[str, Any]]:
    """The site's records (`results.profile_records`: its current settings, every seed; latest per key) whose key is
    one of `claim_jobs(profile, d_in, steps)`, relabelled as there and with `delta_ce` filled in (results.delta_ce)."""
    from ..results import delta_ce, profile_records

    profile = as_profile(profile)
    jobs = claim_jobs(profile, site_d_in(profile), steps)
    return [{**r, "label": jobs[r["key"]]["label"], "delta_ce": delta_ce(r)}
            for r in profile_records(profile, site_root(profile, root), all_seeds=True, any_steps=True)
            if r["key"] in jobs]


def expected_jobs(profile: Profile) -> dict[str, dict[str, Any]]:
    """Every claim job a complete site table holds: the claim at the profile's steps, and the convergence check
    (TopK and the first FLOP-matched Switch at twice the steps) at each convergence seed."""
    profile = as_profile(profile)
    d_in = site_d_in(profile)
    jobs = claim_jobs(profile, d_in)
    doubled = claim_jobs(profile, d_in, (2 * profile.train.steps,))
    first = f"switch-{profile.flop_matched_experts[0]}"
    jobs.update({key: j for key, j in doubled.items()
                 if j["label"] in ("topk", first) and j["seed"] in convergence_seeds(profile)})
    return jobs


def convergence_seeds(profile: Profile) -> tuple[int, ...]:
    """The seeds of the profile's convergence check (its own seed when the profile names none)."""
    return tuple(profile.convergence_seeds or (profile.train.seed,))


def missing_jobs(profile: Profile | str, root: str | Path | None = None) -> list[dict[str, Any]]:
    """The expected jobs the site's table has no record of (label, seed, steps), in job order."""
    profile = as_profile(profile)
    have = {r["key"] for r in claim_records(profile, root, steps=(profile.train.steps, 2 * profile.train.steps))}
    return [j for key, j in expected_jobs(profile).items() if key not in have]


# --- per-SAE rows, convergence and the verdict ---------------------------------------------------------------------
@dataclass(frozen=True)
class SiteRow:
    """One SAE of one site over its seeds: mean and sample std (ddof=1) of each of METRICS, and held-out MSE
    against TopK's (`checks.seed_comparison`: relative difference, Welch p, `real` = beyond the seed spread and
    p < checks.P_VALUE; None for TopK itself and where either side has one seed)."""

    site: str  # the profile's name
    label: str  # 'topk', 'switch-2', 'fixed-switch-16', ...
    seeds: tuple[int, ...]
    mean: dict[str, Optional[float]]
    std: dict[str, Optional[float]]
    mse_vs_topk: Optional[float] = None
    p_value: Optional[float] = None
    real: Optional[bool] = None


def site_rows(profile: Profile | str, root: str | Path | None = None) -> list[SiteRow]:
    """TopK first, then the FLOP-matched Switch SAEs, then the fixed-width ones, by number of experts; a label
    with no record is left out."""
    profile = as_profile(profile)
    records = claim_records(profile, root)
    labels = sorted({r["label"] for r in records}, key=lambda lb: (lb != "topk", lb.startswith("fixed-"), len(lb), lb))
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
                            real=checks.is_real(cmp) if cmp and cmp["p_value"] is not None else None))
    return rows


def convergence_rows(profile: Profile | str, root: str | Path | None = None) -> dict[str, dict[str, Any]]:
    """The 2x rule per SAE of the site (`checks.convergence_check` on the claim records, relabelled so a fixed-width
    and a FLOP-matched Switch-N never merge): {label: {'seeds', 'change' (mean relative drop of held-out MSE from
    profile.train.steps to twice that), 'std', 'converged' (checks.is_converged of the mean)}}."""
    profile = as_profile(profile)
    steps = profile.train.steps
    records = claim_records(profile, root, steps=(steps, 2 * steps))
    pairs = checks.convergence_check([r for r in records if r["steps"] == steps],
                                     [r for r in records if r["steps"] == 2 * steps])
    out: dict[str, dict[str, Any]] = {}
    for label in sorted({p["label"] for p in pairs}, key=lambda lb: (lb != "topk", lb)):
        mine = [p for p in pairs if p["label"] == label]
        stats = checks.seed_stats([p["change"] for p in mine])
        out[label] = {"seeds": tuple(sorted(p["seed"] for p in mine)), "change": stats["mean"], "std": stats["std"],
                      "converged": checks.is_converged(stats["mean"])}
    return out


def is_complete(profile: Profile | str, root: str | Path | None = None) -> bool:
    return not missing_jobs(profile, root)


def site_verdict(profile: Profile | str, root: str | Path | None = None) -> str:
    """One computed sentence per site: does every FLOP-matched Switch beat TopK on held-out MSE beyond the seed
    spread, and did the convergence rule pass at every convergence seed; 'incomplete' (with what is missing)
    while the table lacks any expected job."""
    profile = as_profile(profile)
    head = f"{profile.name} ({site_name(profile)})"
    missing, expected = missing_jobs(profile, root), len(expected_jobs(profile))
    if missing:
        return (f"{head}: incomplete ({expected - len(missing)} of {expected} SAEs recorded; missing "
                f"{_job_words(missing)}); no verdict drawn.")
    switch = [r for r in site_rows(profile, root) if r.label.startswith("switch-")]  # the FLOP-matched ones
    parts = [f"{display(r.label)} {r.mse_vs_topk:+.1%} (p = {r.p_value:.2g})" for r in switch]
    if all(r.real and r.mse_vs_topk < 0 for r in switch):
        verdict = "every FLOP-matched Switch SAE beats TopK on held-out MSE beyond the seed spread"
    elif any(r.real and r.mse_vs_topk > 0 for r in switch):
        verdict = "a FLOP-matched Switch SAE is WORSE than TopK beyond the seed spread"
    else:
        verdict = "not every FLOP-matched Switch SAE beats TopK beyond the seed spread"
    conv = convergence_rows(profile, root)
    conv_words = ", ".join(f"{display(label)} {-c['change']:+.1%}" + (f" ± {c['std']:.1%}" if len(c["seeds"]) > 1 else "")
                           for label, c in conv.items())
    n_seeds = len(convergence_seeds(profile))
    return (f"{head}: {verdict} ({', '.join(parts)}); twice the steps changed held-out MSE by {conv_words} "
            f"({n_seeds} seed{'s' * (n_seeds > 1)}): "
            + ("converged by the rule." if all(c["converged"] for c in conv.values())
               else "NOT converged by the rule (its numbers are not final)."))


def _job_words(jobs: list[dict[str, Any]], at_most: int = 4) -> str:
    words = [f"{display(j['label'])} seed {j['seed']} at {j['steps']} steps" for j in jobs[:at_most]]
    return ", ".join(words) + (f" and {len(jobs) - at_most} more" if len(jobs) > at_most else "")


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
    profile = as_profile(profile)
    return f"{profile.data.site_label}, M = {profile.width_multiple}·d"


# --- the README ----------------------------------------------------------------------------------------------------
def table_markdown(sites: tuple[str, ...] = SITES, root_of: Optional[dict[str, str | Path]] = None) -> str:
    """The README's per-SAE table: one row per SAE per site (mean ± seed std; the seeds column says how many),
    sites whose table is empty left out. `root_of` maps a site to another results folder (tests)."""
    root_of = root_of or {}
    lines = ["| site | SAE | seeds | held-out MSE | vs TopK | FVU | ΔCE (nats) | KL | loss recovered | dead |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for site in sites:
        for r in site_rows(site, root_of.get(site)):
            vs = "—" if r.mse_vs_topk is None else f"{r.mse_vs_topk:+.1%}" + (f" (p = {r.p_value:.2g})" if r.p_value is not None else "")
            lines.append(f"| {site_name(site)} | {display(r.label)} | {len(r.seeds)} | {_mean_cell(r, 'mse', True)} | {vs} | "
                         f"{_mean_cell(r, 'fvu')} | {_mean_cell(r, 'delta_ce', True)} | {_mean_cell(r, 'kl')} | "
                         f"{_mean_cell(r, 'loss_recovered')} | {_mean_cell(r, 'dead_fraction')} |")
    return "\n".join(lines)


def _mean_cell(row: SiteRow, metric: str, with_std: bool = False) -> str:
    if row.mean[metric] is None:
        return "—"
    mean_fmt, std_fmt = METRICS[metric]
    spread = f" ± {std_fmt.format(row.std[metric])}" if with_std and len(row.seeds) > 1 else ""
    return mean_fmt.format(row.mean[metric]) + spread


def readme_block(sites: tuple[str, ...] = SITES) -> str:
    """What the README shows for issue 23 items 1, 2, 4 and 5: one computed verdict per site, the claims x sites
    matrix (site_claims.claims_matrix_markdown), then `table_markdown` (tests/test_generalisation.py checks that
    the README holds exactly this)."""
    from .site_claims import claims_matrix_markdown

    return ("\n".join(f"- {site_verdict(site)}" for site in sites) + "\n\n" + claims_matrix_markdown(sites) + "\n\n"
            + table_markdown(sites))


README_MARKERS = ("<!-- analysis.sites.readme_block: begin -->", "<!-- analysis.sites.readme_block: end -->")


def update_readme(path: str | Path) -> bool:
    """Write `readme_block()` between README_MARKERS in the file at `path` (after a site's run lands:
    `python -m switch_sae_core.analysis.sites README.md`); True when it changed. Raises ValueError when the
    markers are missing or out of order."""
    from ..durable import atomic_write_text

    path = Path(path)
    text = path.read_text()
    begin, end = README_MARKERS
    if begin not in text or end not in text or text.index(end) < text.index(begin):
        raise ValueError(f"{path}: no {begin} ... {end} markers (in that order) to write the sites block between")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    new = f"{head}{begin}\n{readme_block()}\n{end}{tail}"
    if new != text:
        atomic_write_text(path, new)
    return new != text


if __name__ == "__main__":
    import sys

    print("README updated" if update_readme(sys.argv[1] if len(sys.argv) > 1 else "README.md") else "README already current")
