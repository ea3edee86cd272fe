"""The sweep: grids, the results table (append/load), resume that skips finished records, train_or_load cache."""
import dataclasses
import json
import shutil

import pytest
import torch

from switch_sae_core import cache, checks, claims, heldout, keys, results, sweep
from switch_sae_core.config import ConfigError, DataConfig, SAEConfig, TrainConfig
from switch_sae_core.data.synthetic import SyntheticConfig, SyntheticSource
from switch_sae_core.profiles import Profile, get_profile


def tiny_profile() -> Profile:
    return Profile(
        name="unit",
        data=DataConfig(model="tiny-random", n_train_tokens=512, n_eval_tokens=64),
        train=TrainConfig(steps=6, batch_size=32, log_every=2, progress=False, geometric_median_batch=64),
        width_multiple=2, ks=(2, 4), relu_l1_coeffs=(2.0, 0.5), gated_l1_coeffs=(2.0, 0.5),
        fixed_width_experts=(2, 4), flop_matched_experts=(2,), eval_every=2, n_heldout=128,
    )


@pytest.fixture
def ctx():
    source = SyntheticSource(SyntheticConfig(d_in=16, n_features=64, n_clusters=4, l0=3))
    held = heldout.heldout_activations(source, 128)
    return sweep.SweepContext(source, tiny_profile().data, held, evaluator=None)


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SWITCH_SAE_CACHE", str(tmp_path / "cache"))


def test_grids_follow_the_paper():
    p = get_profile("paper")
    fixed = sweep.grid_configs(p, "fixed_width", d_in=768)
    flop = sweep.grid_configs(p, "flop_matched", d_in=768)
    m = 24576
    assert all(c.n_features == m for c in fixed)
    assert sorted({c.n_experts for c in fixed if c.arch == "switch"}) == [16, 32, 64, 128]
    fm_switch = [c for c in flop if c.arch == "switch"]
    assert sorted({c.n_experts for c in fm_switch}) == [2, 4, 8]
    assert all(c.expert_width == m for c in fm_switch)  # experts as wide as the baseline: FLOP-matched
    assert {c.k for c in fixed if c.arch == "topk"} == set(p.ks)
    assert sum(c.arch == "relu" for c in fixed) == len(p.ks) == sum(c.arch == "gated" for c in flop)
    assert {results.setting_of(c, m) for c in fixed} == {"baseline", "fixed_width"}
    assert {results.setting_of(c, m) for c in flop} == {"baseline", "flop_matched"}


def test_relu_coefficients_scale_with_the_activations():
    p = tiny_profile()
    a = [c.l1_coeff for c in sweep.grid_configs(p, "fixed_width", 16, act_rms=1.0) if c.arch == "relu"]
    b = [c.l1_coeff for c in sweep.grid_configs(p, "fixed_width", 16, act_rms=10.0) if c.arch == "relu"]
    assert b == pytest.approx([10 * x for x in a])


def test_config_hash_ignores_logging_but_not_training():
    s, t, d = SAEConfig(arch="topk", d_in=8, n_features=32, k=4), TrainConfig(), DataConfig()
    h = keys.config_hash(s, t, d)
    assert keys.config_hash(s, t.replace(progress=False, log_every=1, checkpoint_dir="x"), d) == h
    assert keys.config_hash(s, t.replace(steps=t.steps + 1), d) != h
    assert keys.config_hash(s.replace(k=5), t, d) != h
    assert keys.config_hash(s, t, d.replace(layer=3)) != h


def test_results_table_append_and_load(tmp_path):
    path = tmp_path / "r" / "records.jsonl"
    assert results.load_records(path) == []
    recs = [{"key": "a", "mse": 1.5, "curve": {"step": [1], "mse": [2.0]}}, {"key": "b", "mse": torch.tensor(2.5)}]
    for r in recs:
        results.append_record(path, r)
    loaded = results.load_records(path)
    assert [r["key"] for r in loaded] == ["a", "b"] and loaded[1]["mse"] == 2.5
    assert loaded[0]["curve"] == {"step": [1], "mse": [2.0]}
    with open(path, "a") as f:  # a sweep killed mid-write leaves half a line: skipped
        f.write('{"key": "c", "ms')
    assert len(results.load_records(path)) == 2
    assert list(results.records_frame(loaded)["key"]) == ["a", "b"]


def test_a_table_with_two_final_mses_for_one_sae_warns_naming_it(tmp_path):
    # issue 28: notebook 03 said TopK's final held-out MSE was 7766, notebook 02 7226, from one table
    path = tmp_path / "records.jsonl"
    tol = results.CURVE_MSE_TOL
    ok = {"key": "a", "name": "topk_ok", "seed": 0, "steps": 30, "mse": 100.0, "curve_rows": 64,
          "curve": {"step": [10, 30], "mse": [200.0, 100.0 * (1 + 0.5 * tol)]}}
    bad = {"key": "b", "name": "switch_bad", "seed": 1, "steps": 30, "mse": 100.0,
           "curve": {"step": [10, 30], "mse": [200.0, 100.0 * (1 + 1.5 * tol)]}}
    short = {"key": "c", "name": "short_curve", "seed": 0, "steps": 40, "mse": 50.0,  # curve ends before the last step
             "curve": {"step": [10, 30], "mse": [200.0, 100.0]}}
    superseded = dict(bad, key="a", name="topk_ok_before")  # an older line of key "a": not what a reader sees
    for r in (superseded, ok, bad, short):
        results.append_record(path, r)
    with pytest.warns(results.ResultsWarning) as caught:
        assert len(results.load_records(path)) == 4
    (w,) = caught
    line = str(w.message)
    assert "\n" not in line and "1 record(s)" in line and "switch_bad seed 1 (100 vs 101.5, curve on other held-out rows)" in line
    assert "topk_ok" not in line and "short_curve" not in line
    assert [r["name"] for r in results.inconsistent_records([superseded, ok, bad, short])] == ["switch_bad"]


def test_the_committed_tables_consistency():
    # the cpu table (the README's numbers) is consistent; the quick table's 8 records from before the curve was
    # taken on the table's rows are named when it loads (not retrained here: that needs the LM and ~1 h)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", results.ResultsWarning)
        results.load_records(results.results_path("cpu"))
    with warnings.catch_warnings(record=True):
        quick = results.load_records(results.results_path("quick"))
    assert all(not r.get("curve_rows") for r in results.inconsistent_records(quick))  # only the old-curve kind


def test_sweep_resumes_and_skips_finished_records(ctx, tmp_path):
    p = tiny_profile()
    root = tmp_path / "results"
    cfgs = sweep.sweep_configs(p, ["fixed_width"], ctx)
    # first run "killed" after two SAEs: simulate by running a profile whose grid is a prefix
    records = sweep.run_sweep(p.replace(fixed_width_experts=(), relu_l1_coeffs=(), gated_l1_coeffs=()),
                              ["fixed_width"], ctx=ctx, root=root, log=lambda s: None)
    assert len(records) == len(p.ks)  # the TopK SAEs
    first = {r["key"]: r["finished_at"] for r in records}
    logs = []
    records = sweep.run_sweep(p, ["fixed_width"], ctx=ctx, root=root, log=logs.append)
    assert f"{len(cfgs)} SAEs, {len(p.ks)} already in" in logs[0]
    assert len(records) == len(cfgs) == len(results.load_records(root / results.RESULTS_FILE))
    assert all(r["finished_at"] == first[r["key"]] for r in records if r["key"] in first)  # not retrained
    # a third run trains nothing and appends nothing
    n_lines = len(results.load_records(root / results.RESULTS_FILE))
    sweep.run_sweep(p, ["fixed_width"], ctx=ctx, root=root, log=lambda s: None)
    assert len(results.load_records(root / results.RESULTS_FILE)) == n_lines
    r = next(r for r in records if r["arch"] == "switch")
    for field in ("arch", "n_experts", "n_features", "k", "steps", "tokens", "mse", "fvu", "l0", "loss_recovered",
                  "kl", "dead_fraction", "flops_per_input", "wall_clock_s", "seed", "git_commit", "sae_config",
                  "train_config", "data_config"):
        assert field in r, field
    assert r["tokens"] == p.train.steps * p.train.batch_size
    assert r["curve"]["step"] == [2, 4, 6] and len(r["curve"]["mse"]) == 3
    assert SAEConfig.from_dict(r["sae_config"]).n_experts == r["n_experts"]


def test_held_out_metrics_match_a_direct_computation(ctx):
    p = tiny_profile()
    cfg = SAEConfig(arch="topk", d_in=16, n_features=32, k=4)
    sae, info = cache.train_or_load(p, cfg, ctx.source, heldout_BD=ctx.heldout_BD)
    got = heldout.reconstruction_metrics(sae, ctx.heldout_BD, chunk=50)  # chunked
    with torch.no_grad():
        x = ctx.heldout_BD
        x_hat = sae(x).x_hat
    assert got["mse"] == pytest.approx(float((x - x_hat).pow(2).sum(-1).mean()), rel=1e-5)
    assert 0 < got["l0"] <= 4


def test_train_or_load_caches_by_config(ctx):
    p = tiny_profile()
    cfg = SAEConfig(arch="switch", d_in=16, n_features=32, n_experts=2, k=4)
    sae1, info1 = cache.train_or_load(p, cfg, ctx.source)
    sae2, info2 = cache.train_or_load(p, cfg, ctx.source)
    assert not info1["cached"] and info2["cached"] and info1["key"] == info2["key"]
    for (n, a), (_, b) in zip(sae1.state_dict().items(), sae2.state_dict().items()):
        assert torch.equal(a.cpu(), b.cpu()), n
    _, info3 = cache.train_or_load(p.replace(train=p.train.replace(steps=4)), cfg, ctx.source)
    assert not info3["cached"] and info3["key"] != info1["key"]


def test_sample_efficiency_helpers():
    curve = {"step": [10, 20, 30], "mse": [5.0, 3.0, 1.0]}
    assert checks.steps_to_reach(curve, 4.0) == pytest.approx(15.0)
    assert checks.steps_to_reach(curve, 0.5) is None
    assert checks.interpolate_at([(1, 10.0), (100, 0.0)], 10) == pytest.approx(5.0)


def test_metrics_count_the_shared_expert(ctx):
    p = tiny_profile()
    cfg = SAEConfig(arch="switch", d_in=16, n_features=32, n_experts=4, k=4, shared_expert=True)
    sae, info = cache.train_or_load(p, cfg, ctx.source)
    got = heldout.reconstruction_metrics(sae, ctx.heldout_BD)
    assert info["curve"]["step"] == [2, 4, 6]
    assert 0.0 <= got["dead_fraction_heldout"] <= 1.0 and got["l0"] > 0


def test_records_without_lm_numbers_are_redone_when_the_evaluator_exists(ctx, tmp_path):
    p = tiny_profile().replace(fixed_width_experts=(), relu_l1_coeffs=(), gated_l1_coeffs=(), ks=(2,))
    root = tmp_path / "results"
    (r,) = sweep.run_sweep(p, ["fixed_width"], ctx=ctx, root=root, log=lambda s: None)
    assert r["loss_recovered"] is None
    with_lm = dataclasses.replace(ctx, evaluator=lambda sae: {"loss_recovered": 0.5, "kl": 0.1})
    (r2,) = sweep.run_sweep(p, ["fixed_width"], ctx=with_lm, root=root, log=lambda s: None)
    assert r2["key"] == r["key"] and r2["loss_recovered"] == 0.5 and r2["kl"] == 0.1
    assert len(results.load_records(root / results.RESULTS_FILE)) == 2  # appended; the latest wins


def test_the_one_non_result_list_changes_no_key_made_with_the_default_checkpoint_keep():
    """Keys before the fix dropped six fields (not checkpoint_keep); on every config of the committed quick
    table (all trained with the default checkpoint_keep) the key is what that old rule gives."""
    from switch_sae_core.paths import project_root

    old_dropped = ("progress", "log_every", "checkpoint_dir", "checkpoint_every", "wandb_project", "device",
                   "lr_scale", "decay_checkpoint_dir", "lr_warmup_steps", "sparsity_warmup_steps", "tokens")  # the last five did not exist yet
    records = results.load_records(project_root() / "data" / "results" / "quick" / results.RESULTS_FILE)
    assert records, "data/results/quick/records.jsonl is part of the repository"
    for r in records:
        s, t, d = (cls.from_dict(r[f"{name}_config"]) for cls, name in
                   ((SAEConfig, "sae"), (TrainConfig, "train"), (DataConfig, "data")))
        old_key = keys.stable_hash({
            "sae": {k: v for k, v in s.to_dict().items() if k not in ("global_topk", "feature_scaling")},  # later
            "train": {k: v for k, v in t.to_dict().items() if k not in old_dropped},
            "data": {k: v for k, v in d.to_dict().items() if k not in ("cache_dir", "device", "model_batch_size")}})
        assert keys.config_hash(s, t, d) == old_key, r["name"]
        assert keys.config_hash(s, t.replace(checkpoint_keep=t.checkpoint_keep + 2), d) == old_key  # the drift bug
        assert keys.config_hash(s, t.replace(lr_scale=4.0), d) != old_key  # a later result field, set, counts
        assert keys.config_hash(s, t.replace(sparsity_warmup_steps=10), d) != old_key


def test_non_result_fields_do_not_change_the_key_nor_block_a_resume():
    from switch_sae_core.config import TRAIN_NON_RESULT_FIELDS

    s, t, d = SAEConfig(arch="topk", d_in=8, n_features=16, k=2), TrainConfig(steps=10), DataConfig()
    changed = dict(device="cpu", log_every=3, checkpoint_dir="x", checkpoint_every=5, checkpoint_keep=4,
                   decay_checkpoint_dir="y", wandb_project="p", progress=False)
    assert set(changed) == set(TRAIN_NON_RESULT_FIELDS)  # every listed field is exercised here
    assert keys.config_hash(s, t.replace(**changed), d) == keys.config_hash(s, t, d)
    assert keys.config_hash(s, t.replace(checkpoint_keep=3), d) == keys.config_hash(s, t, d)  # the drift bug


def test_the_curve_ends_at_the_tables_final_mse(ctx, tmp_path):
    """One definition of 'final held-out MSE': the last curve point is the record's `mse`."""
    p = tiny_profile().replace(fixed_width_experts=(), relu_l1_coeffs=(), gated_l1_coeffs=(), ks=(2,),
                               train=tiny_profile().train.replace(steps=7))  # 7 is not a multiple of eval_every
    (r,) = sweep.run_sweep(p, ["fixed_width"], ctx=ctx, root=tmp_path / "results", log=lambda s: None)
    assert r["curve"]["step"] == [2, 4, 6, 7] and r["curve_rows"] == ctx.heldout_BD.shape[0]
    assert r["curve"]["mse"][-1] == pytest.approx(r["mse"], rel=1e-6)


def test_the_cache_keeps_the_whole_training_log(ctx):
    p = tiny_profile()
    cfg = SAEConfig(arch="switch", d_in=16, n_features=32, n_experts=2, k=4)
    _, fresh = cache.train_or_load(p, cfg, ctx.source)
    _, again = cache.train_or_load(p, cfg, ctx.source, need_history=True)
    assert again["cached"] and [row["step"] for row in again["log"]] == [2, 4, 6]
    assert again["log"] == json.loads(json.dumps(fresh["log"])) and "expert_load" in again["log"][0]


def test_seed_and_convergence_grids_train_their_own_runs_and_are_found_again(ctx, tmp_path):
    """Grid "seeds": TopK and every FLOP-matched Switch at claim_k, once per other seed; grid "convergence": the
    first of them trained twice as long. profile_records keeps the profile's seed unless asked for all."""
    p = tiny_profile().replace(claim_k=4, seeds=(0, 1), flop_matched_experts=(2,))
    root = tmp_path / "results"
    jobs = sweep.sweep_jobs(p, ["seeds", "convergence"], ctx)
    assert [(c.arch, t.seed, t.steps) for c, t in jobs] == [("topk", 1, 6), ("switch", 1, 6), ("topk", 0, 6),
                                                             ("topk", 0, 12), ("switch", 0, 6), ("switch", 0, 12)]
    assert all(c.k == 4 for c, _ in jobs) and jobs[1][0].n_features == 2 * jobs[0][0].n_features
    sweep.run_sweep(p, ["flop_matched", "seeds", "convergence"], ctx=ctx, root=root, log=lambda s: None)
    base = results.profile_records(p, root)
    assert {r["seed"] for r in base} == {0} and all(r["steps"] == 6 for r in base)
    both = [r for r in results.profile_records(p, root, all_seeds=True) if r["k"] == 4 and r["arch"] in ("topk", "switch")]
    assert sorted((r["label"], r["seed"]) for r in both) == [("switch-2", 0), ("switch-2", 1), ("topk", 0), ("topk", 1)]
    doubled = results.profile_records(p, root, steps_factor=2)
    assert sorted(r["label"] for r in doubled) == ["switch-2", "topk"] and all(r["steps"] == 12 for r in doubled)
    rows = checks.convergence_check(base, doubled)
    assert len(rows) == 2 and all(r["steps"] == 6 for r in rows)
    # convergence_seeds: the doubled SAEs at every seed, each paired with its own seed's SAE
    p2 = p.replace(convergence_seeds=(0, 1))
    assert [(c.arch, t.seed, t.steps) for c, t in sweep.grid_jobs(p2, "convergence", ctx.d_in)] == [
        ("topk", 0, 6), ("topk", 0, 12), ("topk", 1, 6), ("topk", 1, 12),
        ("switch", 0, 6), ("switch", 0, 12), ("switch", 1, 6), ("switch", 1, 12)]
    sweep.run_sweep(p2, ["convergence"], ctx=ctx, root=root, log=lambda s: None)
    rows = checks.convergence_check(results.profile_records(p2, root, all_seeds=True),
                                    results.profile_records(p2, root, all_seeds=True, steps_factor=2))
    assert sorted((r["label"], r["seed"]) for r in rows) == [("switch-2", 0), ("switch-2", 1), ("topk", 0), ("topk", 1)]
    assert claims.profile_convergence_report(p2, root) == claims.convergence_report(rows)
    assert "switch-2 (k=4), 2 seeds: mean" in claims.convergence_report(rows)
    # a seed the other grids do not train: the convergence grid trains its partner at the profile's steps too
    p3 = p.replace(convergence_seeds=(7,))
    sweep.run_sweep(p3, ["convergence"], ctx=ctx, root=root, log=lambda s: None)
    rows = checks.convergence_check(results.profile_records(p3, root, all_seeds=True),
                                    results.profile_records(p3, root, all_seeds=True, steps_factor=2))
    assert sorted((r["label"], r["seed"]) for r in rows if r["seed"] == 7) == [("switch-2", 7), ("topk", 7)]


def test_shards_split_a_sweep_between_processes_and_together_train_each_sae_once(ctx, tmp_path):
    p = tiny_profile()
    root = tmp_path / "results"
    jobs = sweep.sweep_jobs(p, ["fixed_width"], ctx)
    first = sweep.run_sweep(p, ["fixed_width"], ctx=ctx, root=root, log=lambda s: None, shard=(0, 2))
    assert len(first) == (len(jobs) + 1) // 2  # SAEs 0, 2, 4, ...: only what this shard trained is finished
    both = sweep.run_sweep(p, ["fixed_width"], ctx=ctx, root=root, log=lambda s: None, shard=(1, 2))
    lines = results.load_records(root / results.RESULTS_FILE)
    assert len(both) == len(jobs) == len(lines) == len({r["key"] for r in lines})  # each SAE once, none twice
    with pytest.raises(ConfigError, match="shard 2/2"):
        sweep.run_sweep(p, ["fixed_width"], ctx=ctx, root=root, log=lambda s: None, shard=(2, 2))


def test_the_scaling_grid_has_its_own_token_budget_and_its_records_come_back(ctx, tmp_path):
    p = tiny_profile().replace(scaling_widths=(64, 128), scaling_experts=(2,), scaling_k=4, scaling_steps=3)
    jobs = sweep.grid_jobs(p, "scaling", d_in=16)
    assert len(jobs) == 4 and all(t.steps == 3 for _, t in jobs)  # the profile trains 6 steps
    assert all(t.dead_window_tokens <= 3 * 32 // 3 for _, t in jobs)  # dead latents (AuxK) within the shorter run
    assert all(t.steps == 6 for _, t in sweep.grid_jobs(p.replace(scaling_steps=None), "scaling", d_in=16))
    records = sweep.run_sweep(p, ["scaling"], ctx=ctx, root=tmp_path / "results", log=lambda s: None)
    assert sorted((r["n_features"], r["steps"]) for r in records) == [(64, 3), (64, 3), (128, 3), (128, 3)]


def test_a_line_torn_by_a_kill_does_not_swallow_the_next_shards_record(tmp_path):
    path = tmp_path / results.RESULTS_FILE
    results.append_record(path, {"key": "a"})
    with open(path, "a") as f:
        f.write('{"key": "b", "ms')  # a process killed mid-write (or a full disk)
    with pytest.warns(UserWarning, match="removed a last line torn"):
        results.append_record(path, {"key": "c"})  # another shard appends after it
    assert path.read_text().splitlines() == ['{"key": "a"}', '{"key": "c"}']  # only b is lost, cut off
    results.append_record(path, {"key": "d"})  # and every later sweep and reader goes on
    assert [r["key"] for r in results.load_records(path)] == ["a", "c", "d"]


def test_a_table_torn_in_the_middle_by_an_older_version_stays_readable(tmp_path):
    """Older versions appended after a torn line: that table failed every later sweep and notebook."""
    path = tmp_path / results.RESULTS_FILE
    path.write_text('{"key": "a"}\n{"key": "b", "ms\n{"key": "c"}\n')
    with pytest.warns(UserWarning, match=r"skipped 1 line\(s\) torn .*line \[2\]"):
        assert [r["key"] for r in results.load_records(path)] == ["a", "c"]
    path.write_text('{"key": "a"}\n{"key": "b"} garbage}\n{"key": "c"}\n')  # not a torn write: refused
    with pytest.raises(results.ResultsError, match=":2 is not valid JSON"):
        results.load_records(path)


def test_shards_refuse_to_start_before_the_activations_are_cached(tmp_path):
    p = tiny_profile().replace(data=tiny_profile().data.replace(cache_dir=str(tmp_path / "empty")))
    with pytest.raises(ConfigError, match="switch-sae cache --profile unit"):
        sweep.run_sweep(p, ["fixed_width"], root=tmp_path / "results", log=lambda s: None, shard=(0, 2))


def test_lr_scale_4_and_4_0_are_one_training_and_a_bool_is_refused():
    s, d = SAEConfig(arch="topk", d_in=8, n_features=16, k=2), DataConfig()
    assert keys.config_hash(s, TrainConfig(lr_scale=4), d) == keys.config_hash(s, TrainConfig(lr_scale=4.0), d)
    with pytest.raises(ConfigError, match="lr_scale"):
        TrainConfig(lr_scale=True)


def test_every_committed_key_of_the_cpu_tables_is_what_config_hash_gives():
    """Keys written by the sweep and the probe (after the lr_scale field) are recomputed from their configs."""
    from switch_sae_core.paths import project_root

    for table in ("cpu", "cpu_sizing"):
        records = results.load_records(project_root() / "data" / "results" / table / results.RESULTS_FILE)
        assert records, table
        for r in records:
            s, t, d = (cls.from_dict(r[f"{name}_config"]) for cls, name in
                       ((SAEConfig, "sae"), (TrainConfig, "train"), (DataConfig, "data")))
            assert keys.config_hash(s, t, d) == r["key"], (table, r["name"])


def test_a_longer_run_continues_the_shorter_one_from_its_decay_start_and_equals_a_run_from_scratch(
        ctx, tmp_path, monkeypatch):
    """Up to the shorter run's decay start both runs take the same steps at the same lr, so the longer run starts
    there (saving 40% of a doubled run's steps) and ends exactly where a run from scratch does."""
    p = tiny_profile().replace(train=tiny_profile().train.replace(steps=10, log_every=1), eval_every=2)
    cfg = SAEConfig(arch="switch", d_in=16, n_features=32, n_experts=2, k=4)
    long = p.replace(train=p.train.replace(steps=20))
    monkeypatch.setenv("SWITCH_SAE_CACHE", str(tmp_path / "scratch"))
    scratch, scratch_info = cache.train_or_load(long, cfg, ctx.source, heldout_BD=ctx.heldout_BD)
    assert scratch_info["continued_from_step"] is None

    monkeypatch.setenv("SWITCH_SAE_CACHE", str(tmp_path / "shared"))
    _, short_info = cache.train_or_load(p, cfg, ctx.source, heldout_BD=ctx.heldout_BD, keep_decay_checkpoint=True)

    def fresh(profile, **kw):  # train `profile` from nothing but the decay checkpoints: drop its cache entry first
        out_dir = cache.saes_cache_dir() / keys.config_hash(cfg, profile.train, profile.data)
        shutil.rmtree(out_dir, ignore_errors=True)
        return cache.train_or_load(profile, cfg, ctx.source, **{"heldout_BD": ctx.heldout_BD, **kw})

    assert fresh(p.replace(train=long.train.replace(lr_scale=2.0)))[1]["continued_from_step"] is None  # other lr
    # a curve taken on other rows or at other steps is not continued, nor a forced retraining
    assert fresh(long, heldout_BD=ctx.heldout_BD[:64])[1]["continued_from_step"] is None
    assert fresh(long, eval_every=5)[1]["continued_from_step"] is None
    assert fresh(long, force=True)[1]["continued_from_step"] is None
    # killed while copying the decay checkpoint: a half copy and the continuation's progress.json are there
    out_dir = cache.saes_cache_dir() / keys.config_hash(cfg, long.train, long.data)
    shutil.rmtree(out_dir)
    (out_dir / "checkpoint" / ".tmp_step_00000008_1").mkdir(parents=True)
    (out_dir / cache.PROGRESS_FILE).write_text('{"log": [], "curve": {"step": [], "mse": []}, "continued_from_step": 8}')
    sae, info = cache.train_or_load(long, cfg, ctx.source, heldout_BD=ctx.heldout_BD)
    assert info["continued_from_step"] == 8  # the 10-step run decays over its last 2 steps
    for name, a in scratch.state_dict().items():
        assert torch.equal(a, sae.state_dict()[name]), name
    assert info["curve"] == scratch_info["curve"] and info["curve"]["step"] == list(range(2, 21, 2))
    assert [row["step"] for row in info["log"]] == list(range(1, 21))
    assert info["log"] == json.loads(json.dumps(scratch_info["log"]))
    assert info["curve"]["mse"][:4] == short_info["curve"]["mse"][:4]  # steps 2..8 are the short run's
    # a shorter run never starts from a longer run's decay checkpoint (step 16 is past its own decay start)
    assert fresh(p.replace(train=p.train.replace(steps=12)))[1]["continued_from_step"] == 8


def test_only_a_run_with_a_longer_partner_keeps_its_decay_checkpoint_and_the_partner_continues_it(ctx, tmp_path):
    p = tiny_profile().replace(train=tiny_profile().train.replace(steps=10), claim_k=4, eval_every=2)
    records = sweep.run_sweep(p, ["convergence", "fixed_width"], ctx=ctx, root=tmp_path / "results", log=lambda s: None)
    kept = sorted((cache.saes_cache_dir() / "decay_checkpoints").glob("*/step_*"))
    assert len(kept) == 2  # TopK and Switch-2 at 10 steps (their 20-step partners continue them); none else
    doubled = [r for r in records if r["steps"] == 20]
    assert len(doubled) == 2 and all(r["continued_from_step"] == 8 for r in doubled)
    assert all(r["continued_from_step"] is None for r in records if r["steps"] == 10)


def test_shards_keep_a_run_and_its_continuation_together(ctx):
    p = tiny_profile().replace(claim_k=4, convergence_seeds=(0, 1))
    jobs = sweep.sweep_jobs(p, ["convergence", "fixed_width"], ctx)
    groups = sweep.lineages(jobs, ctx.data_cfg)
    assert sum(map(len, groups)) == len(jobs)
    for group in groups:
        assert [t.steps for _, t in group] == sorted(t.steps for _, t in group)
        assert len({(json.dumps(c.to_dict()), t.seed) for c, t in group}) == 1
    assert [len(g) for g in groups[:4]] == [2, 2, 2, 2]  # TopK and Switch-2 at seeds 0 and 1: 6 and 12 steps


def test_batchtopk_and_jumprelu_join_a_grid_only_when_named():
    """Profiles name BatchTopK ks and JumpReLU lambdas; JumpReLU alone gets its paper's Adam betas and warm-ups."""
    from switch_sae_core.profiles import get_profile
    from switch_sae_core.sweep import grid_configs, grid_jobs

    base = get_profile("ci")
    assert not {c.arch for c in grid_configs(base, "flop_matched", 16)} & {"batchtopk", "jumprelu"}
    prof = base.replace(batchtopk_ks=(4,), jumprelu_l0_coeffs=(0.1, 0.3), jumprelu_sparsity_warmup_steps=7)
    jobs = grid_jobs(prof, "flop_matched", 16)
    named = [(c, t) for c, t in jobs if c.arch in ("batchtopk", "jumprelu")]
    assert sorted((c.arch, c.k if c.arch == "batchtopk" else c.l1_coeff) for c, _ in named) == [
        ("batchtopk", 4), ("jumprelu", 0.1), ("jumprelu", 0.3)]
    for c, t in jobs:
        if c.arch == "jumprelu":
            assert t.adam_betas == (0.0, 0.999) and t.sparsity_warmup_steps == 7
        else:
            assert t == prof.train  # the other SAEs' training (and keys) unchanged
    assert all(c.auxk_coeff == 1 / 32 for c, _ in named if c.arch == "batchtopk")


def test_a_script_and_the_sweep_record_one_sae_alike(ctx, tmp_path):
    """train_and_record (what the sweep, the convergence probe and the ablation call) gives the sweep's record for
    the same SAE: same key and numbers, its extra columns added; the second call loads it from the cache."""
    p = tiny_profile()
    cfg = SAEConfig(arch="topk", d_in=16, n_features=32, k=2)
    (swept,) = [r for r in sweep.run_sweep(p, "fixed_width", ctx, root=tmp_path / "sweep", log=lambda s: None)
                if r["name"] == results.sae_name(cfg)]
    mine = sweep.train_and_record(p, cfg, p.train, ctx, tmp_path / "script" / results.RESULTS_FILE, arm="x")
    assert results.load_records(tmp_path / "script" / results.RESULTS_FILE) == [json.loads(json.dumps(mine, default=keys.json_default))]
    assert mine["arm"] == "x" and mine["key"] == swept["key"] == keys.config_hash(cfg, p.train, ctx.data_cfg)
    assert {k: mine[k] for k in ("mse", "l0", "run_fingerprint")} == {k: swept[k] for k in ("mse", "l0", "run_fingerprint")}
    for script in ("convergence_probe.py", "ablation_flop_matched_gap.py"):
        text = (results.project_root() / "scripts" / script).read_text()
        assert "train_and_record(" in text and "train_or_load(" not in text, script


@pytest.mark.parametrize("k", [32, 6, 25])
def test_variants_grid_is_at_equal_l0_and_equal_encoder_flops(k):
    """Issue 22 item 4: every SAE of the `variants` grid decodes k latents per input (k - 1 for top-2 / shared
    expert at an odd k) and scores as many latents per input as TopK (its encoder FLOPs). A variant keeping k per
    ACTIVE expert (L0 = 2k, as the first SynthSAEBench grid did) fails the L0 check."""
    from switch_sae_core.saes import build_sae

    profile, d = get_profile("ci").replace(claim_k=k), 16
    cfgs = sweep.variant_configs(profile, d)
    assert list(cfgs) == ["topk", "flop-matched-4", "top-2 (8x)", "shared (8x)", "scale (8x)"]
    topk_encoder = build_sae(cfgs["topk"]).flops_per_input()["encoder"]
    x_BD = torch.randn(64, d)
    for label, cfg in cfgs.items():
        sae = build_sae(cfg)
        slots = sae(x_BD).latent_acts.shape[1]  # latents kept per input (ReLU may zero some at initialisation)
        want = k - (k % 2) if label in ("top-2 (8x)", "shared (8x)") else k
        assert slots == want, label
        assert sae.flops_per_input()["encoder"] == topk_encoder, label


def test_notebook05_variants_are_at_the_main_switch_saes_l0():
    """Notebook 05's shared-expert and top-2 Switch SAEs keep the main Switch SAE's L0 (k/2 per active expert)."""
    from switch_sae_core.analysis.expert_study import main_name, study_configs
    from switch_sae_core.saes import build_sae

    profile = get_profile("ci")
    study = study_configs(profile, 128)
    x_BD = torch.randn(8, 128)
    main_slots = build_sae(study[main_name(profile)].cfg)(x_BD).latent_acts.shape[1]
    for name in ("shared expert", "top_e=2"):
        assert build_sae(study[name].cfg)(x_BD).latent_acts.shape[1] == main_slots, name
