"""TopK SAE (Gao et al. 2024): latents = TopK(W_enc (x - b_pre)), x_hat = W_dec^T latents + b_pre."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..config import SAEConfig
from ..ops import sparse_decode
from .base import BaseSAE, SAEOutput, register


@register("topk")
class TopKSAE(BaseSAE):
    def __init__(self, cfg: SAEConfig | None = None, **kw):
        cfg = cfg or SAEConfig(arch="topk", **kw)
        super().__init__(cfg)
        M, D = cfg.n_features, cfg.d_in
        W_dec = torch.randn(M, D)
        W_dec /= W_dec.norm(dim=-1, keepdim=True)
        self.W_dec = nn.Parameter(W_dec)  # (M, D): feature directions as rows
        self.W_enc = nn.Parameter(W_dec.clone())  # (M, D): initialised parallel to the decoder
        self.b_pre = nn.Parameter(torch.zeros(D))

    def encode(self, x_BD: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """-> (acts_BK, indices_BK, pre_BM). ReLU after TopK zeroes negative winners."""
        pre_BM = (x_BD - self.b_pre) @ self.W_enc.T
        vals_BK, idx_BK = pre_BM.topk(self.cfg.k, dim=-1, sorted=False)
        return vals_BK.relu(), idx_BK, pre_BM

    def decode(self, acts_BK: Tensor, indices_BK: Tensor) -> Tensor:
        return sparse_decode(acts_BK, indices_BK, self.W_dec) + self.b_pre

    def forward(self, x_BD: Tensor) -> SAEOutput:
        self.check_input(x_BD)
        acts_BK, idx_BK, pre_BM = self.encode(x_BD)
        return SAEOutput(self.decode(acts_BK, idx_BK), acts_BK, idx_BK, pre_BM)

    def losses(self, x_BD: Tensor, out: SAEOutput, dead_mask_F: Tensor | None = None) -> dict[str, Tensor]:
        losses = {"recon": (out.x_hat - x_BD).pow(2).sum(-1).mean()}
        # AuxK: to be implemented (see issue 2): decode dead latents WITHOUT b_pre.
        return losses

    def flops_per_input(self) -> dict[str, int]:
        M, D, K = self.cfg.n_features, self.cfg.d_in, self.cfg.k
        f = {"router": 0, "encoder": 2 * M * D, "decoder": 2 * K * D}
        f["total"] = sum(f.values())
        return f
