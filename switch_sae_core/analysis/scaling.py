"""Scaling laws (notebook 07): held-out MSE against training compute, parameters and wall-clock time for
TopK and Switch SAEs of the `scaling` grid, a power law per architecture, and Switch-vs-TopK multipliers.

Definitions:
- training FLOPs of a record = 3 x `flops_per_input` x tokens trained on (steps x batch_size). The factor 3
  is the usual forward + backward estimate (Kaplan et al. 2020, "Scaling Laws for Neural Language
  Models", C ~ 6N per token = 2N forward + 4N backward): each matmul's backward computes the gradients of
  both its inputs and its weights, two matmuls of the forward's size. It is the same convention as
  `checks.sample_efficiency`. Not counted: the top-k selection, Adam's update, the decoder renormalisation.
- a fit is the power law MSE = a * X^-b by least squares on (log X, log MSE); R^2 is measured in that
  log-log space; the exponent's uncertainty is a 95% percentile interval over a bootstrap that resamples
  the points with replacement.
- the multiplier of X at equal MSE m (Switch vs TopK) = X_switch(m) / X_topk(m), with X(m) = (a / m)^(1/b)
  from each fit: < 1 means the Switch SAE needs less of X than TopK to reach m. m is the geometric middle
  of the MSE range both architectures reached (extrapolated, and said so, when the ranges do not overlap).
- wall-clock per step = train_seconds / steps of the record (includes the held-out evaluations of the
  sample-efficiency curve and whatever else ran on the machine).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import numpy as np

FORWARD_BACKWARD = 3  # training FLOPs per input = 3 x forward FLOPs (Kaplan et al. 2020: 2N forward + 4N backward)
TABLE_COLUMNS = ["label", "n_features", "mse", "train_flops", "n_params", "train_seconds", "seconds_per_step"]  # `table()`
MIN_POINTS = 4  # fewer points than this: the fit has < 2 degrees of freedom, the verdict says "too few points"
MIN_R2 = 0.9  # a fit with R^2 (log-log) below this is called a poor fit
N_BOOT = 2000  # bootstrap resamples
AXES = {  # x columns of a scaling point -> axis label
    "train_flops": "training FLOPs (3 x forward)",
    "n_params": "parameters",
    "train_seconds": "training wall-clock (s)",
}
PAPER_STATEMENT = ("Switch SAEs reach a given MSE with several times fewer training FLOPs than TopK, "
                   "but need more parameters than TopK for the same MSE")


def training_flops(record: dict[str, Any]) -> float:
    """FLOPs spent training the SAE of a results record: 3 x forward FLOPs per input x tokens."""
    return float(FORWARD_BACKWARD * record["flops_per_input"] * record["steps"] * record["batch_size"])


def scaling_points(records: list[dict[str, Any]], profile) -> list[dict[str, Any]]:
    """One row per record of the profile's `scaling` grid as the profile trains it now (matched by the record's
    config key: SAE, training and data; records of other grids, or of the grid trained on another budget, are
    left out): {'label', 'arch', 'n_experts', 'n_features', 'mse', 'train_flops', 'n_params', 'train_seconds',
    'seconds_per_step', 'steps', 'tokens'}, sorted by label then width."""
    from ..keys import config_hash
    from ..sweep import grid_jobs

    keys = {config_hash(c, t, profile.data) for d in {r["sae_config"]["d_in"] for r in records}
            for c, t in grid_jobs(profile, "scaling", d)}
    rows = []
    for r in records:
        if r["key"] not in keys:
            continue
        secs = r.get("train_seconds")
        rows.append({"label": r["label"], "arch": r["arch"], "n_experts": r["n_experts"], "n_features": r["n_features"],
                     "mse": float(r["mse"]), "train_flops": training_flops(r), "n_params": int(r["n_params"]),
                     "train_seconds": None if secs is None else float(secs),
                     "seconds_per_step": None if secs is None else float(secs) / r["steps"],
                     "steps": r["steps"], "tokens": r["steps"] * r["batch_size"]})
    return sorted(rows, key=lambda p: (p["arch"] != "topk", p["n_experts"], p["n_features"]))


@dataclasses.dataclass
class PowerLawFit:
    """MSE = a * X^-b fitted on `n` points (log-log least squares)."""

    label: str
    x: str  # column of the scaling points: 'train_flops', 'n_params' or 'train_seconds'
    n: int  # points fitted
    a: float
    b: float  # the exponent: MSE falls as X^-b
    r2: float  # coefficient of determination in log-log space (nan for n < 3: a line through 2 points)
    b_interval: Optional[tuple[float, float]]  # 95% bootstrap percentile interval of b (None for n < 3)
    boot_log_a_b: np.ndarray  # (n_boot, 2) the bootstrap fits (log a, b); empty for n < 3
    x_range: tuple[float, float]
    mse_range: tuple[float, float]

    @property
    def quality(self) -> str:
        """'ok', 'too few points' (n < MIN_POINTS), 'MSE does not fall' (b <= 0) or 'poor fit' (R^2 < MIN_R2)."""
        if self.n < MIN_POINTS:
            return "too few points"
        if self.b <= 0:
            return "MSE does not fall"
        return "poor fit" if not self.r2 >= MIN_R2 else "ok"

    def predict(self, x: np.ndarray | float) -> np.ndarray:
        return self.a * np.asarray(x, dtype=float) ** -self.b

    def x_at(self, mse: float) -> Optional[float]:
        """X at which the fit reaches `mse` (inf beyond float range); None when the fit does not fall with
        X (b <= 0)."""
        log_x = _log_x_at(math.log(self.a), self.b, mse)
        return None if np.isnan(log_x) else float(_exp(log_x))


def _log_x_at(log_a, b, mse: float):
    """log X where a * X^-b = mse; nan where b <= 0 (elementwise on arrays)."""
    b = np.asarray(b, dtype=float)
    return np.where(b > 0, (np.asarray(log_a) - math.log(mse)) / np.where(b > 0, b, 1.0), np.nan)


def _exp(v):
    with np.errstate(over="ignore"):  # an exponent near 0 puts X(m) beyond float range: inf, not an error
        return np.exp(v)


def _line(lx: np.ndarray, ly: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares (intercept, slope) of ly on lx along the last axis (vectorised over resamples);
    nan where all lx of a resample are equal."""
    mx, my = lx.mean(-1, keepdims=True), ly.mean(-1, keepdims=True)
    var = ((lx - mx) ** 2).sum(-1)
    slope = np.where(var > 0, ((lx - mx) * (ly - my)).sum(-1) / np.where(var > 0, var, 1.0), np.nan)
    return my[..., 0] - slope * mx[..., 0], slope


def fit_power_law(x, mse, label: str = "", x_name: str = "train_flops", n_boot: int = N_BOOT,
                  seed: int = 0) -> PowerLawFit:
    """Fit MSE = a * X^-b (least squares on log X, log MSE) and bootstrap the exponent over the points.

    Raises ValueError if fewer than 2 points, a non-positive value, or all X equal."""
    x, mse = np.asarray(x, dtype=float), np.asarray(mse, dtype=float)
    if len(x) != len(mse) or len(x) < 2:
        raise ValueError(f"{label or 'fit'}: need >= 2 (X, MSE) points of equal count, got {len(x)} and {len(mse)}")
    if (x <= 0).any() or (mse <= 0).any():
        raise ValueError(f"{label or 'fit'}: X and MSE must be positive for a log-log fit")
    if np.ptp(x) == 0:
        raise ValueError(f"{label or 'fit'}: all points have the same X={x[0]:g}; a power law needs several")
    lx, ly = np.log(x), np.log(mse)
    log_a, slope = _line(lx, ly)
    resid = ly - (log_a + slope * lx)
    ss_tot = ((ly - ly.mean()) ** 2).sum()
    r2 = float(1 - (resid**2).sum() / ss_tot) if len(x) > 2 and ss_tot > 0 else float("nan")
    boot, interval = np.empty((0, 2)), None
    if len(x) > 2:
        idx = np.random.default_rng(seed).integers(0, len(x), size=(n_boot, len(x)))
        b_log_a, b_slope = _line(lx[idx], ly[idx])
        ok = ~np.isnan(b_slope)  # resamples that drew a single X carry no slope
        boot = np.stack([b_log_a[ok], -b_slope[ok]], axis=1)
        interval = (float(np.percentile(boot[:, 1], 2.5)), float(np.percentile(boot[:, 1], 97.5)))
    return PowerLawFit(label=label, x=x_name, n=len(x), a=float(math.exp(log_a)), b=float(-slope), r2=r2,
                       b_interval=interval, boot_log_a_b=boot, x_range=(float(x.min()), float(x.max())),
                       mse_range=(float(mse.min()), float(mse.max())))


def fit_all(points: list[dict[str, Any]], x: str, seed: int = 0) -> dict[str, PowerLawFit]:
    """{label: fit of MSE vs column `x`} for every architecture with >= 2 distinct X values."""
    fits = {}
    for i, label in enumerate(dict.fromkeys(p["label"] for p in points)):
        pts = [p for p in points if p["label"] == label and p.get(x) is not None]
        if len({p[x] for p in pts}) >= 2:  # each architecture its own resampling stream: independent bootstraps
            fits[label] = fit_power_law([p[x] for p in pts], [p["mse"] for p in pts], label, x, seed=seed + i)
    return fits


def reference_mse(a: PowerLawFit, b: PowerLawFit) -> tuple[float, bool]:
    """(MSE at which to compare two fits, whether it lies inside both fits' observed MSE ranges): the
    geometric middle of the overlap of the ranges, else of the union (then it is an extrapolation)."""
    lo, hi = max(a.mse_range[0], b.mse_range[0]), min(a.mse_range[1], b.mse_range[1])
    if lo <= hi:
        return math.sqrt(lo * hi), True
    lo, hi = min(a.mse_range[0], b.mse_range[0]), max(a.mse_range[1], b.mse_range[1])
    return math.sqrt(lo * hi), False


def multiplier(switch: PowerLawFit, topk: PowerLawFit, mse: float) -> dict[str, Any]:
    """X_switch(mse) / X_topk(mse) from the two fits, and a 95% interval from pairing their bootstrap fits:
    {'value' (None if a fit does not fall with X), 'interval' (None without bootstraps)}."""
    log_ratio = _log_x_at(math.log(switch.a), switch.b, mse) - _log_x_at(math.log(topk.a), topk.b, mse)
    value = None if np.isnan(log_ratio) else float(_exp(log_ratio))
    interval = None
    n = min(len(switch.boot_log_a_b), len(topk.boot_log_a_b))
    if n:
        s, t = switch.boot_log_a_b[:n], topk.boot_log_a_b[:n]
        r = _log_x_at(s[:, 0], s[:, 1], mse) - _log_x_at(t[:, 0], t[:, 1], mse)
        r = r[~np.isnan(r)]
        if len(r):
            interval = (float(_exp(np.percentile(r, 2.5))), float(_exp(np.percentile(r, 97.5))))
    return {"value": value, "interval": interval}


def compare_to_topk(fits: dict[str, PowerLawFit]) -> dict[str, dict[str, Any]]:
    """{switch label: {'mse', 'inside', 'value', 'interval'}}: each Switch fit's multiplier of X at equal
    MSE against the TopK fit (empty without a TopK fit)."""
    if "topk" not in fits:
        return {}
    out = {}
    for label, fit in fits.items():
        if label != "topk":
            mse, inside = reference_mse(fit, fits["topk"])
            out[label] = {"mse": mse, "inside": inside, **multiplier(fit, fits["topk"], mse)}
    return out


@dataclasses.dataclass
class ScalingAnalysis:
    """Everything notebook 07 shows: the points, the fits per axis and the multipliers per axis."""

    points: list[dict[str, Any]]
    fits: dict[str, dict[str, PowerLawFit]]  # {axis: {label: fit}}
    multipliers: dict[str, dict[str, dict[str, Any]]]  # {axis: {switch label: multiplier}}

    def verdict(self) -> str:
        return verdict(self)

    def table(self):
        """The points as a pandas DataFrame: one row per SAE, TABLE_COLUMNS."""
        import pandas as pd

        return pd.DataFrame(self.points)[TABLE_COLUMNS]


def analyse(records: list[dict[str, Any]], profile, seed: int = 0) -> ScalingAnalysis:
    """Scaling points of the profile's `scaling` grid, power-law fits on every axis, multipliers vs TopK."""
    points = scaling_points(records, profile)
    fits = {x: fit_all(points, x, seed) for x in AXES}
    return ScalingAnalysis(points, fits, {x: compare_to_topk(f) for x, f in fits.items()})


# --- the "what we see" text -----------------------------------------------------------------------------------
def _interval(iv: Optional[tuple[float, float]], fmt: str = "{:.2f}") -> str:
    return "" if iv is None else " [" + ", ".join(fmt.format(v) for v in iv) + "]"


def _fit_line(fit: PowerLawFit) -> str:
    r2 = "n/a" if math.isnan(fit.r2) else f"{fit.r2:.3f}"
    note = "" if fit.quality == "ok" else f" — **{fit.quality}**"
    return f"{fit.label}: b = {fit.b:.3f}{_interval(fit.b_interval, '{:.3f}')}, R² {r2}, {fit.n} points{note}"


def _mult_text(m: dict[str, Any], what: str) -> str:
    if m["value"] is None:
        return f"{what}: undefined (a fit does not fall with this axis)"
    v = m["value"]
    if not 0 < v < math.inf:
        return f"{what}: beyond float range (a fit barely falls with this axis)"
    rel = f"{1 / v:.1f}x fewer" if v < 1 else f"{v:.1f}x more"
    return f"{v:.2f}x TopK's {what} ({rel}){_interval(m['interval'])}"


def verdict(analysis: ScalingAnalysis) -> str:
    """Markdown: the fits, the Switch-vs-TopK multipliers at equal MSE, and how they compare with the
    paper's statement, with every fit that is too short or poor named as such."""
    pts = analysis.points
    if not pts:
        return "No records of the `scaling` grid: run `sweep.run_sweep(profile, ['scaling'])` first."
    lines = [f"**Fits** MSE = a·X^-b (log-log least squares; [95% bootstrap interval of b over the points]); "
             f"a fit is trusted with ≥ {MIN_POINTS} points and R² ≥ {MIN_R2}:"]
    for x, label in AXES.items():
        fits = analysis.fits[x]
        lines.append(f"- vs {label}: " + ("; ".join(_fit_line(f) for f in fits.values()) or "no architecture has 2 widths"))
    flops, params, secs = (analysis.multipliers[x] for x in AXES)
    if not flops:
        lines.append("\nNo TopK fit (or no Switch fit) to compare: the grid needs TopK and Switch records at ≥ 2 widths.")
        return "\n".join(lines)
    lines.append("\n**At equal held-out MSE** (Switch vs TopK, from the fits; [95% bootstrap interval]):")
    for label, fm in flops.items():
        where = "inside both measured MSE ranges" if fm["inside"] else "**extrapolated**: the MSE ranges do not overlap"
        parts = [_mult_text(fm, "training FLOPs")]
        if label in params:
            parts.append(_mult_text(params[label], "parameters"))
        if label in secs:
            parts.append(_mult_text(secs[label], "training seconds"))
        lines.append(f"- {label} at MSE {fm['mse']:.4g} ({where}): " + "; ".join(parts) + ".")
    lines.append(f"\n**Against the paper** ({PAPER_STATEMENT}):")
    for label, fm in flops.items():
        lines.append(f"- {label}: " + _against_paper(analysis, label))
    lines.append(f"\nEvery SAE here trained for {pts[0]['steps']} steps ({pts[0]['tokens']:,} tokens). A power law in "
                 "compute assumes each point is near its best MSE for its size; if the wider SAEs are further from "
                 "convergence at this budget, the curves flatten (or rise) and the exponents are smaller than converged SAEs would give.")
    return "\n".join(lines)


def _against_paper(analysis: ScalingAnalysis, label: str) -> str:
    """One sentence per Switch architecture: FLOP and parameter claims held / did not hold / not testable."""
    fits = analysis.fits
    weak = [f"{f.label} vs {AXES[x]} ({f.quality})" for x in ("train_flops", "n_params")
            for f in (fits[x].get(label), fits[x].get("topk")) if f is not None and f.quality != "ok"]
    fm, pm = analysis.multipliers["train_flops"][label], analysis.multipliers["n_params"].get(label)
    out = []
    if fm["value"] is None:
        out.append("not testable: a TopK or Switch fit does not fall with training FLOPs")
    else:
        v = fm["value"]
        held = "held" if v <= 0.5 else ("partly held (fewer FLOPs, but < 2x fewer)" if v < 1 else "did not hold")
        out.append(f"fewer FLOPs at equal MSE {held} ({v:.2f}x){_unresolved(fm, 1.0)}")
    if pm is not None and pm["value"] is not None:
        out.append(f"more parameters at equal MSE {'held' if pm['value'] > 1 else 'did not hold'} "
                   f"({pm['value']:.2f}x){_unresolved(pm, 1.0)}")
    if not fm["inside"]:
        out.append("the comparison extrapolates beyond the measured MSE range")
    if weak:
        out.append("**not conclusive**: " + ", ".join(weak))
    st = analysis.multipliers["train_seconds"].get(label)
    if st is not None and st["value"] is not None:
        out.append(f"in wall-clock the FLOP saving {'became' if st['value'] < 1 else 'did not become'} a time saving "
                   f"({st['value']:.2f}x TopK's seconds)")
    return "; ".join(out) + "."


def _unresolved(m: dict[str, Any], threshold: float) -> str:
    iv = m["interval"]
    if iv is not None and iv[0] < threshold < iv[1]:
        return f", but its interval{_interval(iv)} includes {threshold:g}: not resolved"
    return ""
