"""The CUDA-only branches reached on a CPU-only machine by faking nothing but the device check
(`torch.cuda.is_available`, `torch.cuda.device_count`). What no such test can reach is listed in docs/gpu.md
as "untested until a GPU run"."""
from __future__ import annotations

import pytest
import torch

from switch_sae_core import checkpoint, devices
from switch_sae_core.data import lm
from switch_sae_core.distributed import comm
from switch_sae_core.saes.base import _row_blocks


@pytest.fixture
def cuda_available(monkeypatch):
    """A machine whose torch reports one CUDA device (only the device checks are faked)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)


def test_auto_picks_cuda_where_cuda_is_available(cuda_available):
    assert devices.resolve_device("auto") == torch.device("cuda")
    assert devices.resolve_device("cuda:0") == torch.device("cuda", 0)  # no "CUDA is not available" error


def test_the_language_model_is_put_where_auto_says(cuda_available, monkeypatch):
    """The extraction model resolves its device with devices.resolve_device: 'auto' is the GPU here."""
    seen = []
    monkeypatch.setattr(lm, "_load_tiny_random", lambda device, backend: seen.append(device))
    lm.load_model("tiny-random", device="auto")
    lm.load_model("tiny-random", device="cuda:0")
    assert seen == ["cuda", "cuda:0"]


def test_auto_is_cpu_and_cuda_is_refused_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert devices.resolve_device("auto") == torch.device("cpu")
    assert lm.load_model("tiny-random", device="auto").device.type == "cpu"
    with pytest.raises(ValueError, match="CUDA is not available"):
        devices.resolve_device("cuda")
    with pytest.raises(ValueError, match="CUDA is not available"):  # the LM too: before any loading
        lm.load_model("tiny-random", device="cuda")


def test_nccl_for_cuda_tensors_gloo_for_cpu_tensors():
    assert comm.pick_backend(torch.device("cuda", 1)) == "nccl"
    assert comm.pick_backend(torch.device("cpu")) == "gloo"


def test_cuda_rng_states_are_skipped_when_they_cannot_be_restored(monkeypatch):
    """A checkpoint written on a GPU machine (with "rng.cuda.<i>" states) resumes on a machine without CUDA, or with
    another number of GPUs: the CPU state is restored, the CUDA states are left alone (restoring them would set the
    wrong devices' generators)."""
    torch.manual_seed(123)
    tensors = {"rng.cpu": torch.get_rng_state(), "rng.cuda.0": torch.zeros(16, dtype=torch.uint8)}
    expected = torch.rand(3)
    calls = []
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: calls.append(states))  # a tripwire only
    for available, count in ((False, 0), (True, 2)):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
        torch.manual_seed(0)
        checkpoint.set_rng_state(tensors)
        assert torch.equal(torch.rand(3), expected)
    assert calls == []


def test_checkpoints_written_without_cuda_hold_no_cuda_state(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert list(checkpoint.rng_state()) == ["rng.cpu"]


def test_decoder_upkeep_takes_the_whole_matrix_on_an_accelerator():
    """`_row_blocks` splits a CPU matrix into cache-sized blocks and hands any other device's whole (one kernel
    launch instead of hundreds); the meta device stands in for CUDA (no faking)."""
    W = torch.empty(24576, 768, device="meta")
    (block,) = list(_row_blocks(W))
    assert block.shape == (24576, 768)
    assert len(list(_row_blocks(torch.empty(4096, 768)))) > 1
