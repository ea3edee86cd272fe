"""Gated SAE (Rajamanoharan et al. 2024) against the paper's equations written out plainly."""
from __future__ import annotations

import torch

from switch_sae_core.saes import GatedSAE, SAEOutput

X = torch.randn(40, 16, generator=torch.Generator().manual_seed(3)) * 2


def paper_forward_and_loss(sae: GatedSAE, x):
    """Eqs. of the paper: separate gate and magnitude matrices, W_mag = exp(r_mag) * W_gate."""
    x_centred = x - sae.b_dec
    W_gate = sae.W_enc
    W_mag = torch.exp(sae.r_mag)[:, None] * W_gate
    pi_gate = x_centred @ W_gate.T + sae.b_gate
    f_gate = (pi_gate > 0).float()
    f_mag = torch.relu(x_centred @ W_mag.T + sae.b_mag)
    x_hat = (f_gate * f_mag) @ sae.W_dec + sae.b_dec
    l_recon = ((x - x_hat) ** 2).sum(1).mean()
    l_sparsity = sae.cfg.l1_coeff * torch.relu(pi_gate).abs().sum(1).mean()
    x_hat_frozen = torch.relu(pi_gate) @ sae.W_dec.detach() + sae.b_dec.detach()
    l_aux = ((x - x_hat_frozen) ** 2).sum(1).mean()
    return x_hat, l_recon + l_sparsity + l_aux


def test_matches_paper_formula(make_sae, checks):
    sae = make_sae("gated", l1_coeff=0.3)
    out = checks.matches_reference(sae, X, paper_forward_and_loss)
    assert 0 < (out.latent_acts > 0).float().mean() < 1  # some features on, some off


def test_gate_aux_does_not_train_the_decoder(make_sae):
    sae = make_sae("gated")
    aux = sae.losses(X, sae(X))["gate_aux"]
    grads = dict(zip([n for n, _ in sae.named_parameters()],
                     torch.autograd.grad(aux, list(sae.parameters()), allow_unused=True)))
    assert grads["W_dec"] is None
    assert grads["W_enc"].abs().sum() > 0 and grads["b_gate"].abs().sum() > 0
    assert grads["r_mag"] is None and grads["b_mag"] is None  # the aux path is the gate path only


def test_interface(make_sae, checks, tmp_path):
    sae = make_sae("gated")
    out = sae(X)
    assert isinstance(out, SAEOutput) and out.latent_indices is None and out.latent_acts.shape == (40, 64)
    assert set(sae.losses(X, out)) == {"recon", "l1", "gate_aux"}
    checks.roundtrip(sae, X, tmp_path / "gated")
    checks.input_errors(sae)
    checks.normalize_decoder(make_sae("gated"))
    checks.remove_parallel_grads(make_sae("gated"), X)
    checks.n_params(sae)
    checks.encode_decode(sae, X)
    assert GatedSAE(d_in=8, n_features=32).n_params == 2 * 32 * 8 + 3 * 32 + 8
