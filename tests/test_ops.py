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
    monkeypatch.setattr(ops, "USE_GROUPED_MM", False)
    torch.testing.assert_close(ops.grouped_matmul(x, W, sizes), grouped_reference(x, W, sizes))


def test_grouped_matmul_rejects_wrong_sizes():
    with pytest.raises(ValueError, match="group sizes sum to 3 but x has 4 rows"):
        ops.grouped_matmul(torch.randn(4, 3), torch.randn(2, 5, 3), torch.tensor([1, 2]))

