"""Content fingerprints of the files a cache depends on (corpus files, model weights).

`fingerprint(paths)` -> [[name, sha256], ...] over every regular file under the given files/folders.
A file's sha256 is computed once and remembered in `<cache>/fingerprints.json`, keyed by its absolute
path, size and mtime: later calls only `stat` each file, so fingerprinting a 500 MB model folder costs
milliseconds after the first time. The fingerprint holds content hashes only — touching a file or
reinstalling the same package does not change it; editing a file (or overwriting weights at the same
path) does.
Python's bytecode (`__pycache__/`, `.pyc`) inside a package folder is left out: it is written by the interpreter that
imported the package, differs between installs of the same files, and is never read as data.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable

from .. import durable, paths

MEMO_FILE = "fingerprints.json"


def is_bytecode(relative_name: str) -> bool:
    """Whether a file (its path relative to a fingerprinted folder) is Python bytecode: written by whichever
    interpreter imported the package, so it differs between installs of the same files."""
    return "__pycache__" in Path(relative_name).parts or relative_name.endswith((".pyc", ".pyo"))


def is_fingerprinted(relative_name: str) -> bool:
    """Whether a file under a fingerprinted folder enters the fingerprint: not hidden, not bytecode."""
    return not (is_bytecode(relative_name) or any(part.startswith(".") for part in Path(relative_name).parts))


def _files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return sorted(p for p in path.rglob("*") if p.is_file() and is_fingerprinted(str(p.relative_to(path))))


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def fingerprint(roots: Iterable[str | Path], memo_dir: str | Path | None = None) -> list[list[str]]:
    """[[file name relative to its root, sha256], ...] of every file under `roots` (files or folders;
    hidden files and folders and Python bytecode skipped), in a fixed order. Raises FileNotFoundError for a missing root."""
    memo_path = Path(memo_dir or paths.cache_dir()) / MEMO_FILE
    try:
        memo = json.loads(memo_path.read_text())
    except (OSError, json.JSONDecodeError):
        memo = {}
    out, changed = [], False
    for root in map(Path, roots):
        if not root.exists():
            raise FileNotFoundError(f"{root} does not exist")
        root = root.resolve()
        for f in _files(root):
            st = f.stat()
            stamp = f"{st.st_size}:{st.st_mtime_ns}"
            entry = memo.get(str(f))
            if entry is None or entry[0] != stamp:
                entry, changed = [stamp, sha256_file(f)], True
                memo[str(f)] = entry
            name = f.name if f == root else str(f.relative_to(root))
            out.append([name, entry[1]])
    if changed:
        durable.remove_abandoned(memo_path.parent, MEMO_FILE)
        durable.atomic_write_json(memo_path, memo, fsync=False)  # a concurrent writer loses at most its new entries
    return out
