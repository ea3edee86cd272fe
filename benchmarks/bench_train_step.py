"""Wall-clock of ONE training step (forward + backward + decoder upkeep + clipping + Adam), the trainer's
own `train.train_step`, for TopK and Switch SAEs, in one run:

- TopK at width M;
- Switch at fixed width M with N in {4, 16, 64} (encoder FLOPs / N);
- Switch FLOP-matched: N in {2, 4, 8} experts each M wide (total M*N, about the TopK's FLOPs).

Each configuration runs in its own subprocess, so its peak memory is its own: on CPU the growth of
ru_maxrss over the process's state after imports (torch's allocator is invisible to tracemalloc), on
CUDA torch.cuda.max_memory_allocated.

    python benchmarks/bench_train_step.py                       # paper sizes: d=768, M=24576, k=32, B=4096
    python benchmarks/bench_train_step.py --sizes small --repeats 3   # a quick smoke run
    python benchmarks/bench_train_step.py --profile switch-16   # where one configuration's time goes
    python benchmarks/bench_train_step.py --profile switch-16 --phases --threads 1   # CPU time per piece

Wall-clock is the number that matters on an idle machine; the process CPU time (all threads) is also
reported because it barely moves when other jobs share the CPU (with --threads 1 it is the work done).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

SIZES = {  # d, M (TopK width = fixed Switch width = FLOP-matched expert width), k, batch
    "paper": dict(d=768, m=24576, k=32, batch=4096),
    "small": dict(d=128, m=2048, k=16, batch=512),
    "tiny": dict(d=32, m=256, k=4, batch=64),
}
FIXED_WIDTH_EXPERTS = (4, 16, 64)
FLOP_MATCHED_EXPERTS = (2, 4, 8)


def configurations(m: int) -> list[dict]:
    """name, arch, n_features, n_experts of every configuration, TopK first."""
    out = [dict(name="topk", arch="topk", n_features=m, n_experts=1)]
    out += [dict(name=f"switch-{n}", arch="switch", n_features=m, n_experts=n) for n in FIXED_WIDTH_EXPERTS]
    out += [dict(name=f"switch-{n}-flopmatched", arch="switch", n_features=m * n, n_experts=n)
            for n in FLOP_MATCHED_EXPERTS]
    return out


# --- one configuration, inside its own process ----------------------------------------------------
def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def run_one(conf: dict, size: dict, device_name: str, repeats: int, warmup: int, profile: bool = False,
            threads: int = 0) -> dict:
    import torch

    from switch_sae_core.config import SAEConfig, TrainConfig
    from switch_sae_core.saes import build_sae
    from switch_sae_core.train import make_optimizer, resolve_device, train_step

    device = resolve_device(device_name)
    if threads:
        torch.set_num_threads(threads)
    rss0 = peak_rss_mib()
    torch.manual_seed(0)
    cfg = SAEConfig(arch=conf["arch"], d_in=size["d"], n_features=conf["n_features"], k=size["k"],
                    n_experts=conf["n_experts"])
    sae = build_sae(cfg).to(device)
    opt = make_optimizer(sae, TrainConfig())
    x_BD = torch.randn(size["batch"], size["d"], device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(warmup):
        train_step(sae, opt, x_BD)
    times, cpu_times = [], []
    for _ in range(repeats):
        sync()
        t0, c0 = time.perf_counter(), time.process_time()
        train_step(sae, opt, x_BD)
        sync()
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
    if profile == "phases":
        print_phases(sae, opt, x_BD)
    elif profile:
        print_profile(sae, opt, x_BD, device)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else peak_rss_mib() - rss0
    return dict(conf, median_s=statistics.median(times), min_s=min(times), times=times,
                cpu_s=statistics.median(cpu_times),
                flops=sae.flops_per_input()["total"], n_params=sae.n_params, peak_mib=peak,
                device=str(device), threads=torch.get_num_threads())


def print_phases(sae, opt, x_BD, repeats: int = 3) -> None:
    """CPU time of each piece of `train.train_step`, in its order (median over `repeats`)."""
    from switch_sae_core.train import clip_gradients

    def loss_of():
        out = sae(x_BD)
        return sum(sae.losses(x_BD, out).values())

    pieces = {"forward + loss": loss_of}
    pieces["backward"] = lambda: (opt.zero_grad(set_to_none=True), pieces["_loss"].backward())
    pieces["remove_parallel_grads"] = sae.remove_parallel_grads
    pieces["clip"] = lambda: clip_gradients(sae, 1.0)
    pieces["adam"] = opt.step
    pieces["normalize_decoder"] = sae.normalize_decoder
    times: dict[str, list[float]] = {k: [] for k in pieces if not k.startswith("_")}
    for _ in range(repeats):
        for name in times:
            t0 = time.process_time()
            result = pieces[name]()
            times[name].append(time.process_time() - t0)
            if name == "forward + loss":
                pieces["_loss"] = result
    for name, ts in times.items():
        print(f"{name:>24}: {statistics.median(ts):.3f} s CPU", file=sys.stderr)


def print_profile(sae, opt, x_BD, device) -> None:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from switch_sae_core.train import train_step

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        train_step(sae, opt, x_BD)
    key = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=20), file=sys.stderr)


# --- the driver --------------------------------------------------------------------------------------
def worker_command(conf: dict, args: argparse.Namespace, repeats: int) -> list[str]:
    return [sys.executable, __file__, "--worker", json.dumps(conf), "--sizes", args.sizes, "--device", args.device,
            "--repeats", str(repeats), "--warmup", str(args.warmup), "--threads", str(args.threads)]


def run_in_subprocess(conf: dict, args: argparse.Namespace) -> dict:
    proc = subprocess.run(worker_command(conf, args, args.repeats), capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{conf['name']} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def table(rows: list[dict]) -> str:
    topk = rows[0]
    lines = ["| config | M | N | median step (s) | TopK time / this | CPU s/step | TopK CPU / this "
             "| TopK FLOPs / this | peak mem (MiB) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['n_features']} | {r['n_experts']} | {r['median_s']:.3f} | "
                     f"{topk['median_s'] / r['median_s']:.2f}x | {r['cpu_s']:.3f} | {topk['cpu_s'] / r['cpu_s']:.2f}x | "
                     f"{topk['flops'] / r['flops']:.2f}x | {r['peak_mib']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", choices=sorted(SIZES), default="paper")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--repeats", type=int, default=5, help="timed steps per configuration (the median is reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--only", nargs="*", help="configuration names to run (default: all)")
    p.add_argument("--profile", metavar="NAME", help="torch.profiler table of one configuration (to stderr)")
    p.add_argument("--phases", action="store_true", help="with --profile: CPU time of each piece of the step instead")
    p.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    size = SIZES[args.sizes]
    if args.worker:
        conf = json.loads(args.worker)
        print(json.dumps(run_one(conf, size, args.device, args.repeats, args.warmup, conf.get("profile", False),
                                 args.threads)))
        return []
    confs = [c for c in configurations(size["m"]) if not args.only or c["name"] in args.only]
    if args.profile:
        mode = "phases" if args.phases else True
        confs = [dict(c, profile=mode) for c in confs if c["name"] == args.profile]
        if not confs:
            p.error(f"--profile {args.profile}: not a configuration name; choose from "
                    f"{[c['name'] for c in configurations(size['m'])]}")
    print(f"sizes={args.sizes} {size} device={args.device} repeats={args.repeats} "
          f"cpus={os.cpu_count()} load={os.getloadavg()[0]:.1f}", flush=True)
    rows = []
    for conf in confs:
        if args.profile:  # the profiler table goes to stderr: let it through
            subprocess.run(worker_command(conf, args, 1), check=True)
            return []
        rows.append(run_in_subprocess(conf, args))
        print(f"  {conf['name']}: {rows[-1]['median_s']:.3f} s/step", flush=True)
    print(f"threads={rows[0]['threads']} device={rows[0]['device']} load after={os.getloadavg()[0]:.1f}")
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
