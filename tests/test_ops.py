"""Fast kernels against plain references: sparse decode, gathered pre-activations, grouped matmul."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from switch_sae_core import ops

gen = torch.Generator().manual_seed(0)


def test_sparse_decode_equals_dense():
    acts = torch.randn(7, 3, generator=gen)
    idx = torch.randint(0, 20, (7, 3), generator=gen)
    W = torch.randn(20, 5, generator=gen)
    dense = torch.zeros(7, 20).scatter_add(1, idx, acts)
    torch.testing.assert_close(ops.sparse_decode(acts, idx, W), dense @ W)


def test_gathered_preacts_gradient_equals_dense_gather():
    x = torch.randn(9, 6, generator=gen, requires_grad=True)
    W = torch.randn(30, 6, generator=gen, requires_grad=True)
    idx = torch.randint(0, 30, (9, 4), generator=gen)
    idx[0] = torch.tensor([2, 2, 5, 2])  # repeated rows accumulate
    upstream = torch.randn(9, 4, generator=gen)
    ref = (x @ W.T).gather(1, idx)
    gx_ref, gW_ref = torch.autograd.grad((ref * upstream).sum(), (x, W))
    vals = ops.gathered_preacts(x, W, idx, ref.detach())
    torch.testing.assert_close(vals, ref)
    gx, gW = torch.autograd.grad((vals * upstream).sum(), (x, W))
    torch.testing.assert_close(gx, gx_ref)
    torch.testing.assert_close(gW, gW_ref)
    # only one input needing a gradient works too
    (gx_only,) = torch.autograd.grad(ops.gathered_preacts(x, W.detach(), idx, ref.detach()).sum(), x)
    torch.testing.assert_close(gx_only, torch.autograd.grad((x @ W.T).gather(1, idx).sum(), x)[0])


def grouped_reference(x, W, sizes):
    out, start = [], 0
    for g, n in enumerate(sizes.tolist()):
        out.append(x[start:start + n] @ W[g].T)
        start += n
    return torch.cat(out)


@pytest.mark.parametrize("fast", [True, False], ids=["grouped_mm", "loop"])
def test_grouped_matmul(fast):
    sizes = torch.tensor([3, 0, 5, 0, 2])  # empty groups included
    # D = 8: grouped_mm needs 16-byte-aligned strides; with D = 6 it errors and "fast" silently tests the loop
    x = torch.randn(10, 8, generator=gen, requires_grad=True)
    W = torch.randn(5, 4, 8, generator=gen, requires_grad=True)
    out = ops.grouped_matmul(x, W, sizes, fast=fast)
    ref = grouped_reference(x, W, sizes)
    torch.testing.assert_close(out, ref)
    out.sum().backward()  # zero-stride incoming gradient (grouped_mm's backward needs it contiguous)
    gx, gW = x.grad.clone(), W.grad.clone()
    x.grad = W.grad = None
    ref.sum().backward()
    torch.testing.assert_close(gx, x.grad)
    torch.testing.assert_close(gW, W.grad)
    assert W.grad[1].abs().sum() == 0 and W.grad[3].abs().sum() == 0


def test_grouped_matmul_falls_back_to_loop(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("grouped_mm: unsupported")

    monkeypatch.setattr(F, "grouped_mm", broken, raising=False)
    monkeypatch.setattr(ops, "_warned_fallback", set())
    sizes = torch.tensor([2, 2])
    x, W = torch.randn(4, 3, generator=gen), torch.randn(2, 5, 3, generator=gen)
    with pytest.warns(RuntimeWarning, match="slower loop"):  # the slow path is never silent
        torch.testing.assert_close(ops.grouped_matmul(x, W, sizes), grouped_reference(x, W, sizes))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # ... but said only once per shape
        ops.grouped_matmul(x, W, sizes)
    torch.testing.assert_close(ops.grouped_matmul(x, W, sizes, fast=False), grouped_reference(x, W, sizes))


def test_grouped_matmul_rejects_wrong_sizes():
    with pytest.raises(ValueError, match="group sizes sum to 3 but x has 4 rows"):
        ops.grouped_matmul(torch.randn(4, 3), torch.randn(2, 5, 3), torch.tensor([1, 2]))



def sparse_experts_dense(x, W_enc, W_dec, ids):
    """The dense formula: all pre-activations, the winners' ReLU scattered into a (T, F) matrix."""
    acts = (x @ W_enc.T).gather(1, ids).relu()
    return torch.zeros(x.shape[0], W_enc.shape[0], dtype=x.dtype).scatter_add(1, ids, acts) @ W_dec, acts


@pytest.mark.parametrize("fast", [True, False], ids=["sparse_backward", "embedding_bag_reference"])
def test_sparse_experts_gradients_equal_dense(fast):
    T, F_, D, K = 12, 40, 8, 5
    x = torch.randn(T, D, generator=gen, dtype=torch.float64, requires_grad=True)
    W_enc = torch.randn(F_, D, generator=gen, dtype=torch.float64, requires_grad=True)
    W_dec = torch.randn(F_, D, generator=gen, dtype=torch.float64, requires_grad=True)
    with torch.no_grad():
        pre = (x @ W_enc.T)[:, : F_ - 3]  # the last 3 features are never chosen
        vals, ids = pre.topk(K, dim=-1)
        vals[:3], ids[:3] = pre[:3].topk(K, dim=-1, largest=False)  # rows whose winners are negative
    assert (vals < 0).any(), "some winners must be negative, so the ReLU mask is exercised"
    g_out, g_acts = torch.randn(T, D, generator=gen, dtype=torch.float64), torch.randn(T, K, generator=gen, dtype=torch.float64)
    out, acts = ops.sparse_experts(x, W_enc, W_dec, ids, vals, fast=fast)
    out_ref, acts_ref = sparse_experts_dense(x, W_enc, W_dec, ids)
    torch.testing.assert_close(out, out_ref)
    torch.testing.assert_close(acts, acts_ref)
    params = (x, W_enc, W_dec)
    for loss, loss_ref in [((out * g_out).sum() + (acts * g_acts).sum(), (out_ref * g_out).sum() + (acts_ref * g_acts).sum()),
                           (out.sum(), out_ref.sum())]:  # both outputs used; a zero-stride gradient, acts unused
        grads = torch.autograd.grad(loss, params, retain_graph=True)
        grads_ref = torch.autograd.grad(loss_ref, params, retain_graph=True)
        for name, g, g_ref in zip(("x", "W_enc", "W_dec"), grads, grads_ref):
            torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-10, msg=name)
    assert grads[1][-3:].abs().sum() == 0 and grads[2][-3:].abs().sum() == 0
    # only the decoder needing a gradient (a frozen encoder) works too
    W_frozen = W_enc.detach()
    (g_dec,) = torch.autograd.grad(ops.sparse_experts(x.detach(), W_frozen, W_dec, ids, vals, fast=fast)[0].sum(), W_dec)
    torch.testing.assert_close(g_dec, torch.autograd.grad(sparse_experts_dense(x, W_frozen, W_dec, ids)[0].sum(), W_dec)[0])


@pytest.mark.parametrize("compiling", [False, True], ids=["sampled_addmm", "embedding_bag_kernel_under_compile"])
def test_row_dots_are_the_dense_dot_products(compiling, monkeypatch):
    """Both kernels of the backward's dacts equal (g @ W^T) at the ids, repeated ids in a row included."""
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: compiling)
    g, W = torch.randn(9, 6, generator=gen, dtype=torch.float64), torch.randn(30, 6, generator=gen, dtype=torch.float64)
    ids = torch.randint(0, 30, (9, 4), generator=gen)
    ids[0] = 7
    torch.testing.assert_close(ops._row_dots(g, W, ids), (g @ W.T).gather(1, ids), rtol=1e-12, atol=1e-12)


def test_sparse_experts_falls_back_once_on_unsupported_dtype(monkeypatch):
    monkeypatch.setattr(ops, "_warned_fallback", set())
    x, W = torch.randn(4, 8, dtype=torch.bfloat16), torch.randn(10, 8, dtype=torch.bfloat16)
    vals, ids = (x @ W.T).topk(2, dim=-1)
    with pytest.warns(RuntimeWarning, match="slower embedding_bag backward"):
        out, _ = ops.sparse_experts(x, W, W, ids, vals)
    torch.testing.assert_close(out, sparse_experts_dense(x, W, W, ids)[0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once
        ops.sparse_experts(x, W, W, ids, vals)


# --- topk_rows: the prefiltered selection equals torch.topk -------------------------------------------------
@pytest.mark.parametrize("T, W, k", [(300, 1536, 32), (64, 256, 16), (50, 1024, 32), (7, 144, 12), (40, 5000, 32)])
def test_topk_rows_selects_what_torch_topk_selects(T, W, k):
    """Same values (the multiset of the k largest is unique), the indices point at them, and without ties the
    same positions; shapes outside the fast path's conditions go straight to torch.topk."""
    from switch_sae_core.ops import topk_rows

    torch.manual_seed(0)
    x = torch.randn(T, W)
    x[:5] = x[:5].abs().neg()  # rows whose winners are all negative
    x[5] = torch.linspace(0, 1, W)  # one sorted row: the winners in one chunk, the bound far below them
    vals, idx = topk_rows(x, k)
    ref_vals, ref_idx = x.topk(k, dim=-1, sorted=False)
    assert vals.shape == idx.shape == (T, k)
    torch.testing.assert_close(vals.sort(-1).values, ref_vals.sort(-1).values, rtol=0, atol=0)
    torch.testing.assert_close(x.gather(1, idx), vals, rtol=0, atol=0)
    assert torch.equal(idx.sort(-1).values, ref_idx.sort(-1).values)


def test_topk_rows_with_ties_and_nan():
    from switch_sae_core.ops import topk_rows

    torch.manual_seed(0)
    x = torch.randn(20, 1024).round(decimals=1)  # many ties, also at the k-th value
    x[3] = 0.5  # a constant row: every entry a candidate
    vals, idx = topk_rows(x, 32)
    torch.testing.assert_close(vals.sort(-1).values, x.topk(32, dim=-1).values.sort(-1).values, rtol=0, atol=0)
    torch.testing.assert_close(x.gather(1, idx), vals, rtol=0, atol=0)
    assert (idx.sort(-1).values.diff(dim=-1) > 0).all()  # k distinct positions per row
    x[7, 100] = float("nan")  # torch.topk shows a NaN row as it is; so must this
    vals, _ = topk_rows(x, 32)
    assert torch.isnan(vals[7]).any()
