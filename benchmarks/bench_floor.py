"""Each trainer step against its physical floor on the machine it runs on, and the issue-25 ratios.

At d = 768, M = 24576, k = 32, batch 4096, fp32, ONE torch thread, CPU:

- the floor of a step = its encoder FLOPs (B x flops_per_input()["encoder"]) at this core's peak, measured
  as a GEMM at the TopK encoder's shape (4096 x 768 @ 768 x 24576), plus Adam's 28 bytes per parameter
  (read weights, gradient, two moments; write weights, two moments) at the bandwidth a fused Adam step
  reaches (`torch.optim.Adam(fused=True)` over the TopK's parameters);
- the trainer step (`train.train_step`: forward, backward, `optim.fused_step`) of TopK, Switch-16 (fixed
  width) and FLOP-matched Switch-2/4/8, timed side by side in one process (steps interleaved: TopK, the
  others, TopK, ...; median of `--repeats` after one warm-up), process CPU time beside wall-clock, with the
  load average. FM-2/4 share a process with TopK, Switch-16 and FM-8 another (memory); each ratio is taken
  within its process. Switch-16 and FM-8 are also timed with the multi-pass upkeep (projection, clipping,
  Adam, renormalisation as separate passes) to show what `optim.fused_step` changes, and TopK, Switch-16 and
  FM-8 with the C++ kernels switched off (`SWITCH_SAE_KERNELS=0`: torch's top-k and optimizer passes);
- the plain loop (`torch.optim.Adam(fused=True)`, no upkeep) for TopK and Switch-16;
- peak memory of each configuration: ru_maxrss growth of a subprocess that takes two steps;
- peers (sparsify's SparseCoder, SAELens's TopKTrainingSAE) at the same size, when importable by
  `--peer-python` (default: this interpreter), each in its own subprocess; skipped, saying so, otherwise.

    python benchmarks/bench_floor.py --repeats 3 [--peer-python /path/to/venv-with-sae_lens/bin/python]

Writes benchmarks/results/floor_paper_cpu.{md,json}. Targets (issue 25): Switch-16 >= 10x TopK per trainer
step (>= 8x plain loop); every step within 1.5x of its floor; FM-8 <= 1.2x TopK.
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
from pathlib import Path
from timing import write_results

D, M, K, B = (int(v) for v in os.environ.get("BENCH_FLOOR_DMKB", "768,24576,32,4096").split(","))  # smoke: 64,1024,8,256
RESULTS = Path(__file__).resolve().parent / "results"
CONFIGS = {"topk": dict(arch="topk", n_features=M, n_experts=1),
           "switch-16": dict(arch="switch", n_features=M, n_experts=16),
           **{f"fm-{n}": dict(arch="switch", n_features=M * n, n_experts=n) for n in (2, 4, 8)}}
GROUPS = (("topk", "switch-16", "fm-8"), ("topk", "fm-2", "fm-4"))
MULTI_PASS = ("switch-16", "fm-8")
NO_KERNELS = ("topk", "switch-16", "fm-8")  # also timed with SWITCH_SAE_KERNELS=0: the torch path of every kernel
PLAIN = ("topk", "switch-16")
TARGETS = {"switch-16 / topk (trainer)": 10.0, "switch-16 / topk (plain, fused Adam)": 8.0, "step / floor": 1.5,
           "fm-8 / topk": 1.2}


def _setup(threads: int = 1):
    import torch

    from switch_sae_core import runtime

    runtime.tune_allocator()  # what the trainer does
    torch.set_num_threads(threads)
    return torch


def _build(name: str):
    import torch

    from switch_sae_core.config import SAEConfig
    from switch_sae_core.saes import build_sae

    torch.manual_seed(0)
    return build_sae(SAEConfig(d_in=D, k=K, **CONFIGS[name]))


def _multi_pass(sae, optimizer, max_norm, grad_norm=None):
    total = sae.upkeep_gradients(max_norm, grad_norm)
    optimizer.step()
    sae.normalize_decoder()
    return total


def _steps(name: str) -> dict:
    """{loop: step(x)} for one configuration: 'trainer', and 'trainer multi-pass' / 'plain' where asked."""
    import torch

    from switch_sae_core import train
    from switch_sae_core.config import TrainConfig

    sae = _build(name)
    opt = train.make_optimizer(sae, TrainConfig())
    steps = {"trainer": lambda x: train.train_step(sae, opt, x)}
    if name in MULTI_PASS:
        def multi(x):
            train.fused_step = _multi_pass  # the name train_step calls
            try:
                train.train_step(sae, opt, x)
            finally:
                train.fused_step = fused
        fused = train.fused_step
        steps["trainer multi-pass"] = multi
    if name in NO_KERNELS:
        def no_kernels(x):
            os.environ["SWITCH_SAE_KERNELS"] = "0"  # read at each call (switch_sae_core.kernels.enabled)
            try:
                train.train_step(sae, opt, x)
            finally:
                os.environ["SWITCH_SAE_KERNELS"] = "1"
        steps["trainer, no kernels"] = no_kernels
    if name in PLAIN:
        plain_opt = torch.optim.Adam(sae.parameters(), lr=1e-4, fused=True)

        def plain(x):
            loss = sum(sae.losses(x, sae(x)).values())
            plain_opt.zero_grad(set_to_none=True)
            loss.backward()
            plain_opt.step()
        steps["plain"] = plain
    return steps


# --- workers (each in its own process) -----------------------------------------------------------------
def work_floor(repeats: int) -> dict:
    """Peak FLOP/s of the encoder GEMM and bandwidth of a fused Adam step, both one thread, CPU time."""
    torch = _setup()
    x = torch.randn(B, D)
    W = torch.randn(M, D)
    cpu = []
    for _ in range(repeats + 1):
        c0 = time.process_time()
        x @ W.T
        cpu.append(time.process_time() - c0)
    gflops = 2 * B * M * D / statistics.median(cpu[1:]) / 1e9
    sae = _build("topk")
    opt = torch.optim.Adam(sae.parameters(), lr=1e-6, fused=True)
    for p in sae.parameters():
        p.grad = torch.randn_like(p) * 1e-4
    n = sum(p.numel() for p in sae.parameters())
    adam = []
    for _ in range(repeats + 1):
        c0 = time.process_time()
        opt.step()
        adam.append(time.process_time() - c0)
    return dict(gemm_gflops=gflops, gemm_cpu_s=statistics.median(cpu[1:]), adam_gbps=28 * n / statistics.median(adam[1:]) / 1e9,
                adam_cpu_s=statistics.median(adam[1:]), adam_params=n)


def work_group(names: list[str], repeats: int) -> list[dict]:
    """Interleaved timing of every (configuration, loop) of a group in this one process."""
    torch = _setup()
    x = torch.randn(B, D)
    runs = [(name, loop, fn) for name in names for loop, fn in _steps(name).items()]
    samples = {(name, loop): ([], []) for name, loop, _ in runs}
    for rep in range(repeats + 1):
        for name, loop, fn in runs:
            w0, c0 = time.perf_counter(), time.process_time()
            fn(x)
            if rep:  # the first round warms up
                samples[name, loop][0].append(time.perf_counter() - w0)
                samples[name, loop][1].append(time.process_time() - c0)
    return [dict(name=name, loop=loop, wall_s=statistics.median(w), cpu_s=statistics.median(c), cpu_times=c)
            for (name, loop), (w, c) in samples.items()]


def work_memory(name: str) -> dict:
    torch = _setup()
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    step = _steps(name)["trainer"]
    x = torch.randn(B, D)
    for _ in range(2):
        step(x)
    sae = _build(name)
    return dict(name=name, peak_mib=(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024,
                n_params=sae.n_params, encoder_flops=B * sae.flops_per_input()["encoder"])


def work_peer(peer: str, repeats: int) -> dict:
    """One peer's TopK training step at the same size, in this interpreter (only torch and the peer)."""
    import torch

    torch.set_num_threads(1)
    x = torch.randn(B, D)
    if peer == "sae_lens":
        from sae_lens.saes.sae import TrainStepInput
        from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

        sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=D, d_sae=M, k=K, dtype="float32", device="cpu"))
        opt = torch.optim.Adam(sae.parameters(), lr=1e-4)
        coefficients = sae.get_coefficients() if hasattr(sae, "get_coefficients") else {}
        coefficients = {k: (v.value if hasattr(v, "value") else v) for k, v in coefficients.items()}

        def step():
            out = sae.training_forward_pass(TrainStepInput(x, coefficients, torch.zeros(M, dtype=torch.bool), 0, False))
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
            opt.step()
        version = __import__("sae_lens").__version__
    elif peer == "sparsify":
        from sparsify import SaeConfig, SparseCoder

        sae = SparseCoder(D, SaeConfig(num_latents=M, k=K), device="cpu", dtype=torch.float32)
        opt = torch.optim.Adam(sae.parameters(), lr=1e-4)

        def step():
            out = sae(x)
            opt.zero_grad(set_to_none=True)
            out.fvu.backward()
            opt.step()
        version = getattr(__import__("sparsify"), "__version__", "?")
    else:
        raise ValueError(peer)
    cpu, wall = [], []
    for rep in range(repeats + 1):
        w0, c0 = time.perf_counter(), time.process_time()
        step()
        if rep:
            cpu.append(time.process_time() - c0)
            wall.append(time.perf_counter() - w0)
    return dict(name=f"{peer} {version}", cpu_s=statistics.median(cpu), wall_s=statistics.median(wall),
                peak_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


# --- the driver ------------------------------------------------------------------------------------------
def run_worker(job: dict, python: str = sys.executable) -> dict | list:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    proc = subprocess.run([python, __file__, "--worker", json.dumps(job)], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def markdown(res: dict) -> str:
    f = res["floor"]
    lines = [res["header"], "",
             f"Floor on this machine: encoder GEMM ({B}x{D} @ {D}x{M}) {f['gemm_gflops']:.1f} GFLOP/s, fused Adam "
             f"{f['adam_gbps']:.1f} GB/s (28 bytes per parameter over {f['adam_params'] / 1e6:.1f}M parameters), one thread.",
             "", "| config | loop | params (M) | encoder GFLOP | floor s | CPU s/step | step / floor | TopK CPU / this (TopK in the same loop, else its trainer step) "
             "| wall s/step | peak mem (MiB) | load avg |", "|" + "---|" * 11]
    for r in res["rows"]:
        lines.append(f"| {r['name']} | {r['loop']} | {r['n_params'] / 1e6:.1f} | {r['encoder_flops'] / 1e9:.1f} | "
                     f"{r['floor_s']:.3f} | {r['cpu_s']:.3f} | {r['cpu_s'] / r['floor_s']:.2f}x | {r['topk_ratio']:.2f}x | "
                     f"{r['wall_s']:.3f} | {r.get('peak_mib', float('nan')):.0f} | {r['load']} |")
    lines += ["", "Peers (own process, same size, one thread; CPU s per step, median; TopK CPU / peer from this run's "
              "TopK trainer step):", ""]
    for p in res["peers"]:
        lines.append(f"- {p['name']}: " + (f"{p['cpu_s']:.3f} s CPU, {p['wall_s']:.3f} s wall, peak {p['peak_mib']:.0f} MiB "
                                           f"(our TopK / peer {p['topk_ratio']:.2f}x)" if "cpu_s" in p else p["skipped"]))
    lines += ["", "| target (issue 25) | goal | measured | met |", "|---|---|---|---|"]
    for t in res["targets"]:
        lines.append(f"| {t['target']} | {t['goal']} | {t['measured']} | {'yes' if t['met'] else 'no'} |")
    return "\n".join(lines) + "\n"


def targets(rows: list[dict]) -> list[dict]:
    get = {(r["name"], r["loop"], r["group"]): r for r in rows}
    g0 = GROUPS[0]
    topk, s16, fm8 = (get[n, "trainer", 0] for n in g0)
    out = [dict(target="Switch-16 / TopK per trainer step, CPU time", goal=">= 10x",
                measured=f"{topk['cpu_s'] / s16['cpu_s']:.2f}x", met=topk["cpu_s"] / s16["cpu_s"] >= 10),
           dict(target="Switch-16 / TopK, plain loop with Adam(fused=True)", goal=">= 8x",
                measured=f"{get['topk', 'plain', 0]['cpu_s'] / get['switch-16', 'plain', 0]['cpu_s']:.2f}x",
                met=get["topk", "plain", 0]["cpu_s"] / get["switch-16", "plain", 0]["cpu_s"] >= 8),
           dict(target="FM-8 / TopK per trainer step", goal="<= 1.2x", measured=f"{fm8['cpu_s'] / topk['cpu_s']:.2f}x",
                met=fm8["cpu_s"] / topk["cpu_s"] <= 1.2)]
    for r in rows:
        if r["loop"] == "trainer" and not (r["name"] == "topk" and r["group"] == 1):
            ratio = r["cpu_s"] / r["floor_s"]
            out.append(dict(target=f"{r['name']} trainer step / floor", goal="<= 1.5x", measured=f"{ratio:.2f}x",
                            met=ratio <= 1.5))
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3, help="timed rounds after one warm-up round")
    p.add_argument("--peer-python", default=sys.executable, help="interpreter that has sparsify / sae_lens installed")
    p.add_argument("--peers", nargs="*", default=["sparsify", "sae_lens"])
    p.add_argument("--out", type=Path, default=RESULTS / "floor_paper_cpu")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        job = json.loads(args.worker)
        kind = job.pop("kind")
        print(json.dumps({"floor": work_floor, "group": work_group, "memory": work_memory, "peer": work_peer}[kind](**job)))
        return {}
    import torch

    header = (f"`python benchmarks/bench_floor.py {' '.join(argv if argv is not None else sys.argv[1:])}` — d={D}, M={M}, "
              f"k={K}, batch {B}, fp32, CPU, one thread, torch {torch.__version__}, cpus={os.cpu_count()}, "
              f"{time.strftime('%Y-%m-%d %H:%M')}, load average at start {os.getloadavg()[0]:.1f}")
    print(header, flush=True)
    floor = run_worker(dict(kind="floor", repeats=args.repeats))
    print(f"floor: {floor}", flush=True)
    memory = {n: run_worker(dict(kind="memory", name=n)) for n in CONFIGS}
    print(f"memory: { {n: round(m['peak_mib']) for n, m in memory.items()} }", flush=True)
    rows = []
    for gi, names in enumerate(GROUPS):
        load0 = os.getloadavg()[0]
        group = run_worker(dict(kind="group", names=list(names), repeats=args.repeats))
        load = f"{load0:.1f} → {os.getloadavg()[0]:.1f}"
        topk_by_loop = {r["loop"]: r["cpu_s"] for r in group if r["name"] == "topk"}  # each loop against TopK's own
        for r in group:
            m = memory[r["name"]]
            floor_s = m["encoder_flops"] / (floor["gemm_gflops"] * 1e9) + 28 * m["n_params"] / (floor["adam_gbps"] * 1e9)
            ref = topk_by_loop.get(r["loop"], topk_by_loop["trainer"])
            rows.append(dict(r, group=gi, load=load, floor_s=floor_s, topk_ratio=ref / r["cpu_s"], **m))
            print(f"  {r['name']:>10} {r['loop']:>18}: {r['cpu_s']:.3f} s CPU, {r['wall_s']:.3f} s wall, "
                  f"{r['cpu_s'] / floor_s:.2f}x floor, load {load}", flush=True)
    peers = []
    for peer in args.peers:
        try:
            peers.append(run_worker(dict(kind="peer", peer=peer, repeats=2), args.peer_python))
            peers[-1]["topk_ratio"] = rows[0]["cpu_s"] / peers[-1]["cpu_s"]
        except RuntimeError as e:
            peers.append(dict(name=peer, skipped=f"skipped: not runnable with {args.peer_python} ({e})"))
        print(f"  peer {peers[-1]}", flush=True)
    header += f"; load average at end {os.getloadavg()[0]:.1f}"
    res = dict(header=header, floor=floor, rows=rows, peers=peers, targets=targets(rows))
    write_results(args.out, res, markdown)
    return res


if __name__ == "__main__":
    main()
