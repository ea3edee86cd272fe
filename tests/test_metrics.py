"""Metrics against numpy references and properties that must hold."""
import math

import numpy as np
import pytest
import torch

from switch_sae_core import metrics


@pytest.fixture
def xy():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 12, generator=g) * 3 + 1
    x_hat = x + 0.5 * torch.randn(64, 12, generator=g)
    return x, x_hat


def test_mse_is_summed_over_dims_and_averaged_over_inputs(xy):
    x, x_hat = xy
    ref = np.mean(np.sum((x.numpy() - x_hat.numpy()) ** 2, axis=1))
    assert metrics.mse(x, x_hat).item() == pytest.approx(ref, rel=1e-5)


def test_fvu_reference_and_properties(xy):
    x, x_hat = xy
    xn, xhn = x.double().numpy(), x_hat.double().numpy()
    ref = ((xn - xhn) ** 2).sum() / ((xn - xn.mean(0)) ** 2).sum()
    assert metrics.fvu(x, x_hat).item() == pytest.approx(ref, rel=1e-5)
    assert metrics.fvu(x, x.mean(0).expand_as(x)).item() == pytest.approx(1.0, abs=1e-6)  # the mean predictor
    assert metrics.fvu(x, x).item() == 0.0  # perfect reconstruction
    # fvu = mse / (mean squared distance to the batch mean)
    var = (x - x.mean(0)).pow(2).sum(-1).mean()
    assert metrics.fvu(x, x_hat).item() == pytest.approx((metrics.mse(x, x_hat) / var).item(), rel=1e-5)


def test_cosine_and_l2_ratio(xy):
    x, x_hat = xy
    xn, xhn = x.numpy(), x_hat.numpy()
    cos = np.mean(np.sum(xn * xhn, 1) / np.linalg.norm(xn, axis=1) / np.linalg.norm(xhn, axis=1))
    assert metrics.cosine_similarity(x, x_hat).item() == pytest.approx(cos, rel=1e-5)
    assert metrics.cosine_similarity(x, 2 * x).item() == pytest.approx(1.0, abs=1e-6)
    assert metrics.cosine_similarity(x, -x).item() == pytest.approx(-1.0, abs=1e-6)
    ratio = np.mean(np.linalg.norm(xhn, axis=1) / np.linalg.norm(xn, axis=1))
    assert metrics.l2_ratio(x, x_hat).item() == pytest.approx(ratio, rel=1e-5)
    assert metrics.l2_ratio(x, 0.5 * x).item() == pytest.approx(0.5, rel=1e-6)


def test_l0_sparse_and_dense():
    acts_BK = torch.tensor([[1.0, 0.0, 2.0], [0.0, 0.0, 3.0]])  # a ReLU-clipped TopK winner does not count
    assert metrics.l0(acts_BK).item() == pytest.approx(1.5)
    dense_BM = torch.zeros(4, 100)
    dense_BM[0, :10] = 1
    dense_BM[3, 50:52] = 0.1
    assert metrics.l0(dense_BM).item() == pytest.approx(3.0)


def test_fired_features_sparse_matches_dense():
    g = torch.Generator().manual_seed(1)
    M = 50
    idx_BK = torch.randint(0, M, (8, 5), generator=g)
    acts_BK = torch.rand(8, 5, generator=g) * (torch.rand(8, 5, generator=g) > 0.3)
    dense_BM = torch.zeros(8, M).scatter_add_(1, idx_BK, acts_BK)
    sparse = metrics.fired_features(acts_BK, idx_BK, M)
    assert torch.equal(sparse, metrics.fired_features(dense_BM, None, M))
    ref = np.zeros(M, bool)
    for i, a in zip(idx_BK.flatten().tolist(), acts_BK.flatten().tolist()):
        ref[i] |= a != 0
    assert sparse.numpy().tolist() == ref.tolist()


def test_dead_feature_tracker_counts_tokens_since_fired():
    tr = metrics.DeadFeatureTracker(n_features=6, window_tokens=10)
    assert tr.dead_fraction().item() == 0.0  # nothing is dead before a full window
    # batch of 4 tokens: features 0 and 2 fire; feature 5 is a TopK winner clipped to 0 (does not fire)
    tr.update(torch.tensor([[1.0, 0.0], [2.0, 0.5]]).repeat(2, 1), torch.tensor([[0, 5], [2, 2]]).repeat(2, 1))
    assert tr.tokens_since_fired_M.tolist() == [0, 4, 0, 4, 4, 4]
    dense = torch.zeros(8, 6)
    dense[3, 1] = 0.2
    tr.update(dense)  # dense form: feature 1 fires
    assert tr.tokens_since_fired_M.tolist() == [8, 0, 8, 12, 12, 12]
    assert tr.dead_mask().tolist() == [False, False, False, True, True, True]
    assert tr.dead_fraction().item() == pytest.approx(0.5)
    assert metrics.dead_fraction(tr.tokens_since_fired_M, 10).item() == pytest.approx(0.5)
    tr2 = metrics.DeadFeatureTracker(6, 10)
    tr2.load_state_dict(tr.state_dict())
    assert torch.equal(tr2.tokens_since_fired_M, tr.tokens_since_fired_M)
    with pytest.raises(ValueError, match="shape"):
        metrics.DeadFeatureTracker(7, 10).load_state_dict(tr.state_dict())


def test_expert_load_and_entropies():
    idx_B1 = torch.tensor([[0], [1], [1], [3]])
    load = metrics.expert_load(idx_B1, 4)
    assert load.tolist() == [0.25, 0.5, 0.0, 0.25]
    assert metrics.expert_load(torch.tensor([[0, 1], [1, 2]]), 3).tolist() == [0.25, 0.5, 0.25]  # top-2
    assert metrics.load_entropy(torch.full((8,), 1 / 8)).item() == pytest.approx(math.log(8), rel=1e-6)
    assert metrics.load_entropy(torch.tensor([1.0, 0, 0])).item() == pytest.approx(0.0, abs=1e-6)
    probs = torch.softmax(torch.randn(10, 5, generator=torch.Generator().manual_seed(2)), -1)
    ref = np.mean(-np.sum(probs.numpy() * np.log(probs.numpy()), 1))
    assert metrics.router_entropy(probs).item() == pytest.approx(ref, rel=1e-5)
    assert metrics.router_entropy(torch.full((3, 4), 0.25)).item() == pytest.approx(math.log(4), rel=1e-6)
    assert metrics.router_entropy(torch.eye(4)).item() == pytest.approx(0.0, abs=1e-6)
