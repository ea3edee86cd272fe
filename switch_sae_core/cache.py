"""The ONE train-or-load cache of trained SAEs, shared by sweeps, analyses and notebooks.

`train_or_load(profile, sae_cfg)` returns the SAE trained with the profile's train and data settings,
from `cache_dir()/saes/<results.config_hash>/` if it was trained before, else trains it (resuming from
the checkpoint a killed run left) and stores it there:
    final/            the SAE (sae.safetensors + config.json)
    meta.json         train_seconds, the last logged row ('history'), the held-out MSE curve and its rows
    history.json      every logged row of the training (expert load, router entropy, ... over training)
    progress.json     the log and curve so far (kept across a kill, so a resumed run's are whole)
    checkpoint/       the trainer checkpoints while training (deleted when it finishes)

Runs of one SAE that differ only in length share their steps up to the start of the shorter run's lr decay. A run
asked to (`keep_decay_checkpoint`, the sweep's convergence grid) keeps its state there
(`decay_checkpoints/<hash without steps>/step_<s>/`, with its log and curve so far), and a fresh longer run
continues from the latest such state it passes through unchanged (`checkpoint.continuation_points`) when its
curve is measured the same way: the convergence check's twice-as-long SAE costs 1.2x, not 2x, the steps of its
partner (decay over the last 20%), and ends exactly where a run from scratch does.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import torch

from .checkpoint import checkpoint_path, checkpoint_step, continuation_points, copy_checkpoint, latest_checkpoint
from .config import DataConfig, SAEConfig, TrainConfig, decay_start
from .heldout import heldout_activations, reconstruction_metrics
from .paths import cache_dir
from .profiles import Profile, get_profile
from .results import _json_default, config_hash, lineage_hash

HISTORY_FILE = "history.json"
PROGRESS_FILE = "progress.json"


def saes_cache_dir() -> Path:
    d = cache_dir() / "saes"
    d.mkdir(parents=True, exist_ok=True)
    return d


def decay_checkpoints_dir(sae_cfg: SAEConfig, train_cfg: TrainConfig, data_cfg: DataConfig) -> Path:
    """Where the runs of one SAE that differ only in `steps` keep their decay-start checkpoints."""
    return saes_cache_dir() / "decay_checkpoints" / lineage_hash(sae_cfg, train_cfg, data_cfg)


def _write_json(path: Path, obj: Any) -> None:
    """Write atomically: a reader (another shard continuing this run) never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, default=_json_default))
    tmp.replace(path)


def _empty_progress(curve_id: dict[str, Any]) -> dict[str, Any]:
    return {"curve": {"step": [], "mse": []}, "log": [], "curve_id": curve_id, "train_seconds_before": 0.0}


def _curve_id(x_BD: torch.Tensor, every: int, log_every: int) -> dict[str, Any]:
    """How a run's curve and log are taken: a continuation keeps a shorter run's only if they match."""
    rows = hashlib.sha1(x_BD.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]
    return {"heldout_rows": int(x_BD.shape[0]), "heldout_sha1": rows, "eval_every": every, "log_every": log_every}


def _progress_callback(sae, x_BD: torch.Tensor, every: int, steps: int, progress: dict[str, Any],
                       save_to: Path) -> Callable:
    """Trainer callback (called with each logged row): keeps every row in progress['log'] and adds the
    held-out MSE every `every` steps and at the last step to progress['curve'] (sample efficiency),
    saving both at each curve point. `sae` is the module the trainer updates in place."""
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
            save_to.parent.mkdir(parents=True, exist_ok=True)
            _write_json(save_to, progress)

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
        try:
            saved = json.loads((src / PROGRESS_FILE).read_text())
        except (OSError, json.JSONDecodeError):
            continue  # killed before its log was written beside it
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


def _load_progress(out_dir: Path) -> dict[str, Any]:
    """What a killed run had logged (progress.json; curve.json of older versions held the curve only)."""
    if (out_dir / PROGRESS_FILE).is_file():
        return json.loads((out_dir / PROGRESS_FILE).read_text())
    if (out_dir / "curve.json").is_file():
        return {"curve": json.loads((out_dir / "curve.json").read_text()), "log": []}
    return {"curve": {"step": [], "mse": []}, "log": []}


def _cached(out_dir: Path, heldout_BD: torch.Tensor | None, need_history: bool) -> dict[str, Any] | None:
    """The meta of a complete cache entry that serves this request, else None."""
    final_dir = out_dir / "final"
    if not ((final_dir / "config.json").is_file() and (out_dir / "meta.json").is_file()):
        return None
    meta = json.loads((out_dir / "meta.json").read_text())
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
    from .saes.base import initial_sae, load_sae
    from .train import train_sae

    profile = profile if isinstance(profile, Profile) else get_profile(profile)
    train_cfg = train_cfg or profile.train
    data_cfg = data_cfg or profile.data
    key = config_hash(sae_cfg, train_cfg, data_cfg)
    out_dir = saes_cache_dir() / key
    final_dir = out_dir / "final"
    meta = None if force else _cached(out_dir, heldout_BD, need_history)
    if meta is not None:
        history_file = out_dir / HISTORY_FILE
        log = json.loads(history_file.read_text()) if history_file.is_file() else [meta.get("history", {})]
        return load_sae(final_dir), {"key": key, "dir": final_dir, "cached": True, "log": log, **meta}
    if source is None:
        from .data.store import ActivationStore

        source = ActivationStore.build_or_load(data_cfg)
    if heldout_BD is None:  # every cached SAE carries its held-out MSE curve
        heldout_BD = heldout_activations(source, profile.n_heldout)
    ckpt = out_dir / "checkpoint"
    every = train_cfg.checkpoint_every or max(train_cfg.steps // 4, 1)
    decay_dir = decay_checkpoints_dir(sae_cfg, train_cfg, data_cfg)
    run_cfg = train_cfg.replace(checkpoint_dir=str(ckpt), checkpoint_every=every,
                                decay_checkpoint_dir=str(decay_dir) if keep_decay_checkpoint else None)
    sae = initial_sae(sae_cfg, train_cfg.seed)  # what the trainer builds when given a config
    eval_every = eval_every or profile.eval_every
    curve_id = _curve_id(heldout_BD, eval_every, train_cfg.log_every)
    if latest_checkpoint(ckpt) is not None:  # a killed run (or continuation): resume it
        progress = {**_empty_progress(curve_id), **_load_progress(out_dir)}
    else:
        shutil.rmtree(ckpt, ignore_errors=True)
        progress = (None if force else _continuation(run_cfg, decay_dir, curve_id, out_dir)) or _empty_progress(curve_id)
    t0 = time.perf_counter()
    on_row = _progress_callback(sae, heldout_BD, eval_every, train_cfg.steps, progress, out_dir / PROGRESS_FILE)
    on_decay = _decay_progress_callback(run_cfg, progress, t0) if keep_decay_checkpoint else (lambda row: None)

    def callback(row: dict[str, Any]) -> None:
        on_row(row)
        on_decay(row)

    try:
        result = train_sae(sae, source, run_cfg, callback=callback, resume=latest_checkpoint(ckpt) is not None)
    except KeyboardInterrupt:  # the trainer saved a checkpoint: keep the rows logged since the last curve point
        _write_json(out_dir / PROGRESS_FILE, progress)
        raise
    log = progress["log"]
    # the whole run's seconds (a continuation adds those of the shorter run up to its decay start)
    meta = {"train_seconds": progress["train_seconds_before"] + time.perf_counter() - t0,
            "history": log[-1] if log else {}, "curve": progress["curve"], "curve_rows": int(heldout_BD.shape[0]),
            "continued_from_step": progress.get("continued_from_step")}
    result.sae.cpu().save(final_dir)
    (out_dir / HISTORY_FILE).write_text(json.dumps(log, default=_json_default))
    (out_dir / "meta.json").write_text(json.dumps(meta, default=_json_default))  # written last: marks a complete entry
    shutil.rmtree(ckpt, ignore_errors=True)  # the optimizer state is large; the final weights are kept
    return result.sae, {"key": key, "dir": final_dir, "cached": False, "log": log, **meta}
