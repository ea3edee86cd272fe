"""Process-wide settings for a training process: the allocator and the number of torch CPU threads.

Importing `switch_sae_core` (or any of its modules) changes nothing global. These functions change the
whole process, so they run only when called: by the `switch-sae` command line (`prepare_training_process`),
by `train.train_sae` while it trains (`training_process`: the thread count is restored afterwards), or by you.

- `tune_allocator()`: glibc keeps freed memory for reuse (see its docstring for why and what it costs).
  Opt out: SWITCH_SAE_KEEP_FREED_MEMORY=0.
- `apply_thread_policy(device)`: on CPU, one torch thread unless SWITCH_SAE_THREADS says otherwise.
  SWITCH_SAE_THREADS=N sets N threads; SWITCH_SAE_THREADS=keep leaves torch's setting alone.

The measurements behind both are in benchmarks/README.md (bench_threads.py, bench_train_step.py).
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import sys
from typing import Iterator

import torch

KEEP_FREED_MEMORY_ENV = "SWITCH_SAE_KEEP_FREED_MEMORY"
THREADS_ENV = "SWITCH_SAE_THREADS"

_allocator_tuned = False


def tune_allocator() -> bool:
    """glibc only (Linux): let freed tensors' memory be reused instead of returned to the kernel.

    By default glibc serves every allocation above 32 MiB with a fresh mmap and unmaps it on free, so
    each step's full-width (M, D) gradient buffers come back as new pages that the kernel zero-fills,
    one page fault per 4 KiB (~37,000 faults per Switch-16 step at d = 768, M = 24576). This sets
    `mallopt(M_MMAP_MAX, 0)` (big blocks come from the heap) and `mallopt(M_TRIM_THRESHOLD, 2 GiB)`
    (freed heap memory is kept for the next step), for the WHOLE process: it then keeps its peak
    memory until exit. Skipped when SWITCH_SAE_KEEP_FREED_MEMORY=0, and off glibc. Returns whether
    the setting is in effect. Source: glibc mallopt(3); step times with and without it in
    benchmarks/README.md.
    """
    global _allocator_tuned
    if _allocator_tuned:
        return True
    if not sys.platform.startswith("linux") or os.environ.get(KEEP_FREED_MEMORY_ENV, "1") == "0":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # <malloc.h>
        _allocator_tuned = bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
    except (OSError, AttributeError):  # not glibc (musl, ...): nothing to tune
        return False
    return _allocator_tuned


def allocator_tuned() -> bool:
    """Whether `tune_allocator` took effect in this process."""
    return _allocator_tuned


def thread_count(device: torch.device | str) -> int | None:
    """The torch CPU thread count the trainer uses on `device`; None = leave torch's setting alone.

    SWITCH_SAE_THREADS=N (N >= 1): N; =keep: None. Otherwise 1 on CPU (measured: a sparse step's many
    small ops pay OpenMP synchronisation at every op; on a shared machine 2 threads made a quick-size step
    several times slower than 1, see benchmarks/README.md), None on an accelerator (the host threads
    only launch kernels). Raises ValueError for another value of the variable."""
    value = os.environ.get(THREADS_ENV, "").strip()
    if value == "keep":
        return None
    if value:
        if not value.isdigit() or int(value) < 1:
            raise ValueError(f"{THREADS_ENV}={value!r}: give a thread count >= 1, or 'keep' for torch's own setting")
        return int(value)
    return 1 if torch.device(device).type == "cpu" else None


def apply_thread_policy(device: torch.device | str) -> int:
    """Set torch's CPU thread count by `thread_count(device)`; returns the count now in effect."""
    n = thread_count(device)
    if n is not None and n != torch.get_num_threads():
        torch.set_num_threads(n)
    return torch.get_num_threads()


def prepare_training_process(device: torch.device | str) -> None:
    """What a training command applies to its whole process (the CLI): `tune_allocator()` and
    `apply_thread_policy(device)`."""
    tune_allocator()
    apply_thread_policy(device)


@contextlib.contextmanager
def training_process(device: torch.device | str) -> Iterator[None]:
    """`train.train_sae`'s settings while it trains: `tune_allocator()` (stays: glibc cannot give back what
    it kept), and the thread policy, with torch's previous thread count restored on exit."""
    tune_allocator()
    before = torch.get_num_threads()
    try:
        apply_thread_policy(device)
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)
