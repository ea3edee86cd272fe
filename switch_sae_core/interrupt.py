"""Ctrl-C during training: finish the step, save, then stop (`DeferredInterrupt`, `TrainingInterrupted`).

An interrupted Adam step would leave half-updated weights; the loop (`train.run_steps`) asks `requested` after
each whole step instead.
"""
from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Optional


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

