"""One training step of TopK and Switch SAEs, side by side, in the two loops people run:

- `trainer`: the library's own `train.train_step` (forward, backward, fused parallel-gradient removal
  and clipping, fused Adam, decoder renormalisation);
- `plain`: the loop a researcher writes around the module: `out = sae(x)`; `loss = sum(sae.losses(x,
  out).values())`;
  `opt.zero_grad(set_to_none=True)`; `loss.backward()`; `opt.step()` with `torch.optim.Adam(...)`
  at its defaults (no upkeep, no clipping).

Configurations (d = 768, k = 32 at the paper size): TopK at width M; Switch-16 at the same width (16x
fewer encoder FLOPs); FLOP-matched Switch-2/4/8 (N experts each M wide, about the TopK's FLOPs).
Every (configuration, loop, batch) runs in its own subprocess, so its peak memory is its own: on
CPU the growth of ru_maxrss over the process after imports, on CUDA torch.cuda.max_memory_allocated.
The load average is recorded around each one: the process CPU time (all threads) is the fair number
on a shared machine, wall-clock on a quiet one.

    python benchmarks/bench_train_step.py                        # paper size, batches 4096 and 8192
    python benchmarks/bench_train_step.py --sizes small --repeats 3 --batches 512   # a smoke run
    python benchmarks/bench_train_step.py --floors               # + CPU time of each piece of the step
    python benchmarks/bench_train_step.py --device cuda --dtype bf16 [--compile]   # on a GPU

Writes benchmarks/results/train_step_<sizes>_<device>.{md,csv} (override with --out).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

SIZES = {  # d, M (TopK width = fixed Switch width = FLOP-matched expert width), k
    "paper": dict(d=768, m=24576, k=32),
    "small": dict(d=128, m=2048, k=16),
    "tiny": dict(d=32, m=256, k=4),
}
FIXED_WIDTH_EXPERTS = (16,)
FLOP_MATCHED_EXPERTS = (2, 4, 8)
LOOPS = ("trainer", "plain")
RESULTS = Path(__file__).resolve().parent / "results"


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


def make_step(sae, loop: str, device, dtype: str, compile_step: bool):
    """-> step(x_BD): one optimizer step of `loop` ('trainer' or 'plain')."""
    import torch

    from switch_sae_core.config import TrainConfig
    from switch_sae_core.train import make_optimizer, train_step

    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bf16" else None
    if loop == "trainer":
        opt = make_optimizer(sae, TrainConfig())

        def step(x_BD):
            train_step(sae, opt, x_BD, autocast=autocast)
    else:
        opt = torch.optim.Adam(sae.parameters(), lr=1e-4)

        def step(x_BD):
            with autocast if autocast is not None else nullcontext():
                out = sae(x_BD)
                loss = sum(sae.losses(x_BD, out).values())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return torch.compile(step) if compile_step else step


def run_one(conf: dict, size: dict, batch: int, loop: str, device_name: str, dtype: str, repeats: int,
            warmup: int, threads: int, compile_step: bool, floors: bool) -> dict:
    import torch

    from switch_sae_core.config import SAEConfig
    from switch_sae_core.saes import build_sae
    from switch_sae_core.train import resolve_device

    from switch_sae_core import runtime

    runtime.tune_allocator()  # as train_sae does (SWITCH_SAE_KEEP_FREED_MEMORY=0: not)
    device = resolve_device(device_name)
    if threads:
        torch.set_num_threads(threads)
    rss0 = peak_rss_mib()
    torch.manual_seed(0)
    cfg = SAEConfig(arch=conf["arch"], d_in=size["d"], n_features=conf["n_features"], k=size["k"],
                    n_experts=conf["n_experts"])
    sae = build_sae(cfg).to(device)
    step = make_step(sae, loop, device, dtype, compile_step)
    x_BD = torch.randn(batch, size["d"], device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        step(x_BD)
    if device.type == "cuda":
        sync()
        torch.cuda.reset_peak_memory_stats()
    times, cpu_times = [], []
    for _ in range(repeats):
        sync()
        t0, c0 = time.perf_counter(), time.process_time()
        step(x_BD)
        sync()  # CUDA: the step's kernels are done before the clock stops
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else peak_rss_mib() - rss0
    row = dict(conf, loop=loop, batch=batch, wall_s=statistics.median(times), cpu_s=statistics.median(cpu_times),
               times=times, cpu_times=cpu_times, flops=sae.flops_per_input()["total"], n_params=sae.n_params,
               peak_mib=peak, device=str(device), dtype=dtype, compiled=compile_step,
               threads=torch.get_num_threads())
    if floors and loop == "trainer":
        row["floors"] = measure_floors(sae, x_BD, sync)
    return row


def measure_floors(sae, x_BD, sync, repeats: int = 2) -> dict:
    """CPU time (median of `repeats`) of each piece of the trainer's step, and of the pieces that bound
    it from below: the bare encoder matmul, one fused and one default (per-tensor) Adam step."""
    import torch

    from switch_sae_core.config import TrainConfig
    from switch_sae_core.saes.switch import dispatch
    from switch_sae_core.ops import grouped_matmul
    from switch_sae_core.train import make_optimizer

    fused, default = make_optimizer(sae, TrainConfig()), torch.optim.Adam(sae.parameters(), lr=1e-4)
    state = {}

    def forward():
        state["loss"] = sum(sae.losses(x_BD, sae(x_BD)).values())

    def backward():
        sae.zero_grad(set_to_none=True)
        state["loss"].backward()

    def encoder():
        with torch.no_grad():
            if sae.cfg.arch == "topk":
                return x_BD @ sae.W_enc.T
            _, experts_BE, _ = sae.route(x_BD)
            d = dispatch(experts_BE, sae.n_stacked)
            return grouped_matmul(x_BD[d.input_T], sae.W_enc, d.group_sizes_G)

    pieces = {"encoder matmul": encoder, "forward + loss": forward, "backward": backward,
              "upkeep + clip": lambda: sae.upkeep_gradients(1.0), "fused Adam": fused.step,
              "normalize_decoder": sae.normalize_decoder, "default Adam": default.step}
    times = {name: [] for name in pieces}
    for _ in range(repeats):
        for name, fn in pieces.items():
            sync()
            c0 = time.process_time()
            fn()
            sync()
            times[name].append(time.process_time() - c0)
    return {name: statistics.median(ts) for name, ts in times.items()}


# --- the driver --------------------------------------------------------------------------------------
def worker_command(conf: dict, batch: int, loop: str, args: argparse.Namespace) -> list[str]:
    job = dict(conf=conf, batch=batch, loop=loop)
    cmd = [sys.executable, __file__, "--worker", json.dumps(job), "--sizes", args.sizes, "--device", args.device,
           "--dtype", args.dtype, "--repeats", str(args.repeats), "--warmup", str(args.warmup),
           "--threads", str(args.threads)]
    return cmd + (["--compile"] if args.compile else []) + (["--floors"] if args.floors else [])


def run_in_subprocess(conf: dict, batch: int, loop: str, args: argparse.Namespace) -> dict:
    load_before = os.getloadavg()[0]
    proc = subprocess.run(worker_command(conf, batch, loop, args), capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{conf['name']} ({loop}, batch {batch}) failed:\n{proc.stderr[-3000:]}")
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    return dict(row, load_before=load_before, load_after=os.getloadavg()[0])


def with_ratios(rows: list[dict]) -> list[dict]:
    """Add TopK/this ratios (CPU, wall, FLOPs), within each (loop, batch)."""
    topk = {(r["loop"], r["batch"]): r for r in rows if r["arch"] == "topk"}
    for r in rows:
        t = topk.get((r["loop"], r["batch"]))
        if t is not None:
            r["topk_cpu_ratio"] = t["cpu_s"] / r["cpu_s"]
            r["topk_wall_ratio"] = t["wall_s"] / r["wall_s"]
            r["topk_flops_ratio"] = t["flops"] / r["flops"]
    return rows


COLUMNS = ["loop", "batch", "name", "n_features", "n_experts", "cpu_s", "topk_cpu_ratio", "wall_s", "topk_wall_ratio",
           "topk_flops_ratio", "peak_mib", "load_before", "load_after"]


def markdown(rows: list[dict]) -> str:
    lines = ["| loop | batch | config | M | N | CPU s/step | TopK CPU / this | wall s/step | TopK wall / this "
             "| TopK FLOPs / this | peak mem (MiB) | load avg before → after |", "|" + "---|" * 12]
    for r in rows:
        lines.append(f"| {r['loop']} | {r['batch']} | {r['name']} | {r['n_features']} | {r['n_experts']} | "
                     f"{r['cpu_s']:.3f} | {r.get('topk_cpu_ratio', float('nan')):.2f}x | {r['wall_s']:.3f} | "
                     f"{r.get('topk_wall_ratio', float('nan')):.2f}x | {r.get('topk_flops_ratio', float('nan')):.2f}x | "
                     f"{r['peak_mib']:.0f} | {r['load_before']:.1f} → {r['load_after']:.1f} |")
    floor_rows = [r for r in rows if "floors" in r]
    if floor_rows:
        names = list(floor_rows[0]["floors"])
        lines += ["", "CPU seconds of each piece of the trainer's step (mean of 2, same process):", "",
                  "| batch | config | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 2)]
        for r in floor_rows:
            lines.append(f"| {r['batch']} | {r['name']} | " + " | ".join(f"{r['floors'][n]:.3f}" for n in names) + " |")
    return "\n".join(lines)


def write_results(rows: list[dict], header: str, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(header + "\n\n" + markdown(rows) + "\n")
    with open(out.with_suffix(".csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS + ["device", "dtype", "compiled", "threads"], extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", choices=sorted(SIZES), default="paper")
    p.add_argument("--batches", type=int, nargs="+", default=[4096, 8192])
    p.add_argument("--loops", nargs="+", choices=LOOPS, default=list(LOOPS))
    p.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="bf16 = autocast on the device")
    p.add_argument("--compile", action="store_true", help="torch.compile the step function")
    p.add_argument("--repeats", type=int, default=5, help="timed steps per run (the median is reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--only", nargs="*", help="configuration names to run (default: all)")
    p.add_argument("--floors", action="store_true", help="also time each piece of the trainer's step")
    p.add_argument("--out", type=Path, help="results path without suffix (default benchmarks/results/train_step_...)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    size = SIZES[args.sizes]
    if args.worker:
        job = json.loads(args.worker)
        print(json.dumps(run_one(job["conf"], size, job["batch"], job["loop"], args.device, args.dtype, args.repeats,
                                 args.warmup, args.threads, args.compile, args.floors)))
        return []
    confs = [c for c in configurations(size["m"]) if not args.only or c["name"] in args.only]
    header = (f"`{' '.join(['python benchmarks/bench_train_step.py'] + (argv if argv is not None else sys.argv[1:]))}`"
              f" — sizes={args.sizes} {size}, device={args.device}, dtype={args.dtype}, compile={args.compile}, "
              f"repeats={args.repeats}, cpus={os.cpu_count()}, {time.strftime('%Y-%m-%d %H:%M')}, "
              f"load average at start {os.getloadavg()[0]:.1f}")
    print(header, flush=True)
    out = args.out or RESULTS / f"train_step_{args.sizes}_{args.device}_{args.dtype}{'_compiled' if args.compile else ''}"
    rows = []
    for batch in args.batches:
        for loop in args.loops:
            for conf in confs:
                rows.append(run_in_subprocess(conf, batch, loop, args))
                r = rows[-1]
                print(f"  {loop:>7} B={batch} {conf['name']:>22}: {r['cpu_s']:.3f} s CPU, {r['wall_s']:.3f} s wall, "
                      f"load {r['load_before']:.1f} -> {r['load_after']:.1f}", flush=True)
                write_results(with_ratios(rows), header + " (partial: the run is still going)", out)
    header += f"; load average at end {os.getloadavg()[0]:.1f}; torch threads {rows[0]['threads']}"
    print(markdown(rows))
    write_results(rows, header, out)
    print(f"wrote {out.with_suffix('.md')} and .csv")
    return rows


if __name__ == "__main__":
    main()
