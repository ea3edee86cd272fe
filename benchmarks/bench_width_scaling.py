"""Step time and peak memory as the dictionary grows: TopK vs Switch with a fixed expert width.

M = 2^15 ... 2^20 (d = 768, batch 4096, k = 32, float32 parameters and Adam state, the library's
trainer step). TopK scores all M features for every input, so it holds a (B, M) pre-activation
matrix; a Switch SAE with 2048 features per expert (N = M / 2048) holds (B, 2048) — the paper's claim.
Both hold 2 M d parameters, their gradients and Adam's two moments (16 bytes per parameter).

Each configuration runs in its own subprocess (`bench_train_step.py`'s worker: 1 warm-up step, then
`--repeats` timed steps; peak memory = growth of ru_maxrss over the process after imports). A series
stops after a step of more than `--max-step-s` seconds of process CPU time (the fair clock on a shared
machine), or before a configuration whose predicted peak (a line through the last two measured
points) exceeds `--cap-gib`.

    python benchmarks/bench_width_scaling.py                  # cap 12 GiB (a shared 23 GiB machine)
    python benchmarks/bench_width_scaling.py --cap-gib 24 --max-m-log2 20

Writes benchmarks/results/width_scaling.{md,csv} and figures/width_scaling.png.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS, FIGURES = HERE / "results", HERE.parent / "figures"
D, K, BATCH = 768, 32, 4096


def series(arch: str, expert_width: int, m: int) -> dict:
    n = 1 if arch == "topk" else m // expert_width
    return dict(name=f"{arch}-M{m}", arch=arch, n_features=m, n_experts=n)


def measure(conf: dict, repeats: int, threads: int) -> dict:
    job = dict(conf=conf, batch=BATCH, loop="trainer")
    cmd = [sys.executable, str(HERE / "bench_train_step.py"), "--worker", json.dumps(job), "--sizes", "paper",
           "--device", "cpu", "--repeats", str(repeats), "--warmup", "1", "--threads", str(threads)]
    load = os.getloadavg()[0]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:  # e.g. killed for memory: a result, not a crash of the benchmark
        return dict(conf, failed=proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}")
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]), load_before=load, load_after=os.getloadavg()[0])


def predicted_peak(done: list[dict], m: int) -> float | None:
    """MiB at width m on the line through the last two measured points (None: fewer than two)."""
    if len(done) < 2:
        return None
    a, b = done[-2], done[-1]
    slope = (b["peak_mib"] - a["peak_mib"]) / (b["n_features"] - a["n_features"])
    return b["peak_mib"] + slope * (m - b["n_features"])


def width_at(done: list[dict], mib: float) -> float | None:
    """The M at which the last two points' line reaches `mib`."""
    if len(done) < 2:
        return None
    a, b = done[-2], done[-1]
    slope = (b["peak_mib"] - a["peak_mib"]) / (b["n_features"] - a["n_features"])
    return b["n_features"] + (mib - b["peak_mib"]) / slope if slope > 0 else None


def run_series(arch: str, args: argparse.Namespace) -> tuple[list[dict], str]:
    done: list[dict] = []
    for log2m in range(args.min_m_log2, args.max_m_log2 + 1):
        m = 2**log2m
        pred = predicted_peak(done, m)
        if pred is not None and pred > args.cap_gib * 1024:
            return done, f"stopped before M = 2^{log2m}: predicted peak {pred / 1024:.1f} GiB > cap {args.cap_gib} GiB"
        row = measure(series(arch, args.expert_width, m), args.repeats, args.threads)
        print(f"  {row['name']}: " + (row["failed"] if "failed" in row else
              f"{row['cpu_s']:.2f} s CPU, {row['wall_s']:.2f} s wall, peak {row['peak_mib']:.0f} MiB, "
              f"load {row['load_before']:.1f}"), flush=True)
        if "failed" in row:
            return done, f"M = 2^{log2m} failed: {row['failed']}"
        done.append(row)
        if row["cpu_s"] > args.max_step_s:
            return done, f"stopped after M = 2^{log2m}: a step took {row['cpu_s']:.0f} s CPU > {args.max_step_s} s"
    return done, f"reached M = 2^{args.max_m_log2}"


def plot(rows_by_arch: dict[str, list[dict]], cap_gib: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(10, 4))
    for arch, rows in rows_by_arch.items():
        label = "TopK" if arch == "topk" else "Switch, 2048 features per expert"
        ms = [r["n_features"] for r in rows]
        ax_t.plot(ms, [r["cpu_s"] for r in rows], "o-", label=label)
        ax_m.plot(ms, [r["peak_mib"] / 1024 for r in rows], "o-", label=label)
    ax_m.axhline(cap_gib, color="gray", ls="--", lw=1, label=f"cap {cap_gib:g} GiB")
    for ax, ylabel in ((ax_t, "CPU s per training step"), (ax_m, "peak memory (GiB)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("dictionary size M")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
    ax_t.set_yscale("log")
    fig.suptitle(f"d = {D}, batch {BATCH}, k = {K}, float32 + Adam, CPU")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--min-m-log2", type=int, default=15)
    p.add_argument("--max-m-log2", type=int, default=20)
    p.add_argument("--expert-width", type=int, default=2048)
    p.add_argument("--cap-gib", type=float, default=12.0, help="stop before a predicted peak above this")
    p.add_argument("--max-step-s", type=float, default=60.0, help="stop after a step above this (CPU s)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--archs", nargs="+", default=["switch", "topk"])
    args = p.parse_args(argv)
    header = (f"`python benchmarks/bench_width_scaling.py {' '.join(argv if argv is not None else sys.argv[1:])}` — "
              f"d={D}, batch={BATCH}, k={K}, expert width {args.expert_width}, cap {args.cap_gib:g} GiB, "
              f"max step {args.max_step_s:g} s CPU, repeats {args.repeats}, {time.strftime('%Y-%m-%d %H:%M')}, "
              f"load average at start {os.getloadavg()[0]:.1f}")
    print(header, flush=True)
    rows_by_arch, notes = {}, []
    for arch in args.archs:
        rows, why = run_series(arch, args)
        rows_by_arch[arch] = rows
        largest = max((r["n_features"] for r in rows if r["peak_mib"] <= args.cap_gib * 1024), default=None)
        m24 = width_at(rows, 24 * 1024)
        notes.append(f"- {arch}: largest M trained under the cap: {largest} ({why}); the measured per-M slope "
                     f"of the last two points reaches 24 GiB at M ≈ {m24:,.0f}" if m24 else
                     f"- {arch}: largest M trained: {largest} ({why})")
        write(header, rows_by_arch, notes, args.cap_gib)  # after each series: a killed run keeps its results


def write(header: str, rows_by_arch: dict[str, list[dict]], notes: list[str], cap_gib: float) -> None:
    lines = [header, "", "| arch | M | N | CPU s/step | wall s/step | peak mem (MiB) | load avg |", "|" + "---|" * 7]
    for rows in rows_by_arch.values():
        for r in rows:
            lines.append(f"| {r['arch']} | {r['n_features']} | {r['n_experts']} | {r['cpu_s']:.2f} | {r['wall_s']:.2f} | "
                         f"{r['peak_mib']:.0f} | {r['load_before']:.1f} |")
    text = "\n".join(lines + [""] + notes) + "\n"
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "width_scaling.md").write_text(text)
    with open(RESULTS / "width_scaling.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["arch", "n_features", "n_experts", "cpu_s", "wall_s", "peak_mib",
                                          "load_before", "load_after"], extrasaction="ignore")
        w.writeheader()
        for rows in rows_by_arch.values():
            w.writerows(rows)
    plot(rows_by_arch, cap_gib, FIGURES / "width_scaling.png")
    print(f"wrote {RESULTS / 'width_scaling.md'}, .csv and {FIGURES / 'width_scaling.png'}")


if __name__ == "__main__":
    main()
