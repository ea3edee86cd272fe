"""Gated SAE (Rajamanoharan et al. 2024):

    pi_gate = W_gate (x - b_dec) + b_gate                      # which features are on
    pi_mag  = (exp(r_mag) * W_gate) (x - b_dec) + b_mag         # how much (direction tied to the gate)
    z       = 1[pi_gate > 0] * ReLU(pi_mag),   x_hat = W_dec^T z + b_dec
    L = mean_b ||x - x_hat||^2
        + l1_coeff * mean_b ||ReLU(pi_gate)||_1
        + mean_b ||x - (W_dec^T ReLU(pi_gate) + b_dec)||^2   with W_dec, b_dec DETACHED (aux term)

Decoder rows are kept unit-norm (the L1 is on the gate, not weighted by decoder norms). `l1_coeff`
lives on the same scale as the ReLU SAE's (recon summed over D; activations normalised so that
E||x||_2 = sqrt(D)); sweep it to set L0.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..config import SAEConfig
from .base import BaseSAE, SAEOutput, dense_flops, recon_loss, register
from .topk import unit_rows


@register("gated")
class GatedSAE(BaseSAE):
    """Parameters: W_gate (M, D) (called W_enc), b_gate (M), r_mag (M), b_mag (M), W_dec (M, D), b_dec (D)."""

    def __init__(self, cfg: SAEConfig | None = None, **kw):
        cfg = cfg or SAEConfig(arch="gated", **kw)
        super().__init__(cfg)
        M, D, dt = cfg.n_features, cfg.d_in, self.param_dtype
        W_dec = unit_rows((M, D), dt)
        self.W_dec = nn.Parameter(W_dec)
        self.W_enc = nn.Parameter(W_dec.clone())  # W_gate
        self.b_gate = nn.Parameter(torch.zeros(M, dtype=dt))
        self.r_mag = nn.Parameter(torch.zeros(M, dtype=dt))
        self.b_mag = nn.Parameter(torch.zeros(M, dtype=dt))
        self.b_dec = nn.Parameter(torch.zeros(D, dtype=dt))

    def forward(self, x_BD: Tensor) -> SAEOutput:
        """latent_acts = z (B, M) dense; pre_acts = pi_gate (B, M), with grad (the L1 and aux terms use it)."""
        x_BD = self.check_input(x_BD)
        proj_BM = (x_BD - self.b_dec) @ self.W_enc.T  # one matmul serves both paths (tied directions)
        pi_gate_BM = proj_BM + self.b_gate
        pi_mag_BM = self.r_mag.exp() * proj_BM + self.b_mag
        z_BM = (pi_gate_BM > 0).to(proj_BM.dtype) * pi_mag_BM.relu()
        return SAEOutput(z_BM @ self.W_dec + self.b_dec, z_BM, None, pi_gate_BM)

    def losses(self, x_BD: Tensor, out: SAEOutput, dead_mask_F: Tensor | None = None) -> dict[str, Tensor]:
        """{'recon', 'l1': l1_coeff * mean_b ||ReLU(pi_gate)||_1, 'gate_aux': recon through the gate path
        with the decoder detached}."""
        x_BD = x_BD.to(out.x_hat.dtype)
        gate_acts_BM = out.pre_acts.relu()
        x_gate_BD = gate_acts_BM @ self.W_dec.detach() + self.b_dec.detach()
        return {
            "recon": recon_loss(out.x_hat, x_BD),
            "l1": self.cfg.l1_coeff * gate_acts_BM.sum(-1).mean(),
            "gate_aux": recon_loss(x_gate_BD, x_BD),
        }

    @property
    def n_params(self) -> int:
        """2 M D + 3 M + D."""
        M, D = self.cfg.n_features, self.cfg.d_in
        return 2 * M * D + 3 * M + D

    def flops_per_input(self) -> dict[str, int]:
        """One dense encoder matmul (shared by gate and magnitude) and a dense decoder: 2 M D each."""
        return dense_flops(self.cfg)
