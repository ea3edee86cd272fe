"""The C++ CPU kernels (switch_sae_core/kernels) equal the torch path they replace, and the torch path takes over,
with one warning line, when they are switched off or cannot be built.

Tolerances (float32 everywhere; the reference is `upkeep_gradients` + torch's fused Adam + `normalize_decoder`):
- Adam alone is elementwise, the same operations in the same order as torch's CPU kernel (bit-identical on the
  machine it was written on): rtol 1e-6, atol 0.
- The whole step differs from torch only in its reductions: the projection's row dot products, the clipping
  norm and the renormalisation's row norms accumulate in float64 here, in float32 in torch (last-bit differences,
  ~1e-7 of a row's norm). Gradients and Adam moments are compared to 5e-6 of their tensor's largest entry. A
  parameter entry is compared to 2e-4 * lr: Adam divides each gradient entry by its own running RMS, so an entry
  that the projection `g - (g . w) w` cancels down to rounding level keeps that rounding error, relative to lr,
  in its update (measured: at most 9e-5 * lr). A wrong formula (no projection, clip or bias correction, another
  eps, no renormalisation) moves entries by a sizeable fraction of lr, far above these bounds.
- Each step is compared from the SAME state (the reference's parameters and moments copied in first): a free
  run of two float paths drifts apart once a TopK selection flips on a last-bit difference, a property of
  TopK, not of the kernels.
"""
import copy
import os
import subprocess
import sys

import pytest
import torch

from switch_sae_core import kernels, optim
from switch_sae_core.config import SAEConfig
from switch_sae_core.saes import build_sae

pytestmark = pytest.mark.usefixtures("one_thread")  # the kernels run when torch has one thread (kernels.eligible)

CONFIGS = {  # TopK; Switch at fixed width with several experts; Switch with a shared expert
    "topk": SAEConfig(arch="topk", d_in=64, n_features=2000, k=8),
    "switch": SAEConfig(arch="switch", d_in=64, n_features=2048, k=8, n_experts=4),
    "switch-shared": SAEConfig(arch="switch", d_in=64, n_features=1024, k=8, n_experts=4, shared_expert=True),
}
LR = 1e-2


@pytest.fixture
def lib():
    lib = kernels.cpu_kernels()
    if lib is None:
        pytest.skip("the C++ kernels could not be built here (no compiler?): the fallback tests below cover this case")
    return lib


def torch_path(sae, opt, max_norm):
    """The reference: the separate torch passes (projection + clip, torch's fused Adam, renormalisation)."""
    total = sae.upkeep_gradients(max_norm)
    opt.step()
    sae.normalize_decoder()
    return total


def _close_to_scale(x, ref, rel, what):
    err, scale = float((x - ref).abs().max()), float(ref.abs().max())
    assert err <= rel * scale, f"{what}: max |difference| {err:.3g} > {rel} x max |reference| {scale:.3g}"


def test_adam_kernel_equals_torch_fused_adam(lib):
    torch.manual_seed(0)
    shape = (300, 64)
    for wd, betas, coef, maximize in [(0.0, (0.9, 0.999), None, False), (0.1, (0.0, 0.999), None, True),
                                      (0.0, (0.9, 0.99), 0.3, False), (0.0, (0.6, 0.999), None, False)]:
        p, m = torch.randn(shape), torch.randn(shape) * 1e-3
        g, v = torch.randn(shape) * 1e-3, torch.rand(shape) * 1e-6
        P, G, M, V = (t.clone() for t in (p, g, m, v))
        for step in (1.0, 2.0, 7.0):
            if coef is not None:
                G.mul_(coef)
            torch._fused_adam_([P], [G], [M], [V], [], [torch.tensor(step)], lr=LR, beta1=betas[0], beta2=betas[1],
                               weight_decay=wd, eps=1e-8, amsgrad=False, maximize=maximize)
            kernels.adam_(lib, p, g, m, v, step, lr=LR, beta1=betas[0], beta2=betas[1], weight_decay=wd, eps=1e-8,
                          maximize=maximize, coef=coef)
            for mine, ref in ((p, P), (g, G), (m, M), (v, V)):
                torch.testing.assert_close(mine, ref, rtol=1e-6, atol=0)


def test_projection_and_renormalisation_kernels(lib):
    torch.manual_seed(0)
    w = torch.nn.functional.normalize(torch.randn(500, 96), dim=-1)
    g = torch.randn(500, 96)
    ref = g - torch.linalg.vecdot(g.double(), w.double()).unsqueeze(-1).float() * w
    sq = kernels.project_rows_(lib, g, w, want_sumsq=True)
    _close_to_scale(g, ref, 1e-6, "projected gradient")
    assert torch.linalg.vecdot(g.double(), w.double()).abs().max() < 1e-5  # no component along the row left
    assert sq == pytest.approx(float(ref.double().square().sum()), rel=1e-6)
    assert kernels.project_rows_(lib, g.clone(), w, want_sumsq=False) == 0.0
    p = torch.randn(500, 96) * 3  # lr = 0: Adam leaves p as it is, then the rows are renormalised
    zeros = [torch.zeros_like(p) for _ in range(3)]
    expected = p / p.norm(dim=-1, keepdim=True)
    kernels.adam_(lib, p, *zeros, 1.0, lr=0.0, beta1=0.9, beta2=0.999, weight_decay=0.0, eps=1e-8, maximize=False,
                  unit_rows=True)
    torch.testing.assert_close(p, expected, rtol=1e-6, atol=1e-7)


def _pair(cfg, **adam):
    torch.manual_seed(0)
    a = build_sae(cfg)
    b = copy.deepcopy(a)
    kw = dict(lr=LR, fused=True, **adam)
    return (a, torch.optim.Adam(a.parameters(), **kw)), (b, torch.optim.Adam(b.parameters(), **kw))


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("max_norm", [1e-2, 1e9, 0.0], ids=["clipped", "unclipped", "no-clip"])
@pytest.mark.parametrize("adam", [{}, dict(weight_decay=0.1, betas=(0.0, 0.999))], ids=["default", "wd-beta0"])
def test_kernel_step_equals_the_torch_path(name, max_norm, adam, lib, monkeypatch):
    calls = []
    real = optim._kernel_step
    monkeypatch.setattr(optim, "_kernel_step", lambda *a: calls.append(1) or real(*a))
    (a, opt_a), (b, opt_b) = _pair(CONFIGS[name], **adam)
    x_BD = torch.randn(256, 64)
    for step in range(4):
        with torch.no_grad():  # the same state before each compared step (module docstring)
            for p, q in zip(a.parameters(), b.parameters()):
                q.copy_(p)
                for key, value in opt_a.state.get(p, {}).items():
                    opt_b.state[q][key].copy_(value)
        norms = []
        for sae, opt, update in ((a, opt_a, torch_path), (b, opt_b, optim.fused_step)):
            opt.zero_grad(set_to_none=True)
            sum(sae.losses(x_BD, sae(x_BD)).values()).backward()
            norms.append(update(sae, opt, max_norm))
        assert norms[1].dtype == norms[0].dtype == torch.float64
        torch.testing.assert_close(norms[1], norms[0], rtol=1e-6, atol=0)
        for (n, p), q in zip(a.named_parameters(), b.parameters()):
            torch.testing.assert_close(q, p, rtol=0, atol=2e-4 * LR, msg=lambda m: f"{n} after step {step}: {m}")
            _close_to_scale(q.grad, p.grad, 5e-6, f"{n}.grad after step {step}")
            sa, sb = opt_a.state[p], opt_b.state[q]
            assert sa.keys() == sb.keys() and sb["step"].dtype == sa["step"].dtype and sb["step"] == sa["step"]
            for key in ("exp_avg", "exp_avg_sq"):
                _close_to_scale(sb[key], sa[key], 5e-6, f"{n} {key} after step {step}")
    assert len(calls) == 4  # the kernels ran, not the torch path
    rows = b.decoder_directions().norm(dim=-1)
    torch.testing.assert_close(rows, torch.ones_like(rows))  # unit-norm decoder rows (SPEC)
    if max_norm == 1e-2:
        assert norms[0] > 1e-2  # the clip was active


@pytest.mark.parametrize("case", ["relu", "global-norm", "untouched-decoder"])
def test_kernel_step_other_cases_equal_the_torch_path(case, lib, monkeypatch):
    """ReLU (no unit-norm decoder: no projection, no renormalisation); a global norm given by the caller
    (expert parallelism's `grad_norm`); a step whose decoder got no gradient (renormalised all the same)."""
    calls = []
    real = optim._kernel_step
    monkeypatch.setattr(optim, "_kernel_step", lambda *a: calls.append(1) or real(*a))
    cfg = SAEConfig(arch="relu", d_in=64, n_features=512) if case == "relu" else CONFIGS["switch"]
    (a, opt_a), (b, opt_b) = _pair(cfg)
    x_BD = torch.randn(128, 64)
    given = torch.tensor(123.0, dtype=torch.float64)  # far above max_norm: the clip scales by 1e-2 / 123
    norm_fn = (lambda: given) if case == "global-norm" else None
    for sae, opt, update in ((a, opt_a, torch_path), (b, opt_b, optim.fused_step)):
        sum(sae.losses(x_BD, sae(x_BD)).values()).backward()
        if case == "untouched-decoder":
            sae.W_dec.grad = None
            with torch.no_grad():
                sae.W_dec.mul_(2.0)  # rows of norm 2: the step must bring them back to 1
        if update is torch_path:
            sae.upkeep_gradients(1e-2, norm_fn)
            opt.step()
            sae.normalize_decoder()
        else:
            total = optim.fused_step(sae, opt, 1e-2, norm_fn)
            assert norm_fn is None or total is given
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(q, p, rtol=0, atol=2e-4 * LR, msg=lambda m: f"{n}: {m}")
    assert calls == [1]
    if cfg.arch == "switch":
        rows = b.decoder_directions().norm(dim=-1)
        torch.testing.assert_close(rows, torch.ones_like(rows))


def test_the_kernels_continue_a_state_made_by_torch_adam(lib):
    """Same state layout as torch's: a step of the kernels after a step of the torch path is the torch path's."""
    (a, opt_a), (b, opt_b) = _pair(CONFIGS["switch"])
    x_BD = torch.randn(128, 64)
    for update_a in (torch_path, optim.fused_step):
        for sae, opt, update in ((a, opt_a, update_a), (b, opt_b, torch_path)):
            opt.zero_grad()
            sum(sae.losses(x_BD, sae(x_BD)).values()).backward()
            update(sae, opt, 1.0)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=2e-4 * LR)
        assert float(opt_a.state[p]["step"]) == float(opt_b.state[q]["step"]) == 2


def test_switched_off_by_the_environment(monkeypatch):
    monkeypatch.setenv(kernels.ENV, "0")
    assert kernels.cpu_kernels() is None and not kernels.eligible(torch.zeros(3))
    (a, opt_a), (b, opt_b) = _pair(CONFIGS["topk"])
    x_BD = torch.randn(64, 64)
    for sae, opt in ((a, opt_a), (b, opt_b)):
        sum(sae.losses(x_BD, sae(x_BD)).values()).backward()
    optim.fused_step(a, opt_a, 1e-2)
    torch_path(b, opt_b, 1e-2)
    for p, q in zip(a.parameters(), b.parameters()):  # the torch path's blocked pass: the reference's numbers
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_no_compiler_falls_back_with_one_warning_line(monkeypatch, tmp_path):
    monkeypatch.setattr(kernels, "_lib", None)
    monkeypatch.setattr(kernels, "_failed", False)
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("SWITCH_SAE_CACHE", str(tmp_path / "cache"))
    (a, opt_a), (b, opt_b) = _pair(CONFIGS["switch"])
    x_BD = torch.randn(64, 64)
    with pytest.warns(kernels.KernelWarning) as record:  # at the first use (the forward's top-k), then never again
        for sae, opt in ((a, opt_a), (b, opt_b)):
            sum(sae.losses(x_BD, sae(x_BD)).values()).backward()
            optim.fused_step(sae, opt, 1.0)
    assert len(record) == 1
    message = str(record[0].message)
    assert "\n" not in message and "no-such-compiler" in message and kernels.ENV in message
    assert not (tmp_path / "cache" / "kernels").exists() or not any((tmp_path / "cache" / "kernels").rglob("*.so"))
    rows = a.decoder_directions().norm(dim=-1)
    torch.testing.assert_close(rows, torch.ones_like(rows))  # the torch path did the step


def test_a_failing_build_falls_back(monkeypatch, tmp_path):
    monkeypatch.setattr(kernels, "_lib", None)
    monkeypatch.setattr(kernels, "_failed", False)
    monkeypatch.setenv("SWITCH_SAE_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "bad.cpp"
    bad.write_text("this is not C++\n")
    monkeypatch.setattr(kernels, "SOURCE", bad)
    if kernels.shutil.which(os.environ.get("CXX") or "c++") is None:
        pytest.skip("no C++ compiler: the no-compiler test covers the fallback")
    with pytest.warns(kernels.KernelWarning, match="failed"):
        assert kernels.cpu_kernels() is None


def test_only_contiguous_float32_cpu_tensors_on_one_thread():
    x = torch.zeros(4, 4)
    assert kernels.eligible(x, None)
    assert not kernels.eligible(x.double())
    assert not kernels.eligible(x.t()[:, :2])
    assert not kernels.eligible(torch.zeros(4, 4, device="meta"))  # any non-CPU device (CUDA: same branch)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert not kernels.eligible(x)
    finally:
        torch.set_num_threads(before)


def test_importing_the_library_compiles_nothing(tmp_path):
    code = ("import switch_sae_core, switch_sae_core.train, switch_sae_core.optim, switch_sae_core.kernels as k; "
            "assert k._lib is None and not k._failed")
    env = dict(os.environ, SWITCH_SAE_CACHE=str(tmp_path))
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
    assert not (tmp_path / "kernels").exists()


# --- top-k of each row ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("T, W, k", [(64, 1536, 32), (8, 24576, 32), (33, 1000, 7), (5, 40, 1), (5, 19, 19),
                                     (3, 17, 16), (4, 3000, 100)])
def test_topk_kernel_selects_what_torch_topk_selects(lib, T, W, k):
    torch.manual_seed(W + k)
    x = torch.randn(T, W)
    x[0, : W // 2] = float("-inf")  # -inf entries are ranked like any number
    x[1] = torch.arange(W, dtype=torch.float32)  # increasing: every lane's maximum at the end
    x[2] = x[2].abs() - 10
    x[2, ::64] += 20  # the largest entries all in one lane of the kernel's bound
    vals, idx = kernels.topk_rows(lib, x, k)
    ref_vals = x.topk(k, dim=-1, sorted=True).values  # distinct values: one right answer
    assert torch.equal(vals.sort(-1, descending=True).values, ref_vals)  # the same values (in no particular order)
    assert torch.equal(x.gather(1, idx), vals) and idx.dtype == torch.int64
    assert all(len(set(row)) == k for row in idx.tolist())


def test_topk_kernel_breaks_ties_to_the_earlier_entry(lib):
    x = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0, 3.0, 0.0, 3.0],
                      [5.0] * 8,
                      [0.0, 1.0, 2.0, 2.0, 2.0, 1.0, 2.0, 2.0]])
    vals, idx = kernels.topk_rows(lib, x, 3)
    assert idx.sort(-1).values.tolist() == [[1, 2, 4], [0, 1, 2], [2, 3, 4]]
    assert torch.equal(vals.sort(-1, descending=True).values, x.topk(3, dim=-1).values)  # torch.topk's values
    x = torch.randint(0, 4, (200, 1536)).float()  # many ties, lanes of equal maxima
    vals, idx = kernels.topk_rows(lib, x, 32)
    assert torch.equal(vals.sort(-1, descending=True).values, x.topk(32, dim=-1).values)
    assert torch.equal(x.gather(1, idx), vals)
    ranked = [sorted(sorted(range(1536), key=lambda i: (-row[i], i))[:32]) for row in x[:20].tolist()]
    assert idx[:20].sort(-1).values.tolist() == ranked


def test_topk_rows_uses_the_kernel_and_lets_torch_handle_nan(lib, monkeypatch):
    from switch_sae_core import ops

    calls = []
    real = kernels.topk_rows
    monkeypatch.setattr(kernels, "topk_rows", lambda *a: calls.append(1) or real(*a))
    x = torch.randn(128, 1536)
    vals, idx = ops.topk_rows(x, 32)
    assert calls and torch.equal(vals.sort(-1, descending=True).values, x.topk(32, dim=-1).values)
    assert torch.equal(x.gather(1, idx), vals)
    x[3, 700] = float("nan")
    vals, idx = ops.topk_rows(x, 32)  # torch.topk's answer: NaN ranks above every number
    assert torch.isnan(vals[3]).sum() == 1 and idx[3][torch.isnan(vals[3])].item() == 700
    monkeypatch.setenv(kernels.ENV, "0")
    calls.clear()
    ops.topk_rows(torch.randn(16, 1536), 32)
    assert not calls
