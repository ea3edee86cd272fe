"""What makes two runs "the same": the ONE hashing scheme and the keys built with it.

- `stable_hash(obj)`: the hex digest every key in the project is made of (SHA-256 of sorted-key JSON, or of raw
  bytes), cut to `digits`. The activation cache (`data.store.content_digest`), the first-letter probe's cache, the
  trained-SAE cache, the results table and the claims' grouping all key on it.
- `config_hash(sae, train, data)`: a trained SAE's key (the results table's `key`, the trained-SAE cache's folder):
  its configs without the fields that do not change what is learned (`config.TRAIN_NON_RESULT_FIELDS`,
  `config.DATA_NON_RESULT_FIELDS`).
- `lineage_hash`: the same without `steps` (runs a longer one can continue); `run_fingerprint`: a sweep's shared
  settings and the content of the data it read (docs/guarantees.md).
- `json_default`: the JSON form of the values a record or a progress file holds (tensors, numpy scalars, tuples,
  dataclasses).
Every key already written stays valid: fields added later are left out at their default (below).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

import torch

from .config import DATA_NON_RESULT_FIELDS, TRAIN_NON_RESULT_FIELDS, DataConfig, SAEConfig, TrainConfig

# Non-result fields that keys made before the one-list fix DID hash: they are hashed at their default
# value, so every key written with the default stays valid and a non-default value no longer retrains.
_HASHED_AT_DEFAULT = {"checkpoint_keep": TrainConfig().checkpoint_keep}
# Result fields added later: left out of the hash at their default, so keys written before they existed stay valid.
_OMITTED_AT_DEFAULT = {**{name: getattr(TrainConfig(), name) for name in ("lr_scale", "lr_warmup_steps", "sparsity_warmup_steps")},
                       "tokens": None}
# SAEConfig fields added later: left out of the hash at their default, so keys of SAEs made before they existed stay valid.
_SAE_OMITTED_AT_DEFAULT = {"global_topk": False, "feature_scaling": False}


def stable_hash(obj: Any, digits: int = 16) -> str:
    """The first `digits` hex digits of the SHA-256 of `obj`: of its bytes if it is `bytes`, else of its sorted-key
    JSON. Equal for equal contents, across runs and machines."""
    data = obj if isinstance(obj, bytes) else json.dumps(obj, sort_keys=True, default=list).encode()
    return hashlib.sha256(data).hexdigest()[:digits]


def json_default(o: Any) -> Any:
    """`json.dumps(..., default=json_default)`: tensors as numbers or lists, tuples and sets as lists, dataclasses
    as dicts, anything else (numpy scalars) as a float."""
    if isinstance(o, torch.Tensor):
        return o.item() if o.numel() == 1 else o.tolist()
    if isinstance(o, (tuple, set)):
        return list(o)
    if dataclasses.is_dataclass(o):
        return dataclasses.asdict(o)
    return float(o)  # numpy scalars


def result_train_dict(train_cfg: TrainConfig) -> dict[str, Any]:
    """TrainConfig as it enters a key: without `config.TRAIN_NON_RESULT_FIELDS`."""
    d = {k: v for k, v in train_cfg.to_dict().items() if k not in TRAIN_NON_RESULT_FIELDS
         and not (k in _OMITTED_AT_DEFAULT and v == _OMITTED_AT_DEFAULT[k])}
    return {**d, **_HASHED_AT_DEFAULT}


def result_sae_dict(sae_cfg: SAEConfig) -> dict[str, Any]:
    """SAEConfig as it enters a key: fields added later left out at their default."""
    return {k: v for k, v in sae_cfg.to_dict().items()
            if not (k in _SAE_OMITTED_AT_DEFAULT and v == _SAE_OMITTED_AT_DEFAULT[k])}


def sae_identity(sae_config: dict[str, Any]) -> str:
    """The identity of an SAE config as a record stores it (`record["sae_config"]`): the same for records written
    before and after a field was added (the dict with every missing field at its default: an older record's dict
    lacks the new fields, a newer one holds them at their default). Not validated: a partial dict is hashed too."""
    defaults = {f.name: f.default for f in dataclasses.fields(SAEConfig) if f.default is not dataclasses.MISSING}
    return stable_hash({**defaults, **sae_config})


def result_data_dict(data_cfg: DataConfig) -> dict[str, Any]:
    """DataConfig as it enters a key: without `config.DATA_NON_RESULT_FIELDS` (where/how fast, not what)."""
    return {k: v for k, v in data_cfg.to_dict().items() if k not in DATA_NON_RESULT_FIELDS}


def config_hash(sae_cfg: SAEConfig, train_cfg: TrainConfig, data_cfg: DataConfig) -> str:
    """Identity of a trained SAE: what it is, how it was trained, on which activations."""
    return stable_hash({"sae": result_sae_dict(sae_cfg), "train": result_train_dict(train_cfg),
                        "data": result_data_dict(data_cfg)})


def lineage_hash(sae_cfg: SAEConfig, train_cfg: TrainConfig, data_cfg: DataConfig) -> str:
    """Identity of the runs of one SAE that differ only in length (`steps`): a longer run can continue a shorter
    one from its decay start (cache.py), so the sweep keeps them in one process (sweep.lineages)."""
    return config_hash(sae_cfg, train_cfg.replace(steps=1), data_cfg)


def run_fingerprint(train_cfg: TrainConfig, data_cfg: DataConfig, data_content: str | None = None) -> str:
    """Identity of a sweep's shared settings and of the data it read: records of an older profile version, or of
    activations since rebuilt from edited corpus or model files (`data.store.content_digest`), do not match.
    `data_content=None`: the settings only (records written before the content was recorded, synthetic data)."""
    d = {"train": result_train_dict(train_cfg), "data": result_data_dict(data_cfg)}
    return stable_hash(d if data_content is None else {**d, "data_content": data_content})
