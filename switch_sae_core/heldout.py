"""Held-out evaluation without the language model: the held-out activations, the validation activations
beside them, and an SAE's reconstruction numbers on either (MSE, FVU, L0, the fraction of features that never fired).

The table's `mse` and the sample-efficiency curve's points are both `reconstruction_metrics` on the
same rows (`heldout_activations(source, profile.n_heldout)`), so a curve's last point is the table's
final number. Hyperparameters (the lr search, lr_search.py) are chosen on OTHER rows of the eval split,
`validation_activations`, so that the reported held-out numbers are not those a choice was made on.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from . import metrics
from .config import ConfigError

HELDOUT_SEED = 1_000_003  # batches of a plain BatchSource drawn with this seed serve as held-out data
VALIDATION_SEED = 1_000_033  # ... and with this seed as validation data (synthetic sources)


def heldout_activations(source: Any, n: int) -> torch.Tensor:
    """(n, D) activations never used for training: the store's held-out split if it has one, else a
    batch drawn from the source's stream with a dedicated seed (synthetic sources)."""
    if callable(getattr(source, "eval_activations", None)):
        return source.eval_activations(n)
    return next(iter(source.batches(n, seed=HELDOUT_SEED)))


def validation_activations(source: Any, n: int, n_heldout: int) -> torch.Tensor:
    """(n, D) activations for choosing hyperparameters, never those the results table reports on: a store's first
    n eval rows after the held-out ones (`heldout_activations(source, n_heldout)` = eval rows [0, n_heldout)) whose
    context holds no held-out row (a context cut by the held-out boundary is skipped whole, so no token is shared);
    a source without an eval split (synthetic): a batch of its stream drawn with VALIDATION_SEED.
    Raises ConfigError (one line with the numbers) when the eval split has fewer than n such rows."""
    if not callable(getattr(source, "eval_activations", None)):
        return next(iter(source.batches(n, seed=VALIDATION_SEED)))
    context_R = np.asarray(source.eval_rows[:, 0])
    held = min(n_heldout, len(context_R))
    after_R = held + np.flatnonzero(~np.isin(context_R[held:], context_R[:held]))
    if len(after_R) < n:
        cfg = source.config
        raise ConfigError(
            f"the validation split needs {n} eval rows outside the held-out split's contexts, but the eval split has "
            f"{len(context_R)} rows, the held-out split takes the first {held} and only {len(after_R)} are left: raise "
            f"DataConfig.n_eval_tokens (now {cfg.n_eval_tokens}) or lower Profile.n_validation / n_heldout")
    return source.eval_activations(rows=after_R[:n])


@torch.no_grad()
def reconstruction_metrics(sae: torch.nn.Module, x_BD: torch.Tensor, chunk: int = 4096) -> dict[str, float]:
    """Reconstruction numbers of `sae` on x_BD (B, D) held-out activations, `chunk` rows per forward:
    'mse' (squared error summed over D, mean over B: metrics.mse, the paper's), 'fvu' (metrics.fvu over
    all B rows), 'l0' (mean active latents per row) and 'dead_fraction_heldout' (features that fired on
    none of the B rows). Python floats."""
    sae.eval()
    n_latents = sae.decoder_directions().shape[0]  # M, plus the shared expert's features if there is one
    x_hats, l0s, fired = [], [], torch.zeros(n_latents, dtype=torch.bool)
    for x in x_BD.split(chunk):
        out = sae(x)
        x_hats.append(out.x_hat)
        l0s.append(metrics.l0(out.latent_acts) * x.shape[0])
        fired |= metrics.fired_features(out.latent_acts, out.latent_indices, n_latents).cpu()
    x_hat = torch.cat(x_hats)
    sae.train()
    return {
        "mse": float(metrics.mse(x_BD, x_hat)),
        "fvu": float(metrics.fvu(x_BD, x_hat)),
        "l0": float(sum(l0s) / x_BD.shape[0]),
        "dead_fraction_heldout": float(1.0 - fired.float().mean()),
    }
