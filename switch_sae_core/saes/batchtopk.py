"""BatchTopK SAE (Bussmann, Leask & Nanda 2024, arXiv 2412.06410), as SAELens trains it
(sae_lens/saes/batchtopk_sae.py, SAELens 6.18 and 6.54.12):

    pre = (x - b_dec) W_enc^T + b_enc                               (B, M)
    training:  z = the k*B largest entries of ReLU(pre) over the WHOLE batch, the rest 0
    inference: z = ReLU(pre) * 1[pre > theta]                         (per input: a JumpReLU with ONE threshold)
    x_hat = z W_dec + b_dec

theta is SAELens's running estimate: after every training forward, theta <- (1 - 0.01) theta + 0.01 * (the
smallest positive activation the batch kept) (`update_topk_threshold`, topk_threshold_lr = 0.01; the paper
averages the same minimum over batches). It starts at 0. Which formula runs is the module's mode:
`sae.train()` (batch-level, and a forward with autograd on updates theta) or `sae.eval()` (per input;
`heldout.reconstruction_metrics` and `evaluate.evaluate_saes` switch to it). SAELens saves a trained BatchTopK
SAE as a "jumprelu" SAE with threshold theta on every latent; `interop.sae_lens` does the same.

Loss: {'recon': mean_b ||x - x_hat||^2} plus, with `auxk_coeff > 0`, Gao et al.'s AuxK on the dead latents
(`base.auxk_loss`, the paper's Sec. 3: auxiliary coefficient 1/32, the top 512 dead latents; the same term as
our TopK SAE, normalised by the residual's energy; its gradient reaches W_enc, b_dec and W_dec, not b_enc).
Decoder rows are kept unit-norm, so SAELens's `rescale_acts_by_decoder_norm` is the identity here.

Fast path: the (B, M) pre-activations are computed without autograd; only the k*B winners are re-attached
(`ops.gathered_preacts`) and decoded with one `embedding_bag` over variable-length bags, so a step costs the
dense encoder matmul plus work proportional to k*B*D, as for the TopK SAE.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import SAEConfig
from ..ops import gathered_preacts
from .base import BaseSAE, SAEOutput, auxk_loss, recon_loss, register
from .topk import unit_rows

THRESHOLD_LR = 0.01  # SAELens BatchTopKTrainingSAEConfig.topk_threshold_lr


def batch_topk(acts_BM: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """(flat positions, values) of the k*B largest entries of acts_BM (B, M) over the whole batch, the positions
    sorted ascending (so row by row). Positions are b * M + j."""
    vals_N, pos_N = acts_BM.flatten().topk(k * acts_BM.shape[0], sorted=False)
    pos_N, order = pos_N.sort()
    return pos_N, vals_N[order]


@register("batchtopk")
class BatchTopKSAE(BaseSAE):
    """Parameters: W_enc (M, D), b_enc (M), W_dec (M, D) (unit-norm rows), b_dec (D); buffer `threshold` ()
    float64, the inference threshold theta."""

    threshold: Tensor

    def __init__(self, cfg: SAEConfig | None = None, **kw):
        cfg = cfg or SAEConfig(arch="batchtopk", **kw)
        super().__init__(cfg)
        M, D, dt = cfg.n_features, cfg.d_in, self.param_dtype
        W_dec = unit_rows((M, D), dt)
        self.W_dec = nn.Parameter(W_dec)
        self.W_enc = nn.Parameter(W_dec.clone())  # initialised parallel to the decoder (paper, SAELens)
        self.b_enc = nn.Parameter(torch.zeros(M, dtype=dt))
        self.b_dec = nn.Parameter(torch.zeros(D, dtype=dt))
        # float64 as in SAELens ("otherwise we can run into numerical issues")
        self.register_buffer("threshold", torch.zeros((), dtype=torch.float64))

    def forward(self, x_BD: Tensor) -> SAEOutput:
        """latent_acts: (B, M) dense z; pre_acts: (B, M) detached pre-activations (AuxK uses them).
        Train mode: batch-level TopK (and theta's update when autograd is on); eval mode: the threshold."""
        x_BD = self.check_input(x_BD)
        xc_BD = x_BD - self.b_dec
        if not self.training:
            pre_BM = xc_BD @ self.W_enc.T + self.b_enc
            z_BM = pre_BM.relu() * (pre_BM > self.threshold.to(pre_BM.dtype))
            return SAEOutput(z_BM @ self.W_dec + self.b_dec, z_BM, None, pre_BM.detach())
        with torch.no_grad():
            pre_BM = xc_BD @ self.W_enc.T + self.b_enc
            pos_N, vals_N = batch_topk(pre_BM.relu(), self.cfg.k)
        B, M = pre_BM.shape
        rows_N, ids_N = pos_N // M, pos_N % M
        acts_N = (gathered_preacts(xc_BD[rows_N], self.W_enc, ids_N[:, None], (vals_N - self.b_enc[ids_N])[:, None])
                  .squeeze(1) + self.b_enc[ids_N]).relu()
        offsets_B = torch.searchsorted(rows_N, torch.arange(B, device=rows_N.device))
        x_hat_BD = F.embedding_bag(ids_N, self.W_dec, offsets_B, mode="sum", per_sample_weights=acts_N) + self.b_dec
        z_BM = torch.zeros_like(pre_BM).view(-1).index_put((pos_N,), acts_N).view(B, M)  # differentiable: encode()
        if torch.is_grad_enabled():
            self.update_threshold(acts_N.detach())
        return SAEOutput(x_hat_BD, z_BM, None, pre_BM)

    @torch.no_grad()
    def update_threshold(self, kept_acts: Tensor) -> None:
        """theta <- (1 - lr) theta + lr * min(kept positive activations) (SAELens `update_topk_threshold`);
        unchanged when the batch kept no positive activation."""
        positive = kept_acts[kept_acts > 0]
        if positive.numel():
            self.threshold.mul_(1 - THRESHOLD_LR).add_(THRESHOLD_LR * positive.min().double())

    def losses(self, x_BD: Tensor, out: SAEOutput, dead_mask_F: Tensor | None = None) -> dict[str, Tensor]:
        """{'recon'} plus, when `auxk_coeff > 0` and a dead mask is given, {'auxk': auxk_coeff * AuxK}."""
        x_BD = x_BD.to(out.x_hat.dtype)
        losses = {"recon": recon_loss(out.x_hat, x_BD)}
        if self.cfg.auxk_coeff > 0 and dead_mask_F is not None:
            aux = auxk_loss(x_BD, out.x_hat, x_BD - self.b_dec, out.pre_acts, None, dead_mask_F.to(torch.bool),
                            self.W_enc, self.W_dec, self.cfg.auxk_k)
            losses["auxk"] = self.cfg.auxk_coeff * aux
        return losses

    @property
    def n_params(self) -> int:
        """2 M D + M + D."""
        M, D = self.cfg.n_features, self.cfg.d_in
        return 2 * M * D + M + D

    def flops_per_input(self) -> dict[str, int]:
        """Dense encoder 2 M D; the decoder decodes k latents per input on average (training): 2 k D."""
        M, D, K = self.cfg.n_features, self.cfg.d_in, self.cfg.k
        f = {"router": 0, "encoder": 2 * M * D, "decoder": 2 * K * D}
        f["total"] = sum(f.values())
        return f
