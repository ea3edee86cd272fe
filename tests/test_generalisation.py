"""The generalisation table (analysis/sites.py, issue 23): every number recomputed here another way from the
committed `cpu` table, and a site whose table is still being filled draws no verdict."""
from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
from scipy import stats

from switch_sae_core.analysis import sites
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
    rows = {r.label: r for r in sites.site_rows("cpu")}
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
    assert "every FLOP-matched Switch SAE beats TopK" in sites.site_verdict("cpu")
    partial = tmp_path / "cpu"
    partial.mkdir()
    (partial / RESULTS_FILE).write_text("\n".join(cpu_claim_lines()[:5]) + "\n")
    verdict = sites.site_verdict("cpu", partial)
    assert "incomplete (5 of 11 SAEs recorded)" in verdict and "beats" not in verdict
    lines = sites.table_markdown(("cpu",), {"cpu": partial}).splitlines()
    assert len(lines) == 2 + len({json.loads(line)["label"] for line in cpu_claim_lines()[:5]})


def test_expected_count_is_the_site_scripts():
    from test_sites import expected_runs

    for name in ("cpu_l10", "cpu_gemma"):
        assert sites.expected_saes(get_profile(name)) == len(expected_runs(get_profile(name))) == 15
