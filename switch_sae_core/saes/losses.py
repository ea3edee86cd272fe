"""The loss terms more than one SAE shares: the paper's reconstruction loss and Gao et al.'s AuxK term."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..ops import gathered_preacts, sparse_decode


def recon_loss(x_hat_BD: Tensor, x_BD: Tensor) -> Tensor:
    """The paper's reconstruction loss: squared error summed over D, averaged over the batch."""
    return (x_hat_BD - x_BD).pow(2).sum(-1).mean()


def auxk_loss(
    x_BD: Tensor,
    x_hat_BD: Tensor,
    xc_BD: Tensor,
    pre_BP: Tensor,
    ids_BP: Optional[Tensor],
    dead_mask_F: Tensor,
    W_enc_FD: Tensor,
    W_dec_FD: Tensor,
    auxk_k: int,
) -> Tensor:
    """Gao et al.'s AuxK term (unweighted), shared by the TopK and Switch SAEs.

    The residual `e = x - x_hat` (detached) is reconstructed from the top-`auxk_k` DEAD latents
    among the pre-activations each input has, `e_hat = sum_j ReLU(pre_j) W_dec[id_j]`, decoded
    WITHOUT b_pre (the residual has no bias in it). The returned value is the batch-normalised MSE

        sum_b ||e_b - e_hat_b||^2  /  sum_b ||e_b||^2

    (1 when e_hat = 0; Gao et al. normalise the same way, per sample), or 0 when no feature is dead. The selected pre-activations
    are re-attached with `gathered_preacts`, so the gradient reaches W_enc (and b_pre via
    `xc = x - b_pre`) as well as the dead decoder rows.

    pre_BP: (B, P) detached pre-activations with feature ids `ids_BP` (None: position = feature id).
    dead_mask_F: (F,) bool, True for dead features. xc_BD: the encoder input x - b_pre (with grad).
    """
    if not bool(dead_mask_F.any()):
        return x_hat_BD.new_zeros(())
    dead_BP = dead_mask_F[ids_BP] if ids_BP is not None else dead_mask_F.expand_as(pre_BP)
    n_aux = min(auxk_k, pre_BP.shape[1])
    with torch.no_grad():
        masked_BP = pre_BP.masked_fill(~dead_BP, float("-inf"))
        vals_BA, pos_BA = masked_BP.topk(n_aux, dim=-1, sorted=False)
        is_dead_BA = torch.isfinite(vals_BA)  # fewer than n_aux dead latents: the rest are padding
        ids_BA = ids_BP.gather(1, pos_BA) if ids_BP is not None else pos_BA
        vals_BA = vals_BA.masked_fill(~is_dead_BA, 0.0)
    acts_BA = gathered_preacts(xc_BD, W_enc_FD, ids_BA, vals_BA).relu() * is_dead_BA
    e_BD = (x_BD - x_hat_BD).detach()
    e_hat_BD = sparse_decode(acts_BA, ids_BA, W_dec_FD)  # no b_pre: see docstring
    return (e_hat_BD - e_BD).pow(2).sum() / e_BD.pow(2).sum().clamp_min(torch.finfo(e_BD.dtype).tiny)
