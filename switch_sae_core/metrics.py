"""The metrics: one definition of each number the project reports.

Shapes: B inputs, D model dim, M features, K active latents per input, N experts, E experts per input.
Every function is pure torch and returns a 0-dim tensor (or an (N,) tensor for `expert_load`), so it
runs on the device of its inputs without a host sync; call `.item()` where a Python number is needed.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


# --- reconstruction ----------------------------------------------------------------------------------
def mse(x_BD: Tensor, x_hat_BD: Tensor) -> Tensor:
    """The paper's MSE: squared error summed over the D dimensions, averaged over inputs."""
    return (x_hat_BD.float() - x_BD.float()).pow(2).sum(-1).mean()


def fvu(x_BD: Tensor, x_hat_BD: Tensor) -> Tensor:
    """Fraction of variance unexplained: sum ||x - x_hat||^2 / sum ||x - mean_batch(x)||^2.

    0 for a perfect reconstruction, 1 for predicting the batch mean."""
    x_BD = x_BD.float()
    resid = (x_hat_BD.float() - x_BD).pow(2).sum()
    total = (x_BD - x_BD.mean(0)).pow(2).sum()
    return resid / total.clamp_min(torch.finfo(total.dtype).tiny)


def cosine_similarity(x_BD: Tensor, x_hat_BD: Tensor) -> Tensor:
    """Mean over inputs of cos(x, x_hat)."""
    return torch.nn.functional.cosine_similarity(x_BD.float(), x_hat_BD.float(), dim=-1, eps=1e-12).mean()


def l2_ratio(x_BD: Tensor, x_hat_BD: Tensor) -> Tensor:
    """Mean over inputs of ||x_hat|| / ||x|| (< 1: the SAE shrinks its reconstructions)."""
    return (x_hat_BD.float().norm(dim=-1) / x_BD.float().norm(dim=-1).clamp_min(1e-12)).mean()


# --- sparsity ----------------------------------------------------------------------------------------
def l0(latent_acts: Tensor) -> Tensor:
    """Mean number of non-zero latents per input. `latent_acts` is (B, K) for TopK/Switch (a winner
    clipped to 0 by the ReLU does not count) or (B, M) dense latents for ReLU/Gated."""
    return (latent_acts != 0).sum(-1).float().mean()


def fired_features(latent_acts: Tensor, latent_indices: Optional[Tensor], n_features: int) -> Tensor:
    """(M,) bool: which features were non-zero for at least one input of the batch.

    Sparse form: `latent_acts` (B, K) with `latent_indices` (B, K) global ids. Dense form:
    `latent_acts` (B, M) and `latent_indices=None`. No host sync (scatter instead of boolean indexing).
    """
    if latent_indices is None:
        if latent_acts.shape[-1] != n_features:
            raise ValueError(f"dense latents have width {latent_acts.shape[-1]}, expected n_features={n_features}")
        return (latent_acts != 0).any(0)
    fired_M = torch.zeros(n_features, dtype=torch.int32, device=latent_acts.device)
    on_BK = (latent_acts != 0).to(torch.int32)
    return fired_M.scatter_reduce_(0, latent_indices.reshape(-1), on_BK.reshape(-1), "amax").bool()


def dead_fraction(tokens_since_fired_M: Tensor, window_tokens: int) -> Tensor:
    """Fraction of features that have not fired in the last `window_tokens` tokens."""
    return (tokens_since_fired_M >= window_tokens).float().mean()


class DeadFeatureTracker:
    """Counts, per feature, the tokens seen since it last fired; dead = silent for `window_tokens`.

    A new tracker counts 0 for every feature, so nothing is dead before one full window has passed.
    `state_dict()` holds only tensors (saved in trainer checkpoints without pickling).
    """

    def __init__(self, n_features: int, window_tokens: int, device: torch.device | str = "cpu"):
        if window_tokens < 1:
            raise ValueError(f"window_tokens={window_tokens} must be >= 1")
        self.n_features = n_features
        self.window_tokens = window_tokens
        self.tokens_since_fired_M = torch.zeros(n_features, dtype=torch.int64, device=device)

    @torch.no_grad()
    def update(self, latent_acts: Tensor, latent_indices: Optional[Tensor] = None) -> None:
        """Feed one batch: sparse (B, K) acts + (B, K) global ids, or dense (B, M) acts (ids None)."""
        self.record(fired_features(latent_acts.detach(), latent_indices, self.n_features), latent_acts.shape[0])

    @torch.no_grad()
    def record(self, fired_M: Tensor, n_tokens: int) -> None:
        """Feed one step's (M,) fired mask over `n_tokens` tokens: fired features reset, the rest count on."""
        self.tokens_since_fired_M = torch.where(fired_M.bool(), 0, self.tokens_since_fired_M + n_tokens)

    def dead_mask(self) -> Tensor:
        """(M,) bool: features silent for at least the window."""
        return self.tokens_since_fired_M >= self.window_tokens

    def dead_fraction(self) -> Tensor:
        return dead_fraction(self.tokens_since_fired_M, self.window_tokens)

    def state_dict(self) -> dict[str, Tensor]:
        return {"tokens_since_fired": self.tokens_since_fired_M.detach().cpu().clone()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        t = state["tokens_since_fired"]
        if tuple(t.shape) != (self.n_features,):
            raise ValueError(f"dead-feature state has shape {tuple(t.shape)}, expected ({self.n_features},)")
        self.tokens_since_fired_M = t.to(device=self.tokens_since_fired_M.device, dtype=torch.int64).clone()


# --- routing (Switch) --------------------------------------------------------------------------------
def expert_load(expert_indices_BE: Tensor, n_experts: int) -> Tensor:
    """(N,) f_i: fraction of routing assignments that went to expert i (sums to 1).

    With top-1 routing this is the paper's f_i = (1/T) sum_x 1[i*(x) = i]; with top-e each input counts
    once for each of its e experts, divided by B*e."""
    counts_N = torch.bincount(expert_indices_BE.reshape(-1), minlength=n_experts).float()
    return counts_N / expert_indices_BE.numel()


def _entropy(p_XN: Tensor) -> Tensor:
    """Entropy (nats) of each distribution along the last dim; 0 log 0 = 0."""
    p = p_XN.float()
    return -(p * p.clamp_min(1e-30).log()).sum(-1)


def router_entropy(router_probs_BN: Tensor) -> Tensor:
    """Mean over inputs of the router distribution's entropy, in nats (max log N, 0 = certain)."""
    return _entropy(router_probs_BN).mean()


def load_entropy(load_N: Tensor) -> Tensor:
    """Entropy of the expert load f (nats): log N when balanced, 0 when one expert takes everything."""
    return _entropy(load_N)
