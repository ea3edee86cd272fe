"""Switch SAE: real routing == the authors' dense-mask formulation, outputs and all gradients."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from switch_sae_core.config import ConfigError, SAEConfig
from switch_sae_core.saes import SwitchOutput, SwitchSAE, load_sae
from switch_sae_core.saes.switch import dispatch, experts_forward


def dense_reference(sae: SwitchSAE, x_BD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The authors' formulation: ALL pre-activations, unchosen experts masked, TopK, dense decode.
    -> (x_hat_BD, aux_loss, pre_BM of all stacked experts)."""
    cfg = sae.cfg
    B, D = x_BD.shape
    N, W, G = cfg.n_experts, cfg.expert_width, sae.n_stacked
    probs_BN = F.softmax((x_BD - sae.b_router) @ sae.W_router.T, dim=-1)
    gate_BE, experts_BE = probs_BN.topk(cfg.top_e, dim=-1)
    if not cfg.scale_by_router_prob:
        gate_BE = torch.ones_like(gate_BE)
    slots = [(experts_BE[:, e], gate_BE[:, e]) for e in range(cfg.top_e)]
    if cfg.shared_expert:
        slots.append((torch.full((B,), N), torch.ones(B)))
    W_enc = sae.W_enc
    if cfg.feature_scaling:  # Scale SAE: each expert's rows minus their mean, amplified per dimension
        W_enc = torch.stack([W_enc[g] + sae.W_enc_hf_scale[g] * (W_enc[g] - W_enc[g].sum(0) / W) for g in range(G)])
    pre_BM = (x_BD - sae.b_pre) @ W_enc.reshape(-1, D).T
    x_hat_BD = sae.b_pre.expand(B, D)
    if cfg.global_topk:  # Scale SAE: ONE TopK over the gate-scaled pre-activations of every expert used
        gate_BG = torch.zeros(B, G)
        for expert_B, gate_B in slots:
            gate_BG = gate_BG + F.one_hot(expert_B, G) * gate_B[:, None]
        gate_BM = gate_BG.repeat_interleave(W, dim=1)
        scored_BM = (pre_BM * gate_BM).masked_fill(gate_BM == 0, float("-inf"))
        vals_BK, idx_BK = scored_BM.topk(cfg.k, dim=-1)
        z_BM = torch.zeros_like(pre_BM).scatter(1, idx_BK, vals_BK.relu())
        f_N = torch.bincount(experts_BE.reshape(-1), minlength=N).float() / experts_BE.numel()
        return x_hat_BD + z_BM @ sae.W_dec.reshape(-1, D), N * (f_N * probs_BN.mean(0)).sum(), pre_BM
    for expert_B, gate_B in slots:
        chosen_BG = F.one_hot(expert_B, G).bool()
        masked_BM = pre_BM.view(B, G, W).masked_fill(~chosen_BG[:, :, None], float("-inf")).reshape(B, -1)
        vals_BK, idx_BK = masked_BM.topk(cfg.k, dim=-1)
        z_BM = torch.zeros_like(pre_BM).scatter(1, idx_BK, vals_BK.relu())
        x_hat_BD = x_hat_BD + gate_B[:, None] * (z_BM @ sae.W_dec.reshape(-1, D))
    f_N = torch.bincount(experts_BE.reshape(-1), minlength=N).float() / experts_BE.numel()
    aux = N * (f_N * probs_BN.mean(0)).sum()
    return x_hat_BD, aux, pre_BM


g = torch.Generator().manual_seed(1)
X = torch.randn(96, 16, generator=g) * 2 + 0.5

CASES = {
    "top1": {},
    "k_equals_width": {"k": 16},
    "top2": {"top_e": 2},
    "top3": {"top_e": 3},
    "shared": {"shared_expert": True},
    "shared_top2": {"shared_expert": True, "top_e": 2},
    "heaviside": {"scale_by_router_prob": False},
    # Scale SAE (Xu et al. 2025): one TopK over the routed experts' latents, and/or feature scaling
    "scale": {"top_e": 2, "global_topk": True, "feature_scaling": True},
    "global_top2": {"top_e": 2, "global_topk": True},
    "global_top3_shared_k_gt_width": {"top_e": 3, "global_topk": True, "shared_expert": True, "k": 20},
    "global_heaviside": {"top_e": 2, "global_topk": True, "scale_by_router_prob": False},
    "feature_scaling_top1": {"feature_scaling": True},
}


# fast=False: the slow reference (loop over experts, embedding_bag backwards); every case on both paths
PATHS = [(case, fast) for case in CASES for fast in (True, False)]


@pytest.mark.parametrize("case,fast", PATHS, ids=[f"{c}-{'fast' if f else 'reference'}" for c, f in PATHS])
def test_matches_dense_reference(make_sae, case, fast):
    sae = make_sae("switch", **CASES[case])
    with torch.no_grad():  # starve the last expert: it must still work with an empty group
        u = F.normalize(torch.ones(16), dim=0)
        sae.W_router[-1] = -20 * u
        sae.b_router.zero_()
        if sae.cfg.feature_scaling:  # a non-trivial scale (it starts at 0)
            sae.W_enc_hf_scale.copy_(torch.randn(sae.W_enc_hf_scale.shape, generator=torch.Generator().manual_seed(5)))
    x = X + 3 * F.normalize(torch.ones(16), dim=0)
    out = sae(x, fast=fast)
    if case in ("top1", "heaviside", "shared"):
        assert not (out.expert_indices == 3).any(), "the test meant to leave expert 3 without inputs"

    def run_fast():
        o = sae(x, fast=fast)
        return o.x_hat, o.aux_loss

    def run_ref():
        x_hat, aux, _ = dense_reference(sae, x)
        return x_hat, aux

    xh, aux, grads = loss_and_grads(sae, run_fast, x)
    xh_ref, aux_ref, grads_ref = loss_and_grads(sae, run_ref, x)
    scale = xh_ref.abs().max()
    torch.testing.assert_close(xh, xh_ref, atol=1e-5 * scale, rtol=1e-5)
    torch.testing.assert_close(aux, aux_ref)
    for name, g_ref in grads_ref.items():
        torch.testing.assert_close(grads[name], g_ref, atol=1e-5 * g_ref.abs().max(), rtol=1e-4, msg=name)
    assert grads["W_router"].abs().sum() > 0


def loss_and_grads(sae, fn, x):
    """Outputs and every parameter's gradient of (x_hat - x)^2 summed + 3 aux."""
    sae.zero_grad(set_to_none=True)
    x_hat, aux = fn()
    ((x_hat - x).pow(2).sum() + 3.0 * aux).backward()
    return x_hat.detach(), aux.detach(), {n: p.grad.clone() if p.grad is not None else torch.zeros_like(p)
                                          for n, p in sae.named_parameters()}


def test_fast_path_equals_reference_path(make_sae):
    sae = make_sae("switch", top_e=2, shared_expert=True)
    outs = []
    for fast in (True, False):
        sae.zero_grad(set_to_none=True)
        out = sae(X, fast=fast)
        out.x_hat.sum().backward()  # a zero-stride incoming gradient must work too
        outs.append((out, {n: p.grad.clone() for n, p in sae.named_parameters()}))
    (a, ga), (b, gb) = outs
    torch.testing.assert_close(a.x_hat, b.x_hat)
    # the same latents per input; within an expert's k the order is unspecified (ops.topk_rows vs torch.topk)
    order_a, order_b = a.latent_indices.argsort(-1), b.latent_indices.argsort(-1)
    assert torch.equal(a.latent_indices.gather(1, order_a), b.latent_indices.gather(1, order_b))
    torch.testing.assert_close(a.latent_acts.gather(1, order_a), b.latent_acts.gather(1, order_b))
    for name in ga:
        torch.testing.assert_close(ga[name], gb[name], msg=name)


def test_plain_training_loop_takes_the_fast_path(make_sae, monkeypatch):
    """`out = sae(x)`, loss, zero_grad(set_to_none=True), backward, torch Adam: the sparse backward runs,
    with the reference path's gradients."""
    from switch_sae_core import ops

    calls = []
    backward = ops._SparseExperts.backward
    monkeypatch.setattr(ops._SparseExperts, "backward", staticmethod(lambda ctx, *g: calls.append(1) or backward(ctx, *g)))
    sae = make_sae("switch", top_e=2)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-3)
    grads = {}
    for fast in (False, True):
        out = sae(X, fast=False) if not fast else sae(X)
        loss = (out.x_hat - X).pow(2).sum(-1).mean() + out.aux_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grads[fast] = {n: p.grad.clone() for n, p in sae.named_parameters()}
    assert calls == [1]  # the reference ran without it, the plain call with it
    for name, g_ref in grads[False].items():
        torch.testing.assert_close(grads[True][name], g_ref, atol=1e-5 * g_ref.abs().max(), rtol=1e-5, msg=name)
    before = sae.W_enc.detach().clone()
    opt.step()
    assert not torch.equal(before, sae.W_enc)


def test_outputs_shapes_and_ids(make_sae):
    sae = make_sae("switch", top_e=2, shared_expert=True)
    out = sae(X)
    B, W = X.shape[0], sae.cfg.expert_width
    assert isinstance(out, SwitchOutput)
    assert out.x_hat.shape == X.shape and out.router_probs.shape == (B, 4)
    assert out.expert_indices.shape == (B, 2)
    assert out.latent_acts.shape == out.latent_indices.shape == (B, 3 * sae.cfg.k)
    # ids of slot e belong to expert expert_indices[:, e]; the last slot is the shared expert (id N)
    slot_expert = (out.latent_indices // W).view(B, 3, -1)
    assert (slot_expert[:, :2] == out.expert_indices[:, :, None]).all()
    assert (slot_expert[:, 2] == 4).all() and sae.n_latents == 64 + 16
    assert (out.latent_acts >= 0).all() and out.aux_loss.ndim == 0


def test_pieces_compose_to_forward(make_sae):
    """route + dispatch + experts_forward on a shard reproduce forward (the expert-parallel contract)."""
    sae = make_sae("switch")
    probs, experts_BE, gate_BE = sae.route(X)
    d = dispatch(experts_BE, 4)
    xc = (X - sae.b_pre)[d.input_T]
    full = experts_forward(xc, d.group_sizes_G, sae.W_enc, sae.W_dec, sae.cfg.k)
    # the rows of experts 2..3 run alone through a 2-expert shard give the same outputs
    start = int(d.group_sizes_G[:2].sum())
    shard = experts_forward(xc[start:], d.group_sizes_G[2:], sae.W_enc[2:], sae.W_dec[2:], sae.cfg.k)
    torch.testing.assert_close(shard.out_TD, full.out_TD[start:])
    x_hat = torch.index_add(sae.b_pre.expand_as(X), 0, d.input_T, full.out_TD * gate_BE.reshape(-1)[d.order_T, None])
    torch.testing.assert_close(x_hat, sae(X).x_hat)


def test_losses_contract(make_sae):
    sae = make_sae("switch")
    out = sae(X)
    losses = sae.losses(X, out)
    assert set(losses) == {"recon", "aux"}
    torch.testing.assert_close(losses["recon"], (out.x_hat - X).pow(2).sum(-1).mean())
    torch.testing.assert_close(losses["aux"], 3.0 * 16 * out.aux_loss)  # alpha * d * L_aux
    sae_plain = make_sae("switch", aux_scale_by_d=False, aux_alpha=0.5)
    out = sae_plain(X)
    torch.testing.assert_close(sae_plain.losses(X, out)["aux"], 0.5 * out.aux_loss)


def test_aux_loss_uniform_and_collapsed(make_sae):
    sae = make_sae("switch")
    with torch.no_grad():
        sae.W_router.zero_()
    assert sae(X).aux_loss.item() == pytest.approx(1.0, abs=1e-6)  # uniform router
    with torch.no_grad():
        sae.W_router[0] = 50 * F.normalize(torch.ones(16), dim=0)
    out = sae(X.abs() + 1)  # every input to expert 0 with probability ~1: aux -> N
    assert (out.expert_indices == 0).all()
    assert out.aux_loss.item() == pytest.approx(4.0, rel=1e-3)


def test_auxk_matches_hand_computation(make_sae):
    sae = make_sae("switch", auxk_coeff=0.5, auxk_k=6, shared_expert=True)
    with torch.no_grad():
        sae.b_pre.mul_(10)  # a b_pre added where it must not be would show
    dead = torch.zeros(sae.n_latents, dtype=torch.bool)
    dead[torch.randperm(sae.n_latents, generator=torch.Generator().manual_seed(3))[:30]] = True
    out = sae(X)
    sae.zero_grad(set_to_none=True)
    sae.losses(X, out, dead)["auxk"].backward()
    grads = {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for n, p in sae.named_parameters()}

    sae.zero_grad(set_to_none=True)
    W, D = sae.cfg.expert_width, 16
    pre_BM = (X - sae.b_pre) @ sae.W_enc.reshape(-1, D).T
    used_BG = F.one_hot(out.expert_indices[:, 0], 5).bool()
    used_BG[:, 4] = True  # the shared expert's pre-activations exist for every input
    candidate_BM = used_BG.repeat_interleave(W, dim=1) & dead
    vals, idx = pre_BM.masked_fill(~candidate_BM, float("-inf")).topk(6, dim=-1)
    acts = torch.where(torch.isfinite(vals), vals, 0).relu()
    e_hat = torch.zeros_like(pre_BM).scatter(1, idx, acts) @ sae.W_dec.reshape(-1, D)  # no b_pre
    e = (X - out.x_hat).detach()
    ref = 0.5 * (e_hat - e).pow(2).sum() / e.pow(2).sum()
    ref.backward()
    torch.testing.assert_close(sae.losses(X, out, dead)["auxk"], ref)
    for n, p in sae.named_parameters():
        g_ref = p.grad if p.grad is not None else torch.zeros_like(p)
        torch.testing.assert_close(grads[n], g_ref, atol=1e-6, rtol=1e-4, msg=n)
    assert grads["W_enc"].abs().sum() > 0  # the AuxK gradient reaches the encoder
    # a dead mask over n_features only (shared expert counted alive) is accepted
    assert sae.losses(X, out, dead[:64])["auxk"].item() > 0


def test_n_params_and_flops(make_sae):
    for kw in ({}, {"shared_expert": True, "top_e": 2}):
        sae = make_sae("switch", **kw)
        assert sae.n_params == sum(p.numel() for p in sae.parameters())
    M, D, N, K = 768, 48, 16, 8
    sae = SwitchSAE(d_in=D, n_features=M, n_experts=N, k=K)
    assert sae.n_params == 2 * M * D + N * D + 2 * D  # SPEC
    f = sae.flops_per_input()
    assert f == {"router": 2 * N * D, "encoder": 2 * (M // N) * D, "decoder": 2 * K * D,
                 "total": 2 * N * D + 2 * (M // N) * D + 2 * K * D}


def test_decoder_upkeep(make_sae):
    sae = make_sae("switch", shared_expert=True)
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(sae.W_dec.shape[:-1])[..., None] + 0.5)
    sae.normalize_decoder()
    torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.ones(5, 16))
    assert sae.decoder_directions().shape == (80, 16)
    sae.losses(X, sae(X))["recon"].backward()
    sae.remove_parallel_grads()
    torch.testing.assert_close((sae.W_dec.grad * sae.W_dec).sum(-1), torch.zeros(5, 16), atol=1e-5, rtol=0)


def test_save_load_roundtrip(make_sae, tmp_path):
    sae = make_sae("switch", top_e=2, shared_expert=True)
    sae.save(tmp_path / "ckpt")
    loaded = load_sae(tmp_path / "ckpt")
    assert isinstance(loaded, SwitchSAE) and loaded.cfg == sae.cfg
    a, b = sae(X), loaded(X)
    assert torch.equal(a.x_hat, b.x_hat) and torch.equal(a.latent_indices, b.latent_indices)


def test_keyword_and_config_constructors():
    cfg = SAEConfig(arch="switch", d_in=8, n_features=32, n_experts=4, k=2)
    assert SwitchSAE(cfg).cfg == SwitchSAE(d_in=8, n_features=32, n_experts=4, k=2).cfg
    sae = SwitchSAE(cfg)
    assert sae.W_enc.shape == sae.W_dec.shape == (4, 8, 8) and sae.W_router.shape == (4, 8)
    assert sae.b_router.shape == sae.b_pre.shape == (8,)


def test_config_errors():
    with pytest.raises(ConfigError, match="not divisible by n_experts"):
        SwitchSAE(d_in=8, n_features=30, n_experts=4, k=2)
    with pytest.raises(ConfigError, match="larger than an expert's width"):
        SwitchSAE(d_in=8, n_features=32, n_experts=4, k=9)


def test_interface(make_sae, checks, tmp_path):
    checks.roundtrip(make_sae("switch", shared_expert=True), X, tmp_path / "switch")
    checks.input_errors(make_sae("switch"))
    checks.normalize_decoder(make_sae("switch", shared_expert=True))
    checks.remove_parallel_grads(make_sae("switch", top_e=2), X)
    checks.n_params(make_sae("switch", shared_expert=True))
    checks.encode_decode(make_sae("switch", top_e=2, shared_expert=True), X)


# --- the Scale SAE options (Xu et al. 2025): global TopK over the routed experts, feature scaling ---------
def test_scale_sae_routes_for_real_and_tops_k_globally(make_sae, monkeypatch):
    from switch_sae_core.saes import switch as switch_module

    rows = []
    real = switch_module.grouped_matmul
    monkeypatch.setattr(switch_module, "grouped_matmul", lambda x, W, *a, **k: rows.append((x.shape, W.shape)) or real(x, W, *a, **k))
    sae = make_sae("switch", top_e=2, global_topk=True, feature_scaling=True, k=6)
    out = sae(X)
    assert rows == [((96 * 2, 16), (4, 16, 16))]  # only the 2 routed experts' M/N rows per input: no dense encoder
    assert out.latent_acts.shape == (96, 6) and out.latent_indices.shape == (96, 6)  # L0 = k, not top_e * k
    expert_BK = out.latent_indices // 16
    assert (expert_BK.unsqueeze(-1) == out.expert_indices.unsqueeze(1)).any(-1).all()  # only routed experts
    from_first = (expert_BK == out.expert_indices[:, :1]).sum(1)
    assert len(set(from_first.tolist())) > 2  # the split between the two experts varies per input: one global TopK
    f = sae.flops_per_input()
    assert f == {"router": 2 * 4 * 16, "encoder": 2 * 2 * 16 * 16, "decoder": 2 * 6 * 16,
                 "total": 2 * 4 * 16 + 2 * 2 * 16 * 16 + 2 * 6 * 16}
    assert sae.n_params == sum(p.numel() for p in sae.parameters()) == 2 * 64 * 16 + 4 * 16 + 2 * 16 + 4 * 16


def test_feature_scaling_starts_as_the_identity_and_learns(make_sae):
    plain, scaled = make_sae("switch", top_e=2, global_topk=True), make_sae("switch", top_e=2, global_topk=True,
                                                                        feature_scaling=True)
    scaled.load_state_dict({**plain.state_dict(), "W_enc_hf_scale": torch.zeros(4, 16)})
    torch.testing.assert_close(scaled(X).x_hat, plain(X).x_hat)
    scaled.losses(X, scaled(X))["recon"].backward()
    assert scaled.W_enc_hf_scale.grad.abs().sum() > 0
    with torch.no_grad():  # amplifying the deviations from the mean row: the rows spread apart
        scaled.W_enc_hf_scale.fill_(1.0)
    def spread(W):
        return (W - W.mean(1, keepdim=True)).norm()
    torch.testing.assert_close(spread(scaled.effective_encoder()), 2 * spread(scaled.W_enc))


def test_scale_sae_auxk_save_load_and_interface(make_sae, checks, tmp_path):
    sae = make_sae("switch", top_e=2, global_topk=True, feature_scaling=True, k=6, auxk_coeff=0.5, auxk_k=8)
    with torch.no_grad():
        sae.W_enc_hf_scale.normal_()
    dead = torch.zeros(sae.n_latents, dtype=torch.bool)
    dead[::3] = True
    out = sae(X)
    assert out.pre_acts.shape == (96, 2 * 16)
    aux = sae.losses(X, out, dead)["auxk"]
    aux.backward()
    assert aux.item() > 0 and sae.W_enc_hf_scale.grad.abs().sum() > 0
    checks.roundtrip(sae, X, tmp_path / "scale")
    checks.encode_decode(sae, X)
    checks.remove_parallel_grads(make_sae("switch", top_e=2, global_topk=True, feature_scaling=True), X)


def test_scale_sae_config_errors():
    with pytest.raises(ConfigError, match="only apply to arch='switch'"):
        SAEConfig(arch="topk", global_topk=True)
    with pytest.raises(ConfigError, match="k=40 is larger than the 32 latents of the experts an input uses"):
        SAEConfig(arch="switch", d_in=16, n_features=64, n_experts=4, top_e=2, global_topk=True, k=40)
    SAEConfig(arch="switch", d_in=16, n_features=64, n_experts=4, top_e=2, global_topk=True, k=20)  # > M/N is fine


def test_checkpoints_written_before_the_scale_options_still_load(make_sae, tmp_path):
    """A weights file whose recorded config has no global_topk / feature_scaling (older switch-sae) loads."""
    import json

    from safetensors.torch import load_file, save_file

    sae = make_sae("switch")
    sae.save(tmp_path)
    old = {k: v for k, v in sae.cfg.to_dict().items() if k not in ("global_topk", "feature_scaling")}
    save_file(load_file(str(tmp_path / "sae.safetensors")), str(tmp_path / "sae.safetensors"),
              metadata={"format": "switch-sae/1", "sae_config": json.dumps(old, sort_keys=True)})
    (tmp_path / "config.json").write_text(json.dumps({"format_version": 2, **old}))
    torch.testing.assert_close(load_sae(tmp_path)(X).x_hat, sae(X).x_hat)
