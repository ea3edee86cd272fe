"""The generalisation table (analysis/sites.py, issue 23): every number recomputed here another way from the
committed `cpu` table, and a site whose table is still being filled draws no verdict."""
from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
from scipy import stats

from switch_sae_core.analysis import site_claims, sites
from switch_sae_core.profiles import get_profile
from switch_sae_core.results import RESULTS_FILE

ROOT = Path(__file__).resolve().parents[1]
CPU_TABLE = ROOT / "data" / "results" / "cpu" / RESULTS_FILE


def cpu_claim_lines() -> list[str]:
    """The committed cpu table's k = 32 TopK and FLOP-matched Switch lines at the profile's 4000 steps, found by
    reading the JSON fields directly (not through results.profile_records)."""
    keep = []
    for line in CPU_TABLE.read_text().splitlines():
        r = json.loads(line)
        if r["k"] == 32 and r["steps"] == 4000 and r["setting"] in ("baseline", "flop_matched"):
            keep.append(line)
    return keep


def test_cpu_rows_recomputed_from_the_raw_table():
    raw = [json.loads(line) for line in cpu_claim_lines()]
    rows = {r.label: r for r in sites.site_rows("cpu") if not r.label.startswith("fixed-")}  # fixed width: below
    assert sorted(rows) == sorted({r["label"] for r in raw}) == ["switch-2", "switch-4", "topk"]
    topk_mse = [r["mse"] for r in raw if r["label"] == "topk"]
    for label, row in rows.items():
        mine = [r for r in raw if r["label"] == label]
        assert row.seeds == (0, 1, 2)
        mse = [r["mse"] for r in mine]
        assert row.mean["mse"] == pytest.approx(statistics.fmean(mse))
        assert row.std["mse"] == pytest.approx(statistics.stdev(mse))
        assert row.mean["delta_ce"] == pytest.approx(statistics.fmean(r["ce_sae"] - r["ce_clean"] for r in mine))
        assert row.mean["kl"] == pytest.approx(statistics.fmean(r["kl"] for r in mine))
        if label != "topk":
            assert row.mse_vs_topk == pytest.approx(statistics.fmean(mse) / statistics.fmean(topk_mse) - 1)
            assert row.p_value == pytest.approx(stats.ttest_ind(mse, topk_mse, equal_var=False).pvalue)
            assert row.real and row.mse_vs_topk < 0  # the README's claim at this site


def test_verdict_of_a_complete_site_and_of_one_still_running(tmp_path):
    seed0_check = get_profile("cpu").replace(convergence_seeds=(0,))  # the check as it was committed: seed 0
    assert sites.missing_jobs(seed0_check) == []
    assert "every FLOP-matched Switch SAE beats TopK" in sites.site_verdict(seed0_check)
    assert "converged by the rule" in sites.site_verdict(seed0_check)
    partial = tmp_path / "cpu"
    partial.mkdir()
    (partial / RESULTS_FILE).write_text("\n".join(cpu_claim_lines()[:5]) + "\n")
    verdict = sites.site_verdict(seed0_check, partial)
    assert "incomplete (5 of 13 SAEs recorded; missing " in verdict and "beats" not in verdict
    lines = sites.table_markdown(("cpu",), {"cpu": partial}).splitlines()
    assert len(lines) == 2 + len({json.loads(line)["label"] for line in cpu_claim_lines()[:5]})


def test_expected_jobs_are_the_site_scripts():
    from test_sites import expected_runs

    for name in ("cpu_l10", "cpu_gemma"):
        jobs = sites.expected_jobs(name)
        runs = {("topk" if j["label"] == "topk" else "switch", 1 if j["label"] == "topk" else int(j["label"].split("-")[-1]),
                 j["seed"], j["steps"]) for j in jobs.values()}
        assert runs == expected_runs(get_profile(name)) and len(jobs) == 15
    assert len(sites.expected_jobs("cpu_wide")) == 16  # + fixed-width Switch-16 at seed 0
    assert len(sites.expected_jobs("cpu")) == 17  # + fixed-width Switch-4 and -16 at seed 0


def test_a_site_reads_only_its_own_sae_configs(monkeypatch):
    """cpu_wide has cpu's data and training: only the configs (M = 8·d) tell their records apart, also when
    $SWITCH_SAE_RESULTS points at cpu's table (as `switch-sae reproduce --profile cpu` sets it)."""
    cpu_dir = CPU_TABLE.parent
    assert sites.claim_records("cpu_wide", cpu_dir) == []  # cpu's table, read as cpu_wide's, holds none of its SAEs
    own_rows, own_verdict = sites.site_rows("cpu_wide"), sites.site_verdict("cpu_wide")  # its own table, as it is
    monkeypatch.setenv("SWITCH_SAE_RESULTS", str(cpu_dir))
    assert sites.site_rows("cpu_wide") == own_rows and sites.site_verdict("cpu_wide") == own_verdict


def test_readme_shows_the_computed_block(tmp_path):
    readme = (ROOT / "README.md").read_text()
    begin, end = sites.README_MARKERS
    assert f"{begin}\n{sites.readme_block()}\n{end}" in readme, \
        "README's generalisation section is stale: python -m switch_sae_core.analysis.sites README.md"
    copy = tmp_path / "README.md"
    copy.write_text(readme.replace(sites.readme_block(), "old numbers"))
    assert sites.update_readme(copy) and copy.read_text() == readme and not sites.update_readme(copy)
    for broken in ("no markers", f"{end}\n{begin}"):
        copy.write_text(broken)
        with pytest.raises(ValueError, match="markers"):
            sites.update_readme(copy)


def fake(label: str, seed: int, mse: float) -> dict:
    return {"label": label, "seed": seed, "mse": mse}


@pytest.mark.parametrize("switch_mse, word", [((90.0, 91.0, 89.0), "held"), ((110.0, 111.0, 109.0), "FAILED"),
                                              ((99.0, 101.5, 100.2), "not resolved")])
def test_claim_cells_read_the_seed_comparison(switch_mse, word):
    recs = [fake("topk", s, m) for s, m in enumerate((100.0, 100.5, 99.5))]
    recs += [fake("switch-4", s, m) for s, m in enumerate(switch_mse)]
    cell = site_claims.compare_cell(recs, "switch-4", "topk", "mse")
    assert cell.startswith(word + ":")
    rel = statistics.fmean(switch_mse) / 100.0 - 1
    assert f"{rel:+.1%}" in cell
    assert site_claims.compare_cell(recs[:1] + recs[3:], "switch-4", "topk", "mse").startswith("1 seed, not judged")
    higher = site_claims.compare_cell(recs, "switch-4", "topk", "mse", lower=False)
    assert higher.startswith({"held": "FAILED", "FAILED": "held", "not resolved": "not resolved"}[word] + ":")


def test_claims_matrix_of_a_partial_site_says_so(tmp_path):
    partial = tmp_path / "cpu"
    partial.mkdir()
    lines = cpu_claim_lines()
    topk_and_one = [line for line in lines if json.loads(line)["label"] == "topk"] + \
                   [line for line in lines if json.loads(line)["label"] == "switch-4"][:1]
    (partial / RESULTS_FILE).write_text("\n".join(topk_and_one) + "\n")
    matrix = site_claims.claims_matrix(("cpu",), {"cpu": partial}, {"cpu": tmp_path / "no_schedules"})
    assert all(c["cpu"] == "—" or (c["cpu"].startswith("1 seed, not judged") and c["cpu"].endswith("(site incomplete)"))
               for c in matrix.values())
    full = site_claims.claims_matrix(("cpu",))
    fixed_width = "At equal width, fixed-width Switch-16 reconstructs worse than TopK (held-out MSE)"
    assert full[fixed_width]["cpu"].startswith("1 seed, not judged: +24")  # README: Switch-16 +24.2% at seed 0
    mse_rows = [c for c in full if "(held-out MSE)" in c and c != fixed_width]
    assert all(full[c]["cpu"].startswith("held:") for c in mse_rows)


def test_steps_to_final_mse_interpolates_in_log_steps_and_never_extrapolates():
    from switch_sae_core.checks import steps_to_final_mse

    curve = [(1000, 130.0), (2000, 110.0), (4000, 100.0)]
    assert steps_to_final_mse(curve, 120.0)["steps"] == pytest.approx((1000 * 2000) ** 0.5)  # halfway in log steps
    assert steps_to_final_mse(curve, 100.0)["steps"] == pytest.approx(4000)
    assert steps_to_final_mse(curve, 140.0) == {"steps": None, "at_most": 1000}
    assert steps_to_final_mse(curve[::-1], 90.0) == {"steps": None, "at_least": 4000}


def run(label: str, seed: int, steps: int, mse: float) -> dict:
    return {"label": label, "seed": seed, "steps": steps, "mse": mse, "batch_size": 1024}


def ladder(switch_by_seed: dict[int, list[tuple[int, float]]]) -> list[dict]:
    recs = []
    for seed, switch in switch_by_seed.items():
        recs += [run("topk", seed, s, m + seed) for s, m in ((1000, 150.0), (2000, 120.0), (4000, 100.0), (8000, 95.0))]
        recs += [run("switch-4", seed, s, m + seed) for s, m in switch]
    return recs


def test_schedule_efficiency_both_ways():
    from switch_sae_core.checks import schedule_efficiency

    recs = ladder({0: [(1000, 130.0), (2000, 100.0), (4000, 90.0)], 1: [(1000, 130.0), (2000, 100.0), (4000, 90.0)]})
    rows = schedule_efficiency(recs, "switch-4", 4000)
    assert [r["seed"] for r in rows] == [0, 1]
    assert rows[0]["steps"] == pytest.approx(2000) and rows[0]["speedup"] == pytest.approx(2.0)
    assert rows[0]["tokens"] == pytest.approx(2000 * 1024)
    assert rows[0]["baseline_steps"] == {"steps": None, "at_least": 8000}  # TopK never reaches 90 within 8000
    assert site_claims.fewer_steps_cell(recs, "switch-4", 4000).startswith("held: 2.00× ± 0.00 fewer steps (2000 ± 0 of 4000")
    assert site_claims.topk_needs_cell(recs, "switch-4", 4000) == "held: TopK needs > 2.00×, > 2.00× the steps (per seed)"


def test_schedule_cells_judge_bounds_per_seed():
    """Found in review: a bound at one seed must not turn a slower seed into 'held'."""
    slower_at_seed_1 = ladder({0: [(3000, 95.0), (4000, 90.0)], 1: [(3000, 103.0), (4000, 100.8)]})
    assert site_claims.fewer_steps_cell(slower_at_seed_1, "switch-4", 4000).startswith("not resolved: ≥ 1.33×, ")
    only_reference = ladder({0: [(3000, 95.0), (4000, 90.0)], 1: [(4000, 90.0)]})
    assert site_claims.fewer_steps_cell(only_reference, "switch-4", 4000).startswith("not resolved: ≥ 1.33×, ≥ 1.00×")
    never = ladder({0: [(2000, 130.0), (4000, 110.0)], 1: [(2000, 131.0), (4000, 111.0)]})
    assert site_claims.fewer_steps_cell(never, "switch-4", 4000).startswith("FAILED: ≤ 1.00×, ≤ 1.00×")


def test_convergence_pairs_records_written_before_and_after_a_config_field_was_added():
    """Found on the cpu table: its December-1 records' sae_config lacks fields added later (global_topk, ...), so
    the same SAE's 8000-step run of December 7 did not pair with its 4000-step run (seeds 1-2 were left out)."""
    from switch_sae_core.checks import convergence_check
    from switch_sae_core.config import SAEConfig

    old = json.loads(cpu_claim_lines()[0])
    new_cfg = SAEConfig.from_dict(old["sae_config"]).to_dict()
    assert new_cfg != old["sae_config"]  # the newer record stores the added fields at their default
    doubled = {**old, "sae_config": new_cfg, "steps": 8000, "mse": old["mse"] * 0.98}
    rows = convergence_check([old], [doubled])
    assert len(rows) == 1 and rows[0]["change"] == pytest.approx(0.02)


def test_claims_of_a_site_whose_saes_fail_the_convergence_rule_say_so():
    """cpu_l10 is complete, but its FLOP-matched Switch-2 still improves by more than 3% when trained twice as long:
    each of its cells carries that, as its verdict does."""
    assert "NOT converged" in sites.site_verdict("cpu_l10")
    cells = [c["cpu_l10"] for c in site_claims.claims_matrix(("cpu_l10",)).values() if c["cpu_l10"] != "—"]
    assert cells and all(c.endswith("(SAEs not converged)") for c in cells)
    assert not any(c["cpu"].endswith(")") and "not converged" in c["cpu"] for c in site_claims.claims_matrix(("cpu",)).values())
