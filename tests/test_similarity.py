"""Expert similarity, duplication, feature matching and CKA (switch_sae_core.analysis.similarity)."""
import pytest
import torch

from switch_sae_core.analysis.similarity import (
    duplication_stats,
    expert_similarity_matrix,
    frequency_bins,
    linear_cka,
    match_features,
    nearest_features,
    nearest_neighbour_cosines,
    random_blocks,
    sparse_latents,
)


def orthogonal_dictionary(M, D, seed=0):
    """M <= D orthonormal rows."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(D, M, generator=g))
    return q.T.contiguous()


def reference_similarity(dirs, N, exclude_self):
    """Loop-by-loop reference: cell (i, j) = mean over i's features of max cosine to j's features."""
    u = dirs / dirs.norm(dim=-1, keepdim=True)
    W = dirs.shape[0] // N
    out = torch.zeros(N, N)
    for i in range(N):
        for j in range(N):
            vals = []
            for a in range(i * W, (i + 1) * W):
                best = max(float(u[a] @ u[b]) for b in range(j * W, (j + 1) * W) if not (exclude_self and a == b))
                vals.append(best)
            out[i, j] = sum(vals) / W
    return out


@pytest.mark.parametrize("exclude_self", [True, False])
def test_expert_similarity_matches_loop_reference_in_small_chunks(exclude_self):
    dirs = torch.randn(24, 6, generator=torch.Generator().manual_seed(1))
    got = expert_similarity_matrix(dirs * 3.0, 4, exclude_self=exclude_self, chunk=5)  # norms must not matter
    torch.testing.assert_close(got, reference_similarity(dirs, 4, exclude_self), atol=1e-5, rtol=0)


def test_similarity_with_self_match_has_unit_diagonal_and_without_is_below():
    dirs = orthogonal_dictionary(32, 64)
    S_self = expert_similarity_matrix(dirs, 4, exclude_self=False)
    torch.testing.assert_close(S_self.diagonal(), torch.ones(4))
    S = expert_similarity_matrix(dirs, 4)
    assert S.abs().max() < 1e-5  # orthogonal: nothing similar anywhere once self is excluded


def test_planted_copy_of_an_expert_shows_up_in_its_cell_only():
    base = orthogonal_dictionary(24, 64)  # 3 experts x 8 orthogonal features
    dirs = torch.cat([base, base[:8]])  # expert 3 = exact copy of expert 0
    S = expert_similarity_matrix(dirs, 4)
    assert S[0, 3] == pytest.approx(1.0, abs=1e-5) and S[3, 0] == pytest.approx(1.0, abs=1e-5)
    assert S[1, 2] == pytest.approx(0.0, abs=1e-5) and S[0, 0] == pytest.approx(0.0, abs=1e-5)


def test_random_blocks_is_a_permutation():
    dirs = torch.randn(20, 3)
    shuffled = random_blocks(dirs, seed=3)
    assert not torch.equal(shuffled, dirs)
    torch.testing.assert_close(shuffled.sum(0), dirs.sum(0))
    assert sorted(map(tuple, shuffled.tolist())) == sorted(map(tuple, dirs.tolist()))


def test_duplicate_counter_finds_exactly_the_planted_duplicates():
    D, N, W = 128, 4, 16
    dirs = orthogonal_dictionary(N * W, D)
    # plant 5 near-copies (cosine ~0.95) of expert-0 features into experts 1..3
    targets = [(0, 20), (1, 35), (2, 50), (3, 60), (4, 17)]
    for src, dst in targets:
        noise = orthogonal_dictionary(1, D, seed=100 + src)[0]
        noise = noise - (noise @ dirs[src]) * dirs[src]
        dirs[dst] = 0.95 * dirs[src] + (1 - 0.95**2) ** 0.5 * noise / noise.norm()
    cos_other, nn_other = nearest_neighbour_cosines(dirs, N, scope="other_expert", chunk=7)
    stats = duplication_stats(cos_other)
    assert stats["n_duplicated"] == 2 * len(targets)  # both members of each pair
    for src, dst in targets:
        assert nn_other[src] == dst and nn_other[dst] == src
    # "anywhere" sees the same pairs (they are in different experts) ...
    assert duplication_stats(nearest_neighbour_cosines(dirs, N, scope="anywhere")[0])["n_duplicated"] == 10
    # ... but a pair planted INSIDE one expert is a duplicate "anywhere" and not "other_expert"
    dirs[5] = dirs[6]
    assert duplication_stats(nearest_neighbour_cosines(dirs, N, "anywhere")[0])["n_duplicated"] == 12
    assert duplication_stats(nearest_neighbour_cosines(dirs, N, "other_expert")[0])["n_duplicated"] == 10


def test_orthogonal_dictionary_has_no_duplicates():
    cos, _ = nearest_neighbour_cosines(orthogonal_dictionary(64, 64), 8, scope="other_expert")
    stats = duplication_stats(cos)
    assert stats["n_duplicated"] == 0 and abs(stats["mean_nn_cos"]) < 1e-5


def test_duplication_split_by_frequency_puts_duplicates_in_their_bin():
    dirs = orthogonal_dictionary(16, 32)
    dirs[15] = dirs[14]  # the two most frequent features are duplicates
    freq = torch.linspace(0.01, 0.16, 16)
    freq[0] = 0.0  # a dead feature: excluded from the bins
    stats = duplication_stats(nearest_neighbour_cosines(dirs)[0], freq, n_bins=3)
    bins = stats["by_frequency"]
    assert stats["n_dead"] == 1 and sum(b["n"] for b in bins) == 15
    assert bins[-1]["frac_duplicated"] > 0 and bins[0]["frac_duplicated"] == 0


def test_frequency_bins_are_quantiles_rarest_first():
    bins, labels = frequency_bins(torch.arange(1, 101).float(), n_bins=4)
    assert torch.bincount(bins).tolist() == [25, 25, 25, 25] and bins[0] == 0 and bins[-1] == 3
    assert len(labels) == 4


def test_match_features_recovers_a_permuted_dictionary():
    dirs = torch.randn(40, 16, generator=torch.Generator().manual_seed(2))
    perm = torch.randperm(40, generator=torch.Generator().manual_seed(3))
    m = match_features(dirs[perm] * 2.0, dirs, hungarian=True)
    assert torch.equal(m["best_id"], perm) and torch.equal(m["assigned_id"], perm)
    torch.testing.assert_close(m["best_cos"], torch.ones(40))


def test_hungarian_is_one_to_one_where_greedy_reuses():
    b = torch.eye(3)
    a = torch.tensor([[1.0, 0.1, 0.0], [1.0, 0.0, 0.1]])  # both prefer b[0]
    m = match_features(a, b, hungarian=True)
    assert m["best_id"].tolist() == [0, 0]
    assert sorted(m["assigned_id"].tolist())[0] == 0 and len(set(m["assigned_id"].tolist())) == 2


def test_cka_identical_orthogonal_and_isotropic_scaling_is_one():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(200, 30, generator=g)
    Q, _ = torch.linalg.qr(torch.randn(30, 30, generator=g))
    for debiased in (False, True):
        assert linear_cka(X, X, debiased) == pytest.approx(1.0, abs=1e-9)
        assert linear_cka(X, 3.7 * X @ Q, debiased) == pytest.approx(1.0, abs=1e-9)


def test_cka_of_independent_representations_is_near_zero():
    g = torch.Generator().manual_seed(1)
    X, Y = torch.randn(1000, 20, generator=g), torch.randn(1000, 20, generator=g)
    # biased CKA of independent data is ~ (p q)/(T sqrt(p q)) = 0.02 here; debiased is ~0 +- noise
    assert linear_cka(X, Y) < 0.05
    assert abs(linear_cka(X, Y, debiased=True)) < 0.01


def test_cka_matches_feature_space_formula_and_sparse_input():
    g = torch.Generator().manual_seed(2)
    T, K, M = 60, 3, 25
    acts = torch.rand(T, K, generator=g)
    idx = torch.stack([torch.randperm(M, generator=g)[:K] for _ in range(T)])
    dense = torch.zeros(T, M).scatter_(1, idx, acts)
    Y = torch.randn(T, 7, generator=g)
    Xd, Yd = dense.double(), Y.double()
    Xc, Yc = Xd - Xd.mean(0), Yd - Yd.mean(0)
    reference = (Yc.T @ Xc).norm() ** 2 / ((Xc.T @ Xc).norm() * (Yc.T @ Yc).norm())
    assert linear_cka(sparse_latents(acts, idx, M), Y) == pytest.approx(reference.item(), rel=1e-9)
    assert linear_cka(dense, Y) == pytest.approx(reference.item(), rel=1e-9)


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="equal blocks"):
        expert_similarity_matrix(torch.randn(10, 4), 3)
    with pytest.raises(ValueError, match="same tokens"):
        linear_cka(torch.randn(5, 2), torch.randn(6, 2))
    with pytest.raises(ValueError, match="other_expert"):
        nearest_neighbour_cosines(torch.randn(4, 2), 1, scope="other_expert")


def test_nearest_features_agree_with_the_nearest_neighbour_scan():
    dirs = torch.randn(40, 8, generator=torch.Generator().manual_seed(4))
    cos_other, nn_other = nearest_neighbour_cosines(dirs, 4, scope="other_expert")
    for f in (0, 13, 39):
        ids, cos = nearest_features(dirs, f, 4, n=3)
        assert ids[0] == nn_other[f] and cos[0] == pytest.approx(cos_other[f].item(), abs=1e-6)
        assert (ids // 10 != f // 10).all() and (cos[:-1] >= cos[1:]).all()


def test_distance_from_init_rebuilds_the_trainers_initialisation():
    """1.0 for an untouched SAE with its own seed, random-level with another seed, and, after one tiny-lr step
    of the real trainer, still ~1: only the trainer's own init matches (a wrong rebuild gives ~0.1 here)."""
    import math

    from switch_sae_core.analysis.similarity import distance_from_init, random_mean_abs_cosine
    from switch_sae_core.config import SAEConfig, TrainConfig
    from switch_sae_core.saes.base import build_sae
    from switch_sae_core.train import train_sae

    cfg = SAEConfig(arch="switch", d_in=64, n_features=512, n_experts=4, k=4)
    torch.manual_seed(3)
    sae = build_sae(cfg)
    state = torch.random.get_rng_state()
    assert distance_from_init(sae, 3)["decoder_mean_abs_cos"] == pytest.approx(1.0, abs=1e-6)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's RNG is untouched
    other = distance_from_init(sae, 4)
    assert other["random"] == pytest.approx(math.sqrt(2 / (math.pi * 64)), rel=0.02)
    assert other["decoder_mean_abs_cos"] == pytest.approx(other["random"], rel=0.15)  # 512 features: ~3% noise
    assert random_mean_abs_cosine(2) == pytest.approx(2 / math.pi)  # d = 2: E|cos U| for U uniform on the circle

    x = torch.randn(256, 64)
    trained = train_sae(cfg, [x] * 2, TrainConfig(steps=1, batch_size=256, seed=7, lr=1e-6, progress=False,
                                                  geometric_median_batch=256)).sae
    moved = distance_from_init(trained, 7)
    assert moved["decoder_mean_abs_cos"] > 0.99 and moved["encoder_mean_abs_cos"] > 0.99
    assert distance_from_init(trained, 3)["decoder_mean_abs_cos"] < 0.2
