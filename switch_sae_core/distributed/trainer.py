"""Training one SAE across P processes: data-parallel for every architecture, expert-parallel for Switch.

The loop is the single-process `train.run_steps`; `DistributedRun` is its `Strategy`: each rank trains on
its rows of the global batch, gradients are all-reduced right after backward, (expert parallelism)
clipping uses the norm over every rank's shard, dead-feature counts and logged numbers are reduced over
ranks, rank 0 logs, and checkpoints are written by rank 0 (data parallelism) or by every rank (its shard).

Loss normalisation, chosen so that the P-process gradient IS the single-process gradient over the global
batch of B = P * b rows (each rank holds b consecutive rows of the same global batch):
- every rank computes the SAE's own loss on its b rows: L_recon is a mean over those rows, so
  L = (1/P) sum_r L_r, and grad L = (1/P) sum_r grad L_r;
- replicated parameters (everything in data parallelism; router and biases in expert parallelism):
  gradients are SUM-all-reduced, then divided by P;
- expert weights (expert parallelism): each gradient already sums the contributions of every rank's
  rows (the all-to-all's backward brings them home), so it is divided by P only;
- the Switch load-balancing loss N * sum_i f_i P_i: f (no gradient) is all-reduced BEFORE the loss is
  formed, and each rank uses its local P_i^r; (1/P) sum_r N sum_i f_i P_i^r = N sum_i f_i P_i exactly;
- dead-feature counts: a feature fired if it fired on any rank (MAX all-reduce), windows count the
  global B tokens per step.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from .. import checkpoint, metrics
from .. import train as single
from ..config import SAEConfig, TrainConfig
from ..saes.base import BaseSAE, initial_sae
from .comm import (DistContext, DistributedConfigError, all_reduce_, broadcast_, init_distributed)


# --- data --------------------------------------------------------------------------------------------
def local_rows(x_BD: Tensor, ctx: DistContext) -> Tensor:
    """This rank's b = B / P consecutive rows of the global batch."""
    B = x_BD.shape[0]
    if B % ctx.world_size:
        raise DistributedConfigError(f"global batch {B} does not split evenly over {ctx.world_size} ranks; "
                                     f"use a batch_size divisible by {ctx.world_size}")
    b = B // ctx.world_size
    return x_BD[ctx.rank * b:(ctx.rank + 1) * b]


def check_batch(train_cfg: TrainConfig, ctx: DistContext) -> None:
    if train_cfg.batch_size % ctx.world_size:
        raise DistributedConfigError(
            f"batch_size={train_cfg.batch_size} (the global batch) is not divisible by the {ctx.world_size} ranks: "
            f"every rank takes batch_size / P rows (try batch_size={train_cfg.batch_size // ctx.world_size * ctx.world_size})")


# --- gradients ---------------------------------------------------------------------------------------
@torch.no_grad()
def average_grads(ctx: DistContext, grads: list[Tensor]) -> None:
    """SUM-all-reduce the gradients of replicated parameters in one flat bucket, then divide by P."""
    if not ctx.active or not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    all_reduce_(ctx, flat, "gradient all-reduce")
    flat /= ctx.world_size
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


@torch.no_grad()
def global_grad_norm(ctx: DistContext, replicated: list[Tensor], sharded: list[Tensor]) -> Tensor:
    """sqrt(sum over ranks of |sharded grads|^2 + |replicated grads|^2): the single-process norm."""
    def sq(grads):
        return torch.stack([g.float().pow(2).sum() for g in grads]).sum() if grads else \
            torch.zeros((), device=ctx.device)

    sharded_sq = all_reduce_(ctx, sq(sharded).reshape(1).clone(), "gradient-norm all-reduce")[0]
    return (sharded_sq + sq(replicated)).sqrt()


# --- statistics --------------------------------------------------------------------------------------
@torch.no_grad()
def update_tracker(ctx: DistContext, tracker: metrics.DeadFeatureTracker, out, n_tokens: int,
                   reduce: bool) -> None:
    """A feature fired this step if it fired on any rank; every step counts the global batch's tokens."""
    fired_M = metrics.fired_features(out.latent_acts, out.latent_indices, tracker.n_features).to(torch.int32)
    if reduce:
        all_reduce_(ctx, fired_M, "dead-feature all-reduce", op=torch.distributed.ReduceOp.MAX)
    tracker.record(fired_M, n_tokens)


def mean_over_ranks(ctx: DistContext, row: dict[str, Any]) -> dict[str, Any]:
    """Average a logged row's numbers over ranks (exact for the losses, MSE and L0; FVU and entropies
    become means of per-rank values)."""
    if not ctx.active:
        return row
    keys = [k for k, v in row.items() if isinstance(v, float)]
    lists = [k for k, v in row.items() if isinstance(v, list)]
    flat = torch.tensor([row[k] for k in keys] + [x for k in lists for x in row[k]], dtype=torch.float64,
                        device=ctx.device)  # NCCL reduces only device tensors
    all_reduce_(ctx, flat, "metrics all-reduce")
    flat /= ctx.world_size
    out = dict(row)
    out.update({k: flat[i].item() for i, k in enumerate(keys)})
    i = len(keys)
    for k in lists:
        out[k] = flat[i:i + len(row[k])].tolist()
        i += len(row[k])
    return out


# --- the objective over the global batch ----------------------------------------------------------------
def global_batch_losses(sae: BaseSAE, ctx: DistContext) -> Optional[Callable[..., dict[str, Tensor]]]:
    """A data-parallel replica's loss terms as those of the global batch (see the module docstring), or
    None where the SAE's own `losses` already are (one process; no Switch router, no AuxK).

    - Switch: the load-balancing loss is recomputed with the all-reduced f;
    - AuxK: its value is sum_b |e - e_hat|^2 / sum_b |e|^2 over the batch, so rank r's term is rescaled
      by P * sum_{b in r} |e|^2 / sum_{all b} |e|^2 (no gradient): the mean over ranks of the rescaled
      terms is the global ratio, and so is the mean of their gradients."""
    is_switch, has_auxk = sae.cfg.arch == "switch", sae.cfg.auxk_coeff > 0
    if not ctx.active or not (is_switch or has_auxk):
        return None
    from ..saes.switch import load_balancing_loss
    from .expert_parallel import global_expert_load

    def losses(x_BD: Tensor, out, dead_mask_F=None) -> dict[str, Tensor]:
        if is_switch:
            f_N = global_expert_load(ctx, out.expert_indices, sae.cfg.n_experts)
            out = out._replace(aux_loss=load_balancing_loss(out.router_probs, out.expert_indices, f_N))
        terms = sae.losses(x_BD, out, dead_mask_F)
        if "auxk" in terms:
            with torch.no_grad():
                e_sq = (x_BD.to(out.x_hat.dtype) - out.x_hat).pow(2).sum().reshape(1)
                total = all_reduce_(ctx, e_sq.clone(), "AuxK normaliser all-reduce")
                scale = ctx.world_size * e_sq / total.clamp_min(torch.finfo(total.dtype).tiny)
            terms["auxk"] = terms["auxk"] * scale[0]
        return terms

    return losses


# --- the strategy ----------------------------------------------------------------------------------------
@dataclasses.dataclass
class DistributedRun(single.Strategy):
    """What one rank holds (its SAE or shard, optimizer, tracker) and how the one training loop
    (`train.run_steps`) synchronises it with the other ranks."""

    ctx: DistContext
    sae: BaseSAE
    optimizer: torch.optim.Optimizer
    tracker: metrics.DeadFeatureTracker
    expert_parallel: bool

    def __post_init__(self) -> None:
        self.is_main = self.ctx.is_main
        self.rank_label = f" (rank {self.ctx.rank})"
        if not self.expert_parallel:  # a replica clips by its own norm (all gradients are replicated)
            self.grad_norm = None
            self.losses = global_batch_losses(self.sae, self.ctx)

    def split(self, of: Callable[[torch.nn.Parameter], Optional[Tensor]]) -> tuple[list[Tensor], list[Tensor]]:
        """(replicated, sharded) tensors `of(p)` (p.data or p.grad) over the parameters, None skipped."""
        if self.expert_parallel:
            return self.sae.split_tensors(of)
        return [t for p in self.sae.parameters() if (t := of(p)) is not None], []

    def local_rows(self, x_BD: Tensor) -> Tensor:
        return local_rows(x_BD, self.ctx)

    def sync_grads(self) -> None:
        replicated, sharded = self.split(lambda p: p.grad)
        average_grads(self.ctx, replicated)
        if self.ctx.active:
            with torch.no_grad():
                for g in sharded:
                    g /= self.ctx.world_size

    def grad_norm(self) -> Tensor:
        return global_grad_norm(self.ctx, *self.split(lambda p: p.grad))

    def record_firing(self, tracker: metrics.DeadFeatureTracker, out, n_tokens: int) -> None:
        if self.expert_parallel:
            from .expert_parallel import update_local_tracker

            update_local_tracker(self, n_tokens)
        else:
            update_tracker(self.ctx, tracker, out, n_tokens, reduce=True)

    def reduce_row(self, row: dict[str, Any]) -> dict[str, Any]:
        return mean_over_ranks(self.ctx, {k: (float(v) if isinstance(v, (int, float)) and k not in ("step", "tokens")
                                              else v) for k, v in row.items()})

    def save(self, step: int, sae, optimizer, tracker, train_cfg: TrainConfig):
        if self.expert_parallel:
            from .expert_parallel import save_sharded

            return save_sharded(self, train_cfg, step)
        return save_data_parallel(self, train_cfg, step)


def build_data_parallel(sae_or_cfg: BaseSAE | SAEConfig, train_cfg: TrainConfig, ctx: DistContext) -> DistributedRun:
    """Every rank builds the same SAE (same seed, as train_sae does); rank 0's values are broadcast anyway."""
    if isinstance(sae_or_cfg, SAEConfig):
        sae_or_cfg = initial_sae(sae_or_cfg, train_cfg.seed)
    sae = sae_or_cfg.to(ctx.device)
    optimizer = single.make_optimizer(sae, train_cfg)
    tracker = metrics.DeadFeatureTracker(sae.n_latents, train_cfg.dead_window_tokens, ctx.device)
    return DistributedRun(ctx, sae, optimizer, tracker, expert_parallel=False)


@torch.no_grad()
def broadcast_replicated(run: DistributedRun) -> None:
    for t in run.split(lambda p: p.data)[0]:
        broadcast_(run.ctx, t, "parameter broadcast")


def init_biases_globally(run: DistributedRun, source, train_cfg: TrainConfig) -> Any:
    """Geometric-median init from the same first batch on every rank, then rank 0's values broadcast."""
    x_ND, source = single.median_batch(source, train_cfg)
    single.check_activation_scale(x_ND)
    single.init_biases(run.sae, x_ND.to(run.ctx.device))
    broadcast_replicated(run)
    return source


# --- checkpoints (data parallelism: rank 0 writes the single-process format) --------------------------
def save_data_parallel(run: DistributedRun, train_cfg: TrainConfig, step: int):
    from .comm import barrier

    path = None
    if run.ctx.is_main:
        path = checkpoint.save_checkpoint(train_cfg.checkpoint_dir, step, run.sae, run.optimizer, run.tracker,
                                      train_cfg, keep=train_cfg.checkpoint_keep)
    barrier(run.ctx, "checkpoint barrier")  # nobody races ahead of (or resumes from) a half-written step
    return path or checkpoint.latest_checkpoint(train_cfg.checkpoint_dir)


def resume_data_parallel(run: DistributedRun, train_cfg: TrainConfig) -> int:
    latest = checkpoint.latest_checkpoint(train_cfg.checkpoint_dir)
    return 0 if latest is None else checkpoint.restore(latest, run.sae, run.optimizer, run.tracker, train_cfg)


def train_distributed(sae_or_cfg: BaseSAE | SAEConfig, source, train_cfg: TrainConfig, *,
                      expert_parallel: bool = False, ctx: Optional[DistContext] = None,
                      callback: Optional[Callable[[dict[str, Any]], None]] = None,
                      resume: bool = False) -> single.TrainResult:
    """Train one SAE over all ranks of the process group (call it on every rank, e.g. under torchrun).

    `source` must give every rank the same global batches (a BatchSource does, by its seed); each rank
    trains on its B/P rows. expert_parallel=True (Switch only) shards the experts over the ranks.
    Returns this rank's SAE (expert parallelism: its shard) and, on rank 0, the logged history
    (numbers averaged over ranks). `resume` continues from the latest checkpoint in checkpoint_dir."""
    ctx = ctx or init_distributed(train_cfg.device)
    check_batch(train_cfg, ctx)
    if expert_parallel:
        from . import expert_parallel as ep

        run = ep.build_expert_parallel(sae_or_cfg, train_cfg, ctx)
        restore = ep.resume_sharded
    else:
        run = build_data_parallel(sae_or_cfg, train_cfg, ctx)
        restore = resume_data_parallel
    if resume and not train_cfg.checkpoint_dir:
        raise DistributedConfigError("resume=True needs TrainConfig.checkpoint_dir (where the checkpoints are)")
    start = restore(run, train_cfg) if resume else 0
    if start == 0:
        source = init_biases_globally(run, source, train_cfg)
    logger = single.Logger(train_cfg if ctx.is_main else train_cfg.replace(wandb_project=None), run.sae.cfg, callback)
    try:
        last = single.run_steps(run.sae, run.optimizer, run.tracker, single.batch_stream(source, train_cfg, start),
                                start, train_cfg, logger, ctx.device, strategy=run)
    finally:
        logger.close()
    return single.TrainResult(run.sae, logger.history, train_cfg.steps, last)
