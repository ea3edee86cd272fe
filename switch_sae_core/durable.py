"""The ONE way the project writes to disk so that a kill, a full disk or a second process loses nothing.

- `atomic_write_text` / `atomic_write_json`: a file is written to a temporary name unique to this process
  and call (`.<name>.<pid>.<random>.tmp`), flushed and renamed over the target: a reader sees the old file
  or the new one, never half of one, and two writers never share a temporary file.
- `atomic_folder(final)`: the same for a folder (a checkpoint, an activation cache, a converted model):
  built under a temporary name beside `final`, renamed into place at the end; on any error (a full disk
  included) the temporary folder is removed. `remove_abandoned(parent, prefix)` deletes temporary folders
  whose process was killed.
- Every file and folder written gets the permissions a plainly created one would (0666 / 0777 less the umask),
  even where a library writes through a private temporary file (safetensors' `save_file` leaves 0600):
  `atomic_folder` applies `normal_permissions` to its folder before the rename.
- `FileLock(path)`: an advisory lock (`fcntl.flock`) that the kernel releases when its process dies, even
  by kill -9; it records the holder's pid so the other process can say who holds it.
- `disk_full_guard(path, need_bytes)`: turns "No space left on device" (OSError ENOSPC, or the message of a
  library that wraps it, like safetensors) into one `DiskFullError` line: "disk full at <path>, need ~N GB";
  `check_free_space` says the same before a large write starts.

docs/guarantees.md states what these give the user.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from .errors import SwitchSAEError

TMP_TAG = ".tmp-"  # every temporary name contains it: <name>.tmp-<pid>-<random>


class DiskFullError(SwitchSAEError, OSError):
    """The disk ran out of space; the message names the folder and the space needed."""


class LockedError(SwitchSAEError, RuntimeError):
    """Another process holds the lock; the message names it and the lock file."""


# --- atomic files and folders ---------------------------------------------------------------------------
def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}{TMP_TAG}{os.getpid()}-{secrets.token_hex(4)}")


def atomic_write_bytes(path: str | Path, data: bytes, fsync: bool = True) -> Path:
    """Write `data` to `path` atomically (temporary file + rename; see the module docstring)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    try:
        with disk_full_guard(path.parent, len(data)):
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                if fsync:
                    os.fsync(f.fileno())
            os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return path


def atomic_write_text(path: str | Path, text: str, fsync: bool = True) -> Path:
    return atomic_write_bytes(path, text.encode(), fsync)


def atomic_write_json(path: str | Path, obj: Any, default: Optional[Callable[[Any], Any]] = None,
                      indent: Optional[int] = None, fsync: bool = True) -> Path:
    text = json.dumps(obj, default=default, indent=indent) + ("\n" if indent is not None else "")
    return atomic_write_text(path, text, fsync)


def read_json(path: str | Path, what: str) -> Any:
    """The JSON in `path`; a torn or unreadable file raises `TornFileError` in one line naming it and `what`
    it holds (callers that can rebuild it catch that and do so)."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TornFileError(f"{path} ({what}) is unreadable ({type(e).__name__}: {e}); it was torn by a kill or a "
                            "full disk in an older version: delete it to rebuild it") from None


class TornFileError(SwitchSAEError, ValueError):
    """A JSON file is torn or unreadable; the message names it."""


@contextlib.contextmanager
def atomic_folder(final: str | Path, need_bytes: int = 0, replace: bool = True) -> Iterator[Path]:
    """Build a folder under a temporary name beside `final` and rename it to `final` when the block ends
    without an error (an existing `final` is replaced when `replace`, else kept and the new one dropped);
    on an error the temporary folder is deleted. Yields the temporary folder."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}{TMP_TAG}{os.getpid()}-{secrets.token_hex(4)}")
    try:
        with disk_full_guard(final.parent, need_bytes):
            tmp.mkdir()
            yield tmp
            normal_permissions(tmp)
            if final.exists():
                if not replace:
                    return
                shutil.rmtree(final)
            os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def current_umask() -> int:
    """The process's umask, read from /proc where it can be (os.umask can only read it by changing it, which
    another thread could observe); elsewhere set and restored at once."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def normal_permissions(path: str | Path) -> None:
    """Give `path` (a file, or a folder and everything under it) the mode a plainly created one gets: 0o666 (files)
    or 0o777 (folders) less the umask. Writers that go through a private temporary file or folder (safetensors'
    `save_file`, tempfile.mkstemp / mkdtemp) leave 0600 / 0700, which other users of a shared cache or results
    folder cannot read, while the config.json beside them is 0644."""
    path = Path(path)
    mask = current_umask()
    for p in [path, *(path.rglob("*") if path.is_dir() else ())]:
        if not p.is_symlink():
            os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)


def remove_abandoned(parent: str | Path, prefix: str = "") -> None:
    """Delete the temporary files and folders under `parent` (names starting with '.<prefix>') left by
    processes that no longer exist (killed while writing)."""
    parent = Path(parent)
    if not parent.is_dir():
        return
    for p in parent.glob(f".{prefix}*{TMP_TAG}*"):
        pid = p.name.rsplit(TMP_TAG, 1)[-1].split("-", 1)[0]
        if pid.isdigit() and not process_alive(int(pid)):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    p.unlink()


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only checks that the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# --- disk full ---------------------------------------------------------------------------------------------
def _gb(n: int) -> str:
    return f"{max(n, 0) / 1e9:.2g}"


def is_disk_full(error: BaseException) -> bool:
    """Whether `error` says the disk is full (ENOSPC, or a library's message of it)."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return "No space left on device" in str(error) or "Disk quota exceeded" in str(error)


def disk_full_message(path: str | Path, need_bytes: int) -> str:
    try:
        free = shutil.disk_usage(Path(path) if Path(path).exists() else Path(path).parent).free
    except OSError:
        free = 0
    need = f"need ~{_gb(need_bytes)} GB" if need_bytes else "need more space"
    return f"disk full at {path}, {need} ({_gb(free)} GB free): free some space or point SWITCH_SAE_CACHE elsewhere"


@contextlib.contextmanager
def disk_full_guard(path: str | Path, need_bytes: int = 0) -> Iterator[None]:
    """Re-raise a full-disk error inside the block as one `DiskFullError` line naming `path`."""
    try:
        yield
    except DiskFullError:
        raise
    except Exception as e:
        if is_disk_full(e):
            raise DiskFullError(disk_full_message(path, need_bytes)) from None
        raise


def check_free_space(path: str | Path, need_bytes: int) -> None:
    """Refuse, before any work, a write of `need_bytes` that the disk under `path` cannot hold."""
    path = Path(path)
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if shutil.disk_usage(probe).free < need_bytes:
        raise DiskFullError(disk_full_message(path, need_bytes))


# --- one process at a time ----------------------------------------------------------------------------------
class FileLock:
    """An exclusive advisory lock on `path` (created if missing), released on `release()`, at the end of a
    `with` block, or by the kernel when the process dies. `acquire(blocking=False)` returns False when another
    process holds it (`holder()` then says which). Re-entrant within one process (a lock this process holds
    is granted again at once; the file is unlocked when the outermost holder releases it). Where fcntl is
    missing (Windows) locking is a no-op."""

    _held: dict[str, list] = {}  # resolved path -> [fd, count] of the locks this process holds

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._mine = False

    def acquire(self, blocking: bool = True) -> bool:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows
            return True
        key = str(self.path.resolve())
        if key in FileLock._held:
            FileLock._held[key][1] += 1
            self._mine = True
            return True
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        FileLock._held[key] = [fd, 1]
        self._mine = True
        return True

    def release(self) -> None:
        if not self._mine:
            return
        self._mine = False
        key = str(self.path.resolve())
        held = FileLock._held.get(key)
        if held is None:
            return
        held[1] -= 1
        if held[1] == 0:
            import fcntl

            del FileLock._held[key]
            fcntl.flock(held[0], fcntl.LOCK_UN)
            os.close(held[0])

    def holder(self) -> str:
        """'process <pid>' of the holder as it recorded itself, or 'another process'."""
        try:
            pid = self.path.read_text().strip()
        except OSError:
            pid = ""
        return f"process {pid}" if pid.isdigit() else "another process"

    def __enter__(self) -> "FileLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


# --- where the user points us -------------------------------------------------------------------------------
def check_writable_dir(path: str | Path, what: str) -> Path:
    """`path` as a folder this process can write to (created if missing); else a one-line ConfigError-like
    `SwitchSAEError` naming `what` (e.g. 'SWITCH_SAE_CACHE') and the fix."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise UnwritablePathError(f"{what}={path} is a file, not a folder: point {what} at a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UnwritablePathError(f"{what}={path} cannot be created ({e.strerror}): point {what} at a folder "
                                  "you can write to") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise UnwritablePathError(f"{what}={path} is not writable: point {what} at a folder you can write to")
    return path


class UnwritablePathError(SwitchSAEError, ValueError):
    """A folder the user pointed us at is a file or is not writable."""
