"""What a cache of activations is made from, and its key: the content fields of a `DataConfig` and the content
hashes of the corpus and model files it reads (data/fingerprint.py). Editing those files changes the key, so a stale
cache is never served; `content_digest` (the key's hash, `keys.stable_hash`) is what the trained-SAE cache and
the results table key on.
"""
from __future__ import annotations

from pathlib import Path

from ..config import DataConfig
from ..keys import stable_hash
from . import lm, text
from .fingerprint import fingerprint

FORMAT_VERSION = 2
SHARD_ROWS = 1 << 16  # activation rows per shard file
# DataConfig fields that change what is stored (batch size, device, cache_dir do not)
CONTENT_FIELDS = ("model", "hook", "layer", "dataset", "context_len", "n_train_tokens", "n_eval_tokens",
                  "drop_special_tokens", "max_norm_ratio", "seed", "store_dtype")


def _dataset_files(dataset: str) -> list[Path]:
    if text.offline_source_names(dataset) is not None:
        return text.offline_files(dataset)
    path = Path(dataset).expanduser()
    return [path] if path.exists() else []  # "openwebtext": streamed, pinned by name


def _content_config(cfg: DataConfig) -> dict:
    """Everything the cached activations depend on: the content fields of `cfg` and content hashes
    of the corpus and model files (so edited files give a new key, never a stale cache)."""
    d = {name: getattr(cfg, name) for name in CONTENT_FIELDS}
    d["hook"] = cfg.hook_name
    memo = cfg.cache_dir or None
    d["dataset_files"] = fingerprint(_dataset_files(cfg.dataset), memo)
    d["model_files"] = fingerprint(lm.model_files(cfg.model), memo)
    return d


def _digest(content: dict) -> str:
    return stable_hash([FORMAT_VERSION, content], digits=64)


def content_digest(cfg: DataConfig) -> str:
    """sha256 (hex) of everything the activations of `cfg` depend on: its content fields and the content hashes
    of the corpus and model files. The identity of "the same data" for every layer above (the trained-SAE
    cache, the results table); `ActivationStore.content_digest` gives the same for a built cache."""
    return _digest(_content_config(cfg))


def cache_key(cfg: DataConfig) -> str:
    """Folder name: readable prefix + hash of the content-defining config."""
    digest = content_digest(cfg)
    slug = "".join(c if c.isalnum() or c in "-." else "-" for c in f"{cfg.model}__{cfg.hook_name}__{Path(cfg.dataset).name}")
    return f"{slug[:80]}__{digest[:12]}"
