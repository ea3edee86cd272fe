"""The analyses' typed results (`record.JsonResult`): each made by its real function goes through JSON text and
comes back the same: same types, tensors of the same dtype and shape with the same values (nan where nan),
nested results and tuple keys rebuilt; and each is still read as the dict it used to be."""
import dataclasses
import json
import math

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
