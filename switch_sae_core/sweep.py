"""Sweeps: the paper's grids of SAEs, the one results table, and `train_or_load`.

- A grid is a list of `SAEConfig`s built from a profile (`grid_configs`):
  `fixed_width`  TopK, ReLU, Gated and Switch (N in profile.fixed_width_experts) all at the baseline
                 width M = width_multiple * d; `flop_matched` TopK, ReLU, Gated at M and Switch
                 (N in profile.flop_matched_experts) with experts as wide as the baseline (M_switch = N * M).
  TopK/Switch run over profile.ks; ReLU/Gated have no k, so their sparsity coefficient runs over
  len(ks) values (profile.relu_l1_coeffs / gated_l1_coeffs, relative to the activations' RMS norm).
- The results table is JSONL, one record (a flat dict) per trained SAE, in
  `data/results/<profile>/records.jsonl`. `load_records` returns a list of dicts; `records_frame` a
  pandas DataFrame. Every record carries its full configs, its held-out MSE curve (sample efficiency)
  and the git commit, and is keyed by a hash of (SAE, train, data) configs: a killed sweep resumes and
  skips finished records; an unfinished training resumes from its checkpoint.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import torch

from .config import ConfigError, DataConfig, SAEConfig, TrainConfig
from .paths import RESULTS_ENV, cache_dir, project_root, results_root
from .errors import SwitchSAEError
from .profiles import GRIDS, Profile, get_profile

RESULTS_FILE = "records.jsonl"
HELDOUT_SEED = 1_000_003  # batches of a plain BatchSource drawn with this seed serve as held-out data
# TrainConfig fields that do not change what is learned: left out of the config hash
_NON_RESULT_FIELDS = ("progress", "log_every", "checkpoint_dir", "checkpoint_every", "wandb_project", "device")


# --- grids ----------------------------------------------------------------------------------------------
def baseline_width(profile: Profile, d_in: int) -> int:
    """M of the baselines: width_multiple * d (paper: 32 * 768 = 24576)."""
    return profile.width_multiple * d_in


def setting_of(cfg: SAEConfig, base_m: int) -> str:
    """'baseline', 'fixed_width', 'flop_matched' or 'other' (the column `setting` of the paper's CSV)."""
    if cfg.arch != "switch":
        return "baseline" if cfg.n_features == base_m else "other"
    if cfg.n_features == base_m:
        return "fixed_width"
    if cfg.expert_width == base_m:
        return "flop_matched"
    return "other"


def grid_configs(profile: Profile, grid: str, d_in: int, act_rms: float = 1.0) -> list[SAEConfig]:
    """Every SAE of a named grid. `act_rms` = sqrt(E||x||^2 / d) of the activations scales the
    ReLU/Gated sparsity coefficients (their loss is quadratic in x, the L1 term linear)."""
    if grid not in GRIDS:
        raise ConfigError(f"unknown grid {grid!r}: choose one of {GRIDS}")
    m = baseline_width(profile, d_in)
    cfgs = [SAEConfig(arch="topk", d_in=d_in, n_features=m, k=k) for k in profile.ks]
    for arch, rel in (("relu", profile.relu_l1_coeffs), ("gated", profile.gated_l1_coeffs)):
        cfgs += [SAEConfig(arch=arch, d_in=d_in, n_features=m, l1_coeff=_round_sig(r * act_rms)) for r in rel]
    if grid == "fixed_width":
        experts = [n for n in profile.fixed_width_experts if m % n == 0]
        cfgs += [SAEConfig(arch="switch", d_in=d_in, n_features=m, n_experts=n, k=k)
                 for n in experts for k in profile.ks if k <= m // n]
    else:
        cfgs += [SAEConfig(arch="switch", d_in=d_in, n_features=n * m, n_experts=n, k=k)
                 for n in profile.flop_matched_experts for k in profile.ks]
    return cfgs


def _round_sig(x: float, digits: int = 3) -> float:
    """Round to a few significant digits so the grid (and its config hashes) is stable across runs."""
    return float(f"{x:.{digits}g}")


def sae_label(cfg: SAEConfig) -> str:
    """Short human name: 'topk', 'relu', 'switch-16', ... (the legend entry of a curve)."""
    return f"switch-{cfg.n_experts}" if cfg.arch == "switch" else cfg.arch


def sae_name(cfg: SAEConfig) -> str:
    """Unique name within a grid: 'switch-16_M4608_k32', 'relu_M4608_l1-2.5'."""
    sparsity = f"k{cfg.k}" if cfg.arch in ("topk", "switch") else f"l1-{cfg.l1_coeff:g}"
    return f"{sae_label(cfg)}_M{cfg.n_features}_{sparsity}"


# --- hashing and the results table -------------------------------------------------------------------------
def _result_train_dict(train_cfg: TrainConfig) -> dict[str, Any]:
    d = train_cfg.to_dict()
    for name in _NON_RESULT_FIELDS:
        d.pop(name, None)
    return d


def _result_data_dict(data_cfg: DataConfig) -> dict[str, Any]:
    d = data_cfg.to_dict()
    for name in ("cache_dir", "device", "model_batch_size"):  # where/how fast, not what
        d.pop(name, None)
    return d


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=list).encode()).hexdigest()[:16]


def config_hash(sae_cfg: SAEConfig, train_cfg: TrainConfig, data_cfg: DataConfig) -> str:
    """Identity of a trained SAE: what it is, how it was trained, on which activations."""
    return _hash({"sae": sae_cfg.to_dict(), "train": _result_train_dict(train_cfg), "data": _result_data_dict(data_cfg)})


def run_fingerprint(train_cfg: TrainConfig, data_cfg: DataConfig) -> str:
    """Identity of a sweep's shared settings: records of an older profile version do not match."""
    return _hash({"train": _result_train_dict(train_cfg), "data": _result_data_dict(data_cfg)})


class ResultsError(SwitchSAEError, ValueError):
    """A results table cannot be read; the message names the file and the line."""


def results_dir(profile: str | Profile, root: str | Path | None = None) -> Path:
    """The folder of a profile's results table: `root` if given, else $SWITCH_SAE_RESULTS (set by `switch-sae
    reproduce` so its notebooks read and extend the user's own table), else the committed data/results/<profile>/."""
    name = profile.name if isinstance(profile, Profile) else profile
    root = root if root is not None else os.environ.get(RESULTS_ENV) or None
    return Path(root) if root is not None else results_root() / name


def results_path(profile: str | Profile, root: str | Path | None = None) -> Path:
    return results_dir(profile, root) / RESULTS_FILE


def append_record(path: str | Path, record: dict[str, Any]) -> None:
    """Append one record as a JSON line (flushed and fsynced: a killed sweep loses at most this line)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(record, sort_keys=True, default=_json_default)
    with open(path, "a") as f:
        f.write(line + "\n")
        f.flush()
        os.fsync(f.fileno())


def _json_default(o: Any) -> Any:
    if isinstance(o, torch.Tensor):
        return o.item() if o.numel() == 1 else o.tolist()
    if isinstance(o, (tuple, set)):
        return list(o)
    if dataclasses.is_dataclass(o):
        return dataclasses.asdict(o)
    return float(o)  # numpy scalars


def load_records(path: str | Path) -> list[dict[str, Any]]:
    """All records of a results file ([] if it does not exist). A half-written last line (a sweep
    killed mid-write) is skipped; a corrupt line elsewhere is an error."""
    path = Path(path)
    if not path.is_file():
        return []
    lines = path.read_text().splitlines()
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:
                continue
            raise ResultsError(f"{path}:{i + 1} is not valid JSON ({e}); delete that line to continue") from None
    return records


def records_frame(records: list[dict[str, Any]]):
    """The records as a pandas DataFrame (configs and curves stay as dict/list columns)."""
    import pandas as pd

    return pd.DataFrame.from_records(records)


def profile_records(profile: Profile, root: str | Path | None = None) -> list[dict[str, Any]]:
    """Records of `profile` trained with its CURRENT train and data settings, latest per config hash."""
    fp = run_fingerprint(profile.train, profile.data)
    latest: dict[str, dict] = {}
    for r in load_records(results_path(profile, root)):
        if r.get("run_fingerprint") == fp:
            latest[r["key"]] = r
    return list(latest.values())


COMPARED_METRICS = ("mse", "fvu", "l0", "loss_recovered")


def compare_records(records: list[dict], reference: list[dict], metrics: Iterable[str] = COMPARED_METRICS) -> list[dict]:
    """Per SAE in both tables (matched by config `key`): the largest relative difference |a - b| / |b| over
    `metrics` (a metric missing on either side is skipped), largest first. Each row: name, key, metric,
    mine, reference, rel_diff."""
    ref = {r["key"]: r for r in reference}
    rows = []
    for r in records:
        other = ref.get(r["key"])
        if other is None:
            continue
        diffs = [(abs(r[m] - other[m]) / max(abs(other[m]), 1e-12), m) for m in metrics
                 if r.get(m) is not None and other.get(m) is not None]
        if diffs:
            rel, m = max(diffs)
            rows.append({"name": r["name"], "key": r["key"], "metric": m, "mine": r[m], "reference": other[m],
                         "rel_diff": rel})
    return sorted(rows, key=lambda row: -row["rel_diff"])


def select(records: Iterable[dict], setting: str | Iterable[str] | None = None, **equal: Any) -> list[dict]:
    """Filter records: `select(rs, ["baseline", "flop_matched"], k=32)`."""
    settings = {setting} if isinstance(setting, str) else (set(setting) if setting else None)
    return [r for r in records
            if (settings is None or r["setting"] in settings) and all(r.get(k) == v for k, v in equal.items())]


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=project_root(), capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# --- activations and evaluation context ---------------------------------------------------------------------
@dataclasses.dataclass
class SweepContext:
    """What every SAE of a sweep shares: the training batches, held-out activations, the LM evaluator."""

    source: Any  # BatchSource
    data_cfg: DataConfig
    heldout_BD: torch.Tensor  # (B, D) held-out activations for MSE/FVU/L0 and the sample-efficiency curve
    evaluator: Optional[Callable[[torch.nn.Module], dict[str, float]]] = None  # SAE -> CE/KL numbers

    @property
    def d_in(self) -> int:
        return int(self.heldout_BD.shape[1])

    @property
    def act_rms(self) -> float:
        """sqrt(E||x||^2 / d) of the held-out activations (scales the ReLU/Gated coefficients)."""
        return float(self.heldout_BD.pow(2).sum(-1).mean().div(self.d_in).sqrt())


def heldout_activations(source: Any, n: int) -> torch.Tensor:
    """(n, D) activations never used for training: the store's held-out split if it has one, else a
    batch drawn from the source's stream with a dedicated seed (synthetic sources)."""
    if callable(getattr(source, "eval_activations", None)):
        return source.eval_activations(n)
    return next(iter(source.batches(n, seed=HELDOUT_SEED)))


def build_context(profile: Profile, with_lm: bool = True, n_heldout: int | None = None) -> SweepContext:
    """Load (or build, the first time) the profile's cached activations and the CE evaluator."""
    from .data.store import ActivationStore

    store = ActivationStore.build_or_load(profile.data)
    heldout = heldout_activations(store, n_heldout or profile.n_heldout)
    evaluator = None
    if with_lm:
        from .evaluate import make_lm_evaluator

        evaluator = make_lm_evaluator(_FirstContexts(store, profile.ce_contexts), profile.data,
                                      progress=profile.train.progress)
    return SweepContext(store, profile.data, heldout, evaluator)


class _FirstContexts:
    """A store seen through its first `n` held-out contexts (CE evaluation on a budget; None = all)."""

    def __init__(self, store: Any, n: int | None):
        self.config = store.config
        self.eval_tokens = store.eval_tokens if n is None else store.eval_tokens[:n]


@torch.no_grad()
def reconstruction_metrics(sae: torch.nn.Module, x_BD: torch.Tensor, chunk: int = 4096) -> dict[str, float]:
    """MSE, FVU, L0 and the fraction of features that never fired on the held-out activations."""
    from . import metrics

    sae.eval()
    n_latents = sae.decoder_directions().shape[0]  # M, plus the shared expert's features if there is one
    x_hats, l0s, fired = [], [], torch.zeros(n_latents, dtype=torch.bool)
    for x in x_BD.split(chunk):
        out = sae(x)
        x_hats.append(out.x_hat)
        l0s.append(metrics.l0(out.latent_acts) * x.shape[0])
        fired |= metrics.fired_features(out.latent_acts, out.latent_indices, n_latents).cpu()
    x_hat = torch.cat(x_hats)
    sae.train()
    return {
        "mse": float(metrics.mse(x_BD, x_hat)),
        "fvu": float(metrics.fvu(x_BD, x_hat)),
        "l0": float(sum(l0s) / x_BD.shape[0]),
        "dead_fraction_heldout": float(1.0 - fired.float().mean()),
    }


# --- training with a cache ----------------------------------------------------------------------------------
def saes_cache_dir() -> Path:
    d = cache_dir() / "saes"
    d.mkdir(parents=True, exist_ok=True)
    return d


def _curve_callback(sae, x_BD: torch.Tensor, every: int, curve: dict[str, list], save_to: Path) -> Callable:
    """Trainer callback (called with each logged row) adding the held-out MSE every `every` steps
    to `curve` (sample efficiency). `sae` is the module the trainer updates in place."""

    def callback(row: dict[str, Any]) -> None:
        step = row["step"]
        if step % every == 0 and not (curve["step"] and curve["step"][-1] >= step):  # a resumed run repeats no step
            curve["step"].append(step)
            curve["mse"].append(reconstruction_metrics(sae, x_BD.to(_device_of(sae)))["mse"])
            save_to.parent.mkdir(parents=True, exist_ok=True)
            save_to.write_text(json.dumps(curve))

    return callback


def _device_of(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


def train_or_load(
    profile: Profile | str | None,
    sae_cfg: SAEConfig,
    source: Any = None,
    train_cfg: TrainConfig | None = None,
    data_cfg: DataConfig | None = None,
    heldout_BD: torch.Tensor | None = None,
    eval_every: int | None = None,
    force: bool = False,
):
    """The trained SAE for (sae_cfg, the profile's train and data settings): loaded from
    cache_dir()/saes/<config hash>/ if it was trained before, else trained (resuming from the checkpoint
    a killed run left) and saved there. The held-out MSE on `heldout_BD` (default: the source's held-out
    activations) is logged every `eval_every` steps (the sample-efficiency curve). Returns (sae, info): info = {'key', 'dir', 'cached',
    'train_seconds', 'history' (the trainer's last logged row), 'curve' ({'step': [...], 'mse': [...]})}."""
    from .saes.base import build_sae, load_sae
    from .train import train_sae

    profile = profile if isinstance(profile, Profile) else get_profile(profile)
    train_cfg = train_cfg or profile.train
    data_cfg = data_cfg or profile.data
    key = config_hash(sae_cfg, train_cfg, data_cfg)
    out_dir = saes_cache_dir() / key
    final_dir = out_dir / "final"
    if (final_dir / "config.json").is_file() and (out_dir / "meta.json").is_file() and not force:
        meta = json.loads((out_dir / "meta.json").read_text())
        # a caller asking for the held-out curve (the sweep) retrains an SAE cached without one
        if meta.get("curve", {}).get("step") or heldout_BD is None:
            return load_sae(final_dir), {"key": key, "dir": final_dir, "cached": True, **meta}
    if source is None:
        from .data.store import ActivationStore

        source = ActivationStore.build_or_load(data_cfg)
    if heldout_BD is None:  # every cached SAE carries its held-out MSE curve
        heldout_BD = heldout_activations(source, min(profile.n_heldout, 2048))
    ckpt = out_dir / "checkpoint"
    every = train_cfg.checkpoint_every or max(train_cfg.steps // 4, 1)
    run_cfg = train_cfg.replace(checkpoint_dir=str(ckpt), checkpoint_every=every)
    torch.manual_seed(train_cfg.seed)  # the trainer seeds the same way when given a config
    sae = build_sae(sae_cfg)
    curve_file = out_dir / "curve.json"  # kept across a kill, so a resumed run's curve is whole
    curve = json.loads(curve_file.read_text()) if ckpt.exists() and curve_file.is_file() else {"step": [], "mse": []}
    callback = _curve_callback(sae, heldout_BD[:2048], eval_every or profile.eval_every, curve, curve_file)
    t0 = time.perf_counter()
    result = train_sae(sae, source, run_cfg, callback=callback, resume=ckpt.exists())
    meta = {"train_seconds": time.perf_counter() - t0, "history": result.history[-1] if result.history else {},
            "curve": curve}
    result.sae.cpu().save(final_dir)
    (out_dir / "meta.json").write_text(json.dumps(meta, default=_json_default))
    _remove_tree(ckpt)  # the optimizer state is large; the final weights are kept
    return result.sae, {"key": key, "dir": final_dir, "cached": False, **meta}


def _remove_tree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


# --- the sweep -----------------------------------------------------------------------------------------------
def make_record(profile: Profile, cfg: SAEConfig, sae, info: dict, ctx: SweepContext) -> dict[str, Any]:
    base_m = baseline_width(profile, ctx.d_in)
    t0 = time.perf_counter()
    rec = reconstruction_metrics(sae, ctx.heldout_BD)
    lm = ctx.evaluator(sae) if ctx.evaluator is not None else {}
    eval_seconds = time.perf_counter() - t0
    flops = sae.flops_per_input()
    hist = info.get("history") or {}
    train_cfg = profile.train
    return {
        "key": info["key"],
        "run_fingerprint": run_fingerprint(train_cfg, profile.data),
        "profile": profile.name,
        "name": sae_name(cfg),
        "label": sae_label(cfg),
        "setting": setting_of(cfg, base_m),
        "arch": cfg.arch,
        "n_experts": cfg.n_experts,
        "n_features": cfg.n_features,
        "expert_width": cfg.expert_width,
        "k": cfg.k if cfg.arch in ("topk", "switch") else None,
        "l1_coeff": cfg.l1_coeff if cfg.arch in ("relu", "gated") else None,
        "steps": train_cfg.steps,
        "batch_size": train_cfg.batch_size,
        "tokens": train_cfg.steps * train_cfg.batch_size,
        **rec,
        "loss_recovered": lm.get("loss_recovered"),
        "kl": lm.get("kl"),
        "ce_clean": lm.get("ce_clean"),
        "ce_sae": lm.get("ce_sae"),
        "ce_zero": lm.get("ce_zero"),
        "dead_fraction": _float_or_none(hist.get("dead_frac", rec["dead_fraction_heldout"])),
        "flops_per_input": int(flops["total"]),
        "flops": {k: int(v) for k, v in flops.items()},
        "n_params": int(sae.n_params),
        "train_seconds": info.get("train_seconds"),
        "eval_seconds": eval_seconds,
        "curve": info.get("curve", {"step": [], "mse": []}),
        "seed": train_cfg.seed,
        "git_commit": git_commit(),
        "sae_config": cfg.to_dict(),
        "train_config": train_cfg.to_dict(),
        "data_config": profile.data.to_dict(),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _float_or_none(v: Any) -> float | None:
    try:
        return None if v is None else float(v)
    except (TypeError, ValueError):
        return None


def sweep_configs(profile: Profile, grids: Iterable[str], ctx: SweepContext) -> list[SAEConfig]:
    """The union of the grids' configs, each once, in grid order."""
    seen, cfgs = set(), []
    for g in grids:
        for cfg in grid_configs(profile, g, ctx.d_in, ctx.act_rms):
            h = _hash(cfg.to_dict())
            if h not in seen:
                seen.add(h)
                cfgs.append(cfg)
    return cfgs


def run_sweep(
    profile: Profile | str | None = None,
    grids: Iterable[str] = GRIDS,
    ctx: SweepContext | None = None,
    root: str | Path | None = None,
    with_lm: bool = True,
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Train and evaluate every SAE of the grids that has no record yet; return the profile's records.

    Records are appended as each SAE finishes, so a killed sweep restarts where it stopped."""
    from tqdm.auto import tqdm

    profile = profile if isinstance(profile, Profile) else get_profile(profile)
    grids = [grids] if isinstance(grids, str) else list(grids)
    for g in grids:
        if g not in GRIDS:
            raise ConfigError(f"unknown grid {g!r}: choose from {GRIDS}")
    ctx = ctx or build_context(profile, with_lm=with_lm)
    path = results_path(profile, root)
    # a record made without the LM evaluation (--no-lm) is redone when the evaluator is available
    need_lm = ctx.evaluator is not None
    done = {r["key"] for r in profile_records(profile, root) if not need_lm or r.get("loss_recovered") is not None}
    cfgs = sweep_configs(profile, grids, ctx)
    todo = [c for c in cfgs if config_hash(c, profile.train, ctx.data_cfg) not in done]
    log(f"sweep {profile.name} {'+'.join(grids)}: {len(cfgs)} SAEs, {len(cfgs) - len(todo)} already in {path}")
    for cfg in tqdm(todo, desc=f"sweep {profile.name}", unit="SAE"):
        t0 = time.perf_counter()
        sae, info = train_or_load(profile, cfg, ctx.source, profile.train, ctx.data_cfg, ctx.heldout_BD)
        record = make_record(profile, cfg, sae, info, ctx)
        record["wall_clock_s"] = time.perf_counter() - t0
        append_record(path, record)
        log(f"  {record['name']}: mse={record['mse']:.4g} L0={record['l0']:.1f} "
            f"loss_rec={_fmt(record['loss_recovered'])} ({record['wall_clock_s']:.0f}s)")
    return profile_records(profile, root)


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.4f}"


# --- helpers the notebooks share -----------------------------------------------------------------------------
def pareto_lines(records: list[dict], x: str = "l0", y: str = "mse") -> dict[str, list[tuple[float, float]]]:
    """{label: [(x, y), ...] sorted by x}: one curve per SAE family (topk, relu, gated, switch-N)."""
    lines: dict[str, list[tuple[float, float]]] = {}
    for r in records:
        if r.get(x) is None or r.get(y) is None:
            continue
        lines.setdefault(r["label"], []).append((float(r[x]), float(r[y])))
    return {k: sorted(v) for k, v in sorted(lines.items(), key=lambda kv: _label_order(kv[0]))}


def _label_order(label: str) -> tuple[int, int]:
    order = {"relu": 0, "gated": 1, "topk": 2}
    if label in order:
        return (order[label], 0)
    return (3, int(label.split("-")[1]) if "-" in label else 0)


def interpolate_at(points: list[tuple[float, float]], x: float) -> float | None:
    """y of a piecewise-linear curve at x in log-x (None outside its range): compare curves at equal L0."""
    pts = sorted(points)
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= x <= x1 and x1 > x0:
            t = (math.log(x) - math.log(x0)) / (math.log(x1) - math.log(x0))
            return y0 + t * (y1 - y0)
    return next((y for xx, y in pts if xx == x), None)


def steps_to_reach(curve: dict[str, list], target: float) -> float | None:
    """First step (linearly interpolated) at which a held-out MSE curve reaches `target`; None if never."""
    steps, mses = curve["step"], curve["mse"]
    for i, (s, m) in enumerate(zip(steps, mses)):
        if m <= target:
            if i == 0:
                return float(s)
            s0, m0 = steps[i - 1], mses[i - 1]
            return s0 + (s - s0) * (m0 - target) / (m0 - m) if m0 != m else float(s)
    return None


# --- the paper's numbers and its claims, checked on a results table ---------------------------------------------
PAPER_CSV = "paper_gpt2_layer8.csv"


def paper_reference() -> list[dict[str, Any]]:
    """The paper's final numbers (GPT-2 small layer 8; data/paper_gpt2_layer8.csv) as records with
    the same keys as ours: setting, label, n_experts, k, l0 (= k: TopK-style SAEs), mse, loss_recovered."""
    import csv

    path = project_root() / "data" / PAPER_CSV
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    out = []
    for r in rows:
        n = int(r["n_experts"])
        out.append({
            "setting": r["setting"], "arch": r["arch"], "n_experts": n, "n_features": int(r["n_features"]),
            "label": f"switch-{n}" if r["arch"] == "switch" else r["arch"], "k": int(r["k"]), "l0": float(r["k"]),
            "mse": float(r["mse"]), "loss_recovered": float(r["loss_recovered"]), "steps": int(r["steps"]),
        })
    return out


def compare_families(lines: dict, a: str, b: str, higher_is_better: bool = False) -> tuple[int, int]:
    """(points of family `a` better than family `b` at equal L0, points compared). `b` is
    interpolated (log L0) at each of `a`'s L0 values inside its range."""
    if a not in lines or b not in lines:
        return 0, 0
    wins = n = 0
    for x, ya in lines[a]:
        yb = interpolate_at(lines[b], x)
        if yb is None:
            continue
        n += 1
        wins += (ya > yb) if higher_is_better else (ya < yb)
    return wins, n


def _claim(claim: str, results: list[tuple[int, int]]) -> dict[str, Any]:
    wins = sum(w for w, _ in results)
    n = sum(c for _, c in results)
    held = None if n == 0 else wins == n
    return {"claim": claim, "held": held, "wins": wins, "compared": n}


def ordering_checks(records: list[dict], setting: str) -> list[dict[str, Any]]:
    """The paper's qualitative claims for `setting` ('fixed_width' or 'flop_matched') evaluated on the
    records (ours or `paper_reference()`), for MSE and for CE loss recovered. Each check:
    {'claim', 'metric', 'held' (True / False / None = nothing comparable), 'wins', 'compared'}."""
    recs = select(records, ["baseline", setting])
    switch = sorted({r["n_experts"] for r in recs if r["arch"] == "switch"})
    sw = [f"switch-{n}" for n in switch]
    checks = []
    for metric, higher in (("mse", False), ("loss_recovered", True)):
        lines = pareto_lines(recs, "l0", metric)
        pairs = []
        if setting == "fixed_width":
            pairs.append(("TopK beats every fixed-width Switch SAE", [compare_families(lines, "topk", s, higher) for s in sw]))
            pairs.append((f"fewer experts is better ({' > '.join(sw)})",
                          [compare_families(lines, a, b, higher) for a, b in zip(sw, sw[1:])]))
            if sw:
                pairs.append((f"the Switch SAE with the fewest experts ({sw[0]}) beats Gated",
                              [compare_families(lines, sw[0], "gated", higher)]))
            pairs.append(("every fixed-width Switch SAE beats ReLU", [compare_families(lines, s, "relu", higher) for s in sw]))
        else:
            pairs.append(("every FLOP-matched Switch SAE beats TopK", [compare_families(lines, s, "topk", higher) for s in sw]))
            pairs.append((f"more experts is better ({' < '.join(sw)})",
                          [compare_families(lines, b, a, higher) for a, b in zip(sw, sw[1:])]))
            pairs.append(("every FLOP-matched Switch SAE beats Gated and ReLU",
                          [compare_families(lines, s, base, higher) for s in sw for base in ("gated", "relu")]))
        for claim, results in pairs:
            checks.append({**_claim(claim, results), "metric": metric})
    return checks


def sample_efficiency(records: list[dict], k: int | None = None) -> dict[str, Any]:
    """TopK vs FLOP-matched Switch held-out MSE curves at one k (default: the middle k of the table):
    {'k', 'curves': [{'label', 'step', 'tokens', 'flops', 'mse', 'reach_step', 'reach_index'}],
     'target': TopK's final MSE, 'speedups': {label: TopK steps / Switch steps to reach target (None = never)}}.
    Training FLOPs = 3 x forward FLOPs per input x tokens (backward ~ 2x forward)."""
    recs = [r for r in select(records, ["baseline", "flop_matched"]) if r["arch"] in ("topk", "switch") and r["curve"]["step"]]
    ks = sorted({r["k"] for r in recs})
    if not ks:
        raise ValueError("no TopK / FLOP-matched Switch records with curves: run the flop_matched sweep first")
    k = k if k is not None else ks[len(ks) // 2]
    chosen = sorted([r for r in recs if r["k"] == k], key=lambda r: (r["arch"] != "topk", r["n_experts"]))
    topk = next((r for r in chosen if r["arch"] == "topk"), None)
    if topk is None:
        raise ValueError(f"no TopK record with k={k}")
    target = topk["curve"]["mse"][-1]
    topk_steps = steps_to_reach(topk["curve"], target)
    curves, speedups = [], {}
    for r in chosen:
        steps = r["curve"]["step"]
        reach = steps_to_reach(r["curve"], target)
        tokens = [s * r["batch_size"] for s in steps]
        curves.append({"label": r["label"], "step": steps, "tokens": tokens, "mse": r["curve"]["mse"],
                       "flops": [3 * t * r["flops_per_input"] for t in tokens], "reach_step": reach,
                       "reach_index": next((i for i, m in enumerate(r["curve"]["mse"]) if m <= target), None)})
        if r["arch"] == "switch":
            speedups[r["label"]] = (topk_steps / reach) if reach else None
    return {"k": k, "curves": curves, "target": target, "topk_steps": topk_steps, "speedups": speedups}
