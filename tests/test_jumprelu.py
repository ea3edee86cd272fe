"""JumpReLU SAE (Rajamanoharan et al. 2024; SAELens jumprelu_sae.py): the straight-through estimators against the
gradient of the kernel-smoothed loss, written another way (autograd through a ramp) and by finite differences."""
from __future__ import annotations

import math

import pytest
import torch

from switch_sae_core.saes import JumpReLUSAE, SAEOutput
from switch_sae_core.saes.jumprelu import BANDWIDTH, INIT_THRESHOLD

X = torch.randn(40, 16, generator=torch.Generator().manual_seed(3)) * 2


def ramp(u):
    """H smoothed by the rectangle kernel of unit width: the integral of K, 0 -> 1 over (-1/2, 1/2)."""
    return (u + 0.5).clamp(0, 1)


def near_threshold_sae(make_sae, dtype="float32", l1_coeff=1e-5):
    """An SAE whose bandwidth is wide enough that many pre-activations lie within eps/2 of their threshold."""
    sae = make_sae("jumprelu", l1_coeff=l1_coeff, dtype=dtype)
    with torch.no_grad():
        sae.input_scale.fill_(400.0)  # eps = 0.4
        sae.log_threshold.copy_(torch.log(torch.rand(64, generator=torch.Generator().manual_seed(1)) + 0.3))
    return sae


def smoothed_reference(sae: JumpReLUSAE, x):
    """Forward exactly as the paper; theta's gradient from autograd through ramps whose values cancel:
    z = pre H(pre - theta) + theta (ramp - ramp.detach()) has d/dtheta = -(theta/eps) K, and no extra d/dpre."""
    eps, theta = sae.bandwidth, sae.log_threshold.exp()
    pre = x @ sae.W_enc.T + sae.b_enc
    mask = (pre > theta).float().detach()
    r = ramp((pre.detach() - theta) / eps)
    z = pre * mask + theta.detach() * (r - r.detach())
    x_hat = z @ sae.W_dec + sae.b_dec
    l0 = (mask + r - r.detach()).sum(1).mean()
    lam = sae.cfg.l1_coeff * sae.sparsity_warmup * float(sae.input_scale) ** 2
    return x_hat, ((x - x_hat) ** 2).sum(1).mean() + lam * l0


def test_matches_smoothed_reference(make_sae, checks):
    sae = near_threshold_sae(make_sae)
    pre = X @ sae.W_enc.T + sae.b_enc
    near = ((pre - sae.threshold).abs() < sae.bandwidth / 2).sum(0)
    assert (near > 0).sum() > 20  # the kernel is non-zero for many latents: the theta-gradients are tested
    out = checks.matches_reference(sae, X, smoothed_reference)
    assert 0 < (out.latent_acts != 0).float().mean() < 1
    # a JumpReLU: active latents equal their pre-activation (no shrinkage), the rest are 0
    on = out.latent_acts != 0
    torch.testing.assert_close(out.latent_acts[on], pre[on])
    assert (pre[on] > sae.threshold.expand_as(pre)[on]).all()


def test_l0_threshold_gradient_is_finite_difference_of_smoothed_l0(make_sae):
    """d(l0 term)/d log_threshold from the Step STE == central differences of lambda * mean_b sum_i ramp((pre - theta)/eps)."""
    sae = near_threshold_sae(make_sae, dtype="float64")
    x = X.double()
    (g,) = torch.autograd.grad(sae.losses(x, sae(x))["l0"], sae.log_threshold)
    lam = sae.cfg.l1_coeff * float(sae.input_scale) ** 2
    pre = (x @ sae.W_enc.T + sae.b_enc).detach()

    def smoothed(log_theta):
        return lam * ramp((pre - log_theta.exp()) / sae.bandwidth).sum(1).mean()

    h, fd = 1e-7, torch.zeros(64, dtype=torch.float64)
    with torch.no_grad():
        for i in range(64):
            e = torch.zeros(64, dtype=torch.float64)
            e[i] = h
            fd[i] = (smoothed(sae.log_threshold + e) - smoothed(sae.log_threshold - e)) / (2 * h)
    torch.testing.assert_close(g, fd, rtol=1e-5, atol=1e-8)
    assert (g != 0).sum() > 20 and (g <= 0).all()  # raising a threshold only lowers L0


def test_init_from_activations_sets_the_paper_units(make_sae):
    sae = make_sae("jumprelu")
    assert float(sae.input_scale) == 1 and sae.bandwidth == BANDWIDTH  # the paper's normalised data
    torch.testing.assert_close(JumpReLUSAE(d_in=16, n_features=8).threshold, torch.full((8,), INIT_THRESHOLD))
    x = 30 * X
    sae.init_from_activations(x)
    scale = math.sqrt(float(x.pow(2).sum(1).mean()))
    assert float(sae.input_scale) == pytest.approx(scale, rel=1e-6)
    assert sae.bandwidth == pytest.approx(BANDWIDTH * scale, rel=1e-6)
    torch.testing.assert_close(sae.threshold, torch.full((64,), INIT_THRESHOLD * scale), rtol=1e-6, atol=0)
    # the L0 term is lambda * s^2 * L0: scaling the data by c and lambda unchanged keeps the loss's balance
    out = sae(x)
    l0 = float((out.latent_acts != 0).sum(1).float().mean())
    assert sae.losses(x, out)["l0"].item() == pytest.approx(sae.cfg.l1_coeff * scale**2 * l0, rel=1e-5)


def test_trainer_warms_up_lambda_and_lr():
    from switch_sae_core.config import SAEConfig, TrainConfig
    from switch_sae_core.data.synthetic import SyntheticConfig, SyntheticSource
    from switch_sae_core.train import lr_factor, train_sae

    source = SyntheticSource(SyntheticConfig(d_in=16, n_features=64, n_clusters=4, l0=3))
    seen = []
    result = train_sae(SAEConfig(arch="jumprelu", d_in=16, n_features=64, l1_coeff=0.01), source,
                       TrainConfig(steps=3, batch_size=64, lr=1e-3, geometric_median_batch=256, progress=False,
                                   sparsity_warmup_steps=4, lr_warmup_steps=2, log_every=1),
                       callback=lambda row: seen.append((row["lr"], row["loss/l0"])))
    assert result.sae.sparsity_warmup == 0.75
    assert [lr for lr, _ in seen] == pytest.approx([5e-4, 1e-3, 1e-3 * lr_factor(2, 3, 0.2)])
    assert float(result.sae.input_scale) > 1  # set from the geometric-median batch
    assert lr_factor(0, 100, 0.2, warmup_steps=10) == pytest.approx(0.1)
    assert lr_factor(95, 100, 0.2, warmup_steps=10) == pytest.approx(0.25)


def test_interface(make_sae, checks, tmp_path):
    sae = make_sae("jumprelu")
    out = sae(X)
    assert isinstance(out, SAEOutput) and out.latent_indices is None and out.latent_acts.shape == (40, 64)
    assert set(sae.losses(X, out)) == {"recon", "l0"}
    checks.roundtrip(sae, X, tmp_path / "jumprelu")
    checks.input_errors(sae)
    checks.normalize_decoder(make_sae("jumprelu"))
    checks.remove_parallel_grads(make_sae("jumprelu"), X)
    checks.n_params(sae)
    assert JumpReLUSAE(d_in=8, n_features=32).n_params == 2 * 32 * 8 + 2 * 32 + 8
