"""Where one Switch trainer step's time goes: each stage's CPU time (wall-clock beside it), one thread.

At d = 768, M = 24576, k = 32, batch 4096, fp32, CPU, ONE torch thread, the library's own
`train.train_step` runs unchanged; the benchmark wraps the functions it calls with timers (in this process
only) and hooks every autograd node of the step's graph, so each stage is measured inside the real step:

- forward: input check, router (`route` + load-balancing loss), dispatch (sort by expert), encoder GEMM
  (`ops.grouped_matmul`), top-k selection (`ops.topk_rows`), sparse decode (`_SparseExperts` forward),
  the rest (x - b_pre, the gather of x by expert, gate, `index_add` combine, reorder to input order), loss;
- backward: the experts' backward split into its pieces (dacts: the k dot products per row; dx; the
  feature-major index; dW_enc + dW_dec; the rest of that node), then every other autograd node by name;
- optimizer (`optim.fused_step`): the norm pre-pass (projection + clipping norm), the blocked pass's Adam
  kernel, its decoder renormalisation, and the rest of that pass (clipping scale, Python per block); with the
  C++ kernels (`switch_sae_core/kernels`, the default on one CPU thread): their pre-pass and their one call per
  parameter (clipping scale, Adam, decoder renormalisation);
- how many weight-gradient rows (features) the step touched: those chosen by at least one input.

A timed stage's time excludes the timed stages inside it (self time), so the stages add up to the step.
The step's total is also timed without any wrapper or hook ("step, unwrapped") to show the timers' cost.
Mean over `--repeats` steps after one warm-up step (means, unlike medians, add up). `--baseline DIR` times
another source tree's library too (e.g. the commit before a change), its worker processes alternating with
this tree's `--rounds` times, so both see the same machine load.

    python benchmarks/bench_step_breakdown.py --repeats 5 [--configs switch-16 fm-8]
    git archive 8b592df switch_sae_core | tar -x -C DIR
    python benchmarks/bench_step_breakdown.py --repeats 5 --rounds 3 --baseline DIR --baseline-label 8b592df

Writes benchmarks/results/step_breakdown_paper_cpu.{md,json}.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

D, M, K, B = (int(v) for v in os.environ.get("BENCH_FLOOR_DMKB", "768,24576,32,4096").split(","))  # smoke: 64,1024,8,256
RESULTS = Path(__file__).resolve().parent / "results"
CONFIGS = {"switch-16": dict(n_features=M, n_experts=16), **{f"fm-{n}": dict(n_features=M * n, n_experts=n) for n in (2, 4, 8)}}


class Clock:
    """Self CPU and wall seconds per (phase, stage): nested timed calls are subtracted from their caller."""

    def __init__(self):
        self.acc = defaultdict(lambda: [0.0, 0.0])
        self.stack: list[list[float]] = []  # per open timed call: [child cpu, child wall]

    def start(self):
        self.stack.append([0.0, 0.0])
        return time.process_time(), time.perf_counter()

    def stop(self, key, t0):
        cpu, wall = time.process_time() - t0[0], time.perf_counter() - t0[1]
        child = self.stack.pop()
        self.acc[key][0] += cpu - child[0]
        self.acc[key][1] += wall - child[1]
        if self.stack:
            self.stack[-1][0] += cpu
            self.stack[-1][1] += wall

    def wrap(self, owner, name: str, phase: str, stage: str):
        """Replace owner.name by a timed version (this process only)."""
        fn = getattr(owner, name)

        @functools.wraps(fn)
        def timed(*args, **kwargs):
            t0 = self.start()
            try:
                return fn(*args, **kwargs)
            finally:
                self.stop((phase, stage), t0)

        setattr(owner, name, timed)

    def hook_graph(self, root) -> None:
        """Time every autograd node reachable from `root` (pre-hook starts, post-hook stops)."""
        seen, todo = set(), [root]
        while todo:
            node = todo.pop()
            if node is None or node in seen:
                continue
            seen.add(node)
            opened = []
            node.register_prehook(lambda g, opened=opened: opened.append(self.start()) and None)
            key = ("backward", "experts: rest of the node (dpre, mask)" if node.name() == "_SparseExpertsBackward"
                   else f"node {node.name()}")
            node.register_hook(lambda gi, go, opened=opened, key=key: self.stop(key, opened.pop()) and None)
            todo.extend(n for n, _ in node.next_functions)


def instrument(sae, clock: Clock) -> None:
    import torch

    from switch_sae_core import ops, optim, train
    from switch_sae_core.saes import base, switch
    try:
        from switch_sae_core import kernels
    except ImportError:  # a tree before the C++ kernels
        kernels = None

    # the backward's pieces: the same functions as some forward ones, labelled while the backward runs
    pieces = {"_row_dots": "experts: dacts (k dot products per row)", "_weighted_row_sum": "experts: dx",
              "_feature_major_index": "experts: feature-major index",
              "_feature_major_matmul": "experts: dW_enc + dW_dec"}
    originals = {name: getattr(ops, name) for name in pieces}
    for owner, name, phase, stage in [
            (sae, "forward", "forward", "rest: x - b_pre, gather by expert, gate, index_add combine, reorder"),
            (sae, "check_input", "forward", "input check (shape, dtype, finite)"),
            (sae, "route", "forward", "router (logits, softmax, top-1)"),
            (switch, "load_balancing_loss", "forward", "router: load-balancing loss"),
            (switch, "dispatch", "forward", "dispatch (sort by expert)"),
            (switch, "grouped_matmul", "forward", "encoder GEMM (grouped)"),
            (switch, "topk_rows", "forward", "top-k selection"),
            (switch, "experts_forward", "forward", "experts: rest (ids, group ids)"),
            (ops, "_weighted_row_sum", "forward", "sparse decode (embedding_bag)"),
            (sae, "losses", "forward", "loss"),
            (train, "fused_step", "optimizer", "rest of the fused pass (clip scale, per-block Python)"),
            (sae, "upkeep_gradients", "optimizer", "pre-pass: decoder-gradient projection + clipping norm"),
            (torch, "_fused_adam_", "optimizer", "Adam kernel (torch._fused_adam_)"),
            (optim, "_unit_rows_", "optimizer", "decoder renormalisation"),
            (base, "_unit_rows_", "optimizer", "decoder renormalisation"),
            (kernels, "project_rows_", "optimizer", "pre-pass: decoder-gradient projection + clipping norm"),
            (kernels, "sumsq", "optimizer", "pre-pass: decoder-gradient projection + clipping norm"),
            (kernels, "adam_", "optimizer", "C++ kernel: clip scale + Adam + decoder renormalisation")]:
        if owner is not None and hasattr(owner, name):  # a --baseline tree may predate a function (e.g. kernels/)
            clock.wrap(owner, name, phase, stage)
    backward = torch.autograd.backward

    def timed_backward(tensors, *args, **kwargs):
        saved = {name: getattr(ops, name) for name in pieces}
        for name, stage in pieces.items():
            setattr(ops, name, originals[name])
            clock.wrap(ops, name, "backward", stage)
        clock.hook_graph(tensors.grad_fn)
        t0 = clock.start()
        try:
            return backward(tensors, *args, **kwargs)
        finally:
            clock.stop(("backward", "rest (engine)"), t0)
            for name, fn in saved.items():
                setattr(ops, name, fn)

    torch.autograd.backward = timed_backward


def work(name: str, repeats: int) -> dict:
    import torch

    from switch_sae_core import runtime, train
    from switch_sae_core.config import SAEConfig, TrainConfig
    from switch_sae_core.saes import build_sae

    runtime.tune_allocator()  # what the trainer does
    torch.set_num_threads(1)
    torch.manual_seed(0)
    sae = build_sae(SAEConfig(d_in=D, k=K, arch="switch", **CONFIGS[name]))
    opt = train.make_optimizer(sae, TrainConfig())
    x = torch.randn(B, D)

    def step_times(n: int) -> tuple[list[float], list[float]]:
        cpu, wall = [], []
        for _ in range(n):
            w0, c0 = time.perf_counter(), time.process_time()
            train.train_step(sae, opt, x)
            cpu.append(time.process_time() - c0)
            wall.append(time.perf_counter() - w0)
        return cpu, wall

    ids = train.train_step(sae, opt, x).out.latent_indices  # warm-up; the rows this step's gradients touch
    touched = int(torch.unique(ids).numel())
    plain_cpu, plain_wall = step_times(repeats)
    clock = Clock()
    instrument(sae, clock)
    step_times(1)  # warm-up of the wrapped step
    clock.acc.clear()
    cpu, wall = step_times(repeats)
    stages = [dict(phase=phase, stage=stage, cpu_s=c / repeats, wall_s=w / repeats)
              for (phase, stage), (c, w) in clock.acc.items()]
    covered = sum(s["cpu_s"] for s in stages)
    stages.append(dict(phase="step", stage="rest (zero_grad, loss sum, detach)",
                       cpu_s=statistics.fmean(cpu) - covered,
                       wall_s=statistics.fmean(wall) - sum(s["wall_s"] for s in stages)))
    return dict(name=name, repeats=repeats, n_params=sae.n_params, n_latents=sae.n_latents, rows_touched=touched, step_cpu_s=statistics.fmean(cpu), step_wall_s=statistics.fmean(wall),
                plain_cpu_s=statistics.fmean(plain_cpu), plain_wall_s=statistics.fmean(plain_wall), stages=stages)


PHASES = ("forward", "backward", "optimizer", "step")


def markdown(res: dict) -> str:
    """Per config: a line per tree (step totals, load, rows touched), then one table with every tree's
    stages side by side (ordered by the last tree's CPU time)."""
    lines = [res["header"], ""]
    for name in dict.fromkeys(r["name"] for r in res["runs"]):
        runs = [r for r in res["runs"] if r["name"] == name]
        for r in runs:
            lines.append(f"- **{name}, {r['tree']}** ({r['n_params'] / 1e6:.1f}M parameters; mean of {r['workers']} "
                         f"process(es) x {r['repeats']} steps): step {r['step_cpu_s'] * 1e3:.0f} ms CPU, "
                         f"{r['step_wall_s'] * 1e3:.0f} ms wall with the timers; {r['plain_cpu_s'] * 1e3:.0f} ms CPU, "
                         f"{r['plain_wall_s'] * 1e3:.0f} ms wall unwrapped; load average {r['load']}; weight-gradient rows "
                         f"the step touches: {r['rows_touched']} of {r['n_latents']} "
                         f"({100 * r['rows_touched'] / r['n_latents']:.1f}%)")
        cols = [f"{r['tree']}: CPU ms | {r['tree']}: wall ms" for r in runs]
        lines += ["", f"| phase | stage | {' | '.join(cols)} | % of step CPU ({runs[-1]['tree']}) |",
                  "|" + "---|" * (3 + 2 * len(runs))]
        by_tree = [{(s["phase"], s["stage"]): s for s in r["stages"]} for r in runs]

        def cells(rows_of_each_tree, bold=False):
            out = []
            for r, rows in zip(runs, rows_of_each_tree):
                c, w = sum(s["cpu_s"] for s in rows), sum(s["wall_s"] for s in rows)
                out += [f"{c * 1e3:.1f}", f"{w * 1e3:.1f}"] if rows else ["—", "—"]
            last = sum(s["cpu_s"] for s in rows_of_each_tree[-1]) / runs[-1]["step_cpu_s"]
            out.append(f"{100 * last:.1f}")
            return " | ".join(f"**{c}**" if bold else c for c in out)

        for phase in PHASES:
            keys = [k for k in dict.fromkeys(k for t in by_tree for k in t) if k[0] == phase]
            keys.sort(key=lambda k: -by_tree[-1].get(k, {"cpu_s": 0.0})["cpu_s"])
            small = [k for k in keys if k[1].startswith("node ") and all(t.get(k, {"cpu_s": 0.0})["cpu_s"] < 1e-3
                                                                          for t in by_tree)]
            for k in keys:
                if k not in small:
                    lines.append(f"| {phase} | {k[1]} | {cells([[t[k]] if k in t else [] for t in by_tree])} |")
            if small:
                lines.append(f"| {phase} | {len(small)} other nodes (< 1 ms each) | "
                             f"{cells([[t[k] for k in small if k in t] for t in by_tree])} |")
            if phase != "step":
                lines.append(f"| **{phase}** | **total** | "
                             f"{cells([[t[k] for k in keys if k in t] for t in by_tree], bold=True)} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5, help="timed steps after one warm-up step")
    p.add_argument("--configs", nargs="+", default=["switch-16"], choices=sorted(CONFIGS))
    p.add_argument("--out", type=Path, default=RESULTS / "step_breakdown_paper_cpu")
    p.add_argument("--baseline", type=Path, help="also time the library of this source tree (e.g. an older commit "
                   "exported with `git archive COMMIT switch_sae_core | tar -x -C DIR`; it must have the functions "
                   "wrapped here), alternating with this one")
    p.add_argument("--baseline-label", default="baseline", help="what --baseline is, for the tables (e.g. the commit)")
    p.add_argument("--rounds", type=int, default=1, help="worker processes per tree and config, alternating trees; "
                   "stage times are averaged over them")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(work(args.worker, args.repeats)))
        return {}
    import subprocess

    import torch

    shown = list(argv if argv is not None else sys.argv[1:])
    if args.baseline:  # no path of this machine in the results
        shown = ["DIR" if a == str(args.baseline) else a for a in shown]
    header = (f"`python benchmarks/bench_step_breakdown.py {' '.join(shown)}` — "
              f"d={D}, M={M}, k={K}, batch {B}, fp32, CPU, one thread, trainer step, torch {torch.__version__}, "
              f"cpus={os.cpu_count()}, {time.strftime('%Y-%m-%d %H:%M')}, load average at start {os.getloadavg()[0]:.1f}")
    print(header, flush=True)
    trees = ([(args.baseline_label, str(args.baseline.resolve()))] if args.baseline else []) + [(this_tree(), None)]
    samples = defaultdict(list)  # (config, tree label) -> worker results
    for _ in range(args.rounds):
        for name in args.configs:  # each in its own process: the wrappers stay there
            for label, path in trees:
                load0 = os.getloadavg()[0]
                env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
                if path:
                    env["PYTHONPATH"] = path
                proc = subprocess.run([sys.executable, __file__, "--worker", name, "--repeats", str(args.repeats)],
                                      capture_output=True, text=True, env=env)
                if proc.returncode != 0:
                    sys.exit(f"{name} ({label}): {proc.stderr.strip()}")
                samples[name, label].append(dict(json.loads(proc.stdout.strip().splitlines()[-1]),
                                                 load=(load0, os.getloadavg()[0])))
    runs = [merge(samples[name, label], label) for name in args.configs for label, _ in trees]
    header += f"; load average at end {os.getloadavg()[0]:.1f}"
    res = dict(header=header, runs=runs)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(res, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(markdown(res))
    print(markdown(res))
    return res


def this_tree() -> str:
    """'HEAD abc1234' (+ ' with uncommitted changes' when the library differs from it), or 'this tree'."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "switch_sae_core"], capture_output=True,
                               text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "this tree"
    return f"HEAD {head}" + (" with uncommitted changes" if dirty else "")


def merge(results: list[dict], label: str) -> dict:
    """One run from the workers of one (config, tree): every time averaged over them."""
    stages = defaultdict(lambda: [0.0, 0.0])
    for r in results:
        for st in r["stages"]:
            stages[st["phase"], st["stage"]][0] += st["cpu_s"] / len(results)
            stages[st["phase"], st["stage"]][1] += st["wall_s"] / len(results)
    mean = {k: statistics.fmean(r[k] for r in results) for k in ("step_cpu_s", "step_wall_s", "plain_cpu_s", "plain_wall_s")}
    loads = ", ".join(f"{a:.1f} → {b:.1f}" for a, b in (r["load"] for r in results))
    return dict(results[0], **mean, tree=label, workers=len(results), load=loads,
                stages=[dict(phase=ph, stage=st, cpu_s=c, wall_s=w) for (ph, st), (c, w) in stages.items()])


if __name__ == "__main__":
    main()
