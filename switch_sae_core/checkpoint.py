"""Trainer checkpoints: save, list, load and validate (the SAE plus optimizer, RNG and dead-feature state).

A checkpoint is a folder `checkpoint_dir/step_XXXXXXXX/`: the SAE in the project format (sae.safetensors +
config.json) plus the trainer state (optimizer.safetensors, trainer_tensors.safetensors,
trainer_state.json). It is written to a temporary folder and renamed, so the latest checkpoint is never
half-written. Loading never unpickles; anything malformed raises `CheckpointError` naming the folder.
A run resumes only with the TrainConfig it was saved with, up to `config.TRAIN_NON_RESULT_FIELDS`.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, NamedTuple, Optional

import torch
from torch import Tensor

from . import durable, metrics
from .config import TRAIN_NON_RESULT_FIELDS, ConfigError, TrainConfig
from .saes.base import BaseSAE, CheckpointError, load_sae

OPTIMIZER_FILE = "optimizer.safetensors"
TRAINER_TENSORS_FILE = "trainer_tensors.safetensors"
TRAINER_STATE_FILE = "trainer_state.json"
CHECKPOINT_PATTERN = re.compile(r"^step_(\d+)$")


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
    """Write `checkpoint_dir/step_<step>/` atomically (`durable.atomic_folder`: a kill or a full disk leaves the
    previous checkpoint as it was and no temporary folder behind); keep only the newest `keep` checkpoints."""
    from safetensors.torch import save_file

    root = Path(checkpoint_dir)
    root.mkdir(parents=True, exist_ok=True)
    durable.remove_abandoned(root, "step_")  # temporary folders of killed writers
    opt_tensors, param_groups = flatten_optimizer_state(optimizer)
    need = 2 * sum(p.numel() * p.element_size() for p in sae.parameters()) + sum(
        t.numel() * t.element_size() for t in opt_tensors.values())
    with durable.atomic_folder(checkpoint_path(root, step), need_bytes=need) as tmp:
        sae.save(tmp)
        save_file(opt_tensors, str(tmp / OPTIMIZER_FILE))
        save_file({**rng_state(), **{f"tracker.{k}": v for k, v in tracker.state_dict().items()}},
                  str(tmp / TRAINER_TENSORS_FILE))
        state = {"format": "switch-sae-trainer/1", "step": step, "train_config": train_cfg.to_dict(),
                 "param_groups": param_groups, "lr": optimizer.param_groups[0]["lr"]}
        (tmp / TRAINER_STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")
    for old in list_checkpoints(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return checkpoint_path(root, step)


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
            if k not in TRAIN_NON_RESULT_FIELDS and v != given.to_dict()[k]}
    if diff:
        raise CheckpointError(f"cannot resume from {where}: TrainConfig differs in {sorted(diff)} "
                              f"(saved vs given: {diff}); use the saved config or another checkpoint_dir")


def read_checkpoint(directory: Path) -> tuple[TrainerState, BaseSAE]:
    """Both halves of a checkpoint, read and checked; CheckpointError if any file is missing, truncated or corrupt."""
    return load_trainer_state(directory), load_sae(directory)


def restore(directory: Path, sae: BaseSAE, optimizer: torch.optim.Optimizer,
            tracker: metrics.DeadFeatureTracker, train_cfg: TrainConfig,
            loaded: Optional[tuple[TrainerState, BaseSAE]] = None) -> int:
    """Load SAE weights and trainer state from `directory` (or its `read_checkpoint`, if given) into live
    objects; returns the step. CheckpointError if it is unreadable or belongs to another run."""
    trainer, saved_sae = loaded or read_checkpoint(directory)
    check_resume_config(trainer.train_cfg, train_cfg, directory)
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


def checkpoint_path(checkpoint_dir: str | Path, step: int) -> Path:
    """The folder of the checkpoint at `step` in `checkpoint_dir`: `step_XXXXXXXX` (`checkpoint_step` reads it)."""
    return Path(checkpoint_dir) / f"step_{step:08d}"


def checkpoint_step(directory: Path) -> int:
    """The step of a checkpoint folder `step_XXXXXXXX`, from its name."""
    m = CHECKPOINT_PATTERN.match(Path(directory).name)
    if m is None:
        raise CheckpointError(f"{directory} is not named step_<number>: not a trainer checkpoint")
    return int(m.group(1))


def resume_step(sae: BaseSAE, optimizer: torch.optim.Optimizer, tracker: metrics.DeadFeatureTracker,
                train_cfg: TrainConfig) -> int:
    """The step to continue from: the latest readable checkpoint's (loaded into the live objects), or 0 if none.

    A checkpoint that cannot be read (truncated, corrupt: `read_checkpoint`) is moved aside to
    `.corrupt_step_XXXXXXXX` and the previous one is used, or step 0 if there is none, saying so in a
    `ResumeWarning`. A readable checkpoint of another run is an error (CheckpointError), not skipped."""
    import warnings

    if not train_cfg.checkpoint_dir:
        raise ConfigError("resume=True needs TrainConfig.checkpoint_dir (where the checkpoints are)")
    found = list_checkpoints(train_cfg.checkpoint_dir)
    while found:
        directory = found.pop()
        try:
            loaded = read_checkpoint(directory)
        except CheckpointError as e:
            aside = directory.with_name(f".corrupt_{directory.name}")
            shutil.rmtree(aside, ignore_errors=True)
            os.replace(directory, aside)
            then = f"resuming from the previous one, {found[-1].name}" if found else "no earlier checkpoint: training starts again from step 0"
            warnings.warn(f"{' '.join(str(e).split())}; moved it aside to {aside.name}; {then}", ResumeWarning, stacklevel=3)
            continue
        return restore(directory, sae, optimizer, tracker, train_cfg, loaded)
    return 0


class ResumeWarning(UserWarning):
    """A checkpoint could not be read, and training resumed from an earlier one (or from step 0)."""
