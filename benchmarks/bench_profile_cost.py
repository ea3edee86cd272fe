"""What a profile's sweeps will cost on this machine, from a few timed steps of each of its SAEs.

Every distinct SAE of the profile's `reproduce_grids` (seeds share one timing) trains `--steps` steps on the
profile's cached activations, after `--warmup` untimed ones, in `--processes` worker processes of one torch
thread each: the setting of `switch-sae sweep --shard I/N` on N cores. One held-out evaluation (the curve
point taken every `Profile.eval_every` steps) is timed as well. The estimate of each job is

    (steps - continued_from) x seconds per step + curve points x seconds per evaluation

where a run that continues a shorter run of its lineage (cache.py: from the shorter run's decay start) counts
only its own steps. The CE-loss evaluation of each record (LM forward passes) is not included.

    switch-sae cache --profile cpu                                  # the activations first
    python benchmarks/bench_profile_cost.py --profile cpu           # 2 workers, 100 timed steps each SAE

Writes benchmarks/results/profile_cost_<profile>.{md,csv} (override with --out).
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

RESULTS = Path(__file__).resolve().parent / "results"


def plan(profile_name: str):
    """(profile, ctx, jobs, lineages, distinct SAE configs as JSON strings in first-appearance order)."""
    from switch_sae_core.profiles import get_profile
    from switch_sae_core.sweep import build_context, lineages, sweep_jobs

    profile = get_profile(profile_name)
    ctx = build_context(profile, with_lm=False)
    jobs = sweep_jobs(profile, profile.reproduce_grids, ctx)
    distinct = list(dict.fromkeys(json.dumps(c.to_dict(), sort_keys=True) for c, _ in jobs))
    return profile, ctx, jobs, lineages(jobs, ctx.data_cfg), distinct


def worker(profile_name: str, index: int, n: int, steps: int, warmup: int) -> None:
    """Time every n-th distinct SAE; one JSON line per SAE on stdout."""
    import torch

    from switch_sae_core.config import SAEConfig
    from switch_sae_core.heldout import reconstruction_metrics
    from switch_sae_core.train import train_sae

    torch.set_num_threads(1)
    profile, ctx, _, _, distinct = plan(profile_name)
    for cfg_json in distinct[index::n]:
        cfg = SAEConfig.from_dict(json.loads(cfg_json))
        times = {}
        train_sae(cfg, ctx.source, profile.train.replace(steps=warmup, progress=False))  # first-call costs, untimed
        for n_steps in (warmup, warmup + steps):
            c0, w0 = time.process_time(), time.perf_counter()
            result = train_sae(cfg, ctx.source, profile.train.replace(steps=n_steps, progress=False))
            times[n_steps] = (time.perf_counter() - w0, time.process_time() - c0)
        w0 = time.perf_counter()
        reconstruction_metrics(result.sae, ctx.heldout_BD)
        eval_s = time.perf_counter() - w0
        wall = (times[warmup + steps][0] - times[warmup][0]) / steps
        cpu = (times[warmup + steps][1] - times[warmup][1]) / steps
        print(json.dumps({"sae": cfg_json, "wall_s_per_step": wall, "cpu_s_per_step": cpu, "eval_s": eval_s}),
              flush=True)


def estimate(profile, jobs, groups, timing: dict[str, dict]) -> list[dict]:
    """One row per job: its steps to train here, and its estimated seconds."""
    from switch_sae_core.config import decay_start
    from switch_sae_core.keys import config_hash
    from switch_sae_core.results import sae_name

    rows = []
    for group in groups:
        shorter = None
        for cfg, train_cfg in group:
            t = timing[json.dumps(cfg.to_dict(), sort_keys=True)]
            start = decay_start(shorter.steps, shorter.lr_decay_frac) if shorter else 0
            own = train_cfg.steps - start
            points = len(range(start + profile.eval_every, train_cfg.steps + 1, profile.eval_every))
            rows.append({"job": sae_name(cfg),
                         "seed": train_cfg.seed, "steps": train_cfg.steps, "steps_here": own,
                         "s_per_step": t["wall_s_per_step"], "cpu_s_per_step": t["cpu_s_per_step"],
                         "estimate_s": own * t["wall_s_per_step"] + points * t["eval_s"],
                         "key": config_hash(cfg, train_cfg, profile.data)})
            shorter = train_cfg
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="cpu")
    parser.add_argument("--processes", type=int, default=2, help="workers at once (the sweep's shards)")
    parser.add_argument("--steps", type=int, default=100, help="timed steps per SAE")
    parser.add_argument("--warmup", type=int, default=20, help="untimed steps first (init, allocations)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.worker:
        i, n = map(int, args.worker.split("/"))
        return worker(args.profile, i, n, args.steps, args.warmup)

    load_before = os.getloadavg()[0]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, __file__, "--profile", args.profile, "--steps", str(args.steps),
                               "--warmup", str(args.warmup), "--worker", f"{i}/{args.processes}"],
                              stdout=subprocess.PIPE, text=True, env=env) for i in range(args.processes)]
    timing = {}
    for p in procs:
        out, _ = p.communicate()
        if p.returncode:
            sys.exit(f"a worker failed (exit {p.returncode}); run it alone to see why: --worker 0/1")
        timing.update({row["sae"]: row for row in map(json.loads, out.splitlines())})
    profile, _, jobs, groups, _ = plan(args.profile)
    rows = estimate(profile, jobs, groups, timing)
    total = sum(r["estimate_s"] for r in rows)
    header = (f"`python benchmarks/bench_profile_cost.py --profile {args.profile} --processes {args.processes} "
              f"--steps {args.steps}`, {time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} CPUs, load average "
              f"{load_before:.1f} before, {os.getloadavg()[0]:.1f} after. {len(rows)} SAEs: "
              f"{total / 60:.0f} min of training and curve evaluation, {total / 60 / args.processes:.0f} min on "
              f"{args.processes} processes if they share it evenly (no CE evaluation, no activation cache).")
    out = Path(args.out) if args.out else RESULTS / f"profile_cost_{args.profile}"
    out.parent.mkdir(parents=True, exist_ok=True)
    fields = ["job", "seed", "steps", "steps_here", "s_per_step", "cpu_s_per_step", "estimate_s", "key"]
    with open(out.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    lines = [header, "", "| " + " | ".join(fields[:-1]) + " |", "|" + "---|" * (len(fields) - 1)]
    lines += ["| " + " | ".join(f"{r[k]:.3f}" if isinstance(r[k], float) else str(r[k]) for k in fields[:-1]) + " |"
              for r in rows]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
