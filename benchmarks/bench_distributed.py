"""Steps per second of one SAE trained by 1 process vs P processes (gloo on CPU, or NCCL on GPUs).

    python benchmarks/bench_distributed.py                   # CPU: 1 process vs 2 (gloo)
    python benchmarks/bench_distributed.py --procs 1 2 4 --d 768 --n-features 24576 --batch 4096

On CPU every process gets cores / P torch threads, so the comparison holds the machine fixed: on a
2-core machine the best P processes can do is match one process with 2 threads, and they pay for the
communication on top. Numbers are medians of the timed steps after `--warmup` steps.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

from switch_sae_core.config import SAEConfig, TrainConfig
from switch_sae_core.data.synthetic import SyntheticConfig, SyntheticSource


def sae_config(args, arch: str) -> SAEConfig:
    if arch == "topk":
        return SAEConfig(arch="topk", d_in=args.d, n_features=args.n_features // args.n_experts, k=args.k)
    return SAEConfig(arch="switch", d_in=args.d, n_features=args.n_features, k=args.k, n_experts=args.n_experts)


def train_config(args) -> TrainConfig:
    return TrainConfig(steps=args.warmup + args.steps, batch_size=args.batch, log_every=1, progress=False,
                       geometric_median_batch=args.batch, device=args.device)


def source(args) -> SyntheticSource:
    return SyntheticSource(SyntheticConfig(d_in=args.d, n_features=4 * args.d, n_clusters=args.n_experts))


def step_times(stamps: list[float], warmup: int) -> float:
    """Median seconds per step over the logged steps after the warm-up."""
    return statistics.median(b - a for a, b in zip(stamps[warmup:], stamps[warmup + 1:]))


def _worker(rank: int, world: int, init_file: str, args, arch: str, expert_parallel: bool, out: str) -> None:
    from switch_sae_core.distributed import init_distributed, shutdown, train_distributed

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world) if args.device == "cpu" else 1)
    ctx = init_distributed(args.device, rank=rank, world_size=world, init_method=f"file://{init_file}")
    stamps: list[float] = []
    train_distributed(sae_config(args, arch), source(args), train_config(args), ctx=ctx,
                      expert_parallel=expert_parallel, callback=lambda row: stamps.append(time.perf_counter()))
    if rank == 0:
        Path(out).write_text(json.dumps(stamps))
    shutdown()


def time_distributed(args, world: int, arch: str, expert_parallel: bool) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "stamps.json")
        mp.spawn(_worker, args=(world, os.path.join(tmp, "pg"), args, arch, expert_parallel, out), nprocs=world)
        return step_times(json.loads(Path(out).read_text()), args.warmup)


def time_single(args, arch: str, threads: int) -> float:
    from switch_sae_core.train import train_sae

    torch.set_num_threads(threads)
    stamps: list[float] = []
    train_sae(sae_config(args, arch), source(args), train_config(args),
              callback=lambda row: stamps.append(time.perf_counter()))
    return step_times(stamps, args.warmup)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--procs", type=int, nargs="+", default=[2])
    p.add_argument("--d", type=int, default=256)
    p.add_argument("--n-features", type=int, default=16384, help="M of the Switch SAE")
    p.add_argument("--n-experts", type=int, default=16, help="N; the TopK SAE gets one expert's width M/N")
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch", type=int, default=2048, help="global batch")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    print(f"# {os.cpu_count()} CPU cores, torch {torch.__version__}, d={args.d}, M={args.n_features}, "
          f"N={args.n_experts}, k={args.k}, global batch {args.batch}, {args.steps} timed steps")
    cores = os.cpu_count() or 1
    print("| SAE | mode | processes x threads | s/step | steps/s | speed-up vs 1 process, all cores |")
    print("|---|---|---|---|---|---|")
    for arch, modes in (("topk", ("data-parallel",)), ("switch", ("data-parallel", "expert-parallel"))):
        base = time_single(args, arch, cores)
        print(f"| {arch} | train_sae | 1 x {cores} | {base:.3f} | {1 / base:.2f} | 1.00 |", flush=True)
        if cores > 1:
            t = time_single(args, arch, 1)
            print(f"| {arch} | train_sae | 1 x 1 | {t:.3f} | {1 / t:.2f} | {base / t:.2f} |", flush=True)
        for mode in modes:
            for world in args.procs:
                t = time_distributed(args, world, arch, mode == "expert-parallel")
                print(f"| {arch} | {mode} | {world} x {max(1, cores // world)} | {t:.3f} | {1 / t:.2f} | "
                      f"{base / t:.2f} |", flush=True)


if __name__ == "__main__":
    main()
