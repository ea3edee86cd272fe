"""Shared fixtures: small SAEs of every architecture with non-trivial (random) biases."""
from __future__ import annotations

import pytest
import torch

from switch_sae_core.config import SAEConfig
from switch_sae_core.saes import build_sae

SMALL = dict(d_in=16, n_features=64, k=4)


def randomize_biases(sae: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every 1-D parameter (biases, r_mag) random, so a test cannot pass by a bias being zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in sae.parameters():
            if p.ndim == 1:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return sae


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a test module (use: `pytestmark = pytest.mark.usefixtures("one_thread")`): tiny SAEs
    pay more for thread hand-offs than for their matmuls (10x slower on a busy CPU), and a forked child must not
    inherit a busy thread pool."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def make_sae():
    """make_sae(arch, **overrides) -> a small SAE with random biases, built with a fixed seed."""

    def make(arch: str, seed: int = 0, **overrides):
        torch.manual_seed(seed)
        cfg = SAEConfig(arch=arch, **{**SMALL, **({"n_experts": 4} if arch == "switch" else {}), **overrides})
        return randomize_biases(build_sae(cfg), seed)

    return make


class InterfaceChecks:
    """Checks every architecture must pass; each test_<arch>.py calls them on its own SAE."""

    @staticmethod
    def roundtrip(sae, x, directory):
        from switch_sae_core.saes import load_sae

        sae.save(directory)
        loaded = load_sae(directory)
        assert type(loaded) is type(sae) and loaded.cfg == sae.cfg
        for a, b in zip(sae(x), loaded(x)):
            assert (a is None and b is None) or torch.equal(a, b)

    @staticmethod
    def input_errors(sae):
        from switch_sae_core.saes import SAEInputError

        d = sae.cfg.d_in
        with pytest.raises(SAEInputError, match=rf"expected activations of shape \(batch, {d}\)"):
            sae(torch.randn(4, d + 1))
        with pytest.raises(SAEInputError, match="expected activations of shape"):
            sae(torch.randn(d))
        with pytest.raises(SAEInputError, match="empty batch"):
            sae(torch.randn(0, d))
        with pytest.raises(SAEInputError, match="expected floating-point activations, got dtype torch.int64"):
            sae(torch.ones(4, d, dtype=torch.long))
        bad = torch.randn(4, d)
        bad[1, 0], bad[3, 2] = float("nan"), float("inf")
        with pytest.raises(SAEInputError, match="2 of 4 activation vectors contain NaN or Inf"):
            sae(bad)
        huge = torch.full((4, d), 3e38)  # finite, though their sum overflows: not refused
        assert torch.equal(sae.check_input(huge), huge)
        x = torch.randn(4, d, dtype=torch.float64)  # other float precisions are cast to the SAE's dtype
        out64, out32 = sae(x), sae(x.float())
        assert out64.x_hat.dtype == torch.float32 and torch.equal(out64.x_hat, out32.x_hat)

    @staticmethod
    def normalize_decoder(sae):
        with torch.no_grad():
            sae.W_dec.mul_(torch.rand(sae.W_dec.shape[:-1])[..., None] + 0.5)
        sae.normalize_decoder()
        norms = sae.W_dec.norm(dim=-1)
        torch.testing.assert_close(norms, torch.ones_like(norms))

    @staticmethod
    def remove_parallel_grads(sae, x):
        sae.normalize_decoder()
        sae.zero_grad(set_to_none=True)
        sum(sae.losses(x, sae(x)).values()).backward()
        assert sae.W_dec.grad.abs().sum() > 0
        sae.remove_parallel_grads()
        along_rows = (sae.W_dec.grad * sae.W_dec).sum(-1)
        torch.testing.assert_close(along_rows, torch.zeros_like(along_rows), atol=1e-5, rtol=0)

    @staticmethod
    def n_params(sae):
        assert sae.n_params == sum(p.numel() for p in sae.parameters())
        f = sae.flops_per_input()
        assert set(f) == {"router", "encoder", "decoder", "total"}
        assert f["total"] == f["router"] + f["encoder"] + f["decoder"]

    @staticmethod
    def encode_decode(sae, x):
        """The common inference interface: dense (B, n_latents) latents whose decode is forward's x_hat,
        decoded through the flat (n_latents, D) decoder view."""
        out, z = sae(x), sae.encode(x)
        assert z.shape == (x.shape[0], sae.n_latents) and sae.W_dec_flat.shape == (sae.n_latents, sae.cfg.d_in)
        assert sae.W_dec_flat.data_ptr() == sae.W_dec.data_ptr()  # a view, not a copy
        torch.testing.assert_close(sae.decode(z), out.x_hat, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(sae.decode(z), z @ sae.W_dec_flat + sae.decoder_bias)
        assert (z != 0).sum(1).le(sae.n_latents).all()

    @staticmethod
    def matches_reference(sae, x, reference):
        """Output, summed loss and every parameter gradient equal `reference(sae, x) -> (x_hat, loss)`."""
        out = sae(x)
        loss = sum(sae.losses(x, out).values())
        grads = torch.autograd.grad(loss, list(sae.parameters()))
        x_hat_ref, loss_ref = reference(sae, x)
        grads_ref = torch.autograd.grad(loss_ref, list(sae.parameters()))
        torch.testing.assert_close(out.x_hat, x_hat_ref)
        torch.testing.assert_close(loss, loss_ref)
        for (name, _), g, g_ref in zip(sae.named_parameters(), grads, grads_ref):
            torch.testing.assert_close(g, g_ref, atol=1e-5, rtol=1e-4, msg=name)
        return out


@pytest.fixture
def checks():
    return InterfaceChecks
