"""What training does with the first activations before step 0: the centring biases at their geometric median
(`init_biases`) and a check that their scale suits the lr law and the initialisation (`check_activation_scale`).
"""
from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor

from .errors import TrainingError
from .saes.base import BaseSAE


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

