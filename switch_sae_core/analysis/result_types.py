"""The analyses' typed results, one dataclass per result (`record.JsonResult`): read as attributes
(`geo.pooled.chance`) or as the dicts they used to be (`geo["pooled"]["chance"]`, as notebooks, `claims` and `viz`
read them), and written to / read from JSON (a tensor as its nested list, see `JsonResult`). Each function that
makes one documents its numbers."""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

from torch import Tensor

from ..record import JsonResult, live_field, tensor_field

# --- analysis.router ---------------------------------------------------------------------------------------


@dataclasses.dataclass
class DiagonalSummary(JsonResult):
    """A square cosine matrix summed up (`diagonal_summary`)."""

    diag_mean: float
    offdiag_mean: float
    """nan with one row."""
    own_is_best: float
    """Fraction of rows whose largest entry is their own column."""


@dataclasses.dataclass
class RouterAlignment(JsonResult):
    """`router_alignment`: router row i vs expert j's mean encoder / decoder direction."""

    router_vs_encoder: Tensor
    """(N, N) cosines."""
    router_vs_decoder: Tensor
    encoder: DiagonalSummary
    decoder: DiagonalSummary


@dataclasses.dataclass
class Agreement(JsonResult):
    """`agreement`: how often predicted experts are the router's, beside chance."""

    accuracy: float
    chance: float
    """Share of the most loaded expert (always predicting it)."""
    uniform_chance: float


@dataclasses.dataclass
class PooledRows(Agreement):
    """Router-like rows pooled from a dense encoder: their routing agreement and their cosines with the
    centred router rows (`router_geometry`'s 'pooled_rows')."""

    diag_mean: float
    offdiag_mean: float
    own_is_best: float


@dataclasses.dataclass
class ProbeResult(JsonResult):
    """`probe_router_choice`: held-out accuracy of a linear probe for the router's expert."""

    accuracy: float
    train_accuracy: float
    n_train: Optional[int] = None
    n_test: Optional[int] = None
    note: Optional[str] = None
    """Why there is no probe (accuracies nan): the router used a single expert."""


@dataclasses.dataclass
class SubspaceAngles(JsonResult):
    """`router_subspace_angles`: the router's row space vs a reference's top principal subspace."""

    dim: int
    angles_deg: Tensor = tensor_field("float64")
    """(dim,) principal angles, ascending."""
    random_angles_deg: Tensor = tensor_field("float64")
    """(dim,) the same for random subspaces, mean over draws."""
    mean_cos2: float
    random_mean_cos2: float


@dataclasses.dataclass
class Clustering(JsonResult):
    """`clustering_summary`: silhouette by expert of encoder and decoder features."""

    silhouette_encoder: float
    silhouette_decoder: float


@dataclasses.dataclass
class RouterGeometry(JsonResult):
    """`router_geometry`: every router-geometry number of one Switch SAE beside a dense TopK SAE."""

    n_experts: int
    alignment: RouterAlignment
    assignment_cos: Tensor
    """(L,) each TopK feature's best cosine to a Switch feature."""
    features_per_expert: Tensor = tensor_field("int64")
    """(N,) TopK features given to each expert."""
    pooled: Agreement
    pooled_rows: PooledRows
    angles_encoder: SubspaceAngles
    angles_activations: SubspaceAngles
    clustering: Clustering
    probe: Optional[ProbeResult] = None
    """None when `router_geometry(probe=False)`."""
    probe_activations: Optional[ProbeResult] = None


# --- analysis.similarity -----------------------------------------------------------------------------------


@dataclasses.dataclass
class FrequencyBin(JsonResult):
    """One firing-frequency bin of `duplication_stats` (bin 0 = the rarest quartile)."""

    bin: int
    label: str
    n: int
    frac_duplicated: float
    """nan for an empty bin."""
    mean_nn_cos: float


@dataclasses.dataclass
class DuplicationStats(JsonResult):
    """`similarity.duplication_stats`: the features whose nearest neighbour is above `threshold` (a near-copy)."""

    threshold: float
    n_features: int
    n_duplicated: int
    frac_duplicated: float
    mean_nn_cos: float
    by_frequency: Optional[list[FrequencyBin]] = None
    """Rarest bin first, dead features left out; None when no firing frequencies were given."""
    n_dead: Optional[int] = None


@dataclasses.dataclass
class FeatureMatch(JsonResult):
    """`similarity.match_features`: each feature of A's best B feature (B features may be reused) and, when asked
    for, a one-to-one (Hungarian) assignment."""

    best_cos: Tensor
    """(M,) float32."""
    best_id: Tensor = tensor_field("int64")
    assigned_id: Optional[Tensor] = tensor_field("int64", default=None)
    """(M,) -1 where A is larger than B."""
    assigned_cos: Optional[Tensor] = None
    """(M,) nan where A is larger than B."""


@dataclasses.dataclass
class DistanceFromInit(JsonResult):
    """`similarity.distance_from_init`: mean |cos| of each feature to its initial direction (1 = never moved)."""

    decoder_mean_abs_cos: float
    encoder_mean_abs_cos: float
    random: float
    """The same for unrelated directions (`random_mean_abs_cosine(d)`)."""


# --- analysis.expert_study ---------------------------------------------------------------------------------


@dataclasses.dataclass
class DuplicationRow(JsonResult):
    """A plain Switch SAE of the study (by N and k): its duplicated fractions and mean nearest-neighbour cosine."""

    name: str
    N: int
    k: int
    mean_nn_cos: float
    """In another expert."""
    other_expert: float
    """Fraction of features with a near-copy in another expert."""
    anywhere: float


@dataclasses.dataclass
class ExpertStudy(JsonResult):
    """`expert_study.expert_similarity_study`: every number notebook 05 shows (that function documents each). The
    SAEs, their codes and the held-out activations are kept for the notebook's explorers but stay out of the JSON."""

    saes: dict[str, Any] = live_field()
    codes: dict[str, Any] = live_field()
    """{name: `similarity.Codes`}."""
    freq: dict[str, Tensor]
    fvu: dict[str, float]
    x_eval: Tensor = live_field()
    main: str
    n0: int
    k0: int
    sim: Tensor
    ctrl: Tensor
    summary: dict[str, tuple[float, float]]
    dup: dict[tuple[str, str], DuplicationStats]
    """{(name, scope): ...}; in JSON a list of [[name, scope], stats] pairs."""
    rows: list[DuplicationRow]
    hungarian: bool
    random_nn: float
    match: dict[str, FeatureMatch]
    moved: dict[str, DistanceFromInit]
    cka: dict[str, tuple[float, float]]
    cka_tokens: int


# --- analysis.recovery -------------------------------------------------------------------------------------


@dataclasses.dataclass
class FeatureRecovery(JsonResult):
    """`recovery.feature_recovery`: true features vs learned decoder directions, both ways."""

    mmcs: float
    mmcs_learned: float
    recovered_frac: float
    redundant_frac: float
    best_cos_F: Tensor
    best_id_F: Tensor = tensor_field("int64")
    best_cos_M: Tensor

    def scalars(self) -> dict[str, float]:
        """The four numbers without the per-feature tensors (a row of the recovery table)."""
        return {k: self[k] for k in ("mmcs", "mmcs_learned", "recovered_frac", "redundant_frac")}


@dataclasses.dataclass
class DuplicateStats(JsonResult):
    """`recovery.duplicate_stats`: duplicate pairs, and the features with a near-copy anywhere / in another expert."""

    n_duplicate_pairs: int
    duplicate_frac: float
    cross_expert_duplicate_frac: Optional[float] = None
    """None with one expert, and then left out of the JSON (the records written before this type lack it)."""

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in super().to_json().items() if v is not None}


@dataclasses.dataclass
class ExpertClusterAlignment(JsonResult):
    """`recovery.expert_cluster_alignment`: how well routing follows the true clusters."""

    expert_nmi: float
    expert_purity: float
    cluster_concentration: float


# --- analysis.absorption -----------------------------------------------------------------------------------


@dataclasses.dataclass
class LetterScore(JsonResult):
    """One letter of `absorption.probe_report`."""

    f1: float
    precision: float
    recall: float
    support: int
    chance_f1: float


@dataclasses.dataclass
class ProbeReport(JsonResult):
    """`absorption.probe_report`: how well a first-letter probe reads held-out words, beside chance."""

    accuracy: float
    majority_accuracy: float
    mean_f1: float
    mean_chance_f1: float
    n_letters_f1_above_min: int
    n: int
    per_letter: dict[str, LetterScore]
