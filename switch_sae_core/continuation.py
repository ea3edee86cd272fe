"""Continuation: a longer run of an SAE starts from the state a shorter run of it left at its decay start.

Runs of one SAE that differ only in `steps` are step for step the same until the shorter one's lr decay begins
(the lr is constant up to there, and the batches depend on the seed and the step only). So:
- a run with `TrainConfig.decay_checkpoint_dir` saves its state before the decay's first step there:
  `DecayCheckpoint`, a trainer step callback that `train.train_sae` hands to the loop (the loop itself knows
  nothing of continuation);
- a longer run finds the states it passes through unchanged (`continuation_points`) and copies one into its own
  checkpoint folder (`copy_checkpoint`), from where an ordinary resume continues: it ends exactly where a run from
  scratch does.
`cache.py` keeps the log and held-out curve up to that step beside the checkpoint, and uses both halves.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional

import torch

from . import durable, metrics
from .checkpoint import TRAINER_STATE_FILE, check_resume_config, checkpoint_step, list_checkpoints, save_checkpoint
from .config import TrainConfig, decay_start
from .saes.base import BaseSAE, CheckpointError


class DecayCheckpoint:
    """Trainer step callback: after step `decay_start(steps, lr_decay_frac)` (the state before the decay's first
    step) saves a checkpoint in `train_cfg.decay_checkpoint_dir` (kept: `keep=0` deletes none), for longer runs of
    this SAE to continue from."""

    def __init__(self, train_cfg: TrainConfig):
        self.train_cfg = train_cfg
        self.at = decay_start(train_cfg.steps, train_cfg.lr_decay_frac)

    @classmethod
    def for_run(cls, train_cfg: TrainConfig) -> Optional["DecayCheckpoint"]:
        """The callback for a run with `train_cfg`, or None: no `decay_checkpoint_dir`, or a run without a
        constant-lr phase or without a decay (it has no state a longer run shares)."""
        callback = cls(train_cfg) if train_cfg.decay_checkpoint_dir else None
        return callback if callback is not None and 0 < callback.at < train_cfg.steps else None

    def __call__(self, done: int, sae: BaseSAE, optimizer: torch.optim.Optimizer,
                 tracker: metrics.DeadFeatureTracker) -> None:
        if done == self.at:
            save_checkpoint(self.train_cfg.decay_checkpoint_dir, done, sae, optimizer, tracker, self.train_cfg, keep=0)


def continuation_points(decay_checkpoint_dir: str | Path, train_cfg: TrainConfig) -> list[Path]:
    """The checkpoints of `decay_checkpoint_dir` (saved by shorter runs of one SAE at their decay start,
    `TrainConfig.decay_checkpoint_dir`) that a run with `train_cfg` passes through unchanged, latest first:
    resuming from one (`copy_checkpoint`) gives exactly the run from scratch.

    A checkpoint at step s of a run of S steps qualifies when that run's TrainConfig equals `train_cfg` but for
    `steps` (and `config.TRAIN_NON_RESULT_FIELDS`) and s is at or before both runs' decay start: up to step s
    the lr was constant in both, and the batches depend on the seed and the step only. Unreadable checkpoints are
    skipped. The folder is meant to hold one SAE's runs (its name is a hash of the SAE and the training); `restore`
    refuses a checkpoint of another SAE."""
    limit = decay_start(train_cfg.steps, train_cfg.lr_decay_frac)
    found = []
    for src in reversed(list_checkpoints(decay_checkpoint_dir)):
        step = checkpoint_step(src)
        if step > limit:
            continue
        try:
            saved = TrainConfig.from_dict(json.loads((src / TRAINER_STATE_FILE).read_text())["train_config"])
            check_resume_config(saved.replace(steps=train_cfg.steps), train_cfg, src)
        except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError, CheckpointError):
            continue
        if step <= decay_start(saved.steps, saved.lr_decay_frac):
            found.append(src)
    return found


def copy_checkpoint(src: Path, checkpoint_dir: str | Path, train_cfg: TrainConfig) -> Path:
    """Copy checkpoint `src` into `checkpoint_dir` with `train_cfg` as its config (atomically: a kill leaves no
    half-copied checkpoint), so that an ordinary resume continues from it. Returns the copy."""
    root = Path(checkpoint_dir)
    durable.remove_abandoned(root, "step_")
    with durable.atomic_folder(root / src.name) as tmp:
        shutil.rmtree(tmp)
        shutil.copytree(src, tmp)
        state = json.loads((tmp / TRAINER_STATE_FILE).read_text())
        state["train_config"] = train_cfg.to_dict()
        (tmp / TRAINER_STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")
    return root / src.name
