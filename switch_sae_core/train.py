"""The trainer: init, schedule, step, logging, checkpoint/resume — each in its own small function.

    result = train_sae(SAEConfig(arch="switch", ...), source, TrainConfig(steps=...))

- Biases (`b_pre`, `b_dec`, and the Switch `b_router`) start at the geometric median of the first
  `geometric_median_batch` activations; they are trained independently afterwards.
- lr = `TrainConfig.lr` or Gao et al.'s law 2e-4 / sqrt(M / 2**14); constant, then linear decay to 0
  over the last `lr_decay_frac` of the steps. Adam, gradient clipping, decoder rows kept unit-norm.
- The loss is the sum of `sae.losses(...)`: each SAE owns its objective (incl. Switch's alpha*d*L_aux).
- Checkpoints (`checkpoint_dir/step_XXXXXXX/`): the SAE in the project format (sae.safetensors +
  config.json) plus the trainer state (optimizer.safetensors, trainer_tensors.safetensors,
  trainer_state.json). Written to a temporary folder and renamed, so the latest checkpoint is never
  half-written. Loading never unpickles.
"""
from __future__ import annotations

import itertools
import json
import math
import os
import re
import shutil
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, NamedTuple, Optional, Union

import torch
from torch import Tensor

from . import metrics
from .config import ConfigError, SAEConfig, TrainConfig
from .data.source import BatchSource
from .errors import SwitchSAEError
from .saes.base import BaseSAE, CheckpointError, SAEInputError, build_sae

OPTIMIZER_FILE = "optimizer.safetensors"
TRAINER_TENSORS_FILE = "trainer_tensors.safetensors"
TRAINER_STATE_FILE = "trainer_state.json"
CHECKPOINT_PATTERN = re.compile(r"^step_(\d+)$")
# TrainConfig fields that may change between a run and its resumption without changing the result.
RESUME_FREE_FIELDS = {"device", "log_every", "checkpoint_dir", "checkpoint_every", "checkpoint_keep",
                      "wandb_project", "progress"}


class TrainingError(SwitchSAEError, RuntimeError):
    """Training cannot go on (bad batch, non-finite loss); the message names the step."""


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
def resolve_device(name: str = "auto") -> torch.device:
    """'auto' -> cuda if available, else cpu; anything else is passed to torch.device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={name!r} requested but CUDA is not available; use device='cpu' or 'auto'")
    return device


def autocast_context(device: torch.device, bf16: bool):
    """bf16 autocast on CUDA; on CPU the flag is ignored (with a warning) so one code path runs both."""
    if bf16 and device.type != "cuda":
        warnings.warn("autocast_bf16 only applies on CUDA; training in full precision on " + device.type)
        bf16 = False
    return torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else nullcontext()


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
    return names


# --- schedule ----------------------------------------------------------------------------------------
def base_lr(train_cfg: TrainConfig, n_features: int, expert_width: Optional[int] = None) -> float:
    """TrainConfig.lr, or Gao et al.'s scaling law 2e-4 / sqrt(M / 2**14). M is the total dictionary size
    (the paper and the authors' code), or the expert width M/N when `train_cfg.lr_width == "expert"`
    (not in the paper: a Switch SAE then trains at the lr of a TopK SAE as wide as one expert)."""
    if train_cfg.lr is not None:
        return train_cfg.lr
    width = expert_width if train_cfg.lr_width == "expert" and expert_width else n_features
    return 2e-4 / math.sqrt(width / 2**14)


def lr_factor(step: int, steps: int, decay_frac: float) -> float:
    """Multiplier of the base lr for optimizer step `step` (0-based) of `steps`: 1, then linear to 0.

    The decay covers the last round(decay_frac * steps) steps and would reach 0 at step == steps."""
    decay_steps = round(decay_frac * steps)
    decay_start = steps - decay_steps
    if step < decay_start or decay_steps == 0:
        return 1.0
    return max(0.0, (steps - step) / decay_steps)


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
               grad_norm: Optional[Callable[[], Tensor]] = None) -> StepOutput:
    """Forward, backward, decoder-gradient projection, clipping, Adam step, decoder renormalisation.

    Hooks for distributed training (None = single process): `sync_grads()` runs right after the
    backward (average gradients over ranks); `grad_norm()` returns the global gradient norm to clip by
    (when parameters are sharded, no rank sees all gradients)."""
    with autocast if autocast is not None else nullcontext():
        out = sae(x_BD)
        losses = sae.losses(x_BD, out, dead_mask_M)
        loss = sum(losses.values())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if sync_grads is not None:
        sync_grads()
    sae.remove_parallel_grads()
    if grad_clip > 0:
        clip_gradients(sae, grad_clip, grad_norm)
    optimizer.step()
    sae.normalize_decoder()
    detached = type(out)(*(t.detach() if isinstance(t, Tensor) else t for t in out))
    return StepOutput({k: v.detach() for k, v in losses.items()}, loss.detach(), detached)


def clip_gradients(sae: BaseSAE, max_norm: float, grad_norm: Optional[Callable[[], Tensor]] = None) -> None:
    """Scale all gradients so their global norm is at most max_norm (torch's clip_grad_norm_ rule)."""
    if grad_norm is None:
        torch.nn.utils.clip_grad_norm_(sae.parameters(), max_norm)
        return
    with torch.no_grad():
        coef = (max_norm / (grad_norm() + 1e-6)).clamp(max=1.0)
        for p in sae.parameters():
            if p.grad is not None:
                p.grad.mul_(coef.to(p.grad.device, p.grad.dtype))


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


# --- checkpoints -------------------------------------------------------------------------------------
def flatten_optimizer_state(optimizer: torch.optim.Optimizer) -> tuple[dict[str, Tensor], list[dict[str, Any]]]:
    """Optimizer state -> ({'state.<param>.<name>': tensor}, JSON-able param_groups)."""
    sd = optimizer.state_dict()
    tensors = {}
    for pid, pstate in sd["state"].items():
        for name, value in pstate.items():
            t = value if isinstance(value, Tensor) else torch.tensor(value)
            tensors[f"state.{pid}.{name}"] = t.detach().contiguous().cpu()
    return tensors, sd["param_groups"]


def unflatten_optimizer_state(tensors: dict[str, Tensor], param_groups: list[dict[str, Any]]) -> dict[str, Any]:
    state: dict[int, dict[str, Tensor]] = {}
    for key, t in tensors.items():
        _, pid, name = key.split(".", 2)
        state.setdefault(int(pid), {})[name] = t
    for group in param_groups:
        if "betas" in group:
            group["betas"] = tuple(group["betas"])
    return {"state": state, "param_groups": param_groups}


def rng_state() -> dict[str, Tensor]:
    state = {"rng.cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            state[f"rng.cuda.{i}"] = s
    return state


def set_rng_state(tensors: dict[str, Tensor]) -> None:
    torch.set_rng_state(tensors["rng.cpu"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def save_checkpoint(checkpoint_dir: str | Path, step: int, sae: BaseSAE, optimizer: torch.optim.Optimizer,
                    tracker: metrics.DeadFeatureTracker, train_cfg: TrainConfig, keep: int = 1) -> Path:
    """Write `checkpoint_dir/step_<step>/` atomically; keep only the newest `keep` checkpoints."""
    from safetensors.torch import save_file

    root = Path(checkpoint_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp_step_{step:08d}_{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    sae.save(tmp)
    opt_tensors, param_groups = flatten_optimizer_state(optimizer)
    save_file(opt_tensors, str(tmp / OPTIMIZER_FILE))
    save_file({**rng_state(), **{f"tracker.{k}": v for k, v in tracker.state_dict().items()}},
              str(tmp / TRAINER_TENSORS_FILE))
    state = {"format": "switch-sae-trainer/1", "step": step, "train_config": train_cfg.to_dict(),
             "param_groups": param_groups, "lr": optimizer.param_groups[0]["lr"]}
    (tmp / TRAINER_STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")
    if final.exists():  # re-saving the same step (e.g. a resumed run ending where it was saved)
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(checkpoint_dir: str | Path) -> list[Path]:
    """Complete checkpoints in `checkpoint_dir`, oldest first (temporary folders are ignored)."""
    root = Path(checkpoint_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := CHECKPOINT_PATTERN.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(checkpoint_dir: str | Path) -> Optional[Path]:
    found = list_checkpoints(checkpoint_dir)
    return found[-1] if found else None


class TrainerState(NamedTuple):
    step: int
    train_cfg: TrainConfig
    optimizer_state: dict[str, Any]
    tensors: dict[str, Tensor]
    """RNG states ('rng.*') and dead-tracker state ('tracker.*')."""


def load_trainer_state(directory: str | Path) -> TrainerState:
    """Read the trainer half of a checkpoint; CheckpointError with the reason if anything is off."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    for name in (TRAINER_STATE_FILE, OPTIMIZER_FILE, TRAINER_TENSORS_FILE):
        if not (directory / name).is_file():
            raise CheckpointError(f"{directory} is not a trainer checkpoint: {name} is missing "
                                  "(delete this folder to resume from an earlier checkpoint)")
    try:
        state = json.loads((directory / TRAINER_STATE_FILE).read_text())
        step, cfg_dict, param_groups = state["step"], state["train_config"], state["param_groups"]
        train_cfg = TrainConfig.from_dict(cfg_dict)
        if not isinstance(step, int) or step < 0:
            raise ValueError(f"step={step!r} is not a non-negative integer")
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{directory / TRAINER_STATE_FILE} is corrupt: {type(e).__name__}: {e}") from None
    try:
        opt_tensors = load_file(str(directory / OPTIMIZER_FILE))
        tensors = load_file(str(directory / TRAINER_TENSORS_FILE))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{directory}: trainer tensors are unreadable (truncated or corrupt?): {e}") from None
    if "rng.cpu" not in tensors or not any(k.startswith("tracker.") for k in tensors):
        raise CheckpointError(f"{directory / TRAINER_TENSORS_FILE} lacks the RNG or dead-tracker state")
    try:
        optimizer_state = unflatten_optimizer_state(opt_tensors, param_groups)
    except (ValueError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{directory}: optimizer state is malformed: {e}") from None
    return TrainerState(step, train_cfg, optimizer_state, tensors)


def check_optimizer_state(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """torch's load_state_dict does not compare shapes: a moment tensor of the wrong shape would only
    fail (or broadcast silently) at the next step."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for pid, pstate in state["state"].items():
        if not 0 <= pid < len(params):
            raise ValueError(f"optimizer state for parameter {pid}, but the SAE has {len(params)} parameters")
        for name, t in pstate.items():
            if name != "step" and tuple(t.shape) != tuple(params[pid].shape):
                raise ValueError(f"optimizer state {name} of parameter {pid} has shape {tuple(t.shape)}, "
                                 f"the parameter {tuple(params[pid].shape)}")


def check_resume_config(saved: TrainConfig, given: TrainConfig, where: Path) -> None:
    """A resumed run must be trained as the saved one was (only logging/IO fields may differ)."""
    diff = {k: (v, getattr(given, k)) for k, v in saved.to_dict().items()
            if k not in RESUME_FREE_FIELDS and v != given.to_dict()[k]}
    if diff:
        raise CheckpointError(f"cannot resume from {where}: TrainConfig differs in {sorted(diff)} "
                              f"(saved vs given: {diff}); use the saved config or another checkpoint_dir")


def restore(directory: Path, sae: BaseSAE, optimizer: torch.optim.Optimizer,
            tracker: metrics.DeadFeatureTracker, train_cfg: TrainConfig) -> int:
    """Load SAE weights and trainer state from `directory` into live objects; returns the step."""
    from .saes.base import load_sae

    trainer = load_trainer_state(directory)
    check_resume_config(trainer.train_cfg, train_cfg, directory)
    saved_sae = load_sae(directory)
    if saved_sae.cfg != sae.cfg:
        raise CheckpointError(f"cannot resume from {directory}: its SAEConfig {saved_sae.cfg} differs from {sae.cfg}")
    sae.load_state_dict(saved_sae.state_dict())
    try:
        check_optimizer_state(optimizer, trainer.optimizer_state)
        optimizer.load_state_dict(trainer.optimizer_state)
        tracker.load_state_dict({k.removeprefix("tracker."): v for k, v in trainer.tensors.items()
                                 if k.startswith("tracker.")})
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        raise CheckpointError(f"{directory}: trainer state does not fit this SAE: {e}") from None
    set_rng_state(trainer.tensors)
    return trainer.step


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


# --- the loop ----------------------------------------------------------------------------------------
def train_sae(sae_or_cfg: BaseSAE | SAEConfig, source: Source, train_cfg: TrainConfig, *,
              callback: Optional[Callable[[dict[str, Any]], None]] = None, resume: bool = False) -> TrainResult:
    """Train an SAE on `source` (a BatchSource or any iterable of (B, d) batches).

    resume=True continues from the latest checkpoint in `train_cfg.checkpoint_dir` (weights, Adam,
    schedule, dead-feature counts, RNG); with no checkpoint there yet it starts from scratch.
    `callback(row)` is called with every logged row."""
    device = resolve_device(train_cfg.device)
    if isinstance(sae_or_cfg, SAEConfig):
        torch.manual_seed(train_cfg.seed)
        sae_or_cfg = build_sae(sae_or_cfg)
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
        init_biases(sae, x_ND)
    logger = Logger(train_cfg, sae.cfg, callback)
    last_ckpt = None
    try:
        last_ckpt = run_steps(sae, optimizer, tracker, batch_stream(source, train_cfg, start), start,
                              train_cfg, logger, device)
    finally:
        logger.close()
    if last_ckpt is None and train_cfg.checkpoint_dir:  # resumed a run that had already finished
        last_ckpt = latest_checkpoint(train_cfg.checkpoint_dir)
    return TrainResult(sae, logger.history, train_cfg.steps, last_ckpt)


def resume_step(sae: BaseSAE, optimizer: torch.optim.Optimizer, tracker: metrics.DeadFeatureTracker,
                train_cfg: TrainConfig) -> int:
    if not train_cfg.checkpoint_dir:
        raise ConfigError("resume=True needs TrainConfig.checkpoint_dir (where the checkpoints are)")
    latest = latest_checkpoint(train_cfg.checkpoint_dir)
    return 0 if latest is None else restore(latest, sae, optimizer, tracker, train_cfg)


def run_steps(sae: BaseSAE, optimizer: torch.optim.Optimizer, tracker: metrics.DeadFeatureTracker,
              batches: Iterator[Tensor], start: int, train_cfg: TrainConfig, logger: Logger,
              device: torch.device) -> Optional[Path]:
    """Steps `start` .. `steps - 1`; returns the last checkpoint written."""
    from tqdm.auto import tqdm

    lr0 = base_lr(train_cfg, sae.cfg.n_features, sae.cfg.expert_width)
    autocast = autocast_context(device, train_cfg.autocast_bf16)
    last_ckpt = None
    bar = tqdm(range(start, train_cfg.steps), initial=start, total=train_cfg.steps,
               disable=not train_cfg.progress, desc=f"train {sae.cfg.arch}")
    for step in bar:
        x_BD = next(batches, None)
        if x_BD is None:
            raise TrainingError(f"step {step}: the training source ran out of batches "
                                f"(needs {train_cfg.steps} batches in total)")
        x_BD = x_BD.to(device, non_blocking=True)
        set_lr(optimizer, lr0 * lr_factor(step, train_cfg.steps, train_cfg.lr_decay_frac))
        result = guarded_step(step, sae, optimizer, x_BD, tracker, train_cfg, autocast)
        tracker.update(result.out.latent_acts, result.out.latent_indices)
        done = step + 1
        if train_cfg.checkpoint_dir and (done == train_cfg.steps or
                                         (train_cfg.checkpoint_every and done % train_cfg.checkpoint_every == 0)):
            last_ckpt = save_checkpoint(train_cfg.checkpoint_dir, done, sae, optimizer, tracker, train_cfg,
                                        keep=train_cfg.checkpoint_keep)
        if done % train_cfg.log_every == 0 or done == train_cfg.steps:
            row = {"step": done, "tokens": done * x_BD.shape[0], "lr": optimizer.param_groups[0]["lr"],
                   **step_metrics(x_BD, result, tracker, sae.cfg.n_experts)}
            bar.set_postfix(loss=f"{row['loss']:.4g}", fvu=f"{row['fvu']:.3f}", l0=f"{row['l0']:.1f}")
            logger.log(row)
    return last_ckpt


def guarded_step(step: int, sae: BaseSAE, optimizer: torch.optim.Optimizer, x_BD: Tensor,
                 tracker: metrics.DeadFeatureTracker, train_cfg: TrainConfig, autocast) -> StepOutput:
    """train_step with errors that name the step (bad batch, non-finite loss)."""
    try:
        result = train_step(sae, optimizer, x_BD, dead_mask_M=tracker.dead_mask(),
                            grad_clip=train_cfg.grad_clip, autocast=autocast)
    except SAEInputError as e:
        raise TrainingError(f"step {step}: bad training batch: {e}") from None
    if not torch.isfinite(result.loss):
        raise TrainingError(f"step {step}: the loss is {result.loss.item()} (diverged); "
                            f"terms: { {k: v.item() for k, v in result.losses.items()} }; try a lower lr")
    return result
