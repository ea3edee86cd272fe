"""Ground-truth activations: sparse sums of known, clustered feature directions (a `BatchSource`).

The generative model, for one sample:

1. Draw the sample's cluster `c` with probability `pi_c` (the cluster's share of the total base frequency).
2. Each true feature `f` is active independently with probability `P[c, f]`:
   - inside the cluster:  `P[c, f] = l0 * (1 - leakage) * w_f / W_c`
   - outside the cluster: `P[c, f] = l0 * leakage * w_f / (W - W_c)`
   where `w_f = (f + 1) ** -freq_exponent` is the power-law base frequency of feature f (feature ids are
   frequency ranks: 0 is the most frequent), `W_c` the sum of `w` over cluster c and `W` over all.
   Probabilities above 1 are clipped to 1 (it happens for frequent features when `l0 * C` is large).
   Without clipping: the expected L0 is `l0`, a `leakage` fraction of the active features lies outside
   the sample's cluster, and the marginal frequency of feature f is `l0 * w_f / W` when clusters have
   equal weight (features are dealt to clusters round-robin by rank, `cluster(f) = f % C`, so they nearly
   do). The exact expectations, clipping included, are `expected_frequencies()`, `expected_l0()`,
   `expected_leakage()`.
3. Each active feature gets a magnitude with mean 1 (`exponential`, `half_normal` or `constant`).
4. `x = sum_f a_f v_f + noise_std * N(0, I)`.

Geometry (what a linear router can find): every cluster c has a random unit mean direction `mu_c`, and
feature f of cluster c is `v_f = normalize(sqrt(rho) mu_c + sqrt(1 - rho) g_f)` with `g_f` a random unit
vector and `rho = cluster_cohesion`. So `cos(v_f, mu_c)^2 ~ rho`, two features of one cluster have cosine
`~ rho`, and samples of cluster c have a large component along `mu_c`. `rho = 0` leaves only the
co-occurrence structure (no geometry).

Everything is reproducible: the dictionary depends on `SyntheticConfig.seed`; batch `i` of
`batches(batch_size, seed)` depends only on (config seed, `seed`, `i`, `batch_size`).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Iterator, Literal, NamedTuple

import numpy as np
import torch
from torch import Tensor

from ..config import Config, ConfigError

Magnitude = Literal["exponential", "half_normal", "constant"]


@dataclasses.dataclass
class SyntheticConfig(Config):
    """A ground-truth dataset: F clustered unit feature directions in R^d and how samples use them."""

    d_in: int = 64  # d, width of the activations
    n_features: int = 512  # F, number of true features (F >> d: superposition)
    n_clusters: int = 8  # C, features are dealt to clusters round-robin by frequency rank
    l0: float = 4.0  # expected number of active features per sample (before clipping probabilities at 1)
    leakage: float = 0.05  # expected fraction of a sample's active features outside its own cluster
    freq_exponent: float = 1.0  # base frequency of feature f (rank f, 0 = most frequent) is (f + 1) ** -freq_exponent
    cluster_cohesion: float = 0.3  # rho: squared cosine of each feature with its cluster's mean direction; 0 = none
    magnitude: Magnitude = "exponential"  # distribution of an active feature's coefficient, mean 1
    noise_std: float = 0.0  # std of isotropic Gaussian noise added to every coordinate
    seed: int = 0  # seed of the dictionary (the data stream has its own seed in `batches`)

    def validate(self) -> None:
        for name in ("d_in", "n_features", "n_clusters"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be a positive integer")
        if self.n_clusters > self.n_features:
            raise ConfigError(f"n_clusters={self.n_clusters} exceeds n_features={self.n_features}: a cluster would be empty")
        if self.l0 <= 0:
            raise ConfigError(f"l0={self.l0} must be positive")
        if not 0.0 <= self.leakage <= 1.0:
            raise ConfigError(f"leakage={self.leakage} is a fraction: choose a value within [0, 1]")
        if self.n_clusters == 1 and self.leakage > 0:
            raise ConfigError("leakage > 0 needs at least 2 clusters (set leakage=0 or n_clusters >= 2)")
        if self.freq_exponent < 0:
            raise ConfigError(f"freq_exponent={self.freq_exponent} must be >= 0 (0 = uniform frequencies)")
        if not 0.0 <= self.cluster_cohesion <= 1.0:
            raise ConfigError(f"cluster_cohesion={self.cluster_cohesion} is a squared cosine: choose a value within [0, 1]")
        if self.magnitude not in ("exponential", "half_normal", "constant"):
            raise ConfigError(f"magnitude={self.magnitude!r}: choose 'exponential', 'half_normal' or 'constant'")
        if self.noise_std < 0:
            raise ConfigError(f"noise_std={self.noise_std} must be >= 0")


class SyntheticBatch(NamedTuple):
    """One batch with its ground truth."""

    x_BD: Tensor
    """(B, D) activations."""
    acts_BF: Tensor
    """(B, F) true feature coefficients (0 where a feature is off)."""
    cluster_B: Tensor
    """(B,) the cluster each sample was drawn from (its dominant cluster)."""


def _generator(*seeds: int) -> torch.Generator:
    """A torch generator whose stream depends only on these non-negative integers."""
    state = np.random.SeedSequence([int(s) for s in seeds]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state >> np.uint64(1)))


def make_dictionary(cfg: SyntheticConfig) -> tuple[Tensor, Tensor, Tensor]:
    """-> (dictionary_FD unit rows, cluster_means_CD unit rows, feature_cluster_F)."""
    g = _generator(cfg.seed, 0)
    F, C, D, rho = cfg.n_features, cfg.n_clusters, cfg.d_in, cfg.cluster_cohesion
    means_CD = torch.randn(C, D, generator=g)
    means_CD /= means_CD.norm(dim=-1, keepdim=True)
    own_FD = torch.randn(F, D, generator=g)
    own_FD /= own_FD.norm(dim=-1, keepdim=True)
    cluster_F = torch.arange(F) % C
    dict_FD = math.sqrt(rho) * means_CD[cluster_F] + math.sqrt(1 - rho) * own_FD
    dict_FD /= dict_FD.norm(dim=-1, keepdim=True)
    return dict_FD, means_CD, cluster_F


class SyntheticSource:
    """Ground-truth activations (see the module docstring). Implements `BatchSource`."""

    def __init__(self, cfg: SyntheticConfig | None = None):
        self.cfg = cfg or SyntheticConfig()
        self.d_in = self.cfg.d_in
        self.dictionary_FD, self.cluster_means_CD, self.feature_cluster_F = make_dictionary(self.cfg)
        self.cluster_probs_C, self.active_probs_CF = self._probabilities()
        self._active_probs_CF32 = self.active_probs_CF.float()

    @property
    def n_features(self) -> int:
        return self.cfg.n_features

    @property
    def n_clusters(self) -> int:
        return self.cfg.n_clusters

    def _probabilities(self) -> tuple[Tensor, Tensor]:
        """-> (pi_C cluster probabilities, P_CF feature-on probability given the cluster), float64."""
        cfg = self.cfg
        w_F = (torch.arange(cfg.n_features, dtype=torch.float64) + 1) ** -cfg.freq_exponent
        in_CF = self.feature_cluster_F[None, :] == torch.arange(cfg.n_clusters)[:, None]
        W_C = (w_F * in_CF).sum(dim=1)
        W = w_F.sum()
        inside_CF = cfg.l0 * (1 - cfg.leakage) * w_F / W_C[:, None]
        outside_CF = cfg.l0 * cfg.leakage * w_F / (W - W_C).clamp_min(1e-300)[:, None]
        P_CF = torch.where(in_CF, inside_CF, outside_CF).clamp(max=1.0)
        return W_C / W, P_CF

    # --- exact expectations (clipping included), for tests and for reading the data --------------
    def expected_frequencies(self) -> Tensor:
        """(F,) probability that each feature is active in a sample."""
        return (self.cluster_probs_C @ self.active_probs_CF).float()

    def expected_l0(self) -> float:
        return float(self.cluster_probs_C @ self.active_probs_CF.sum(dim=1))

    def expected_leakage(self) -> float:
        """Expected active features outside the sample's cluster / expected active features."""
        in_CF = self.feature_cluster_F[None, :] == torch.arange(self.n_clusters)[:, None]
        outside = float(self.cluster_probs_C @ (self.active_probs_CF * ~in_CF).sum(dim=1))
        return outside / self.expected_l0()

    # --- sampling ---------------------------------------------------------------------------------
    def _magnitudes(self, n: int, g: torch.Generator) -> Tensor:
        """(n,) coefficients with mean 1."""
        kind = self.cfg.magnitude
        if kind == "exponential":  # inverse CDF; much faster than Tensor.exponential_ on large tensors
            return -torch.log1p(-torch.rand(n, generator=g))
        if kind == "half_normal":  # |N(0, s^2)| has mean s * sqrt(2 / pi); s = sqrt(pi / 2) makes it 1
            return torch.randn(n, generator=g).abs() * math.sqrt(math.pi / 2)
        return torch.ones(n)

    def _draw(self, batch_size: int, seed: int, index: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """-> (x_BD, cluster_B, on_indices (n, 2) as (sample, feature), values_n)."""
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        if seed < 0 or index < 0:
            raise ValueError(f"seed={seed} and index={index} must be non-negative")
        g = _generator(self.cfg.seed, 1, seed, index, batch_size)
        cluster_B = torch.multinomial(self.cluster_probs_C.float(), batch_size, replacement=True, generator=g)
        on_BF = torch.rand(batch_size, self.n_features, generator=g) < self._active_probs_CF32[cluster_B]
        on_n2 = on_BF.nonzero()
        values_n = self._magnitudes(len(on_n2), g)
        x_BD = torch.zeros(batch_size, self.d_in)
        x_BD.index_add_(0, on_n2[:, 0], values_n[:, None] * self.dictionary_FD[on_n2[:, 1]])
        if self.cfg.noise_std > 0:
            x_BD += self.cfg.noise_std * torch.randn(batch_size, self.d_in, generator=g)
        return x_BD, cluster_B, on_n2, values_n

    def sample(self, batch_size: int, seed: int = 0, index: int = 0) -> SyntheticBatch:
        """Batch number `index` of the stream `seed` (the same x as `batches`), with its ground truth."""
        x_BD, cluster_B, on_n2, values_n = self._draw(batch_size, seed, index)
        acts_BF = torch.zeros(batch_size, self.n_features)
        acts_BF[on_n2[:, 0], on_n2[:, 1]] = values_n
        return SyntheticBatch(x_BD, acts_BF, cluster_B)

    def batches(self, batch_size: int, seed: int = 0, start: int = 0) -> Iterator[Tensor]:
        """BatchSource: (batch_size, d_in) float32 batches forever, beginning with batch `start`."""
        index = start
        while True:
            yield self._draw(batch_size, seed, index)[0]
            index += 1

    def __repr__(self) -> str:
        return f"SyntheticSource({self.cfg})"
