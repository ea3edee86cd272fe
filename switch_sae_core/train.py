"""The trainer: init, schedule, step, logging and THE training loop — each in its own small function.

    result = train_sae(SAEConfig(arch="switch", ...), source, TrainConfig(steps=...))

- Biases (`b_pre`, `b_dec`, and the Switch `b_router`) start at the geometric median of the first
  `geometric_median_batch` activations; they are trained independently afterwards.
- lr = `TrainConfig.lr` or Gao et al.'s law 2e-4 / sqrt(M / 2**14); constant, then linear decay to 0
  over the last `lr_decay_frac` of the steps. Adam, gradient clipping, decoder rows kept unit-norm.
- The loss is the sum of `sae.losses(...)`: each SAE owns its objective (incl. Switch's alpha*d*L_aux).
- `run_steps` is the only training loop. What differs across processes (which rows a rank trains on,
  how gradients, norms, dead-feature counts and logged numbers are reduced, who logs and who saves) is a
  `Strategy`; `SingleProcess` is the plain one, `distributed/trainer.py` has the data- and
  expert-parallel ones.
- Checkpoints and resumption live in `checkpoint.py`.
"""
from __future__ import annotations

import itertools
import math
import signal
import threading
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, NamedTuple, Optional, Union

import torch
from torch import Tensor

from . import metrics, runtime
from .checkpoint import checkpoint_path, latest_checkpoint, resume_step, save_checkpoint
from .config import SAEConfig, TrainConfig, decay_start
from .data.source import BatchSource
from .devices import resolve_device
from .optim import fused_step
from .errors import SwitchSAEError
from .saes.base import BaseSAE, SAEInputError, initial_sae


class TrainingError(SwitchSAEError, RuntimeError):
    """Training cannot go on (bad batch, non-finite loss); the message names the step."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) stopped training after a whole step; the message says where the checkpoint is
    (`train_sae(..., resume=True)` with the same TrainConfig continues from it).
    A KeyboardInterrupt, so that code which stops on Ctrl-C still stops; `step` and `checkpoint` (None
    without a checkpoint_dir) are attributes."""

    def __init__(self, message: str, step: int, checkpoint: Optional[Path]):
        super().__init__(message)
        self.step, self.checkpoint = step, checkpoint


class DeferredInterrupt:
    """While training in the main thread, Ctrl-C sets `requested` instead of raising mid-step (an
    interrupted Adam step would leave half-updated weights); the loop stops after the step, saves and
    raises `TrainingInterrupted`. A second Ctrl-C interrupts at once (the handler is restored on the first)."""

    def __init__(self, enabled: bool = True):
        self.requested = False
        self.previous = None
        self.enabled = enabled and threading.current_thread() is threading.main_thread()

    def __enter__(self) -> "DeferredInterrupt":
        if self.enabled and signal.getsignal(signal.SIGINT) not in (signal.SIG_IGN, None):
            self.previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def _handler(self, signum, frame) -> None:
        self.requested = True
        signal.signal(signal.SIGINT, self.previous)

    def __exit__(self, *exc) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


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


# --- initialisation ----------------------------------------------------------------------------------
@torch.no_grad()
def geometric_median(x_ND: Tensor, max_iter: int = 200, tol: float = 1e-7) -> Tensor:
    """(D,) the point minimising sum_n ||x_n - y||, by Weiszfeld's iteration (float64 inside).

    Robust to outliers, unlike the mean; starts from the mean and stops when a step moves y by less
    than `tol` relative to the data's scale."""
    if x_ND.ndim != 2 or x_ND.shape[0] == 0:
        raise ValueError(f"geometric_median expects a non-empty (N, D) tensor, got shape {tuple(x_ND.shape)}")
    if not torch.isfinite(x_ND).all():
        bad = int((~torch.isfinite(x_ND)).any(1).sum())
        raise ValueError(f"geometric_median: {bad} of {x_ND.shape[0]} rows contain NaN or inf; drop them first")
    x = x_ND.double()
    y_D = x.mean(0)
    scale = x.norm(dim=1).mean().clamp_min(1e-30)
    for _ in range(max_iter):
        dist_N = (x - y_D).norm(dim=1).clamp_min(1e-12 * scale)  # a point on y would divide by 0
        w_N = 1.0 / dist_N
        y_new_D = (w_N[:, None] * x).sum(0) / w_N.sum()
        moved = (y_new_D - y_D).norm()
        y_D = y_new_D
        if moved <= tol * scale:
            break
    return y_D.to(x_ND.dtype)


BIAS_NAMES = ("b_pre", "b_dec", "b_router")  # the biases that start at the geometric median


@torch.no_grad()
def init_biases(sae: BaseSAE, x_ND: Tensor) -> list[str]:
    """Set every centring bias the SAE has (b_pre / b_dec / b_router) to the geometric median."""
    median_D = geometric_median(x_ND.float())
    names = [n for n in BIAS_NAMES if isinstance(getattr(sae, n, None), torch.nn.Parameter)]
    for name in names:
        getattr(sae, name).copy_(median_D.to(getattr(sae, name)))
    if callable(getattr(sae, "init_from_activations", None)):  # data-dependent init beyond biases (JumpReLU's scale)
        sae.init_from_activations(x_ND)
    return names


# the per-coordinate RMS of activations (mean ||x|| / sqrt(d)) that the lr law and the initialisation suit: LM
# residual streams are ~1-10 (GPT-2 layer 8 ~3, SmolLM2 layer 20 ~10); far outside, an SAE under-trains silently
SANE_ACTIVATION_RMS = (1e-2, 1e4)
OVERFLOW_SQ_NORM = 1e30  # ||x||^2 above this overflows float32 (3.4e38) once summed over a batch in the loss


def check_activation_scale(x_ND: Tensor) -> float:
    """The mean norm of the activations `x_ND`; TrainingError when their squares would overflow float32 in the
    loss, a warning (with the measured norm and the usual fix) when their scale is far from the sane range."""
    norms_N = x_ND.detach().double().norm(dim=-1)
    mean, d = float(norms_N.mean()), x_ND.shape[-1]
    fix = (f"scale the activations to mean norm sqrt(d) = {math.sqrt(d):.3g} (multiply them by "
           f"{math.sqrt(d) / max(mean, 1e-300):.3g}; the field's usual normalisation, as SAELens's "
           "normalize_activations='expected_average_only_in' and dictionary_learning do)")
    if float(norms_N.max()) ** 2 > OVERFLOW_SQ_NORM:
        raise TrainingError(f"the activations have mean norm {mean:.3g} (largest {float(norms_N.max()):.3g}): their "
                            f"squares overflow float32 in the loss, whatever the lr; {fix}")
    rms = mean / math.sqrt(d)
    if not SANE_ACTIVATION_RMS[0] <= rms <= SANE_ACTIVATION_RMS[1]:
        warnings.warn(f"the activations have mean norm {mean:.3g} (d={d}, per-coordinate RMS {rms:.3g}), far from "
                      f"the {SANE_ACTIVATION_RMS[0]:g}..{SANE_ACTIVATION_RMS[1]:g} RMS the lr law and initialisation "
                      f"suit: the SAE will under-train; {fix}", stacklevel=3)
    return mean


# --- schedule ----------------------------------------------------------------------------------------
def base_lr(train_cfg: TrainConfig, n_features: int, expert_width: Optional[int] = None) -> float:
    """TrainConfig.lr, or Gao et al.'s scaling law 2e-4 / sqrt(M / 2**14). M is the total dictionary size
    (the paper and the authors' code), or the expert width M/N when `train_cfg.lr_width == "expert"`
    (not in the paper: a Switch SAE then trains at the lr of a TopK SAE as wide as one expert), times
    `train_cfg.lr_scale` (1 = the paper)."""
    if train_cfg.lr is not None:
        return train_cfg.lr
    width = expert_width if train_cfg.lr_width == "expert" and expert_width else n_features
    return train_cfg.lr_scale * 2e-4 / math.sqrt(width / 2**14)


def lr_factor(step: int, steps: int, decay_frac: float, warmup_steps: int = 0) -> float:
    """Multiplier of the base lr for optimizer step `step` (0-based) of `steps`: linear from 0 to 1 over the first
    `warmup_steps` ((step + 1) / warmup_steps), 1, then linear to 0.

    The decay covers the last round(decay_frac * steps) steps and would reach 0 at step == steps."""
    warm = warmup_factor(step, warmup_steps)
    start = decay_start(steps, decay_frac)
    if step < start or start == steps:
        return warm
    return warm * max(0.0, (steps - step) / (steps - start))


def warmup_factor(step: int, warmup_steps: int) -> float:
    """min(1, (step + 1) / warmup_steps) for optimizer step `step` (0-based); 1 when warmup_steps == 0."""
    return 1.0 if warmup_steps <= 0 else min(1.0, (step + 1) / warmup_steps)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def make_optimizer(sae: BaseSAE, train_cfg: TrainConfig) -> torch.optim.Adam:
    """Adam; the fused kernel where torch has one (CPU and CUDA, torch >= 2.4): on a 2-core CPU it
    updates a 24576-wide SAE 8x faster than the default per-tensor loop."""
    kwargs = dict(lr=base_lr(train_cfg, sae.cfg.n_features, sae.cfg.expert_width), betas=tuple(train_cfg.adam_betas))
    try:
        return torch.optim.Adam(sae.parameters(), fused=True, **kwargs)
    except (RuntimeError, TypeError, ValueError):  # an older torch or a device without the fused kernel
        return torch.optim.Adam(sae.parameters(), **kwargs)


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


# --- logging -----------------------------------------------------------------------------------------
def step_metrics(x_BD: Tensor, step: StepOutput, tracker: metrics.DeadFeatureTracker,
                 n_experts: int) -> dict[str, Any]:
    """The numbers logged for one step (Python floats; syncs with the device)."""
    out = step.out
    row: dict[str, Any] = {f"loss/{k}": v.item() for k, v in step.losses.items()}
    row["loss"] = step.loss.item()
    row["mse"] = metrics.mse(x_BD, out.x_hat).item()
    row["fvu"] = metrics.fvu(x_BD, out.x_hat).item()
    row["l0"] = metrics.l0(out.latent_acts).item()
    row["dead_frac"] = tracker.dead_fraction().item()
    if hasattr(out, "router_probs"):
        load_N = metrics.expert_load(out.expert_indices, n_experts)
        row["expert_load"] = load_N.tolist()
        row["load_entropy"] = metrics.load_entropy(load_N).item()
        row["router_entropy"] = metrics.router_entropy(out.router_probs).item()
    return row


class Logger:
    """History list + optional callback + optional wandb (imported only when a project is set)."""

    def __init__(self, train_cfg: TrainConfig, sae_cfg: SAEConfig,
                 callback: Optional[Callable[[dict[str, Any]], None]] = None):
        self.history: list[dict[str, Any]] = []
        self.callback = callback
        self.wandb_run = None
        if train_cfg.wandb_project:
            try:
                import wandb
            except ImportError:
                warnings.warn("wandb_project is set but wandb is not installed: logging to history only")
            else:
                self.wandb_run = wandb.init(project=train_cfg.wandb_project,
                                            config={"sae": sae_cfg.to_dict(), "train": train_cfg.to_dict()})

    def log(self, row: dict[str, Any]) -> None:
        self.history.append(row)
        if self.callback is not None:
            self.callback(row)
        if self.wandb_run is not None:
            flat = {k: v for k, v in row.items() if not isinstance(v, list)}
            for k, v in row.items():
                if isinstance(v, list):
                    flat.update({f"{k}/{i}": x for i, x in enumerate(v)})
            self.wandb_run.log(flat, step=row["step"])

    def close(self) -> None:
        if self.wandb_run is not None:
            self.wandb_run.finish()


# --- data --------------------------------------------------------------------------------------------
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


class Smoothed:
    """Exponential moving averages of the per-batch numbers the progress bar shows (they jump per batch).

    ema <- beta * ema + (1 - beta) * value, bias-corrected by 1 - beta^n (Adam's rule, Kingma & Ba 2015)."""

    def __init__(self, beta: float = 0.9):
        self.beta, self.n, self.ema = beta, 0, {}

    def update(self, row: dict[str, Any], names: Iterable[str] = ("loss", "fvu", "l0")) -> dict[str, str]:
        self.n += 1
        for k in names:
            self.ema[k] = self.beta * self.ema.get(k, 0.0) + (1 - self.beta) * row[k]
        corr = 1 - self.beta ** self.n
        return {f"{k} (ema)": f"{v / corr:.4g}" for k, v in self.ema.items()}


# --- the loop ----------------------------------------------------------------------------------------
def train_sae(sae_or_cfg: BaseSAE | SAEConfig, source: Source, train_cfg: TrainConfig, *,
              callback: Optional[Callable[[dict[str, Any]], None]] = None, resume: bool = False) -> TrainResult:
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
    `callback(row)` is called with every logged row. While it trains, `runtime.training_process` applies:
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
    last_ckpt = None
    try:
        with runtime.training_process(device):  # allocator + one CPU thread (SWITCH_SAE_THREADS overrides)
            last_ckpt = run_steps(sae, optimizer, tracker, batch_stream(source, train_cfg, start), start,
                                  train_cfg, logger, device)
    finally:
        logger.close()
    if last_ckpt is None and train_cfg.checkpoint_dir:  # resumed a run that had already finished
        last_ckpt = latest_checkpoint(train_cfg.checkpoint_dir)
    return TrainResult(sae, logger.history, train_cfg.steps, last_ckpt)


def run_steps(sae: BaseSAE, optimizer: torch.optim.Optimizer, tracker: metrics.DeadFeatureTracker,
              batches: Iterator[Tensor], start: int, train_cfg: TrainConfig, logger: Logger,
              device: torch.device, strategy: Optional[Strategy] = None) -> Optional[Path]:
    """Steps `start` .. `steps - 1` of the global batches; returns the last checkpoint written.

    The progress bar shows exponential moving averages of the logged loss, FVU and L0 (labelled
    'ema'); the logged rows keep the per-batch values."""
    from tqdm.auto import tqdm

    strategy = strategy or SingleProcess()
    lr0 = base_lr(train_cfg, sae.cfg.n_features, sae.cfg.expert_width)
    autocast = autocast_context(device, train_cfg.autocast_bf16)
    last_ckpt, smoothed = None, Smoothed()
    # the state before the decay's first step, which a longer run of this SAE shares (single process only; a run
    # without a constant-lr phase or without a decay has no such state)
    branch_at = decay_start(train_cfg.steps, train_cfg.lr_decay_frac)
    if not (train_cfg.decay_checkpoint_dir and isinstance(strategy, SingleProcess) and 0 < branch_at < train_cfg.steps):
        branch_at = None
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
            if done == branch_at:
                save_checkpoint(train_cfg.decay_checkpoint_dir, done, sae, optimizer, tracker, train_cfg, keep=0)
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
