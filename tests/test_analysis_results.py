"""The analyses' typed results (`record.JsonResult`): each made by its real function goes through JSON text and
comes back the same: same types, tensors of the same dtype and shape with the same values (nan where nan),
nested results and tuple keys rebuilt; and each is still read as the dict it used to be."""
import dataclasses
import json
import math

import pytest
import torch

from switch_sae_core.record import JsonResult


def assert_same(a, b, where="result"):
    """a and b equal to the last bit, with their types: the reference the round trip is checked against."""
    assert type(a) is type(b), f"{where}: {type(a).__name__} vs {type(b).__name__}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, f"{where}: {a.dtype} {tuple(a.shape)} vs {b.dtype} {tuple(b.shape)}"
        assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a[~a.isnan()], b[~b.isnan()]), where
    elif isinstance(a, JsonResult):
        for f in dataclasses.fields(a):
            assert_same(getattr(a, f.name), getattr(b, f.name), f"{where}.{f.name}")
    elif isinstance(a, dict):
        assert list(a) == list(b), f"{where}: keys {list(a)} vs {list(b)}"
        for k in a:
            assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b), where
    else:
        assert a == b, f"{where}: {a!r} vs {b!r}"


def round_trip(result: JsonResult) -> JsonResult:
    """The result through JSON text and back, checked to be the same."""
    text = json.dumps(result.to_json())
    again = type(result).from_json(json.loads(text))
    assert_same(again, result)
    assert json.dumps(again.to_json()) == text
    return again


def test_the_reference_comparison_catches_a_changed_dtype_value_or_type():
    from switch_sae_core.analysis.router import SubspaceAngles

    a = SubspaceAngles(2, torch.tensor([1.0, 2.0], dtype=torch.float64), torch.tensor([3.0, 4.0], dtype=torch.float64), 0.5, 0.1)
    for changed in (dataclasses.replace(a, angles_deg=a.angles_deg.float()), dataclasses.replace(a, mean_cos2=0.6),
                    dataclasses.replace(a, dim=2.0)):
        try:
            assert_same(changed, a)
        except AssertionError:
            continue
        raise AssertionError(f"not caught: {changed}")


def test_router_geometry_and_its_parts_round_trip_and_read_as_dicts():
    from switch_sae_core.analysis import router as R
    from switch_sae_core.config import SAEConfig
    from switch_sae_core.saes.base import build_sae

    torch.manual_seed(0)
    switch = build_sae(SAEConfig(arch="switch", d_in=16, n_features=64, n_experts=4, k=4))
    topk = build_sae(SAEConfig(arch="topk", d_in=16, n_features=48, k=4))
    geo = R.router_geometry(switch, topk, torch.randn(300, 16), max_points=None)
    assert isinstance(geo, R.RouterGeometry) and isinstance(geo.pooled_rows, R.PooledRows)
    assert geo["pooled"]["chance"] == geo.pooled.chance and geo["alignment"]["encoder"]["diag_mean"] == geo.alignment.encoder.diag_mean
    assert geo.angles_encoder.angles_deg.dtype == torch.float64 and geo.features_per_expert.dtype == torch.int64
    again = round_trip(geo)
    assert int(again.features_per_expert.sum()) == 48  # read back as the int64 counts they were
    assert R.agreement_table(again).equals(R.agreement_table(geo)) and R.alignment_table(again).equals(R.alignment_table(geo))
    single = R.probe_router_choice(torch.randn(20, 3), torch.zeros(20, dtype=torch.long))
    assert math.isnan(round_trip(single)["accuracy"]) and single.note == "router used a single expert"
    no_probe = R.router_geometry(switch, topk, torch.randn(100, 16), max_points=None, probe=False)
    assert no_probe.probe is None and round_trip(no_probe).probe_activations is None


def _dictionary(m, d=8, seed=0):
    return torch.nn.functional.normalize(torch.randn(m, d, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_similarity_results_round_trip():
    from switch_sae_core.analysis import similarity as S
    from switch_sae_core.config import SAEConfig
    from switch_sae_core.saes.base import build_sae

    dirs = _dictionary(16)
    cos_M, _ = S.nearest_neighbour_cosines(dirs, 4, "other_expert")
    freq_M = torch.rand(16, generator=torch.Generator().manual_seed(1)) * (torch.arange(16) % 5 != 0)  # some dead
    dup = S.duplication_stats(cos_M, freq_M)
    assert isinstance(dup.by_frequency[0], S.FrequencyBin) and dup["by_frequency"][0]["n"] == dup.by_frequency[0].n
    assert round_trip(dup).n_dead == 4 and round_trip(S.duplication_stats(cos_M)).by_frequency is None
    match = S.match_features(_dictionary(6), _dictionary(4, seed=1), hungarian=True)  # A larger: -1 / nan in the assignment
    again = round_trip(match)
    assert again.assigned_id.dtype == torch.int64 and (again.assigned_id == -1).sum() == 2 and again.assigned_cos.isnan().sum() == 2
    assert round_trip(S.match_features(_dictionary(6), _dictionary(4, seed=1))).assigned_id is None
    sae = build_sae(SAEConfig(arch="topk", d_in=8, n_features=16, k=2))
    moved = round_trip(S.distance_from_init(sae, 0))
    assert moved["random"] == S.random_mean_abs_cosine(8)


def test_expert_study_round_trips_without_its_saes_codes_and_activations():
    from switch_sae_core.analysis import expert_study as E
    from switch_sae_core.analysis import similarity as S
    from switch_sae_core.analysis.result_types import DuplicationRow, ExpertStudy

    dirs = {"N=4 k=2": _dictionary(16), "TopK": _dictionary(16, seed=1)}
    freq = {name: torch.rand(16, generator=torch.Generator().manual_seed(2)) for name in dirs}
    dup = {(name, scope): E.duplication(d, 4 if name != "TopK" else 1, scope, 4, freq[name])
           for name, d in dirs.items() for scope in ("other_expert", "anywhere")}
    study = ExpertStudy(
        saes={name: object() for name in dirs}, codes={name: object() for name in dirs}, freq=freq,
        fvu={"N=4 k=2": 0.25, "TopK": 0.2}, x_eval=torch.randn(5, 8), main="N=4 k=2", n0=4, k0=2,
        sim=S.expert_similarity_matrix(dirs["N=4 k=2"], 4), ctrl=S.expert_similarity_matrix(S.random_blocks(dirs["TopK"]), 4),
        summary={"switch": (0.5, 0.25), "control": (0.4, 0.3)}, dup=dup,
        rows=[DuplicationRow("N=4 k=2", 4, 2, 0.3, 0.0, 0.125)], hungarian=True, random_nn=0.61,
        match={"Switch -> TopK": S.match_features(dirs["N=4 k=2"], dirs["TopK"], hungarian=True)},
        moved={}, cka={"N=4 k=2": (0.8, 0.7), "activations": (0.5, 0.4)}, cka_tokens=5)
    d = json.loads(json.dumps(study.to_json()))
    assert not {"saes", "codes", "x_eval"} & set(d)  # live objects stay out of the JSON
    assert d["dup"][0][0] == ["N=4 k=2", "other_expert"]  # tuple keys as [key, value] pairs
    again = ExpertStudy.from_json(d)
    assert again.saes is None and again.codes is None and again.x_eval is None
    assert_same(again, dataclasses.replace(study, saes=None, codes=None, x_eval=None))
    assert again["dup"][("TopK", "anywhere")] == dup[("TopK", "anywhere")] and again["summary"]["switch"] == (0.5, 0.25)
    assert E.similarity_table(again).equals(E.similarity_table(study)) and E.cka_table(again).equals(E.cka_table(study))


def test_recovery_results_round_trip_and_a_one_expert_duplicate_stat_stays_out_of_the_json():
    from switch_sae_core.analysis import recovery as Rc

    true_FD, learned_MD = _dictionary(6), torch.cat([_dictionary(6), _dictionary(2, seed=3)])
    rec = round_trip(Rc.feature_recovery(true_FD, learned_MD))
    assert rec.recovered_frac == 1.0 and rec.best_id_F.dtype == torch.int64 and set(rec.scalars()) == {
        "mmcs", "mmcs_learned", "recovered_frac", "redundant_frac"}
    one = Rc.duplicate_stats(learned_MD)
    assert "cross_expert_duplicate_frac" not in one.to_json() and round_trip(one).cross_expert_duplicate_frac is None
    assert round_trip(Rc.duplicate_stats(learned_MD, n_experts=2)).cross_expert_duplicate_frac is not None
    experts, clusters = torch.tensor([0, 0, 1, 1, 1]), torch.tensor([0, 0, 1, 1, 0])
    assert round_trip(Rc.expert_cluster_alignment(experts, clusters))["expert_purity"] == 0.8


def test_probe_report_round_trips_with_its_letters():
    from switch_sae_core.analysis import absorption as ab

    g = torch.Generator().manual_seed(0)
    letters = torch.arange(130) % 26
    x = torch.nn.functional.one_hot(letters, 26).float() * 2 + 0.1 * torch.randn(130, 26, generator=g)
    rep = round_trip(ab.probe_report(ab.train_letter_probe(x, letters), x, letters))
    assert isinstance(rep.per_letter["z"], ab.LetterScore) and rep["per_letter"]["a"]["support"] == 5


def test_typed_results_read_as_the_dicts_they_were():
    """A typed result is a read-only Mapping of its fields: `in`, .get, dict(), ** and a KeyError (not an
    AttributeError) for a name it does not have, as user code written against the old dicts expects."""
    from switch_sae_core.analysis import recovery as Rc

    r = Rc.expert_cluster_alignment(torch.tensor([0, 0, 1, 1, 1]), torch.tensor([0, 0, 1, 1, 0]))
    assert "expert_purity" in r and "nothing" not in r and 0 not in r
    assert r.get("expert_purity") == 0.8 and r.get("nothing", 7) == 7
    assert dict(r) == {**r} and set(dict(r)) == {f.name for f in dataclasses.fields(r)} and len(r) == len(dict(r))
    with pytest.raises(KeyError):
        r["nothing"]
    assert r == Rc.expert_cluster_alignment(torch.tensor([0, 0, 1, 1, 1]), torch.tensor([0, 0, 1, 1, 0]))
