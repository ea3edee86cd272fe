"""Baselines tuned alike (issue 23 item 3): the validation split beside the held-out one, the lr search that chooses
on it alone, the frontier grids that train at the chosen lr, and equal-L0 comparisons in both directions."""
import math

import numpy as np
import pytest
import torch

from switch_sae_core import cache, checks, claims, heldout, keys, lr_search, results, sweep
from switch_sae_core.analysis import equal_l0
from switch_sae_core.config import ConfigError, DataConfig, TrainConfig
from switch_sae_core.data import lm
from switch_sae_core.data.store import ActivationStore
from switch_sae_core.data.synthetic import SyntheticConfig, SyntheticSource
from switch_sae_core.profiles import FRONTIER_GRIDS, Profile, get_profile

pytestmark = pytest.mark.usefixtures("one_thread")
SCALES = (0.2, 1.0, 5.0)


def unit_profile() -> Profile:
    return Profile(
        name="unit", data=DataConfig(model="tiny-random", n_train_tokens=512, n_eval_tokens=64),
        train=TrainConfig(steps=20, batch_size=32, log_every=5, progress=False, geometric_median_batch=64),
        width_multiple=2, ks=(2, 4), claim_k=2, eval_every=5, n_heldout=128, n_validation=128, seeds=(0, 1, 2),
        lr_search_scales=SCALES, frontier_relu_l1_coeffs=(0.5, 2.0, 0.2, 0.1),
        frontier_jumprelu_l0_coeffs=(0.01, 0.05, 0.003, 0.001), jumprelu_sparsity_warmup_steps=5)


def synthetic_ctx(heldout_BD=None) -> sweep.SweepContext:
    source = SyntheticSource(SyntheticConfig(d_in=16, n_features=64, n_clusters=4, l0=3))
    held = heldout.heldout_activations(source, 128) if heldout_BD is None else heldout_BD
    return sweep.SweepContext(source, unit_profile().data, held)


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("SWITCH_SAE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv(lr_search.LR_SEARCH_ENV, str(tmp_path / "lr_search"))


# --- the validation split -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def store(tmp_path_factory):
    cfg = DataConfig(model="tiny-random", layer=1, context_len=32, n_train_tokens=256, n_eval_tokens=320,
                     model_batch_size=8, cache_dir=str(tmp_path_factory.mktemp("acts")))
    return ActivationStore.build_or_load(cfg, model=lm.load_model("tiny-random", device="cpu"), progress=False)


def test_validation_rows_come_after_the_held_out_rows_in_other_contexts(store):
    context_R = np.asarray(store.eval_rows[:, 0])
    n_held = 100
    assert context_R[n_held - 1] == context_R[n_held]  # the boundary cuts a context: its rest must be skipped
    first = int(np.flatnonzero(context_R > context_R[n_held - 1])[0])
    val = heldout.validation_activations(store, 40, n_held)
    held = heldout.heldout_activations(store, n_held)
    torch.testing.assert_close(val, store.eval_activations()[first:first + 40], rtol=0, atol=0)
    torch.testing.assert_close(held, store.eval_activations()[:n_held], rtol=0, atol=0)  # the reported rows: unchanged
    assert not set(context_R[first:first + 40]) & set(context_R[:n_held])  # no context, so no token, shared
    assert not (torch.cdist(val, held) == 0).any()


def test_a_too_small_eval_split_is_one_line_with_the_numbers(store):
    n_rows = len(store.eval_rows)
    context_R = np.asarray(store.eval_rows[:, 0])
    left = int((context_R > context_R[99]).sum())
    with pytest.raises(ConfigError) as e:
        heldout.validation_activations(store, left + 1, 100)
    msg = str(e.value)
    assert "\n" not in msg and f"{n_rows} rows" in msg and "first 100" in msg and f"only {left} are left" in msg
    assert "n_eval_tokens (now 320)" in msg
    assert heldout.validation_activations(store, left, 100).shape[0] == left  # exactly what is left: fine


def test_a_synthetic_sources_validation_batch_is_its_own_and_reproducible():
    source = SyntheticSource(SyntheticConfig(d_in=16, n_features=64, n_clusters=4, l0=3))
    val, held = heldout.validation_activations(source, 64, 64), heldout.heldout_activations(source, 64)
    assert not torch.equal(val, held) and torch.equal(val, heldout.validation_activations(source, 64, 64))


# --- the lr search ------------------------------------------------------------------------------------------------
def relu_objective_by_hand(sae, x):
    """ReLU's loss (Conerly et al.) written from its weights: sum-over-D squared error + l1 * sum z ||W_dec||."""
    z = (x @ sae.W_enc.T + sae.b_enc).relu()
    x_hat = z @ sae.W_dec + sae.b_dec
    return float((x - x_hat).pow(2).sum(-1).mean() + sae.cfg.l1_coeff * (z * sae.W_dec.norm(dim=-1)).sum(-1).mean())


def jumprelu_objective_by_hand(sae, x):
    """JumpReLU's loss at the full lambda: squared error + lambda * E||x||^2 (its input scale) * L0."""
    pre = x @ sae.W_enc.T + sae.b_enc
    on = pre > sae.log_threshold.exp()
    x_hat = (pre * on) @ sae.W_dec + sae.b_dec
    return float((x - x_hat).pow(2).sum(-1).mean()
                 + sae.cfg.l1_coeff * float(sae.input_scale) ** 2 * on.sum(-1).float().mean())


@pytest.mark.parametrize("family,by_hand", [("relu", relu_objective_by_hand), ("jumprelu", jumprelu_objective_by_hand)])
def test_the_search_chooses_the_lowest_validation_objective(family, by_hand):
    p, ctx = unit_profile(), synthetic_ctx()
    choice = lr_search.run_lr_search(p, family, ctx, log=lambda s: None)
    val = heldout.validation_activations(ctx.source, p.n_validation, p.n_heldout)
    cfg = sweep.claim_config(p, family, ctx.d_in, ctx.act_rms)
    reference = {}
    with torch.no_grad():
        for scale in SCALES:
            train = sweep.arch_train(p, cfg, p.train.replace(lr_scale=scale))
            sae, info = cache.train_or_load(p, cfg, ctx.source, train, ctx.data_cfg, ctx.heldout_BD)
            assert info["cached"]  # the search's run, not a second training
            reference[scale] = by_hand(sae, val)
    assert len(set(reference.values())) == len(SCALES)  # the multipliers differ: the choice means something
    assert choice["chosen"] == min(reference, key=reference.get) and choice["missing"] == []
    for row in choice["rows"]:
        assert row["objective"] == pytest.approx(reference[row["lr_scale"]], rel=1e-5)
    for r in results.load_records(lr_search.lr_search_path(p)):
        assert r["split"] == "validation" and r["validation_rows"] == 128 and r["curve"] == {"step": [], "mse": []}
        assert r["family"] == family and r["loss_recovered"] is None  # no CE: it would be a held-out number


def test_poisoned_held_out_rows_change_nothing_the_search_reports(tmp_path, monkeypatch):
    """Held-out rows replaced by random directions (norms kept, so the coefficients' unit act_rms is the same): every
    validation number of every run and the choice are bit for bit those of the clean search."""
    p = unit_profile()
    clean = lr_search.run_lr_search(p, "relu", synthetic_ctx(), log=lambda s: None)
    held = synthetic_ctx().heldout_BD
    noise = torch.randn(held.shape, generator=torch.Generator().manual_seed(7))
    poisoned = noise * (held.norm(dim=-1, keepdim=True) / noise.norm(dim=-1, keepdim=True))
    assert sweep.claim_config(p, "relu", 16, synthetic_ctx(poisoned).act_rms) == sweep.claim_config(
        p, "relu", 16, synthetic_ctx().act_rms)
    monkeypatch.setenv("SWITCH_SAE_CACHE", str(tmp_path / "cache2"))
    monkeypatch.setenv(lr_search.LR_SEARCH_ENV, str(tmp_path / "lr_search2"))
    dirty = lr_search.run_lr_search(p, "relu", synthetic_ctx(poisoned), log=lambda s: None)
    assert dirty == clean


def test_a_killed_search_resumes_and_trains_only_what_is_missing(tmp_path):
    p, ctx = unit_profile(), synthetic_ctx()
    with pytest.raises(lr_search.LRSearchMissing, match=r"relu .*\(0 of 3 .*scripts/lr_search.py --profile unit --family relu"):
        lr_search.chosen_lr_scale(p, "relu")
    lr_search.run_lr_search(p, "relu", ctx, log=lambda s: None, shard=(1, 2))  # one shard: the middle multiplier
    with pytest.raises(lr_search.LRSearchMissing, match="1 of 3"):
        lr_search.chosen_lr_scale(p, "relu")
    logs = []
    choice = lr_search.run_lr_search(p, "relu", ctx, log=logs.append)
    assert sum("recorded" in line for line in logs) == 1 and len(results.load_records(lr_search.lr_search_path(p))) == 3
    assert lr_search.chosen_lr_scale(p, "relu") == choice["chosen"]
    again = []
    assert lr_search.run_lr_search(p, "relu", ctx, log=again.append) == choice
    assert sum("recorded" in line for line in again) == 3  # nothing retrained, nothing recorded twice
    assert len(results.load_records(lr_search.lr_search_path(p))) == 3


def test_a_search_needs_its_frontier_and_a_known_family():
    p = unit_profile()
    with pytest.raises(ConfigError, match="no frontier_gated_l1_coeffs"):
        lr_search.run_lr_search(p, "gated", synthetic_ctx())
    with pytest.raises(ConfigError, match="no lr search for 'switch'"):
        lr_search.run_lr_search(p, "switch", synthetic_ctx())


def test_topk_and_batchtopk_are_searched_alike():
    p, ctx = unit_profile(), synthetic_ctx()
    for family in ("topk", "batchtopk"):
        choice = lr_search.run_lr_search(p, family, ctx, log=lambda s: None)
        assert choice["chosen"] in SCALES and all(set(r["objective_terms"]) == {"recon"} for r in choice["rows"])
        assert all(r["objective"] == pytest.approx(r["mse"], rel=1e-5) for r in choice["rows"])  # L0 is set by k


# --- the frontier grids -----------------------------------------------------------------------------------------
def test_the_frontier_grid_refuses_without_a_search_then_trains_at_the_chosen_lr():
    p, ctx = unit_profile(), synthetic_ctx()
    with pytest.raises(lr_search.LRSearchMissing, match="--family relu"):
        sweep.grid_jobs(p, "frontier_relu", ctx.d_in, ctx.act_rms)
    relu = lr_search.run_lr_search(p, "relu", ctx, log=lambda s: None)["chosen"]
    with pytest.raises(lr_search.LRSearchMissing, match="--family jumprelu"):
        sweep.grid_jobs(p, "frontiers", ctx.d_in, ctx.act_rms)  # all three: jumprelu's search is missing
    jumprelu = lr_search.run_lr_search(p, "jumprelu", ctx, log=lambda s: None)["chosen"]
    jobs = sweep.grid_jobs(p, "frontiers", ctx.d_in, ctx.act_rms)  # gated has no frontier in this profile: skipped
    for family, chosen, coeffs in (("relu", relu, p.frontier_relu_l1_coeffs),
                                   ("jumprelu", jumprelu, p.frontier_jumprelu_l0_coeffs)):
        mine = [(c, t) for c, t in jobs if c.arch == family]
        frontier = sweep.frontier_configs(p, family, ctx.d_in, ctx.act_rms)
        assert len(frontier) == len(coeffs) >= 4 and all(t.lr_scale == chosen for _, t in mine)
        assert sorted(t.seed for c, t in mine if c == frontier[0]) == [0, 1, 2]  # the claim SAE at every seed
        assert all(t.seed == 0 for c, t in mine if c != frontier[0]) and len(mine) == len(coeffs) + 2
        # the claim SAE at seed 0 is the search's run at the chosen multiplier: one key, trained once
        (seed0,) = [t for c, t in mine if c == frontier[0] and t.seed == 0]
        searched = lr_search.search_records(p, family)[chosen]
        assert keys.config_hash(frontier[0], seed0, ctx.data_cfg) == searched["key"]
    assert all(t.adam_betas == (0.0, 0.999) and t.sparsity_warmup_steps == 5 for c, t in jobs if c.arch == "jumprelu")
    assert all(t.adam_betas == p.train.adam_betas for c, t in jobs if c.arch == "relu")
    assert [c.l1_coeff for c in sweep.frontier_configs(p, "relu", 16, act_rms=10.0)] == [5.0, 20.0, 2.0, 1.0]


def test_the_frontier_grids_run_only_when_named_and_the_cpu_frontiers_are_complete():
    from switch_sae_core.cli import build_parser

    ns = build_parser().parse_args(["sweep", "--profile", "cpu"])
    assert not set(ns.grid) & {"frontiers", *FRONTIER_GRIDS}
    cpu = get_profile("cpu")
    for family, field in sweep.FRONTIER_FIELDS.items():
        coeffs = getattr(cpu, field)
        assert len(set(coeffs)) >= 4, family
        # the claim coefficient lies inside the frontier (L0 falls as the coefficient rises)
        assert min(coeffs) < coeffs[0] < max(coeffs), family


# --- equal-L0 comparisons in both directions --------------------------------------------------------------------
def rec(name, l0, mse, seed=0, **sae):
    return {"name": name, "l0": l0, "mse": mse, "seed": seed, "sae_config": {"name": name, **sae}}


def test_equal_l0_comparison_in_both_directions_against_a_hand_computed_case():
    """Gated at L0 20 and 40; TopK at k = 16, 32 (3 seeds) and 64. At TopK's L0 32 TopK wins; at Gated's own L0s
    Gated wins: the directions disagree (the kind of case issue 23 found)."""
    gated = [rec("g1", 20.0, 80.0), rec("g2", 40.0, 48.0)]
    topk = [rec("t16", 16, 95.0), rec("t64", 64, 40.0)] + [rec("t32", 32, m, seed=s) for s, m in enumerate((57.0, 58.0, 59.0))]
    out = equal_l0.equal_l0_comparison(gated, topk)
    lerp = lambda x, x0, y0, x1, y1: y0 + (y1 - y0) * math.log(x / x0) / math.log(x1 / x0)  # noqa: E731
    (at32,) = out["at_curve_l0"]  # k = 16 and 64 lie outside Gated's L0 range [20, 40]: not compared
    assert at32["l0"] == 32 and at32["frontier"]["value"] == pytest.approx(lerp(32, 20, 80, 40, 48))
    assert at32["curve"]["value"] == 58.0 and at32["curve"]["std"] == pytest.approx(1.0) and at32["curve"]["n"] == 3
    assert at32["curve_better"] and at32["diff"] == pytest.approx(58.0 - lerp(32, 20, 80, 40, 48))
    assert at32["spread"] == pytest.approx(1.0) and at32["beyond_spread"] is False  # 0.3 apart: within the seed std
    g20, g40 = out["at_frontier_l0"]
    assert g20["curve"]["value"] == pytest.approx(lerp(20, 16, 95, 32, 58))
    assert g40["curve"]["value"] == pytest.approx(lerp(40, 32, 58, 64, 40))
    assert g40["curve"]["std"] is None  # k = 64 has one seed: no interpolated spread
    assert not g20["curve_better"] and not g40["curve_better"]
    assert out["curve_wins_at_curve_l0"] == [1, 1] and out["curve_wins_at_frontier_l0"] == [0, 2]
    assert (out["winner_at_curve_l0"], out["winner_at_frontier_l0"], out["directions_agree"]) == ("curve", "frontier", False)
    text = equal_l0.equal_l0_report(out, "gated", "topk")
    assert "disagree" in text and "interpolated in log L0" in text and "interpolated over k" in text
    # a TopK better everywhere: both directions agree
    better = equal_l0.equal_l0_comparison(gated, [dict(r, mse=r["mse"] - 30) for r in topk])
    assert better["directions_agree"] is True and "disagree" not in equal_l0.equal_l0_report(better, "gated", "topk")
    # higher is better (loss recovered): the winners swap
    assert equal_l0.equal_l0_comparison(gated, topk, higher_is_better=True)["winner_at_frontier_l0"] == "curve"


def test_equal_l0_comparison_with_nothing_in_range_says_so():
    out = equal_l0.equal_l0_comparison([rec("g", 200.0, 1.0), rec("g2", 300.0, 0.5)], [rec("t", 16, 2.0), rec("t2", 32, 1.5)])
    assert out["at_curve_l0"] == out["at_frontier_l0"] == [] and out["directions_agree"] is None
    assert "nothing is comparable" in equal_l0.equal_l0_report(out, "gated", "topk")


def test_a_frontier_swept_into_its_own_table_is_read_back_and_compared(tmp_path):
    """End to end at tiny sizes: the search, the frontier grid swept into its own table (its seed-0 claim SAE loaded
    from the search's run, not retrained), the frontier read back at the chosen lr and compared with TopK over k."""
    p, ctx = unit_profile(), synthetic_ctx()
    chosen = lr_search.run_lr_search(p, "relu", ctx, log=lambda s: None)["chosen"]
    root = tmp_path / "frontiers"
    sweep.run_sweep(p, ["frontier_relu"], ctx, root=root, log=lambda s: None)
    topk_grid = p.replace(ks=(4, 8, 16), fixed_width_experts=(), relu_l1_coeffs=(), gated_l1_coeffs=())  # TopK alone
    sweep.run_sweep(topk_grid, ["fixed_width"], ctx, root=tmp_path / "main", log=lambda s: None)
    frontier = lr_search.frontier_records(p, "relu", root=root)
    assert len(frontier) == 4 + 2 and {r["train_config"]["lr_scale"] for r in frontier} == {chosen}
    claim = [r for r in frontier if r["sae_config"] == sweep.claim_config(p, "relu", 16, ctx.act_rms).to_dict()]
    assert sorted(r["seed"] for r in claim) == [0, 1, 2]
    searched = lr_search.search_records(p, "relu")[chosen]
    (seed0,) = [r for r in claim if r["seed"] == 0]
    assert seed0["key"] == searched["key"] and seed0["train_seconds"] == searched["train_seconds"]  # one training
    assert seed0["mse"] != searched["mse"]  # the frontier's numbers are on the held-out rows, the search's not
    topk = [r for r in results.load_records(results.results_path(p, tmp_path / "main")) if r["arch"] == "topk"]
    out = equal_l0.equal_l0_comparison(frontier, topk)
    assert out["at_curve_l0"] and out["at_frontier_l0"]  # ReLU's L0s here (~5-19) overlap TopK's 4-16 both ways
    assert max(row["frontier"]["n"] for row in out["at_frontier_l0"]) == 3  # the claim SAE: its 3 seeds, one point
    assert equal_l0.equal_l0_report(out, "relu", "topk")


def test_the_baselines_script_runs_a_family_end_to_end_and_reruns_as_a_no_op(tmp_path):
    """scripts/baselines.sh relu ci_baselines (tiny random model): cache, lr search in two shards, the frontier at the
    chosen lr in two shards into its own table; run again, it trains and records nothing."""
    import os
    import subprocess
    import sys

    root = results.project_root()
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(root), "SWITCH_SAE_CACHE": str(tmp_path / "cache"),
           "SWITCH_SAE_RESULTS": str(tmp_path / "frontiers"), lr_search.LR_SEARCH_ENV: str(tmp_path / "lr_search")}
    cmd = ["bash", str(root / "scripts" / "baselines.sh"), "relu", "ci_baselines"]
    out = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and "done in" in out.stdout, (out.stdout + out.stderr)[-3000:]
    p = get_profile("ci_baselines")
    chosen = lr_search.chosen_lr_scale(p, "relu", tmp_path / "lr_search")
    assert f"chosen lr multiplier x{chosen:g}" in out.stdout
    assert len(results.load_records(tmp_path / "lr_search" / results.RESULTS_FILE)) == 2
    frontier = lr_search.frontier_records(p, "relu", tmp_path / "frontiers", tmp_path / "lr_search")
    assert len(frontier) == 4 + 2 and all(r["loss_recovered"] is not None for r in frontier)
    again = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and len(results.load_records(tmp_path / "frontiers" / results.RESULTS_FILE)) == 6
    assert len(results.load_records(tmp_path / "lr_search" / results.RESULTS_FILE)) == 2
