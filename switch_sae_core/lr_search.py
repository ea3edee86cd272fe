"""Each baseline family's learning rate, chosen on a validation split that is not the reported held-out split
(issue 23 item 3; docs/baselines.md).

For a family (relu, gated, jumprelu; topk and batchtopk too, so every baseline is tuned alike) the search trains the
family's claim SAE (`sweep.claim_config`: k = claim_k, or the frontier coefficient expected nearest L0 = claim_k) at
each lr multiplier of `profile.lr_search_scales` (TrainConfig.lr_scale, on top of the profile's training and the
family's own recipe, `sweep.arch_train`), through the one cache and record machinery (`sweep.train_and_record`), and
records each run in its own table, `data/results/lr_search/<profile>/records.jsonl` ($SWITCH_SAE_LR_SEARCH: another
folder). A record's `mse`, `fvu`, `l0` and `objective` are measured on the VALIDATION rows
(`heldout.validation_activations`: `profile.n_validation` eval rows after the held-out ones, in other contexts; its
`split` column says so) and it carries no held-out number: its curve is left out, and no LM evaluation is run (CE is
measured on the held-out contexts). The held-out rows reach the search only as the cached run's training curve
(every cached SAE has one, so the frontier grid reuses the run at the chosen multiplier); the choice never reads them.

The chosen multiplier (`lr_choice`, `chosen_lr_scale`) is the one with the lowest validation objective.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import torch

from . import durable, sweep
from .cache import data_content_of, entry_lock
from .config import ConfigError
from .heldout import validation_activations
from .keys import config_hash
from .paths import results_root
from .profiles import Profile, get_profile
from .results import RESULTS_FILE, current_data_content, load_records, record_matches, results_path

LR_FAMILIES = ("relu", "gated", "jumprelu", "topk", "batchtopk")
LR_SEARCH_ENV = "SWITCH_SAE_LR_SEARCH"  # a folder holding the search's records.jsonl instead of data/results/lr_search/<profile>/


class LRSearchMissing(ConfigError):
    """A family's lr search has not been run (or not finished) for this profile; the message gives the command."""


def lr_search_path(profile: str | Profile, root: str | Path | None = None) -> Path:
    """The lr search's table: `root`, else $SWITCH_SAE_LR_SEARCH, else data/results/lr_search/<profile>/."""
    name = profile.name if isinstance(profile, Profile) else profile
    root = root if root is not None else os.environ.get(LR_SEARCH_ENV) or None
    return (Path(root) if root is not None else results_root() / "lr_search" / name) / RESULTS_FILE


def search_command(profile: Profile, family: str) -> str:
    return f"python scripts/lr_search.py --profile {profile.name} --family {family}"


@torch.no_grad()
def validation_objective(sae: torch.nn.Module, x_BD: torch.Tensor, chunk: int = 4096) -> dict[str, Any]:
    """The SAE's own training objective on x_BD (B, D) (the validation rows): {'objective': the sum of the terms its
    `losses` returns, 'objective_terms': {name: value}}, each term averaged over the B rows as training averages it
    over a batch (reconstruction = squared error summed over D, saes/losses.py; ReLU's decoder-norm-weighted L1,
    Gated's gate L1 and its auxiliary reconstruction, JumpReLU's lambda * L0 term, as each SAE's module defines them).
    Measured in eval mode (BatchTopK's inference threshold), with no dead-latent mask (AuxK only revives latents
    during training, and is 0 without one) and at the full sparsity coefficient (a JumpReLU's warm-up factor 1).

    Why the objective and not the MSE: for the L1-penalised families the lr moves L0 as well as MSE (a run that
    shrinks its activations less, or keeps more latents alive, reconstructs better at a higher L0), so the lowest MSE
    would choose the densest run, not the best trade-off; the objective weighs the two as the family's training does.
    For TopK (L0 = k) it is the MSE; for BatchTopK the MSE at its inference threshold."""
    was_training, warmup = sae.training, getattr(sae, "sparsity_warmup", None)
    sae.eval()
    if warmup is not None:
        sae.sparsity_warmup = 1.0
    try:
        totals: dict[str, float] = {}
        for x in x_BD.split(chunk):
            for name, value in sae.losses(x, sae(x)).items():
                totals[name] = totals.get(name, 0.0) + float(value) * x.shape[0]
    finally:
        sae.train(was_training)
        if warmup is not None:
            sae.sparsity_warmup = warmup
    terms = {name: total / x_BD.shape[0] for name, total in totals.items()}
    return {"objective": sum(terms.values()), "objective_terms": terms}


def _check_family(profile: Profile, family: str) -> None:
    if family not in LR_FAMILIES:
        raise ConfigError(f"no lr search for {family!r}: choose one of {LR_FAMILIES}")
    if not profile.lr_search_scales:
        raise ConfigError(f"profile {profile.name!r} has no lr_search_scales: give it the lr multipliers to try")


def _search_sparsity(profile: Profile, family: str) -> float:
    """The claim SAE's sparsity setting as the profile gives it (k, a relative coefficient or lambda): what a search
    record is matched on, without the activations (whose RMS scales the ReLU/Gated coefficients)."""
    if family in ("topk", "batchtopk"):
        return float(profile.claim_k)
    coeffs = getattr(profile, sweep.FRONTIER_FIELDS[family])
    if not coeffs:
        raise ConfigError(f"profile {profile.name!r} has no {sweep.FRONTIER_FIELDS[family]}: give it the family's "
                          "frontier coefficients, the one expected nearest L0 = claim_k first")
    return float(coeffs[0])


def search_records(profile: Profile, family: str, root: str | Path | None = None) -> dict[float, dict[str, Any]]:
    """{lr multiplier: the latest search record} of `family`'s claim SAE, for the multipliers of
    profile.lr_search_scales, trained with the profile's current settings on the current data."""
    _check_family(profile, family)
    sparsity, content = _search_sparsity(profile, family), current_data_content(profile.data)
    found: dict[float, dict[str, Any]] = {}
    for r in load_records(lr_search_path(profile, root)):
        scale = r.get("lr_scale")
        if (r.get("family") == family and r.get("split") == "validation" and r.get("search_sparsity") == sparsity
                and scale in profile.lr_search_scales
                and record_matches(r, profile.train.replace(lr_scale=scale), profile.data, content)):
            found[scale] = r
    return found


def lr_choice(profile: Profile, family: str, root: str | Path | None = None) -> dict[str, Any]:
    """The search's outcome from its table: {'family', 'chosen' (the multiplier with the lowest validation objective;
    None until every multiplier is recorded), 'missing' (multipliers not recorded yet), 'at_edge' (the chosen one is
    the smallest or largest tried: widen profile.lr_search_scales), 'rows': per multiplier {'lr_scale', 'objective',
    'objective_terms', 'mse', 'l0', 'dead_fraction'}, all on the validation rows}."""
    found = search_records(profile, family, root)
    scales = sorted(profile.lr_search_scales)
    rows = [{"lr_scale": s, **{c: found[s].get(c) for c in ("objective", "objective_terms", "mse", "l0", "dead_fraction")}}
            for s in scales if s in found]
    missing = [s for s in scales if s not in found]
    chosen = None if missing else min(rows, key=lambda row: (row["objective"], row["lr_scale"]))["lr_scale"]
    return {"family": family, "chosen": chosen, "missing": missing, "rows": rows,
            "at_edge": chosen is not None and len(scales) > 1 and chosen in (scales[0], scales[-1])}


def chosen_lr_scale(profile: Profile, family: str, root: str | Path | None = None) -> float:
    """The lr multiplier `family` trains with on its frontier (`lr_choice`); LRSearchMissing (one line, with the
    command) while its search is not complete."""
    choice = lr_choice(profile, family, root)
    if choice["chosen"] is None:
        done = len(profile.lr_search_scales) - len(choice["missing"])
        raise LRSearchMissing(
            f"the lr search of {family} for profile {profile.name!r} is not complete ({done} of "
            f"{len(profile.lr_search_scales)} multipliers recorded in {lr_search_path(profile, root)}): run "
            f"`{search_command(profile, family)}` first")
    return choice["chosen"]


def frontier_records(profile: Profile, family: str, root: str | Path | None = None,
                     search_root: str | Path | None = None) -> list[dict[str, Any]]:
    """The latest record per SAE and seed of `family`'s frontier in the results table at `root` (docs/baselines.md:
    data/results/frontiers/<profile>/, where the frontier grids are swept): the family's records trained with the
    profile's current settings at the lr multiplier its search chose (`chosen_lr_scale`, read from `search_root`),
    at any seed, on the current data. For `equal_l0.equal_l0_comparison`."""
    scale, content = chosen_lr_scale(profile, family, search_root), current_data_content(profile.data)
    latest: dict[str, dict[str, Any]] = {}
    for r in load_records(results_path(profile, root)):
        if (r.get("arch") == family and r.get("seed") is not None and r.get("steps") == profile.train.steps
                and record_matches(r, profile.train.replace(lr_scale=scale, seed=r["seed"]), profile.data, content)):
            latest[r["key"]] = r
    return list(latest.values())


def run_lr_search(profile: Profile | str, family: str, ctx: sweep.SweepContext | None = None,
                  root: str | Path | None = None, log: Callable[[str], None] = print,
                  shard: tuple[int, int] = (0, 1)) -> dict[str, Any]:
    """Train and record `family`'s claim SAE at every multiplier of profile.lr_search_scales that has no search
    record yet (`shard` = (i, n): this process takes the multipliers i, i + n, ...), then return `lr_choice`. A
    killed search resumes: recorded runs are skipped, an unfinished training resumes from its checkpoint. The
    validation rows are taken (and a too-small eval split refused) before any training."""
    profile = profile if isinstance(profile, Profile) else get_profile(profile)
    _check_family(profile, family)
    _search_sparsity(profile, family)  # a missing frontier is refused before the activations are loaded
    i, n = shard
    if not 0 <= i < n:
        raise ConfigError(f"shard {i}/{n}: give I/N with 0 <= I < N")
    path = lr_search_path(profile, root)
    durable.check_writable_dir(path.parent, "the lr search's folder")
    ctx = ctx or sweep.build_context(profile, with_lm=False)
    if ctx.evaluator is not None:  # CE is measured on the held-out contexts: not a validation number
        ctx = sweep.SweepContext(ctx.source, ctx.data_cfg, ctx.heldout_BD)
    val_BD = validation_activations(ctx.source, profile.n_validation, profile.n_heldout)
    cfg = sweep.claim_config(profile, family, ctx.d_in, ctx.act_rms)
    data_content = data_content_of(ctx.source, ctx.data_cfg)
    scales = sorted(profile.lr_search_scales)[i::n]
    log(f"lr search {profile.name} {family} ({sweep.sae_name(cfg)}): multipliers {scales} on {len(val_BD)} "
        f"validation rows, table {path}")
    for scale in scales:
        train = sweep.arch_train(profile, cfg, profile.train.replace(lr_scale=scale))
        with entry_lock(config_hash(cfg, train, ctx.data_cfg), data_content):
            if scale in search_records(profile, family, root):  # recorded before, or meanwhile by another shard
                log(f"  lr x{scale:g}: recorded")
                continue
            rec = sweep.train_and_record(
                profile, cfg, train, ctx, path, rows_BD=val_BD, measure=lambda sae: validation_objective(sae, val_BD),
                family=family, lr_scale=scale, search_sparsity=_search_sparsity(profile, family), split="validation",
                validation_rows=int(val_BD.shape[0]),
                numbers_on=f"validation: {int(val_BD.shape[0])} eval rows after the {profile.n_heldout} held-out rows "
                           "(other contexts), not the held-out split")
            log(f"  lr x{scale:g}: validation objective {rec['objective']:.5g} (MSE {rec['mse']:.5g}, L0 "
                f"{rec['l0']:.1f}, {rec['wall_clock_s']:.0f}s)")
    return lr_choice(profile, family, root)
