"""Scaling laws (analysis.scaling): the power-law fit and its bootstrap, the multipliers at equal MSE, the
verdict's warnings, and the `scaling` grid of the sweep."""
import math

import numpy as np
import pytest

from switch_sae_core import sweep
from switch_sae_core.analysis import scaling
from switch_sae_core.profiles import PROFILES, Profile, get_profile
from switch_sae_core.keys import config_hash


def test_fit_recovers_a_known_exponent_and_the_bootstrap_covers_it():
    rng = np.random.default_rng(0)
    x = np.geomspace(1e9, 1e13, 12)
    mse = 30.0 * x**-0.27 * np.exp(rng.normal(0, 0.03, x.size))  # 3% multiplicative noise
    fit = scaling.fit_power_law(x, mse, "topk", seed=1)
    assert fit.b == pytest.approx(0.27, abs=0.02)
    assert fit.a == pytest.approx(30.0, rel=0.5)
    lo, hi = fit.b_interval
    assert lo < 0.27 < hi and hi - lo < 0.05  # covers the truth, and is not trivially wide
    assert fit.r2 > 0.97 and fit.quality == "ok"
    assert fit.x_at(float(fit.predict(1e11))) == pytest.approx(1e11, rel=1e-9)


def test_bootstrap_interval_covers_the_exponent_in_most_noisy_repeats():
    hits = 0
    for rep in range(40):
        rng = np.random.default_rng(100 + rep)
        x = np.geomspace(1e3, 1e6, 8)
        mse = 5.0 * x**-0.4 * np.exp(rng.normal(0, 0.1, x.size))
        lo, hi = scaling.fit_power_law(x, mse, seed=rep, n_boot=1000).b_interval
        hits += lo <= 0.4 <= hi
    assert hits >= 30  # a nominal 95% percentile interval; small-sample bootstraps under-cover somewhat


def test_exact_points_give_exact_fit():
    x = np.array([1e3, 1e4, 1e5, 1e6])
    fit = scaling.fit_power_law(x, 2.0 * x**-0.5)
    assert fit.b == pytest.approx(0.5, rel=1e-12) and fit.a == pytest.approx(2.0, rel=1e-9)
    assert fit.r2 == pytest.approx(1.0)
    assert fit.b_interval[0] == pytest.approx(0.5) and fit.b_interval[1] == pytest.approx(0.5)


def fit_of(a, b, label, x=(1e8, 1e12), n=6):
    xs = np.geomspace(*x, n)
    return scaling.fit_power_law(xs, a * xs**-b, label)


def test_multipliers_are_exact_on_constructed_fits():
    # equal exponents: Switch at a quarter of the constant needs (1/4)^(1/b) of TopK's X at every MSE
    topk, switch = fit_of(1.0, 0.5, "topk"), fit_of(0.25, 0.5, "switch-8")
    for mse in (1e-3, 1e-4, 1e-5):
        assert scaling.multiplier(switch, topk, mse)["value"] == pytest.approx(1 / 16, rel=1e-9)
    # different exponents: X_s / X_t = (a_s/m)^(1/b_s) / (a_t/m)^(1/b_t), computed by hand at m = 1e-2
    topk, switch = fit_of(2.0, 0.25, "topk"), fit_of(1.0, 0.5, "switch-8")
    expected = (1.0 / 1e-2) ** 2 / (2.0 / 1e-2) ** 4
    assert scaling.multiplier(switch, topk, 1e-2)["value"] == pytest.approx(expected, rel=1e-9)


def test_compare_to_topk_uses_the_overlap_of_the_mse_ranges():
    topk = fit_of(1.0, 0.5, "topk")  # MSE from 1e-4 to 1e-6
    switch = fit_of(0.25, 0.5, "switch-8")  # MSE from 2.5e-5 to 2.5e-7
    cmp = scaling.compare_to_topk({"topk": topk, "switch-8": switch})["switch-8"]
    assert cmp["inside"] and cmp["mse"] == pytest.approx(math.sqrt(2.5e-5 * 1e-6))
    assert cmp["value"] == pytest.approx(1 / 16)
    far = fit_of(1e-6, 0.5, "switch-64")  # MSE far below TopK's range: extrapolated
    assert not scaling.compare_to_topk({"topk": topk, "switch-64": far})["switch-64"]["inside"]


def points_of(labels_n_b_noise, seed=0):
    """Synthetic scaling points, {label: (n points, exponent, noise sd)}: MSE = 100 * (M / s)^-b at width M,
    with s = 2 for Switch (a Switch SAE of width 2M reconstructs like a TopK SAE of width M), while Switch-8
    costs 1/8 of TopK's FLOPs at equal width and the same parameters."""
    rng = np.random.default_rng(seed)
    pts = []
    for label, (n, b, sd) in labels_n_b_noise.items():
        switch = label != "topk"
        for w in 2 ** np.arange(10, 10 + n):
            flops = 1e6 * w / (8 if switch else 1)
            pts.append({"label": label, "mse": 100.0 * (w / (2 if switch else 1)) ** -b * math.exp(rng.normal(0, sd)),
                        "train_flops": flops, "n_params": 2 * 576 * int(w), "train_seconds": flops / 1e9,
                        "steps": 100, "tokens": 51200})
    return pts


def analysis_of(points):
    fits = {x: scaling.fit_all(points, x) for x in scaling.AXES}
    return scaling.ScalingAnalysis(points, fits, {x: scaling.compare_to_topk(f) for x, f in fits.items()})


def test_verdict_reports_too_few_points():
    text = analysis_of(points_of({"topk": (3, 0.2, 0.01), "switch-8": (3, 0.2, 0.01)})).verdict()
    assert "too few points" in text and "not conclusive" in text


def test_verdict_reports_a_poor_fit():
    pts = points_of({"topk": (6, 0.5, 0.0), "switch-8": (6, 0.5, 0.0)})
    for p, bump in zip(pts, [1, 3] * 6):  # a zigzag around a falling power law
        p["mse"] *= bump
    a = analysis_of(pts)
    assert a.fits["train_flops"]["topk"].b > 0 and a.fits["train_flops"]["topk"].r2 < scaling.MIN_R2
    assert "poor fit" in a.verdict() and "not conclusive" in a.verdict()


def test_verdict_reports_an_mse_that_does_not_fall():
    pts = points_of({"topk": (5, -0.1, 0.0), "switch-8": (5, 0.2, 0.0)})  # TopK gets worse with width
    a = analysis_of(pts)
    assert a.fits["train_flops"]["topk"].quality == "MSE does not fall"
    assert a.multipliers["train_flops"]["switch-8"]["value"] is None
    assert "not testable" in a.verdict()


def test_verdict_on_good_fits_states_the_multipliers_and_the_paper_comparison():
    a = analysis_of(points_of({"topk": (6, 0.2, 0.0), "switch-8": (6, 0.2, 0.0)}))
    text = a.verdict()
    assert "too few" not in text and "poor fit" not in text and "not conclusive" not in text
    # at equal MSE Switch-8 is twice as wide: 2x the parameters, 2/8 of the FLOPs
    assert a.multipliers["train_flops"]["switch-8"]["value"] == pytest.approx(1 / 4, rel=1e-6)
    assert a.multipliers["n_params"]["switch-8"]["value"] == pytest.approx(2, rel=1e-6)
    assert "fewer FLOPs at equal MSE held" in text and "more parameters at equal MSE held" in text
    assert "became a time saving" in text


def test_nearly_flat_fits_give_extreme_multipliers_not_errors():
    pts = points_of({"topk": (5, 1e-5, 0.0), "switch-8": (5, 0.3, 0.0)})
    a = analysis_of(pts)  # X_topk(m) = (a / m)^(1 / 1e-5): far beyond float range
    assert a.multipliers["train_flops"]["switch-8"]["value"] == 0.0
    assert "beyond float range" in a.verdict()


def test_verdict_without_records():
    assert "run `sweep.run_sweep" in analysis_of([]).verdict()


def test_fit_rejects_unusable_points():
    with pytest.raises(ValueError, match="same X"):
        scaling.fit_power_law([5.0, 5.0, 5.0], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="positive"):
        scaling.fit_power_law([1.0, 2.0], [1.0, 0.0])


def test_training_flops_are_three_times_the_forward():
    rec = {"flops_per_input": 1000, "steps": 10, "batch_size": 64}
    assert scaling.training_flops(rec) == 3 * 1000 * 640


# --- the grid ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(PROFILES))
def test_scaling_grid_follows_the_profile(name):
    p = get_profile(name)
    d = 576
    cfgs = sweep.grid_configs(p, "scaling", d_in=d)
    topk = [c for c in cfgs if c.arch == "topk"]
    assert sorted(c.n_features for c in topk) == sorted(p.scaling_widths)
    assert {c.k for c in cfgs} == {p.scaling_k}
    for n in p.scaling_experts:  # Switch-N exactly at the widths where every expert holds >= 2k features
        got = sorted(c.n_features for c in cfgs if c.arch == "switch" and c.n_experts == n)
        assert got == [m for m in sorted(p.scaling_widths) if m // n >= 2 * p.scaling_k]
    assert {c.arch for c in cfgs} == {"topk", "switch"}


def test_scaling_grid_widths_per_profile():
    assert get_profile("paper").scaling_widths == get_profile("gpu").scaling_widths == tuple(2**i for i in range(12, 18))
    assert get_profile("cpu").scaling_widths == tuple(2**i for i in range(10, 16))  # the CPU widths
    assert Profile().scaling_widths == tuple(2**i for i in range(10, 16))  # the default: the CPU widths
    assert len(get_profile("ci").scaling_widths) == 3
    ci = sweep.grid_configs(get_profile("ci"), "scaling", d_in=576)
    assert sum(c.arch == "switch" for c in ci) >= 2  # CI exercises a Switch fit too
    small = Profile(scaling_widths=(256, 1024, 4096), scaling_experts=(8, 64), scaling_k=32)
    got = {(c.arch, c.n_experts, c.n_features) for c in sweep.grid_configs(small, "scaling", d_in=64)}
    assert got == {("topk", 1, 256), ("topk", 1, 1024), ("topk", 1, 4096),
                   ("switch", 8, 1024), ("switch", 8, 4096), ("switch", 64, 4096)}


def test_scaling_points_keep_only_sae_trained_as_the_grid_trains_them():
    # a scaling SAE trained for another number of steps (an older, shorter budget), seed or lr must not join the fit
    p = get_profile("cpu")
    jobs = sweep.grid_jobs(p, "scaling", d_in=576)

    def record(cfg, train, mse):
        return {"key": config_hash(cfg, train, p.data), "sae_config": cfg.to_dict(), "label": "x", "arch": cfg.arch,
                "n_experts": cfg.n_experts, "n_features": cfg.n_features, "mse": mse, "flops_per_input": 1,
                "n_params": 1, "train_seconds": 1.0, "steps": train.steps, "batch_size": train.batch_size}

    (cfg, train), (other_cfg, other_train) = jobs[0], jobs[1]
    records = [record(cfg, train, 1.0), record(cfg, train.replace(steps=train.steps // 6), 2.0),
               record(other_cfg, other_train.replace(seed=7), 3.0), record(other_cfg, other_train.replace(lr_scale=1), 4.0)]
    points = scaling.scaling_points(records, p)
    assert [pt["mse"] for pt in points] == [1.0]
    assert points[0]["steps"] == train.steps
