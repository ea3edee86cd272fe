"""Router geometry analyses (switch_sae_core.analysis.router)."""
import math

import pytest
import torch

from switch_sae_core.analysis.router import (
    agreement,
    assign_to_experts,
    clustering_summary,
    embedding_silhouette,
    expert_mean_directions,
    pooled_expert_scores,
    pooled_router_rows,
    principal_angles,
    probe_router_choice,
    random_subspace_angles,
    router_alignment,
    router_subspace_angles,
    scipy_latents,
    silhouette_by_expert,
    top_principal_directions,
    tsne_embedding,
)


def clustered_dictionary(N=4, W=30, D=32, spread=0.3, seed=0):
    """N experts whose features scatter around one centre each: (dirs_MD, centres_ND)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.linalg.qr(torch.randn(D, N, generator=g))[0].T
    dirs = centres.repeat_interleave(W, 0) + spread * torch.randn(N * W, D, generator=g)
    return dirs, centres


def test_principal_angles_of_a_subspace_with_itself_are_zero():
    A = torch.randn(5, 20, generator=torch.Generator().manual_seed(0))
    mix = torch.randn(5, 5, generator=torch.Generator().manual_seed(1))
    assert principal_angles(A, mix @ A).max() < 1e-6  # same span, different basis


def test_principal_angles_known_values():
    e = torch.eye(4)
    A = e[:2]  # span(e0, e1)
    B = torch.stack([e[0], math.cos(0.3) * e[1] + math.sin(0.3) * e[2]])
    torch.testing.assert_close(principal_angles(A, B), torch.tensor([0.0, 0.3], dtype=torch.float64), atol=1e-6, rtol=0)
    assert principal_angles(e[:2], e[2:]).min() == pytest.approx(math.pi / 2)


def test_random_subspaces_are_far_and_top_principal_directions_recover_a_planted_subspace():
    g = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(50, 3, generator=g))[0].T  # (3, 50)
    X = torch.randn(2000, 3, generator=g) * torch.tensor([10.0, 8.0, 6.0]) @ basis + 0.1 * torch.randn(2000, 50, generator=g)
    assert principal_angles(top_principal_directions(X, 3), basis).max() < 0.05
    assert random_subspace_angles(50, 3, 3).mean() > 1.0  # ~ 60+ degrees in 50 dims


def test_router_subspace_angles_zero_when_router_lies_in_the_top_subspace():
    g = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(40, 3, generator=g))[0].T
    X = torch.randn(3000, 3, generator=g) * torch.tensor([9.0, 7.0, 5.0]) @ basis + 0.1 * torch.randn(3000, 40, generator=g)
    W_router = torch.randn(4, 3, generator=g) @ basis + 5.0  # 4 rows, + a shared offset the softmax ignores
    res = router_subspace_angles(W_router, X)
    assert res["dim"] == 3 and res["angles_deg"].max() < 3.0
    assert res["mean_cos2"] > 0.99 > 0.5 > res["random_mean_cos2"]


def test_silhouette_is_higher_for_planted_clusters():
    tight, _ = clustered_dictionary(spread=0.05)
    assert silhouette_by_expert(tight, 4) > 0.8
    scrambled = tight[torch.randperm(tight.shape[0], generator=torch.Generator().manual_seed(0))]
    assert silhouette_by_expert(scrambled, 4) < 0.05
    summary = clustering_summary(tight, scrambled, 4)
    assert summary["silhouette_encoder"] > summary["silhouette_decoder"]


def test_tsne_embedding_shape_and_sampling():
    dirs, _ = clustered_dictionary(N=3, W=20, D=16, spread=0.05)
    xy, ids = tsne_embedding(dirs, max_points=45, seed=0)
    assert xy.shape == (45, 2) and ids.shape == (45,) and ids.unique().numel() == 45
    labels = (ids // 20).numpy()
    assert embedding_silhouette(xy, labels) > 0.5  # tight planted clusters stay apart in the plane


def test_router_alignment_finds_the_router_pointing_at_its_experts():
    dirs, centres = clustered_dictionary()
    res = router_alignment(centres * 2.0, enc_MD=dirs, dec_MD=dirs[torch.randperm(120)])
    assert res["encoder"]["own_is_best"] == 1.0 and res["encoder"]["diag_mean"] > 0.9
    assert res["encoder"]["offdiag_mean"] < 0 and abs(res["decoder"]["diag_mean"]) < 0.5
    torch.testing.assert_close(expert_mean_directions(dirs, 4).norm(dim=-1) > 0.5, torch.ones(4, dtype=torch.bool))


def test_pooled_dense_encoder_reproduces_a_router_built_from_it():
    """A dense dictionary whose features are the Switch features shuffled: pooling its activations per
    matched expert must pick the expert whose features fire most."""
    dirs, centres = clustered_dictionary(spread=0.05)
    perm = torch.randperm(120, generator=torch.Generator().manual_seed(1))
    dense = dirs[perm]
    expert_L, cos_L = assign_to_experts(dense, dirs, 4)
    assert torch.equal(expert_L, perm // 30) and torch.allclose(cos_L, torch.ones(120))
    # tokens near centre e: their dense top-k latents are features of expert e
    g = torch.Generator().manual_seed(2)
    choice = torch.randint(0, 4, (200,), generator=g)
    x = centres[choice] + 0.05 * torch.randn(200, 32, generator=g)
    vals, idx = (x @ dense.T).topk(8, dim=-1)
    scores = pooled_expert_scores(vals.relu(), idx, expert_L, 4)
    res = agreement(scores.argmax(-1), choice, 4)
    assert res["accuracy"] == 1.0 and res["chance"] < 0.4
    rows = pooled_router_rows(dense, expert_L, 4)
    assert (torch.nn.functional.cosine_similarity(rows, centres, dim=-1) > 0.9).all()
    probe = probe_router_choice(scipy_latents(vals.relu(), idx, 120), choice)
    assert probe["accuracy"] > 0.9


def test_router_geometry_runs_on_real_saes_and_numbers_are_in_range():
    from switch_sae_core.analysis.router import router_geometry, routing_history
    from switch_sae_core.config import SAEConfig
    from switch_sae_core.saes.base import build_sae

    torch.manual_seed(0)
    switch = build_sae(SAEConfig(arch="switch", d_in=16, n_features=64, n_experts=4, k=4, shared_expert=True))
    topk = build_sae(SAEConfig(arch="topk", d_in=16, n_features=48, k=4))
    x = torch.randn(300, 16)
    res = router_geometry(switch, topk, x, max_points=None)
    assert res["alignment"]["router_vs_encoder"].shape == (4, 4)  # the shared expert is not routed
    assert int(res["features_per_expert"].sum()) == 48
    for key in ("pooled", "pooled_rows", "probe", "probe_activations"):
        assert 0.0 <= res[key]["accuracy"] <= 1.0
    assert res["angles_encoder"]["dim"] == 3 and (res["angles_activations"]["angles_deg"] <= 90).all()
    assert -1 <= res["clustering"]["silhouette_encoder"] <= 1
    hist = [{"step": 0, "loss": 1.0}, {"step": 10, "expert_load": [0.5, 0.5], "router_entropy": 0.6}]
    assert routing_history(hist) == ([10], [[0.5, 0.5]], [0.6])
