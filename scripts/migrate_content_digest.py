"""Carry caches and results tables over to the content digest without Python bytecode (December 2026).

The data content digest (data/identity.content_digest) used to fingerprint the `__pycache__/*.pyc` files inside the
offline corpus package's folder. Those differ between installs, so every digest did too: on a fresh clone every
committed record carrying one failed the content check, and every cache key was this install's alone. The digest now
leaves bytecode out (data/fingerprint.is_fingerprinted), which changes every digest. This rewrites what carries the
old one, in place, without re-extracting or retraining anything:

- activation caches (`<cache>/activations/<slug>__<digest[:12]>`): the manifest's content without the bytecode
  entries, the folder renamed to the new digest (a cache whose `activations` links to another cache's, such as the
  matched-schedules SAE cache of docs/sites.md, takes the other cache's map too);
- trained-SAE cache entries and decay checkpoints (`<key>-<digest[:12]>`): renamed, `data_content` in their JSON;
- results tables (every *.jsonl under the results folder): each record's `data_content`, its `run_fingerprint`
  (recomputed from the record's own configs, and only where that reproduces the recorded one) and cache paths.

The old -> new map of each cache is kept in `<cache>/content_digest_migration.json`, so tables can be migrated after
their caches. Running it again changes nothing.

    python scripts/migrate_content_digest.py [--cache DIR ...] [--results DIR]
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from switch_sae_core import durable, paths
from switch_sae_core.config import DataConfig, TrainConfig
from switch_sae_core.data.fingerprint import is_fingerprinted
from switch_sae_core.data.identity import _digest
from switch_sae_core.keys import json_default, run_fingerprint

MAP_FILE = "content_digest_migration.json"


def without_bytecode(content: dict) -> dict:
    """A manifest's content with the file entries today's fingerprint leaves out removed."""
    return {**content, **{field: [entry for entry in content[field] if is_fingerprinted(entry[0])]
                          for field in ("dataset_files", "model_files") if field in content}}


def migrate_activations(cache: Path) -> dict[str, str]:
    """Rewrite and rename every activation cache folder under `cache`; returns {old digest: new digest}."""
    folder, mapping = cache / "activations", {}
    if not folder.is_dir():
        return mapping
    entries = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    for entry in (p for p in entries if (p / "manifest.json").is_file()):
        manifest = json.loads((entry / "manifest.json").read_text())
        old, content = _digest(manifest["content"]), without_bytecode(manifest["content"])
        new = _digest(content)
        mapping[old] = new
        if old != new:
            durable.atomic_write_json(entry / "manifest.json", {**manifest, "content": content})
        _rename(entry, old, new)
    return mapping


def _rename(entry: Path, old: str, new: str) -> None:
    """Rename `entry` to the new digest. Two old digests can map to one new one (the same files, imported by two
    interpreters): the second folder then holds what the first already does and is removed."""
    if old[:12] == new[:12] or not entry.name.endswith(old[:12]):
        return
    target = entry.with_name(entry.name[:-12] + new[:12])
    if target.exists():
        shutil.rmtree(entry)
        print(f"  {entry.parent.name}/{entry.name}: the same data as {target.name}; removed")
    else:
        entry.rename(target)
        print(f"  {entry.parent.name}/{entry.name} -> {new[:12]}")


def migrate_saes(cache: Path, mapping: dict[str, str]) -> int:
    """Rename the trained-SAE entries (and decay checkpoints) of the changed digests; fix their JSON files."""
    by_prefix, moved = {old[:12]: (old, new) for old, new in mapping.items() if old != new}, 0
    for parent in (cache / "saes", cache / "saes" / "decay_checkpoints"):
        for entry in sorted(parent.iterdir()) if parent.is_dir() else ():
            old_new = by_prefix.get(entry.name[-12:]) if entry.is_dir() and "-" in entry.name else None
            if old_new is None:
                continue
            for name in ("meta.json", "progress.json"):
                path = entry / name
                if path.is_file() and old_new[0] in (text := path.read_text()):
                    durable.atomic_write_text(path, text.replace(*old_new))
            _rename(entry, *old_new)
            moved += 1
    return moved


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
    lines, changed, unreproduced = path.read_text().splitlines(), 0, 0
    out = []
    for line in lines:
        if not line.strip():
            out.append(line)
            continue
        record = json.loads(line)
        new, reproduced = migrate_record(record, mapping) if isinstance(record, dict) else (record, True)
        unreproduced += not reproduced
        if new is not record:
            changed += 1
            line = json.dumps(new, sort_keys=True, default=json_default)
        out.append(line)
    if changed:
        durable.atomic_write_text(path, "\n".join(out) + "\n")
    return changed, unreproduced


def _saved_map(cache: Path) -> dict[str, str]:
    path = cache / MAP_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", nargs="*", type=Path, default=None,
                        help="cache folders to migrate (default: $SWITCH_SAE_CACHE, else .cache/switch-sae)")
    parser.add_argument("--results", type=Path, default=None,
                        help="results folder whose *.jsonl tables to migrate (default: the project's data/results)")
    ns = parser.parse_args(argv)
    mapping: dict[str, str] = {}
    for cache in ns.cache if ns.cache is not None else [paths.cache_dir()]:
        print(f"cache {cache}:")
        found = migrate_activations(cache)
        shared = (cache / "activations").resolve().parent  # itself, or the cache its activations link to
        saved = {**_saved_map(shared), **_saved_map(cache), **{o: n for o, n in found.items() if o != n}}
        if saved:
            durable.atomic_write_json(cache / MAP_FILE, saved)
        print(f"  {migrate_saes(cache, saved)} SAE entries renamed")
        mapping.update(saved)
    for table in sorted((ns.results or paths.results_root()).rglob("*.jsonl")):
        changed, unreproduced = migrate_table(table, mapping)
        if changed or unreproduced:
            print(f"{table}: {changed} records migrated"
                  + (f", {unreproduced} with a run fingerprint not reproduced (left as it was)" if unreproduced else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
