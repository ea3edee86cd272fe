"""Training one SAE across P processes: data-parallel for every architecture, expert-parallel for Switch.

The step itself is the single-process `train.train_step` with two hooks: gradients are all-reduced right
after backward, and (expert parallelism) clipping uses the norm over every rank's shard.

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
from typing import Any, Callable, Iterator, Optional

import torch
from torch import Tensor

from .. import metrics
from .. import train as single
from ..config import SAEConfig, TrainConfig
from ..saes.base import BaseSAE, build_sae
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
def use_global_batch_objective(sae: BaseSAE, ctx: DistContext) -> Callable[[], None]:
    """Make a data-parallel replica's loss terms those of the global batch (see the module docstring).

    - Switch: a forward hook recomputes the load-balancing loss with the all-reduced f;
    - AuxK: its value is sum_b |e - e_hat|^2 / sum_b |e|^2 over the batch, so rank r's term is rescaled
      by P * sum_{b in r} |e|^2 / sum_{all b} |e|^2 (no gradient): the mean over ranks of the rescaled
      terms is the global ratio, and so is the mean of their gradients.
    Returns a function that removes both again (the trained replica then works in a single process)."""
    undo: list[Callable[[], None]] = []
    if not ctx.active:
        return lambda: None
    if sae.cfg.arch == "switch":
        from ..saes.switch import load_balancing_loss
        from .expert_parallel import global_expert_load

        def global_aux(module, inputs, out):
            f_N = global_expert_load(ctx, out.expert_indices, module.cfg.n_experts)
            return out._replace(aux_loss=load_balancing_loss(out.router_probs, out.expert_indices, f_N))

        undo.append(sae.register_forward_hook(global_aux).remove)
    if sae.cfg.auxk_coeff > 0:
        local_losses = sae.losses

        def global_losses(x_BD: Tensor, out, dead_mask_F=None) -> dict[str, Tensor]:
            losses = local_losses(x_BD, out, dead_mask_F)
            if "auxk" in losses:
                with torch.no_grad():
                    e_sq = (x_BD.to(out.x_hat.dtype) - out.x_hat).pow(2).sum().reshape(1)
                    total = all_reduce_(ctx, e_sq.clone(), "AuxK normaliser all-reduce")
                    scale = ctx.world_size * e_sq / total.clamp_min(torch.finfo(total.dtype).tiny)
                losses["auxk"] = losses["auxk"] * scale[0]
            return losses

        sae.losses = global_losses  # this replica only (an instance attribute, not the class)
        undo.append(lambda: delattr(sae, "losses"))
    return lambda: [fn() for fn in undo] and None


# --- the run -----------------------------------------------------------------------------------------
@dataclasses.dataclass
class DistributedRun:
    """What one rank holds: its (shard of the) SAE, optimizer, tracker, and how to synchronise."""

    ctx: DistContext
    sae: BaseSAE
    optimizer: torch.optim.Optimizer
    tracker: metrics.DeadFeatureTracker
    expert_parallel: bool
    finish: Callable[[], None] = lambda: None
    """Undo the training-only hooks (called when training ends)."""

    def split(self, of: Callable[[torch.nn.Parameter], Optional[Tensor]]) -> tuple[list[Tensor], list[Tensor]]:
        """(replicated, sharded) tensors `of(p)` (p.data or p.grad) over the parameters, None skipped."""
        if self.expert_parallel:
            return self.sae.split_tensors(of)
        return [t for p in self.sae.parameters() if (t := of(p)) is not None], []

    def sync_grads(self) -> None:
        replicated, sharded = self.split(lambda p: p.grad)
        average_grads(self.ctx, replicated)
        if self.ctx.active:
            with torch.no_grad():
                for g in sharded:
                    g /= self.ctx.world_size

    def grad_norm(self) -> Tensor:
        return global_grad_norm(self.ctx, *self.split(lambda p: p.grad))


def build_data_parallel(sae_or_cfg: BaseSAE | SAEConfig, train_cfg: TrainConfig, ctx: DistContext) -> DistributedRun:
    """Every rank builds the same SAE (same seed, as train_sae does); rank 0's values are broadcast anyway."""
    if isinstance(sae_or_cfg, SAEConfig):
        torch.manual_seed(train_cfg.seed)
        sae_or_cfg = build_sae(sae_or_cfg)
    sae = sae_or_cfg.to(ctx.device)
    undo = use_global_batch_objective(sae, ctx)
    optimizer = single.make_optimizer(sae, train_cfg)
    tracker = metrics.DeadFeatureTracker(sae.n_latents, train_cfg.dead_window_tokens, ctx.device)
    return DistributedRun(ctx, sae, optimizer, tracker, expert_parallel=False, finish=undo)


@torch.no_grad()
def broadcast_replicated(run: DistributedRun) -> None:
    for t in run.split(lambda p: p.data)[0]:
        broadcast_(run.ctx, t, "parameter broadcast")


def init_biases_globally(run: DistributedRun, source, train_cfg: TrainConfig) -> Any:
    """Geometric-median init from the same first batch on every rank, then rank 0's values broadcast."""
    x_ND, source = single.median_batch(source, train_cfg)
    single.init_biases(run.sae, x_ND.to(run.ctx.device))
    broadcast_replicated(run)
    return source


def run_distributed_steps(run: DistributedRun, batches: Iterator[Tensor], start: int, train_cfg: TrainConfig,
                          logger: single.Logger, save: Optional[Callable[[int], Any]] = None) -> Any:
    """Steps `start` .. `steps - 1` on this rank's rows of every global batch; returns the last save's result."""
    from tqdm.auto import tqdm

    ctx, sae, optimizer = run.ctx, run.sae, run.optimizer
    lr0 = single.base_lr(train_cfg, sae.cfg.n_features, sae.cfg.expert_width)
    autocast = single.autocast_context(ctx.device, train_cfg.autocast_bf16)
    last = None
    bar = tqdm(range(start, train_cfg.steps), initial=start, total=train_cfg.steps,
               disable=not (train_cfg.progress and ctx.is_main), desc=f"train {sae.cfg.arch} x{ctx.world_size}")
    for step in bar:
        x_BD = next(batches, None)
        if x_BD is None:
            raise single.TrainingError(f"step {step}: the training source ran out of batches")
        x_bD = local_rows(x_BD, ctx).to(ctx.device, non_blocking=True)
        single.set_lr(optimizer, lr0 * single.lr_factor(step, train_cfg.steps, train_cfg.lr_decay_frac))
        try:
            result = single.train_step(sae, optimizer, x_bD, dead_mask_M=run.tracker.dead_mask(),
                                       grad_clip=train_cfg.grad_clip, autocast=autocast, sync_grads=run.sync_grads,
                                       grad_norm=run.grad_norm if run.expert_parallel else None)
        except single.SAEInputError as e:
            raise single.TrainingError(f"step {step} (rank {ctx.rank}): bad training batch: {e}") from None
        if not torch.isfinite(result.loss):
            raise single.TrainingError(f"step {step} (rank {ctx.rank}): the loss is {result.loss.item()} "
                                       "(diverged); try a lower lr")
        record_firing(run, result.out, x_BD.shape[0])
        done = step + 1
        if done % train_cfg.log_every == 0 or done == train_cfg.steps:
            row = {"step": done, "tokens": done * x_BD.shape[0], "lr": optimizer.param_groups[0]["lr"],
                   **single.step_metrics(x_bD, result, run.tracker, sae.cfg.n_experts)}
            row = mean_over_ranks(ctx, {k: (float(v) if isinstance(v, (int, float)) and k not in ("step", "tokens") else v)
                                        for k, v in row.items()})
            bar.set_postfix(loss=f"{row['loss']:.4g}", l0=f"{row['l0']:.1f}")
            if ctx.is_main:
                logger.log(row)
        if save is not None and (done == train_cfg.steps or
                                 (train_cfg.checkpoint_every and done % train_cfg.checkpoint_every == 0)):
            last = save(done)
    return last


def record_firing(run: DistributedRun, out, n_tokens: int) -> None:
    if run.expert_parallel:
        from .expert_parallel import update_local_tracker

        update_local_tracker(run, n_tokens)
    else:
        update_tracker(run.ctx, run.tracker, out, n_tokens, reduce=True)


# --- checkpoints (data parallelism: rank 0 writes the single-process format) --------------------------
def save_data_parallel(run: DistributedRun, train_cfg: TrainConfig, step: int):
    from .comm import barrier

    path = None
    if run.ctx.is_main:
        path = single.save_checkpoint(train_cfg.checkpoint_dir, step, run.sae, run.optimizer, run.tracker,
                                      train_cfg, keep=train_cfg.checkpoint_keep)
    barrier(run.ctx, "checkpoint barrier")  # nobody races ahead of (or resumes from) a half-written step
    return path or single.latest_checkpoint(train_cfg.checkpoint_dir)


def resume_data_parallel(run: DistributedRun, train_cfg: TrainConfig) -> int:
    latest = single.latest_checkpoint(train_cfg.checkpoint_dir)
    return 0 if latest is None else single.restore(latest, run.sae, run.optimizer, run.tracker, train_cfg)


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
        save = lambda step: ep.save_sharded(run, train_cfg, step)  # noqa: E731
        restore = ep.resume_sharded
    else:
        run = build_data_parallel(sae_or_cfg, train_cfg, ctx)
        save = lambda step: save_data_parallel(run, train_cfg, step)  # noqa: E731
        restore = resume_data_parallel
    if resume and not train_cfg.checkpoint_dir:
        raise DistributedConfigError("resume=True needs TrainConfig.checkpoint_dir (where the checkpoints are)")
    start = restore(run, train_cfg) if resume else 0
    if start == 0:
        source = init_biases_globally(run, source, train_cfg)
    logger = single.Logger(train_cfg if ctx.is_main else train_cfg.replace(wandb_project=None), run.sae.cfg, callback)
    try:
        last = run_distributed_steps(run, single.batch_stream(source, train_cfg, start), start, train_cfg, logger,
                                     save if train_cfg.checkpoint_dir else None)
    finally:
        logger.close()
        run.finish()
    return single.TrainResult(run.sae, logger.history, train_cfg.steps, last)
