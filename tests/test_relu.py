"""ReLU SAE (Conerly et al. April update) against the paper's formula written out plainly."""
from __future__ import annotations

import torch

from switch_sae_core.saes import ReLUSAE, SAEOutput

X = torch.randn(40, 16, generator=torch.Generator().manual_seed(2)) * 2


def paper_loss(sae: ReLUSAE, x):
    """L = E_x[ ||x - x_hat||^2 + lambda sum_i f_i(x) ||W_dec,i|| ], one feature at a time."""
    f = torch.relu(torch.einsum("md,bd->bm", sae.W_enc, x) + sae.b_enc)
    x_hat = torch.einsum("bm,md->bd", f, sae.W_dec) + sae.b_dec
    penalty = sum(f[:, i] * sae.W_dec[i].norm() for i in range(sae.cfg.n_features))
    return x_hat, ((x - x_hat) ** 2).sum(1).mean() + sae.cfg.l1_coeff * penalty.mean()


def test_matches_paper_formula(make_sae, checks):
    checks.matches_reference(make_sae("relu", l1_coeff=0.7), X, paper_loss)


def test_outputs_and_decoder_norms_free(make_sae, checks, tmp_path):
    sae = make_sae("relu")
    out = sae(X)
    assert isinstance(out, SAEOutput) and out.latent_indices is None
    assert out.latent_acts.shape == (40, 64) and (out.latent_acts >= 0).all()
    assert set(sae.losses(X, out)) == {"recon", "l1"}
    # the decoder norms are part of the objective: upkeep leaves them (and their gradient) alone
    assert not sae.unit_norm_decoder
    torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.full((64,), 0.1))  # Conerly et al. init
    before = sae.W_dec.detach().clone()
    sae.normalize_decoder()
    assert torch.equal(sae.W_dec, before)
    sum(sae.losses(X, sae(X)).values()).backward()
    grad = sae.W_dec.grad.clone()
    sae.remove_parallel_grads()
    assert torch.equal(sae.W_dec.grad, grad)
    checks.roundtrip(sae, X, tmp_path / "relu")
    checks.input_errors(sae)
    checks.n_params(sae)
    checks.encode_decode(sae, X)
    assert ReLUSAE(d_in=8, n_features=32).n_params == 2 * 32 * 8 + 32 + 8
