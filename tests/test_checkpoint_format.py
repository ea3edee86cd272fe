"""The checkpoint format as documented in docs/checkpoints.md: tensor table, a reader without our code, versions."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from switch_sae_core.saes.base import FORMAT_VERSION, CheckpointError, load_sae

DOC = (Path(__file__).resolve().parents[1] / "docs" / "checkpoints.md").read_text()
CASES = {
    "topk": dict(arch="topk"), "relu": dict(arch="relu"), "gated": dict(arch="gated"),
    "switch": dict(arch="switch", n_experts=4),
    "switch-top2-shared": dict(arch="switch", n_experts=4, top_e=2, shared_expert=True),
    "switch-heaviside": dict(arch="switch", n_experts=4, scale_by_router_prob=False),
}

def saved(make_sae, case: str, folder: Path):
    sae = make_sae(**CASES[case])
    if hasattr(sae, "W_router"):
        with torch.no_grad():
            sae.W_router.mul_(5)  # a router that discriminates, so routing mistakes would show
    sae.save(folder)
    return sae

def documented_tensors(arch: str, D: int, M: int, N: int, G: int) -> dict[str, tuple[int, ...]]:
    rows = re.findall(rf"^\| {arch} \| `(\w+)` \| (\([^)]*\)) \|", DOC, re.M)
    sizes = {"D": D, "M": M, "N": N, "G": G, "W": M // N}
    return {name: tuple(int(v) for v in eval(shape, {}, sizes)) for name, shape in rows}  # "(M, D)" -> (64, 16)

@pytest.mark.parametrize("case", sorted(CASES))
def test_documented_tensor_table_matches_the_files(make_sae, case, tmp_path):
    from safetensors.torch import load_file

    sae = saved(make_sae, case, tmp_path)
    c = sae.cfg
    G = c.n_experts + int(c.shared_expert)
    doc = documented_tensors(c.arch, c.d_in, c.n_features, c.n_experts, G)
    got = {k: tuple(v.shape) for k, v in load_file(str(tmp_path / "sae.safetensors")).items()}
    assert doc == got

@pytest.mark.parametrize("case", sorted(k for k in CASES if k.startswith("switch")))
def test_documented_reader_needs_no_switch_sae_core(make_sae, case, tmp_path):
    code = re.search(r"```python\n(.*?)```", DOC, re.S).group(1)
    assert "switch_sae_core" not in code
    namespace: dict = {}
    exec(compile(code, "docs/checkpoints.md", "exec"), namespace)
    sae = saved(make_sae, case, tmp_path)
    x = torch.randn(128, sae.cfg.d_in)
    with torch.no_grad():
        assert (namespace["switch_forward"](str(tmp_path), x) - sae(x).x_hat).abs().max() < 1e-5

def test_config_json_carries_the_format_version(make_sae, tmp_path):
    sae = saved(make_sae, "switch", tmp_path)
    assert json.loads((tmp_path / "config.json").read_text()) == {"format_version": FORMAT_VERSION, **sae.cfg.to_dict()}

@pytest.mark.parametrize("case", sorted(CASES))
def test_version_1_checkpoint_still_loads(make_sae, case, tmp_path):
    """Version 1 = the same files without "format_version" (everything written before the field existed)."""
    sae = saved(make_sae, case, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    del cfg["format_version"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    loaded = load_sae(tmp_path)
    x = torch.randn(32, sae.cfg.d_in)
    assert loaded.cfg == sae.cfg and torch.equal(loaded(x).x_hat, sae(x).x_hat)

@pytest.mark.parametrize("version,message", [
    (FORMAT_VERSION + 1, r"has checkpoint format \d+, newer than this switch-sae reads .*git pull, then bash scripts/setup.sh"),
    (0, "format_version=0 is not a switch-sae checkpoint format"),
    ("2", "format_version='2' is not a switch-sae checkpoint format"),
])
def test_unknown_versions_say_what_to_do(make_sae, version, message, tmp_path):
    saved(make_sae, "topk", tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "format_version": version}))
    with pytest.raises(CheckpointError, match=message) as info:
        load_sae(tmp_path)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("field,value,message", [
    ("dtype", "float99", r"dtype='float99': choose one of \['float32'"),
    ("k", "16", r"SAEConfig.k='16' must be an integer, not str"),
    ("d_in", 16.5, r"SAEConfig.d_in=16.5 must be an integer, not float"),
    ("n_experts", True, r"SAEConfig.n_experts=True must be an integer, not bool"),
    ("aux_alpha", "3", r"SAEConfig.aux_alpha='3' must be a number, not str"),
    ("shared_expert", 1, r"SAEConfig.shared_expert=1 must be true or false, not int"),
    ("dtype", 32, r"SAEConfig.dtype=32 must be a string, not int"),
])
def test_a_hand_edited_config_of_the_wrong_type_is_one_clear_line(make_sae, field, value, message, tmp_path):
    # issue 28: "dtype": "float99" gave AttributeError ... param_dtype; "k": "16" a str-vs-int comparison error
    saved(make_sae, "topk", tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, field: value}))
    with pytest.raises(CheckpointError, match=message) as info:
        load_sae(tmp_path)
    assert "\n" not in str(info.value) and "config.json is not a valid SAE config" in str(info.value)


def test_ints_are_numbers_and_every_listed_dtype_builds():
    from switch_sae_core.config import PARAM_DTYPES, SAEConfig
    from switch_sae_core.saes.base import build_sae

    assert SAEConfig(arch="topk", d_in=8, n_features=16, k=2, aux_alpha=3).aux_alpha == 3
    for dtype in PARAM_DTYPES:
        assert build_sae(SAEConfig(arch="topk", d_in=8, n_features=16, k=2, dtype=dtype)).param_dtype == getattr(torch, dtype)
