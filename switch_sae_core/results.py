"""The results table: one record (a flat dict) per trained SAE, its key, and the JSONL file.

- A record's key is `keys.config_hash` of its (SAE, train, data) configs. The data's content (the activation
  cache's `content_digest`: corpus and model files) is in `data_content` and in `run_fingerprint`: a record of data
  since edited does not count (`record_matches`; docs/guarantees.md).
- The table is `data/results/<profile>/records.jsonl`, one JSON line per record, appended as each SAE
  finishes (a killed sweep loses at most the line being written, cut off by the next append). `load_records` returns the dicts,
  `records_frame` a pandas DataFrame, `profile_records` the latest record per key of a profile's
  current settings.
- `record.Record` is the schema (typed, with its JSON round trip) and `make_record` fills it: every record carries
  its full configs, its held-out numbers, its held-out MSE curve (sample efficiency) and the git commit.
- Names: `sae_label` ('switch-16'), `sae_name` ('switch-16_M4608_k32'), `setting_of` ('baseline',
  'fixed_width', 'flop_matched') and `pareto_lines` (one curve per family, for figures and claims).
"""
from __future__ import annotations

import json
import os
import subprocess
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import torch

from . import durable
from .config import DataConfig, SAEConfig, TrainConfig
from .heldout import reconstruction_metrics
from .errors import SwitchSAEError
from .keys import json_default, run_fingerprint
from .paths import RESULTS_ENV, project_root, results_root
from .profiles import Profile
from .record import Record

RESULTS_FILE = "records.jsonl"
TABLE_COLUMNS = ["name", "setting", "k", "l1_coeff", "l0", "mse", "fvu", "loss_recovered", "delta_ce", "kl", "dead_fraction",
                 "flops_per_input", "train_seconds"]  # the columns a notebook shows


# --- names ------------------------------------------------------------------------------------------------
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


def sae_label(cfg: SAEConfig) -> str:
    """Short human name: 'topk', 'relu', 'switch-16', ... (the legend entry of a curve)."""
    if cfg.arch != "switch":
        return cfg.arch
    routing = (f"-top{cfg.top_e}" if cfg.top_e > 1 else "") + ("-shared" if cfg.shared_expert else "")
    scale = ("-global" if cfg.global_topk else "") + ("-fscale" if cfg.feature_scaling else "")  # Scale SAE options
    return f"switch-{cfg.n_experts}{routing}{scale}"


def sae_name(cfg: SAEConfig) -> str:
    """Unique name within a grid: 'switch-16_M4608_k32', 'relu_M4608_l1-2.5'."""
    sparsity = (f"k{cfg.k}" if cfg.arch in ("topk", "switch", "batchtopk")
                else f"l0-{cfg.l1_coeff:g}" if cfg.arch == "jumprelu" else f"l1-{cfg.l1_coeff:g}")
    return f"{sae_label(cfg)}_M{cfg.n_features}_{sparsity}"



# --- the table ------------------------------------------------------------------------------------------
def record_matches(record: dict[str, Any], train_cfg: TrainConfig, data_cfg: DataConfig,
                   data_content: str | None) -> bool:
    """Whether `record` was trained with these settings on this data. A record that did not record its data's
    content (written before it was recorded) matches on the settings; `data_content=None` (not known here)
    accepts any content."""
    recorded = record.get("data_content")
    if record.get("run_fingerprint") != run_fingerprint(train_cfg, data_cfg, recorded):
        return False
    return data_content is None or recorded is None or recorded == data_content


def current_data_content(data_cfg: DataConfig) -> str | None:
    """The content digest of the activations `data_cfg` gives here, or None where it cannot be computed (the
    corpus or model files are not installed: a table is then read without the content check)."""
    from .data.identity import content_digest

    try:
        return content_digest(data_cfg)
    except (SwitchSAEError, OSError):
        return None


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
    """Append one record as a JSON line (one write, fsynced: a killed sweep loses at most this line). Appenders
    take turns on the table's lock file, so a last line without its newline is one torn by a kill or a full
    disk, never one being written: it is cut off before appending (its SAE has no record, so the next sweep
    records it again) and the table stays readable."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = (json.dumps(record, sort_keys=True, default=json_default) + "\n").encode()
    with durable.FileLock(path.with_name(f".{path.name}.lock")), durable.disk_full_guard(path.parent, len(data)):
        with open(path, "r+b" if path.exists() else "w+b", buffering=0) as f:  # unbuffered: nothing left to flush
            size = f.seek(0, os.SEEK_END)
            if size:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    _cut_torn_line(f, path, size)
            size = f.seek(0, os.SEEK_END)
            try:
                written = 0
                while written < len(data):
                    written += f.write(data[written:])
                os.fsync(f.fileno())
            except BaseException:  # a full disk (or a signal) mid-line: leave the table as it was
                f.truncate(size)
                raise


def _cut_torn_line(f, path: Path, size: int) -> None:
    """Truncate the file `f` (of `size` bytes) after its last newline, saying so in one line."""
    start = max(0, size - (1 << 20))
    f.seek(start)
    tail = f.read()
    if b"\n" not in tail and start > 0:  # a torn line longer than the tail read: the whole file
        start, _ = 0, f.seek(0)
        tail = f.read()
    keep = start + tail.rfind(b"\n") + 1  # 0 when the file holds no whole line
    f.truncate(keep)
    warnings.warn(f"{path}: removed a last line torn by a kill or a full disk ({size - keep} bytes); its SAE is "
                  "recorded again by the next sweep", stacklevel=3)


def load_records(path: str | Path) -> list[dict[str, Any]]:
    """All records of a results file ([] if it does not exist). A torn line (a write cut off by a kill or a
    full disk: a record's beginning without its closing brace, last or, from versions that appended after
    one, anywhere) is skipped with a warning; any other invalid line is an error."""
    path = Path(path)
    if not path.is_file():
        return []
    lines = path.read_text(errors="replace").splitlines()
    records, torn = [], []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i == len(lines) - 1 or not line.rstrip().endswith("}"):
                torn.append(i + 1)
                continue
            raise ResultsError(f"{path}:{i + 1} is not valid JSON ({e}); delete that line to continue") from None
    if torn:
        warnings.warn(f"{path}: skipped {len(torn)} line(s) torn by a kill or a full disk (line {torn}); their SAEs "
                      "are recorded again by the next sweep", stacklevel=2)
    warn_if_inconsistent(records, path)
    return records


CURVE_MSE_TOL = 0.01  # a record's final held-out MSE and its curve's last point may differ by this (relative)


class ResultsWarning(UserWarning):
    """A results table whose numbers disagree with each other (see `inconsistent_records`)."""


def inconsistent_records(records: list[dict[str, Any]], tol: float = CURVE_MSE_TOL) -> list[dict[str, Any]]:
    """The latest record per key that gives two final held-out MSEs: its `mse` and its curve's point at its
    last step differ by more than `tol` (relative). Records made before the curve was taken on the table's
    held-out rows (no `curve_rows`) do: notebook 03 would read one number and notebooks 01-02 the other."""
    latest = {r.get("key"): r for r in records}
    bad = []
    for r in latest.values():
        curve = r.get("curve") or {}
        steps, mses = curve.get("step") or [], curve.get("mse") or []
        if steps and mses and steps[-1] == r.get("steps") and r.get("mse"):
            if abs(mses[-1] - r["mse"]) > tol * abs(r["mse"]):
                bad.append(r)
    return bad


def warn_if_inconsistent(records: list[dict[str, Any]], path: str | Path) -> None:
    """One loud line naming the records of `path` that give two final held-out MSEs (`inconsistent_records`)."""
    import warnings

    bad = inconsistent_records(records)
    if bad:
        names = ", ".join(f"{r.get('name')} seed {r.get('seed')} ({r['mse']:.5g} vs {r['curve']['mse'][-1]:.5g}"
                          f"{'' if r.get('curve_rows') else ', curve on other held-out rows'})" for r in bad)
        warnings.warn(f"{path}: {len(bad)} record(s) give two final held-out MSEs (table vs curve's last point, more "
                      f"than {CURVE_MSE_TOL:.0%} apart): {names}. Their sample-efficiency numbers disagree with the "
                      "table: delete their lines and their cached SAEs, then rerun the sweep to refresh them.",
                      ResultsWarning, stacklevel=3)


def delta_ce(record: dict[str, Any]) -> Optional[float]:
    """ΔCE in nats per token: CE with the SAE spliced in minus the clean CE (`loss_recovered` divides it by
    CE_zero - CE_clean, near ln(vocab) for a small model: a lenient scale, so both are reported). The record's
    `delta_ce`, else its two CE columns (records written before it was stored), else None (no LM evaluation)."""
    if record.get("delta_ce") is not None:
        return float(record["delta_ce"])
    if record.get("ce_sae") is None or record.get("ce_clean") is None:
        return None
    return float(record["ce_sae"]) - float(record["ce_clean"])


def records_frame(records: list[dict[str, Any]]):
    """The records as a pandas DataFrame (configs and curves stay as dict/list columns), with `delta_ce` for
    every record (`delta_ce`)."""
    import pandas as pd

    df = pd.DataFrame.from_records(records)
    if len(df):
        df["delta_ce"] = pd.to_numeric(pd.Series([delta_ce(r) for r in records], index=df.index, dtype=object))
    return df


def records_table(records: list[dict[str, Any]]):
    """The results table as notebooks 01-02 show it: TABLE_COLUMNS, one row per SAE sorted by setting and name,
    4 decimals."""
    return records_frame(records)[TABLE_COLUMNS].sort_values(["setting", "name"]).round(4)


def profile_records(profile: Profile, root: str | Path | None = None, all_seeds: bool = False,
                    steps_factor: int = 1, any_steps: bool = False) -> list[dict[str, Any]]:
    """Records of `profile` trained with its CURRENT train and data settings, latest per config hash: those of
    the profile's own seed, or of every seed (`all_seeds`, grid "seeds"); `steps_factor=2`: the SAEs trained
    twice as long (grid "convergence"); `any_steps`: at every number of steps (grid "schedules" beside the others).
    A record carrying the content digest of other data (corpus or model files edited since) is left out."""
    train = profile.train.replace(steps=profile.train.steps * steps_factor)
    content = current_data_content(profile.data)

    def matches(r: dict) -> bool:
        seed = r.get("seed") if all_seeds else train.seed
        steps = r.get("steps") if any_steps else train.steps
        return (seed is not None and steps is not None
                and record_matches(r, train.replace(seed=seed, steps=steps), profile.data, content))

    latest: dict[str, dict] = {}
    for r in load_records(results_path(profile, root)):
        if matches(r):
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


# --- the record ------------------------------------------------------------------------------------------
def make_record(profile: Profile, cfg: SAEConfig, sae, info: dict, heldout_BD: torch.Tensor,
                evaluator: Optional[Callable[[torch.nn.Module], dict[str, float]]] = None) -> dict[str, Any]:
    """One row of the results table (the schema): what the SAE is, how it was trained, its held-out
    numbers (`heldout.reconstruction_metrics` on `heldout_BD`), its CE/KL numbers (`evaluator`, if
    given), its held-out MSE curve (from `info`, see cache.train_or_load) and provenance."""
    base_m = baseline_width(profile, int(heldout_BD.shape[1]))
    t0 = time.perf_counter()
    rec = reconstruction_metrics(sae, heldout_BD)
    lm = evaluator(sae) if evaluator is not None else {}
    eval_seconds = time.perf_counter() - t0
    flops = sae.flops_per_input()
    hist = info.get("history") or {}
    train_cfg = profile.train
    return Record(
        key=info["key"],
        run_fingerprint=run_fingerprint(train_cfg, profile.data, info.get("data_content")),
        data_content=info.get("data_content"),  # data.store.content_digest of the activations it was trained on
        profile=profile.name,
        name=sae_name(cfg),
        label=sae_label(cfg),
        setting=setting_of(cfg, base_m),
        arch=cfg.arch,
        n_experts=cfg.n_experts,
        n_features=cfg.n_features,
        expert_width=cfg.expert_width,
        k=cfg.k if cfg.arch in ("topk", "switch", "batchtopk") else None,
        l1_coeff=cfg.l1_coeff if cfg.arch in ("relu", "gated", "jumprelu") else None,
        steps=train_cfg.steps,
        batch_size=train_cfg.batch_size,
        tokens=train_cfg.steps * train_cfg.batch_size,
        **rec,
        loss_recovered=lm.get("loss_recovered"),
        kl=lm.get("kl"),
        ce_clean=lm.get("ce_clean"),
        ce_sae=lm.get("ce_sae"),
        ce_zero=lm.get("ce_zero"),
        delta_ce=delta_ce(lm),
        dead_fraction=_float_or_none(hist.get("dead_frac", rec["dead_fraction_heldout"])),
        flops_per_input=int(flops["total"]),
        flops={k: int(v) for k, v in flops.items()},
        n_params=int(sae.n_params),
        train_seconds=info.get("train_seconds"),  # the whole run's, a continued run's shared steps included
        continued_from_step=info.get("continued_from_step"),  # trained on from a shorter run's decay start (cache.py)
        eval_seconds=eval_seconds,
        curve=info.get("curve", {"step": [], "mse": []}),
        curve_rows=info.get("curve_rows"),  # held-out rows of the curve (= of `mse` since the one-definition fix)
        seed=train_cfg.seed,
        git_commit=git_commit(),
        sae_config=cfg.to_dict(),
        train_config=train_cfg.to_dict(),
        data_config=profile.data.to_dict(),
        finished_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    ).to_json()


def _float_or_none(v: Any) -> float | None:
    try:
        return None if v is None else float(v)
    except (TypeError, ValueError):
        return None



# --- views -----------------------------------------------------------------------------------------------
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
