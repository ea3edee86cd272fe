"""The activation store: extract activations once, cache them on disk, serve shuffled training batches.

    store = ActivationStore.build_or_load(data_cfg)      # extracts on the first call, loads afterwards
    for x_BD in store.batches(4096, seed=0, start=0): ...  # a BatchSource (data/source.py)

Cache layout, under `<cache_dir>/activations/<key>/` (key = readable prefix + hash of every DataConfig
field that changes the content):
- `train_acts_XXX.npy`: float shards of (rows, d_model), opened memory-mapped;
- `train_tokens.npy` (contexts, context_len) int32 and `train_rows.npy` (rows, 2) int32: for every
  activation row, the (context, position) it came from — for showing top-activating contexts;
- `eval_tokens.npy`, `eval_acts.npy`, `eval_rows.npy`: the held-out split (never shares a token with
  training): tokens for CE-loss evaluation, activations for MSE/FVU;
- `manifest.json`: config, model, hook, counts, dtype, shapes, outlier-filter statistics, library
  versions and a sha256 and size per file. A cache whose files do not match their checksums or sizes,
  or whose manifest differs from the requested config, is reported with a warning and rebuilt, never used.

The key (data/identity.py) also holds content fingerprints (data/fingerprint.py) of the files the activations
come from: the corpus files (a local file or folder, or the offline corpora's package files) and the model's
weight files (a local HF folder, SmolLM2's GGUF file). Editing them changes the key, so a stale cache
is never served; `content_digest` (the key's hash) is what the trained-SAE cache and the results table key on.

A cache is built (data/extract.py) in `.<key>.partial` and renamed when whole, under a lock (a second
process waits for it, then loads it); a killed build resumes from its last progress point (one a minute); its size is checked against the free disk first, and its shard files are
allocated up front, so a full disk is one line (durable.DiskFullError), never a SIGBUS. docs/guarantees.md.

Rows are dropped before caching, identically in both splits:
- activations at BOS/special tokens, when `DataConfig.drop_special_tokens` (the default);
- high-norm outliers (attention sinks that are ordinary tokens), when `DataConfig.max_norm_ratio` > 0:
  rows with ||x|| > max_norm_ratio * (median ||x|| of the held-out split's non-special rows).
  Counts and shares of sum ||x||^2 dropped are in the manifest (`outlier_filter`) and printed.
A float16 cache that cannot hold a value (|x| > 65504) is refused, never written with inf.
No scale normalisation: the paper trains on raw GPT-2 activations.
"""
from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from .. import durable, paths
from ..config import DataConfig
from . import lm
from .extract import build
from .fingerprint import sha256_file
from .identity import FORMAT_VERSION, SHARD_ROWS, _content_config, _digest, cache_key, content_digest  # noqa: F401 (the cache's key, named here too)

class CacheProblem(Exception):
    """Why a cache folder cannot be used (corrupt, incomplete or made for another config)."""


class ActivationStore:
    """Cached activations of one DataConfig; see the module docstring. Implements `BatchSource`."""

    def __init__(self, path: str | Path, verify: str = "full"):
        """Open a built cache folder. verify='full' checks sha256 and size of every file, 'size' only sizes."""
        self.path = Path(path)
        self.manifest = _check_folder(self.path, verify)
        self.config = DataConfig.from_dict(self.manifest["data_config"])
        self.d_in = int(self.manifest["d_model"])
        self.n_train = int(self.manifest["n_train_tokens"])
        self._shards = [np.load(self.path / s["file"], mmap_mode="r") for s in self.manifest["shards"]]
        self.train_tokens = np.load(self.path / "train_tokens.npy", mmap_mode="r")
        self.train_rows = np.load(self.path / "train_rows.npy", mmap_mode="r")
        self.eval_rows = np.load(self.path / "eval_rows.npy", mmap_mode="r")
        self._eval_tokens = np.load(self.path / "eval_tokens.npy")
        self._perms: dict[tuple[int, int], np.ndarray] = {}
        self._tokenizer = None

    # --- building ---------------------------------------------------------------------------
    @classmethod
    def build_or_load(
        cls, cfg: DataConfig, model: Optional[lm.LanguageModel] = None, progress: bool = True, verify: str = "full"
    ) -> "ActivationStore":
        """The store for `cfg`: loaded from the cache if a valid one exists, else extracted (and cached).
        Pass an already loaded `model` to avoid loading it again."""
        root = Path(cfg.cache_dir) if cfg.cache_dir else paths.cache_dir()
        folder = root / "activations" / cache_key(cfg)
        lock = durable.FileLock(folder.with_name(f".{folder.name}.lock"))
        if not lock.acquire(blocking=False):  # another process builds it: wait, then load what it built
            print(f"{lock.holder()} is building {folder.name}; waiting for it", flush=True)
            lock.acquire()
        try:
            return cls._build_or_load_locked(cfg, folder, model, progress, verify)
        finally:
            lock.release()

    @classmethod
    def _build_or_load_locked(cls, cfg: DataConfig, folder: Path, model, progress: bool, verify: str):
        durable.remove_abandoned(folder.parent, folder.name)
        _remove_abandoned_builds(folder)
        if folder.exists():
            try:
                store = cls(folder, verify=verify)
                content = _content_config(cfg)  # fingerprints the corpus and model files: once
                if store.manifest["content"] != json.loads(json.dumps(content)):
                    raise CacheProblem(
                        f"its manifest was made for {store.manifest['content']}, not the requested {content}"
                    )
                return store
            except CacheProblem as e:
                warnings.warn(f"activation cache {folder} is unusable: {e}. Rebuilding it.", stacklevel=2)
                shutil.rmtree(folder)
        build(cfg, folder, model, progress)
        return cls(folder, verify="size")

    # --- serving training batches (BatchSource) ---------------------------------------------------
    def __len__(self) -> int:
        return self.n_train

    @property
    def content_digest(self) -> str:
        """`content_digest(config)` of the data this cache was built from (from its manifest)."""
        return _digest(self.manifest["content"])

    def _permutation(self, seed: int, epoch: int) -> np.ndarray:
        key = (seed, epoch)
        if key not in self._perms:
            if len(self._perms) > 2:
                self._perms.pop(next(iter(self._perms)))
            self._perms[key] = np.random.default_rng([seed, epoch]).permutation(self.n_train)
        return self._perms[key]

    def batch_rows(self, batch_size: int, seed: int, index: int) -> np.ndarray:
        """Row indices of batch number `index`. The stream is epoch after epoch of a fresh permutation
        of all rows (seeded by (seed, epoch)); batch i is stream items [i*B, (i+1)*B), so every row is
        served exactly once per epoch and any batch can be computed without the ones before it."""
        pos, parts = index * batch_size, []
        end = pos + batch_size
        while pos < end:
            epoch, offset = divmod(pos, self.n_train)
            take = self._permutation(seed, epoch)[offset : offset + (end - pos)]
            parts.append(take)
            pos += len(take)
        return np.concatenate(parts)

    def batches(self, batch_size: int, seed: int = 0, start: int = 0) -> Iterator[Tensor]:
        """(batch_size, d_in) float32 batches forever, beginning with batch `start` (see batch_rows)."""
        index = start
        while True:
            yield self.activations(self.batch_rows(batch_size, seed, index))
            index += 1

    def activations(self, rows) -> Tensor:
        """(len(rows), d_in) float32 training activations of the given row indices."""
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows), self.d_in), dtype=np.float32)
        shard_of = rows // SHARD_ROWS
        for s in np.unique(shard_of):
            sel = np.nonzero(shard_of == s)[0]
            local = rows[sel] - s * SHARD_ROWS
            order = np.argsort(local)  # sorted reads are faster on a memory map
            out[sel[order]] = self._shards[s][local[order]]
        return torch.from_numpy(out)

    # --- the held-out split -----------------------------------------------------------------------
    @property
    def eval_tokens(self) -> Tensor:
        """(contexts, context_len) int64: the fixed held-out token set for CE evaluation."""
        return torch.from_numpy(self._eval_tokens.astype(np.int64))

    def eval_activations(self, n: Optional[int] = None, rows=None) -> Tensor:
        """(rows, d_in) float32 held-out activations of eval_tokens (for MSE/FVU evaluation): all of
        them, or the first min(n, available) rows, or those of the eval row indices `rows` (the validation
        split, `heldout.validation_activations`); row i came from `context_of(i, split="eval")`."""
        acts = np.load(self.path / "eval_acts.npy", mmap_mode="r")
        picked = acts[:n] if rows is None else acts[np.asarray(rows, dtype=np.int64)]
        return torch.from_numpy(np.array(picked, dtype=np.float32))  # a copy: writable, off the memmap

    # --- where an activation came from ------------------------------------------------------------
    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = lm.load_tokenizer(self.config.model)
        return self._tokenizer

    def context_ids(self, row: int, split: str = "train") -> tuple[np.ndarray, int]:
        """(token ids of the context, position) of activation `row` of `split` ('train' or 'eval')."""
        rows, tokens = (self.train_rows, self.train_tokens) if split == "train" else (self.eval_rows, self._eval_tokens)
        context, position = (int(v) for v in rows[row])
        return np.asarray(tokens[context]), position

    def context_of(self, row: int, split: str = "train") -> tuple[list[str], int]:
        """(the context as a list of token strings, position of the activation's token)."""
        ids, position = self.context_ids(row, split)
        return self.tokenizer.str_tokens(ids), position

    def decode(self, ids) -> str:
        return self.tokenizer.decode(ids)

    @property
    def outlier_filter(self) -> dict:
        """The outlier filter's threshold and, per split, rows seen/dropped and the share of sum ||x||^2
        dropped (see extract.OutlierFilter)."""
        return self.manifest["outlier_filter"]

    def __repr__(self) -> str:
        m = self.manifest
        return (f"ActivationStore({m['model']}, {m['hook']}, dataset={m['dataset']!r}, "
                f"train={self.n_train:,} x {self.d_in}, eval={m['n_eval_rows']:,} rows, path={str(self.path)!r})")


def _remove_abandoned_builds(folder: Path) -> None:
    """Delete `<key>.building-<pid>` folders left by killed builds of older versions (now: durable.remove_abandoned)."""
    for tmp in folder.parent.glob(folder.name + ".building-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not durable.process_alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


# --- checking a cache folder ---------------------------------------------------------------------


def _check_folder(folder: Path, verify: str) -> dict:
    if verify not in ("full", "size"):
        raise ValueError(f"verify={verify!r}: choose 'full' (sha256 + size) or 'size'")
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CacheProblem(f"no readable manifest.json ({type(e).__name__}; an interrupted build?)") from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CacheProblem(f"format_version {manifest.get('format_version')} != {FORMAT_VERSION}")
    for name, info in manifest["files"].items():
        path = folder / name
        if not path.is_file():
            raise CacheProblem(f"{name} is missing")
        if path.stat().st_size != info["bytes"]:
            raise CacheProblem(f"{name} has {path.stat().st_size} bytes, the manifest says {info['bytes']}")
        if verify == "full" and sha256_file(path) != info["sha256"]:
            raise CacheProblem(f"{name} does not match its sha256 checksum (corrupt)")
    return manifest
