"""Held-out evaluation without the language model: the held-out activations, and an SAE's
reconstruction numbers on them (MSE, FVU, L0, the fraction of features that never fired).

The table's `mse` and the sample-efficiency curve's points are both `reconstruction_metrics` on the
same rows (`heldout_activations(source, profile.n_heldout)`), so a curve's last point is the table's
final number.
"""
from __future__ import annotations

from typing import Any

import torch

from . import metrics

HELDOUT_SEED = 1_000_003  # batches of a plain BatchSource drawn with this seed serve as held-out data


def heldout_activations(source: Any, n: int) -> torch.Tensor:
    """(n, D) activations never used for training: the store's held-out split if it has one, else a
    batch drawn from the source's stream with a dedicated seed (synthetic sources)."""
    if callable(getattr(source, "eval_activations", None)):
        return source.eval_activations(n)
    return next(iter(source.batches(n, seed=HELDOUT_SEED)))


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
