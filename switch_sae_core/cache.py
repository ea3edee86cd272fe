"""The ONE train-or-load cache of trained SAEs, shared by sweeps, analyses and notebooks.

`train_or_load(profile, sae_cfg)` returns the SAE trained with the profile's train and data settings,
from `cache_dir()/saes/<results.config_hash>/` if it was trained before, else trains it (resuming from
the checkpoint a killed run left) and stores it there:
    final/            the SAE (sae.safetensors + config.json)
    meta.json         train_seconds, the last logged row ('history'), the held-out MSE curve and its rows
    history.json      every logged row of the training (expert load, router entropy, ... over training)
    progress.json     the log and curve so far (kept across a kill, so a resumed run's are whole)
    checkpoint/       the trainer checkpoints while training (deleted when it finishes)

Runs of one SAE that differ only in length share their steps up to the start of the shorter run's lr decay, so
each run keeps its state there (`decay_checkpoints/<hash without steps>/step_<s>/`, with its log and curve so far)
and a longer run continues from the latest such state it passes through unchanged (`checkpoint.continue_from`):
the convergence check's twice-as-long SAE costs 1.2x, not 2x, the steps of its partner (decay over the last 20%).
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import torch

from .checkpoint import continue_from
from .config import DataConfig, SAEConfig, TrainConfig
from .heldout import heldout_activations, reconstruction_metrics
from .paths import cache_dir
from .profiles import Profile, get_profile
from .results import _json_default, config_hash

HISTORY_FILE = "history.json"
PROGRESS_FILE = "progress.json"


def saes_cache_dir() -> Path:
    d = cache_dir() / "saes"
    d.mkdir(parents=True, exist_ok=True)
    return d


def decay_checkpoints_dir(sae_cfg: SAEConfig, train_cfg: TrainConfig, data_cfg: DataConfig) -> Path:
    """Where the runs of one SAE that differ only in `steps` keep their decay-start checkpoints."""
    return saes_cache_dir() / "decay_checkpoints" / config_hash(sae_cfg, train_cfg.replace(steps=1), data_cfg)


def _write_json(path: Path, obj: Any) -> None:
    """Write atomically: a reader (another shard continuing this run) never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, default=_json_default))
    tmp.replace(path)


def _progress_callback(sae, x_BD: torch.Tensor, every: int, train_cfg: TrainConfig, progress: dict[str, Any],
                       save_to: Path) -> Callable:
    """Trainer callback (called with each logged row): keeps every row in progress['log'] and adds the
    held-out MSE every `every` steps and at the last step to progress['curve'] (sample efficiency),
    saving both at each curve point, and beside the decay-start checkpoint (what a longer run continues
    with). `sae` is the module the trainer updates in place."""
    from .train import decay_start

    log, curve, steps = progress["log"], progress["curve"], train_cfg.steps
    branch_at = decay_start(steps, train_cfg.lr_decay_frac)

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
        # the first logged row from the decay start on: the log and curve a continuation keeps (up to its step)
        branch = Path(train_cfg.decay_checkpoint_dir or "") / f"step_{branch_at:08d}"
        if step >= branch_at and train_cfg.decay_checkpoint_dir and branch.is_dir() and \
                not (branch / PROGRESS_FILE).is_file():
            _write_json(branch / PROGRESS_FILE, progress)

    return callback


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


def _continue_shorter_run(run_cfg: TrainConfig, out_dir: Path) -> dict[str, Any]:
    """A fresh run's progress: empty, or, when a shorter run of this SAE left a decay-start checkpoint this run
    passes through, that run's log and curve up to it (its checkpoint is copied to `run_cfg.checkpoint_dir`)."""
    copied = continue_from(run_cfg.decay_checkpoint_dir, run_cfg.checkpoint_dir, run_cfg)
    if copied is None:
        return {"curve": {"step": [], "mse": []}, "log": []}
    if not (copied / PROGRESS_FILE).is_file():  # killed between its checkpoint and its log: start from scratch
        shutil.rmtree(run_cfg.checkpoint_dir)
        return {"curve": {"step": [], "mse": []}, "log": []}
    step = int(copied.name.removeprefix("step_"))
    saved = json.loads((copied / PROGRESS_FILE).read_text())
    progress = {"log": [row for row in saved["log"] if row["step"] <= step], "continued_from_step": step,
                "curve": {k: [v for s, v in zip(saved["curve"]["step"], values) if s <= step]
                          for k, values in saved["curve"].items()}}
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_json(out_dir / PROGRESS_FILE, progress)  # a kill before its first curve point keeps the curve whole
    return progress


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
):
    """The trained SAE for (sae_cfg, the profile's train and data settings), cached (see the module
    docstring). The held-out MSE on `heldout_BD` (default: the source's first `profile.n_heldout`
    held-out activations, the rows of the results table) is logged every `eval_every` steps and at the
    last step: the sample-efficiency curve, whose last point is the table's `mse`.
    `need_history=True` retrains an entry cached before whole training logs were kept.

    Returns (sae, info): info = {'key', 'dir', 'cached', 'train_seconds', 'history' (the trainer's last
    logged row), 'log' (every logged row), 'curve' ({'step': [...], 'mse': [...]}), 'curve_rows'}."""
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
    run_cfg = train_cfg.replace(checkpoint_dir=str(ckpt), checkpoint_every=every,
                                decay_checkpoint_dir=str(decay_checkpoints_dir(sae_cfg, train_cfg, data_cfg)))
    sae = initial_sae(sae_cfg, train_cfg.seed)  # what the trainer builds when given a config
    progress = _load_progress(out_dir) if ckpt.exists() else _continue_shorter_run(run_cfg, out_dir)
    callback = _progress_callback(sae, heldout_BD, eval_every or profile.eval_every, run_cfg, progress,
                                  out_dir / PROGRESS_FILE)
    t0 = time.perf_counter()
    result = train_sae(sae, source, run_cfg, callback=callback, resume=ckpt.exists())
    log = progress["log"]
    meta = {"train_seconds": time.perf_counter() - t0, "history": log[-1] if log else {},
            "curve": progress["curve"], "curve_rows": int(heldout_BD.shape[0]),
            "continued_from_step": progress.get("continued_from_step")}
    result.sae.cpu().save(final_dir)
    (out_dir / HISTORY_FILE).write_text(json.dumps(log, default=_json_default))
    (out_dir / "meta.json").write_text(json.dumps(meta, default=_json_default))  # written last: marks a complete entry
    shutil.rmtree(ckpt, ignore_errors=True)  # the optimizer state is large; the final weights are kept
    return result.sae, {"key": key, "dir": final_dir, "cached": False, "log": log, **meta}
