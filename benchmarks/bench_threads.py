"""The trainer's step with 1 vs 2 torch threads, on the machine as it is and with extra load (issue 25).

At the `quick` size (d = 576, M = 2304, k = 32, batch 512): TopK and Switch-16 (and Switch-4), one
process, the thread counts interleaved step by step (1, 2, 1, 2, ...), process CPU time beside
wall-clock, median of `--repeats`. Then `--load` busy-loop processes (pure Python `while True`) are started
and the same is measured again, and stopped. The load average is printed with each phase.

Why: OpenMP threads that wait for a core spin and bill CPU time; the many small ops of a sparse step
pay that synchronisation at every op. `runtime.apply_thread_policy` (the trainer's default) chooses
from these numbers.

    python benchmarks/bench_threads.py --repeats 7 --load 2
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import time
from pathlib import Path

import torch

from switch_sae_core.config import SAEConfig, TrainConfig
from switch_sae_core.saes import build_sae
from switch_sae_core.train import make_optimizer, train_step

RESULTS = Path(__file__).resolve().parent / "results"
CONFIGS = {"topk": dict(arch="topk", n_experts=1), "switch-4": dict(arch="switch", n_experts=4),
           "switch-16": dict(arch="switch", n_experts=16)}


def busy() -> None:
    while True:
        pass


def measure(steps: dict, x_BD: torch.Tensor, repeats: int) -> dict:
    """{(name, threads): (median wall s, median CPU s)}, threads interleaved per repetition."""
    times = {(name, t): ([], []) for name in steps for t in (1, 2)}
    for name, step in steps.items():  # warm-up at both counts
        for t in (1, 2):
            torch.set_num_threads(t)
            step(x_BD)
    for _ in range(repeats):
        for name, step in steps.items():
            for t in (1, 2):
                torch.set_num_threads(t)
                w0, c0 = time.perf_counter(), time.process_time()
                step(x_BD)
                times[name, t][0].append(time.perf_counter() - w0)
                times[name, t][1].append(time.process_time() - c0)
    return {key: (statistics.median(w), statistics.median(c)) for key, (w, c) in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--load", type=int, default=2, help="busy-loop processes for the loaded phase")
    p.add_argument("--out", type=Path, default=RESULTS / "threads_quick_cpu.md")
    args = p.parse_args()
    torch.manual_seed(0)
    steps = {}
    for name, kw in CONFIGS.items():
        sae = build_sae(SAEConfig(d_in=576, n_features=2304, k=32, **kw))
        opt = make_optimizer(sae, TrainConfig())
        steps[name] = (lambda s, o: lambda x: train_step(s, o, x))(sae, opt)
    x_BD = torch.randn(512, 576)
    lines = [f"`python benchmarks/bench_threads.py --repeats {args.repeats} --load {args.load}` — d=576, M=2304, "
             f"k=32, batch 512, trainer step, cpus={os.cpu_count()}, torch {torch.__version__}, "
             f"{time.strftime('%Y-%m-%d %H:%M')}", "",
             "| phase | load avg before → after | config | 1 thread wall s | 2 threads wall s | 1 thread CPU s "
             "| 2 threads CPU s | wall 2/1 |", "|" + "---|" * 8]
    for phase in ("as is", f"+{args.load} busy loops"):
        workers = []
        if phase != "as is":
            workers = [mp.Process(target=busy, daemon=True) for _ in range(args.load)]
            for w in workers:
                w.start()
            time.sleep(2)
        load0 = os.getloadavg()[0]
        try:
            res = measure(steps, x_BD, args.repeats)
        finally:
            for w in workers:
                w.terminate()
                w.join()
        load1 = os.getloadavg()[0]
        for name in steps:
            (w1, c1), (w2, c2) = res[name, 1], res[name, 2]
            lines.append(f"| {phase} | {load0:.1f} → {load1:.1f} | {name} | {w1:.4f} | {w2:.4f} | {c1:.4f} | {c2:.4f} "
                         f"| {w2 / w1:.2f}x |")
        print("\n".join(lines[-len(steps):]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
