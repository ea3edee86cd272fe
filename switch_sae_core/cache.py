"""The ONE train-or-load cache of trained SAEs, shared by sweeps, analyses and notebooks.

`train_or_load(profile, sae_cfg)` returns the SAE trained with the profile's train and data settings, from
`cache_dir()/saes/<keys.config_hash>-<content digest of its activations>/` if it was trained before, else
trains it (resuming from the checkpoint a killed run left) and stores it there:
    final/            the SAE (sae.safetensors + config.json)
    meta.json         train_seconds, the last logged row ('history'), the held-out MSE curve and its rows
    history.json      every logged row of the training (expert load, router entropy, ... over training)
    progress.json     the log and curve so far (kept across a kill, so a resumed run's are whole)
    checkpoint/       the trainer checkpoints while training (deleted when it finishes)
Every file is written atomically (durable.py); one process trains an entry at a time (its lock `.<entry>.lock`:
another process waits, then loads it). The folder name holds the content digest of the activations
(`data.store.content_digest`), so an SAE never outlives the data it was trained on (docs/guarantees.md).

Runs of one SAE that differ only in length share their steps up to the start of the shorter run's lr decay. A run
asked to (`keep_decay_checkpoint`, the sweep's convergence grid) keeps its state there
(`decay_checkpoints/<hash without steps>/step_<s>/`, with its log and curve so far), and a fresh longer run
continues from the latest such state it passes through unchanged (`continuation.py`) when its
curve is measured the same way: the convergence check's twice-as-long SAE costs 1.2x, not 2x, the steps of its
partner (decay over the last 20%), and ends exactly where a run from scratch does.
"""
from __future__ import annotations

import shutil
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

from . import durable
from .checkpoint import checkpoint_path, checkpoint_step, latest_checkpoint
from .continuation import continuation_points, copy_checkpoint
from .config import DataConfig, SAEConfig, TrainConfig, decay_start
from .heldout import heldout_activations, reconstruction_metrics
from .paths import cache_dir
from .profiles import Profile, get_profile
from .keys import config_hash, json_default, lineage_hash, stable_hash

HISTORY_FILE = "history.json"
PROGRESS_FILE = "progress.json"


def saes_cache_dir() -> Path:
    d = cache_dir() / "saes"
    d.mkdir(parents=True, exist_ok=True)
    return d


def decay_checkpoints_dir(sae_cfg: SAEConfig, train_cfg: TrainConfig, data_cfg: DataConfig,
                          data_content: str | None = None) -> Path:
    """Where the runs of one SAE that differ only in `steps` keep their decay-start checkpoints."""
    return saes_cache_dir() / "decay_checkpoints" / entry_name(lineage_hash(sae_cfg, train_cfg, data_cfg), data_content)


def entry_name(key: str, data_content: str | None) -> str:
    """The folder of a trained SAE: its table key (`keys.config_hash`, the configs) and the content digest of
    the activations it was trained on (`data.store.content_digest`: an edited corpus or model file gives another
    folder, never the old SAE). None (a source that is not an activation cache, e.g. synthetic data): the key."""
    return key if data_content is None else f"{key}-{data_content[:12]}"


def entry_lock(key: str, data_content: str | None) -> durable.FileLock:
    """The lock of a trained SAE's folder: held while a process trains it (and, in a sweep, records it)."""
    return durable.FileLock(saes_cache_dir() / f".{entry_name(key, data_content)}.lock")


def data_content_of(source: Any, data_cfg: DataConfig) -> str | None:
    """The content digest of the activations training will read: an ActivationStore's own, that of the cache
    `data_cfg` builds when no source is given, else None (the source's identity is its config)."""
    if source is None:
        from .data.identity import content_digest

        return content_digest(data_cfg)
    return getattr(source, "content_digest", None)


def trained_on(source: Any) -> dict[str, Any] | None:
    """Where an SAE trained on `source` (an ActivationStore) reads its inputs: model, hook, layer, dataset and
    content digest (saved with its weights; `switch-sae evaluate` refuses another site). None for other sources."""
    manifest = getattr(source, "manifest", None)
    if manifest is None:
        return None
    from .data.lm import hook_layer

    return {"model": manifest["model"], "hook": manifest["hook"], "layer": hook_layer(manifest["hook"]),
            "dataset": manifest["dataset"], "data_content": source.content_digest}


def _write_json(path: Path, obj: Any) -> None:
    """Write atomically (durable.py): a reader (another shard continuing this run) never sees half a file."""
    durable.atomic_write_json(path, obj, default=json_default)


def _read_json(path: Path, what: str) -> Any | None:
    """The JSON in `path`, or None (with one line saying so) when a kill or a full disk tore it."""
    try:
        return durable.read_json(path, what)
    except durable.TornFileError as e:
        warnings.warn(f"{e}; ignoring it", stacklevel=3)
        return None


def _empty_progress(curve_id: dict[str, Any]) -> dict[str, Any]:
    return {"curve": {"step": [], "mse": []}, "log": [], "curve_id": curve_id, "train_seconds_before": 0.0}


def _curve_id(x_BD: torch.Tensor, every: int, log_every: int) -> dict[str, Any]:
    """How a run's curve and log are taken: a continuation keeps a shorter run's only if they match."""
    rows = stable_hash(x_BD.detach().cpu().contiguous().numpy().tobytes())
    return {"heldout_rows": int(x_BD.shape[0]), "heldout_hash": rows, "eval_every": every, "log_every": log_every}


def _progress_callback(sae, x_BD: torch.Tensor, every: int, steps: int, progress: dict[str, Any],
                       save_to: Path, t0: float) -> Callable:
    """Trainer callback (called with each logged row): keeps every row in progress['log'] and adds the
    held-out MSE every `every` steps and at the last step to progress['curve'] (sample efficiency),
    saving both at each curve point, with the seconds trained so far (this process's since `t0` added to
    'train_seconds_before': a run killed and resumed counts both parts). `sae` is the module the trainer
    updates in place."""
    log, curve = progress["log"], progress["curve"]

    def callback(row: dict[str, Any]) -> None:
        step = row["step"]
        while log and log[-1]["step"] >= step:  # a resumed run repeats the steps after its checkpoint
            log.pop()
        log.append(row)
        due = step % every == 0 or step == steps
        if due and not (curve["step"] and curve["step"][-1] >= step):
            curve["step"].append(step)
            curve["mse"].append(reconstruction_metrics(sae, x_BD.to(next(sae.parameters()).device))["mse"])
            seconds = progress["train_seconds_before"] + time.perf_counter() - t0
            _write_json(save_to, {**progress, "train_seconds_before": seconds})

    return callback


def _decay_progress_callback(run_cfg: TrainConfig, progress: dict[str, Any], t0: float) -> Callable:
    """Trainer callback: at the first logged row from the decay start on, writes the progress (log, curve,
    seconds so far) beside the decay checkpoint, for the longer runs that continue from it."""
    at = decay_start(run_cfg.steps, run_cfg.lr_decay_frac)
    folder = checkpoint_path(run_cfg.decay_checkpoint_dir, at)

    def callback(row: dict[str, Any]) -> None:
        if row["step"] >= at and folder.is_dir() and not (folder / PROGRESS_FILE).is_file():
            seconds = progress["train_seconds_before"] + time.perf_counter() - t0
            _write_json(folder / PROGRESS_FILE, {**progress, "train_seconds_before": seconds})

    return callback


def _continuation(run_cfg: TrainConfig, decay_dir: Path, curve_id: dict[str, Any], out_dir: Path) -> dict[str, Any] | None:
    """Start a fresh run as the continuation of a shorter one, if one left a decay checkpoint this run passes
    through and its curve was taken the same way: returns its progress up to that step (log, curve, seconds;
    'continued_from_step') and copies its checkpoint into `run_cfg.checkpoint_dir`; else None."""
    for src in continuation_points(decay_dir, run_cfg):
        if not (src / PROGRESS_FILE).is_file():
            continue  # killed before its log was written beside it
        saved = _read_json(src / PROGRESS_FILE, "the log of a shorter run")
        if saved is None:
            continue
        if saved.get("curve_id") != curve_id:
            continue
        step = checkpoint_step(src)
        kept = [i for i, s in enumerate(saved["curve"]["step"]) if s <= step]
        progress = {"log": [row for row in saved["log"] if row["step"] <= step], "curve_id": curve_id,
                    "curve": {k: [values[i] for i in kept] for k, values in saved["curve"].items()},
                    "train_seconds_before": saved["train_seconds_before"], "continued_from_step": step}
        out_dir.mkdir(parents=True, exist_ok=True)
        _write_json(out_dir / PROGRESS_FILE, progress)  # before the copy: a resume finds both or starts afresh
        copy_checkpoint(src, run_cfg.checkpoint_dir, run_cfg)
        return progress
    return None


def _load_progress(out_dir: Path) -> dict[str, Any] | None:
    """What a killed run had logged (progress.json; curve.json of older versions held the curve only); None when
    that file is torn (the checkpoint is then of no use: its log and curve up to there are lost)."""
    if (out_dir / PROGRESS_FILE).is_file():
        return _read_json(out_dir / PROGRESS_FILE, "the log of a killed run")
    if (out_dir / "curve.json").is_file():
        curve = _read_json(out_dir / "curve.json", "the curve of a killed run")
        return None if curve is None else {"curve": curve, "log": []}
    return {"curve": {"step": [], "mse": []}, "log": []}


def _cached(out_dir: Path, heldout_BD: torch.Tensor | None, need_history: bool) -> dict[str, Any] | None:
    """The meta of a complete cache entry that serves this request, else None."""
    final_dir = out_dir / "final"
    if not ((final_dir / "config.json").is_file() and (out_dir / "meta.json").is_file()):
        return None
    meta = _read_json(out_dir / "meta.json", "a trained SAE's numbers")
    if meta is None:
        return None  # torn: retrained
    if heldout_BD is not None and not meta.get("curve", {}).get("step"):
        return None  # a caller asking for the held-out curve (the sweep) retrains an SAE cached without one
    if need_history and not (out_dir / HISTORY_FILE).is_file():
        return None  # cached before whole histories were kept
    return meta


def train_or_load(
    profile: Profile | str | None,
    sae_cfg: SAEConfig,
    source: Any = None,
    train_cfg: TrainConfig | None = None,
    data_cfg: DataConfig | None = None,
    heldout_BD: torch.Tensor | None = None,
    eval_every: int | None = None,
    force: bool = False,
    need_history: bool = False,
    keep_decay_checkpoint: bool = False,
):
    """The trained SAE for (sae_cfg, the profile's train and data settings), cached (see the module
    docstring). The held-out MSE on `heldout_BD` (default: the source's first `profile.n_heldout`
    held-out activations, the rows of the results table) is logged every `eval_every` steps and at the
    last step: the sample-efficiency curve, whose last point is the table's `mse`.
    `need_history=True` retrains an entry cached before whole training logs were kept. `force=True` trains
    from scratch (no continuation). `keep_decay_checkpoint=True` keeps the state at the decay start for longer
    runs of this SAE to continue from (disk: the SAE and its Adam moments, ~3x the SAE).

    Returns (sae, info): info = {'key', 'dir', 'cached', 'train_seconds', 'history' (the trainer's last
    logged row), 'log' (every logged row), 'curve' ({'step': [...], 'mse': [...]}), 'curve_rows',
    'continued_from_step' (None, or the step of the shorter run it continued)}."""
    from .saes.base import load_sae

    profile = profile if isinstance(profile, Profile) else get_profile(profile)
    train_cfg = train_cfg or profile.train
    data_cfg = data_cfg or profile.data
    sae_cfg.check_trainable()  # before any activation is extracted
    key = config_hash(sae_cfg, train_cfg, data_cfg)
    data_content = data_content_of(source, data_cfg)
    out_dir = saes_cache_dir() / entry_name(key, data_content)
    final_dir = out_dir / "final"
    # one process trains an SAE at a time; another one (a second sweep, a notebook beside the CLI) waits for it
    # and then loads what it trained
    lock = entry_lock(key, data_content)
    if not lock.acquire(blocking=False):
        print(f"{lock.holder()} is training {out_dir.name}; waiting for it to finish", flush=True)
        lock.acquire()
    try:
        meta = None if force else _cached(out_dir, heldout_BD, need_history)
        if meta is not None:
            history_file = out_dir / HISTORY_FILE
            log = (_read_json(history_file, "a training log") if history_file.is_file() else None) \
                or [meta.get("history", {})]
            return load_sae(final_dir), {"key": key, "dir": final_dir, "cached": True, "log": log, **meta}
        return _train(profile, sae_cfg, source, train_cfg, data_cfg, heldout_BD, eval_every, force,
                      keep_decay_checkpoint, key, data_content, out_dir)
    finally:
        lock.release()


def _train(profile: Profile, sae_cfg: SAEConfig, source: Any, train_cfg: TrainConfig, data_cfg: DataConfig,
           heldout_BD: torch.Tensor | None, eval_every: int | None, force: bool, keep_decay_checkpoint: bool,
           key: str, data_content: str | None, out_dir: Path):
    """train_or_load's training half (called holding the entry's lock)."""
    from .saes.base import initial_sae
    from .train import train_sae

    final_dir = out_dir / "final"
    durable.remove_abandoned(out_dir)  # temporary files of a killed run of this SAE
    if source is None:
        from .data.store import ActivationStore

        source = ActivationStore.build_or_load(data_cfg)
    if heldout_BD is None:  # every cached SAE carries its held-out MSE curve
        heldout_BD = heldout_activations(source, profile.n_heldout)
    ckpt = out_dir / "checkpoint"
    every = train_cfg.checkpoint_every or max(train_cfg.steps // 4, 1)
    decay_dir = decay_checkpoints_dir(sae_cfg, train_cfg, data_cfg, data_content)
    run_cfg = train_cfg.replace(checkpoint_dir=str(ckpt), checkpoint_every=every,
                                decay_checkpoint_dir=str(decay_dir) if keep_decay_checkpoint else None)
    sae = initial_sae(sae_cfg, train_cfg.seed)  # what the trainer builds when given a config
    sae.trained_on = trained_on(source)  # recorded in its checkpoints and its final save
    eval_every = eval_every or profile.eval_every
    curve_id = _curve_id(heldout_BD, eval_every, train_cfg.log_every)
    saved = _load_progress(out_dir) if latest_checkpoint(ckpt) is not None else None
    if saved is not None:  # a killed run (or continuation): resume it
        progress = {**_empty_progress(curve_id), **saved}
    else:  # nothing to resume, or its log is torn (then the checkpoint is of no use)
        shutil.rmtree(ckpt, ignore_errors=True)
        progress = (None if force else _continuation(run_cfg, decay_dir, curve_id, out_dir)) or _empty_progress(curve_id)
    t0 = time.perf_counter()
    on_row = _progress_callback(sae, heldout_BD, eval_every, train_cfg.steps, progress, out_dir / PROGRESS_FILE, t0)
    on_decay = _decay_progress_callback(run_cfg, progress, t0) if keep_decay_checkpoint else (lambda row: None)

    def callback(row: dict[str, Any]) -> None:
        on_row(row)
        on_decay(row)

    try:
        result = train_sae(sae, source, run_cfg, callback=callback, resume=latest_checkpoint(ckpt) is not None)
    except KeyboardInterrupt:  # the trainer saved a checkpoint: keep the rows logged since the last curve point,
        # and the seconds trained so far (the resumed run adds its own to them)
        _write_json(out_dir / PROGRESS_FILE, {**progress, "train_seconds_before": progress["train_seconds_before"]
                                              + time.perf_counter() - t0})
        raise
    log = progress["log"]
    # the whole run's seconds (a continuation adds those of the shorter run up to its decay start)
    meta = {"train_seconds": progress["train_seconds_before"] + time.perf_counter() - t0,
            "history": log[-1] if log else {}, "curve": progress["curve"], "curve_rows": int(heldout_BD.shape[0]),
            "continued_from_step": progress.get("continued_from_step"), "data_content": data_content}
    with durable.atomic_folder(final_dir) as tmp:
        result.sae.cpu().save(tmp)
    _write_json(out_dir / HISTORY_FILE, log)
    _write_json(out_dir / "meta.json", meta)  # written last: marks a complete entry
    shutil.rmtree(ckpt, ignore_errors=True)  # the optimizer state is large; the final weights are kept
    return result.sae, {"key": key, "dir": final_dir, "cached": False, "log": log, **meta}
