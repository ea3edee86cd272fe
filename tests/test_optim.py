"""optim.fused_step equals the multi-pass recipe (projection, clipping, torch's fused Adam, renormalisation)."""
import copy

import pytest
import torch

from switch_sae_core import kernels, optim
from switch_sae_core.config import SAEConfig
from switch_sae_core.saes import build_sae


@pytest.fixture(autouse=True)
def torch_path(monkeypatch):
    """This file tests the torch path of fused_step; the C++ kernels' path is compared with it in test_kernels.py."""
    monkeypatch.setenv(kernels.ENV, "0")


def multi_pass(sae, opt, max_norm):
    """The reference: the three separate passes the trainer made before."""
    total = sae.upkeep_gradients(max_norm)
    opt.step()
    sae.normalize_decoder()
    return total


def _pair(cfg, **adam):
    torch.manual_seed(0)
    a = build_sae(cfg)
    b = copy.deepcopy(a)
    kw = dict(lr=1e-2, fused=True, **adam)
    return (a, torch.optim.Adam(a.parameters(), **kw)), (b, torch.optim.Adam(b.parameters(), **kw))


CONFIGS = {  # W_dec of 512 KiB: several blocks (the tests set 128 KiB), and a last partial one
    "topk": SAEConfig(arch="topk", d_in=64, n_features=2000, k=8),
    "switch": SAEConfig(arch="switch", d_in=64, n_features=2048, k=8, n_experts=4),
    "switch-shared": SAEConfig(arch="switch", d_in=64, n_features=1024, k=8, n_experts=4, shared_expert=True),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("max_norm", [1e-2, 1e9, 0.0], ids=["clipped", "unclipped", "no-clip"])
@pytest.mark.parametrize("adam", [{}, dict(weight_decay=0.1, betas=(0.0, 0.999))], ids=["default", "wd-beta0"])
def test_fused_step_equals_the_multi_pass_recipe(name, max_norm, adam, monkeypatch):
    monkeypatch.setattr(optim, "FUSED_BLOCK_BYTES", 1 << 17)  # several blocks per matrix here
    (a, opt_a), (b, opt_b) = _pair(CONFIGS[name], **adam)
    x_BD = torch.randn(256, 64)
    for step in range(3):
        norms = []
        for sae, opt, update in ((a, opt_a, multi_pass), (b, opt_b, optim.fused_step)):
            opt.zero_grad(set_to_none=True)
            sum(sae.losses(x_BD, sae(x_BD)).values()).backward()
            norms.append(update(sae, opt, max_norm))
        torch.testing.assert_close(norms[1], norms[0], rtol=0, atol=0)
        for (n, p), q in zip(a.named_parameters(), b.parameters()):
            torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7, msg=f"{n} after step {step}")
            sa, sb = opt_a.state[p], opt_b.state[q]
            assert sa.keys() == sb.keys() and sb["step"].dtype == sa["step"].dtype and sb["step"] == sa["step"]
            for key in ("exp_avg", "exp_avg_sq"):
                torch.testing.assert_close(sb[key], sa[key], rtol=1e-6, atol=1e-9, msg=f"{n} {key}")
    rows = b.decoder_directions().norm(dim=-1)
    torch.testing.assert_close(rows, torch.ones_like(rows))  # unit-norm decoder rows (SPEC)
    if max_norm == 1e-2:  # the clip was active: the fused pass scaled what the reference scaled
        assert norms[0] > 1e-2


def test_fused_step_resumes_a_state_saved_by_torch_adam():
    """The state layout is torch's: a state_dict written by the reference loads into the fused path."""
    (a, opt_a), (b, opt_b) = _pair(CONFIGS["topk"])
    x_BD = torch.randn(128, 64)
    for sae, opt, update in ((a, opt_a, multi_pass), (b, opt_b, multi_pass)):
        opt.zero_grad()
        sum(sae.losses(x_BD, sae(x_BD)).values()).backward()
        update(sae, opt, 1.0)
    for sae, opt, update in ((a, opt_a, multi_pass), (b, opt_b, optim.fused_step)):
        opt.zero_grad()
        sum(sae.losses(x_BD, sae(x_BD)).values()).backward()
        update(sae, opt, 1.0)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("adam", [dict(fused=False), dict(fused=True, amsgrad=True)])
def test_other_optimizers_take_the_multi_pass_recipe(adam):
    torch.manual_seed(0)
    sae = build_sae(CONFIGS["topk"])
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2, **adam)
    assert not optim.supports_fused_step(opt)
    ref = copy.deepcopy(sae)
    opt_ref = torch.optim.Adam(ref.parameters(), lr=1e-2, **adam)
    x_BD = torch.randn(64, 64)
    for s, o, update in ((ref, opt_ref, multi_pass), (sae, opt, optim.fused_step)):
        sum(s.losses(x_BD, s(x_BD)).values()).backward()
        update(s, o, 1e-2)
    for p, q in zip(ref.parameters(), sae.parameters()):
        torch.testing.assert_close(q, p, rtol=0, atol=0)
    assert optim.supports_fused_step(torch.optim.Adam(sae.parameters(), fused=True))
