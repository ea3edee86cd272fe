"""The trainer: THE training loop (`run_steps`), the step it repeats, and `train_sae`, which sets a run up.

    result = train_sae(SAEConfig(arch="switch", ...), source, TrainConfig(steps=...))

- Before step 0 the biases start at the geometric median of the first activations (`initialisation.py`).
- The lr follows `schedule.py` (Gao et al.'s law, warm-up, constant, linear decay); Adam, gradient clipping,
  decoder rows kept unit-norm (`optim.py`).
- The loss is the sum of `sae.losses(...)`: each SAE owns its objective (incl. Switch's alpha*d*L_aux).
- What is logged and where: `training_log.py`; Ctrl-C: `interrupt.py`; checkpoints and resumption: `checkpoint.py`.
- `run_steps` is the only training loop. What differs across processes (which rows a rank trains on,
  how gradients, norms, dead-feature counts and logged numbers are reduced, who logs and who saves) is a
  `Strategy`; `SingleProcess` is the plain one, `distributed/trainer.py` has the data- and
  expert-parallel ones. Anything else done after a step is a step callback the loop calls without knowing
  what it does (`continuation.DecayCheckpoint`, the state a longer run continues from).
"""
from __future__ import annotations

import itertools
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, NamedTuple, Optional, Sequence, Union

import torch
from torch import Tensor

from . import metrics, runtime
from .checkpoint import checkpoint_path, latest_checkpoint, resume_step, save_checkpoint
from .config import SAEConfig, TrainConfig
from .continuation import DecayCheckpoint
from .data.source import BatchSource
from .devices import resolve_device
from .errors import TrainingError
from .initialisation import (BIAS_NAMES, OVERFLOW_SQ_NORM, SANE_ACTIVATION_RMS,  # noqa: F401 (re-exported)
                             check_activation_scale, geometric_median, init_biases)
from .interrupt import DeferredInterrupt, TrainingInterrupted
from .optim import fused_step
from .saes.base import BaseSAE, SAEInputError, initial_sae
from .schedule import base_lr, lr_factor, make_optimizer, set_lr, warmup_factor  # noqa: F401 (re-exported)
from .training_log import Logger, Smoothed, step_metrics  # noqa: F401 (re-exported)

# after each step, `callback(done, sae, optimizer, tracker)` (done = steps finished): what a run adds to the loop
StepCallback = Callable[[int, BaseSAE, torch.optim.Optimizer, metrics.DeadFeatureTracker], None]


class TrainResult(NamedTuple):
    sae: BaseSAE
    """The trained SAE (on the training device)."""
    history: list[dict[str, Any]]
    """One dict per logged step: losses, total loss, L0, FVU, MSE, dead fraction, lr, (Switch) load."""
    steps_done: int
    """Optimizer steps taken in total (including those before a resume)."""
    checkpoint: Optional[Path]
    """The last checkpoint written (None without a checkpoint_dir)."""


# --- devices -----------------------------------------------------------------------------------------
AUTOCAST_DEVICES = ("cuda", "cpu")  # device types whose bf16 autocast the tests run (CPU) or the GPU script (CUDA)


def autocast_context(device: torch.device, bf16: bool):
    """bf16 autocast on `device` (CUDA or CPU: one code path, so the CPU tests run the GPU's dtypes), or a no-op.

    Under it the matmuls run in bf16 (fp32 accumulation); the weights, their gradients and Adam's state stay
    fp32 (autocast casts copies), and every loss term is fp32 (tests/test_precision.py). Another device type
    trains in full precision with a warning."""
    if bf16 and device.type not in AUTOCAST_DEVICES:
        warnings.warn(f"autocast_bf16 applies on {' and '.join(AUTOCAST_DEVICES)}; training in full precision "
                      f"on {device.type}")
        bf16 = False
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()


# --- one step ----------------------------------------------------------------------------------------
class StepOutput(NamedTuple):
    losses: dict[str, Tensor]
    """The SAE's named loss terms (detached)."""
    loss: Tensor
    """() their sum, the optimised loss (detached)."""
    out: Any
    """The SAE's forward output (SAEOutput or SwitchOutput), detached."""


def train_step(sae: BaseSAE, optimizer: torch.optim.Optimizer, x_BD: Tensor, *,
               dead_mask_M: Optional[Tensor] = None, grad_clip: float = 1.0, autocast=None,
               sync_grads: Optional[Callable[[], None]] = None,
               grad_norm: Optional[Callable[[], Tensor]] = None,
               losses: Optional[Callable[..., dict[str, Tensor]]] = None) -> StepOutput:
    """Forward, backward, decoder-gradient projection, clipping, Adam step, decoder renormalisation.

    Hooks for distributed training (None = single process): `losses(x_BD, out, dead_mask_M)` replaces
    `sae.losses` (the global-batch objective of a data-parallel replica); `sync_grads()` runs right after
    the backward (average gradients over ranks); `grad_norm()` returns the global gradient norm to clip
    by (when parameters are sharded, no rank sees all gradients)."""
    with autocast if autocast is not None else nullcontext():
        out = sae(x_BD)
        losses = (losses or sae.losses)(x_BD, out, dead_mask_M)
        loss = sum(losses.values())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if sync_grads is not None:
        sync_grads()
    fused_step(sae, optimizer, grad_clip, grad_norm)  # projection, clipping, Adam, renormalisation: optim.py
    detached = type(out)(*(t.detach() if isinstance(t, Tensor) else t for t in out))
    return StepOutput({k: v.detach() for k, v in losses.items()}, loss.detach(), detached)

# --- data -------------------------------------------------------------------------------------------
Source = Union[BatchSource, Iterable[Tensor]]


def batch_stream(source: Source, train_cfg: TrainConfig, start: int) -> Iterator[Tensor]:
    """Training batches from step `start` on: a BatchSource is asked for them, an iterator skips."""
    if isinstance(source, BatchSource):
        return source.batches(train_cfg.batch_size, seed=train_cfg.seed, start=start)
    return itertools.islice(iter(source), start, None)


def median_batch(source: Source, train_cfg: TrainConfig) -> tuple[Tensor, Source]:
    """The first `geometric_median_batch` activations, and the source to train on afterwards (for a
    plain iterator, the batches read here are put back in front so none is lost)."""
    n = train_cfg.geometric_median_batch
    if isinstance(source, BatchSource):
        return next(iter(source.batches(n, seed=train_cfg.seed, start=0))), source
    it, taken, rows = iter(source), [], 0
    while rows < n:
        batch = next(it, None)
        if batch is None:
            break
        taken.append(batch)
        rows += batch.shape[0]
    if not taken:
        raise ValueError("the training source yielded no batches")
    return torch.cat(taken)[:n], itertools.chain(taken, it)


# --- what differs across processes ----------------------------------------------------------------------
class Strategy:
    """How the one training loop runs: this base class is a single process; the distributed strategies
    (`distributed/trainer.py`) override what differs. Every method is called by `run_steps` only."""

    rank_label = ""  # appended to error messages: " (rank r)" in a distributed run
    is_main = True  # this process logs

    def local_rows(self, x_BD: Tensor) -> Tensor:
        """The rows of the global batch this process trains on."""
        return x_BD

    losses: Optional[Callable[..., dict[str, Tensor]]] = None  # None = sae.losses
    sync_grads: Optional[Callable[[], None]] = None  # None = nothing to synchronise
    grad_norm: Optional[Callable[[], Tensor]] = None  # None = the local norm is the global one

    def record_firing(self, tracker: metrics.DeadFeatureTracker, out: Any, n_tokens: int) -> None:
        tracker.update(out.latent_acts, out.latent_indices)

    def reduce_row(self, row: dict[str, Any]) -> dict[str, Any]:
        """A logged row as every process agrees on it."""
        return row

    def save(self, step: int, sae: BaseSAE, optimizer: torch.optim.Optimizer,
             tracker: metrics.DeadFeatureTracker, train_cfg: TrainConfig) -> Optional[Path]:
        """Write the checkpoint of `step` (called only when TrainConfig.checkpoint_dir is set)."""
        return save_checkpoint(train_cfg.checkpoint_dir, step, sae, optimizer, tracker, train_cfg,
                               keep=train_cfg.checkpoint_keep)


class SingleProcess(Strategy):
    """Train on every row of every batch, in this process."""


# --- the loop ---------------------------------------------------------------------------------------
def train_sae(sae_or_cfg: BaseSAE | SAEConfig, source: Source, train_cfg: TrainConfig, *,
              callback: Optional[Callable[[dict[str, Any]], None]] = None, resume: bool = False,
              step_callbacks: Sequence[StepCallback] = ()) -> TrainResult:
    """Train an SAE on `source` in this process. `source` is one of:
    - a `BatchSource` (`ActivationStore`, `SyntheticSource`, or `data.source.TensorSource(x_ND)` for an (N, d)
      tensor already in memory): asked for batches of `train_cfg.batch_size`, reproducible, resumable;
    - any iterable of (B, d) tensors (a list, a generator drawing from a simulator): used as it comes, one
      batch per step, so it must yield at least `train_cfg.steps` batches; B is the iterable's (the logged
      token counts use it), and resuming skips the batches already trained on.
    The length is `train_cfg.steps`, or `TrainConfig(tokens=...)` (steps = tokens // batch_size: with an
    iterable, set batch_size to its batches' size).

    resume=True continues from the latest checkpoint in `train_cfg.checkpoint_dir` (weights, Adam,
    schedule, dead-feature counts, RNG); with no checkpoint there yet it starts from scratch.
    `callback(row)` is called with every logged row; each of `step_callbacks` after every step, as
    `(done, sae, optimizer, tracker)` (`TrainConfig.decay_checkpoint_dir` adds `continuation.DecayCheckpoint`).
    While it trains, `runtime.training_process` applies:
    glibc keeps freed memory (SWITCH_SAE_KEEP_FREED_MEMORY=0: not) and, on CPU, one torch thread
    (SWITCH_SAE_THREADS=N or =keep overrides; the previous count is restored at the end).
    Raises TrainingError naming the step on a bad batch or a diverged loss."""
    device = resolve_device(train_cfg.device)
    (sae_or_cfg if isinstance(sae_or_cfg, SAEConfig) else sae_or_cfg.cfg).check_trainable()
    if isinstance(sae_or_cfg, SAEConfig):
        sae_or_cfg = initial_sae(sae_or_cfg, train_cfg.seed)
    sae = sae_or_cfg.to(device)
    optimizer = make_optimizer(sae, train_cfg)
    tracker = metrics.DeadFeatureTracker(sae.n_latents, train_cfg.dead_window_tokens, device)
    start = resume_step(sae, optimizer, tracker, train_cfg) if resume else 0
    if start == 0:
        x_ND, source = median_batch(source, train_cfg)
        try:
            x_ND = sae.check_input(x_ND.to(device))
        except SAEInputError as e:
            raise TrainingError(f"before step 0, the geometric-median batch: {e}") from None
        check_activation_scale(x_ND)
        init_biases(sae, x_ND)
    logger = Logger(train_cfg, sae.cfg, callback)
    decay = [c for c in [DecayCheckpoint.for_run(train_cfg)] if c is not None]
    last_ckpt = None
    try:
        with runtime.training_process(device):  # allocator + one CPU thread (SWITCH_SAE_THREADS overrides)
            last_ckpt = run_steps(sae, optimizer, tracker, batch_stream(source, train_cfg, start), start,
                                  train_cfg, logger, device, step_callbacks=[*step_callbacks, *decay])
    finally:
        logger.close()
    if last_ckpt is None and train_cfg.checkpoint_dir:  # resumed a run that had already finished
        last_ckpt = latest_checkpoint(train_cfg.checkpoint_dir)
    return TrainResult(sae, logger.history, train_cfg.steps, last_ckpt)


def run_steps(sae: BaseSAE, optimizer: torch.optim.Optimizer, tracker: metrics.DeadFeatureTracker,
              batches: Iterator[Tensor], start: int, train_cfg: TrainConfig, logger: Logger,
              device: torch.device, strategy: Optional[Strategy] = None,
              step_callbacks: Sequence[StepCallback] = ()) -> Optional[Path]:
    """Steps `start` .. `steps - 1` of the global batches; returns the last checkpoint written. After each
    step (before its row is logged) every one of `step_callbacks` is called with `(done, sae, optimizer, tracker)`.

    The progress bar shows exponential moving averages of the logged loss, FVU and L0 (labelled
    'ema'); the logged rows keep the per-batch values."""
    from tqdm.auto import tqdm

    strategy = strategy or SingleProcess()
    lr0 = base_lr(train_cfg, sae.cfg.n_features, sae.cfg.expert_width)
    autocast = autocast_context(device, train_cfg.autocast_bf16)
    last_ckpt, smoothed = None, Smoothed()
    bar = tqdm(range(start, train_cfg.steps), initial=start, total=train_cfg.steps,
               disable=not (train_cfg.progress and strategy.is_main), desc=f"train {sae.cfg.arch}")
    with DeferredInterrupt(enabled=isinstance(strategy, SingleProcess)) as interrupt:
        for step in bar:
            x_BD = next(batches, None)
            if x_BD is None:
                raise TrainingError(f"step {step}{strategy.rank_label}: the training source ran out of batches "
                                    f"(needs {train_cfg.steps} batches in total)")
            x_bD = strategy.local_rows(x_BD).to(device, non_blocking=True)
            set_lr(optimizer, lr0 * lr_factor(step, train_cfg.steps, train_cfg.lr_decay_frac, train_cfg.lr_warmup_steps))
            if hasattr(sae, "sparsity_warmup"):  # an SAE whose sparsity coefficient warms up (JumpReLU)
                sae.sparsity_warmup = warmup_factor(step, train_cfg.sparsity_warmup_steps)
            result = guarded_step(step, sae, optimizer, x_bD, tracker, train_cfg, autocast, strategy)
            strategy.record_firing(tracker, result.out, x_BD.shape[0])
            done = step + 1
            for step_callback in step_callbacks:
                step_callback(done, sae, optimizer, tracker)
            if done % train_cfg.log_every == 0 or done == train_cfg.steps:
                row = strategy.reduce_row({"step": done, "tokens": done * x_BD.shape[0],
                                           "lr": optimizer.param_groups[0]["lr"],
                                           **step_metrics(x_bD, result, tracker, sae.cfg.n_experts)})
                bar.set_postfix(smoothed.update(row))
                if strategy.is_main:
                    logger.log(row)
            # after the step's row is logged (and its callback has saved it): a run killed in between resumes from
            # the previous checkpoint and redoes the step, instead of resuming past a row that was never saved
            if train_cfg.checkpoint_dir and (done == train_cfg.steps or
                                             (train_cfg.checkpoint_every and done % train_cfg.checkpoint_every == 0)):
                last_ckpt = strategy.save(done, sae, optimizer, tracker, train_cfg)
            if interrupt.requested:
                bar.close()
                raise _interrupted(done, sae, optimizer, tracker, train_cfg, strategy, last_ckpt)
    return last_ckpt


def _interrupted(done: int, sae: BaseSAE, optimizer: torch.optim.Optimizer, tracker: metrics.DeadFeatureTracker,
                 train_cfg: TrainConfig, strategy: Strategy, last_ckpt: Optional[Path]) -> TrainingInterrupted:
    """Ctrl-C after step `done`: save a checkpoint there (unless one was just written) and say how to resume."""
    where = f"stopped by Ctrl-C after step {done} of {train_cfg.steps}"
    if not train_cfg.checkpoint_dir:
        return TrainingInterrupted(f"{where}; nothing saved (no TrainConfig.checkpoint_dir)", done, None)
    if last_ckpt != checkpoint_path(train_cfg.checkpoint_dir, done):
        last_ckpt = strategy.save(done, sae, optimizer, tracker, train_cfg)
    return TrainingInterrupted(f"{where}; checkpoint saved in {last_ckpt}",
                               done, last_ckpt)


def guarded_step(step: int, sae: BaseSAE, optimizer: torch.optim.Optimizer, x_BD: Tensor,
                 tracker: metrics.DeadFeatureTracker, train_cfg: TrainConfig, autocast,
                 strategy: Optional[Strategy] = None) -> StepOutput:
    """train_step with errors that name the step (and rank): bad batch, non-finite loss."""
    strategy = strategy or SingleProcess()
    try:
        result = train_step(sae, optimizer, x_BD, dead_mask_M=tracker.dead_mask(), grad_clip=train_cfg.grad_clip,
                            autocast=autocast, sync_grads=strategy.sync_grads, grad_norm=strategy.grad_norm,
                            losses=strategy.losses)
    except SAEInputError as e:
        raise TrainingError(f"step {step}{strategy.rank_label}: bad training batch: {e}") from None
    if not torch.isfinite(result.loss):
        raise TrainingError(f"step {step}{strategy.rank_label}: the loss is {result.loss.item()} (diverged); "
                            f"terms: { {k: v.item() for k, v in result.losses.items()} }; try a lower lr")
    return result
