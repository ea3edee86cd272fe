"""Carry caches and results tables over to the content digest without Python bytecode (December 2026).

The data content digest (data/identity.content_digest) used to fingerprint the `__pycache__/*.pyc` files inside the
offline corpus package's folder. Those differ between installs, so every digest did too: on a fresh clone every
committed record carrying one failed the content check, and every cache key was this install's alone. The digest now
leaves bytecode out (data/fingerprint.is_bytecode), which changes every digest. This rewrites what carries the
old one, in place, without re-extracting or retraining anything:

- activation caches (`<cache>/activations/<slug>__<digest[:12]>`): the manifest's content without the bytecode
  entries, the folder renamed to the new digest (a cache whose `activations` links to another cache's, such as the
  matched-schedules SAE cache of docs/sites.md, takes the other cache's map too);
- trained-SAE cache entries and decay checkpoints (`<key>-<digest[:12]>`): renamed, the digest in their JSON files
  and in the `trained_on` metadata of their weights files (the tensors are written back unchanged);
- results tables (every *.jsonl under the results folder): each record's `data_content`, its `run_fingerprint`
  (recomputed from the record's own configs, and only where that reproduces the recorded one) and cache paths.

The old -> new map of each cache is kept in `<cache>/content_digest_migration.json` (written before a folder is
changed, so an interrupted run loses nothing: run it again), and tables can be migrated after their caches. Running
it again changes nothing. Stop the sweeps and notebooks that use a cache first: it refuses while one builds or trains
into it (holds a lock), but one that only reads would find its folders renamed. An unfinished extraction
(`.<folder>.partial`) is not carried over: the next build starts it again.

    python scripts/migrate_content_digest.py [--cache DIR ...] [--results DIR]
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from switch_sae_core import durable, paths
from switch_sae_core.config import DataConfig, TrainConfig
from switch_sae_core.data.fingerprint import is_bytecode
from switch_sae_core.data.identity import _digest
from switch_sae_core.keys import json_default, run_fingerprint

MAP_FILE = "content_digest_migration.json"


def without_bytecode(content: dict) -> dict:
    """A manifest's content with the bytecode entries today's fingerprint leaves out removed."""
    return {**content, **{field: [entry for entry in content[field] if not is_bytecode(entry[0])]
                          for field in ("dataset_files", "model_files") if field in content}}


def refuse_if_busy(cache: Path) -> None:
    """One line and exit while any process holds a lock in `cache` (builds activations or trains an SAE there)."""
    for lock_file in sorted(p for folder in (cache / "activations", cache / "saes") if folder.is_dir()
                            for p in folder.glob(".*.lock")):
        lock = durable.FileLock(lock_file)
        if not lock.acquire(blocking=False):
            raise SystemExit(f"migrate_content_digest: {lock.holder()} is using {lock_file.name[1:-5]} in {cache}; "
                             "stop it (and any sweep or notebook reading this cache), then run this again")
        lock.release()


def saved_map(cache: Path) -> dict[str, str]:
    path = cache / MAP_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def _save_pair(caches: list[Path], old: str, new: str) -> None:
    for cache in caches:
        durable.atomic_write_json(cache / MAP_FILE, {**saved_map(cache), old: new})


def migrate_activations(cache: Path) -> None:
    """Rewrite and rename every activation cache folder under `cache` (or under the cache its `activations` links
    to), saving each old -> new pair in both caches' maps before the folder is changed."""
    folder = cache / "activations"
    if not folder.is_dir():
        return
    owners = list(dict.fromkeys([cache, folder.resolve().parent]))
    for entry in sorted(p for p in folder.iterdir() if not p.name.startswith(".") and (p / "manifest.json").is_file()):
        manifest = json.loads((entry / "manifest.json").read_text())
        old, content = _digest(manifest["content"]), without_bytecode(manifest["content"])
        new = _digest(content)
        if old != new:
            _save_pair(owners, old, new)
            durable.atomic_write_json(entry / "manifest.json", {**manifest, "content": content})
        _rename_activations(entry, old, new)


def _rename_activations(entry: Path, old: str, new: str) -> None:
    """Two old digests can map to one new one (the same files, imported by two interpreters): the second folder
    then holds the data the first already does, and is removed."""
    if not entry.name.endswith(old[:12]) or old[:12] == new[:12]:
        return
    target = entry.with_name(entry.name[:-12] + new[:12])
    if target.exists():
        shutil.rmtree(entry)
        print(f"  activations/{entry.name}: the same data as {target.name}; removed")
    else:
        entry.rename(target)
        print(f"  activations/{entry.name} -> {new[:12]}")


def migrate_saes(cache: Path, mapping: dict[str, str]) -> int:
    """Rename the trained-SAE entries (and decay checkpoints) of the changed digests, with the digest replaced in
    their JSON files and weights' metadata. Where the new name exists too, the complete entry (with its meta.json)
    is kept."""
    by_prefix, moved = {old[:12]: (old, new) for old, new in mapping.items() if old != new}, 0
    for parent in (cache / "saes", cache / "saes" / "decay_checkpoints"):
        for entry in sorted(parent.iterdir()) if parent.is_dir() else ():
            old_new = by_prefix.get(entry.name[-12:]) if entry.is_dir() and "-" in entry.name else None
            if old_new is None:
                continue
            _replace_digest(entry, *old_new)
            target = entry.with_name(entry.name[:-12] + old_new[1][:12])
            if target.exists():
                keep_source = (entry / "meta.json").is_file() and not (target / "meta.json").is_file()
                shutil.rmtree(target if keep_source else entry)
                print(f"  {parent.name}/{target.name} existed too; kept the {'old' if keep_source else 'new'} one")
            if entry.exists():
                entry.rename(target)
            moved += 1
    return moved


def _replace_digest(entry: Path, old: str, new: str) -> None:
    for path in entry.rglob("*.json"):
        if old in (text := path.read_text()):
            durable.atomic_write_text(path, text.replace(old, new))
    for path in entry.rglob("*.safetensors"):
        from safetensors import safe_open
        from safetensors.torch import save

        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            if old not in metadata.get("trained_on", ""):
                continue
            tensors = {name: f.get_tensor(name) for name in f.keys()}
        metadata["trained_on"] = metadata["trained_on"].replace(old, new)
        durable.atomic_write_bytes(path, save(tensors, metadata=metadata))


def migrate_record(record: dict, mapping: dict[str, str]) -> tuple[dict, bool]:
    """The record with every old digest replaced (its `data_content`, cache paths such as `sae_dir`); `False` where
    its run fingerprint could not be reproduced (left as it was: such a record already failed the settings check)."""
    text = json.dumps(record, default=json_default)
    hits = [(old, new) for old, new in mapping.items() if old != new and old[:12] in text]
    if not hits:
        return record, True
    for old, new in hits:
        text = text.replace(old, new).replace(old[:12], new[:12])
    out, old = json.loads(text), record.get("data_content")
    if old not in mapping:
        return out, True
    train, data = TrainConfig.from_dict(record["train_config"]), DataConfig.from_dict(record["data_config"])
    reproduced = record.get("run_fingerprint") == run_fingerprint(train, data, old)
    out["run_fingerprint"] = run_fingerprint(train, data, mapping[old]) if reproduced else record["run_fingerprint"]
    return out, reproduced


def migrate_table(path: Path, mapping: dict[str, str]) -> tuple[int, int]:
    """Rewrite one JSON-lines table in place (atomically); returns (records changed, fingerprints not reproduced)."""
    out, changed, unreproduced = [], 0, 0
    for line in path.read_text().splitlines():
        record = json.loads(line) if line.strip() else None
        if isinstance(record, dict):
            new, reproduced = migrate_record(record, mapping)
            unreproduced += not reproduced
            if new is not record:
                changed += 1
                line = json.dumps(new, sort_keys=True, default=json_default)
        out.append(line)
    if changed:
        durable.atomic_write_text(path, "\n".join(out) + "\n")
    return changed, unreproduced


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", nargs="*", type=Path, default=None,
                        help="cache folders to migrate (default: $SWITCH_SAE_CACHE, else .cache/switch-sae)")
    parser.add_argument("--results", type=Path, default=None,
                        help="results folder whose *.jsonl tables to migrate (default: the project's data/results)")
    ns = parser.parse_args(argv)
    caches = ns.cache if ns.cache is not None else [paths.cache_dir()]
    for cache in caches:
        refuse_if_busy(cache)
    mapping: dict[str, str] = {}
    for cache in caches:
        print(f"cache {cache}:")
        migrate_activations(cache)
        found = {**saved_map((cache / "activations").resolve().parent), **saved_map(cache)}
        print(f"  {migrate_saes(cache, found)} SAE entries renamed")
        mapping.update(found)
    for table in sorted((ns.results or paths.results_root()).rglob("*.jsonl")):
        changed, unreproduced = migrate_table(table, mapping)
        if changed or unreproduced:
            print(f"{table}: {changed} records migrated"
                  + (f", {unreproduced} with a run fingerprint not reproduced (left as it was)" if unreproduced else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
