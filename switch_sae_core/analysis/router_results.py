"""The typed results of `analysis.router` (`record.JsonResult`: read as dicts, `geo["pooled"]["chance"]`, or as
attributes, `geo.pooled.chance`; in JSON a tensor is its nested list)."""
from __future__ import annotations

import dataclasses
from typing import Optional

from torch import Tensor

from ..record import JsonResult, tensor_field


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
