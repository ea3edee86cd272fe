"""Per-feature statistics of an SAE on held-out activations, in ONE pass (`compute_feature_stats`): firing
frequency, mean activation, top-activating rows and (Switch) each row's router choice and probabilities; and which
features fire on a chosen set of rows (`features_on_rows`). The explorers of `viz/widgets.py` show these.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from torch import Tensor

from .similarity import Codes, collect_codes, firing_frequency


@dataclasses.dataclass
class FeatureStats:
    """Per-feature statistics on T held-out rows (M = all latents, shared expert included)."""

    n_rows: int
    n_blocks: int
    """Experts holding features (N, + 1 with a shared expert; 1 for non-Switch SAEs)."""
    n_routed: int
    """Experts the router chooses among (N; 1 for non-Switch SAEs)."""
    freq_M: Tensor
    """(M,) fraction of rows on which the feature is active (> 0)."""
    mean_act_M: Tensor
    """(M,) mean activation over the rows where it is active (0 if never)."""
    top_acts_MJ: Tensor
    """(M, J) largest activations, descending (0 = fewer than J activations)."""
    top_rows_MJ: Tensor
    """(M, J) row ids of `top_acts_MJ` (-1 where there is no activation)."""
    choice_T: Optional[Tensor] = None
    """(T,) the router's (first) expert for each row (Switch only)."""
    router_probs_TN: Optional[Tensor] = None
    """(T, N) router distribution of each row (Switch only)."""

    @property
    def n_latents(self) -> int:
        return self.freq_M.shape[0]

    @property
    def width(self) -> int:
        return self.n_latents // self.n_blocks

    def expert_of(self, feature: int) -> int:
        return feature // self.width

    def expert_features(self, expert: int) -> range:
        return range(expert * self.width, (expert + 1) * self.width)


def sae_blocks(sae) -> tuple[int, int]:
    """(experts holding features incl. a shared one, experts the router chooses among) of any SAE."""
    n_routed = sae.cfg.n_experts if sae.cfg.arch == "switch" else 1
    return getattr(sae, "n_stacked", n_routed), n_routed


def stats_from_codes(codes: Codes, n_blocks: int, n_routed: int, n_latents: int, top_n: int = 8, chunk: int = 512) -> FeatureStats:
    """FeatureStats from an SAE's sparse codes on T rows (`analysis.similarity.collect_codes`)."""
    acts_TK, ids_TK = codes.acts_TK, codes.ids_TK
    T, M = acts_TK.shape[0], n_latents
    on_TK = acts_TK > 0
    count_M = torch.bincount(ids_TK[on_TK], minlength=M)
    sum_M = torch.zeros(M, dtype=torch.float64).index_add_(0, ids_TK[on_TK], acts_TK[on_TK].double())
    # running top-J per feature: each chunk of rows as a dense (B, M) block, merged with the best so far
    top_acts_JM = torch.zeros(top_n, M)
    top_rows_JM = torch.full((top_n, M), -1, dtype=torch.long)
    for start in range(0, T, chunk):
        a_BK, i_BK = acts_TK[start : start + chunk], ids_TK[start : start + chunk]
        B = a_BK.shape[0]
        block_BM = torch.zeros(B, M).scatter_(1, i_BK, a_BK.clamp_min(0))
        rows_BM = torch.arange(start, start + B)[:, None].expand(B, M)
        top_acts_JM, pos = torch.cat([top_acts_JM, block_BM]).topk(top_n, dim=0)
        top_rows_JM = torch.cat([top_rows_JM, rows_BM]).gather(0, pos)
    top_rows_JM[top_acts_JM <= 0] = -1
    return FeatureStats(
        n_rows=T,
        n_blocks=n_blocks,
        n_routed=n_routed,
        freq_M=firing_frequency(codes, M),
        mean_act_M=(sum_M / count_M.clamp_min(1)).float(),
        top_acts_MJ=top_acts_JM.T.contiguous(),
        top_rows_MJ=top_rows_JM.T.contiguous(),
        choice_T=codes.choice_T,
        router_probs_TN=codes.router_probs_TN,
    )


def compute_feature_stats(sae, x_TD: Tensor, top_n: int = 8, batch_size: int = 2048, codes: Optional[Codes] = None) -> FeatureStats:
    """One pass over held-out activations x_TD (rows in the order of `TokenContexts`) -> FeatureStats.
    Pass `codes` if `collect_codes(sae, x_TD)` was already run."""
    sae.eval()
    codes = codes if codes is not None else collect_codes(sae, x_TD, batch_size)
    n_blocks, n_routed = sae_blocks(sae)
    return stats_from_codes(codes, n_blocks, n_routed, sae.decoder_directions().shape[0], top_n)


@torch.no_grad()
def features_on_rows(sae, x_RD: Tensor, n_latents: int) -> tuple[Tensor, Tensor]:
    """(count_M, sum_M): on how many of the R rows `x_RD` each latent fires (> 0), and the sum of its activations
    there (their mean is sum / count)."""
    codes = collect_codes(sae, x_RD)
    acts_RK, ids_RK = codes.acts_TK, codes.ids_TK
    on = acts_RK > 0
    count_M = torch.bincount(ids_RK[on], minlength=n_latents)
    sum_M = torch.zeros(n_latents).index_add_(0, ids_RK[on], acts_RK[on])
    return count_M, sum_M
