"""Process-wide settings (runtime.py): never applied by an import, applied by the trainer and the CLI."""
import platform
import subprocess
import sys
import textwrap

import pytest
import torch

from switch_sae_core import cli, runtime
from switch_sae_core.config import SAEConfig, TrainConfig
from switch_sae_core.data.source import TensorSource
from switch_sae_core.devices import resolve_device
from switch_sae_core.train import train_sae


def _run(code: str) -> str:
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.strip().splitlines()[-1]


def test_importing_the_package_calls_no_mallopt_and_keeps_threads():
    """Every module that training imports, imported with ctypes.CDLL watched: no libc symbol is looked up,
    and torch's thread count is what it was."""
    out = _run("""
        import ctypes, importlib, torch
        looked_up = []
        real = ctypes.CDLL
        class Watched(real):
            def __getattr__(self, name):
                looked_up.append(name)
                return super().__getattr__(name)
            def __getitem__(self, name):
                looked_up.append(name)
                return super().__getitem__(name)
        ctypes.CDLL = Watched
        torch.set_num_threads(2)
        for m in ("switch_sae_core", "switch_sae_core.ops", "switch_sae_core.saes", "switch_sae_core.train",
                  "switch_sae_core.runtime", "switch_sae_core.cli", "switch_sae_core.optim"):
            importlib.import_module(m)
        from switch_sae_core import runtime
        print(looked_up.count("mallopt"), torch.get_num_threads(), runtime.allocator_tuned())
    """)
    assert out == "0 2 False"


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                    reason="mallopt tuning is glibc's")
def test_tune_allocator_takes_effect_in_a_fresh_process():
    """The setting is applied (both mallopt calls succeed) and reported. Its effect on page faults is measured
    in benchmarks/ (allocator A/B), not here: on this machine glibc honours it in some processes and not in
    others (a 64 MiB block reallocated faulted 0 or 16384 pages, varying between identical runs), so a
    page-fault assertion in the test suite was flaky."""
    out = _run("""
        from switch_sae_core import runtime
        print(runtime.allocator_tuned(), runtime.tune_allocator(), runtime.allocator_tuned())
    """)
    assert out == "False True True"


def test_tune_allocator_opt_out(monkeypatch):
    monkeypatch.setattr(runtime, "_allocator_tuned", False)
    monkeypatch.setenv(runtime.KEEP_FREED_MEMORY_ENV, "0")
    assert runtime.tune_allocator() is False


@pytest.mark.parametrize("value, device, expected", [
    (None, "cpu", 1), ("3", "cpu", 3), ("keep", "cpu", None), (None, "cuda", None), ("2", "cuda", 2)])
def test_thread_count(monkeypatch, value, device, expected):
    if value is None:
        monkeypatch.delenv(runtime.THREADS_ENV, raising=False)
    else:
        monkeypatch.setenv(runtime.THREADS_ENV, value)
    assert runtime.thread_count(device) == expected


@pytest.mark.parametrize("value", ["0", "two", "-1"])
def test_thread_count_refuses_bad_values(monkeypatch, value):
    monkeypatch.setenv(runtime.THREADS_ENV, value)
    with pytest.raises(ValueError, match="SWITCH_SAE_THREADS"):
        runtime.thread_count("cpu")


def test_train_sae_tunes_allocator_and_trains_on_one_thread_then_restores(monkeypatch):
    monkeypatch.delenv(runtime.THREADS_ENV, raising=False)
    calls, threads_seen = [], []
    monkeypatch.setattr(runtime, "tune_allocator", lambda: calls.append("tune") or True)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        torch.manual_seed(0)
        x = torch.randn(256, 8)
        train_sae(SAEConfig(arch="topk", d_in=8, n_features=32, k=2),
                  TensorSource(x), TrainConfig(steps=2, batch_size=64, log_every=1, progress=False,
                                               geometric_median_batch=64, device="cpu"),
                  callback=lambda row: threads_seen.append(torch.get_num_threads()))
        assert calls == ["tune"] and threads_seen == [1, 1]
        assert torch.get_num_threads() == 2  # restored
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("command, applied", [("train", True), ("sweep", True), ("reproduce", True),
                                              ("cache", False)])
def test_cli_training_commands_prepare_the_process(monkeypatch, command, applied):
    seen = []
    monkeypatch.setattr(runtime, "prepare_training_process", lambda device: seen.append(str(device)))
    monkeypatch.setitem(cli.COMMANDS, command, lambda ns: 0)
    assert cli.main([command, "--profile", "ci"]) == 0
    assert seen == ([str(resolve_device("auto"))] if applied else [])
