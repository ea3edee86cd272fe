"""claims.py and checks.py: every verdict follows from its numbers (cases that a wrong rule would get wrong)."""
import pytest

from switch_sae_core import checks, claims
from switch_sae_core.profiles import get_profile


def test_relearning_is_said_only_when_duplicates_back_it():
    # notebook 05 once said "experts re-learn each other's features" while reporting 0.00% duplication
    assert "re-learn" not in claims.relearning_verdict(0.30, 0.20, dup=0.0, dup_control=0.0)
    assert "no more features have a near-copy" in claims.relearning_verdict(0.30, 0.20, dup=0.0, dup_control=0.0)
    assert "re-learn" in claims.relearning_verdict(0.30, 0.20, dup=0.05, dup_control=0.0)
    assert claims.relearning_verdict(0.201, 0.200, dup=0.05, dup_control=0.0).startswith("about equal")
    assert claims.relearning_verdict(0.10, 0.20, dup=0.05, dup_control=0.0).startswith("lower")


def test_repeated_words_are_joined_once():
    # notebook 05 once printed "(about equal and about equal)"
    assert claims.join_words(["about equal", "about equal"]) == "both about equal"
    assert claims.join_words(["lower", "higher"]) == "lower and higher"
    assert claims.join_words(["a", "b", "c"]) == "a, b and c"
    assert claims.join_words(["a"]) == "a"


def test_frequency_verdict():
    q = lambda *fs: [{"frac_duplicated": f} for f in fs]  # noqa: E731
    assert claims.frequency_verdict(q(0.0, 0.0, 0.0, 0.0)).startswith("cannot be judged")
    assert claims.frequency_verdict(q(0.0, 0.01, 0.02, 0.05)) == "holds"
    assert claims.frequency_verdict(q(0.05, 0.01, 0.0, 0.0)) == "does not hold"


def test_claim_verdict_shares():
    check = lambda w, n, held: {"claim": "x", "wins": w, "compared": n, "held": held}  # noqa: E731
    assert claims.claim_verdict(check(4, 4, True)).startswith("**held**")
    assert claims.claim_verdict(check(3, 4, False)).startswith("**mostly held**")
    assert claims.claim_verdict(check(2, 4, False)).startswith("**did not hold**")
    assert claims.claim_verdict(check(0, 0, None)).startswith("not comparable")
    assert claims.claim_verdict(None) == "n/a"


def _record(arch, n, mse_curve, table_mse, curve_rows=4096):
    return {"setting": "baseline" if arch == "topk" else "flop_matched", "arch": arch, "n_experts": n, "k": 8,
            "label": "topk" if arch == "topk" else f"switch-{n}", "batch_size": 10, "flops_per_input": 100,
            "curve": {"step": [10, 20, 30], "mse": mse_curve}, "mse": table_mse, "curve_rows": curve_rows}


def test_sample_efficiency_target_is_the_tables_final_mse():
    topk = _record("topk", 1, [9.0, 6.0, 4.0], 4.0)
    switch = _record("switch", 2, [8.0, 4.0, 3.0], 3.0)
    se = checks.sample_efficiency([topk, switch], k=8)
    assert se["target"] == topk["mse"] and se["topk_steps"] == 30
    assert se["speedups"]["switch-2"] == pytest.approx(30 / 20)
    text = claims.sample_efficiency_report({8: se}, get_profile("ci"))
    assert "**held**" in text and "1 of 1" in text and "1.5x" in text
    # an older record (curve on other rows than the table): the target stays on the curve's scale
    old = dict(topk, mse=3.9, curve_rows=None)
    assert checks.sample_efficiency([old, switch], k=8)["target"] == 4.0


def test_sample_efficiency_report_does_not_call_nothing_a_success():
    topk = _record("topk", 1, [9.0, 6.0, 4.0], 4.0)
    slow = _record("switch", 2, [9.5, 8.0, 5.0], 5.0)
    se = checks.sample_efficiency([topk, slow], k=8)
    assert se["speedups"]["switch-2"] is None
    text = claims.sample_efficiency_report({8: se}, get_profile("ci"))
    assert "**did not hold**" in text and "never reaches it" in text


def test_silhouette_claim():
    assert claims.silhouette_claim(0.2, 0.05) == "holds here"
    assert claims.silhouette_claim(0.05, 0.2) == "is reversed here"
    assert claims.silhouette_claim(0.1, 0.105).startswith("is not visible")


def test_seed_comparison_against_a_hand_computed_case():
    from switch_sae_core.checks import seed_comparison
    from switch_sae_core.claims import seed_comparison_report

    recs = ([{"label": "topk", "mse": v} for v in (100.0, 102.0, 98.0)]
            + [{"label": "switch-2", "mse": v} for v in (90.0, 91.0, 89.0)]  # 10% better, spread 1-2
            + [{"label": "switch-4", "mse": v} for v in (99.0, 103.0, 101.0)]  # +1%, within the spread
            + [{"label": "switch-8", "mse": 80.0}])  # one seed: cannot be judged
    rows = {r["label"]: r for r in seed_comparison(recs)}
    assert rows["topk"]["mean"] == 100.0 and rows["topk"]["std"] == pytest.approx(2.0)
    assert rows["switch-2"]["relative"] == pytest.approx(-0.10) and rows["switch-2"]["beyond_spread"] is True
    assert rows["switch-2"]["p_value"] < 0.01
    assert rows["switch-4"]["diff"] == pytest.approx(1.0) and rows["switch-4"]["beyond_spread"] is False
    assert rows["switch-8"]["beyond_spread"] is None and rows["switch-8"]["p_value"] is None
    text = seed_comparison_report(list(rows.values()))
    assert "switch-2: mse 90 +- 1 (3 seeds): -10.0% vs the baseline, larger than the seed spread" in text
    assert "switch-4" in text and "within the seed spread" in text and "too few seeds to judge" in text
    with pytest.raises(ValueError, match="no 'topk' records"):
        seed_comparison([{"label": "relu", "mse": 1.0}])


def test_convergence_check_pairs_each_doubled_sae_with_its_own_seed():
    from switch_sae_core.checks import convergence_check
    from switch_sae_core.claims import convergence_report

    topk = {"arch": "topk", "k": 32}
    sw = {"arch": "switch", "n_experts": 2, "k": 32}
    recs = [{"label": "topk", "k": 32, "steps": 100, "seed": 0, "mse": 100.0, "sae_config": topk},
            {"label": "topk", "k": 32, "steps": 100, "seed": 1, "mse": 200.0, "sae_config": topk},
            {"label": "switch-2", "k": 32, "steps": 100, "seed": 0, "mse": 50.0, "sae_config": sw}]
    doubled = [{"label": "topk", "seed": 0, "mse": 98.0, "sae_config": topk},     # -2%: converged
               {"label": "switch-2", "seed": 0, "mse": 45.0, "sae_config": sw},   # -10%: not
               {"label": "topk", "seed": 5, "mse": 1.0, "sae_config": topk}]      # no pair: left out
    rows = convergence_check(recs, doubled)
    assert [(r["label"], round(r["change"], 3), r["converged"]) for r in rows] == [("topk", 0.02, True),
                                                                                    ("switch-2", 0.1, False)]
    text = convergence_report(rows)
    assert "100 -> 200 steps" in text and "topk (k=32): 100 -> 98 (-2.0%)" in text and "NOT converged" in text
    assert "converged by the rule" in convergence_report(rows[:1])
    assert "not shown to be converged" in convergence_report([])


def test_moved_from_init_line_and_near_initialisation():
    still = {"decoder_mean_abs_cos": 0.93, "encoder_mean_abs_cos": 0.91, "random": 0.033}
    moved = {"decoder_mean_abs_cos": 0.41, "encoder_mean_abs_cos": 0.30, "random": 0.033}
    assert "still close" in claims.moved_from_init_line("Switch", still) and "0.930" in claims.moved_from_init_line("Switch", still)
    assert "moved far" in claims.moved_from_init_line("TopK", moved)
    assert checks.near_initialisation(0.93, 0.5, 0.2)  # features have not moved
    assert checks.near_initialisation(0.41, 0.22, 0.2)  # moved, but neighbours look random
    assert not checks.near_initialisation(0.41, 0.5, 0.2)


@pytest.mark.parametrize("cos, words", [(0.49, "has moved far from"), (0.51, "has NOT moved far from"),
                                        (0.79, "has NOT moved far from"), (0.81, "is still close to")])
def test_distance_words_on_both_sides_of_each_threshold(cos, words):
    assert checks.MOVED_FAR_COS == 0.5 and checks.NEAR_INIT_COS == 0.8
    assert claims.distance_words(cos) == words


def test_moved_from_init_line_on_the_quick_profiles_numbers_says_not_far():
    # issue 28: notebooks 04-05 said "moved away from their initialisation" at decoder 0.70, encoder 0.89
    line = claims.moved_from_init_line("Switch", {"decoder_mean_abs_cos": 0.70, "encoder_mean_abs_cos": 0.89, "random": 0.033})
    assert "moved away" not in line and "has moved far" not in line
    assert line.endswith("the decoder has NOT moved far from its initialisation, the encoder is still close to its initialisation")
    assert "below 0.5 counts as moved far, above 0.8 as still close" in line  # the thresholds are stated
    both = claims.moved_from_init_line("TopK", {"decoder_mean_abs_cos": 0.10, "encoder_mean_abs_cos": 0.20, "random": 0.033})
    assert both.endswith("the decoder has moved far from its initialisation, the encoder has moved far from its initialisation")


def test_budget_words_on_both_sides_of_each_threshold():
    # the quick profile's numbers (decoder 0.70, encoder 0.89) once read "well away from their random initialisation"
    assert claims.budget_words(0.70, 0.89, 0.5, 0.2).startswith("NOT far")
    assert claims.budget_words(0.81, 0.30, 0.5, 0.2).startswith("still close")
    assert claims.budget_words(0.70, 0.40, 0.5, 0.2).startswith("NOT far")
    assert claims.budget_words(0.40, 0.51, 0.5, 0.2).startswith("NOT far")
    assert claims.budget_words(0.40, 0.49, 0.5, 0.2).startswith("well away")
    assert claims.budget_words(0.40, 0.49, 0.24, 0.2).startswith("still close")  # neighbours look random


def test_every_tolerance_decides_on_both_sides():
    t = claims.SILHOUETTE_TOL
    assert claims.silhouette_claim(0.1 + 1.5 * t, 0.1) == "holds here"
    assert claims.silhouette_claim(0.1 + 0.5 * t, 0.1).startswith("is not visible")
    d = claims.DUPLICATE_TOL
    q = lambda *fs: [{"frac_duplicated": f} for f in fs]  # noqa: E731
    assert claims.frequency_verdict(q(0.01, 0.0, 0.0, 0.01 + 1.5 * d)) == "holds"
    assert claims.frequency_verdict(q(0.01, 0.0, 0.0, 0.01 + 0.5 * d)) == "does not hold"
    s = claims.SIMILARITY_TOL
    assert claims.relearning_verdict(0.2 + 1.5 * s, 0.2, dup=0.05, dup_control=0.0).startswith("higher")
    assert claims.relearning_verdict(0.2 + 0.5 * s, 0.2, dup=0.05, dup_control=0.0).startswith("about equal")
    assert "re-learn" in claims.relearning_verdict(0.3, 0.2, dup=1.5 * d, dup_control=0.0)
    assert "re-learn" not in claims.relearning_verdict(0.3, 0.2, dup=0.5 * d, dup_control=0.0)
    check = lambda w, n: {"claim": "x", "wins": w, "compared": n, "held": w == n}  # noqa: E731
    assert claims.claim_verdict(check(75, 100)).startswith("**mostly held**")  # exactly 3/4
    assert claims.claim_verdict(check(74, 100)).startswith("**did not hold**")
    assert "3/4" in claims.MOSTLY_HELD_SHARE_WORDS


def test_convergence_report_judges_an_sae_checked_at_several_seeds_on_its_mean_change():
    from switch_sae_core.checks import convergence_check
    from switch_sae_core.claims import convergence_report

    sw = {"arch": "switch", "n_experts": 2, "k": 32}
    recs = [{"label": "switch-2", "k": 32, "steps": 100, "seed": s, "mse": 100.0, "sae_config": sw} for s in (0, 1, 2)]

    def doubled(mses):
        return [{"label": "switch-2", "seed": s, "mse": m, "sae_config": sw} for s, m in zip((0, 1, 2), mses)]

    rows = convergence_check(recs, doubled([96.7, 97.5, 97.8]))  # -3.3%, -2.5%, -2.2%: mean -2.67%
    assert [r["converged"] for r in rows] == [False, True, True]
    text = convergence_report(rows)
    assert "switch-2 (k=32), 3 seeds: mean -2.7% ± 0.6%" in text and "(-3.3%)" in text
    assert "This profile is converged by the rule." in text
    assert "NOT converged" in convergence_report(convergence_check(recs, doubled([96.0, 97.0, 97.0])))  # mean -3.3%
    # two SAEs with one label (e.g. switch-2 at two widths) are two SAEs, not two seeds of one
    wide = {"arch": "switch", "n_experts": 2, "k": 32, "n_features": 2}
    two = convergence_check(recs[:1] + [{**recs[0], "sae_config": wide}],
                            doubled([99.0]) + [{"label": "switch-2", "seed": 0, "mse": 90.0, "sae_config": wide}])
    assert "seeds" not in convergence_report(two) and "switch-2 (k=32) converged by the rule, switch-2 (k=32) did not" \
        in convergence_report(two)
    # one SAE converged, one not: the sentence names which
    topk = {"arch": "topk", "k": 32}
    mixed = convergence_check(recs + [{"label": "topk", "k": 32, "steps": 100, "seed": 0, "mse": 100.0,
                                       "sae_config": topk}],
                              doubled([96.0, 97.0, 97.0]) + [{"label": "topk", "seed": 0, "mse": 99.0,
                                                              "sae_config": topk}])
    assert "NOT converged as a whole: topk (k=32) converged by the rule, switch-2 (k=32) did not" in convergence_report(mixed)


def test_every_claims_name_a_notebook_or_doc_uses_exists():
    """The split into checks (numbers) and claims (sentences) left every `claims.X` the notebooks call in place."""
    import re

    from switch_sae_core.paths import project_root

    root = project_root()
    used = {m for path in [*root.glob("notebooks/*.ipynb"), *root.glob("docs/*.md"), root / "README.md"]
            for m in re.findall(r"\bclaims\.([A-Za-z_]\w*)", path.read_text())} - {"py"}
    assert {"paper_reference", "sample_efficiency"} <= used
    assert [name for name in sorted(used) if not hasattr(claims, name)] == []
    assert claims.paper_reference is checks.paper_reference  # one function, named in both
