"""Fused single-threaded CPU kernels (C++, `cpu_kernels.cpp`), compiled on first use, with the torch path as fallback.

    lib = kernels.cpu_kernels()      # the loaded library, or None: use the torch path

What they do:
- the optimizer phase of a trainer step (`optim.fused_step`): the decoder-gradient projection and the clipping
  norm in one pass over the gradients, then the clipping scale, Adam and the decoder renormalisation in one
  pass over each parameter's rows (weights, gradient, both moments streamed once). Adam is torch's fused CPU
  kernel operation for operation; the reductions (row dot products, norms) accumulate in float64 where torch's
  accumulate in float32, so the parameters differ from the torch path's in the last bits (tests/test_kernels.py
  states and checks the tolerances);
- the top-k selection of each row (`ops.topk_rows`): the same set as torch.topk (ties to the earlier entry),
  in no particular order.

- Compiled lazily, by the first call of `cpu_kernels()` (never by an import), with the system C++ compiler
  ($CXX, else `c++`), into `paths.cache_dir()/kernels/<hash of source, flags, compiler, CPU>/`, and reused by
  every later process. The source is plain C++ with a C ABI loaded through ctypes: no torch headers, so a
  build takes under a second (parsing `#include <torch/extension.h>` alone, as a `torch.utils.cpp_extension`
  module would, took ~15 s of CPU on the same machine: benchmarks/bench_kernels.py).
- No compiler, a failed build or an unwritable cache: ONE warning line, then the torch path (the same math,
  slower on CPU). `SWITCH_SAE_KERNELS=0` turns the kernels off (no warning).
- The kernels are single-threaded: the callers use them for contiguous float32 CPU tensors when torch runs on
  one thread (the trainer's default on CPU); with more threads, or on an accelerator, torch's own kernels run.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from ..durable import _tmp_name, remove_abandoned
from ..errors import SwitchSAEError
from ..paths import cache_dir

ENV = "SWITCH_SAE_KERNELS"
SOURCE = Path(__file__).with_name("cpu_kernels.cpp")
FLAGS = ["-O3", "-ffp-contract=off", "-fno-math-errno", "-fopenmp-simd", "-fPIC", "-shared", "-std=c++17"]
NATIVE = ["-march=native"]  # tried first; a compiler that refuses it builds without (same results, slower)


class KernelWarning(RuntimeWarning):
    """The C++ kernels could not be built or loaded; the torch path runs instead."""


_lib: Optional[ctypes.CDLL] = None
_failed = False


def enabled() -> bool:
    """False when SWITCH_SAE_KERNELS=0 (read at each call, so a process may switch them off at any time)."""
    return os.environ.get(ENV, "1") != "0"


def eligible(*tensors: Optional[Tensor]) -> bool:
    """Whether the kernels may run on these tensors: all contiguous float32 on CPU (None entries ignored),
    torch on one thread (the kernels do not split work across threads), kernels not switched off."""
    return (enabled() and torch.get_num_threads() == 1
            and all(t is None or (t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous()
                                  and not t.is_sparse) for t in tensors))


def cpu_kernels() -> Optional[ctypes.CDLL]:
    """The compiled kernels (built on the first call of the process, or loaded from the cache), or None when
    they are switched off or cannot be built (one KernelWarning per process says why)."""
    global _lib, _failed
    if not enabled() or _failed:
        return None
    if _lib is None:
        try:
            _lib = _bind(ctypes.CDLL(str(_build())))
        except (OSError, RuntimeError, AttributeError, subprocess.SubprocessError, SwitchSAEError) as e:  # one line
            _failed = True
            reason = " ".join(str(e).split())[:300]
            warnings.warn(f"switch_sae_core: the C++ CPU kernels are unavailable ({reason}); using the torch path "
                          f"(same results, slower on CPU). Set {ENV}=0 to skip them.", KernelWarning, stacklevel=3)
            return None
    return _lib


def _bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    p, i64, f64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_double, ctypes.c_int
    for name, args, res in [("ssae_sumsq", [p, i64], f64),
                            ("ssae_project_rows", [p, p, i64, i64, i32], f64),
                            ("ssae_adam", [p, p, p, p, i64, i64, f64, f64, f64, f64, f64, f64, i32, f64], None),
                            ("ssae_topk_rows", [p, i64, i64, i64, p, p], i64)]:
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, res
    return lib


def _compiler() -> str:
    cxx = os.environ.get("CXX") or "c++"
    found = shutil.which(cxx)
    if not found:
        raise RuntimeError(f"no C++ compiler found ({cxx!r} is not on PATH; set CXX or install g++/clang)")
    return found


def _build() -> Path:
    """Path of the shared library, compiled into the cache if this source, compiler and CPU have none yet."""
    if not sys.platform.startswith(("linux", "darwin")):
        raise RuntimeError(f"kernels are built on Linux and macOS only, not {sys.platform}")
    cxx = _compiler()
    source = SOURCE.read_bytes()
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60).stdout
    key = hashlib.sha256(b"\0".join([source, " ".join(FLAGS + NATIVE).encode(), version.encode(),
                                     _cpu_id().encode()])).hexdigest()[:16]
    folder = cache_dir() / "kernels" / key
    lib = folder / "switch_sae_kernels.so"
    if lib.exists():
        return lib
    folder.mkdir(parents=True, exist_ok=True)
    remove_abandoned(folder)  # the temporary outputs of builds that were killed
    tmp = _tmp_name(lib)  # then renamed: a concurrent build never loads half a file (the last rename wins, same bytes)
    errors = []
    for extra in (NATIVE, []):
        proc = subprocess.run([cxx, *FLAGS, *extra, str(SOURCE), "-o", str(tmp)], capture_output=True, text=True,
                              timeout=300)
        if proc.returncode == 0:
            os.replace(tmp, lib)
            return lib
        lines = proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"]
        errors.append(next((ln for ln in lines if "error" in ln), lines[-1]))  # the first error, not the caret
    tmp.unlink(missing_ok=True)
    raise RuntimeError(f"{Path(cxx).name} failed: {errors[-1]}")


def _cpu_id() -> str:
    """What -march=native depends on: the CPU model and its flags (a cache shared by two machines keeps one
    build per CPU)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
        lines = [ln for ln in info.splitlines() if ln.startswith(("model name", "flags", "Features"))]
        return platform.machine() + "\n".join(dict.fromkeys(lines))
    except OSError:
        return platform.machine() + platform.processor()


# --- the calls, on tensors ------------------------------------------------------------------------------------
def sumsq(lib: ctypes.CDLL, g: Tensor) -> float:
    """sum(g ** 2) in float64 (a contiguous float32 CPU tensor)."""
    return lib.ssae_sumsq(g.data_ptr(), g.numel())


def project_rows_(lib: ctypes.CDLL, g: Tensor, w: Tensor, want_sumsq: bool) -> float:
    """g -= (g . w) w per row (rows along the last dim; w's rows unit-norm), in place; returns the projected
    gradient's sum of squares (float64) when want_sumsq, else 0."""
    d = w.shape[-1]
    return lib.ssae_project_rows(g.data_ptr(), w.data_ptr(), w.numel() // d if d else 0, d, int(want_sumsq))


def adam_(lib: ctypes.CDLL, p: Tensor, g: Tensor, m: Tensor, v: Tensor, step: float, *, lr: float, beta1: float,
          beta2: float, weight_decay: float, eps: float, maximize: bool, coef: Optional[float] = None,
          unit_rows: bool = False) -> None:
    """One Adam step of p in place (torch.optim.Adam(fused=True)'s update; m, v its moments, `step` the step
    count after this step's increment), the gradient first scaled by `coef` (stored back, as clip_grad_norm_
    does) when given, and each row of p (last dim) renormalised to unit norm after the update if unit_rows."""
    lib.ssae_adam(p.data_ptr(), g.data_ptr(), m.data_ptr(), v.data_ptr(), p.numel(),
                  p.shape[-1] if unit_rows else 0, coef if coef is not None else 0.0, lr, beta1, beta2,
                  weight_decay, eps, int(maximize), step)


def topk_rows(lib: ctypes.CDLL, x_TW: Tensor, k: int) -> Optional[tuple[Tensor, Tensor]]:
    """(values, indices), each (T, k), of each row's k largest entries (ties: the earlier entries), in no
    particular order, as torch.topk(sorted=False) (x_TW: contiguous float32 CPU, 1 <= k <= W). None when a row
    holds a NaN (the caller lets torch.topk decide)."""
    T, W = x_TW.shape
    vals_TK = torch.empty((T, k), dtype=x_TW.dtype)
    idx_TK = torch.empty((T, k), dtype=torch.int64)
    if lib.ssae_topk_rows(x_TW.data_ptr(), T, W, k, vals_TK.data_ptr(), idx_TK.data_ptr()):
        return None
    return vals_TK, idx_TK
