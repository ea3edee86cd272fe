"""Config round trips (dict, JSON) for every config of the project, profiles included (CLI flags: test_cli.py)."""
import json

import pytest

from switch_sae_core.config import ConfigError, DataConfig, SAEConfig, TrainConfig
from switch_sae_core.profiles import PROFILES, Profile, get_profile


@pytest.mark.parametrize("cls", [SAEConfig, TrainConfig, DataConfig])
def test_dict_and_json_round_trip(cls, tmp_path):
    cfg = cls()
    assert cls.from_dict(cfg.to_dict()) == cfg
    cfg.save_json(tmp_path / "c.json")
    assert cls.load_json(tmp_path / "c.json") == cfg
    # JSON really is plain data (lists for tuples), and survives a second trip unchanged
    assert cls.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_profiles_round_trip_through_json(name):
    profile = PROFILES[name]
    again = Profile.from_dict(json.loads(json.dumps(profile.to_dict())))
    assert again.data == profile.data and again.train == profile.train
    assert tuple(again.ks) == tuple(profile.ks)


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_profiles_are_consistent(name):
    p = PROFILES[name]
    assert p.name == name
    # ReLU/Gated have a frontier (two sparsity levels at least) wherever TopK/Switch have one (several k); a profile
    # at one k (a site's claim, profiles.site_profile) needs none
    assert min(len(p.relu_l1_coeffs), len(p.gated_l1_coeffs)) >= (2 if len(p.ks) > 1 else 0)
    assert p.eval_every % p.train.log_every == 0, "the sample-efficiency callback sees only logged steps"
    assert all(k <= p.width_multiple * 64 for k in p.ks)


def test_unknown_fields_and_profiles_are_errors(monkeypatch):
    with pytest.raises(ConfigError, match="unknown field"):
        SAEConfig.from_dict({"arch": "topk", "not_a_field": 1})
    with pytest.raises(ConfigError, match="choose one of"):
        get_profile("nope")
    monkeypatch.setenv("SWITCH_SAE_PROFILE", "ci")
    assert get_profile().name == "ci"
    monkeypatch.delenv("SWITCH_SAE_PROFILE")
    assert get_profile().name == "quick"


def test_bad_values_say_what_to_fix():
    with pytest.raises(ConfigError, match="divisible"):
        SAEConfig(arch="switch", n_features=100, n_experts=3)
    with pytest.raises(ConfigError, match="larger than an expert"):
        SAEConfig(arch="switch", n_features=64, n_experts=8, k=16)
    with pytest.raises(ConfigError, match="only apply to arch='switch'"):
        SAEConfig(arch="topk", n_experts=4)


def test_site_label_names_each_model_exactly_and_keeps_its_key():
    """Issue 23 item 6: people read 'SmolLM2-135M-Instruct' and 'Gemma-3-270M'; caches and records keep the ids."""
    assert DataConfig().site_label == "SmolLM2-135M-Instruct blocks.20.hook_resid_post"
    gemma = DataConfig(model="gemma3-270m", layer=9)
    assert gemma.site_label == "Gemma-3-270M blocks.9.hook_resid_post"
    assert gemma.to_dict()["model"] == "gemma3-270m"  # the key is unchanged
    assert DataConfig(model="/data/my-model", layer=3).site_label == "/data/my-model blocks.3.hook_resid_post"
