"""The tables the notebooks show are the library's: each holds its analysis' numbers, row for row, under the
names the notebook's prose uses (the values are checked against the inputs, read another way)."""
import math

import pytest
import torch

from switch_sae_core import ground_truth, results
from switch_sae_core.analysis import expert_study, recovery, router, scaling, similarity


def test_records_table_is_the_results_table_sorted_by_setting_and_name():
    recs = [{"name": n, "setting": s, "mse": m, "ce_clean": 1.0, "ce_sae": 1.5} for n, s, m in
            [("b", "topk", 0.123456), ("a", "switch", 0.2), ("a", "topk", 0.3)]]
    df = results.records_table([{**{c: None for c in results.TABLE_COLUMNS}, **r} for r in recs])
    assert list(df.columns) == results.TABLE_COLUMNS
    assert list(zip(df["setting"], df["name"])) == [("switch", "a"), ("topk", "a"), ("topk", "b")]
    assert df["mse"].tolist() == [0.2, 0.3, 0.1235] and (df["delta_ce"] == 0.5).all()


def test_router_tables_hold_router_geometry_numbers():
    side = lambda d, o, b: {"diag_mean": d, "offdiag_mean": o, "own_is_best": b}  # noqa: E731
    geo = {"alignment": {"encoder": side(0.5, -0.1, 0.75), "decoder": side(0.2, 0.0, 0.25)},
           "pooled": {"accuracy": 0.61, "chance": 0.2}, "pooled_rows": {"accuracy": 0.4},
           "probe": {"accuracy": 0.7}, "probe_activations": {"accuracy": 0.9}}
    al = router.alignment_table(geo)
    assert al.loc["encoder"].tolist() == [0.5, -0.1, 0.75] and al.loc["decoder"].tolist() == [0.2, 0.0, 0.25]
    ag = router.agreement_table(geo)["agrees with the router"]
    assert ag.tolist() == [0.61, 0.4, 0.7, 0.9, 0.2] and ag.index[-1] == "chance (most loaded expert)"


class _SAE:
    def __init__(self, m):
        self.m = m

    def decoder_directions(self):
        return torch.zeros(self.m, 4)


def _study():
    """A study dict shaped as `expert_similarity_study` returns it, with numbers that differ per SAE."""
    names = ["switch-8", "shared expert", "top_e=2", "TopK"]
    bins = lambda f: [{"label": f"q{i + 1}", "n": 10 + i, "frac_duplicated": f * i, "mean_nn_cos": 0.1 * i}  # noqa: E731
                      for i in range(4)]
    dup = {(n, scope): {"frac_duplicated": 0.01 * i + (0.5 if scope == "anywhere" else 0), "mean_nn_cos": 0.3 + 0.1 * i,
                        "by_frequency": bins(0.01 * (i + 1))}
           for i, n in enumerate(names) for scope in ("other_expert", "anywhere")}
    return {"saes": {n: _SAE(8 * (i + 1)) for i, n in enumerate(names)},
            "fvu": {n: 0.1 * (i + 1) for i, n in enumerate(names)},
            "freq": {n: torch.tensor([0.0, 0.5, 0.0, 0.1][: i + 1] + [0.2] * (3 - i)) for i, n in enumerate(names)},
            "moved": {n: {"decoder_mean_abs_cos": 0.2 + i / 10, "encoder_mean_abs_cos": 0.4} for i, n in enumerate(names)},
            "summary": {"switch": (0.3, 0.2), "control": (0.25, 0.21)}, "dup": dup,
            "match": {"Switch -> TopK": {"best_cos": torch.tensor([0.95, 0.5, 0.91, 0.1]),
                                         "assigned_cos": torch.tensor([0.9, float("nan"), 0.5, 0.1])}},
            "hungarian": True, "cka": {"switch-8": (0.8, 0.7), "activations": (0.5, 0.4)}}


def test_expert_study_tables_hold_the_study_numbers():
    st = _study()
    t = expert_study.sae_table(st)
    assert t["features"].tolist() == [8, 16, 24, 32] and t["FVU"].tolist() == [0.1, 0.2, 0.3, 0.4]
    assert t["dead on held-out"].tolist() == [0.25, 0.25, 0.5, 0.5] and t["decoder |cos| to init"].tolist() == [0.2, 0.3, 0.4, 0.5]
    assert expert_study.similarity_table(st).loc["control"].tolist() == [0.25, 0.21]
    d = expert_study.duplication_table(st)
    assert d.loc["TopK"].tolist() == [0.03, 0.53, 0.6]
    f = expert_study.frequency_table(st["dup"][("TopK", "other_expert")]["by_frequency"])
    assert f["features"].tolist() == [10, 11, 12, 13] and f["duplicated"].tolist() == [0.0, 0.04, 0.08, 0.12]
    m = expert_study.matching_table(st).loc["Switch -> TopK"]
    assert m.tolist() == [round(0.615, 3), 0.5, 0.5]  # mean best cos, share > DUPLICATE_COSINE, Hungarian nanmean
    assert f"best cosine > {similarity.DUPLICATE_COSINE}" in m.index
    assert expert_study.cka_table(st).loc["activations"].tolist() == [0.5, 0.4]
    v = expert_study.variant_table(st, ["switch-8", "top_e=2"])
    assert v.loc["top_e=2"].tolist() == [0.02, 0.09, 0.5, 0.3]


def test_recovery_table_has_the_documented_columns():
    row = {c: 0.12345 for c in recovery.TABLE_COLUMNS} | {"name": "topk", "setting": "baseline", "extra": 1}
    df = recovery.recovery_table([row])
    assert list(df.columns) == recovery.TABLE_COLUMNS and df["mmcs"].tolist() == [0.123]


def test_scaling_table_is_the_points():
    pts = [{c: i for c in scaling.TABLE_COLUMNS} | {"steps": 3} for i in range(3)]
    table = scaling.ScalingAnalysis(pts, {}, {}).table()
    assert list(table.columns) == scaling.TABLE_COLUMNS and table["mse"].tolist() == [0, 1, 2]


def test_ground_truth_summary_table_keeps_the_metrics_it_has_with_their_spread():
    recs = [{"label": "topk", "steps": 10, "mcc": v, "f1": 0.5} for v in (0.1, 0.3)]
    table = ground_truth.summary_table(ground_truth.summary(recs))
    assert list(table.columns) == ["label", "n", "mcc", "mcc_std", "f1", "f1_std"]
    assert table.iloc[0]["mcc"] == pytest.approx(0.2) and table.iloc[0]["mcc_std"] == pytest.approx(round(math.sqrt(0.02), 4))
