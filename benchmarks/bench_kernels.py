"""The C++ CPU kernels (switch_sae_core/kernels) against the torch path they replace, one thread, CPU time.

- build: the kernels' compile time in a fresh cache folder (what the first training step of a clean clone pays),
  beside the time the same compiler takes only to parse `#include <torch/extension.h>` (what a
  `torch.utils.cpp_extension` module would pay before its own code);
- the optimizer phase of a trainer step (`optim.fused_step`: projection, clipping norm, Adam, renormalisation) at
  Switch-16's size (d = 768, M = 24576, 16 experts), kernels vs the torch path (SWITCH_SAE_KERNELS=0), calls
  interleaved in one process, median of `--repeats`; the gradients are random with a norm above the clip
  (1.0), so the clipping scale is applied as well;
- row-wise top-k (k = 32) at a Switch-16 expert's width (4096 x 1536) and TopK's (4096 x 24576): torch.topk,
  `ops.topk_rows` without the kernel (its prefilter below 4096 columns, else torch.topk) and the kernel.

    python benchmarks/bench_kernels.py --repeats 7

Writes benchmarks/results/kernels_paper_cpu.{md,json}.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from timing import write_results

RESULTS = Path(__file__).resolve().parent / "results"
D, M, K, B, N = 768, 24576, 32, 4096, 16


def interleaved(fns: dict, repeats: int) -> dict:
    """{name: (median CPU s, median wall s)}, the calls interleaved, after one warm-up round."""
    cpu = {n: [] for n in fns}
    wall = {n: [] for n in fns}
    for rep in range(repeats + 1):
        for name, fn in fns.items():
            w0, c0 = time.perf_counter(), time.process_time()
            fn()
            if rep:
                cpu[name].append(time.process_time() - c0)
                wall[name].append(time.perf_counter() - w0)
    return {n: (statistics.median(cpu[n]), statistics.median(wall[n])) for n in fns}


def with_kernels(on: bool, fn):
    def run():
        os.environ["SWITCH_SAE_KERNELS"] = "1" if on else "0"
        try:
            fn()
        finally:
            os.environ["SWITCH_SAE_KERNELS"] = "1"
    return run


def build_times() -> dict:
    from switch_sae_core import kernels

    with tempfile.TemporaryDirectory() as tmp:
        os.environ["SWITCH_SAE_CACHE"] = tmp
        c0, w0 = os.times(), time.perf_counter()
        kernels._build()
        c1 = os.times()
        ours = dict(cpu_s=c1.children_user + c1.children_system - c0.children_user - c0.children_system,
                    wall_s=time.perf_counter() - w0)
        src = Path(tmp) / "header.cpp"
        src.write_text("#include <torch/extension.h>\n")
        import sysconfig

        from torch.utils.cpp_extension import include_paths

        dirs = [*include_paths(), sysconfig.get_paths()["include"]]  # torch's headers and Python.h
        cmd = [kernels._compiler(), "-std=c++17", "-O3", "-fsyntax-only", *(f"-I{p}" for p in dirs), str(src)]
        c0, w0 = os.times(), time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        c1 = os.times()
        header = dict(cpu_s=c1.children_user + c1.children_system - c0.children_user - c0.children_system,
                      wall_s=time.perf_counter() - w0, ok=proc.returncode == 0)
    return dict(kernels=ours, torch_extension_header=header)


def optimizer_times(repeats: int) -> dict:
    import torch

    from switch_sae_core import optim
    from switch_sae_core.config import SAEConfig, TrainConfig
    from switch_sae_core.saes import build_sae
    from switch_sae_core.schedule import make_optimizer

    torch.manual_seed(0)
    sae = build_sae(SAEConfig(arch="switch", d_in=D, n_features=M, k=K, n_experts=N))
    opt = make_optimizer(sae, TrainConfig())
    grads = [torch.randn_like(p) * 1e-3 for p in sae.parameters()]  # norm ~6: the clip to 1.0 applies

    timed = {False: [], True: []}  # kernels on?
    for rep in range(repeats + 1):  # the first round warms up (and builds the kernels if the cache has none)
        for on in (False, True):
            for p, g in zip(sae.parameters(), grads):
                p.grad = g.clone()  # untimed: the step scales the gradients in place
            os.environ["SWITCH_SAE_KERNELS"] = "1" if on else "0"
            c0, w0 = time.process_time(), time.perf_counter()
            optim.fused_step(sae, opt, 1.0)
            if rep:
                timed[on].append((time.process_time() - c0, time.perf_counter() - w0))
    os.environ["SWITCH_SAE_KERNELS"] = "1"
    med = {on: (statistics.median(c for c, _ in t), statistics.median(w for _, w in t)) for on, t in timed.items()}
    return {"torch path": med[False], "C++ kernels": med[True], "n_params": sae.n_params}


def topk_times(repeats: int) -> dict:
    import torch

    from switch_sae_core import ops

    out = {}
    for W in (M // N, M):
        x = torch.randn(B, W)
        fns = {"torch.topk": lambda x=x: x.topk(K, dim=-1, sorted=False),
               "ops.topk_rows, no kernel": with_kernels(False, lambda x=x: ops.topk_rows(x, K)),
               "C++ kernel (ops.topk_rows)": with_kernels(True, lambda x=x: ops.topk_rows(x, K))}
        out[f"{B} x {W}"] = interleaved(fns, repeats)
    return out


def markdown(res: dict) -> str:
    b = res["build"]
    h = b["torch_extension_header"]
    opt = res["optimizer"]
    lines = [res["header"], "",
             f"- build (fresh cache, {res['compiler']}): the kernels {b['kernels']['cpu_s']:.2f} s CPU, "
             f"{b['kernels']['wall_s']:.2f} s wall; only parsing `#include <torch/extension.h>` with the same compiler: "
             f"{h['cpu_s']:.1f} s CPU, {h['wall_s']:.1f} s wall" + ("" if h["ok"] else " (failed)"),
             "", f"| work (one thread) | path | CPU ms | wall ms | CPU vs torch |", "|---|---|---|---|---|"]
    base = opt["torch path"][0]
    for path in ("torch path", "C++ kernels"):
        c, w = opt[path]
        lines.append(f"| optimizer phase, Switch-16 ({opt['n_params'] / 1e6:.1f}M parameters, clipped) | {path} | "
                     f"{c * 1e3:.1f} | {w * 1e3:.1f} | {base / c:.2f}x |")
    for shape, rows in res["topk"].items():
        base = rows["torch.topk"][0]
        for path, (c, w) in rows.items():
            lines.append(f"| top-{K} of each row, {shape} | {path} | {c * 1e3:.1f} | {w * 1e3:.1f} | {base / c:.2f}x |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--out", type=Path, default=RESULTS / "kernels_paper_cpu")
    args = p.parse_args(argv)
    import torch

    from switch_sae_core import kernels, runtime

    runtime.tune_allocator()  # what the trainer does
    torch.set_num_threads(1)
    shown = " ".join(argv if argv is not None else sys.argv[1:])
    header = (f"`python benchmarks/bench_kernels.py {shown}`".replace(" `", "`") + f" — torch {torch.__version__}, "
              f"cpus={os.cpu_count()}, one thread, {time.strftime('%Y-%m-%d %H:%M')}, load average at start "
              f"{os.getloadavg()[0]:.1f}")
    print(header, flush=True)
    compiler = subprocess.run([kernels._compiler(), "--version"], capture_output=True, text=True).stdout.splitlines()[0]
    cache = os.environ.get("SWITCH_SAE_CACHE")
    build = build_times()
    if cache is None:
        os.environ.pop("SWITCH_SAE_CACHE", None)
    else:
        os.environ["SWITCH_SAE_CACHE"] = cache
    if kernels.cpu_kernels() is None:
        sys.exit("the kernels could not be built here: nothing to compare")
    res = dict(header=header, compiler=compiler, build=build, optimizer=optimizer_times(args.repeats),
               topk=topk_times(args.repeats))
    res["header"] += f"; load average at end {os.getloadavg()[0]:.1f}"
    write_results(args.out, res, markdown)
    return res


if __name__ == "__main__":
    main()
