"""Feature recovery on ground-truth data (`data.synthetic`): did the SAE find the true features, and did
the Switch SAE's experts find the true clusters?

Definitions (cosines are between unit-normalised decoder rows and true feature directions; SAE features
are non-negative, so a feature pointing the opposite way is NOT a match: no absolute value):
- `mmcs` (truth -> learned): mean over TRUE features of the highest cosine to any learned feature.
  "How well is each true feature covered?" This is the headline number; 1 = every true feature has
  an exact learned copy.
- `mmcs_learned` (learned -> truth): mean over LEARNED features of the highest cosine to any true
  feature. "How many learned features are real?" Dead or duplicated junk pulls it down.
- `recovered_frac`: fraction of true features whose best learned match has cosine > 0.9.
- `dead_frac`: fraction of learned features that never fired on the evaluation samples
  (`metrics.fired_features`).
- duplicates: learned pairs with cosine > 0.9 (`n_duplicate_pairs`), the fraction of learned features
  with such a neighbour anywhere / in another expert (`analysis.similarity`), and `redundant_frac`: the
  fraction of recovered true features matched (> 0.9) by more than one learned feature.
- expert alignment (Switch): `expert_nmi` = normalised mutual information (arithmetic normalisation, as
  sklearn's default) between the routed expert and the sample's cluster; `expert_purity` = fraction of
  samples whose expert's most common cluster is their own cluster; `cluster_concentration` = fraction of
  samples routed to their cluster's most used expert; `feature_expert_nmi` = NMI between the true cluster
  of each recovered true feature and the expert holding its best learned match. `random_nmi` = NMI of a
  uniformly random routing of the same samples (the chance level at this sample size); `max_nmi` = the
  best NMI N experts can reach on C equal clusters (< 1 when N != C); `load_balance` =
  entropy of the expert load / log N (1 = every expert gets the same share of samples).
"""
from __future__ import annotations

import math
from typing import Any, Iterable

import numpy as np
import torch
from torch import Tensor

from .. import metrics
from ..config import SAEConfig, TrainConfig
from ..data.synthetic import SyntheticConfig, SyntheticSource
from .result_types import DuplicateStats, ExpertClusterAlignment, FeatureRecovery
from .similarity import DUPLICATE_COSINE, match_features, nearest_neighbour_cosines, normalize_rows

RECOVERED_COSINE = 0.9  # a true feature counts as recovered above this cosine
TABLE_COLUMNS = ["name", "setting", "n_features", "recovered_frac", "mmcs", "mmcs_learned", "fvu", "dead_frac",
                 "expert_nmi", "max_nmi", "expert_purity", "load_balance", "cross_expert_duplicate_frac", "redundant_frac"]


# --- features ------------------------------------------------------------------------------------------
def feature_recovery(true_FD: Tensor, learned_MD: Tensor, threshold: float = RECOVERED_COSINE,
                     chunk: int = 1024) -> FeatureRecovery:
    """Match true features to learned decoder directions (both ways), in row chunks.

    Returns a `FeatureRecovery`: scalars `mmcs`, `mmcs_learned`, `recovered_frac`, `redundant_frac` and the tensors
    `best_cos_F`, `best_id_F` (best learned feature per true feature), `best_cos_M` (per learned)."""
    if true_FD.ndim != 2 or learned_MD.ndim != 2 or true_FD.shape[1] != learned_MD.shape[1]:
        raise ValueError(f"expected (F, D) true and (M, D) learned directions of one width D, "
                         f"got {tuple(true_FD.shape)} and {tuple(learned_MD.shape)}")
    truth = match_features(true_FD, learned_MD, chunk=chunk)
    learned = match_features(learned_MD, true_FD, chunk=chunk)
    recovered_F = truth["best_cos"] > threshold
    n_matches_F = matches_per_true_feature(true_FD, learned_MD, threshold, chunk)
    return FeatureRecovery(
        mmcs=truth.best_cos.mean().item(),
        mmcs_learned=learned.best_cos.mean().item(),
        recovered_frac=recovered_F.float().mean().item(),
        redundant_frac=(n_matches_F[recovered_F] > 1).float().mean().item() if recovered_F.any() else 0.0,
        best_cos_F=truth.best_cos,
        best_id_F=truth.best_id,
        best_cos_M=learned.best_cos,
    )


def matches_per_true_feature(true_FD: Tensor, learned_MD: Tensor, threshold: float = RECOVERED_COSINE,
                             chunk: int = 1024) -> Tensor:
    """(F,) number of learned features with cosine > threshold to each true feature."""
    u_true, u_learned = normalize_rows(true_FD), normalize_rows(learned_MD)
    counts = [(u_true[s:s + chunk] @ u_learned.T > threshold).sum(dim=1) for s in range(0, len(u_true), chunk)]
    return torch.cat(counts)


def count_duplicate_pairs(learned_MD: Tensor, threshold: float = DUPLICATE_COSINE, chunk: int = 1024) -> int:
    """Number of unordered pairs of distinct learned features with cosine > threshold."""
    u = normalize_rows(learned_MD)
    above = 0
    for s in range(0, len(u), chunk):
        cos_CM = u[s:s + chunk] @ u.T
        rows = torch.arange(cos_CM.shape[0])
        cos_CM[rows, rows + s] = -1.0  # not its own duplicate
        above += int((cos_CM > threshold).sum())
    return above // 2


def duplicate_stats(learned_MD: Tensor, n_experts: int = 1, threshold: float = DUPLICATE_COSINE) -> DuplicateStats:
    """Duplicate pairs, and the fraction of features with a neighbour above threshold (anywhere; in
    another expert when n_experts > 1; expert e owns rows e*M/N ... (e+1)*M/N - 1)."""
    nn_cos_M, _ = nearest_neighbour_cosines(learned_MD, 1, "anywhere")
    out = DuplicateStats(n_duplicate_pairs=count_duplicate_pairs(learned_MD, threshold),
                         duplicate_frac=(nn_cos_M > threshold).float().mean().item())
    if n_experts > 1:
        cross_M, _ = nearest_neighbour_cosines(learned_MD, n_experts, "other_expert")
        out.cross_expert_duplicate_frac = (cross_M > threshold).float().mean().item()
    return out


def sae_duplicate_stats(sae, threshold: float = DUPLICATE_COSINE) -> DuplicateStats:
    """`duplicate_stats` of an SAE's decoder directions (a shared expert's included), its experts as the blocks
    (one block for a non-Switch SAE)."""
    n_latents = getattr(sae, "n_latents", sae.cfg.n_features)
    return duplicate_stats(sae.decoder_directions().detach().cpu(), n_latents // sae.cfg.expert_width, threshold)


# --- experts vs clusters ---------------------------------------------------------------------------------
def contingency(a_B: Tensor | np.ndarray, b_B: Tensor | np.ndarray) -> np.ndarray:
    """(n_a, n_b) counts of label pairs; labels are non-negative integers."""
    a, b = np.asarray(a_B, dtype=np.int64).ravel(), np.asarray(b_B, dtype=np.int64).ravel()
    if a.shape != b.shape or a.size == 0:
        raise ValueError(f"need two non-empty label arrays of equal length, got {a.shape} and {b.shape}")
    table = np.zeros((a.max() + 1, b.max() + 1), dtype=np.int64)
    np.add.at(table, (a, b), 1)
    return table


def normalized_mutual_info(a_B, b_B) -> float:
    """scikit-learn's NMI (arithmetic mean of the entropies: I(a; b) / mean(H(a), H(b))); 1 when both
    labelings are constant. ValueError for empty or unequal label arrays."""
    from sklearn.metrics import normalized_mutual_info_score

    a, b = np.asarray(a_B, dtype=np.int64).ravel(), np.asarray(b_B, dtype=np.int64).ravel()
    if a.shape != b.shape or a.size == 0:
        raise ValueError(f"need two non-empty label arrays of equal length, got {a.shape} and {b.shape}")
    return float(normalized_mutual_info_score(a, b))


def expert_cluster_alignment(expert_B: Tensor, cluster_B: Tensor) -> ExpertClusterAlignment:
    """How well routing follows the true clusters (definitions in the module docstring)."""
    table = contingency(expert_B, cluster_B)  # (experts, clusters)
    n = table.sum()
    return ExpertClusterAlignment(expert_nmi=normalized_mutual_info(expert_B, cluster_B),
                                  expert_purity=float(table.max(axis=1).sum() / n),
                                  cluster_concentration=float(table.max(axis=0).sum() / n))


def max_nmi(n_experts: int, n_clusters: int) -> float:
    """The highest NMI N experts can reach on C equally likely clusters: 2 log min(N, C) / (log N + log C)
    (N < C: each expert takes C/N whole clusters; N > C: each cluster is split evenly over N/C experts)."""
    if n_experts == 1 and n_clusters == 1:
        return 1.0
    return 2 * math.log(min(n_experts, n_clusters)) / (math.log(n_experts) + math.log(n_clusters))


def random_routing_nmi(cluster_B: Tensor, n_experts: int, seed: int = 0) -> float:
    """NMI between the clusters and a uniformly random expert per sample (the chance level)."""
    g = torch.Generator().manual_seed(seed)
    return normalized_mutual_info(torch.randint(n_experts, cluster_B.shape, generator=g), cluster_B)


# --- one SAE on one synthetic dataset --------------------------------------------------------------------
@torch.no_grad()
def evaluate_recovery(sae, source: SyntheticSource, n_samples: int = 8192, seed: int = 10_000,
                      batch_size: int = 2048, threshold: float = RECOVERED_COSINE) -> dict[str, Any]:
    """Every recovery number of `sae` on `n_samples` fresh samples of `source` (stream `seed`, which
    should differ from the training seed) -> flat dict of Python floats."""
    if sae.cfg.d_in != source.d_in:
        raise ValueError(f"the SAE's d_in={sae.cfg.d_in} does not match the data's d_in={source.d_in}")
    device = next(sae.parameters()).device
    M = getattr(sae, "n_latents", sae.cfg.n_features)  # a Switch shared expert adds M/N latents
    fired_M = torch.zeros(M, dtype=torch.bool)
    l0_sum, xs, experts, clusters = 0.0, [], [], []
    for i in range(math.ceil(n_samples / batch_size)):
        batch = source.sample(min(batch_size, n_samples - i * batch_size), seed, i)
        out = sae(batch.x_BD.to(device))
        fired_M |= metrics.fired_features(out.latent_acts, out.latent_indices, M).cpu()
        xs.append((batch.x_BD, out.x_hat.cpu()))
        l0_sum += metrics.l0(out.latent_acts).item() * len(batch.x_BD)
        clusters.append(batch.cluster_B)
        if hasattr(out, "expert_indices"):
            experts.append(out.expert_indices[:, 0].cpu())
    x_BD, x_hat_BD = torch.cat([a for a, _ in xs]), torch.cat([b for _, b in xs])
    learned_MD = sae.decoder_directions().detach().cpu()
    rec = feature_recovery(source.dictionary_FD, learned_MD, threshold)
    row: dict[str, Any] = {
        "mse": metrics.mse(x_BD, x_hat_BD).item(),
        "fvu": metrics.fvu(x_BD, x_hat_BD).item(),
        "l0": l0_sum / len(x_BD),
        "dead_frac": 1.0 - fired_M.float().mean().item(),
        **rec.scalars(),
        **sae_duplicate_stats(sae, threshold).to_json(),
    }
    if experts:
        expert_B, cluster_B = torch.cat(experts), torch.cat(clusters)
        row.update(expert_cluster_alignment(expert_B, cluster_B).to_json())
        row["random_nmi"] = random_routing_nmi(cluster_B, sae.cfg.n_experts)
        row["max_nmi"] = max_nmi(sae.cfg.n_experts, source.n_clusters)
        n = sae.cfg.n_experts
        load_N = metrics.expert_load(expert_B, n)
        row["load_balance"] = metrics.load_entropy(load_N).item() / math.log(n) if n > 1 else 1.0
        recovered_F = rec.best_cos_F > threshold
        if recovered_F.any():
            expert_of_match = rec.best_id_F[recovered_F] // sae.cfg.expert_width
            row["feature_expert_nmi"] = normalized_mutual_info(expert_of_match, source.feature_cluster_F[recovered_F])
        else:
            row["feature_expert_nmi"] = float("nan")
    return row


# --- sweeps ----------------------------------------------------------------------------------------------
Setting = tuple[dict[str, Any], SyntheticConfig, SAEConfig]


def recovery_sweep(settings: Iterable[Setting], train_cfg: TrainConfig, n_eval: int = 8192,
                   progress: bool = True) -> list[dict[str, Any]]:
    """Train one SAE per setting on its synthetic data and evaluate recovery (`evaluate_recovery`).

    `settings`: (labels, data config, SAE config) triples; the labels (e.g. {"arch": "switch"}) are copied
    into the result row, and the SAE's d_in is set to the data's. A setting that repeats an earlier one
    (same data and SAE config, other labels) is trained once. Returns one row per setting, in order."""
    from tqdm.auto import tqdm

    from ..train import train_sae

    sources: dict[str, SyntheticSource] = {}
    done: dict[tuple[str, str], dict[str, Any]] = {}
    rows = []
    for labels, data_cfg, sae_cfg in tqdm(list(settings), desc="recovery sweep", disable=not progress):
        sae_cfg = sae_cfg.replace(d_in=data_cfg.d_in)
        key = (repr(data_cfg), repr(sae_cfg))
        if key not in done:
            source = sources.setdefault(key[0], SyntheticSource(data_cfg))
            sae = train_sae(sae_cfg, source, train_cfg.replace(progress=False)).sae
            done[key] = evaluate_recovery(sae, source, n_eval, seed=train_cfg.seed + 10_000)
        rows.append({**labels, **done[key]})
    return rows


def benchmark_settings(data: SyntheticConfig, topk: SAEConfig, switch: SAEConfig,
                       fixed_width_experts: Iterable[int] = (2, 4, 8, 16), flop_matched_experts: Iterable[int] = (2, 4),
                       ks: Iterable[int] = (), leakages: Iterable[float] = (), aux_alphas: Iterable[float] = ()
                       ) -> list[Setting]:
    """The synthetic benchmark's settings, each labelled with its `experiment`:

    - "width": the TopK SAE; Switch SAEs with N experts at the TopK's width M (fixed width, ~N x fewer
      encoder FLOPs) and with N experts of M features each (FLOP-matched, M * N in total);
    - "k": TopK and Switch (the `switch` config) at each k;
    - "leakage": both at each leakage of the data (how often samples use features of other clusters);
    - "aux_alpha": the Switch SAE at each load-balancing coefficient (same scaling as `switch`).
    Labels: experiment, arch, setting ("baseline", "fixed_width", "flop_matched"), n_experts, n_features, k,
    leakage, aux_alpha (None for TopK), name ("topk", "switch-N", "switch-N-fm")."""
    M = topk.n_features

    def labelled(experiment, d, s, setting):
        name = "topk" if s.arch == "topk" else f"switch-{s.n_experts}" + ("-fm" if setting == "flop_matched" else "")
        return ({"experiment": experiment, "arch": s.arch, "setting": setting, "n_experts": s.n_experts,
                 "n_features": s.n_features, "k": s.k, "leakage": d.leakage,
                 "aux_alpha": s.aux_alpha if s.arch == "switch" else None, "name": name},
                d, s)

    out = [labelled("width", data, topk, "baseline")]
    out += [labelled("width", data, switch.replace(n_experts=n, n_features=M), "fixed_width") for n in fixed_width_experts]
    out += [labelled("width", data, switch.replace(n_experts=n, n_features=M * n), "flop_matched")
            for n in flop_matched_experts]
    for k in ks:
        out += [labelled("k", data, topk.replace(k=k), "baseline"), labelled("k", data, switch.replace(k=k), "fixed_width")]
    for leak in leakages:
        d = data.replace(leakage=leak)
        out += [labelled("leakage", d, topk, "baseline"), labelled("leakage", d, switch, "fixed_width")]
    out += [labelled("aux_alpha", data, switch.replace(aux_alpha=a), "fixed_width") for a in aux_alphas]
    return out


def recovery_table(rows: list[dict[str, Any]]):
    """`recovery_sweep` rows as notebook 06 shows them: TABLE_COLUMNS (defined in this module's docstring), one
    row per SAE, 3 decimals."""
    import pandas as pd

    return pd.DataFrame(rows)[TABLE_COLUMNS].round(3)
