"""ReLU SAE, Anthropic's April 2024 update (Conerly et al.):

    z = ReLU(W_enc x + b_enc),   x_hat = W_dec^T z + b_dec,
    L = mean_b ||x - x_hat||^2  +  l1_coeff * mean_b sum_i z_i ||W_dec[i]||

The L1 penalty is weighted by each decoder row's norm, so the decoder is NOT kept unit-norm
(`unit_norm_decoder = False`). Scale of `l1_coeff`: the reconstruction term is the squared error summed
over D (SPEC), as in Conerly et al., whose lambda ~ 5 assumes activations normalised so that
E||x||_2 = sqrt(D); with that normalisation the config default (5.0) is on their scale. L0 is set by
lambda and must be measured, not chosen.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..config import SAEConfig
from .base import BaseSAE, SAEOutput, dense_flops, recon_loss, register
from .topk import unit_rows

INIT_DECODER_NORM = 0.1  # Conerly et al.: decoder rows random directions of norm 0.1, W_enc = W_dec^T


@register("relu")
class ReLUSAE(BaseSAE):
    """Parameters: W_enc (M, D), b_enc (M), W_dec (M, D) (rows = features, free norms), b_dec (D)."""

    unit_norm_decoder = False

    def __init__(self, cfg: SAEConfig | None = None, **kw):
        cfg = cfg or SAEConfig(arch="relu", **kw)
        super().__init__(cfg)
        M, D, dt = cfg.n_features, cfg.d_in, self.param_dtype
        W_dec = INIT_DECODER_NORM * unit_rows((M, D), dt)
        self.W_dec = nn.Parameter(W_dec)
        self.W_enc = nn.Parameter(W_dec.clone())
        self.b_enc = nn.Parameter(torch.zeros(M, dtype=dt))
        self.b_dec = nn.Parameter(torch.zeros(D, dtype=dt))

    def forward(self, x_BD: Tensor) -> SAEOutput:
        x_BD = self.check_input(x_BD)
        pre_BM = x_BD @ self.W_enc.T + self.b_enc
        z_BM = pre_BM.relu()
        return SAEOutput(z_BM @ self.W_dec + self.b_dec, z_BM, None, pre_BM)

    def losses(self, x_BD: Tensor, out: SAEOutput, dead_mask_F: Tensor | None = None) -> dict[str, Tensor]:
        """{'recon': mean_b ||x - x_hat||^2, 'l1': l1_coeff * mean_b sum_i z_i ||W_dec[i]||}."""
        x_BD = x_BD.to(out.x_hat.dtype)
        return {
            "recon": recon_loss(out.x_hat, x_BD),
            # elementwise, not a matmul: autocast leaves it in fp32 (the loss terms are fp32 under bf16 autocast)
            "l1": self.cfg.l1_coeff * (out.latent_acts * self.W_dec.norm(dim=-1)).sum(-1).mean(),
        }

    @property
    def n_params(self) -> int:
        """2 M D + M + D."""
        M, D = self.cfg.n_features, self.cfg.d_in
        return 2 * M * D + M + D

    def flops_per_input(self) -> dict[str, int]:
        """Dense encoder and decoder: 2 M D each."""
        return dense_flops(self.cfg)
