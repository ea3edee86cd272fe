"""TopK SAE (Gao et al. 2024): latents = ReLU(TopK(W_enc (x - b_pre))), x_hat = W_dec^T latents + b_pre.

Fast path: the (B, M) pre-activations are computed WITHOUT autograd; only the k winners per input are
re-attached (`ops.sparse_experts`), so the backward costs B*k*D instead of two (B, M, D) matmuls, and
the decoder is an `embedding_bag` over the k winners (no dense (B, M) latent matrix).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..config import SAEConfig
from ..ops import gathered_preacts, sparse_decode, sparse_experts, topk_rows
from .base import BaseSAE, SAEOutput, auxk_loss, recon_loss, register


def unit_rows(shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """Random directions along the last dim (decoder init: unit-norm feature directions)."""
    W = torch.randn(shape, dtype=dtype)
    return W / W.norm(dim=-1, keepdim=True)


@register("topk")
class TopKSAE(BaseSAE):
    """Parameters: W_enc (M, D), W_dec (M, D) (unit-norm rows = feature directions), b_pre (D)."""

    def __init__(self, cfg: SAEConfig | None = None, **kw):
        cfg = cfg or SAEConfig(arch="topk", **kw)
        super().__init__(cfg)
        M, D = cfg.n_features, cfg.d_in
        W_dec = unit_rows((M, D), self.param_dtype)
        self.W_dec = nn.Parameter(W_dec)  # (M, D): feature directions as rows
        self.W_enc = nn.Parameter(W_dec.clone())  # (M, D): initialised parallel to the decoder
        self.b_pre = nn.Parameter(torch.zeros(D, dtype=self.param_dtype))

    def _encode_sparse(self, x_BD: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """-> (acts_BK, indices_BK, pre_BM). ReLU after TopK zeroes negative winners; pre_BM is detached."""
        xc_BD = x_BD - self.b_pre
        with torch.no_grad():
            pre_BM = xc_BD @ self.W_enc.T
            vals_BK, idx_BK = pre_BM.topk(self.cfg.k, dim=-1, sorted=False)
        acts_BK = gathered_preacts(xc_BD, self.W_enc, idx_BK, vals_BK).relu()
        return acts_BK, idx_BK, pre_BM

    def _decode_sparse(self, acts_BK: Tensor, indices_BK: Tensor) -> Tensor:
        return sparse_decode(acts_BK, indices_BK, self.W_dec) + self.b_pre

    def forward(self, x_BD: Tensor, fast: bool = True) -> SAEOutput:
        """fast=False: the reference backward (`_encode_sparse` + `_decode_sparse`, two embedding_bag backwards)."""
        x_BD = self.check_input(x_BD)
        if not fast:
            acts_BK, idx_BK, pre_BM = self._encode_sparse(x_BD)
            return SAEOutput(self._decode_sparse(acts_BK, idx_BK), acts_BK, idx_BK, pre_BM)
        xc_BD = x_BD - self.b_pre
        with torch.no_grad():
            pre_BM = xc_BD @ self.W_enc.T
            vals_BK, idx_BK = topk_rows(pre_BM, self.cfg.k)
        out_BD, acts_BK = sparse_experts(xc_BD, self.W_enc, self.W_dec, idx_BK, vals_BK)
        return SAEOutput(out_BD + self.b_pre, acts_BK, idx_BK, pre_BM)

    def losses(self, x_BD: Tensor, out: SAEOutput, dead_mask_F: Tensor | None = None) -> dict[str, Tensor]:
        """{'recon': mean_b ||x - x_hat||^2 (summed over D)} plus, when `auxk_coeff > 0` and a dead mask
        is given, {'auxk': auxk_coeff * base.auxk_loss(...)} over the top-auxk_k dead pre-activations."""
        x_BD = x_BD.to(out.x_hat.dtype)
        losses = {"recon": recon_loss(out.x_hat, x_BD)}
        if self.cfg.auxk_coeff > 0 and dead_mask_F is not None:
            aux = auxk_loss(x_BD, out.x_hat, x_BD - self.b_pre, out.pre_acts, None, dead_mask_F.to(torch.bool),
                            self.W_enc, self.W_dec, self.cfg.auxk_k)
            losses["auxk"] = self.cfg.auxk_coeff * aux
        return losses

    @property
    def n_params(self) -> int:
        """2 M D + D (SPEC)."""
        return 2 * self.cfg.n_features * self.cfg.d_in + self.cfg.d_in

    def flops_per_input(self) -> dict[str, int]:
        M, D, K = self.cfg.n_features, self.cfg.d_in, self.cfg.k
        f = {"router": 0, "encoder": 2 * M * D, "decoder": 2 * K * D}
        f["total"] = sum(f.values())
        return f
