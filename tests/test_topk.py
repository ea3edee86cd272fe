"""TopK SAE: sparse-backward fast path == dense autograd reference; AuxK; checkpoints; bad input."""
from __future__ import annotations

import json

import pytest
import torch

from switch_sae_core.config import ConfigError
from switch_sae_core.saes import CheckpointError, SAEOutput, TopKSAE, load_sae

X = torch.randn(48, 16, generator=torch.Generator().manual_seed(1)) * 2 + 0.5


def dense_reference(sae: TopKSAE, x_BD: torch.Tensor) -> torch.Tensor:
    """Gao et al. written plainly: dense pre-activations, TopK, ReLU, dense decode."""
    pre_BM = (x_BD - sae.b_pre) @ sae.W_enc.T
    vals_BK, idx_BK = pre_BM.topk(sae.cfg.k, dim=-1)
    z_BM = torch.zeros_like(pre_BM).scatter(1, idx_BK, vals_BK.relu())
    return z_BM @ sae.W_dec + sae.b_pre


def grads_of(sae, loss):
    sae.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.clone() for n, p in sae.named_parameters()}


@pytest.mark.parametrize("fast", [True, False], ids=["sparse_backward", "embedding_bag"])
@pytest.mark.parametrize("k", [4, 64])
def test_matches_dense_reference(make_sae, k, fast):
    sae = make_sae("topk", k=k)
    out = sae(X, fast=fast)
    g_fast = grads_of(sae, (out.x_hat - X).pow(2).sum())
    x_hat_ref = dense_reference(sae, X)
    g_ref = grads_of(sae, (x_hat_ref - X).pow(2).sum())
    torch.testing.assert_close(out.x_hat, x_hat_ref, atol=1e-5 * float(x_hat_ref.detach().abs().max()), rtol=1e-5)
    for name, g in g_ref.items():
        torch.testing.assert_close(g_fast[name], g, atol=1e-5 * float(g.abs().max()), rtol=1e-4, msg=name)


def test_outputs(make_sae):
    sae = make_sae("topk")
    out = sae(X)
    assert isinstance(out, SAEOutput)
    assert out.x_hat.shape == X.shape and out.latent_acts.shape == out.latent_indices.shape == (48, 4)
    assert out.pre_acts.shape == (48, 64) and not out.pre_acts.requires_grad
    assert (out.latent_acts >= 0).all()
    assert torch.equal(out.pre_acts.gather(1, out.latent_indices).relu(), out.latent_acts.detach())
    assert set(sae.losses(X, out)) == {"recon"}


def test_auxk_matches_hand_computation(make_sae):
    sae = make_sae("topk", auxk_coeff=1 / 32, auxk_k=8)
    with torch.no_grad():
        sae.b_pre.mul_(10)  # a b_pre added to the aux reconstruction would show
    dead_M = torch.zeros(64, dtype=torch.bool)
    dead_M[::3] = True
    out = sae(X)
    loss = sae.losses(X, out, dead_M)["auxk"]
    g_fast = grads_of(sae, loss)

    pre_BM = (X - sae.b_pre) @ sae.W_enc.T
    vals, idx = pre_BM.masked_fill(~dead_M, float("-inf")).topk(8, dim=-1)
    e_hat = torch.zeros_like(pre_BM).scatter(1, idx, vals.relu()) @ sae.W_dec  # WITHOUT b_pre
    e = (X - out.x_hat).detach()
    ref = (e_hat - e).pow(2).sum() / e.pow(2).sum() / 32
    g_ref = grads_of(sae, ref)
    torch.testing.assert_close(loss, ref)
    for name, g in g_ref.items():
        torch.testing.assert_close(g_fast[name], g, atol=1e-6, rtol=1e-4, msg=name)
    assert g_fast["W_enc"][dead_M].abs().sum() > 0 and g_fast["W_enc"][~dead_M].abs().sum() == 0
    # with b_pre added to e_hat the value would differ: the check above is sensitive to it
    wrong = (e_hat + sae.b_pre - e).pow(2).sum() / e.pow(2).sum() / 32
    assert abs(wrong.item() - ref.item()) > 1e-3
    # more requested than dead: only dead latents are used; none dead: the term is 0
    few = torch.zeros(64, dtype=torch.bool)
    few[5] = True
    g_few = grads_of(sae, sae.losses(X, sae(X), few)["auxk"])
    assert g_few["W_enc"][5].abs().sum() > 0 and g_few["W_enc"][~few].abs().sum() == 0
    assert sae.losses(X, out, torch.zeros(64, dtype=torch.bool))["auxk"].item() == 0


def test_interface(make_sae, checks, tmp_path):
    checks.roundtrip(make_sae("topk"), X, tmp_path / "topk")
    checks.input_errors(make_sae("topk"))
    checks.normalize_decoder(make_sae("topk"))
    checks.remove_parallel_grads(make_sae("topk"), X)
    checks.n_params(make_sae("topk"))
    checks.encode_decode(make_sae("topk"), X)
    assert TopKSAE(d_in=768, n_features=3072, k=32).n_params == 2 * 3072 * 768 + 768  # SPEC: 2Md + d
    assert TopKSAE(d_in=8, n_features=32, k=4).flops_per_input()["encoder"] == 2 * 32 * 8


def test_config_errors():
    with pytest.raises(ConfigError, match="k=40 is larger"):
        TopKSAE(d_in=8, n_features=32, k=40)
    with pytest.raises(ConfigError, match="only apply to arch='switch'"):
        TopKSAE(d_in=8, n_features=32, k=4, n_experts=2)


def test_unreadable_checkpoints(make_sae, tmp_path):
    sae = make_sae("topk")
    good = sae.save(tmp_path / "good")
    with pytest.raises(CheckpointError, match="config.json is missing"):
        (tmp_path / "noconfig").mkdir()
        (tmp_path / "noconfig" / "sae.safetensors").write_bytes((good / "sae.safetensors").read_bytes())
        load_sae(tmp_path / "noconfig")
    with pytest.raises(CheckpointError, match="is not an SAE checkpoint"):
        load_sae(tmp_path / "nothing_here")
    truncated = sae.save(tmp_path / "truncated")
    data = (truncated / "sae.safetensors").read_bytes()
    (truncated / "sae.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="unreadable"):
        load_sae(truncated)
    garbage = sae.save(tmp_path / "garbage")
    (garbage / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not a valid SAE config"):
        load_sae(garbage)
    mismatch = sae.save(tmp_path / "mismatch")
    cfg = json.loads((mismatch / "config.json").read_text())
    (mismatch / "config.json").write_text(json.dumps({**cfg, "n_features": 128}))
    with pytest.raises(CheckpointError, match="do not match config.json"):
        load_sae(mismatch)
