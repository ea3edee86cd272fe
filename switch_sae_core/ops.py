"""Fast kernels with plain-PyTorch fallbacks: sparse decode, gathered pre-activations, grouped matmul, TopK.

- `sparse_decode`: sum_k acts[b, k] * W[idx[b, k]] without the dense (B, M) latent matrix.
- `gathered_preacts`: attaches TopK-selected pre-activations to the autograd graph so that the
  encoder backward touches only the k chosen rows (k*D work per input instead of M*D).
- `grouped_matmul`: one matmul per expert group of a group-sorted batch, via
  `torch.nn.functional.grouped_mm` (one kernel) or a loop over the groups.
- `sparse_experts`: the TopK experts' differentiable part (re-attach the k winners, ReLU, sparse decode)
  as ONE autograd function whose backward builds each weight gradient with one sparse x dense matmul
  over a shared (features x rows) index, instead of two `embedding_bag` backwards (each a slow pair
  sort and a zero-filled full-width buffer).
- `topk_rows`: the k largest entries of each row: the C++ kernel of `kernels` on one CPU thread, else
  prefiltered by a bound from chunk maxima (narrow rows, e.g. a Switch expert's M/N pre-activations) before
  torch.topk.

One way to choose: every function with a fast path takes `fast: bool = True`; `fast=False` runs the
plain-PyTorch reference. A fast path that does not support the device or dtype it gets falls back to
the reference with a one-time `RuntimeWarning`. The references are checked against dense formulas in
the tests.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor

from . import kernels

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


def grouped_matmul(x_TD: Tensor, W_GOD: Tensor, group_sizes_G: Tensor, fast: bool = True) -> Tensor:
    """Rows of x sorted by group; row t of group g -> x[t] @ W[g].T. (T, D), (G, O, D) -> (T, O).

    `group_sizes_G` (G,) counts the rows of each group (sum = T; zeros allowed). `fast=False` runs the
    loop over groups; grouped_mm errors (an old torch, a device or dtype it does not support) fall
    back to the loop with a one-time warning. Differentiable on both paths.
    """
    if x_TD.shape[0] != int(group_sizes_G.sum()):
        raise ValueError(f"group sizes sum to {int(group_sizes_G.sum())} but x has {x_TD.shape[0]} rows")
    if torch.is_autocast_enabled(x_TD.device.type):
        # autocast has no rule for grouped_mm (torch 2.13): cast as it casts a matmul, so that the fast path and
        # the loop (whose `@` autocast does cast) compute in the same dtype, bf16, the dtype CUDA grouped_mm needs
        dtype = torch.get_autocast_dtype(x_TD.device.type)
        x_TD, W_GOD = x_TD.to(dtype), W_GOD.to(dtype)
    # torch.compile traces grouped_mm with its meta kernel, which accepts bf16 only (torch 2.13; the CUDA kernel's
    # rule): another dtype would fail the whole compiled step, not fall back here, so it takes the loop
    traceable = x_TD.dtype == torch.bfloat16 or not torch.compiler.is_compiling()
    if fast and traceable and hasattr(F, "grouped_mm"):
        try:
            offs_G = group_sizes_G.cumsum(0).to(device=x_TD.device, dtype=torch.int32)
            out = F.grouped_mm(x_TD.contiguous(), W_GOD.transpose(-1, -2), offs=offs_G)
            return _ContiguousGrad.apply(out) if out.requires_grad else out
        except (RuntimeError, NotImplementedError, TypeError) as e:
            _warn_fallback(e, x_TD, W_GOD)
    return _grouped_matmul_loop(x_TD, W_GOD, group_sizes_G.tolist())


# --- selection ---------------------------------------------------------------------------------------
PREFILTER_MAX_WIDTH = 4096
"""Widest row `topk_rows` prefilters (measured, one thread: 2x faster than torch.topk at (4096, 1536), k = 32;
slower at width 24576, where the mask and its compaction cost more than torch.topk's own pass)."""


def topk_rows(x_TW: Tensor, k: int, fast: bool = True) -> tuple[Tensor, Tensor]:
    """(values, indices), each (T, k), of the k largest entries of each row, in no particular order: the
    set `x_TW.topk(k, dim=-1, sorted=False)` gives (the same values; with ties at the k-th value, possibly
    other positions of the tied value).

    Fast path (CPU, no grad, W divisible by k, W >= k*k, W <= PREFILTER_MAX_WIDTH): a lower bound on each row's
    k-th largest value is the k-th largest of its W/k chunk maxima (those are k distinct entries), so only
    the entries at or above it are candidates; they are compacted to a (T, C) block (C = the most any row
    has, padded with -inf) and torch.topk runs on that. Any other case, or a row with fewer than k candidates
    (NaN), runs torch.topk on the whole row. fast=False: torch.topk.

    Fastest path, before those (a contiguous float32 CPU tensor, torch on one thread: `kernels.eligible`): the C++
    kernel `kernels.topk_rows` (a bound from lane maxima, then a heap of k over the entries above it; ties to the
    earlier entry); a row with a NaN, or no compiled kernels (`kernels.cpu_kernels`), takes the paths above."""
    T, W = x_TW.shape
    if fast and T > 0 and 0 < k <= W and not x_TW.requires_grad and kernels.eligible(x_TW):
        lib = kernels.cpu_kernels()
        out = kernels.topk_rows(lib, x_TW, k) if lib is not None else None
        if out is not None:
            return out
    if not (fast and x_TW.device.type == "cpu" and not x_TW.requires_grad and T > 0 and W % k == 0
            and k * k <= W <= PREFILTER_MAX_WIDTH):
        return x_TW.topk(k, dim=-1, sorted=False)
    chunk_max_TC = x_TW.view(T, W // k, k).amax(-1)
    bound_T1 = chunk_max_TC.topk(k, dim=-1, sorted=False).values.amin(-1, keepdim=True)
    rows, cols = (x_TW >= bound_T1).nonzero(as_tuple=True)  # row-major: each row's candidates in order
    n_T = torch.bincount(rows, minlength=T)
    if int(n_T.min()) < k:  # NaN in a row: let torch.topk show it
        return x_TW.topk(k, dim=-1, sorted=False)
    slot = torch.arange(rows.numel(), device=x_TW.device) - (n_T.cumsum(0) - n_T)[rows]
    width = int(n_T.max())
    cand_TC = x_TW.new_full((T, width), float("-inf"))
    cand_TC[rows, slot] = x_TW[rows, cols]
    col_TC = torch.zeros((T, width), dtype=torch.long, device=x_TW.device)
    col_TC[rows, slot] = cols
    vals_TK, j_TK = cand_TC.topk(k, dim=-1, sorted=False)
    return vals_TK, col_TC.gather(1, j_TK)


# --- the TopK experts' differentiable part -----------------------------------------------------------
def _sparse_experts_reference(x_TD: Tensor, W_enc_FD: Tensor, W_dec_FD: Tensor, ids_TK: Tensor,
                              vals_TK: Tensor) -> tuple[Tensor, Tensor]:
    acts_TK = gathered_preacts(x_TD, W_enc_FD, ids_TK, vals_TK).relu()
    return sparse_decode(acts_TK, ids_TK, W_dec_FD), acts_TK


def _feature_major_index(ids_TK: Tensor, n_features: int) -> tuple[Tensor, Tensor, Tensor]:
    """The (F, T) pattern of a (T, K) id matrix in CSR form: -> (crow (F+1,), col (T*K,) row t of each
    entry, order (T*K,) position of each entry in ids_TK.flatten()). One sort of unique int keys
    (id * T + t), shared by both weight gradients."""
    T, K = ids_TK.shape
    rows_TK = torch.arange(T, device=ids_TK.device)[:, None].expand(T, K)
    _, order = torch.sort((ids_TK * T + rows_TK).reshape(-1))
    crow = torch.zeros(n_features + 1, dtype=torch.int32, device=ids_TK.device)  # int32 indices and offsets: embedding_bag takes them
    crow[1:] = torch.bincount(ids_TK.reshape(-1), minlength=n_features).cumsum(0)
    return crow, (order // K).to(torch.int32), order


def _weighted_row_sum(ids_TK: Tensor, W_FD: Tensor, w_TK: Tensor) -> Tensor:
    """(T, D) sum_j w[t, j] W[ids[t, j]]: the sparse decode, and the backward's dx."""
    return F.embedding_bag(ids_TK, W_FD, per_sample_weights=w_TK, mode="sum")


def _row_dots(g_TD: Tensor, W_FD: Tensor, ids_TK: Tensor) -> Tensor:
    """(T, K) g[t] . W[ids[t, j]]: the gradient of `_weighted_row_sum` in its weights. A sampled dense x dense
    product (`torch.sparse.sampled_addmm`: g @ W^T only at the (T, F) CSR pattern of ids; 17 ms at Switch-16
    size, one thread, where embedding_bag's per-sample-weight backward kernel took 24 ms) on the CPU only.
    That kernel instead under torch.compile (dynamo fails on the CSR pattern, torch 2.13) and off the CPU:
    the pattern's column ids are unsorted within a row (topk order), which the CPU kernel handles (tests) but
    no GPU run has checked for cuSPARSE's SDDMM."""
    T, K = ids_TK.shape
    if torch.compiler.is_compiling() or g_TD.device.type != "cpu":
        flat = ids_TK.reshape(-1)
        dots = torch.ops.aten._embedding_bag_per_sample_weights_backward(
            g_TD, W_FD, flat, torch.arange(0, T * K, K, device=flat.device),
            torch.arange(T, device=flat.device).repeat_interleave(K), 0, -1)
        return dots.view(T, K)
    crow = torch.arange(0, T * K + 1, K, device=ids_TK.device)
    with warnings.catch_warnings():  # torch's "CSR support is in beta" notice
        warnings.simplefilter("ignore", UserWarning)
        pattern_TF = torch.sparse_csr_tensor(crow, ids_TK.reshape(-1), g_TD.new_zeros(T * K),
                                             size=(T, W_FD.shape[0]), check_invariants=False)
        dots = torch.sparse.sampled_addmm(pattern_TF, g_TD, W_FD.T, beta=0)
    return dots.values().view(T, K)


def _feature_major_matmul(index: tuple[Tensor, Tensor, Tensor], vals_TK: Tensor, dense_TD: Tensor) -> Tensor:
    """(F, D) A^T dense, A the (T, F) matrix with `vals_TK` at the ids `index` was built from: row f is
    sum over the entries (t, j) with ids[t, j] = f of vals[t, j] dense[t], i.e. an embedding_bag over `dense`
    with one bag per feature (its CSR row), written straight into a fresh (F, D) buffer, zero for a feature
    no row chose. As fast as MKL's CSR x dense `addmm` (benchmarks/bench_expert_backward.py; 12-14 ms per
    gradient in a Switch-16 step, one thread), without torch's beta sparse-CSR API."""
    crow, col, order = index
    return F.embedding_bag(col, dense_TD, crow, per_sample_weights=vals_TK.reshape(-1)[order], mode="sum",
                           include_last_offset=True)


class _SparseExperts(torch.autograd.Function):
    """(out_TD, acts_TK) = (sum_j acts[t, j] W_dec[ids[t, j]], acts) with acts = ReLU(vals), vals[t, j] =
    x[t] . W_enc[ids[t, j]] given (computed without grad). Backward, with g = dL/dout, h = dL/dacts:

        dacts[t, j] = g[t] . W_dec[ids[t, j]] + h[t, j];   dpre = dacts * 1[acts > 0]
        dW_dec = A^T g,   dW_enc = P^T x,   dx[t] = sum_j dpre[t, j] W_enc[ids[t, j]]

    where A, P are the (T, F) matrices with k non-zeros per row (acts, dpre at ids). A^T and P^T share
    one CSR index (`_feature_major_index`); each product is one embedding_bag with a bag per feature
    (`_feature_major_matmul`) writing a fresh (F, D) gradient (no zero-filled buffer, no embedding_bag
    backward sort). dacts is a sampled dense x dense product (k dot products per row, `_row_dots`) and dx
    an embedding_bag forward.
    """

    @staticmethod
    def forward(ctx, x_TD: Tensor, W_enc_FD: Tensor, W_dec_FD: Tensor, ids_TK: Tensor, vals_TK: Tensor):
        acts_TK = vals_TK.detach().to(W_dec_FD.dtype).relu()  # vals may be bf16 under autocast
        out_TD = _weighted_row_sum(ids_TK, W_dec_FD, acts_TK)
        ctx.save_for_backward(x_TD, W_enc_FD, W_dec_FD, ids_TK, acts_TK)
        return out_TD, acts_TK.clone()

    @staticmethod
    def backward(ctx, g_TD: Tensor | None, h_TK: Tensor | None):
        x_TD, W_enc_FD, W_dec_FD, ids_TK, acts_TK = ctx.saved_tensors
        n_features = W_enc_FD.shape[0]
        g_TD = torch.zeros_like(x_TD) if g_TD is None else g_TD.contiguous()
        dacts_TK = _row_dots(g_TD, W_dec_FD, ids_TK)
        if h_TK is not None:
            dacts_TK = dacts_TK + h_TK
        dpre_TK = dacts_TK * (acts_TK > 0)
        dx = dW_enc = dW_dec = None
        if ctx.needs_input_grad[0]:
            dx = _weighted_row_sum(ids_TK, W_enc_FD, dpre_TK)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            index = _feature_major_index(ids_TK, n_features)
            if ctx.needs_input_grad[1]:
                dW_enc = _feature_major_matmul(index, dpre_TK, x_TD)
            if ctx.needs_input_grad[2]:
                dW_dec = _feature_major_matmul(index, acts_TK, g_TD)
        return dx, dW_enc, dW_dec, None, None


_FAST_EXPERTS = {("cpu", torch.float32), ("cpu", torch.float64), ("cuda", torch.float32)}
"""(device type, dtype) pairs the sparse x dense backward of `_SparseExperts` is known to run on."""


def sparse_experts(x_TD: Tensor, W_enc_FD: Tensor, W_dec_FD: Tensor, ids_TK: Tensor, vals_TK: Tensor,
                   fast: bool = True) -> tuple[Tensor, Tensor]:
    """The differentiable part of TopK experts, given the winners (computed without grad):

        acts_TK = ReLU(x[t] . W_enc[ids[t, j]])  (= ReLU(vals_TK), re-attached to x and W_enc)
        out_TD  = sum_j acts[t, j] W_dec[ids[t, j]]

    x_TD (T, D) encoder inputs; W_enc_FD, W_dec_FD (F, D) feature rows; ids_TK, vals_TK (T, K) the
    TopK winners' feature ids and pre-activations. -> (out_TD, acts_TK). Both paths give the gradient
    of the dense formula (tests). fast=True: one autograd function with sparse x dense weight
    gradients (`_SparseExperts`); fast=False, or a device/dtype outside the supported ones (one-time
    warning): `gathered_preacts` + `sparse_decode`.
    """
    if fast:
        key = (x_TD.device.type, x_TD.dtype)
        if key in _FAST_EXPERTS and W_enc_FD.dtype == W_dec_FD.dtype == x_TD.dtype:
            return _SparseExperts.apply(x_TD, W_enc_FD, W_dec_FD, ids_TK, vals_TK)
        if key not in _warned_fallback:
            _warned_fallback.add(key)
            warnings.warn(f"the sparse expert backward does not support {x_TD.dtype} on {x_TD.device.type}; "
                          "using the slower embedding_bag backward (pass float32 to get the fast path)",
                          RuntimeWarning, stacklevel=2)
    return _sparse_experts_reference(x_TD, W_enc_FD, W_dec_FD, ids_TK, vals_TK)
