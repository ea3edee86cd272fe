"""The library's deliberate errors: one base class, so a caller (the CLI) can tell a problem the user can fix
(a one-line message naming the problem and the fix) from a bug (a traceback).

Every error switch_sae_core raises on purpose derives from `SwitchSAEError` (ConfigError, TrainingError,
RankFailureError, ...). `is_deliberate` also knows the ones whose classes do not derive from it yet.
"""
from __future__ import annotations

import sys


class SwitchSAEError(Exception):
    """Base of every error the library raises on purpose; the message says what is wrong and how to fix it."""


# deliberate errors defined in modules that do not derive them from SwitchSAEError yet: module -> class names.
# Looked up only when their module is loaded (if it is not, one of its errors cannot be in flight), so
# `is_deliberate` never imports torch.
_NOT_YET_DERIVED = {
    "switch_sae_core.saes.base": ("CheckpointError", "SAEInputError"),
    "switch_sae_core.data.text": ("DataUnavailableError",),
    "switch_sae_core.data.lm": ("ModelUnavailableError",),
    "switch_sae_core.data.store": ("ExtractionError",),
    "switch_sae_core.interop.sae_lens": ("InteropError",),
}


def is_deliberate(error: BaseException) -> bool:
    """True if `error` is one the library raised on purpose (its message is meant for the user)."""
    if isinstance(error, SwitchSAEError):
        return True
    for module_name, class_names in _NOT_YET_DERIVED.items():
        module = sys.modules.get(module_name)
        if module is not None and isinstance(error, tuple(getattr(module, n) for n in class_names)):
            return True
    return False
