"""Feature-recovery metrics: exact answers on planted dictionaries, chance levels, and trained SAEs."""
import math

import pytest
import torch

from switch_sae_core.analysis import recovery
from switch_sae_core.analysis.recovery import (count_duplicate_pairs, evaluate_recovery, expert_cluster_alignment,
                                               feature_recovery, normalized_mutual_info, random_routing_nmi)
from switch_sae_core.config import SAEConfig, TrainConfig
from switch_sae_core.data.synthetic import SyntheticConfig, SyntheticSource
from switch_sae_core.saes.topk import TopKSAE


@pytest.fixture(scope="module")
def truth():
    return SyntheticSource(SyntheticConfig(d_in=64, n_features=512, n_clusters=8)).dictionary_FD


def test_the_true_dictionary_scores_one_in_any_order(truth):
    perm = torch.randperm(512, generator=torch.Generator().manual_seed(0))
    for learned in (truth, truth[perm], 3.0 * truth[perm]):  # order and scale do not matter
        r = feature_recovery(truth, learned)
        assert r["mmcs"] == pytest.approx(1.0, abs=1e-5)
        assert r["mmcs_learned"] == pytest.approx(1.0, abs=1e-5)
        assert r["recovered_frac"] == 1.0 and r["redundant_frac"] == 0.0
    assert torch.equal(feature_recovery(truth, truth[perm])["best_id_F"], torch.argsort(perm))


def test_directions_matter_both_ways(truth):
    # extra random learned features leave truth -> learned at 1 but lower learned -> truth
    extra = torch.randn(512, 64, generator=torch.Generator().manual_seed(1))
    r = feature_recovery(truth, torch.cat([truth, extra]))
    assert r["mmcs"] == pytest.approx(1.0, abs=1e-5) and r["recovered_frac"] == 1.0
    assert r["mmcs_learned"] < 0.75
    # half of the truth learned: half recovered, and every learned feature is real
    r = feature_recovery(truth, truth[:256])
    assert r["recovered_frac"] == pytest.approx(0.5) and r["mmcs_learned"] == pytest.approx(1.0, abs=1e-5)
    # SAE features are non-negative: a flipped feature is not a match
    assert feature_recovery(truth, -truth)["recovered_frac"] == 0.0


def test_a_random_dictionary_scores_low(truth):
    # the best of 512 random cosines in R^64 is ~ sqrt(2 ln 512 / 64) ~ 0.44 at the very most
    random_MD = torch.randn(512, 64, generator=torch.Generator().manual_seed(2))
    r = feature_recovery(truth, random_MD)
    assert r["mmcs"] < 0.45 and r["mmcs_learned"] < 0.45
    assert r["recovered_frac"] == 0.0


def test_chunking_gives_the_full_matrix_answer(truth):
    learned = truth + 0.3 * torch.randn(512, 64, generator=torch.Generator().manual_seed(3))
    u_t = truth / truth.norm(dim=1, keepdim=True)
    u_l = learned / learned.norm(dim=1, keepdim=True)
    cos = u_t @ u_l.T
    r = feature_recovery(truth, learned, chunk=100)
    assert r["mmcs"] == pytest.approx(cos.max(1).values.mean().item(), abs=1e-6)
    assert r["mmcs_learned"] == pytest.approx(cos.max(0).values.mean().item(), abs=1e-6)
    assert r["recovered_frac"] == pytest.approx((cos.max(1).values > 0.9).float().mean().item())


def test_duplicates_are_counted(truth):
    # features 0..9 learned twice (nearly identical copies), one true feature learned three times
    copies = truth[:10] + 0.01 * torch.randn(10, 64, generator=torch.Generator().manual_seed(4))
    learned = torch.cat([truth, copies, truth[20:21], truth[20:21]])
    assert count_duplicate_pairs(learned) == 10 + 3  # ten pairs, and three pairs among three copies
    assert count_duplicate_pairs(learned, chunk=7) == 13
    r = feature_recovery(truth, learned)
    assert r["redundant_frac"] == pytest.approx(11 / 512)
    assert count_duplicate_pairs(truth) == 0
    # two experts of 261: truth[:10] in expert 0, their copies in expert 1, so every duplicate is cross-expert
    stats = recovery.duplicate_stats(learned[:522], n_experts=2)
    assert stats["duplicate_frac"] == pytest.approx(20 / 522)
    assert stats["cross_expert_duplicate_frac"] == pytest.approx(20 / 522)
    stats = recovery.duplicate_stats(torch.cat([truth[:10], copies, truth[10:20]]), n_experts=3)
    assert stats["duplicate_frac"] == pytest.approx(20 / 30) and stats["cross_expert_duplicate_frac"] == pytest.approx(20 / 30)
    stats = recovery.duplicate_stats(torch.cat([truth[:10], copies, truth[10:30]]), n_experts=2)
    assert stats["duplicate_frac"] == pytest.approx(20 / 40) and stats["cross_expert_duplicate_frac"] == 0.0


def _nmi_reference(a, b) -> float:
    """NMI from its definition, I(a; b) / ((H(a) + H(b)) / 2), computed by hand from the joint counts."""
    import numpy as np

    table = recovery.contingency(a, b).astype(float)
    p_ab = table / table.sum()
    p_a, p_b = p_ab.sum(1), p_ab.sum(0)
    h = lambda p: float(-(p[p > 0] * np.log(p[p > 0])).sum())  # noqa: E731
    nz = p_ab > 0
    mi = float((p_ab[nz] * np.log(p_ab[nz] / np.outer(p_a, p_b)[nz])).sum())
    return mi / ((h(p_a) + h(p_b)) / 2)


def test_nmi_matches_its_definition_and_its_limits():
    g = torch.Generator().manual_seed(5)
    a = torch.randint(8, (5000,), generator=g)
    b = torch.where(torch.rand(5000, generator=g) < 0.7, a, torch.randint(8, (5000,), generator=g))
    for x, y in ((a, b), (a, torch.randint(3, (5000,), generator=g)), (a, (a * 5 + 1) % 8)):
        assert normalized_mutual_info(x, y) == pytest.approx(_nmi_reference(x, y), abs=1e-9)
    assert normalized_mutual_info(a, (a * 5 + 1) % 8) == pytest.approx(1.0)  # a relabelling
    assert random_routing_nmi(a, 8) < 0.01
    assert normalized_mutual_info(torch.zeros(10, dtype=torch.long), torch.zeros(10, dtype=torch.long)) == 1.0


@pytest.mark.parametrize("n_experts, n_clusters", [(2, 8), (8, 8), (16, 8), (3, 9)])
def test_max_nmi_is_reached_by_merging_or_splitting_clusters(n_experts, n_clusters):
    cluster = torch.arange(n_clusters * n_experts * 10) % n_clusters
    if n_experts <= n_clusters:  # expert e takes clusters e, e + N, ... (whole clusters)
        expert = cluster % n_experts
    else:  # cluster c is split evenly over experts c, c + C, ...
        expert = cluster + n_clusters * ((torch.arange(len(cluster)) // n_clusters) % (n_experts // n_clusters))
    assert normalized_mutual_info(expert, cluster) == pytest.approx(recovery.max_nmi(n_experts, n_clusters))


def test_purity_and_concentration_on_a_hand_built_routing():
    # experts 0, 1 both take cluster 0 (split it); expert 2 takes clusters 1 and 2 (merges them)
    expert = torch.tensor([0, 0, 1, 1, 2, 2, 2, 2])
    cluster = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2])
    a = expert_cluster_alignment(expert, cluster)
    assert a["expert_purity"] == pytest.approx((2 + 2 + 2) / 8)
    assert a["cluster_concentration"] == pytest.approx((2 + 2 + 2) / 8)
    a = expert_cluster_alignment(cluster, cluster)
    assert a["expert_purity"] == a["cluster_concentration"] == pytest.approx(1.0)


def test_evaluate_an_sae_built_from_the_truth():
    source = SyntheticSource(SyntheticConfig(d_in=32, n_features=64, n_clusters=4, l0=2.0, cluster_cohesion=0.0,
                                             freq_exponent=0.0))
    sae = TopKSAE(SAEConfig(arch="topk", d_in=32, n_features=64, k=2))
    with torch.no_grad():
        sae.W_dec.copy_(source.dictionary_FD)
        sae.W_enc.copy_(source.dictionary_FD)
        sae.b_pre.zero_()
    row = evaluate_recovery(sae, source, n_samples=2048)
    assert row["mmcs"] == pytest.approx(1.0, abs=1e-5) and row["recovered_frac"] == 1.0
    assert row["dead_frac"] == 0.0 and row["n_duplicate_pairs"] == 0
    assert row["l0"] <= 2.0 and row["fvu"] < 0.3
    assert "expert_nmi" not in row


def test_a_switch_sae_built_from_the_clusters_routes_by_cluster():
    # expert c holds exactly cluster c's features and the router row c is cluster c's mean direction
    data = SyntheticConfig(d_in=32, n_features=64, n_clusters=4, l0=2.0, leakage=0.0, cluster_cohesion=0.5)
    source = SyntheticSource(data)
    from switch_sae_core.saes.switch import SwitchSAE

    sae = SwitchSAE(SAEConfig(arch="switch", d_in=32, n_features=64, n_experts=4, k=2))
    order = torch.argsort(source.feature_cluster_F, stable=True)  # cluster 0's features first, ...
    with torch.no_grad():
        sae.W_dec.copy_(source.dictionary_FD[order].view(4, 16, 32))
        sae.W_enc.copy_(sae.W_dec)
        sae.W_router.copy_(10 * source.cluster_means_CD)
        sae.b_router.zero_()
        sae.b_pre.zero_()
    row = evaluate_recovery(sae, source, n_samples=4096)
    assert row["recovered_frac"] == 1.0 and row["feature_expert_nmi"] == pytest.approx(1.0)
    assert row["expert_nmi"] > 0.8 and row["expert_purity"] > 0.9 and row["load_balance"] > 0.95
    assert row["cross_expert_duplicate_frac"] == 0.0
    # router rows shuffled: every cluster goes to a wrong but consistent expert. NMI does not care about
    # expert names; the reconstruction does (the expert lacks the cluster's features)
    with torch.no_grad():
        sae.W_router.copy_(sae.W_router[[1, 2, 3, 0]])
    shuffled = evaluate_recovery(sae, source, n_samples=4096)
    assert shuffled["expert_nmi"] == pytest.approx(row["expert_nmi"], abs=0.05)
    assert shuffled["fvu"] > row["fvu"] + 0.2


# --- trained SAEs on easy ground truth ---------------------------------------------------------------
# Easy: 96 features in R^32, two active per sample, uniform frequencies, 4 clusters whose features share a
# mean direction (cohesion 0.3). Both SAEs have 2x as many latents as true features. 1000 steps of 256.
EASY_DATA = SyntheticConfig(d_in=32, n_features=96, n_clusters=4, l0=2.0, leakage=0.05, freq_exponent=0.0,
                            cluster_cohesion=0.3)
EASY_TRAIN = TrainConfig(steps=1000, batch_size=256, lr=1e-2, geometric_median_batch=1024, progress=False)
# Load balancing: alpha without the d factor. The paper's alpha * d / MSE is ~3 * 768 / 1000 ~ 2; here
# ||x||^2 ~ 4 and the MSE ends below 1, so alpha * d = 96 would swamp the reconstruction, alpha = 1 does not.
EASY_SWITCH = SAEConfig(arch="switch", d_in=32, n_features=192, k=2, n_experts=4, aux_alpha=1.0,
                        aux_scale_by_d=False)


@pytest.fixture(scope="module")
def easy_source():
    return SyntheticSource(EASY_DATA)


@pytest.fixture
def one_thread():
    """These matrices are tiny: a second thread only adds synchronisation (10x slower on a busy CPU)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def train_and_evaluate(sae_cfg, source):
    from switch_sae_core.train import train_sae

    sae = train_sae(sae_cfg, source, EASY_TRAIN).sae
    return evaluate_recovery(sae, source, n_samples=8192)


def test_topk_recovers_most_true_features(easy_source, one_thread):
    row = train_and_evaluate(SAEConfig(arch="topk", d_in=32, n_features=192, k=2), easy_source)
    assert row["recovered_frac"] > 0.8, row
    assert row["mmcs"] > 0.95, row


def test_switch_recovers_features_and_routes_by_cluster(easy_source, one_thread):
    row = train_and_evaluate(EASY_SWITCH, easy_source)
    assert row["recovered_frac"] > 0.8, row
    # routing follows the clusters far above chance (random routing of 8192 samples: NMI ~ 0.001)
    assert row["random_nmi"] < 0.01
    assert row["expert_nmi"] > 0.25, row
    assert row["expert_purity"] > 0.5, row  # 4 balanced clusters: chance purity ~ 0.25


def test_sweep_labels_rows_and_trains_a_repeated_setting_once(one_thread):
    from switch_sae_core.analysis.recovery import benchmark_settings, recovery_sweep

    data = SyntheticConfig(d_in=16, n_features=32, n_clusters=4, l0=2.0)
    topk = SAEConfig(arch="topk", n_features=64, k=2)
    switch = SAEConfig(arch="switch", n_features=64, k=2, n_experts=4)
    settings = benchmark_settings(data, topk, switch, fixed_width_experts=(4,), flop_matched_experts=(2,), ks=(2,))
    names = [(labels["experiment"], labels["name"], labels["n_features"]) for labels, _, _ in settings]
    assert names == [("width", "topk", 64), ("width", "switch-4", 64), ("width", "switch-2-fm", 128),
                     ("k", "topk", 64), ("k", "switch-4", 64)]
    rows = recovery_sweep(settings, TrainConfig(steps=5, batch_size=64, geometric_median_batch=64, progress=False),
                          n_eval=256, progress=False)
    assert [r["name"] for r in rows] == [n for _, n, _ in names]
    # the k experiment repeats the width experiment's TopK and Switch-4: same SAE, same numbers
    assert rows[3]["mse"] == rows[0]["mse"] and rows[4]["expert_nmi"] == rows[1]["expert_nmi"]
    assert "expert_nmi" in rows[1] and "expert_nmi" not in rows[0]
