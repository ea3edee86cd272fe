"""Expert parallelism for the Switch SAE: rank r owns experts [r L, (r+1) L), L = N / P.

One forward on rank r (b = its rows of the global batch, E = top_e):
1. route its b inputs with the replicated router; f (expert load, no gradient) is all-reduced, so the
   load-balancing loss sees the global batch;
2. sort the b*E (input, expert) assignments by expert (so by owning rank), exchange the per-rank row
   counts, and all-to-all the encoder inputs x - b_pre to the owners;
3. the owner runs the rows it received through its L experts (`switch.experts_forward`, one grouped
   matmul), and all-to-alls the (T, D) expert outputs back;
4. the origin scales them by the gate and adds b_pre, exactly as `SwitchSAE.forward` does.
The all-to-alls are differentiable: their backward carries gradients the opposite way, so expert
weights receive the gradient of every rank's rows, and b_pre/x the gradient of their own.
AuxK (top_e = 1) is computed on the owner too, after the residuals x - x_hat travel there (`losses`).

Checkpoints: `checkpoint_dir/rank_RRRRR/step_SSSSSSSS/` per rank, in the single-process trainer format
(`checkpoint.save_checkpoint`): `sae.safetensors` holds this rank's experts plus the replicated router and
biases, `config.json` the FULL SAEConfig, `shard.json` which experts; the optimizer and dead-feature
state of those experts sit beside them. `load_sharded(checkpoint_dir)` assembles one `SwitchSAE`.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor, nn

from .. import checkpoint, metrics
from .. import train as single
from ..config import SAEConfig, TrainConfig
from ..saes.base import (CONFIG_FILE, WEIGHTS_FILE, BaseSAE, CheckpointError, SwitchOutput, auxk_loss, build_sae,
                         initial_sae, read_config_dict, save_weights)
from ..saes.switch import SwitchSAE, dispatch, experts_forward, inverse_permutation, load_balancing_loss
from ..saes.topk import unit_rows
from .comm import (DistContext, DistributedConfigError, all_gather_object, all_reduce_, all_to_all,
                   all_to_all_raw, barrier, exchange_counts)

SHARD_FILE = "shard.json"
FULL_INIT_MAX_PARAMS = 2**28  # build the whole SAE and slice it (identical to train_sae's init) below this
RANK_DIR = "rank_{:05d}"


def check_expert_parallel(cfg: SAEConfig, world_size: int) -> int:
    """-> experts per rank L = N / P, or a DistributedConfigError saying what to change."""
    if cfg.arch != "switch":
        raise DistributedConfigError(f"expert parallelism needs arch='switch' (got {cfg.arch!r}); "
                                     "use data parallelism (expert_parallel=False) for other SAEs")
    if cfg.n_experts % world_size:
        fits = [p for p in range(1, cfg.n_experts + 1) if cfg.n_experts % p == 0]
        raise DistributedConfigError(
            f"n_experts={cfg.n_experts} does not divide across {world_size} ranks: every rank must own the same "
            f"number of experts. Use a number of processes in {fits}, or n_experts a multiple of {world_size}")
    if cfg.global_topk or cfg.feature_scaling:
        raise DistributedConfigError(
            "the Scale SAE options (global_topk, feature_scaling) are not implemented for expert parallelism: the "
            "global TopK needs all routed experts' pre-activations of an input on one rank, feature scaling a "
            "per-expert mean; use data parallelism (expert_parallel=False)")
    if cfg.auxk_coeff > 0 and (cfg.top_e > 1 or cfg.shared_expert):
        raise DistributedConfigError(
            "AuxK (auxk_coeff > 0) with expert parallelism needs top_e=1 and no shared expert: a single process "
            "picks the dead latents among ALL experts an input used, which live on different ranks here; "
            "use data parallelism for that combination")
    return cfg.n_experts // world_size


def global_expert_load(ctx: DistContext, experts_BE: Tensor, n_experts: int) -> Tensor:
    """(N,) f over the global batch: the mean of the ranks' f (every rank holds the same number of rows)."""
    f_N = metrics.expert_load(experts_BE, n_experts)
    return all_reduce_(ctx, f_N, "expert-load all-reduce") / ctx.world_size


class SwitchShard(SwitchSAE):
    """Rank r's part of a Switch SAE: W_enc, W_dec (L, M/N, D) for experts r L ... (r+1) L - 1, and
    the replicated W_router (N, D), b_router (D), b_pre (D). A shared expert (cfg.shared_expert) is
    replicated: every rank holds it as local expert L (W_enc/W_dec then have L + 1 experts) and runs
    its own rows through it; its gradient is all-reduced like the router's. Inherits `route`, `losses` and the decoder
    upkeep from SwitchSAE (they act on whatever experts the module holds); `forward` routes across ranks."""

    def __init__(self, cfg: SAEConfig, ctx: DistContext, W_enc_LWD: Tensor, W_dec_LWD: Tensor,
                 W_router_ND: Tensor, b_router_D: Tensor, b_pre_D: Tensor):
        BaseSAE.__init__(self, cfg)  # not SwitchSAE.__init__: it would allocate all N experts
        self.n_local = check_expert_parallel(cfg, ctx.world_size)
        self.ctx = ctx
        self.first_expert = ctx.rank * self.n_local
        self.W_enc = nn.Parameter(W_enc_LWD)
        self.W_dec = nn.Parameter(W_dec_LWD)
        self.W_router = nn.Parameter(W_router_ND)
        self.b_router = nn.Parameter(b_router_D)
        self.b_pre = nn.Parameter(b_pre_D)
        self.fired_local: Optional[Tensor] = None  # (L * M/N,) bool: local features fired in the last forward
        self.received: Optional[dict] = None  # what the last forward's AuxK term needs (owner side)

    @property
    def n_stacked(self) -> int:
        return self.n_local + int(self.cfg.shared_expert)

    def split_tensors(self, of) -> tuple[list[Tensor], list[Tensor]]:
        """(replicated, sharded) views `of(p)` (p.data or p.grad): the router, biases and the shared
        expert's slice are replicated; the routed experts' slices are this rank's own."""
        L = self.n_local
        replicated = [of(p) for p in (self.W_router, self.b_router, self.b_pre)]
        sharded = []
        for p in (self.W_enc, self.W_dec):
            t = of(p)
            if t is not None:
                sharded.append(t[:L])
                replicated.append(t[L:] if self.cfg.shared_expert else None)
        return [t for t in replicated if t is not None], sharded

    def forward(self, x_BD: Tensor, fast: bool | None = None) -> SwitchOutput:
        ctx, W = self.ctx, self.cfg.expert_width
        x_BD = self.check_input(x_BD)
        B, D = x_BD.shape
        probs_BN, experts_BE, gate_BE = self.route(x_BD)
        aux = load_balancing_loss(probs_BN, experts_BE, global_expert_load(ctx, experts_BE, self.cfg.n_experts))
        # 2. assignments sorted by expert id, hence by owning rank; tell every rank how many rows come
        sent = dispatch(experts_BE, self.cfg.n_experts)
        expert_T = experts_BE.reshape(-1)[sent.order_T]
        send = torch.bincount(expert_T // self.n_local, minlength=ctx.world_size)
        recv = exchange_counts(ctx, send)
        send, recv = send.tolist(), recv.tolist()
        xc_BD = x_BD - self.b_pre
        x_recv_TD = all_to_all(ctx, xc_BD[sent.input_T], recv, send, "expert dispatch")
        local_T = all_to_all_raw(ctx, expert_T, recv, send, "expert ids") - self.first_expert
        # 3. the received rows grouped by local expert (then this rank's own rows for the shared expert,
        #    group L) through the local stack in one grouped matmul
        mine = dispatch(local_T[:, None], self.n_local)
        rows_TD, sizes_G = x_recv_TD[mine.order_T], mine.group_sizes_G
        if self.cfg.shared_expert:
            rows_TD = torch.cat([rows_TD, xc_BD])
            sizes_G = torch.cat([sizes_G, sizes_G.new_tensor([B])])
        ex = experts_forward(rows_TD, sizes_G, self.W_enc, self.W_dec, self.cfg.k, fast)
        T = x_recv_TD.shape[0]
        self.fired_local = metrics.fired_features(ex.acts_TK[:T].detach(), ex.ids_TK[:T], self.n_local * W)
        if self.cfg.auxk_coeff > 0:  # the owner-side inputs of the AuxK term (see `losses`)
            self.received = {"send": send, "recv": recv, "input_T": sent.input_T, "order_T": mine.order_T,
                             "xc_TD": rows_TD[:T], "pre_TW": ex.pre_TW[:T], "groups_G": mine.group_sizes_G}
        back_T = inverse_permutation(mine.order_T)  # received order again
        y_TD = all_to_all(ctx, ex.out_TD[:T][back_T], send, recv, "expert combine")
        with torch.no_grad():  # latents travel back for metrics only (L0, firing on the origin)
            acts_TK = all_to_all_raw(ctx, ex.acts_TK[:T].detach()[back_T], send, recv, "latent values")
            ids_TK = all_to_all_raw(ctx, ex.ids_TK[:T][back_T] + self.first_expert * W, send, recv, "latent ids")
        # 4. combine as SwitchSAE.forward does (routed experts, then the shared one)
        gate_T = gate_BE.reshape(-1)[sent.order_T]
        x_hat_BD = torch.index_add(self.b_pre.expand(B, D), 0, sent.input_T, y_TD * gate_T[:, None])
        inverse_T = inverse_permutation(sent.order_T)
        acts_BK, ids_BK = acts_TK[inverse_T].reshape(B, -1), ids_TK[inverse_T].reshape(B, -1)
        if self.cfg.shared_expert:  # shared features have the global ids M ... M + M/N - 1
            x_hat_BD = x_hat_BD + ex.out_TD[T:]
            acts_BK = torch.cat([acts_BK, ex.acts_TK[T:].detach()], 1)
            ids_BK = torch.cat([ids_BK, ex.ids_TK[T:] + (self.cfg.n_experts - self.n_local) * W], 1)
        return SwitchOutput(x_hat_BD, acts_BK, ids_BK, experts_BE, probs_BN, aux, None)

    def losses(self, x_BD: Tensor, out: SwitchOutput, dead_mask_F: Tensor | None = None) -> dict[str, Tensor]:
        """SwitchSAE's terms; AuxK (top_e = 1) is computed where the pre-activations are, on the owner.

        The residuals e = x - x_hat (no gradient) travel to the owners, which call `base.auxk_loss` on the
        rows they received with their own dead mask (`dead_mask_F` is this rank's local tracker's). Like
        data parallelism's AuxK, each owner's ratio is rescaled by P * sum_owner |e|^2 / sum_all |e|^2, so
        the mean over ranks is the single-process ratio over the global batch."""
        terms = SwitchSAE.losses(self, x_BD, out, None)
        if self.cfg.auxk_coeff > 0 and dead_mask_F is not None:
            terms["auxk"] = self.cfg.auxk_coeff * self._auxk_term(x_BD, out.x_hat, dead_mask_F)
        return terms

    def _auxk_term(self, x_BD: Tensor, x_hat_BD: Tensor, dead_mask_F: Tensor) -> Tensor:
        r, ctx, W, D = self.received, self.ctx, self.cfg.expert_width, self.cfg.d_in
        e_BD = (x_BD.to(x_hat_BD.dtype) - x_hat_BD).detach()
        e_TD = all_to_all_raw(ctx, e_BD[r["input_T"]], r["recv"], r["send"], "AuxK residuals")[r["order_T"]]
        group_T = torch.repeat_interleave(torch.arange(self.n_local, device=e_TD.device), r["groups_G"],
                                          output_size=e_TD.shape[0])
        ids_TW = group_T[:, None] * W + torch.arange(W, device=e_TD.device)  # local feature id of each pre-act
        ratio = auxk_loss(e_TD, torch.zeros_like(e_TD), r["xc_TD"], r["pre_TW"], ids_TW, dead_mask_F.bool(),
                          self.W_enc.reshape(-1, D), self.W_dec.reshape(-1, D), self.cfg.auxk_k)
        with torch.no_grad():
            local_sq = e_TD.pow(2).sum().reshape(1)
            total_sq = all_reduce_(ctx, local_sq.clone(), "AuxK normaliser all-reduce")
            scale = ctx.world_size * local_sq / total_sq.clamp_min(torch.finfo(total_sq.dtype).tiny)
        self.received = None
        return ratio * scale[0]

    # --- checkpoint: this rank's part, in the project's weights + config format ------------------------
    def save(self, directory: str | Path) -> Path:
        directory = save_weights(self, self.cfg, directory, fmt="switch-sae-shard/1")
        shard = {"rank": self.ctx.rank, "world_size": self.ctx.world_size, "first_expert": self.first_expert,
                 "n_local_experts": self.n_local}
        (directory / SHARD_FILE).write_text(json.dumps(shard, indent=2) + "\n")
        return directory


# --- building the shards ---------------------------------------------------------------------------------
def shard_switch_sae(sae: SwitchSAE, ctx: DistContext) -> SwitchShard:
    """This rank's part of a whole Switch SAE (copies)."""
    L = check_expert_parallel(sae.cfg, ctx.world_size)
    mine = list(range(ctx.rank * L, (ctx.rank + 1) * L)) + ([sae.cfg.n_experts] if sae.cfg.shared_expert else [])
    return SwitchShard(sae.cfg, ctx, sae.W_enc.detach()[mine].clone(), sae.W_dec.detach()[mine].clone(),
                       sae.W_router.detach().clone(), sae.b_router.detach().clone(), sae.b_pre.detach().clone())


def init_shard(cfg: SAEConfig, ctx: DistContext, seed: int) -> SwitchShard:
    """This rank's experts initialised on their own (for SAEs too large to build whole anywhere).

    Same distributions as SwitchSAE's init; the experts' random draws depend on (seed, rank), so the
    result differs from a single-process init. The router is broadcast from rank 0 later."""
    L = check_expert_parallel(cfg, ctx.world_size)
    torch.manual_seed(seed)
    router_src = SwitchSAE(cfg.replace(n_features=cfg.n_experts * cfg.k))  # minimal width: only its router is used
    torch.manual_seed(seed * 1_000_003 + ctx.rank + 1)
    dt = getattr(torch, cfg.dtype)
    W_dec = unit_rows((L + int(cfg.shared_expert), cfg.expert_width, cfg.d_in), dt)  # shared one: broadcast later
    return SwitchShard(cfg, ctx, W_dec.clone(), W_dec, router_src.W_router.detach().clone(),
                       torch.zeros(cfg.d_in, dtype=dt), torch.zeros(cfg.d_in, dtype=dt))


def build_expert_parallel(sae_or_cfg: SwitchSAE | SAEConfig, train_cfg: TrainConfig, ctx: DistContext):
    """The DistributedRun of an expert-parallel Switch SAE (from a whole SAE, or a config)."""
    from .trainer import DistributedRun

    if isinstance(sae_or_cfg, SAEConfig):
        cfg = sae_or_cfg
        check_expert_parallel(cfg, ctx.world_size)
        if 2 * cfg.n_features * cfg.d_in <= FULL_INIT_MAX_PARAMS:
            shard = shard_switch_sae(initial_sae(cfg, train_cfg.seed), ctx)  # identical to a single-process init
        else:
            shard = init_shard(cfg, ctx, train_cfg.seed)
    else:
        shard = shard_switch_sae(sae_or_cfg, ctx)
    shard = shard.to(ctx.device)
    optimizer = single.make_optimizer(shard, train_cfg)  # Adam state is created here, beside its experts
    tracker = metrics.DeadFeatureTracker(shard.n_local * shard.cfg.expert_width, train_cfg.dead_window_tokens,
                                         ctx.device)
    return DistributedRun(ctx, shard, optimizer, tracker, expert_parallel=True)


def update_local_tracker(run, n_tokens: int) -> None:
    """Each rank counts its own experts' features: no communication, and no (M,) vector anywhere."""
    run.tracker.record(run.sae.fired_local, n_tokens)


# --- sharded checkpoints ------------------------------------------------------------------------------
def rank_root(checkpoint_dir: str | Path, rank: int) -> Path:
    return Path(checkpoint_dir) / RANK_DIR.format(rank)


def save_sharded(run, train_cfg: TrainConfig, step: int) -> Path:
    """Every rank writes its step folder (checkpoint.save_checkpoint's format); old steps are pruned only
    after every rank has finished, so a crash never leaves a step that some rank lacks as the latest."""
    ctx = run.ctx
    path = checkpoint.save_checkpoint(rank_root(train_cfg.checkpoint_dir, ctx.rank), step, run.sae, run.optimizer,
                                  run.tracker, train_cfg, keep=0)
    barrier(ctx, "checkpoint barrier")
    keep = train_cfg.checkpoint_keep
    for old in checkpoint.list_checkpoints(path.parent)[:-keep] if keep > 0 else []:
        import shutil

        shutil.rmtree(old, ignore_errors=True)
    return path


def complete_steps(checkpoint_dir: str | Path) -> tuple[int, list[int]]:
    """-> (world size, steps that every rank's folder holds), from what is on disk."""
    root = Path(checkpoint_dir)
    ranks = sorted(p for p in root.glob("rank_*") if p.is_dir())
    if not ranks:
        raise CheckpointError(f"{root} holds no sharded checkpoint (no rank_* folders)")
    steps = None
    for r in ranks:
        found = {int(p.name.split("_")[1]) for p in checkpoint.list_checkpoints(r)}
        steps = found if steps is None else steps & found
    world = json.loads((checkpoint.list_checkpoints(ranks[0])[-1] / SHARD_FILE).read_text())["world_size"] \
        if checkpoint.list_checkpoints(ranks[0]) else len(ranks)
    if len(ranks) != world:
        raise CheckpointError(f"{root}: {len(ranks)} rank folders but the shards were written by {world} ranks")
    return world, sorted(steps or [])


def resume_sharded(run, train_cfg: TrainConfig) -> int:
    """Restore this rank's shard, Adam state, dead-feature counts and RNG from the newest step that
    every rank saved; 0 when there is none yet."""
    from safetensors.torch import load_file

    ctx, root = run.ctx, Path(train_cfg.checkpoint_dir)
    if not any(root.glob("rank_*")):
        return 0
    world, steps = complete_steps(root)
    if world != ctx.world_size:
        raise CheckpointError(f"{root} was written by {world} ranks, this job has {ctx.world_size}: resume with "
                              f"the same number of processes (or load_sharded() it and start a new run)")
    agreed = all_gather_object(ctx, steps[-1] if steps else 0, "resume step agreement")
    if len(set(agreed)) != 1:
        raise CheckpointError(f"ranks see different checkpoints in {root}: {agreed} (not a shared filesystem?)")
    if not steps:
        return 0
    directory = rank_root(root, ctx.rank) / f"step_{steps[-1]:08d}"
    trainer = checkpoint.load_trainer_state(directory)
    checkpoint.check_resume_config(trainer.train_cfg, train_cfg, directory)
    saved_cfg = SAEConfig.from_dict(read_config_dict(directory / CONFIG_FILE))
    if saved_cfg != run.sae.cfg:
        raise CheckpointError(f"cannot resume from {directory}: its SAEConfig {saved_cfg} differs from {run.sae.cfg}")
    try:
        run.sae.load_state_dict(load_file(str(directory / WEIGHTS_FILE), device=str(ctx.device)))
        run.optimizer.load_state_dict(trainer.optimizer_state)
        run.tracker.load_state_dict({k.removeprefix("tracker."): v for k, v in trainer.tensors.items()
                                     if k.startswith("tracker.")})
    except (ValueError, KeyError, RuntimeError) as e:
        raise CheckpointError(f"{directory}: shard does not fit this rank's SAE: {e}") from None
    checkpoint.set_rng_state(trainer.tensors)
    return trainer.step


def load_sharded(checkpoint_dir: str | Path, step: Optional[int] = None, device: str = "cpu") -> SwitchSAE:
    """One whole SwitchSAE from an expert-parallel run's checkpoint folder (newest complete step, or
    `step`), in a single process: for analysis, evaluation, or `sae.save()` in the ordinary format."""
    from safetensors.torch import load_file

    world, steps = complete_steps(checkpoint_dir)
    if not steps or (step is not None and step not in steps):
        raise CheckpointError(f"{checkpoint_dir}: no step {'saved by every rank' if step is None else step} "
                              f"(complete steps: {steps})")
    step = steps[-1] if step is None else step
    dirs = [rank_root(checkpoint_dir, r) / f"step_{step:08d}" for r in range(world)]
    cfg = SAEConfig.from_dict(read_config_dict(dirs[0] / CONFIG_FILE))
    shards = [load_file(str(d / WEIGHTS_FILE), device=device) for d in dirs]
    with torch.device("meta"):  # no memory or random init for weights about to be replaced
        sae = build_sae(cfg)
    state = {k: shards[0][k] for k in ("W_router", "b_router", "b_pre")}
    L = cfg.n_experts // world
    for name in ("W_enc", "W_dec"):  # routed experts rank by rank, then the (replicated) shared expert
        state[name] = torch.cat([s[name][:L] for s in shards] + [shards[0][name][L:]])
    expected = {k: tuple(v.shape) for k, v in sae.state_dict().items()}
    if expected != {k: tuple(v.shape) for k, v in state.items()}:
        raise CheckpointError(f"{checkpoint_dir}: the shards do not assemble into the SAE of config.json")
    sae.load_state_dict(state, assign=True)
    return sae
