"""`torch.compile` of the trainer's step (`train.train_step`, as benchmarks/bench_train_step.py --compile and
scripts/gpu_smoke.sh compile it) on the CPU, at tiny sizes: the compiled step gives eager's loss curve.

Two backends. `aot_eager` (in CI: ~10-20 s per architecture on 2 shared cores) traces the step with dynamo and
AOT autograd exactly as the default backend does, then runs the captured graphs eagerly: it catches what breaks
tracing (it found that grouped_mm's meta kernel refuses fp32). `inductor`, the default backend, generates C++
on the CPU (Triton on a GPU): measured 85 s for Switch and 101 s for TopK (22 s with inductor's on-disk cache
warm) on 2 shared cores, so it is marked `inductor` and left out of scripts/test.sh (run it with `pytest -m inductor tests/test_compile.py`; the GPU script compiles on the GPU).
"""
from __future__ import annotations

import copy
import shutil

import pytest
import torch

from switch_sae_core.config import SAEConfig, TrainConfig
from switch_sae_core.saes import build_sae
from switch_sae_core.saes.base import REGISTRY
from switch_sae_core.train import autocast_context, make_optimizer, train_step

STEPS = 5


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles from scratch: a cache filled by earlier tests could hit dynamo's recompile limit,
    after which it runs the step eagerly, silently (the frame counts below would then catch it)."""
    import torch._dynamo

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
    torch.set_num_threads(before)


def loss_curves(arch: str, backend: str, bf16: bool = False) -> tuple[list[float], list[float], int]:
    """(eager losses, compiled losses, frames compiled) of STEPS trainer steps from one tiny SAE (d=32, M=128,
    k=4; Switch: 4 experts) on the same batches."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch.manual_seed(0)
    sae = build_sae(SAEConfig(arch=arch, d_in=32, n_features=128, k=4, **({"n_experts": 4} if arch == "switch" else {})))
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randn(64, 32, generator=gen) + 1 for _ in range(STEPS)]
    counter = CompileCounterWithBackend(backend)
    curves = []
    for compiled in (False, True):
        model = copy.deepcopy(sae)
        opt = make_optimizer(model, TrainConfig(lr=1e-3))
        autocast = autocast_context(torch.device("cpu"), bf16)

        def step(x_BD):
            return train_step(model, opt, x_BD, autocast=autocast).loss

        fn = torch.compile(step, backend=counter) if compiled else step
        curves.append([float(fn(x_BD)) for x_BD in batches])
    return curves[0], curves[1], counter.frame_count


@pytest.mark.parametrize("arch,bf16", [(arch, False) for arch in sorted(REGISTRY)] + [("switch", True)])
def test_compiled_step_traces_and_matches_eager(arch, bf16):
    """Every architecture in fp32, and Switch under bf16 autocast (the GPU's configuration: grouped_mm traced in
    bf16): the captured graphs give eager's losses (the same kernels run: only rounding of reordered sums)."""
    eager, compiled, frames = loss_curves(arch, "aot_eager", bf16)
    assert frames > 0, "dynamo compiled nothing: the step ran eagerly"
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=0)


def has_cxx_compiler() -> bool:
    return any(shutil.which(c) for c in ("g++", "c++", "clang++"))


@pytest.mark.inductor
@pytest.mark.parametrize("arch", ["topk", "switch"])
def test_inductor_step_matches_eager(arch):
    """The default backend (inductor: fused C++ kernels) on TopK and Switch: the loss curve within 1e-4
    relative of eager (fused kernels reorder fp32 sums; 5 steps of Adam keep that small)."""
    if not has_cxx_compiler():
        pytest.skip("torch.compile's inductor backend needs a C++ compiler on the CPU (none found: g++, c++, clang++)")
    eager, compiled, frames = loss_curves(arch, "inductor")
    assert frames > 0, "dynamo compiled nothing: the step ran eagerly"
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=0)
