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

The key also holds content fingerprints (data/fingerprint.py) of the files the activations come from:
the corpus files (a local file or folder, or the offline corpora's package files) and the model's
weight files (a local HF folder, SmolLM2's GGUF file). Editing them changes the key, so a stale cache
is never served; `content_digest` (the key's hash) is what the trained-SAE cache and the results table key on.

A cache is built in a temporary folder and renamed when whole (durable.atomic_folder), under a lock (a second
process waits for it, then loads it); its size is checked against the free disk first, and its shard files are
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

import importlib.metadata
import json
import os
import shutil
import time
import warnings
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from .. import durable, paths
from ..config import DataConfig
from ..config import ConfigError
from ..errors import SwitchSAEError
from ..keys import stable_hash
from . import lm, text
from .fingerprint import fingerprint, sha256_file

FORMAT_VERSION = 2
SHARD_ROWS = 1 << 16  # activation rows per shard file
# DataConfig fields that change what is stored (batch size, device, cache_dir do not)
CONTENT_FIELDS = ("model", "hook", "layer", "dataset", "context_len", "n_train_tokens", "n_eval_tokens",
                  "drop_special_tokens", "max_norm_ratio", "seed", "store_dtype")
FLOAT16_MAX = float(np.finfo(np.float16).max)  # 65504


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


def _versions() -> dict:
    out = {}
    for dist in ("switch-sae", "transformer-lens", "transformers", "torch", "numpy"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    return out


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
        _build(cfg, folder, model, progress)
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

    def eval_activations(self, n: Optional[int] = None) -> Tensor:
        """(rows, d_in) float32 held-out activations of eval_tokens (for MSE/FVU evaluation): all of
        them, or the first min(n, available) rows; row i came from `context_of(i, split="eval")`."""
        acts = np.load(self.path / "eval_acts.npy", mmap_mode="r")
        return torch.from_numpy(np.array(acts[:n], dtype=np.float32))  # a copy: writable, off the memmap

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
        dropped (see OutlierFilter)."""
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


# --- extraction ----------------------------------------------------------------------------------


def _batched(iterator, n):
    batch = []
    for item in iterator:
        batch.append(item)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


def _kept_rows(tokens_BS: Tensor, tokenizer, drop_special: bool) -> Tensor:
    """(n, 2) (context-in-batch, position) of the non-special activations, in row-major order."""
    keep_BS = ~text.special_mask(tokens_BS, tokenizer) if drop_special else torch.ones_like(tokens_BS, dtype=torch.bool)
    return keep_BS.nonzero()


class OutlierFilter:
    """Drops rows with ||x|| > ratio * reference norm, and counts what it dropped (per split).

    The reference is the median norm of the held-out split's non-special rows, measured once at the
    start of a build, so the same threshold applies to both splits."""

    def __init__(self, ratio: float, median_norm: float):
        self.ratio, self.median_norm = ratio, median_norm
        self.threshold = ratio * median_norm if ratio > 0 else float("inf")
        self.counts = {split: {"rows_seen": 0, "rows_dropped": 0, "sq_norm_seen": 0.0, "sq_norm_dropped": 0.0}
                       for split in ("train", "eval")}

    def keep(self, rows_ND: Tensor, split: str) -> Tensor:
        """(N,) bool: rows to keep; updates the split's counts."""
        sq_N = rows_ND.double().pow(2).sum(-1)
        keep_N = sq_N.sqrt() <= self.threshold
        c = self.counts[split]
        c["rows_seen"] += len(sq_N)
        c["rows_dropped"] += int((~keep_N).sum())
        c["sq_norm_seen"] += float(sq_N.sum())
        c["sq_norm_dropped"] += float(sq_N[~keep_N].sum())
        return keep_N

    def summary(self) -> dict:
        out = {"max_norm_ratio": self.ratio, "median_norm": self.median_norm,
               "threshold": self.threshold if self.ratio > 0 else None}
        for split, c in self.counts.items():
            out[split] = {"rows_seen": c["rows_seen"], "rows_dropped": c["rows_dropped"],
                          "fraction_dropped": c["rows_dropped"] / max(c["rows_seen"], 1),
                          "sq_norm_share_dropped": c["sq_norm_dropped"] / max(c["sq_norm_seen"], 1e-30)}
        return out

    def report(self) -> str:
        if self.ratio <= 0:
            return "outlier filter off (max_norm_ratio=0)"
        parts = [f"{split}: {c['rows_dropped']:,} of {c['rows_seen']:,} rows ({c['fraction_dropped']:.3%}) carrying "
                 f"{c['sq_norm_share_dropped']:.1%} of sum ||x||^2"
                 for split, c in ((s, self.summary()[s]) for s in ("train", "eval"))]
        return (f"outlier filter dropped rows with ||x|| > {self.ratio:g} x median norm {self.median_norm:.4g} "
                f"(= {self.threshold:.4g}): " + "; ".join(parts))


def _check_finite(rows_ND: Tensor, cfg: DataConfig) -> Tensor:
    """rows_ND, after refusing NaN/inf from the model itself (checked BEFORE the outlier filter, which would
    otherwise drop NaN rows silently: a NaN norm compares False with the threshold)."""
    if not torch.isfinite(rows_ND).all():
        raise ExtractionError(
            f"{cfg.model} produced non-finite activations at {cfg.hook_name} (NaN or inf in the model's own "
            "forward pass): check the model's weights and dtype"
        )
    return rows_ND


def _to_store_dtype(rows_ND: Tensor, dtype: np.dtype, cfg: DataConfig) -> np.ndarray:
    """rows as the cache's dtype; refuses values the dtype cannot hold (never writes inf)."""
    if dtype == np.float16:
        peak = float(rows_ND.abs().max()) if rows_ND.numel() else 0.0
        if peak > FLOAT16_MAX:
            raise ConfigError(
                f"store_dtype='float16' cannot hold the activations of {cfg.hook_name} of {cfg.model}: the largest "
                f"|value| is {peak:.4g} > {FLOAT16_MAX:g}, float16's maximum. Use store_dtype='float32', or an "
                f"outlier filter that drops such rows (max_norm_ratio, now {cfg.max_norm_ratio:g})"
            )
    return rows_ND.numpy().astype(dtype)


class ExtractionError(SwitchSAEError, RuntimeError):
    """The language model's activations cannot be cached (e.g. NaN in its forward pass)."""


def _build(cfg: DataConfig, folder: Path, model: Optional[lm.LanguageModel], progress: bool) -> None:
    t0 = time.time()
    if model is None or model.name != cfg.model:
        model = lm.load_model(cfg.model, device=cfg.device)
    model.check_hook(cfg.hook_name)
    model.check_context_len(cfg.context_len)
    need = build_bytes(cfg, model.d_model)
    durable.check_free_space(folder.parent, need)  # before the model runs, not at a SIGBUS half way
    with durable.atomic_folder(folder, need_bytes=need) as tmp:
        _extract(cfg, model, tmp, progress, t0)


def build_bytes(cfg: DataConfig, d_model: int) -> int:
    """Bytes a cache of `cfg` takes on disk (activations of both splits, tokens and row indices), about."""
    item = np.dtype(cfg.store_dtype).itemsize
    tokens = cfg.n_train_tokens + cfg.n_eval_tokens
    return tokens * (d_model * item + 4 + 8) + (1 << 20)


def _extract(cfg: DataConfig, model: lm.LanguageModel, tmp: Path, progress: bool, t0: float) -> None:
    tok, S, D = model.tokenizer, cfg.context_len, model.d_model
    dtype = np.dtype(cfg.store_dtype)
    ctx_iter = text.contexts(text.documents(cfg.dataset, cfg.seed), tok, S, model.prepend_bos)

    n_eval_ctx = -(-cfg.n_eval_tokens // S)
    n_train = cfg.n_train_tokens
    bar = tqdm(total=n_eval_ctx * S + n_train, unit="tok", desc=f"extracting {cfg.hook_name} of {cfg.model}",
               disable=not progress, smoothing=0.1)

    # held-out split: the first contexts of the stream
    eval_ctx = [c for _, c in zip(range(n_eval_ctx), ctx_iter)]
    if len(eval_ctx) < n_eval_ctx:
        raise text.DataUnavailableError(f"dataset {cfg.dataset!r} is too small for even the {cfg.n_eval_tokens} eval tokens")
    eval_tokens = torch.stack(eval_ctx)
    eval_batches = []
    for start in range(0, n_eval_ctx, cfg.model_batch_size):
        toks_BS = eval_tokens[start : start + cfg.model_batch_size]
        acts_BSD = model.activations(toks_BS, cfg.hook_name).cpu()
        kept = _kept_rows(toks_BS, tok, cfg.drop_special_tokens)
        eval_batches.append((kept + torch.tensor([start, 0]), _check_finite(acts_BSD[kept[:, 0], kept[:, 1]], cfg)))
        bar.update(toks_BS.numel())
    all_eval = torch.cat([a for _, a in eval_batches])
    median_norm = float(all_eval.norm(dim=-1).median()) if len(all_eval) else 0.0
    outliers = OutlierFilter(cfg.max_norm_ratio, median_norm)
    keep_N = outliers.keep(all_eval, "eval")
    eval_rows = torch.cat([r for r, _ in eval_batches])[keep_N]
    np.save(tmp / "eval_tokens.npy", eval_tokens.numpy().astype(np.int32))
    np.save(tmp / "eval_acts.npy", _to_store_dtype(all_eval[keep_N], dtype, cfg))
    np.save(tmp / "eval_rows.npy", eval_rows.numpy().astype(np.int32))

    # training split: the following contexts, until n_train_tokens activations are kept
    shard_sizes = [min(SHARD_ROWS, n_train - i) for i in range(0, n_train, SHARD_ROWS)]
    shards = [_allocated_memmap(tmp / f"train_acts_{i:03d}.npy", dtype, (n, D)) for i, n in enumerate(shard_sizes)]
    train_tokens, train_rows, filled, ctx_offset = [], [], 0, 0
    for batch in _batched(ctx_iter, cfg.model_batch_size):
        toks_BS = torch.stack(batch)
        acts_BSD = model.activations(toks_BS, cfg.hook_name).cpu()
        kept = _kept_rows(toks_BS, tok, cfg.drop_special_tokens)
        rows_ND = _check_finite(acts_BSD[kept[:, 0], kept[:, 1]], cfg)
        keep_N = outliers.keep(rows_ND, "train")
        kept, rows_ND = kept[keep_N][: n_train - filled], rows_ND[keep_N][: n_train - filled]
        _write_rows(shards, filled, _to_store_dtype(rows_ND, dtype, cfg))
        n_ctx_used = int(kept[-1, 0]) + 1 if len(kept) else 0
        train_rows.append((kept + torch.tensor([ctx_offset, 0])).numpy().astype(np.int32))
        train_tokens.append(toks_BS[:n_ctx_used].numpy().astype(np.int32))
        ctx_offset += n_ctx_used
        filled += len(kept)
        bar.update(len(kept))
        if filled == n_train:
            break
    bar.close()
    if filled < n_train:
        raise text.DataUnavailableError(
            f"dataset {cfg.dataset!r} ran out after {filled:,} training tokens (n_train_tokens={n_train:,}): "
            "lower n_train_tokens or use a larger corpus"
        )
    for s in shards:
        s.flush()
    del shards
    np.save(tmp / "train_tokens.npy", np.concatenate(train_tokens))
    np.save(tmp / "train_rows.npy", np.concatenate(train_rows))
    print(outliers.report())
    _write_manifest(tmp, cfg, model, shard_sizes, n_eval_ctx, outliers.summary(), time.time() - t0)


def _allocated_memmap(path: Path, dtype: np.dtype, shape: tuple[int, int]) -> np.ndarray:
    """A writable .npy memory map whose blocks are allocated on disk now: a full disk then fails here as
    ENOSPC (an OSError that `durable` reports in one line), not later as SIGBUS on a write to the map."""
    arr = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
    if hasattr(os, "posix_fallocate"):
        with open(path, "r+b") as f:
            os.posix_fallocate(f.fileno(), 0, os.path.getsize(path))
    return arr


def _write_rows(shards: list[np.ndarray], start: int, rows_ND: np.ndarray) -> None:
    """Write rows_ND at global rows start.. across the fixed-size shard files."""
    done = 0
    while done < len(rows_ND):
        s, offset = divmod(start + done, SHARD_ROWS)
        n = min(len(rows_ND) - done, len(shards[s]) - offset)
        shards[s][offset : offset + n] = rows_ND[done : done + n]
        done += n


def _write_manifest(folder: Path, cfg: DataConfig, model, shard_sizes, n_eval_ctx, outliers: dict,
                    seconds: float) -> None:
    files = {p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in sorted(folder.glob("*.npy"))}
    eval_rows = np.load(folder / "eval_rows.npy", mmap_mode="r").shape[0]
    manifest = {
        "format_version": FORMAT_VERSION,
        "content": _content_config(cfg),
        "data_config": cfg.to_dict(),
        "model": cfg.model,
        "backend": model.backend,
        "hook": cfg.hook_name,
        "dataset": cfg.dataset,
        "d_model": model.d_model,
        "dtype": cfg.store_dtype,
        "context_len": cfg.context_len,
        "prepend_bos": model.prepend_bos,
        "n_train_tokens": cfg.n_train_tokens,
        "n_train_contexts": int(np.load(folder / "train_tokens.npy", mmap_mode="r").shape[0]),
        "n_eval_contexts": n_eval_ctx,
        "n_eval_rows": int(eval_rows),
        "outlier_filter": outliers,
        "shards": [{"file": f"train_acts_{i:03d}.npy", "rows": n, "shape": [n, model.d_model]}
                   for i, n in enumerate(shard_sizes)],
        "files": files,
        "versions": _versions(),
        "build_seconds": round(seconds, 1),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    durable.atomic_write_json(folder / "manifest.json", manifest, indent=2)
