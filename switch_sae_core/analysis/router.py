"""Router geometry: what does the Switch SAE's router look at, and is it a pooled dense SAE encoder?

Readers of the paper asked whether the router is "approximately a down-projection from the encoder
features learned by a dense SAE trained on the same activations". This module measures it:
- `router_alignment`: router rows vs each expert's mean encoder / mean decoder direction (cosines);
- `assign_to_experts` + `pooled_expert_scores` + `agreement`: give every dense TopK feature to the
  expert whose features it best matches, pool its activations per expert, take the argmax and count
  how often it picks the router's expert; `probe_router_choice`: a linear probe on TopK latents;
- `principal_angles`: the router's (centred, N-1 dimensional) row space vs the top principal subspace of
  the same dimension of the dense encoder (or of the activations), with a random-subspace baseline;
- `tsne_embedding` + `silhouette_by_expert`: the paper's t-SNE claim ("encoder features cluster by
  expert, decoder features much less") as a number.

Inputs are tensors: feature directions (M, D) in global-id order (expert e owns rows e*M/N ...
(e+1)*M/N - 1), router rows (N, D), TopK latents as (acts, indices). Expert load and router
entropy are defined once, in `switch_sae_core.metrics`.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from .result_types import (Agreement, Clustering, DiagonalSummary, PooledRows, ProbeResult, RouterAlignment,
                           RouterGeometry, SubspaceAngles)
from .similarity import match_features, normalize_rows


# --- router rows vs expert mean directions ------------------------------------------------------------


def expert_mean_directions(dirs_MD: Tensor, n_experts: int) -> Tensor:
    """(N, D) mean of each expert's unit feature directions."""
    M, D = dirs_MD.shape
    if M % n_experts:
        raise ValueError(f"M={M} features cannot be split into n_experts={n_experts} equal experts")
    return normalize_rows(dirs_MD).view(n_experts, M // n_experts, D).mean(dim=1)


def _center(rows_ND: Tensor) -> Tensor:
    return rows_ND - rows_ND.mean(dim=0, keepdim=True)


def cosine_matrix(a_ND: Tensor, b_ND: Tensor) -> Tensor:
    """(N, N') cosines between the rows of a and the rows of b."""
    return normalize_rows(a_ND) @ normalize_rows(b_ND).T


def diagonal_summary(cos_NN: Tensor) -> DiagonalSummary:
    """Mean diagonal vs off-diagonal and how often a row's largest entry is its own column."""
    N = cos_NN.shape[0]
    off = ~torch.eye(N, dtype=torch.bool)
    return DiagonalSummary(
        diag_mean=cos_NN.diagonal().mean().item(),
        offdiag_mean=cos_NN[off].mean().item() if N > 1 else float("nan"),
        own_is_best=(cos_NN.argmax(dim=1) == torch.arange(N)).float().mean().item(),
    )


def router_alignment(W_router_ND: Tensor, enc_MD: Tensor, dec_MD: Tensor, center: bool = True) -> RouterAlignment:
    """Cosine of router row i with expert j's mean encoder and mean decoder direction.

    `center`: subtract the mean over experts from router rows and from expert means first. The
    softmax ignores any component shared by all router rows, so only the centred rows are geometry
    the router actually uses; centring the expert means likewise removes what all experts share.
    Returns a `RouterAlignment`: 'router_vs_encoder' and 'router_vs_decoder' (N, N), their `diagonal_summary`s
    'encoder' and 'decoder'.
    """
    W_router_ND = W_router_ND.detach().float()
    N = W_router_ND.shape[0]
    enc_mean_ND, dec_mean_ND = expert_mean_directions(enc_MD, N), expert_mean_directions(dec_MD, N)
    if center and N > 1:
        W_router_ND, enc_mean_ND, dec_mean_ND = _center(W_router_ND), _center(enc_mean_ND), _center(dec_mean_ND)
    vs_enc, vs_dec = cosine_matrix(W_router_ND, enc_mean_ND), cosine_matrix(W_router_ND, dec_mean_ND)
    return RouterAlignment(vs_enc, vs_dec, diagonal_summary(vs_enc), diagonal_summary(vs_dec))


# --- the router as a pooled dense encoder ------------------------------------------------------------


def assign_to_experts(dense_dec_LD: Tensor, switch_dec_MD: Tensor, n_experts: int) -> tuple[Tensor, Tensor]:
    """Give each dense (TopK) feature the expert of its best-matching Switch feature -> (expert_L, cos_L)."""
    M = switch_dec_MD.shape[0]
    if M % n_experts:
        raise ValueError(f"M={M} features cannot be split into n_experts={n_experts} equal experts")
    match = match_features(dense_dec_LD, switch_dec_MD)
    return match["best_id"] // (M // n_experts), match["best_cos"]


def pooled_expert_scores(acts_TK: Tensor, indices_TK: Tensor, expert_L: Tensor, n_experts: int) -> Tensor:
    """(T, N) sum of each token's dense-SAE latent activations over the features assigned to each expert."""
    T = acts_TK.shape[0]
    scores_TN = torch.zeros(T, n_experts)
    return scores_TN.scatter_add_(1, expert_L[indices_TK.long()], acts_TK.detach().float())


def pooled_router_rows(dense_enc_LD: Tensor, expert_L: Tensor, n_experts: int) -> Tensor:
    """(N, D) the down-projection hypothesis as weights: mean unit encoder row of the features given to each expert."""
    u_LD = normalize_rows(dense_enc_LD)
    sums_ND = torch.zeros(n_experts, u_LD.shape[1]).index_add_(0, expert_L, u_LD)
    counts_N = torch.bincount(expert_L, minlength=n_experts).clamp_min(1)
    return sums_ND / counts_N[:, None]


def agreement(pred_T: Tensor, choice_T: Tensor, n_experts: int) -> Agreement:
    """Accuracy of predicted experts against the router's choice, with the majority-class chance level."""
    choice_T = choice_T.long()
    load_N = torch.bincount(choice_T, minlength=n_experts).float() / choice_T.numel()
    return Agreement(accuracy=(pred_T.long() == choice_T).float().mean().item(), chance=load_N.max().item(),
                     uniform_chance=1.0 / n_experts)


def probe_router_choice(features_TA, choice_T: Tensor, test_frac: float = 0.25, seed: int = 0, C: float = 1.0) -> ProbeResult:
    """Held-out accuracy of a multinomial logistic-regression probe predicting the router's expert.

    `features_TA`: numpy / scipy-sparse / torch (T, A) features of the same tokens (e.g. dense TopK latents
    from `scipy_latents`). Tokens are split at random into train / test.
    """
    from sklearn.linear_model import LogisticRegression

    if isinstance(features_TA, Tensor):
        features_TA = features_TA.detach().float().numpy()
    y_T = choice_T.long().numpy()
    T = y_T.shape[0]
    perm = np.random.default_rng(seed).permutation(T)
    n_test = max(1, int(T * test_frac))
    test, train = perm[:n_test], perm[n_test:]
    if len(np.unique(y_T[train])) < 2:
        return ProbeResult(accuracy=float("nan"), train_accuracy=float("nan"), note="router used a single expert")
    probe = LogisticRegression(C=C, max_iter=300)
    probe.fit(features_TA[train], y_T[train])
    return ProbeResult(accuracy=float(probe.score(features_TA[test], y_T[test])),
                       train_accuracy=float(probe.score(features_TA[train], y_T[train])),
                       n_train=int(train.size), n_test=int(test.size))


def scipy_latents(acts_TK: Tensor, indices_TK: Tensor, n_features: int):
    """(T, M) scipy CSR matrix of sparse latents (for sklearn probes) without densifying."""
    from scipy.sparse import csr_matrix

    T, K = acts_TK.shape
    rows = np.repeat(np.arange(T), K)
    return csr_matrix(
        (acts_TK.detach().float().reshape(-1).numpy(), (rows, indices_TK.reshape(-1).long().numpy())), shape=(T, n_features)
    )


# --- subspaces --------------------------------------------------------------------------------------


@contextmanager
def one_thread():
    """For small LAPACK problems (D x D): one thread is as fast, and a multi-threaded eigh on an
    oversubscribed 2-core machine was measured 70x slower (12.6 s vs 0.17 s for D = 576)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)



def principal_angles(A_KD: Tensor, B_LD: Tensor) -> Tensor:
    """Principal angles (radians, ascending) between the row spaces of A and B: min(rank A, rank B) of them."""
    if A_KD.shape[1] != B_LD.shape[1]:
        raise ValueError(f"subspaces live in different spaces: D={A_KD.shape[1]} vs {B_LD.shape[1]}")
    with one_thread():
        Qa = _orthonormal_rows(A_KD)
        Qb = _orthonormal_rows(B_LD)
        cos = torch.linalg.svdvals(Qa @ Qb.T).clamp(-1.0, 1.0)
    return torch.arccos(cos).sort().values


def _orthonormal_rows(A_KD: Tensor, rtol: float = 1e-6) -> Tensor:
    """Orthonormal basis (r, D) of A's row space (rank r, via SVD)."""
    U, S, Vh = torch.linalg.svd(A_KD.detach().double(), full_matrices=False)
    rank = int((S > rtol * S.max()).sum())
    return Vh[:rank]


def top_principal_directions(X_TD: Tensor, n: int, center: bool = True) -> Tensor:
    """(n, D) top-n principal directions of the rows of X (of their covariance when `center`)."""
    X = X_TD.detach().double()
    if center:
        X = X - X.mean(dim=0, keepdim=True)
    with one_thread():
        evals, evecs = torch.linalg.eigh(X.T @ X)  # (D, D) second-moment matrix: cheap for T >> D
    return evecs[:, evals.argsort(descending=True)[:n]].T


def random_subspace_angles(d: int, k: int, l: int, n_draws: int = 20, seed: int = 0) -> Tensor:
    """(n_draws, min(k, l)) principal angles between random k- and l-dim subspaces of R^d (the baseline)."""
    g = torch.Generator().manual_seed(seed)
    return torch.stack(
        [principal_angles(torch.randn(k, d, generator=g), torch.randn(l, d, generator=g)) for _ in range(n_draws)]
    )


def router_subspace_angles(W_router_ND: Tensor, reference_XD: Tensor, center_router: bool = True,
                           center_reference: bool = True) -> SubspaceAngles:
    """Principal angles between the router's row space and the top principal subspace of a reference.

    `reference_XD`: a dense encoder's rows (M, D) or activations (T, D). The router's centred rows span
    N-1 dimensions (softmax ignores the shared component), so the reference's top N-1 directions are used.
    Returns a `SubspaceAngles`: 'dim', 'angles_deg', 'random_angles_deg' (mean over random draws), 'mean_cos2',
    'random_mean_cos2'.
    """
    W = W_router_ND.detach().double()
    if center_router:
        W = W - W.mean(dim=0, keepdim=True)
    with one_thread():
        dim = int(torch.linalg.matrix_rank(W))
    top = top_principal_directions(reference_XD, dim, center=center_reference)
    angles = principal_angles(W, top)
    rand = random_subspace_angles(W.shape[1], dim, dim)
    return SubspaceAngles(dim=dim, angles_deg=torch.rad2deg(angles), random_angles_deg=torch.rad2deg(rand).mean(dim=0),
                          mean_cos2=angles.cos().pow(2).mean().item(), random_mean_cos2=rand.cos().pow(2).mean().item())


# --- clustering by expert ---------------------------------------------------------------------------


def expert_labels(M: int, n_experts: int) -> Tensor:
    """(M,) the expert that owns each global feature id."""
    return torch.arange(M) // (M // n_experts)


def sample_features(M: int, max_points: Optional[int], seed: int = 0) -> Tensor:
    """Sorted random subset of feature ids (all of them when max_points is None or >= M)."""
    if max_points is None or max_points >= M:
        return torch.arange(M)
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(M, generator=g)[:max_points].sort().values


def silhouette_by_expert(dirs_MD: Tensor, n_experts: int, max_points: Optional[int] = 4000, seed: int = 0, metric: str = "cosine") -> float:
    """Silhouette score (-1..1) of the features grouped by their expert, in the original D-dim space.

    High = a feature is closer (in cosine distance) to its own expert's features than to the nearest
    other expert's. This is the number behind the paper's t-SNE picture.
    """
    from sklearn.metrics import silhouette_score
    from threadpoolctl import threadpool_limits

    M = dirs_MD.shape[0]
    ids = sample_features(M, max_points, seed)
    labels = expert_labels(M, n_experts)[ids].numpy()
    with threadpool_limits(limits=1):  # see `one_thread`
        return float(silhouette_score(normalize_rows(dirs_MD)[ids].numpy(), labels, metric=metric))


def tsne_embedding(dirs_MD: Tensor, max_points: Optional[int] = 2000, seed: int = 0, perplexity: float = 30.0) -> tuple[np.ndarray, Tensor]:
    """2-D t-SNE (cosine metric) of unit feature directions -> (xy_P2, feature_ids_P).

    Runs single-threaded: sklearn's OpenMP threads slow t-SNE down ~6x on a busy 2-core machine."""
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits

    M = dirs_MD.shape[0]
    ids = sample_features(M, max_points, seed)
    X = normalize_rows(dirs_MD)[ids].numpy()
    perplexity = min(perplexity, max(2.0, (len(ids) - 1) / 3))
    tsne = TSNE(n_components=2, metric="cosine", init="pca", perplexity=perplexity, random_state=seed)
    with threadpool_limits(limits=1):
        return tsne.fit_transform(X), ids


def embedding_silhouette(xy_P2, labels_P) -> float:
    """Silhouette (Euclidean) of a 2-D embedding's points grouped by label: the clustering the t-SNE picture shows."""
    from sklearn.metrics import silhouette_score
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1):
        return float(silhouette_score(np.asarray(xy_P2), np.asarray(labels_P)))


def clustering_summary(enc_MD: Tensor, dec_MD: Tensor, n_experts: int, max_points: Optional[int] = 4000,
                       seed: int = 0) -> Clustering:
    """Silhouette-by-expert of encoder and decoder features (the "encoder clusters, decoder less" claim)."""
    return Clustering(silhouette_encoder=silhouette_by_expert(enc_MD, n_experts, max_points, seed),
                      silhouette_decoder=silhouette_by_expert(dec_MD, n_experts, max_points, seed))


# --- everything at once, for a trained Switch SAE and a dense TopK SAE -----------------------------------


def routed_directions(switch_sae) -> tuple[Tensor, Tensor]:
    """(enc_MD, dec_MD) of the ROUTED experts only (a shared expert's features are dropped), CPU float."""
    M = switch_sae.cfg.n_features
    enc = switch_sae.encoder_directions().detach().float().cpu()[:M]
    dec = switch_sae.decoder_directions().detach().float().cpu()[:M]
    return enc, dec


def router_geometry(switch_sae, topk_sae, x_TD: Tensor, switch_codes=None, topk_codes=None,
                    max_points: int = 4000, probe: bool = True, seed: int = 0) -> RouterGeometry:
    """All router-geometry numbers for one Switch SAE and a dense TopK SAE trained on the same activations.

    A `RouterGeometry` (read as `geo["pooled"]["chance"]` or `geo.pooled.chance`): 'alignment' (router_alignment), 'assignment_cos' (TopK feature -> best Switch feature cosines),
    'pooled' (argmax of pooled TopK activations vs the router), 'pooled_rows' (router-like rows built by
    pooling TopK encoder rows: their routing accuracy and cosines with the real router rows), 'probe'
    (linear probe on TopK latents), 'angles_encoder' / 'angles_activations' (router_subspace_angles),
    'clustering' (silhouette by expert of encoder and decoder features); 'probe' and 'probe_activations' are None
    with `probe=False`.
    """
    from .similarity import collect_codes

    N = switch_sae.cfg.n_experts
    W_router = switch_sae.W_router.detach().float().cpu()
    enc, dec = routed_directions(switch_sae)
    switch_codes = switch_codes if switch_codes is not None else collect_codes(switch_sae, x_TD)
    topk_codes = topk_codes if topk_codes is not None else collect_codes(topk_sae, x_TD)
    choice_T = switch_codes.choice_T
    dense_enc = topk_sae.encoder_directions().detach().float().cpu()
    dense_dec = topk_sae.decoder_directions().detach().float().cpu()

    expert_L, cos_L = assign_to_experts(dense_dec, dec, N)
    scores_TN = pooled_expert_scores(topk_codes.acts_TK, topk_codes.ids_TK, expert_L, N)
    rows_ND = pooled_router_rows(dense_enc, expert_L, N)
    x = x_TD.detach().float().cpu()
    pooled_choice_T = ((x - switch_sae.b_router.detach().float().cpu()) @ rows_ND.T).argmax(-1)
    pooled_rows = PooledRows(**agreement(pooled_choice_T, choice_T, N).to_json(),
                             **diagonal_summary(cosine_matrix(_center(W_router), _center(rows_ND))).to_json())
    out = RouterGeometry(
        n_experts=N,
        alignment=router_alignment(W_router, enc, dec),
        assignment_cos=cos_L,
        features_per_expert=torch.bincount(expert_L, minlength=N),
        pooled=agreement(scores_TN.argmax(-1), choice_T, N),
        pooled_rows=pooled_rows,
        angles_encoder=router_subspace_angles(W_router, dense_enc, center_reference=False),
        angles_activations=router_subspace_angles(W_router, x),
        clustering=clustering_summary(enc, dec, N, max_points, seed),
    )
    if probe:
        out.probe = probe_router_choice(scipy_latents(topk_codes.acts_TK, topk_codes.ids_TK, dense_dec.shape[0]), choice_T, seed=seed)
        # reference: the router is linear in x, so a probe on x itself is the ceiling for this many tokens
        out.probe_activations = probe_router_choice(x, choice_T, seed=seed)
    return out


def alignment_table(geo: RouterGeometry):
    """Router rows vs the experts' mean encoder and decoder directions (`router_geometry`'s 'alignment', centred):
    per side, the mean cosine of router row i with expert i's mean direction (diagonal) and with the others'
    (off-diagonal), and the fraction of experts whose router row is closest to their own mean direction."""
    import pandas as pd

    al = geo["alignment"]
    return pd.DataFrame({side: {"diagonal": al[side]["diag_mean"], "off-diagonal": al[side]["offdiag_mean"],
                                "router row closest to its own expert": al[side]["own_is_best"]}
                         for side in ("encoder", "decoder")}).T.round(3)


def agreement_table(geo: RouterGeometry):
    """Is the router a pooled dense encoder? The fraction of held-out tokens on which each predictor built from
    the TopK SAE (`router_geometry`: 'pooled', 'pooled_rows', 'probe') or from the activations themselves (the
    linear ceiling) picks the router's expert, and the chance level (always the most loaded expert)."""
    import pandas as pd

    rows = {"pooled TopK activations, argmax": geo["pooled"]["accuracy"],
            "pooled TopK encoder rows as a router": geo["pooled_rows"]["accuracy"],
            "linear probe on TopK latents (held out)": geo["probe"]["accuracy"],
            "linear probe on the activations (ceiling)": geo["probe_activations"]["accuracy"],
            "chance (most loaded expert)": geo["pooled"]["chance"]}
    return pd.DataFrame({"agrees with the router": rows}).round(3)


def routing_history(history: list[dict]) -> tuple[list[int], list[list[float]], list[float]]:
    """(steps, expert_load_SN, router_entropy_S) from a trainer history (rows with 'expert_load')."""
    rows = [r for r in history if "expert_load" in r]
    if not rows:
        raise ValueError("this training history has no 'expert_load' entries: was it a Switch SAE?")
    return [r["step"] for r in rows], [r["expert_load"] for r in rows], [r["router_entropy"] for r in rows]
