"""Fast kernels with plain-PyTorch fallbacks: sparse decode, gathered pre-activations, grouped matmul.

- `sparse_decode`: sum_k acts[b, k] * W[idx[b, k]] without the dense (B, M) latent matrix.
- `gathered_preacts`: attaches TopK-selected pre-activations to the autograd graph so that the
  encoder backward touches only the k chosen rows (k*D work per input instead of M*D).
- `grouped_matmul`: one matmul per expert group of a group-sorted batch, via
  `torch.nn.functional.grouped_mm` (one kernel) or a loop over the groups (`USE_GROUPED_MM = False`).

The slow references these are checked against live in the tests.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor

USE_GROUPED_MM = True
"""Fast path switch: False forces the loop over groups (also the automatic fallback on error)."""


def sparse_decode(acts_BK: Tensor, indices_BK: Tensor, W_dec_MD: Tensor) -> Tensor:
    """sum_k acts[b, k] * W_dec[indices[b, k]] -> (B, D), without the dense (B, M) latent matrix."""
    return F.embedding_bag(indices_BK, W_dec_MD, per_sample_weights=acts_BK.to(W_dec_MD.dtype), mode="sum")


class _GatheredPreacts(torch.autograd.Function):
    """vals[b, j] = x[b] . W[idx[b, j]], with the values already computed (e.g. by a no-grad matmul).

    Backward (g = dL/dvals, (B, K)):
      dL/dx[b] = sum_j g[b, j] W[idx[b, j]]              -> an embedding_bag forward
      dL/dW[m] = sum_{(b, j): idx[b, j] = m} g[b, j] x[b] -> that embedding_bag's weight gradient
    Neither builds a (B, M) tensor: the dense-TopK backward (a (B, M) zero matrix, scattered, then two
    (B, M) x (M, D) matmuls) is replaced by work proportional to B * K * D.
    """

    @staticmethod
    def forward(ctx, x_BD: Tensor, W_MD: Tensor, idx_BK: Tensor, vals_BK: Tensor) -> Tensor:
        ctx.save_for_backward(x_BD, W_MD, idx_BK)
        return vals_BK.detach().clone()

    @staticmethod
    def backward(ctx, g_BK: Tensor):
        x_BD, W_MD, idx_BK = ctx.saved_tensors
        g_BK = g_BK.contiguous().to(W_MD.dtype)
        grad_x = grad_W = None
        if ctx.needs_input_grad[1]:
            with torch.enable_grad():
                W_leaf = W_MD.detach().requires_grad_()
                gx_BD = F.embedding_bag(idx_BK, W_leaf, per_sample_weights=g_BK, mode="sum")
                (grad_W,) = torch.autograd.grad(gx_BD, W_leaf, x_BD.detach().to(W_MD.dtype))
            grad_x = gx_BD.detach() if ctx.needs_input_grad[0] else None
        elif ctx.needs_input_grad[0]:
            grad_x = F.embedding_bag(idx_BK, W_MD, per_sample_weights=g_BK, mode="sum")
        if grad_x is not None:
            grad_x = grad_x.to(x_BD.dtype)
        return grad_x, grad_W, None, None


def gathered_preacts(x_BD: Tensor, W_MD: Tensor, idx_BK: Tensor, vals_BK: Tensor) -> Tensor:
    """(B, K) pre-activations x . W[idx] (given as `vals_BK`, computed without grad), differentiable in
    x and W with a backward that touches only the rows in `idx_BK`. Exactly the gradient of
    `(x @ W.T).gather(1, idx)`."""
    return _GatheredPreacts.apply(x_BD, W_MD, idx_BK, vals_BK)


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous: grouped_mm's backward fails on
    a zero-stride gradient such as the one `out.sum().backward()` sends."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g: Tensor) -> Tensor:
        return g.contiguous()


_warned_fallback: set[tuple] = set()


def _warn_fallback(error: Exception, x_TD: Tensor, W_GOD: Tensor) -> None:
    """Say once per (device, dtype, width) that the slow loop runs instead of grouped_mm, and why."""
    key = (x_TD.device.type, x_TD.dtype, W_GOD.shape[1], W_GOD.shape[2])
    if key not in _warned_fallback:
        _warned_fallback.add(key)
        warnings.warn(f"torch.nn.functional.grouped_mm failed for {x_TD.dtype} on {x_TD.device.type} with expert "
                      f"weights {tuple(W_GOD.shape)} ({str(error).splitlines()[0]}); using the slower loop over "
                      "experts (e.g. CPU grouped_mm needs widths whose rows are multiples of 16 bytes)",
                      RuntimeWarning, stacklevel=3)


def _grouped_matmul_loop(x_TD: Tensor, W_GOD: Tensor, group_sizes_G: list[int]) -> Tensor:
    chunks = torch.split(x_TD, group_sizes_G)
    return torch.cat([chunk @ W_GOD[g].T for g, chunk in enumerate(chunks)], dim=0)


def grouped_matmul(x_TD: Tensor, W_GOD: Tensor, group_sizes_G: Tensor, fast: bool | None = None) -> Tensor:
    """Rows of x sorted by group; row t of group g -> x[t] @ W[g].T. (T, D), (G, O, D) -> (T, O).

    `group_sizes_G` (G,) counts the rows of each group (sum = T; zeros allowed). `fast=None` follows
    `USE_GROUPED_MM`; grouped_mm errors (an old torch, a device or dtype it does not support) fall
    back to the loop. Differentiable on both paths.
    """
    if x_TD.shape[0] != int(group_sizes_G.sum()):
        raise ValueError(f"group sizes sum to {int(group_sizes_G.sum())} but x has {x_TD.shape[0]} rows")
    fast = USE_GROUPED_MM if fast is None else fast
    if fast and hasattr(F, "grouped_mm"):
        try:
            offs_G = group_sizes_G.cumsum(0).to(device=x_TD.device, dtype=torch.int32)
            out = F.grouped_mm(x_TD.contiguous(), W_GOD.transpose(-1, -2), offs=offs_G)
            return _ContiguousGrad.apply(out) if out.requires_grad else out
        except (RuntimeError, NotImplementedError, TypeError) as e:
            _warn_fallback(e, x_TD, W_GOD)
    return _grouped_matmul_loop(x_TD, W_GOD, group_sizes_G.tolist())
