"""results.records_frame: the CE increase in nats (delta_ce) beside loss recovered, for old and new records."""
import math

from switch_sae_core import results


def test_delta_ce_is_derived_for_records_written_before_it_and_kept_when_stored():
    old = {"name": "a", "ce_clean": 3.661, "ce_sae": 3.767, "ce_zero": 10.1}  # the TopK numbers
    new = {"name": "b", "ce_clean": 3.0, "ce_sae": 3.5, "delta_ce": 0.5}
    no_lm = {"name": "c", "ce_clean": None, "ce_sae": None}
    df = results.records_frame([old, new, no_lm]).set_index("name")
    assert abs(df.loc["a", "delta_ce"] - 0.106) < 1e-9 and df.loc["b", "delta_ce"] == 0.5
    assert math.isnan(df.loc["c", "delta_ce"])
    assert "delta_ce" in results.TABLE_COLUMNS


def test_the_committed_cpu_table_shows_delta_ce_in_nats():
    from switch_sae_core.paths import project_root

    df = results.records_frame(results.load_records(project_root() / "data/results/cpu/records.jsonl"))
    lm = df.dropna(subset=["ce_sae"])
    assert len(lm) and (lm["delta_ce"] == lm["ce_sae"] - lm["ce_clean"]).all() and (lm["delta_ce"] > 0).all()
