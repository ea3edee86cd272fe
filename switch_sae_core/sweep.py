"""Sweeps: the paper's grids of SAEs, trained (through the one cache) and recorded in the results table.

- A grid is a list of `SAEConfig`s built from a profile (`grid_configs`):
  `fixed_width`  TopK, ReLU, Gated and Switch (N in profile.fixed_width_experts) all at the baseline
                 width M = width_multiple * d; `flop_matched` TopK, ReLU, Gated at M and Switch
                 (N in profile.flop_matched_experts) with experts as wide as the baseline (M_switch = N * M).
  TopK/Switch run over profile.ks; ReLU/Gated have no k, so their sparsity coefficient runs over values
  chosen to land in the same L0 range (profile.relu_l1_coeffs / gated_l1_coeffs, relative to the activations'
  RMS norm; at least two where there are several k).
- `frontiers` (and one family's: `frontier_relu`, `frontier_gated`, `frontier_jumprelu`): each family's frontier
  coefficients (profile.frontier_*, its claim SAE first: `frontier_configs`) at the lr multiplier its lr search
  chose on the validation split (lr_search.py; refused until that search is complete), the claim SAE at every seed.
- `run_sweep` trains (`cache.train_or_load`) and evaluates every SAE of the grids that has no record in
  the table yet (`results.py`), appending each record as it finishes: a killed sweep resumes and skips
  finished records; an unfinished training resumes from its checkpoint.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import torch

from . import durable
from .cache import entry_lock, train_or_load
from .config import ConfigError, DataConfig, SAEConfig, TrainConfig
from .heldout import heldout_activations
from .profiles import FRONTIER_GRIDS, GRIDS, Profile, get_profile, routing_variants
from .keys import config_hash, lineage_hash
from .results import (append_record, baseline_width, load_records, make_record,
                      results_path, sae_name)



# --- grids ----------------------------------------------------------------------------------------------
def grid_configs(profile: Profile, grid: str, d_in: int, act_rms: float = 1.0) -> list[SAEConfig]:
    """Every SAE of a named grid. `act_rms` = sqrt(E||x||^2 / d) of the activations scales the
    ReLU/Gated sparsity coefficients (their loss is quadratic in x, the L1 term linear)."""
    if grid not in GRIDS:
        raise ConfigError(f"unknown grid {grid!r}: choose one of {GRIDS}")
    if grid in ("seeds", "convergence", "schedules"):  # the FLOP-matched claim at one k: TopK and each FLOP-matched Switch
        m, k = baseline_width(profile, d_in), profile.claim_k
        experts = profile.flop_matched_experts[:1] if grid == "convergence" else profile.flop_matched_experts
        return [SAEConfig(arch="topk", d_in=d_in, n_features=m, k=k)] + [
            SAEConfig(arch="switch", d_in=d_in, n_features=n * m, n_experts=n, k=k) for n in experts]
    if grid == "variants":
        return list(variant_configs(profile, d_in).values())
    if grid == "frontiers" or grid in FRONTIER_GRIDS:
        return [c for family in frontier_families(grid) for c in frontier_configs(profile, family, d_in, act_rms)]
    if grid == "scaling":  # notebook 07: TopK and Switch over widths at one k; every expert at least 2k wide
        k, widths = profile.scaling_k, profile.scaling_widths
        return [SAEConfig(arch="topk", d_in=d_in, n_features=m, k=k) for m in widths] + [
            SAEConfig(arch="switch", d_in=d_in, n_features=m, n_experts=n, k=k)
            for n in profile.scaling_experts for m in widths if m % n == 0 and m // n >= 2 * k]
    m = baseline_width(profile, d_in)
    cfgs = [SAEConfig(arch="topk", d_in=d_in, n_features=m, k=k) for k in profile.ks]
    for arch, rel in (("relu", profile.relu_l1_coeffs), ("gated", profile.gated_l1_coeffs)):
        cfgs += [SAEConfig(arch=arch, d_in=d_in, n_features=m, l1_coeff=_round_sig(r * act_rms)) for r in rel]
    # BatchTopK with the paper's AuxK (1/32, the top 512 dead latents); JumpReLU's lambda needs no act_rms (it
    # is in the paper's units: the SAE scales its L0 term by the activations' mean squared norm)
    cfgs += [SAEConfig(arch="batchtopk", d_in=d_in, n_features=m, k=k, auxk_coeff=1 / 32, auxk_k=min(512, m))
             for k in profile.batchtopk_ks]
    cfgs += [SAEConfig(arch="jumprelu", d_in=d_in, n_features=m, l1_coeff=lam) for lam in profile.jumprelu_l0_coeffs]
    if grid == "fixed_width":
        experts = [n for n in profile.fixed_width_experts if m % n == 0]
        cfgs += [SAEConfig(arch="switch", d_in=d_in, n_features=m, n_experts=n, k=k)
                 for n in experts for k in profile.ks if k <= m // n]
    else:
        cfgs += [SAEConfig(arch="switch", d_in=d_in, n_features=n * m, n_experts=n, k=k)
                 for n in profile.flop_matched_experts for k in profile.ks]
    return cfgs


def variant_configs(profile: Profile, d_in: int) -> dict[str, SAEConfig]:
    """The `variants` grid by label (issue 22 item 4): TopK and `profiles.routing_variants` (top-1, top-2, shared
    expert, Scale SAE) at equal encoder FLOPs, at k = claim_k."""
    m, k = baseline_width(profile, d_in), profile.claim_k
    return {"topk": SAEConfig(arch="topk", d_in=d_in, n_features=m, k=k),
            **{label: SAEConfig(d_in=d_in, **fields) for label, fields in routing_variants(m, k).items()}}


FRONTIER_FIELDS = {"relu": "frontier_relu_l1_coeffs", "gated": "frontier_gated_l1_coeffs",
                   "jumprelu": "frontier_jumprelu_l0_coeffs"}


def frontier_families(grid: str) -> tuple[str, ...]:
    """The families a frontier grid trains: 'frontiers' all of them, 'frontier_<family>' one."""
    return tuple(FRONTIER_FIELDS) if grid == "frontiers" else (grid.removeprefix("frontier_"),)


def frontier_configs(profile: Profile, family: str, d_in: int, act_rms: float = 1.0) -> list[SAEConfig]:
    """One family's frontier (profile.frontier_<family>_*: ReLU/Gated coefficients relative to act_rms, as the
    paper grids', JumpReLU's lambda as it is), its claim SAE first (the coefficient expected nearest L0 = claim_k)."""
    if family not in FRONTIER_FIELDS:
        raise ConfigError(f"no frontier for {family!r}: choose one of {tuple(FRONTIER_FIELDS)}")
    m, coeffs = baseline_width(profile, d_in), getattr(profile, FRONTIER_FIELDS[family])
    scale = 1.0 if family == "jumprelu" else act_rms
    return [SAEConfig(arch=family, d_in=d_in, n_features=m, l1_coeff=_round_sig(c * scale)) for c in coeffs]


def claim_config(profile: Profile, family: str, d_in: int, act_rms: float = 1.0) -> SAEConfig:
    """The SAE of a baseline family whose lr is searched (lr_search.py): TopK / BatchTopK at k = claim_k (BatchTopK
    with the grids' AuxK), a frontier family's claim SAE (`frontier_configs`' first); ConfigError without one."""
    m = baseline_width(profile, d_in)
    if family == "topk":
        return SAEConfig(arch="topk", d_in=d_in, n_features=m, k=profile.claim_k)
    if family == "batchtopk":
        return SAEConfig(arch="batchtopk", d_in=d_in, n_features=m, k=profile.claim_k, auxk_coeff=1 / 32,
                         auxk_k=min(512, m))
    frontier = frontier_configs(profile, family, d_in, act_rms)
    if not frontier:
        raise ConfigError(f"profile {profile.name!r} has no {FRONTIER_FIELDS[family]}: give it the family's frontier "
                          "coefficients, the one expected nearest L0 = claim_k first")
    return frontier[0]


def grid_jobs(profile: Profile, grid: str, d_in: int, act_rms: float = 1.0) -> list[tuple[SAEConfig, TrainConfig]]:
    """(SAE, how it is trained) for every SAE of a grid: the profile's training, except
    `seeds`: every seed of profile.seeds but the profile's own (its SAEs are in the other grids already), and
    `convergence`: at each of profile.convergence_seeds, the profile's steps and twice as many
                   (checks.convergence_check compares the two; the longer run continues the shorter one from
                   its decay start, cache.py), and
    `schedules`: every step count of profile.schedule_steps at every seed of profile.seeds (matched schedules:
                 each run has its own lr decay; the lineage runs them shortest first, each continuing the one
                 before from its decay start), and
    `frontiers` / `frontier_<family>`: at the lr multiplier the family's lr search chose (lr_search.chosen_lr_scale,
    which refuses, naming the command, until that search is complete), every coefficient at the profile's seed and
    the claim SAE at every seed of profile.seeds, and
    `scaling`: Profile.scaling_steps steps (its own token budget, the same for every width), with a dead-latent
    window of at most a third of that budget; None = the profile's training as it is."""
    return [(c, arch_train(profile, c, t)) for c, t in _grid_jobs(profile, grid, d_in, act_rms)]


ARCH_TRAIN_FIELDS = ("adam_betas", "lr_warmup_steps", "sparsity_warmup_steps")  # what `arch_train` may change


def arch_train(profile: Profile, sae_cfg: SAEConfig, train: TrainConfig) -> TrainConfig:
    """The training of one SAE of a grid: `train`, with JumpReLU's own recipe (Rajamanoharan et al. 2024: Adam
    betas (0, 0.999), the profile's lr and lambda warm-ups) for a JumpReLU SAE."""
    if sae_cfg.arch != "jumprelu":
        return train
    return train.replace(adam_betas=(0.0, 0.999), lr_warmup_steps=profile.jumprelu_lr_warmup_steps,
                         sparsity_warmup_steps=profile.jumprelu_sparsity_warmup_steps)


def _grid_jobs(profile: Profile, grid: str, d_in: int, act_rms: float) -> list[tuple[SAEConfig, TrainConfig]]:
    cfgs = grid_configs(profile, grid, d_in, act_rms)
    if grid == "seeds":
        return [(c, profile.train.replace(seed=s)) for s in profile.seeds if s != profile.train.seed for c in cfgs]
    if grid == "convergence":
        seeds = profile.convergence_seeds or (profile.train.seed,)
        return [(c, profile.train.replace(steps=f * profile.train.steps, seed=s)) for c in cfgs for s in seeds
                for f in (1, 2)]
    if grid == "schedules":
        return [(c, profile.train.replace(steps=steps, seed=s)) for c in cfgs for s in profile.seeds
                for steps in profile.schedule_steps]
    if grid == "frontiers" or grid in FRONTIER_GRIDS:
        from .lr_search import chosen_lr_scale  # here: lr_search trains its runs through this module

        jobs = []
        for family in frontier_families(grid):
            frontier = frontier_configs(profile, family, d_in, act_rms)
            if frontier:
                train = profile.train.replace(lr_scale=chosen_lr_scale(profile, family))
                jobs += [(c, train) for c in frontier]
                jobs += [(frontier[0], train.replace(seed=s)) for s in profile.seeds if s != train.seed]
        return jobs
    if grid == "scaling" and profile.scaling_steps is not None:
        # dead latents (and AuxK) need a window shorter than the run: at most a third of its tokens (the cpu
        # profile's 3M-token scaling runs keep the 1M window they were trained with: their keys stay)
        tokens = profile.scaling_steps * profile.train.batch_size
        train = profile.train.replace(steps=profile.scaling_steps,
                                      dead_window_tokens=min(profile.train.dead_window_tokens, tokens // 3))
        return [(c, train) for c in cfgs]
    return [(c, profile.train) for c in cfgs]


def _round_sig(x: float, digits: int = 3) -> float:
    """Round to a few significant digits so the grid (and its config hashes) is stable across runs."""
    return float(f"{x:.{digits}g}")



# --- activations and evaluation context ---------------------------------------------------------------------
@dataclasses.dataclass
class SweepContext:
    """What every SAE of a sweep shares: the training batches, held-out activations, the LM evaluator."""

    source: Any  # BatchSource
    data_cfg: DataConfig
    heldout_BD: torch.Tensor  # (B, D) held-out activations for MSE/FVU/L0 and the sample-efficiency curve
    evaluator: Optional[Callable[[torch.nn.Module], dict[str, float]]] = None  # SAE -> CE/KL numbers

    @property
    def d_in(self) -> int:
        return int(self.heldout_BD.shape[1])

    @property
    def act_rms(self) -> float:
        """sqrt(E||x||^2 / d) of the held-out activations (scales the ReLU/Gated coefficients)."""
        return float(self.heldout_BD.pow(2).sum(-1).mean().div(self.d_in).sqrt())


def build_context(profile: Profile, with_lm: bool = True, n_heldout: int | None = None) -> SweepContext:
    """Load (or build, the first time) the profile's cached activations and the CE evaluator."""
    from .data.store import ActivationStore

    store = ActivationStore.build_or_load(profile.data)
    heldout = heldout_activations(store, n_heldout or profile.n_heldout)
    evaluator = None
    if with_lm:
        from .evaluate import make_lm_evaluator

        evaluator = make_lm_evaluator(_FirstContexts(store, profile.ce_contexts), profile.data,
                                      progress=profile.train.progress)
    return SweepContext(store, profile.data, heldout, evaluator)


class _FirstContexts:
    """A store seen through its first `n` held-out contexts (CE evaluation on a budget; None = all)."""

    def __init__(self, store: Any, n: int | None):
        self.config = store.config
        self.eval_tokens = store.eval_tokens if n is None else store.eval_tokens[:n]


# --- the sweep -----------------------------------------------------------------------------------------------
def sweep_jobs(profile: Profile, grids: Iterable[str], ctx: SweepContext) -> list[tuple[SAEConfig, TrainConfig]]:
    """The union of the grids' (SAE, training) jobs, each once, in grid order."""
    seen, jobs = set(), []
    for g in grids:
        for cfg, train_cfg in grid_jobs(profile, g, ctx.d_in, ctx.act_rms):
            h = config_hash(cfg, train_cfg, ctx.data_cfg)
            if h not in seen:
                seen.add(h)
                jobs.append((cfg, train_cfg))
    return jobs


def lineages(jobs: list[tuple[SAEConfig, TrainConfig]], data_cfg: DataConfig) -> list[list[tuple[SAEConfig, TrainConfig]]]:
    """The jobs grouped by SAE and training but for `steps` (first appearance order), shortest run first in each
    group: a longer run continues the shorter one from its decay start (cache.py), so they run in that order,
    in one process."""
    groups: dict[str, list] = {}
    for cfg, train_cfg in jobs:
        groups.setdefault(lineage_hash(cfg, train_cfg, data_cfg), []).append((cfg, train_cfg))
    return [sorted(group, key=lambda job: job[1].steps) for group in groups.values()]


def sweep_configs(profile: Profile, grids: Iterable[str], ctx: SweepContext) -> list[SAEConfig]:
    """The SAE configs of `sweep_jobs`."""
    return [cfg for cfg, _ in sweep_jobs(profile, grids, ctx)]


def run_sweep(
    profile: Profile | str | None = None,
    grids: Iterable[str] = GRIDS,
    ctx: SweepContext | None = None,
    root: str | Path | None = None,
    with_lm: bool = True,
    log: Callable[[str], None] = print,
    shard: tuple[int, int] = (0, 1),
    on_record: Optional[Callable[[dict[str, Any]], None]] = None,
) -> list[dict[str, Any]]:
    """Train and evaluate every SAE of the grids that has no record yet; return the grids' records (the latest
    per SAE and training; with `shard`, those finished so far).

    Records are appended as each SAE finishes (and handed to `on_record`, e.g. to compare it with a reference
    table at once), so a killed sweep restarts where it stopped. `shard` = (i, n):
    this process trains only the SAEs i, i + n, i + 2n, ... of the grids' job list, so n processes (one per core
    or GPU) share a sweep and append to the same table (one line per record)."""
    from tqdm.auto import tqdm

    profile = profile if isinstance(profile, Profile) else get_profile(profile)
    grids = [grids] if isinstance(grids, str) else list(grids)
    for g in grids:
        if g not in GRIDS:
            raise ConfigError(f"unknown grid {g!r}: choose from {GRIDS}")
    i, n = shard
    if not 0 <= i < n:
        raise ConfigError(f"shard {i}/{n}: give I/N with 0 <= I < N")
    if n > 1 and ctx is None:
        _require_cache(profile)
    path = results_path(profile, root)
    durable.check_writable_dir(path.parent, "the results folder")  # before hours of training, not after
    ctx = ctx or build_context(profile, with_lm=with_lm)
    data_content = getattr(ctx.source, "content_digest", None)
    done = _recorded(path, ctx, data_content)
    jobs = sweep_jobs(profile, grids, ctx)
    groups = lineages(jobs, ctx.data_cfg)
    n_todo = sum(config_hash(c, t, ctx.data_cfg) not in done for c, t in jobs)
    log(f"sweep {profile.name} {'+'.join(grids)}: {len(jobs)} SAEs, {len(jobs) - n_todo} already in {path}")
    # shards cut the whole list of lineages, not what is left: processes started at different times agree
    # a run with a longer run after it in its lineage keeps its decay-start state for that one to continue from
    todo = [(cfg, train_cfg, train_cfg.steps < group[-1][1].steps) for group in groups[i::n]
            for cfg, train_cfg in group if config_hash(cfg, train_cfg, ctx.data_cfg) not in done]
    if n > 1:
        log(f"shard {i}/{n}: {len(todo)} of them to train here")
    # a second process on the same sweep (another terminal, a notebook): SAEs it is training are done last here,
    # by which time it has recorded them (each SAE is trained and recorded under its lock: never twice)
    bar = tqdm(total=len(todo), desc=f"sweep {profile.name}", unit="SAE")
    pending, blocking = todo, False
    while pending:
        deferred = []
        for cfg, train_cfg, keep in pending:
            key = config_hash(cfg, train_cfg, ctx.data_cfg)
            lock = entry_lock(key, data_content)
            if not lock.acquire(blocking=blocking):
                log(f"  {sae_name(cfg)} (seed {train_cfg.seed}, {train_cfg.steps} steps): {lock.holder()} is "
                    "training it; doing the others first")
                deferred.append((cfg, train_cfg, keep))
                continue
            try:
                if key not in _recorded(path, ctx, data_content):  # recorded meanwhile by another process?
                    record = _train_and_record(profile, cfg, train_cfg, keep, ctx, path, log)
                    if on_record is not None:
                        on_record(record)
            finally:
                lock.release()
            bar.update(1)
        pending, blocking = deferred, True
    bar.close()
    latest = {r["key"]: r for r in load_records(path)}
    return [latest[key] for key in (config_hash(c, t, ctx.data_cfg) for c, t in jobs) if key in latest]


def _recorded(path: Path, ctx: SweepContext, data_content: str | None) -> set[str]:
    """Keys of the SAEs the table holds a record of for this data (records that did not record their data's
    content count); a record made without the LM evaluation (--no-lm) is redone when the evaluator exists."""
    need_lm = ctx.evaluator is not None
    return {r["key"] for r in load_records(path) if (not need_lm or r.get("loss_recovered") is not None)
            and (data_content is None or r.get("data_content") in (None, data_content))}


def train_and_record(profile: Profile, cfg: SAEConfig, train_cfg: TrainConfig, ctx: SweepContext, path: Path,
                     keep_decay_checkpoint: bool = False, rows_BD: torch.Tensor | None = None,
                     measure: Optional[Callable[[torch.nn.Module], dict[str, Any]]] = None,
                     **columns: Any) -> dict[str, Any]:
    """The one way to run one SAE: train it with `train_cfg` on `ctx`'s activations (or load it: the one
    train-or-load cache, `cache.train_or_load`), evaluate it (held-out numbers; CE/KL where `ctx.evaluator` is
    set), append its record to the table at `path` and return the record. `columns`: extra columns of the
    record (a script's `arm`, `command`). The sweep and scripts/convergence_probe.py and
    scripts/ablation_flop_matched_gap.py all call it. `rows_BD` (the lr search's validation rows): the record's
    MSE/FVU/L0 are measured on these rows instead of the held-out ones, and its curve (the cached run's, on the
    held-out rows) is left out; `measure(sae)`: more columns computed from the trained SAE."""
    t0 = time.perf_counter()
    sae, info = train_or_load(profile, cfg, ctx.source, train_cfg, ctx.data_cfg, ctx.heldout_BD,
                              keep_decay_checkpoint=keep_decay_checkpoint)
    if rows_BD is not None:
        info = {**info, "curve": {"step": [], "mse": []}, "curve_rows": None}
    # the record belongs to the profile's training with this seed and length (its fingerprint), not to the
    # recipe its architecture adds (its key has that)
    shared = train_cfg.replace(**{f: getattr(profile.train, f) for f in ARCH_TRAIN_FIELDS})
    record = make_record(profile.replace(train=shared), cfg, sae, info,
                         ctx.heldout_BD if rows_BD is None else rows_BD, ctx.evaluator)
    record["wall_clock_s"] = time.perf_counter() - t0  # this process's: training here + evaluation
    record.update(measure(sae) if measure is not None else {})
    record.update(columns)
    append_record(path, record)
    return record


def _train_and_record(profile: Profile, cfg: SAEConfig, train_cfg: TrainConfig, keep: bool, ctx: SweepContext,
                      path: Path, log: Callable[[str], None]) -> dict[str, Any]:
    record = train_and_record(profile, cfg, train_cfg, ctx, path, keep_decay_checkpoint=keep)
    log(f"  {record['name']} (seed {train_cfg.seed}, {train_cfg.steps} steps): mse={record['mse']:.4g} "
        f"L0={record['l0']:.1f} loss_rec={_fmt(record['loss_recovered'])} ({record['wall_clock_s']:.0f}s)")
    return record


def _require_cache(profile: Profile) -> None:
    """Shards must not each extract the activations (and race to write one folder): the cache comes first."""
    from .data.identity import cache_key
    from .paths import cache_dir

    root = Path(profile.data.cache_dir) if profile.data.cache_dir else cache_dir()
    if not (root / "activations" / cache_key(profile.data)).is_dir():
        raise ConfigError(f"the activations of profile {profile.name!r} are not cached yet: run `switch-sae cache "
                          f"--profile {profile.name}` once before starting shards")


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.4f}"
