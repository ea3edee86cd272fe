"""keys.py: the one hashing scheme, and every key already committed stays what it was."""
import hashlib
import json
import warnings

import numpy as np
import torch

from switch_sae_core import keys, results
from switch_sae_core.config import DataConfig, SAEConfig, TrainConfig
from switch_sae_core.data import store
from switch_sae_core.paths import project_root

ROOT = project_root()


def test_stable_hash_is_sha256_of_sorted_json_or_of_the_bytes():
    obj = {"b": [1, 2.5, "x"], "a": {"z": None, "y": True}}
    reference = hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()
    assert keys.stable_hash(obj) == reference[:16]
    assert keys.stable_hash(obj, digits=64) == reference
    assert keys.stable_hash({"a": obj["a"], "b": obj["b"]}) == keys.stable_hash(obj)  # key order does not count
    assert keys.stable_hash({**obj, "c": 1}) != keys.stable_hash(obj)
    data = np.arange(12, dtype=np.float32).tobytes()
    assert keys.stable_hash(data, digits=40) == hashlib.sha256(data).hexdigest()[:40]


def test_the_activation_cache_digest_is_what_it_was():
    """The digest before keys.py: the full sha256 of json.dumps([FORMAT_VERSION, content], sort_keys=True)."""
    content = {"model": "gpt2", "layer": 8, "dataset_files": [["a.txt", 12, "ff"]], "max_norm_ratio": 0.0}
    old = hashlib.sha256(json.dumps([store.FORMAT_VERSION, content], sort_keys=True).encode()).hexdigest()
    assert store._digest(content) == old


def test_every_committed_record_keeps_its_keys():
    """tests/committed_keys.json holds, per committed table and line, the recorded key and the config_hash,
    lineage_hash and run_fingerprint the code gave before the keys moved to keys.py; the code gives them still. (The
    run fingerprints of the records carrying a data content digest were updated once, with the digest itself, when
    it stopped hashing Python bytecode: scripts/migrate_content_digest.py.)"""
    before = json.loads((ROOT / "tests" / "committed_keys.json").read_text())
    assert set(before) >= {"quick", "cpu", "cpu_sizing", "ablation"}
    for table, rows in before.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            records = results.load_records(results.results_root() / table / results.RESULTS_FILE)
        assert len(records) >= len(rows), table  # a table only grows
        for r, (key, config_key, lineage_key, fingerprint) in zip(records, rows):
            s, t, d = (cls.from_dict(r[f"{name}_config"]) for cls, name in
                       ((SAEConfig, "sae"), (TrainConfig, "train"), (DataConfig, "data")))
            assert r["key"] == key, (table, r["name"])
            assert keys.config_hash(s, t, d) == config_key, (table, r["name"])
            assert keys.lineage_hash(s, t, d) == lineage_key, (table, r["name"])
            assert keys.run_fingerprint(t, d, r.get("data_content")) == fingerprint, (table, r["name"])


def test_json_default_writes_tensors_numpy_scalars_and_sets():
    out = json.loads(json.dumps({"a": torch.tensor(2.5), "b": torch.tensor([1, 2]), "c": np.float32(0.5),
                                 "d": {3, 4} - {4}}, default=keys.json_default))
    assert out == {"a": 2.5, "b": [1, 2], "c": 0.5, "d": [3]}
