"""JumpReLU SAE (Rajamanoharan et al. 2024, "Jumping Ahead", arXiv 2407.14435), trained as SAELens's
JumpReLUTrainingSAE does with its default sparsity loss, "step" (DeepMind's L0; sae_lens/saes/jumprelu_sae.py,
SAELens 6.18 and 6.54.12 with their defaults: jumprelu_ste_to_input = False, no pre_act_loss; Anthropic's "tanh"
variant and its input STE are not implemented):

    pre = x W_enc^T + b_enc,   theta = exp(log_threshold)                       (B, M), (M,)
    z = JumpReLU_theta(pre) = pre * H(pre - theta),   x_hat = z W_dec + b_dec
    L = mean_b ||x - x_hat||^2 + lambda(t) * mean_b sum_i H(pre_bi - theta_i)   (paper Eq. 11)

H is the Heaviside step. Both discontinuities get straight-through estimators with the rectangle kernel
K(u) = 1[|u| < 1/2] of bandwidth eps (paper Eqs. 12-13, SAELens `JumpReLU` / `Step`):

    d JumpReLU / d theta := -(theta / eps) K((pre - theta) / eps),   d JumpReLU / d pre := H(pre - theta)
    d H(pre - theta) / d theta := -(1 / eps) K((pre - theta) / eps),   d H / d pre := 0

i.e. the exact theta-gradient of the loss with H smoothed into a ramp of width eps (the kernel-density view of
the paper's Sec. 4). The input is not centred (the paper; exported with apply_b_dec_to_input = False).

Units. The paper trains on activations scaled to unit mean squared norm, with eps = theta_0 = 0.001 (SAELens
defaults: 0.05 and 0.01). Ours are raw: the buffer `input_scale` s = sqrt(E||x||^2) (set from the first
activations by `init_from_activations`, which the trainer calls with the geometric-median batch; 1 until
then) puts eps = 0.001 s and theta_0 = 0.001 s, and the L0 term is lambda * s^2 * L0, so that
`SAEConfig.l1_coeff` IS the paper's lambda whatever the activations' scale.
lambda(t) = l1_coeff * `sparsity_warmup`, a factor in [0, 1] the trainer sets every step
(TrainConfig.sparsity_warmup_steps; the paper warms lambda up linearly from 0). Decoder rows are kept
unit-norm (the L0 term does not depend on their norms).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..config import SAEConfig
from .base import BaseSAE, SAEOutput, dense_flops, recon_loss, register
from .topk import unit_rows

BANDWIDTH = 1e-3  # eps in units of the input scale (paper Sec. 5 / App.: 0.001 on unit-mean-squared-norm data)
INIT_THRESHOLD = 1e-3  # theta_0, same units (paper: 0.001)


def rectangle(u: Tensor) -> Tensor:
    """The rectangle kernel K(u) = 1[-1/2 < u < 1/2] (SAELens `rectangle`)."""
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


class JumpReLUFunction(torch.autograd.Function):
    """pre * H(pre - theta); backward: pre gets H(pre - theta) g, theta gets sum_b -(theta/eps) K(.) g."""

    @staticmethod
    def forward(ctx, pre_BM: Tensor, theta_M: Tensor, eps: float) -> Tensor:
        ctx.save_for_backward(pre_BM, theta_M)
        ctx.eps = eps
        return pre_BM * (pre_BM > theta_M)

    @staticmethod
    def backward(ctx, g_BM: Tensor):
        pre_BM, theta_M = ctx.saved_tensors
        kernel_BM = rectangle((pre_BM - theta_M) / ctx.eps)
        grad_theta = (-(theta_M / ctx.eps) * kernel_BM * g_BM).sum(0)
        return (pre_BM > theta_M) * g_BM, grad_theta, None


class StepFunction(torch.autograd.Function):
    """H(pre - theta); backward: pre gets nothing, theta gets sum_b -(1/eps) K(.) g."""

    @staticmethod
    def forward(ctx, pre_BM: Tensor, theta_M: Tensor, eps: float) -> Tensor:
        ctx.save_for_backward(pre_BM, theta_M)
        ctx.eps = eps
        return (pre_BM > theta_M).to(pre_BM.dtype)

    @staticmethod
    def backward(ctx, g_BM: Tensor):
        pre_BM, theta_M = ctx.saved_tensors
        grad_theta = (-(1.0 / ctx.eps) * rectangle((pre_BM - theta_M) / ctx.eps) * g_BM).sum(0)
        return None, grad_theta, None


@register("jumprelu")
class JumpReLUSAE(BaseSAE):
    """Parameters: W_enc (M, D), b_enc (M), log_threshold (M), W_dec (M, D) (unit-norm rows), b_dec (D);
    buffer `input_scale` () (see the module docstring)."""

    input_scale: Tensor
    sparsity_warmup: float = 1.0  # lambda's warm-up factor; the trainer sets it every step

    def __init__(self, cfg: SAEConfig | None = None, **kw):
        cfg = cfg or SAEConfig(arch="jumprelu", **kw)
        super().__init__(cfg)
        M, D, dt = cfg.n_features, cfg.d_in, self.param_dtype
        W_dec = unit_rows((M, D), dt)  # paper: random unit-norm decoder rows, W_enc = W_dec^T, biases 0
        self.W_dec = nn.Parameter(W_dec)
        self.W_enc = nn.Parameter(W_dec.clone())
        self.b_enc = nn.Parameter(torch.zeros(M, dtype=dt))
        self.log_threshold = nn.Parameter(torch.full((M,), math.log(INIT_THRESHOLD), dtype=dt))
        self.b_dec = nn.Parameter(torch.zeros(D, dtype=dt))
        self.register_buffer("input_scale", torch.ones((), dtype=dt))

    @property
    def threshold(self) -> Tensor:
        """(M,) theta = exp(log_threshold) > 0."""
        return self.log_threshold.exp()

    @property
    def bandwidth(self) -> float:
        """eps of the straight-through estimators, in the activations' units."""
        return BANDWIDTH * float(self.input_scale)

    @torch.no_grad()
    def init_from_activations(self, x_ND: Tensor) -> None:
        """input_scale = sqrt(mean_n ||x_n||^2) of these activations, theta = INIT_THRESHOLD * input_scale."""
        self.input_scale.copy_(x_ND.double().pow(2).sum(-1).mean().sqrt())
        self.log_threshold.fill_(math.log(INIT_THRESHOLD * float(self.input_scale)))

    def forward(self, x_BD: Tensor) -> SAEOutput:
        """latent_acts = z (B, M) dense; pre_acts = pre (B, M), with grad (the L0 term uses it)."""
        x_BD = self.check_input(x_BD)
        pre_BM = x_BD @ self.W_enc.T + self.b_enc
        z_BM = JumpReLUFunction.apply(pre_BM, self.threshold, self.bandwidth)
        return SAEOutput(z_BM @ self.W_dec + self.b_dec, z_BM, None, pre_BM)

    def losses(self, x_BD: Tensor, out: SAEOutput, dead_mask_F: Tensor | None = None) -> dict[str, Tensor]:
        """{'recon', 'l0': l1_coeff * sparsity_warmup * input_scale^2 * mean_b sum_i H(pre - theta)}."""
        x_BD = x_BD.to(out.x_hat.dtype)
        l0_B = StepFunction.apply(out.pre_acts, self.threshold, self.bandwidth).sum(-1)
        coeff = self.cfg.l1_coeff * self.sparsity_warmup * float(self.input_scale) ** 2
        return {"recon": recon_loss(out.x_hat, x_BD), "l0": coeff * l0_B.mean()}

    @property
    def n_params(self) -> int:
        """2 M D + 2 M + D."""
        M, D = self.cfg.n_features, self.cfg.d_in
        return 2 * M * D + 2 * M + D

    def flops_per_input(self) -> dict[str, int]:
        """Dense encoder and decoder: 2 M D each (as the ReLU SAE)."""
        return dense_flops(self.cfg)
