"""The ground-truth generator: its samples follow the parameters it was given."""
import math

import numpy as np
import pytest
import torch

from switch_sae_core.config import ConfigError
from switch_sae_core.data.source import BatchSource
from switch_sae_core.data.synthetic import SyntheticConfig, SyntheticSource


def draw(source, n_batches=16, batch_size=4096, seed=0):
    batches = [source.sample(batch_size, seed, i) for i in range(n_batches)]
    return (torch.cat([b.x_BD for b in batches]), torch.cat([b.acts_BF for b in batches]),
            torch.cat([b.cluster_B for b in batches]))


@pytest.fixture(scope="module")
def power_law():
    """No clipping here (checked below), 64K samples."""
    source = SyntheticSource(SyntheticConfig(d_in=32, n_features=256, n_clusters=8, l0=3.0, leakage=0.1,
                                             freq_exponent=0.6, cluster_cohesion=0.3))
    return source, *draw(source, n_batches=8)


def test_is_a_batch_source_of_float32_batches():
    source = SyntheticSource(SyntheticConfig(d_in=16, n_features=64, n_clusters=4))
    assert isinstance(source, BatchSource) and source.d_in == 16
    x = next(source.batches(32))
    assert x.shape == (32, 16) and x.dtype == torch.float32


@pytest.mark.parametrize("bad", [dict(n_clusters=0), dict(n_clusters=600), dict(l0=0), dict(leakage=1.5),
                                 dict(n_clusters=1, leakage=0.1), dict(freq_exponent=-1),
                                 dict(cluster_cohesion=2), dict(magnitude="gamma"), dict(noise_std=-1)])
def test_bad_configs_are_refused(bad):
    with pytest.raises(ConfigError):
        SyntheticConfig(**bad)


def test_dictionary_unit_rows_clusters_and_cohesion():
    for rho in (0.0, 0.5):
        source = SyntheticSource(SyntheticConfig(d_in=64, n_features=512, n_clusters=8, cluster_cohesion=rho))
        D = source.dictionary_FD
        assert D.shape == (512, 64)
        torch.testing.assert_close(D.norm(dim=1), torch.ones(512))
        assert torch.equal(source.feature_cluster_F, torch.arange(512) % 8)
        cos2 = ((D * source.cluster_means_CD[source.feature_cluster_F]).sum(1) ** 2).mean().item()
        # rho = 0: a random unit vector in R^64 has E[cos^2] = 1/64 with any fixed direction
        assert cos2 == pytest.approx(max(rho, 1 / 64), abs=0.03)
        # two features of one cluster have cosine ~ rho; of different clusters ~ 0
        same = source.feature_cluster_F[:, None] == source.feature_cluster_F[None, :]
        cos = D @ D.T
        off_diag = ~torch.eye(512, dtype=torch.bool)
        assert cos[same & off_diag].mean().item() == pytest.approx(rho, abs=0.03)
        assert abs(cos[~same].mean().item()) < 0.03


def test_determinism_by_seed_and_batch_index():
    cfg = SyntheticConfig(d_in=16, n_features=64, n_clusters=4, noise_std=0.1)
    a, b = SyntheticSource(cfg), SyntheticSource(cfg)
    torch.testing.assert_close(a.dictionary_FD, b.dictionary_FD, rtol=0, atol=0)
    assert not torch.equal(a.dictionary_FD, SyntheticSource(cfg.replace(seed=1)).dictionary_FD)
    # batch i depends only on (seed, i): resuming at start=3 gives batch 3, whatever was drawn before
    stream = a.batches(128, seed=5)
    first = [next(stream) for _ in range(5)]
    resumed = next(b.batches(128, seed=5, start=3))
    assert torch.equal(resumed, first[3])
    assert torch.equal(a.sample(128, 5, 3).x_BD, first[3])
    assert not torch.equal(first[0], first[1])
    assert not torch.equal(next(a.batches(128, seed=6)), first[0])


def test_activations_are_the_sparse_sum_of_true_features():
    source = SyntheticSource(SyntheticConfig(d_in=16, n_features=64, n_clusters=4))
    batch = source.sample(256, 0, 0)
    torch.testing.assert_close(batch.x_BD, batch.acts_BF @ source.dictionary_FD, atol=1e-5, rtol=1e-5)
    assert (batch.acts_BF >= 0).all()


def test_uniform_frequencies_give_exact_expectations():
    source = SyntheticSource(SyntheticConfig(n_features=256, n_clusters=8, l0=4.0, leakage=0.2, freq_exponent=0.0))
    torch.testing.assert_close(source.expected_frequencies(), torch.full((256,), 4.0 / 256))
    assert source.expected_l0() == pytest.approx(4.0)
    assert source.expected_leakage() == pytest.approx(0.2)


def test_feature_frequencies_follow_the_power_law(power_law):
    source, x, acts, cluster = power_law
    assert source.active_probs_CF.max() < 1  # no clipping in this setting
    n = len(x)
    freq = (acts > 0).float().mean(0)
    expected = source.expected_frequencies()
    # every feature within 5 binomial standard deviations of its exact expectation
    sigma = (expected * (1 - expected) / n).sqrt()
    assert ((freq - expected).abs() / sigma).max() < 5
    # the log-log slope of frequency vs rank is the exponent
    slope = np.polyfit(np.log(np.arange(1, 257)), np.log(freq.numpy()), 1)[0]
    assert slope == pytest.approx(-0.6, abs=0.05)


def test_mean_l0_leakage_and_cluster_shares(power_law):
    source, x, acts, cluster = power_law
    on = acts > 0
    l0 = on.sum(1).float()
    assert source.expected_l0() == pytest.approx(3.0, rel=1e-6)
    assert l0.mean().item() == pytest.approx(3.0, abs=4 * l0.std().item() / math.sqrt(len(x)))
    outside = on & (source.feature_cluster_F[None, :] != cluster[:, None])
    assert outside.sum().item() / on.sum().item() == pytest.approx(0.1, abs=0.005)
    shares = torch.bincount(cluster, minlength=8).float() / len(x)
    torch.testing.assert_close(shares, source.cluster_probs_C.float(), atol=0.01, rtol=0)


@pytest.mark.parametrize("magnitude, second_moment", [("exponential", 2.0), ("half_normal", math.pi / 2),
                                                      ("constant", 1.0)])
def test_magnitudes_and_norms(magnitude, second_moment):
    # rho = 0: cross terms a_i a_j <v_i, v_j> average to 0, so E||x||^2 = l0 E[a^2] + d sigma^2
    cfg = SyntheticConfig(d_in=32, n_features=256, n_clusters=4, l0=3.0, cluster_cohesion=0.0,
                          magnitude=magnitude, noise_std=0.2, freq_exponent=0.0)
    source = SyntheticSource(cfg)
    x, acts, _ = draw(source, n_batches=4)
    values = acts[acts > 0]
    assert values.mean().item() == pytest.approx(1.0, abs=0.02)
    expected = 3.0 * second_moment + 32 * 0.2**2
    assert x.pow(2).sum(1).mean().item() == pytest.approx(expected, rel=0.05)


def test_clipping_is_accounted_for():
    # a steep power law with many clusters asks for probabilities above 1: they are clipped, and the
    # exact expectations (hence the empirical L0) are lower than the nominal l0
    source = SyntheticSource(SyntheticConfig(d_in=16, n_features=128, n_clusters=16, l0=4.0, freq_exponent=1.5))
    assert source.active_probs_CF.max() == 1.0
    assert source.expected_l0() < 4.0
    _, acts, _ = draw(source, n_batches=4)
    l0 = (acts > 0).sum(1).float()
    assert l0.mean().item() == pytest.approx(source.expected_l0(), abs=5 * l0.std().item() / math.sqrt(len(l0)))


def test_every_profile_has_synthetic_sizes():
    """`switch-sae reproduce --profile P` runs notebook 06 for every profile P: none may lack its sizes."""
    from switch_sae_core.profiles import PROFILES, synthetic_scale

    for name in PROFILES:
        assert synthetic_scale(name)["steps"] > 0, name
