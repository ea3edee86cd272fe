"""Distributed training on CPU with gloo and 2 processes: the result must equal a single-process run.

One spawn of 2 ranks runs every scenario in a row (process start-up dominates the cost); the parent
process runs the single-process references and compares. Tolerance: fp32 reductions in another order
(gradient sums over ranks, split matmuls) give ~1e-7 relative differences per step; after a few Adam
steps parameters agree to ATOL = 1e-5.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator

import pytest
import torch
import torch.multiprocessing as mp

from switch_sae_core.config import SAEConfig, TrainConfig
from switch_sae_core.saes.base import load_sae
from switch_sae_core.train import train_sae

ATOL = 1e-5
WORLD = 2
D = 16


class ClusteredSource:
    """Deterministic BatchSource: Gaussian clusters, so a router has something to route by."""

    d_in = D

    def __init__(self, n_clusters: int = 8):
        g = torch.Generator().manual_seed(123)
        self.centres_CD = 3 * torch.randn(n_clusters, D, generator=g)

    def batches(self, batch_size: int, seed: int = 0, start: int = 0) -> Iterator[torch.Tensor]:
        i = start
        while True:
            g = torch.Generator().manual_seed(1000 * seed + i)
            c_B = torch.randint(len(self.centres_CD), (batch_size,), generator=g)
            yield self.centres_CD[c_B] + torch.randn(batch_size, D, generator=g)
            i += 1


class TwoBatchSource(ClusteredSource):
    """The same stream, but it ends after batch 2."""

    def batches(self, batch_size: int, seed: int = 0, start: int = 0) -> Iterator[torch.Tensor]:
        return (b for _, b in zip(range(2 - start), super().batches(batch_size, seed, start)))


def sae_configs() -> dict[str, SAEConfig]:
    """Scenario name -> SAE; names starting with 'ep_' train expert-parallel, the others data-parallel."""
    switch = dict(arch="switch", d_in=D, n_features=64, k=4, n_experts=4)
    return {
        "dp_topk": SAEConfig(arch="topk", d_in=D, n_features=64, k=4),
        "dp_topk_auxk": SAEConfig(arch="topk", d_in=D, n_features=128, k=2, auxk_coeff=1 / 32, auxk_k=8),
        "dp_switch": SAEConfig(**switch),
        "dp_switch_top2_shared": SAEConfig(**switch, top_e=2, shared_expert=True),
        "ep_switch": SAEConfig(**switch),
        "ep_switch_top2_shared": SAEConfig(**switch, top_e=2, shared_expert=True),
        "ep_switch_auxk": SAEConfig(arch="switch", d_in=D, n_features=128, k=2, n_experts=4, auxk_coeff=1 / 32,
                                    auxk_k=8),
    }


def train_config(**kw) -> TrainConfig:
    base = dict(steps=4, batch_size=32, lr=1e-2, geometric_median_batch=64, progress=False, log_every=1,
                dead_window_tokens=64, device="cpu")
    return TrainConfig(**{**base, **kw})


def _correctness_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    from switch_sae_core.distributed import init_distributed, shutdown, train_distributed
    from switch_sae_core.distributed.comm import barrier, exit_now

    torch.set_num_threads(1)
    out = Path(out_dir)
    ctx = init_distributed("cpu", timeout_s=60, rank=rank, world_size=world, init_method=f"file://{init_file}")
    for name, cfg in sae_configs().items():
        ep = name.startswith("ep_")
        ckpt = str(out / f"{name}_ckpt") if ep else None  # steps 2 and 4 kept: the resume test's reference
        result = train_distributed(cfg, ClusteredSource(), train_config(checkpoint_dir=ckpt, checkpoint_every=2,
                                                                        checkpoint_keep=2), ctx=ctx, expert_parallel=ep)
        if rank == 0 and not ep:
            result.sae.save(out / name)
        if rank == 0:
            (out / f"{name}_history.json").write_text(json.dumps(result.history))
    # resume: 2 steps, stop (the source runs dry, as if the job had been killed), continue to 4
    for name, ep in (("ep_switch", True), ("dp_switch", False)):
        stopped = train_config(checkpoint_dir=str(out / f"{name}_stopped_ckpt"), checkpoint_every=2)
        with pytest.raises(Exception, match="ran out of batches"):
            train_distributed(sae_configs()[name], TwoBatchSource(), stopped, ctx=ctx, expert_parallel=ep)
        train_distributed(sae_configs()[name], ClusteredSource(), stopped, ctx=ctx, expert_parallel=ep, resume=True)
    # the path for SAEs too large to build whole: every rank initialises only its own experts
    from switch_sae_core.distributed import expert_parallel

    expert_parallel.FULL_INIT_MAX_PARAMS = 0
    cfg = sae_configs()["ep_switch_top2_shared"]
    train_distributed(cfg, ClusteredSource(), train_config(steps=1, checkpoint_dir=str(out / "ep_local_init_ckpt")),
                      ctx=ctx, expert_parallel=True)
    # as launch.main does: no rank tears the group down while the other may still use it (a gloo peer that
    # destroys its end first can make the other abort in the backend's destructors: SIGABRT, seen once in CI)
    barrier(ctx, "end of the scenarios")
    shutdown()
    exit_now(0)  # every file is written: skip the finalization where gloo can still abort (as launch.py)


@pytest.fixture(scope="module")
def distributed_results(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    mp.spawn(_correctness_worker, args=(WORLD, str(out / "pg_init"), str(out)), nprocs=WORLD, join=True)
    return out


def assert_same_params(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        err = (sa[key] - sb[key]).abs().max().item()
        assert err <= ATOL, f"{key}: max |distributed - single| = {err:.2e} > {ATOL}"


@pytest.mark.parametrize("name", list(sae_configs()))
def test_matches_single_process(distributed_results, name):
    """Parameters after S steps on 2 ranks (DP or EP) equal a single-process run on the global batch."""
    from switch_sae_core.distributed.expert_parallel import load_sharded

    cfg = sae_configs()[name]
    single = train_sae(cfg, ClusteredSource(), train_config()).sae
    if name.startswith("ep_"):
        dist_sae = load_sharded(distributed_results / f"{name}_ckpt")
    else:
        dist_sae = load_sae(distributed_results / name)
    assert_same_params(dist_sae, single)
    init = initial_sae(cfg)
    assert (single.W_dec - init.W_dec).abs().max() > 100 * ATOL, "training must move the weights"
    history = json.loads((distributed_results / f"{name}_history.json").read_text())
    assert [row["step"] for row in history] == [1, 2, 3, 4]


@pytest.mark.parametrize("name", ["dp_topk_auxk", "ep_switch_auxk"])
def test_auxk_scenarios_had_dead_features(distributed_results, name):
    """The AuxK comparisons only mean something if AuxK was active (dead features existed)."""
    history = json.loads((distributed_results / f"{name}_history.json").read_text())
    assert any(row["dead_frac"] > 0 and row["loss/auxk"] > 0 for row in history), history


def test_resume_equals_uninterrupted(distributed_results):
    """Stopped after step 2 and resumed from the checkpoint (weights, Adam, dead counts, RNG): identical
    to the run that never stopped, for the sharded (EP) and the rank-0 (DP) checkpoint."""
    from switch_sae_core.distributed.expert_parallel import complete_steps, load_sharded
    from switch_sae_core.checkpoint import latest_checkpoint

    world, steps = complete_steps(distributed_results / "ep_switch_ckpt")
    assert world == WORLD and steps == [2, 4]
    pairs = [(load_sharded(distributed_results / "ep_switch_stopped_ckpt"), load_sharded(distributed_results / "ep_switch_ckpt")),
             (load_sae(latest_checkpoint(distributed_results / "dp_switch_stopped_ckpt")), load_sae(distributed_results / "dp_switch"))]
    for resumed, straight in pairs:
        for key, value in straight.state_dict().items():
            assert torch.equal(resumed.state_dict()[key], value), key
    for r in range(WORLD):  # each rank holds only its experts' Adam moments
        from safetensors.torch import load_file

        opt = load_file(str(distributed_results / "ep_switch_ckpt" / f"rank_{r:05d}" / "step_00000004" /
                            "optimizer.safetensors"))
        shapes = {tuple(t.shape) for t in opt.values()}
        assert (2, 16, D) in shapes and (4, 16, D) not in shapes, shapes


def initial_sae(cfg: SAEConfig):
    from switch_sae_core.saes.base import build_sae

    torch.manual_seed(0)
    return build_sae(cfg)


# --- failures: clear errors, no hangs ----------------------------------------------------------------------
def test_experts_must_divide_across_ranks():
    from switch_sae_core.distributed import DistributedConfigError
    from switch_sae_core.distributed.expert_parallel import check_expert_parallel

    cfg = SAEConfig(arch="switch", d_in=D, n_features=96, k=4, n_experts=6)
    assert check_expert_parallel(cfg, 3) == 2
    with pytest.raises(DistributedConfigError, match=r"n_experts=6 does not divide across 4 ranks.*\[1, 2, 3, 6\]"):
        check_expert_parallel(cfg, 4)
    with pytest.raises(DistributedConfigError, match="needs arch='switch'"):
        check_expert_parallel(SAEConfig(arch="topk", d_in=D, n_features=64, k=4), 2)
    for scale in ({"top_e": 2, "global_topk": True}, {"feature_scaling": True}):  # Scale SAE: data parallel only
        with pytest.raises(DistributedConfigError, match="Scale SAE options .* use data parallelism"):
            check_expert_parallel(cfg.replace(**scale), 3)


def test_global_batch_must_divide_across_ranks():
    from switch_sae_core.distributed import DistContext, DistributedConfigError
    from switch_sae_core.distributed.trainer import check_batch

    with pytest.raises(DistributedConfigError, match="batch_size=30 .* not divisible by the 4 ranks.*batch_size=28"):
        check_batch(train_config(batch_size=30), DistContext(rank=0, world_size=4))


class DyingSource(ClusteredSource):
    """Rank `victim` dies (hard exit, no cleanup) when asked for its third batch."""

    def __init__(self, rank: int, victim: int = 1):
        super().__init__()
        self.rank, self.victim = rank, victim

    def batches(self, batch_size, seed=0, start=0):
        for i, batch in enumerate(super().batches(batch_size, seed, start)):
            if i == 2 and self.rank == self.victim:
                os._exit(17)
            yield batch


def _dying_worker(rank: int, world: int, init_file: str, report: str) -> None:
    from switch_sae_core.distributed import RankFailureError, init_distributed, train_distributed
    from switch_sae_core.distributed.comm import exit_now

    torch.set_num_threads(1)
    ctx = init_distributed("cpu", timeout_s=30, rank=rank, world_size=world, init_method=f"file://{init_file}")
    cfg = SAEConfig(arch="switch", d_in=D, n_features=64, k=4, n_experts=4)
    try:
        train_distributed(cfg, DyingSource(rank), train_config(steps=10), ctx=ctx, expert_parallel=True)
    except RankFailureError as e:
        Path(report).write_text(f"{type(e).__name__}: {e}")
        exit_now(3)


def test_dead_rank_gives_a_clear_error_not_a_hang(tmp_path):
    """Rank 1 exits mid-run; rank 0 must raise RankFailureError (naming itself and the likely cause)
    and terminate on its own: the join timeout only guards against a hang."""
    spawn = mp.get_context("spawn")
    report = tmp_path / "rank0.txt"
    procs = [spawn.Process(target=_dying_worker, args=(r, WORLD, str(tmp_path / "pg_init"), str(report)))
             for r in range(WORLD)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=90)
    alive = [p.pid for p in procs if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
    assert not alive, "a surviving rank hung instead of failing"
    assert procs[1].exitcode == 17
    assert procs[0].exitcode == 3, "rank 0 should have caught RankFailureError"
    msg = report.read_text()
    assert msg.startswith("RankFailureError: rank 0/2: collective") and "another rank probably died" in msg.lower(), msg


def test_torchrun_entry_point(tmp_path):
    """`torchrun -m switch_sae_core.distributed` (expert-parallel, 2 ranks) saves an SAE equal to a
    single-process run of the same config."""
    import shutil
    import subprocess

    from switch_sae_core.data.synthetic import SyntheticConfig, SyntheticSource

    torchrun = shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun is not on PATH")
    sae = {"arch": "switch", "d_in": 32, "n_features": 128, "k": 4, "n_experts": 4}
    train = {"steps": 3, "batch_size": 32, "lr": 1e-2, "progress": False, "log_every": 1,
             "geometric_median_batch": 64, "device": "cpu"}
    synthetic = {"d_in": 32, "n_features": 64}
    (tmp_path / "run.json").write_text(json.dumps({"sae": sae, "train": train, "synthetic": synthetic}))
    cmd = [torchrun, "--standalone", "--nproc_per_node=2", "-m", "switch_sae_core.distributed",
           "--config", str(tmp_path / "run.json"), "--expert-parallel", "--out", str(tmp_path / "sae")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "[rank 0/2] step 3" in proc.stdout
    single = train_sae(SAEConfig(**sae), SyntheticSource(SyntheticConfig(**synthetic)), TrainConfig(**train)).sae
    assert_same_params(load_sae(tmp_path / "sae"), single)


def test_local_expert_init(distributed_results):
    """Ranks that initialise their own experts: distinct experts, one router, one shared expert."""
    from safetensors.torch import load_file

    from switch_sae_core.distributed.expert_parallel import load_sharded

    root = distributed_results / "ep_local_init_ckpt"
    shards = [load_file(str(root / f"rank_{r:05d}" / "step_00000001" / "sae.safetensors")) for r in range(WORLD)]
    for name in ("W_router", "b_router", "b_pre"):
        assert torch.equal(shards[0][name], shards[1][name]), name
    assert torch.equal(shards[0]["W_dec"][-1], shards[1]["W_dec"][-1]), "the shared expert must be replicated"
    assert not torch.allclose(shards[0]["W_dec"][0], shards[1]["W_dec"][0]), "ranks drew the same experts"
    sae = load_sharded(root)
    assert sae.W_dec.shape == (5, 16, D)
    torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.ones(5, 16))
