"""The library's deliberate errors: one base class, so a caller (the CLI) can tell a problem the user can fix
(a one-line message naming the problem and the fix) from a bug (a traceback).

Every error switch_sae_core raises on purpose derives from `SwitchSAEError` (ConfigError, TrainingError,
RankFailureError, ...).
"""
from __future__ import annotations


class SwitchSAEError(Exception):
    """Base of every error the library raises on purpose; the message says what is wrong and how to fix it."""


class ModelUnavailableError(SwitchSAEError, RuntimeError):
    """A language model cannot be loaded here (data/lm.py, data/smollm2.py); the message says how to get it."""


class TrainingError(SwitchSAEError, RuntimeError):
    """Training cannot go on (bad batch, non-finite loss); the message names the step."""


def is_deliberate(error: BaseException) -> bool:
    """True if `error` is one the library raised on purpose (its message is meant for the user)."""
    return isinstance(error, SwitchSAEError)
