"""How similar are the features of different experts (and of a Switch and a TopK SAE)?

The paper's analyses (SPEC "The paper's analyses"):
- expert x expert similarity: cell (i, j) = mean over expert i's features of the highest decoder
  cosine to any feature of expert j; the control cuts a TopK SAE's dictionary into equal blocks;
- feature duplication: fraction of features whose nearest neighbour has cosine > 0.9, and the mean
  nearest-neighbour cosine, split by feature frequency;
- readers' questions: matching Switch features to TopK features, representational similarity (CKA).

All functions take plain tensors: directions `dirs_MD` (one feature per row, global-id order, so
expert e owns rows e*M/N ... (e+1)*M/N - 1), latents `(T, M)` dense or torch-sparse. Cosine work is
done in row chunks so M of ~50K never needs an (M, M) matrix.
"""
from __future__ import annotations

import math
import warnings
from typing import TYPE_CHECKING, Literal, NamedTuple, Optional

import torch
from torch import Tensor

from .result_types import DistanceFromInit, DuplicationStats, FeatureMatch, FrequencyBin

if TYPE_CHECKING:
    from ..saes.base import BaseSAE

NNScope = Literal["anywhere", "other_expert"]

DUPLICATE_COSINE = 0.9  # the paper's threshold for "a duplicate feature"


def normalize_rows(dirs_MD: Tensor) -> Tensor:
    """Rows scaled to unit norm, float32 (zero rows stay zero)."""
    dirs_MD = dirs_MD.detach().float()
    return dirs_MD / dirs_MD.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def _check_blocks(dirs_MD: Tensor, n_blocks: int) -> int:
    if dirs_MD.ndim != 2:
        raise ValueError(f"expected feature directions of shape (M, D), got {tuple(dirs_MD.shape)}")
    M = dirs_MD.shape[0]
    if n_blocks < 1 or M % n_blocks:
        raise ValueError(f"M={M} features cannot be cut into n_experts={n_blocks} equal blocks")
    return M // n_blocks


def _chunks(M: int, chunk: int):
    for start in range(0, M, chunk):
        yield start, min(start + chunk, M)


def _cosines_to_all(u_MD: Tensor, start: int, stop: int, exclude_self: bool) -> Tensor:
    """(stop - start, M) cosines of rows start..stop to every row; self-matches set to -inf if asked."""
    cos_CM = u_MD[start:stop] @ u_MD.T
    if exclude_self:
        rows = torch.arange(stop - start)
        cos_CM[rows, rows + start] = float("-inf")
    return cos_CM


def expert_similarity_matrix(dirs_MD: Tensor, n_experts: int, exclude_self: bool = True, chunk: int = 1024) -> Tensor:
    """(N, N) cell (i, j) = mean over expert i's features of max cosine to any feature of expert j.

    `exclude_self`: on the diagonal a feature is not its own best match (otherwise the diagonal is 1).
    The TopK control is this same function on a TopK dictionary (see `random_blocks`).
    """
    width = _check_blocks(dirs_MD, n_experts)
    u_MD = normalize_rows(dirs_MD)
    M = u_MD.shape[0]
    if exclude_self and width == 1:
        raise ValueError("with one feature per expert there is nothing left on the diagonal once self-matches are excluded")
    best_MN = torch.empty(M, n_experts)
    for start, stop in _chunks(M, chunk):
        cos_CM = _cosines_to_all(u_MD, start, stop, exclude_self)
        best_MN[start:stop] = cos_CM.view(stop - start, n_experts, width).amax(dim=-1)
    return best_MN.view(n_experts, width, n_experts).mean(dim=1)


def random_blocks(dirs_MD: Tensor, seed: int = 0) -> Tensor:
    """The dictionary's rows in a random order: cutting it into equal blocks gives the paper's control."""
    g = torch.Generator().manual_seed(seed)
    return dirs_MD[torch.randperm(dirs_MD.shape[0], generator=g)]


def nearest_neighbour_cosines(
    dirs_MD: Tensor, n_experts: int = 1, scope: NNScope = "anywhere", chunk: int = 1024
) -> tuple[Tensor, Tensor]:
    """Each feature's highest cosine to another feature -> (cos_M, neighbour_id_M).

    scope="anywhere": any other feature of the dictionary (what a TopK SAE can be compared on);
    scope="other_expert": only features of a different expert (duplication ACROSS experts).
    """
    width = _check_blocks(dirs_MD, n_experts)
    if scope not in ("anywhere", "other_expert"):
        raise ValueError(f"scope={scope!r}: choose 'anywhere' or 'other_expert'")
    if scope == "other_expert" and n_experts < 2:
        raise ValueError("scope='other_expert' needs n_experts >= 2")
    u_MD = normalize_rows(dirs_MD)
    M = u_MD.shape[0]
    expert_M = torch.arange(M) // width
    cos_M, idx_M = torch.empty(M), torch.empty(M, dtype=torch.long)
    for start, stop in _chunks(M, chunk):
        cos_CM = _cosines_to_all(u_MD, start, stop, exclude_self=True)
        if scope == "other_expert":
            same_CM = expert_M[start:stop, None] == expert_M[None, :]
            cos_CM.masked_fill_(same_CM, float("-inf"))
        cos_M[start:stop], idx_M[start:stop] = cos_CM.max(dim=-1)
    return cos_M, idx_M


def nearest_features(dirs_MD: Tensor, feature: int, n_experts: int = 1, n: int = 5, other_expert: bool = True) -> tuple[Tensor, Tensor]:
    """The n features closest (decoder cosine) to one feature -> (ids_n, cos_n), best first.

    `other_expert`: only features of other experts (where a duplicate of this feature would live)."""
    width = _check_blocks(dirs_MD, n_experts)
    M = dirs_MD.shape[0]
    if not 0 <= feature < M:
        raise ValueError(f"feature {feature} is out of range: the dictionary has {M} features")
    u_MD = normalize_rows(dirs_MD)
    cos_M = u_MD @ u_MD[feature]
    cos_M[feature] = float("-inf")
    if other_expert and n_experts > 1:
        own = feature // width
        cos_M[own * width : (own + 1) * width] = float("-inf")
    cos_n, ids_n = cos_M.topk(min(n, int(torch.isfinite(cos_M).sum())))
    return ids_n, cos_n


def frequency_bins(freq_M: Tensor, n_bins: int = 4) -> tuple[Tensor, list[str]]:
    """Bin features by firing frequency at quantiles -> (bin_M, labels); bin 0 = rarest.

    Dead features (frequency 0) get their own bin -1 so they never blur the rarest bin.
    """
    freq_M = freq_M.float()
    alive = freq_M > 0
    bin_M = torch.full(freq_M.shape, -1, dtype=torch.long)
    if alive.any():
        edges = torch.quantile(freq_M[alive], torch.linspace(0, 1, n_bins + 1)[1:-1])
        bin_M[alive] = torch.bucketize(freq_M[alive], edges, right=True)
    lo = [freq_M[bin_M == b].min().item() if (bin_M == b).any() else float("nan") for b in range(n_bins)]
    hi = [freq_M[bin_M == b].max().item() if (bin_M == b).any() else float("nan") for b in range(n_bins)]
    labels = [f"q{b + 1} ({lo[b]:.1e}-{hi[b]:.1e})" for b in range(n_bins)]
    return bin_M, labels


def duplication_stats(
    nn_cos_M: Tensor, freq_M: Optional[Tensor] = None, threshold: float = DUPLICATE_COSINE, n_bins: int = 4
) -> DuplicationStats:
    """Duplication summary of nearest-neighbour cosines (from `nearest_neighbour_cosines`).

    Returns a `DuplicationStats`: 'frac_duplicated', 'n_duplicated', 'mean_nn_cos', and 'by_frequency' ([FrequencyBin
    (label, n, frac_duplicated, mean_nn_cos), ...], rarest first, dead features excluded) when freq_M is given.
    """
    dup_M = nn_cos_M > threshold
    out = DuplicationStats(threshold=threshold, n_features=int(nn_cos_M.numel()), n_duplicated=int(dup_M.sum()),
                           frac_duplicated=dup_M.float().mean().item(), mean_nn_cos=nn_cos_M.float().mean().item())
    if freq_M is not None:
        if freq_M.shape != nn_cos_M.shape:
            raise ValueError(f"freq_M {tuple(freq_M.shape)} must match nn_cos_M {tuple(nn_cos_M.shape)}")
        bin_M, labels = frequency_bins(freq_M, n_bins)
        out.by_frequency = [
            FrequencyBin(
                bin=b,
                label=labels[b],
                n=int((bin_M == b).sum()),
                frac_duplicated=dup_M[bin_M == b].float().mean().item() if (bin_M == b).any() else float("nan"),
                mean_nn_cos=nn_cos_M[bin_M == b].float().mean().item() if (bin_M == b).any() else float("nan"),
            )
            for b in range(n_bins)
        ]
        out.n_dead = int((bin_M == -1).sum())
    return out


def match_features(dirs_a_MD: Tensor, dirs_b_LD: Tensor, hungarian: bool = False, chunk: int = 1024) -> FeatureMatch:
    """Match each feature of dictionary A to dictionary B by decoder cosine.

    Returns a `FeatureMatch`: 'best_cos' (M,), 'best_id' (M,) (best B feature for every A feature, B features may
    be reused), and with `hungarian=True` a one-to-one assignment 'assigned_id' (M,), 'assigned_cos' (M,)
    (-1 / nan where A is larger than B; None without it). Hungarian is O(M^3): meant for M up to a few thousand.
    """
    u_a, u_b = normalize_rows(dirs_a_MD), normalize_rows(dirs_b_LD)
    if u_a.shape[1] != u_b.shape[1]:
        raise ValueError(f"dictionaries have different widths: {u_a.shape[1]} vs {u_b.shape[1]}")
    M = u_a.shape[0]
    best_cos, best_id = torch.empty(M), torch.empty(M, dtype=torch.long)
    for start, stop in _chunks(M, chunk):
        best_cos[start:stop], best_id[start:stop] = (u_a[start:stop] @ u_b.T).max(dim=-1)
    out = FeatureMatch(best_cos, best_id)
    if hungarian:
        if M * u_b.shape[0] > 25_000_000:
            raise ValueError(f"Hungarian matching of {M} x {u_b.shape[0]} features is too large; use hungarian=False")
        from scipy.optimize import linear_sum_assignment

        cos_ML = (u_a @ u_b.T).numpy()
        rows, cols = linear_sum_assignment(cos_ML, maximize=True)
        assigned_id = torch.full((M,), -1, dtype=torch.long)
        assigned_id[torch.as_tensor(rows)] = torch.as_tensor(cols, dtype=torch.long)
        assigned_cos = torch.full((M,), float("nan"))
        assigned_cos[torch.as_tensor(rows)] = torch.as_tensor(cos_ML[rows, cols])
        out.assigned_id, out.assigned_cos = assigned_id, assigned_cos
    return out


# --- an SAE's sparse codes on a set of tokens ---------------------------------------------------------


class Codes(NamedTuple):
    """An SAE's latents on T tokens, kept sparse."""

    acts_TK: Tensor
    """(T, K) values of the active latents (dense-latent SAEs: their largest `max_k` per row)."""
    ids_TK: Tensor
    """(T, K) global feature ids."""
    experts_TE: Optional[Tensor] = None
    """(T, top_e) routed experts, best first (Switch only)."""
    router_probs_TN: Optional[Tensor] = None
    """(T, N) router distribution (Switch only)."""

    @property
    def choice_T(self) -> Optional[Tensor]:
        """The router's first expert for each token (Switch only)."""
        return None if self.experts_TE is None else self.experts_TE[:, 0]


@torch.no_grad()
def collect_codes(sae, x_TD: Tensor, batch_size: int = 2048, max_k: int = 64) -> Codes:
    """Run any SAE over x_TD in batches and keep its sparse codes (on the CPU)."""
    device = next(sae.parameters()).device
    parts: list[list[Tensor]] = [[], [], [], []]
    for start in range(0, x_TD.shape[0], batch_size):
        out = sae(x_TD[start : start + batch_size].to(device))
        acts, ids = out.latent_acts, out.latent_indices
        if ids is None:  # dense latents (ReLU, Gated): keep the largest max_k per row
            acts, ids = acts.topk(min(max_k, acts.shape[1]), dim=-1)
        parts[0].append(acts.float().cpu())
        parts[1].append(ids.long().cpu())
        if hasattr(out, "router_probs"):
            parts[2].append(out.expert_indices.cpu())
            parts[3].append(out.router_probs.float().cpu())
    cat = [torch.cat(p) if p else None for p in parts]
    return Codes(*cat)


def firing_frequency(codes: Codes, n_latents: int) -> Tensor:
    """(M,) fraction of tokens on which each feature is active (> 0)."""
    on = codes.acts_TK > 0
    return torch.bincount(codes.ids_TK[on], minlength=n_latents).float() / max(codes.acts_TK.shape[0], 1)


# --- representational similarity (linear CKA, Kornblith et al. 2019) ---------------------------------


def sparse_latents(acts_TK: Tensor, indices_TK: Tensor, n_features: int) -> Tensor:
    """(T, M) torch sparse COO latent matrix from an SAE's (acts, indices) without densifying."""
    T, K = acts_TK.shape
    rows = torch.arange(T).repeat_interleave(K)
    idx = torch.stack([rows, indices_TK.reshape(-1).long()])
    return torch.sparse_coo_tensor(idx, acts_TK.reshape(-1).float(), (T, n_features), check_invariants=True).coalesce()


def linear_gram(X_TA: Tensor) -> Tensor:
    """(T, T) Gram matrix X X^T of a dense or torch-sparse (T, A) representation (float64)."""
    if X_TA.is_sparse:
        X_TA = X_TA.double().coalesce()
        with warnings.catch_warnings():  # torch calls its sparse-sparse product "beta"; it is exact
            warnings.simplefilter("ignore", UserWarning)
            return torch.sparse.mm(X_TA, X_TA.t()).to_dense()
    X_TA = X_TA.detach().double()
    return X_TA @ X_TA.T


def _hsic(K_TT: Tensor, L_TT: Tensor, debiased: bool) -> Tensor:
    n = K_TT.shape[0]
    if not debiased:  # tr(H K H L) with H = I - 11^T/n, centring by means instead of two T^3 products
        Kc = K_TT - K_TT.mean(dim=0, keepdim=True) - K_TT.mean(dim=1, keepdim=True) + K_TT.mean()
        return (Kc * L_TT).sum()
    # unbiased HSIC estimator (Song et al. 2012), as in Nguyen et al. 2021's debiased CKA
    K, L = K_TT.clone(), L_TT.clone()
    K.fill_diagonal_(0)
    L.fill_diagonal_(0)
    ones = torch.ones(n, dtype=K.dtype)
    return (
        (K * L).sum()
        + K.sum() * L.sum() / ((n - 1) * (n - 2))
        - 2.0 / (n - 2) * (ones @ K) @ (L @ ones)
    ) / (n * (n - 3))


def cka_from_grams(K_TT: Tensor, L_TT: Tensor, debiased: bool = False) -> float:
    """Linear CKA = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)) from two Gram matrices of the same tokens."""
    if K_TT.shape != L_TT.shape or K_TT.shape[0] != K_TT.shape[1]:
        raise ValueError(f"Gram matrices must both be (T, T) over the same tokens, got {tuple(K_TT.shape)}, {tuple(L_TT.shape)}")
    if debiased and K_TT.shape[0] < 4:
        raise ValueError("debiased CKA needs at least 4 tokens")
    kl = _hsic(K_TT, L_TT, debiased)
    kk, ll = _hsic(K_TT, K_TT, debiased), _hsic(L_TT, L_TT, debiased)
    return (kl / (kk * ll).sqrt().clamp_min(1e-300)).item()


def linear_cka(X_TA: Tensor, Y_TB: Tensor, debiased: bool = False) -> float:
    """Linear CKA of two representations of the SAME T tokens (rows); dense or torch-sparse (T, A).

    1 for identical representations, invariant to orthogonal transforms and isotropic scaling; the
    Gram (T x T) form keeps the cost independent of the dictionary width M.
    """
    if X_TA.shape[0] != Y_TB.shape[0]:
        raise ValueError(f"CKA compares the same tokens: got {X_TA.shape[0]} and {Y_TB.shape[0]} rows")
    return cka_from_grams(linear_gram(X_TA), linear_gram(Y_TB), debiased)


# --- how far training moved the features -----------------------------------------------------------
def random_mean_abs_cosine(d: int) -> float:
    """E|cos| of two independent uniformly random unit vectors in R^d: Γ(d/2) / (√π Γ((d+1)/2))
    (≈ sqrt(2 / (π d)); 0.033 for d = 576)."""
    return math.exp(math.lgamma(d / 2) - math.lgamma((d + 1) / 2)) / math.sqrt(math.pi)


def distance_from_init(sae: "BaseSAE", seed: int) -> DistanceFromInit:
    """How far training moved every feature from its initial direction.

    Returns a `DistanceFromInit`: {'decoder_mean_abs_cos', 'encoder_mean_abs_cos': mean over the M features of |cos(trained,
    initial)| (1 = never moved), 'random': the same for unrelated directions (`random_mean_abs_cosine(d)`)}.
    The initial SAE is rebuilt by `saes.base.initial_sae(cfg, seed)` (seed = the TrainConfig.seed it was
    trained with), without touching the caller's RNG. Not meaningful for an SAE whose initialisation is not
    that rule's (an imported SAE; an expert-parallel one built per rank): it then reads as "moved away"."""
    from ..saes.base import initial_sae  # analysis reads SAEs; the import stays local to keep this module light

    with torch.random.fork_rng(devices=[]):
        init = initial_sae(sae.cfg, seed)
    out = {}
    for name in ("decoder", "encoder"):
        trained_MD = normalize_rows(getattr(sae, f"{name}_directions")().detach().float().cpu())
        init_MD = normalize_rows(getattr(init, f"{name}_directions")().detach().float())
        out[f"{name}_mean_abs_cos"] = float((trained_MD * init_MD).sum(1).abs().mean())
    return DistanceFromInit(**out, random=random_mean_abs_cosine(sae.cfg.d_in))
