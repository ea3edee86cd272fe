"""Extraction: the language model run over the corpus, its activations at one hook written into a new cache
folder (held-out split first, then the training split in fixed-size shard files), with the manifest that
`data.store.ActivationStore` checks. Rows at special tokens and high-norm outliers are dropped identically in both
splits (data/store.py's docstring); the folder is written in `.<key>.partial` beside its place and renamed when
whole, its size checked against the free disk first.

Resuming: every PROGRESS_EVERY_S seconds the training rows written so far are flushed, then `progress.json` (with
the token and row indices so far and the outlier filter's counts) is written atomically. A build killed mid-way
(its lock dies with it) restarts from that point: the held-out split and the rows up to it are kept, the stream
skips the contexts already seen (it is deterministic: same corpus, seed and model), so the cache ends with the
same bytes as an uninterrupted build. A progress file of other content is discarded.
"""
from __future__ import annotations

import importlib.metadata
import io
import itertools
import json
import os
import shutil
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from .. import durable
from ..config import ConfigError, DataConfig
from ..errors import SwitchSAEError
from . import lm, text
from .fingerprint import sha256_file
from .identity import FORMAT_VERSION, SHARD_ROWS, _content_config

FLOAT16_MAX = float(np.finfo(np.float16).max)  # 65504


def _versions() -> dict:
    out = {}
    for dist in ("switch-sae", "transformer-lens", "transformers", "torch", "numpy"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    return out


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


def build(cfg: DataConfig, folder: Path, model: Optional[lm.LanguageModel], progress: bool) -> None:
    """Extract the cache of `cfg` into `folder`. The work goes into `.<key>.partial` beside it, with a progress
    point every PROGRESS_EVERY_S seconds (the module docstring): a build killed mid-way resumes from its last
    progress point the next time, and ends with the same bytes as an uninterrupted one. A deliberate error (a
    corpus too small, NaN activations) deletes the partial folder; a full disk keeps it once it holds a progress
    point (free space, then run again: it resumes). Partial folders of OTHER builds beside it (a killed build whose settings then changed)
    are named in a warning with their size, never deleted here."""
    t0 = time.time()
    if model is None or model.name != cfg.model:
        model = lm.load_model(cfg.model, device=cfg.device)
    model.check_hook(cfg.hook_name)
    model.check_context_len(cfg.context_len)
    partial = partial_folder(folder)
    _warn_stale_partials(folder.parent, partial)
    durable.remove_abandoned(partial)  # a kill inside an atomic write (e.g. of progress.json) leaves its temp file
    need = build_bytes(cfg, model.d_model)
    done = sum(f.stat().st_size for f in partial.glob("*") if f.is_file()) if partial.is_dir() else 0
    durable.check_free_space(folder.parent, need - done)  # before the model runs, not at a SIGBUS half way
    try:
        with durable.disk_full_guard(folder.parent, need):
            partial.mkdir(parents=True, exist_ok=True)
            _extract(cfg, model, partial, progress, t0)
    except durable.DiskFullError:
        if not (partial / PROGRESS_FILE).exists():  # nothing extracted yet (the shards are allocated first)
            shutil.rmtree(partial, ignore_errors=True)
        raise  # else the progress so far stays: the same command resumes once there is space
    except SwitchSAEError:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    durable.normal_permissions(partial)
    os.replace(partial, folder)


def _warn_stale_partials(parent: Path, ours: Path) -> None:
    import warnings

    for other in sorted(parent.glob(f".*{PARTIAL_TAG}")):
        if other != ours and other.is_dir():
            size = sum(f.stat().st_size for f in other.glob("*") if f.is_file())
            warnings.warn(f"{other} is an unfinished activation cache of other settings ({size / 2**30:.2f} GB): "
                          "delete it if you will not build those settings again", stacklevel=3)


def partial_folder(folder: Path) -> Path:
    """Where the cache `folder` is built until it is whole (kept across kills: the build resumes from it)."""
    return folder.with_name(f".{folder.name}{PARTIAL_TAG}")


def build_bytes(cfg: DataConfig, d_model: int) -> int:
    """Bytes a cache of `cfg` takes on disk (activations of both splits, tokens and row indices), about."""
    item = np.dtype(cfg.store_dtype).itemsize
    tokens = cfg.n_train_tokens + cfg.n_eval_tokens
    return tokens * (d_model * item + 4 + 8) + (1 << 20)


# --- resuming: the progress of a build -----------------------------------------------------------------------
PARTIAL_TAG = ".partial"
PROGRESS_FILE = "progress.json"  # written atomically after the rows it counts are flushed
PROGRESS_TOKENS, PROGRESS_ROWS = "progress_train_tokens.npy", "progress_train_rows.npy"
PROGRESS_EVERY_S = 60.0  # seconds of extraction between two progress points (what a kill can cost)


def _save_progress(folder: Path, content: dict, shards: list, state: dict, train_tokens: list,
                   train_rows: list) -> None:
    for s in shards:
        s.flush()
    for name, parts, width in ((PROGRESS_TOKENS, train_tokens, state["context_len"]), (PROGRESS_ROWS, train_rows, 2)):
        buf = io.BytesIO()
        np.save(buf, np.concatenate(parts) if parts else np.zeros((0, width), np.int32))
        durable.atomic_write_bytes(folder / name, buf.getvalue(), fsync=False)
    durable.atomic_write_json(folder / PROGRESS_FILE, {"content": content, **state})


def _load_progress(folder: Path, content: dict) -> Optional[dict]:
    """The last progress point of a build of `content` in `folder`; None (and the folder emptied) when there is
    none or it belongs to other content."""
    try:
        state = json.loads((folder / PROGRESS_FILE).read_text())
        if state.pop("content") == content:
            # the arrays are written before progress.json and only grow: a kill between the writes leaves them
            # longer than the counters say, so they are cut to the counters (shorter ones cannot be trusted)
            tokens, rows = np.load(folder / PROGRESS_TOKENS), np.load(folder / PROGRESS_ROWS)
            if len(tokens) >= state["ctx_offset"] and len(rows) >= state["filled"]:
                state["train_tokens"] = [tokens[: state["ctx_offset"]]]
                state["train_rows"] = [rows[: state["filled"]]]
                return state
    except (OSError, ValueError, KeyError):
        pass
    for f in folder.glob("*"):  # nothing of another (or an unreadable) build is kept
        shutil.rmtree(f) if f.is_dir() else f.unlink()
    return None


def _extract(cfg: DataConfig, model: lm.LanguageModel, tmp: Path, progress: bool, t0: float) -> None:
    tok, S, D = model.tokenizer, cfg.context_len, model.d_model
    dtype = np.dtype(cfg.store_dtype)
    ctx_iter = text.contexts(text.documents(cfg.dataset, cfg.seed), tok, S, model.prepend_bos)
    content = json.loads(json.dumps(_content_config(cfg)))
    resumed = _load_progress(tmp, content)

    n_eval_ctx = -(-cfg.n_eval_tokens // S)
    n_train = cfg.n_train_tokens
    bar = tqdm(total=n_eval_ctx * S + n_train, unit="tok", desc=f"extracting {cfg.site_label}",
               disable=not progress, smoothing=0.1)
    shard_sizes = [min(SHARD_ROWS, n_train - i) for i in range(0, n_train, SHARD_ROWS)]
    if resumed is None:
        outliers = _extract_eval(cfg, model, ctx_iter, n_eval_ctx, tmp, bar)
        shards = [_allocated_memmap(tmp / f"train_acts_{i:03d}.npy", dtype, (n, D)) for i, n in enumerate(shard_sizes)]
        train_tokens, train_rows, filled, ctx_offset, consumed = [], [], 0, 0, 0
    else:  # the held-out split and the training rows up to the last progress point are on disk
        outliers = OutlierFilter(cfg.max_norm_ratio, resumed["median_norm"])
        outliers.counts = resumed["counts"]
        shards = [np.load(tmp / f"train_acts_{i:03d}.npy", mmap_mode="r+") for i in range(len(shard_sizes))]
        train_tokens, train_rows = resumed["train_tokens"], resumed["train_rows"]
        filled, ctx_offset, consumed = resumed["filled"], resumed["ctx_offset"], resumed["contexts_consumed"]
        ctx_iter = itertools.islice(ctx_iter, n_eval_ctx + consumed, None)  # the contexts seen before the kill
        bar.update(n_eval_ctx * S + filled)
        if progress:
            print(f"resuming the extraction at {filled:,} of {n_train:,} training tokens", flush=True)

    def save_progress():
        state = dict(context_len=S, median_norm=outliers.median_norm, counts=outliers.counts, filled=filled,
                     ctx_offset=ctx_offset, contexts_consumed=consumed)
        _save_progress(tmp, content, shards, state, train_tokens, train_rows)

    if resumed is None:
        save_progress()  # the held-out split is whole
    last_save = time.time()
    # training split: the following contexts, until n_train_tokens activations are kept
    for batch in _batched(ctx_iter, cfg.model_batch_size) if filled < n_train else ():
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
        consumed += len(batch)
        filled += len(kept)
        bar.update(len(kept))
        if filled == n_train:
            break
        if time.time() - last_save >= PROGRESS_EVERY_S:
            save_progress()
            last_save = time.time()
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
    for name in (PROGRESS_FILE, PROGRESS_TOKENS, PROGRESS_ROWS):
        (tmp / name).unlink()
    print(outliers.report())
    _write_manifest(tmp, cfg, model, shard_sizes, n_eval_ctx, outliers.summary(), time.time() - t0)


def _extract_eval(cfg: DataConfig, model: lm.LanguageModel, ctx_iter, n_eval_ctx: int, tmp: Path, bar) -> "OutlierFilter":
    """The held-out split (the first contexts of the stream), saved into `tmp`; its median norm sets the outlier
    filter of both splits (returned)."""
    tok, dtype = model.tokenizer, np.dtype(cfg.store_dtype)
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
    return outliers


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
