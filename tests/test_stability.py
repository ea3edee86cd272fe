"""analysis.stability: the shared-feature fraction on dictionaries whose overlap is known by construction."""
import torch

from switch_sae_core.analysis.stability import matched, stability_rows, summarize


def _random_dirs(n, d=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=-1)


def test_matched_counts_exactly_the_shared_rows():
    a = _random_dirs(40, seed=0)
    b = torch.cat([a[:10] * 3.0, _random_dirs(30, seed=1)])  # 10 of A's 40 features, rescaled (cosine ignores norm)
    out = matched(a, b)
    assert out["shared_frac"] == 10 / 40  # random directions in 64 dims never reach cosine 0.9
    out_ba = matched(b, a)
    assert out_ba["shared_frac"] == 10 / 40  # directional: 10 of B's 40
    assert 0 < out["mean_best_cos"] < 1


def test_a_small_rotation_matches_below_its_cosine_only():
    a = _random_dirs(8)
    noisy = torch.nn.functional.normalize(a + 0.05 * _random_dirs(8, seed=3), dim=-1)  # cos ~ 0.999
    assert matched(a, noisy)["shared_frac"] == 1.0
    assert matched(a, noisy, threshold=0.9995)["shared_frac"] == 0.0  # cos = 1/sqrt(1 + 0.05^2) = 0.99875


def test_rows_pair_distinct_seeds_only_and_summaries_average_them():
    base = _random_dirs(20, seed=0)
    dirs = {"topk": {0: base, 1: base.clone(), 2: _random_dirs(20, seed=9)},
            "switch": {0: torch.cat([base[:5], _random_dirs(35, seed=4)]), 1: _random_dirs(40, seed=5)}}
    rows = stability_rows(dirs)
    assert all(r["seed_a"] != r["seed_b"] for r in rows)
    assert sum(r["kind"] == "seed" and r["a"] == "topk" for r in rows) == 6  # 3 seeds: 6 ordered pairs
    s = {(r["kind"], r["a"], r["b"]): r for r in summarize(rows)}
    # topk seed pairs: (0,1) and (1,0) share all, the four pairs with seed 2 none -> mean 2/6
    assert abs(s[("seed", "topk", "topk")]["shared_frac"] - 2 / 6) < 1e-9
    # switch seed 0 holds 5 of topk seed 0's features; matched against topk seed 1 (= seed 0's copy): 5/40
    cross = [r for r in rows if r["kind"] == "cross" and r["a"] == "switch" and r["seed_a"] == 0 and r["seed_b"] == 1]
    assert cross[0]["shared_frac"] == 5 / 40


def test_chance_is_what_two_random_dictionaries_share_and_learned_copies_beat_it():
    from switch_sae_core.analysis.stability import chance_best_cos

    d, n = 64, 200
    chance = chance_best_cos(n, n, d)
    assert abs(chance - matched(_random_dirs(n, d, 1), _random_dirs(n, d, 2))["mean_best_cos"]) < 0.03
    assert 0.2 < chance < (2 * torch.log(torch.tensor(float(n))) / d).sqrt() + 0.05  # the extreme-value scale
    rows = stability_rows({"topk": {0: _random_dirs(n, d, 0), 1: _random_dirs(n, d, 0)}})
    assert rows[0]["mean_best_cos"] > 0.99 > rows[0]["chance_best_cos"]


def test_the_report_sentences_follow_the_tables():
    from switch_sae_core.analysis.feature_quality import absorption_sentences, stability_sentences

    dirs = {"topk": {0: _random_dirs(30, seed=0), 1: _random_dirs(30, seed=0)}}
    assert stability_sentences(stability_rows(dirs))[0].startswith("topk -> another seed of the same SAE (2 pairs): "
                                                                    "100.0%")
    recs = [{"label": lab, "seed": s, "mean_absorption_fraction": v + 0.001 * s, "mean_full_absorption": 0.01}
            for s in range(3) for lab, v in (("topk", 0.05), ("switch-2", 0.01))]
    frac, full = absorption_sentences(recs)
    assert "switch-2 0.011" in frac and "lower than topk" in frac
    assert "no real difference" in full


def test_variants_table_joins_the_sweep_and_duplication_tables_on_the_key(tmp_path, monkeypatch):
    """issue 22 item 4's README table: one row per SAE of the variants grid in grid order, its MSE against TopK's
    and top-1's, and its duplication (joined on the cache key, the latest record of a key winning)."""
    import json

    from switch_sae_core.analysis import feature_quality as fq

    folder = tmp_path / "data" / "results" / "variants" / "ci"
    folder.mkdir(parents=True)
    base = {"l0": 32.0, "dead_fraction": 0.01, "delta_ce": 0.1, "kl": 0.2, "sae_config": {"d_in": 64}}
    mse = {"topk": 100.0, "flop-matched-4": 80.0, "top-2 (8x)": 90.0, "shared (8x)": 120.0, "scale (8x)": 88.0}
    records = [{**base, "key": f"k-{lab}", "mse": m} for lab, m in mse.items()]
    records.insert(0, {**base, "key": "k-topk", "mse": 999.0})  # an older record of the same key
    dup = [{"label": lab, "key": f"k-{lab}", "n_latents": 10, "duplicate_frac": 0.01 * i,
            **({"cross_expert_duplicate_frac": 0.005 * i} if lab != "topk" else {})} for i, lab in enumerate(mse)]
    (folder / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (folder / "duplication.jsonl").write_text("".join(json.dumps(d) + "\n" for d in dup[::-1]))
    monkeypatch.setattr(fq, "project_root", lambda: tmp_path)
    lines = fq.variants_table_markdown("ci").splitlines()
    assert [line.split(" (")[0] for line in lines[2:]] == ["| " + fq.VARIANT_NAMES[lab] for lab in mse]
    assert lines[2].startswith("| TopK (10) | 1 | 100 | — | +25.0% |") and lines[2].endswith("| 0.00% | — |")
    assert "| 1 | 120 | +20.0% | +50.0% |" in lines[5] and lines[5].endswith("| 3.00% | 1.50% |")
    # a second seed of TopK and top-1 (`sweep --seed 1`): mean ± seed std, and Welch's p between them
    more = [{**base, "key": f"k1-{lab}", "mse": m, "seed": 1} for lab, m in (("topk", 102.0), ("flop-matched-4", 81.0))]
    (folder / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records + more))
    more_dup = [{"label": lab, "key": f"k1-{lab}", "n_latents": 10, "duplicate_frac": 0.03} for lab in ("topk", "flop-matched-4")]
    (folder / "duplication.jsonl").write_text("".join(json.dumps(d) + "\n" for d in dup + more_dup))
    lines = fq.variants_table_markdown("ci").splitlines()
    from scipy import stats
    p_value = stats.ttest_ind([100.0, 102.0], [80.0, 81.0], equal_var=False).pvalue
    assert lines[2].startswith(f"| TopK (10) | 2 | 101 ± 1 | — | {101 / 80.5 - 1:+.1%} (p = {p_value:.2g}) |")
    assert lines[2].endswith("| 1.50% | — |")  # mean of its two seeds' 0% and 3%
    assert lines[4].startswith("| " + fq.VARIANT_NAMES["top-2 (8x)"] + " (10) | 1 | 90 | -10.9% | +11.8% |")
    (folder / "duplication.jsonl").unlink()
    assert fq.variants_table_markdown("ci") == ""


def test_readme_variants_table_is_the_committed_tables():
    """The README's table of the cpu variants grid recomputes from data/results/variants/cpu/."""
    from switch_sae_core.analysis import feature_quality as fq
    from switch_sae_core.paths import project_root

    table = fq.variants_table_markdown("cpu")
    assert table.count("\n") >= 6 and table in (project_root() / "README.md").read_text()
