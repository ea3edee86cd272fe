"""BatchTopK SAE (Bussmann et al. 2024; SAELens batchtopk_sae.py) against a dense reference written plainly."""
from __future__ import annotations

import pytest
import torch

from switch_sae_core.saes import BatchTopKSAE, SAEOutput, load_sae
from switch_sae_core.saes.batchtopk import THRESHOLD_LR

X = torch.randn(40, 16, generator=torch.Generator().manual_seed(3)) * 2 + 0.5


def dense_reference(sae: BatchTopKSAE, x):
    """SAELens's BatchTopK activation: ReLU, then the k*B largest over the flattened batch, dense decode."""
    acts = ((x - sae.b_dec) @ sae.W_enc.T + sae.b_enc).relu()
    top = acts.flatten().topk(sae.cfg.k * x.shape[0])
    z = torch.zeros_like(acts.flatten()).scatter(0, top.indices, top.values).view_as(acts)
    x_hat = z @ sae.W_dec + sae.b_dec
    return x_hat, ((x - x_hat) ** 2).sum(1).mean()


@pytest.mark.parametrize("k", [1, 4, 20])
def test_matches_dense_reference(make_sae, checks, k):
    sae = make_sae("batchtopk", k=k)
    out = checks.matches_reference(sae, X, dense_reference)
    # exactly k * B latents on in the batch, and rows differ in how many they use (not TopK per row)
    assert int((out.latent_acts != 0).sum()) == k * X.shape[0]
    per_row = (out.latent_acts != 0).sum(1)
    assert per_row.max() > per_row.min()


def test_threshold_estimate_and_eval_mode(make_sae):
    sae = make_sae("batchtopk")
    assert float(sae.threshold) == 0.0
    out = sae(X)
    kept_min = out.latent_acts[out.latent_acts > 0].min().double()
    torch.testing.assert_close(sae.threshold, THRESHOLD_LR * kept_min)  # EMA from 0 after one batch
    with torch.no_grad():
        sae(X)  # a forward without autograd does not train: theta unchanged
    torch.testing.assert_close(sae.threshold, THRESHOLD_LR * kept_min)
    with torch.no_grad():
        sae.threshold.fill_(float(kept_min))
    sae.eval()
    out_eval = sae(X)
    pre = (X - sae.b_dec) @ sae.W_enc.T + sae.b_enc
    z_ref = pre.relu() * (pre > kept_min.float())
    torch.testing.assert_close(out_eval.latent_acts, z_ref)
    torch.testing.assert_close(out_eval.x_hat, z_ref @ sae.W_dec + sae.b_dec)
    # per input: a row's latents do not depend on the other rows of the batch
    torch.testing.assert_close(sae(X[:3]).x_hat, out_eval.x_hat[:3])
    assert float(sae.threshold) == float(kept_min)  # eval mode never updates theta


def test_auxk_matches_hand_computation(make_sae):
    sae = make_sae("batchtopk", auxk_coeff=1 / 32, auxk_k=8)
    dead = torch.zeros(64, dtype=torch.bool)
    dead[::3] = True
    out = sae(X)
    aux = sae.losses(X, out, dead)["auxk"]
    pre = ((X - sae.b_dec) @ sae.W_enc.T + sae.b_enc).detach()
    vals, idx = pre.masked_fill(~dead, float("-inf")).topk(8, dim=-1)
    e_hat = torch.zeros_like(pre).scatter(1, idx, vals.relu()) @ sae.W_dec
    e = (X - out.x_hat).detach()
    torch.testing.assert_close(aux, (e_hat - e).pow(2).sum() / e.pow(2).sum() / 32)
    (g_enc,) = torch.autograd.grad(aux, sae.W_enc)
    assert g_enc[dead].abs().sum() > 0 and g_enc[~dead].abs().sum() == 0


def test_learns_k_on_average_per_input_at_eval():
    """Trained briefly, the estimated threshold makes the per-input SAE use about k latents per input."""
    from switch_sae_core.config import SAEConfig, TrainConfig
    from switch_sae_core.data.synthetic import SyntheticConfig, SyntheticSource
    from switch_sae_core.heldout import reconstruction_metrics
    from switch_sae_core.train import train_sae

    source = SyntheticSource(SyntheticConfig(d_in=16, n_features=64, n_clusters=4, l0=3))
    result = train_sae(SAEConfig(arch="batchtopk", d_in=16, n_features=64, k=4), source,
                       TrainConfig(steps=300, batch_size=64, lr=1e-2, geometric_median_batch=256, progress=False))
    held = reconstruction_metrics(result.sae, next(iter(source.batches(2048, seed=5))))
    assert 3.0 < held["l0"] < 5.0 and held["fvu"] < 0.2
    assert result.sae.training  # reconstruction_metrics restores train mode


def test_interface(make_sae, checks, tmp_path):
    sae = make_sae("batchtopk")
    out = sae(X)
    assert isinstance(out, SAEOutput) and out.latent_indices is None and out.latent_acts.shape == (40, 64)
    assert set(sae.losses(X, out)) == {"recon"}
    checks.roundtrip(sae, X, tmp_path / "batchtopk")
    loaded = load_sae(sae.save(tmp_path / "batchtopk_eval"))  # the threshold buffer is saved and loaded
    assert loaded.threshold.dtype == torch.float64 and float(loaded.threshold) == float(sae.threshold) > 0
    torch.testing.assert_close(loaded.eval()(X).x_hat, sae.eval()(X).x_hat, rtol=0, atol=0)
    checks.input_errors(make_sae("batchtopk"))
    checks.normalize_decoder(make_sae("batchtopk"))
    checks.remove_parallel_grads(make_sae("batchtopk"), X)
    checks.n_params(sae)
    assert BatchTopKSAE(d_in=8, n_features=32, k=4).flops_per_input()["decoder"] == 2 * 4 * 8
