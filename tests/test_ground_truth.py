"""ground_truth: summaries, the 2x rule and verdict words on constructed SynthSAEBench tables."""
from switch_sae_core import ground_truth as gt


def _rec(label, seed, steps, **m):
    base = dict(mse=10.0, mcc=0.6, f1=0.5, uniqueness=0.8, precision=0.5, recall=0.5, explained_variance=0.9,
                recovered_frac_frequent=0.5, recovered_frac=0.2, dead_latents=0, cross_expert_duplicate_frac=0.02)
    return {"label": label, "seed": seed, "steps": steps, **{**base, **m}}


def _table(shift_label="flop-matched-2", **shift):
    recs = []
    for seed, eps in enumerate((-0.01, 0.0, 0.01)):
        recs.append(_rec("topk", seed, 100, mse=10 + eps, mcc=0.6 + eps))
        recs.append(_rec("sae-lens topk", seed, 100, mse=10 - eps, mcc=0.6 - eps))
        recs.append(_rec(shift_label, seed, 100, **{k: v + eps for k, v in shift.items()}))
    recs += [_rec("topk", 0, 200, mse=9.9), _rec(shift_label, 0, 200, mse=8.0)]
    return recs


def test_convergence_uses_the_2x_rule():
    conv = {c["label"]: c for c in gt.convergence(_table(mse=10.0))}
    assert conv["topk"]["converged"] and abs(conv["topk"]["change"] - (9.99 - 9.9) / 9.99) < 1e-9  # seed 0 mse 9.99
    assert not conv["flop-matched-2"]["converged"]  # 9.99 -> 8.0 is a 20% drop
    assert "NOT converged: flop-matched-2" in gt.verdicts(_table(mse=10.0))[0]


def test_a_shift_beyond_the_spread_is_named_with_its_direction():
    recs = _table(mcc=0.5, f1=0.5, mse=10.0)  # mcc 0.1 below TopK's, seed std 0.01
    row = gt.compare(recs, "flop-matched-2", "topk", "mcc")
    assert row["real"] and row["diff"] < 0
    sentence = next(s for s in gt.verdicts(recs) if s.startswith("At equal FLOPs"))
    assert "flop-matched-2: MCC WORSE" in sentence
    same = gt.compare(recs, "flop-matched-2", "topk", "f1")  # identical means: no real difference
    assert not same["real"]


def test_cross_implementation_agreement_within_the_spread():
    assert "agree within the seed spread" in gt.verdicts(_table(mse=10.0))[1]
    recs = [r if r["label"] != "sae-lens topk" else {**r, "mse": r["mse"] + 1} for r in _table(mse=10.0)]
    assert "DIFFER" in gt.verdicts(recs)[1]


def test_summary_is_at_the_main_length_only():
    rows = {r["label"]: r for r in gt.summary(_table(mse=10.0))}
    assert rows["topk"]["n"] == 3 and abs(rows["topk"]["mse"] - 10.0) < 1e-9


def test_the_scale_sae_claim_needs_lower_mse_and_half_the_duplicates():
    def table(mse, dup):
        recs = []
        for seed, eps in enumerate((-0.01, 0.0, 0.01)):
            recs.append(_rec("topk", seed, 100))
            recs.append(_rec("sae-lens topk", seed, 100))
            recs.append(_rec("flop-matched-4", seed, 100, mse=10 + eps, cross_expert_duplicate_frac=0.2))
            recs.append(_rec("scale (8x)", seed, 100, mse=mse + eps, cross_expert_duplicate_frac=dup))
        return next(s for s in gt.verdicts(recs) if s.startswith("Scale SAE"))

    assert "HELD" in table(mse=8.0, dup=0.05) and "fewer by 75%" in table(mse=8.0, dup=0.05)
    assert "did NOT hold" in table(mse=8.0, dup=0.15)  # duplicates cut by a quarter only
    assert "did NOT hold" in table(mse=12.0, dup=0.05) and "MSE WORSE" in table(mse=12.0, dup=0.05)
    assert "MORE by 50%" in table(mse=10.0, dup=0.3)


def test_a_difference_is_real_only_beyond_the_spread_and_below_the_p_value():
    from switch_sae_core import checks

    assert checks.is_real({"beyond_spread": True, "p_value": 0.01})
    assert not checks.is_real({"beyond_spread": True, "p_value": checks.P_VALUE})  # strictly below
    assert not checks.is_real({"beyond_spread": False, "p_value": 1e-9})
    assert not checks.is_real({"beyond_spread": None, "p_value": None})  # the baseline / one seed: no test


def test_readme_table_is_the_committed_table():
    """The README's SynthSAEBench table recomputes from data/results/synthsaebench/4k/records.jsonl: a number
    typed by hand, or a table left behind when the records change, fails here."""
    from switch_sae_core.paths import project_root

    table = gt.table_markdown(gt.bench_records("4k"))
    assert table.count("\n") >= 5
    assert table in (project_root() / "README.md").read_text()


def test_table_markdown_rows_and_latents():
    recs = [{**_rec(lab, s, 100), "sae": sae} for s in range(2) for lab, sae in (
        ("topk", {"n_features": 64, "n_experts": 1}),
        ("shared (8x)", {"n_features": 256, "n_experts": 8, "shared_expert": True}))]
    lines = gt.table_markdown(recs).splitlines()
    assert lines[2].startswith("| TopK (64) | 2 | 10.00 ± 0.00 | 0.600 ± 0.000 |")
    assert lines[3].startswith("| shared expert + 1 of 8 experts, k/2 each (288) |") and lines[3].endswith("| 2.0% |")


def test_a_label_of_the_grid_on_another_configuration_is_refused():
    """SynthSAEBench resume: a record whose label the grid uses for ANOTHER SAE now (top-2 at k per expert when
    the grid trains k/2) would be skipped as done and averaged with the new ones under one label: refused."""
    import pytest

    from switch_sae_core.config import ConfigError
    from switch_sae_core.interop import synthsaebench as sb

    configs = sb.grid_configs(sb.SCALES["ci"])
    ok = [{"label": "top-2 (8x)", "sae": configs["top-2 (8x)"]},
          {"label": "top-2 (8x, L0 2k)", "sae": {**configs["top-2 (8x)"], "k": 2 * configs["top-2 (8x)"]["k"]}}]
    assert sb._records_of_this_grid(ok, configs, "t.jsonl") == ok[:1]  # a relabelled old arm is kept apart
    stale = {"label": "top-2 (8x)", "sae": {**configs["top-2 (8x)"], "k": 2 * configs["top-2 (8x)"]["k"]}}
    with pytest.raises(ConfigError, match=r"records labelled \['top-2 \(8x\)'\] of another SAE configuration"):
        sb._records_of_this_grid(ok + [stale], configs, "t.jsonl")
    assert sb.grid_configs(sb.SCALES["4k"])["shared (8x)"]["k"] == 3  # k/2 per active expert at k = 6


def test_the_grid_is_read_at_its_longest_complete_length():
    """A grid retrained twice as long takes over only once every label and seed has its run there and seed 0 its
    2x check: a half-finished longer grid leaves the tables on the length that is complete."""
    labels = ("topk", "sae-lens topk", "flop-matched-2")
    short = [_rec(label, seed, 100) for label in labels for seed in range(3)] + [_rec(l, 0, 200) for l in labels]
    assert gt.main_steps(short) == 100
    partial = short + [_rec(label, 1, 200) for label in labels]
    assert gt.main_steps(partial) == 100 and {r["n"] for r in gt.summary(partial)} == {3}
    longer = partial + [_rec(label, 2, 200) for label in labels]
    assert gt.main_steps(longer) == 100  # seeds complete at 200, but no 2x check at 400 yet
    complete = longer + [_rec(label, 0, 400, mse=9.0) for label in labels]
    assert gt.main_steps(complete) == 200
    conv = {c["label"]: c for c in gt.convergence(complete)}
    assert abs(conv["topk"]["change"] - (10.0 - 9.0) / 10.0) < 1e-9  # 200 against 400, not 100 against 200
    assert gt.main_steps([]) == 0
