"""scripts/migrate_content_digest.py: a cache and a table written while the content digest still hashed Python
bytecode are carried over to today's digest, so nothing is extracted or trained again and every record matches."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from switch_sae_core import keys, results, sweep
from switch_sae_core.data.identity import _digest
from switch_sae_core.data.store import ActivationStore
from switch_sae_core.saes.serialization import read_metadata

from test_integrity import corpus_profile, write_corpus

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def _script():
    path = Path(__file__).parents[1] / "scripts" / "migrate_content_digest.py"
    spec = importlib.util.spec_from_file_location("migrate_content_digest", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _age(cache_dir: Path, table: Path, profile) -> str:
    """Turn today's cache and table into what the old digest left: a bytecode entry in the manifest's content,
    folders named after its digest, that digest in the SAE entries and the records. Returns the old digest."""
    folder = next(p for p in (cache_dir / "activations").iterdir() if not p.name.startswith("."))
    manifest = json.loads((folder / "manifest.json").read_text())
    new = _digest(manifest["content"])
    content = {**manifest["content"],
               "dataset_files": manifest["content"]["dataset_files"] + [["__pycache__/x.cpython-311.pyc", "ab" * 32]]}
    old = _digest(content)
    (folder / "manifest.json").write_text(json.dumps({**manifest, "content": content}))
    folder.rename(folder.with_name(folder.name.replace(new[:12], old[:12])))
    for entry in (cache_dir / "saes").glob(f"*-{new[:12]}"):
        meta = entry / "meta.json"
        meta.write_text(meta.read_text().replace(new, old))
        weights = entry / "final" / "sae.safetensors"
        metadata = read_metadata(weights.parent)
        save_file(load_file(weights), weights, metadata={**metadata, "trained_on": metadata["trained_on"].replace(new, old)})
        entry.rename(entry.with_name(entry.name.replace(new[:12], old[:12])))
    lines = []
    for r in results.load_records(table):
        train = profile.train.replace(seed=r["seed"], steps=r["steps"])
        r = {**r, "data_content": old, "run_fingerprint": keys.run_fingerprint(train, profile.data, old)}
        lines.append(json.dumps(r, sort_keys=True, default=keys.json_default))
    table.write_text("\n".join(lines) + "\n")
    return old


@pytest.fixture
def aged(tmp_path, monkeypatch):
    """A sweep's cache and table as the old digest left them: (profile, results root, table, today's digest, old)."""
    monkeypatch.setenv("SWITCH_SAE_CACHE", str(tmp_path / "cache"))
    corpus = tmp_path / "corpus.txt"
    write_corpus(corpus)
    profile, root = corpus_profile(corpus), tmp_path / "results"
    recorded = sweep.run_sweep(profile, ["seeds"], root=root, with_lm=False, log=lambda s: None)
    table = results.results_path(profile, root)
    today = recorded[0]["data_content"]
    old = _age(tmp_path / "cache", table, profile)
    assert results.profile_records(profile, root, all_seeds=True) == []  # what a fresh clone saw: every record dropped
    return profile, root, table, recorded, today, old


def _entries(cache_dir: Path) -> list[str]:
    return [p.name for p in (cache_dir / "saes").iterdir() if not p.name.startswith(".")]


def test_an_old_digest_cache_and_table_migrate_without_retraining(aged, tmp_path):
    profile, root, table, recorded, today, old = aged
    migrate = _script()
    assert migrate.main(["--cache", str(tmp_path / "cache"), "--results", str(root)]) == 0
    shown = {r["key"]: r for r in results.profile_records(profile, root, all_seeds=True)}
    assert {k: (r["data_content"], r["run_fingerprint"], r["mse"]) for k, r in shown.items()} == \
        {r["key"]: (today, r["run_fingerprint"], r["mse"]) for r in recorded}
    assert ActivationStore.build_or_load(profile.data, progress=False).content_digest == today  # not rebuilt
    logs = []
    sweep.run_sweep(profile, ["seeds"], root=root, with_lm=False, log=logs.append)
    assert f"{len(recorded)} already in" in logs[0]
    entries = _entries(tmp_path / "cache")
    assert entries and all(n.endswith(today[:12]) for n in entries)
    weights = tmp_path / "cache" / "saes" / entries[0] / "final"
    assert json.loads(read_metadata(weights)["trained_on"])["data_content"] == today
    assert json.loads((tmp_path / "cache" / migrate.MAP_FILE).read_text()) == {old: today}

    before = table.read_text()
    migrate.main(["--cache", str(tmp_path / "cache"), "--results", str(root)])  # a second run changes nothing
    assert table.read_text() == before and _entries(tmp_path / "cache") == entries


def test_a_run_cut_off_after_the_activations_still_migrates_the_saes(aged, tmp_path):
    *_, today, old = aged
    migrate = _script()
    migrate.migrate_activations(tmp_path / "cache")  # killed here: the SAE entries still carry the old digest
    assert all(n.endswith(old[:12]) for n in _entries(tmp_path / "cache"))
    migrate.main(["--cache", str(tmp_path / "cache"), "--results", str(tmp_path / "results")])
    assert all(n.endswith(today[:12]) for n in _entries(tmp_path / "cache"))


def test_a_cache_in_use_is_refused_in_one_line(aged, tmp_path):
    """Another process training an SAE into the cache holds its entry's lock: nothing is renamed under it."""
    entry = _entries(tmp_path / "cache")[0]
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(tmp_path / "cache" / "saes" / f".{entry}.lock")],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(SystemExit, match=f"process {holder.pid} is using {entry}.*stop it"):
            _script().main(["--cache", str(tmp_path / "cache"), "--results", str(tmp_path / "results")])
    finally:
        holder.kill()
        holder.wait()
    assert all(n.endswith(aged[-1][:12]) for n in _entries(tmp_path / "cache"))  # nothing renamed


HOLD_LOCK = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
os.write(fd, str(os.getpid()).encode())
print("locked", flush=True)
time.sleep(60)
"""
