"""The common inference interface of every architecture: `encode` (B, d) -> (B, n_latents) dense latents,
`decode` back, the flat (n_latents, d) decoder view, each checked against forward and against the
architecture's formula written densely here."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from switch_sae_core.config import SAEConfig
from switch_sae_core.saes import SAEInputError, build_sae
from switch_sae_core.saes.base import REGISTRY

from conftest import randomize_biases

SWITCH_CASES = {"top1": {}, "top2": {"top_e": 2}, "shared_top2": {"top_e": 2, "shared_expert": True},
                "heaviside": {"scale_by_router_prob": False},
                "scale": {"top_e": 2, "global_topk": True, "feature_scaling": True, "k": 6}}
CASES = {**{arch: {"arch": arch} for arch in sorted(REGISTRY) if arch != "switch"},
         **{f"switch-{name}": {"arch": "switch", "n_experts": 4, **kw} for name, kw in SWITCH_CASES.items()}}
X = torch.randn(48, 16, generator=torch.Generator().manual_seed(3)) * 2 + 0.5


def make(case: str):
    torch.manual_seed(0)
    sae = randomize_biases(build_sae(SAEConfig(**{"d_in": 16, "n_features": 64, "k": 4, **CASES[case]})))
    if hasattr(sae, "W_router"):
        with torch.no_grad():
            sae.W_router.mul_(5)  # a router that really discriminates: gates far from 1/N
            if sae.cfg.feature_scaling:
                sae.W_enc_hf_scale.normal_()  # it starts at 0
    return sae


def dense_formula(sae, x_BD: torch.Tensor) -> torch.Tensor:
    """(B, n_latents) the latents by each architecture's formula over ALL features (no sparse kernels)."""
    cfg, D = sae.cfg, sae.cfg.d_in
    if cfg.arch == "relu":
        return (x_BD @ sae.W_enc.T + sae.b_enc).relu()
    if cfg.arch == "gated":
        proj = (x_BD - sae.b_dec) @ sae.W_enc.T
        return ((proj + sae.b_gate) > 0).float() * (sae.r_mag.exp() * proj + sae.b_mag).relu()
    W_enc = sae.W_enc
    if cfg.feature_scaling:
        W_enc = W_enc + sae.W_enc_hf_scale[:, None, :] * (W_enc - W_enc.mean(1, keepdim=True))
    pre_BM = (x_BD - sae.b_pre) @ W_enc.reshape(-1, D).T
    if cfg.arch == "topk":
        vals, idx = pre_BM.topk(cfg.k, dim=-1)
        return torch.zeros_like(pre_BM).scatter(1, idx, vals.relu())
    assert cfg.arch == "switch"
    B, W, G = x_BD.shape[0], cfg.expert_width, sae.n_stacked
    probs_BN = F.softmax((x_BD - sae.b_router) @ sae.W_router.T, dim=-1)
    gate_BN, experts_BN = probs_BN.topk(cfg.top_e, dim=-1)
    gate_BG = torch.zeros(B, G).scatter(1, experts_BN, gate_BN if cfg.scale_by_router_prob else torch.ones_like(gate_BN))
    if cfg.shared_expert:
        gate_BG[:, -1] = 1.0
    pre_BGW = pre_BM.view(B, G, W)
    if cfg.global_topk:  # one TopK over the gate-scaled latents of the experts routed to
        scored_BM = (pre_BGW * gate_BG[:, :, None]).masked_fill(gate_BG[:, :, None] == 0, float("-inf")).reshape(B, -1)
        vals, idx = scored_BM.topk(cfg.k, dim=-1)
        return torch.zeros_like(pre_BM).scatter(1, idx, vals.relu())
    vals, idx = pre_BGW.topk(cfg.k, dim=-1)  # every expert's own TopK; the gate zeroes those not routed to
    return (torch.zeros_like(pre_BGW).scatter(2, idx, vals.relu()) * gate_BG[:, :, None]).reshape(B, -1)


@pytest.mark.parametrize("case", sorted(CASES))
def test_encode_decode_equal_forward_and_the_dense_formula(case):
    sae = make(case)
    if sae.cfg.arch not in ("topk", "relu", "gated", "switch"):
        pytest.skip(f"no dense formula written here for {sae.cfg.arch!r} (its own test file checks it)")
    z = sae.encode(X)
    assert z.shape == (48, sae.n_latents)
    torch.testing.assert_close(z, dense_formula(sae, X), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sae.decode(z), sae(X).x_hat, atol=1e-5, rtol=1e-5)
    assert (z != 0).any(0).sum() > sae.cfg.k  # not a trivial code: several features in use


@pytest.mark.parametrize("case", sorted(CASES))
def test_decode_is_the_flat_decoder_plus_bias_and_encode_is_differentiable(case):
    sae = make(case)
    assert sae.W_dec_flat.shape == (sae.n_latents, 16)
    assert sae.W_dec_flat.data_ptr() == sae.W_dec.data_ptr()  # a view: edits of W_dec show
    torch.testing.assert_close(sae.decode(torch.zeros(3, sae.n_latents)), sae.decoder_bias.expand(3, 16))
    one_hot = torch.eye(sae.n_latents)[:5] * 2.0
    torch.testing.assert_close(sae.decode(one_hot) - sae.decoder_bias, 2.0 * sae.W_dec_flat[:5])
    z = sae.encode(X)
    z.sum().backward()  # a probe or steering loss on the latents reaches the encoder
    assert sae.W_enc.grad is not None and sae.W_enc.grad.abs().sum() > 0


def test_switch_latents_are_the_routed_experts_gate_scaled():
    sae = make("switch-top1")
    out, z = sae(X), sae.encode(X)
    z_BGW = z.view(48, 4, -1)
    active = (z_BGW != 0).any(-1)
    assert active.sum(1).le(1).all()  # one expert per input
    fired = active.any(1)
    assert torch.equal(active[fired].float().argmax(1), out.expert_indices[fired, 0])
    gate = out.router_probs.gather(1, out.expert_indices)
    scattered = torch.zeros(48, sae.n_latents).scatter(1, out.latent_indices, out.latent_acts)
    torch.testing.assert_close(z, scattered * gate)  # forward's latent_acts are the unscaled a_j
    assert (gate < 0.9).any()  # the scaling is tested, not invisible


def test_decode_refuses_a_wrong_width():
    sae = make("switch-shared_top2")  # n_latents = M + M/N = 80, not n_features
    with pytest.raises(SAEInputError, match=r"expected latents of shape \(batch, 80\)"):
        sae.decode(torch.zeros(2, 64))
