"""scripts/gpu_smoke.sh, the GPU run: its dry run (every stage on the CPU at tiny sizes) and the driver's promises
(a stage is stopped at its budget with what it measured kept; a killed run's file still prints its tables)."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
import time

import pytest

from switch_sae_core.paths import project_root

ROOT = project_root()


def load_driver():
    spec = importlib.util.spec_from_file_location("gpu_smoke", ROOT / "benchmarks" / "gpu_smoke.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while being built
    spec.loader.exec_module(module)
    return module


def test_a_stage_is_stopped_at_its_budget_and_keeps_its_rows(tmp_path):
    gpu = load_driver()
    out = tmp_path / "run.jsonl"
    run = gpu.Run(gpu.dry_run_plan(), out, budget_s=60, dry_run=True)
    child = ("import time\n"
             f"print({gpu.ROW_PREFIX!r} + '{{\"stage\": \"steps\", \"name\": \"topk\"}}', flush=True)\n"
             "print('progress line', flush=True)\n"
             "time.sleep(60)\n")
    t0 = time.monotonic()
    status = run.child("steps_eager", [sys.executable, "-c", child], timeout=3)
    assert time.monotonic() - t0 < 15  # 3 s, then SIGTERM (sleep dies at once)
    assert status["status"] == "stopped at the budget" and status["rows"] == 1
    assert status["output_tail"] == ["progress line"]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["stage"], r.get("name")) for r in rows] == [("steps", "topk"), ("steps_eager", None)]
    assert run.child("max_m", [sys.executable, "-c", "pass"], timeout=0.5)["status"] == "skipped: no budget left"
    failed = run.child("max_m", [sys.executable, "-c", "import sys; sys.exit(3)"], timeout=30)
    assert failed["status"] == "failed (exit status 3)"


def test_tables_of_a_killed_run(tmp_path):
    """A results file cut off mid-line (the run killed while writing) still prints the tables of what it has."""
    gpu = load_driver()
    from switch_sae_core.results import load_records

    rows = [dict(stage="run", device="NVIDIA H100 80GB HBM3", torch="2.x", bf16_peak_tflops=989.4, budget_s=420,
                 started="now", dry_run=False),
            dict(stage="steps", compiled=False, name="topk", n_features=24576, n_experts=1, ms_per_step=10.0,
                 tokens_per_s=819200.0, peak_mib=5000.0, first_step_s=1.0, encoder_ms=1.0, encoder_tflops=400.0),
            dict(stage="steps", compiled=False, name="switch-16", n_features=24576, n_experts=16, ms_per_step=1.0,
                 tokens_per_s=8192000.0, peak_mib=900.0, first_step_s=1.0, encoder_ms=0.1, encoder_tflops=200.0)]
    path = tmp_path / "run.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"stage": "max_m", "n_feat')
    table = gpu.tables(load_records(path))
    assert "NVIDIA H100 80GB HBM3" in table
    assert "| switch-16 | 24576 | 16 | False | 1.00 | 10.00x |" in table  # TopK's 10 ms / 1 ms
    assert "| 400.0 | 40% |" in table  # 400 of the H100's 989.4 TFLOP/s
    assert "- eager: Switch-16 is 10.00x faster than TopK per step (goal >= 10x): met" in table
    assert "FLOP-matched Switch-8" not in table  # not measured: no verdict
    assert "max_m" not in table and "Memory vs M" not in table


def test_bf16_peaks_name_the_card():
    gpu = load_driver()
    peak = lambda name: next((p for key, p in gpu.BF16_PEAK_TFLOPS if key in name), None)  # noqa: E731
    assert peak("NVIDIA H100 80GB HBM3") == peak("NVIDIA H200") == 989.4
    assert peak("NVIDIA H100 PCIe") == 756.0 and peak("NVIDIA H100 NVL") == 835.0 and peak("Quadro") is None


@pytest.mark.slow
def test_dry_run_runs_every_stage(tmp_path):
    """`bash scripts/gpu_smoke.sh --dry-run`: every stage on the CPU, through the same code as on a GPU (profile
    gpu_dry_run, SmolLM2 extraction included), inside its budget; the reproduce stage is cut at its budget on
    purpose (the dry plan gives it 4%) and says how to resume."""
    out, budget = tmp_path / "dry.jsonl", 400
    # the script runs `python` from PATH (the user's environment): this interpreter's, also where scripts/test.sh
    # calls .venv/bin/python without activating the venv
    env = {**os.environ, "TORCH_LOGS": "-dynamo", "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    t0 = time.monotonic()
    proc = subprocess.run(["bash", "scripts/gpu_smoke.sh", "--dry-run", "--budget", str(budget), "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, env=env)
    elapsed = time.monotonic() - t0
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert elapsed < budget + 30
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    status = {}
    for r in rows:
        if r.get("kind") == "status":
            status.setdefault(r["stage"], []).append(r["status"])
    assert status.pop("reproduce")[0] in ("stopped at the budget", "done")
    assert status == {"paths": ["done"], "sweep": ["done"], "notebook": ["done"], "steps_eager": ["done"],
                      "steps_compiled": ["done"], "max_m": ["done"]}
    data = [r for r in rows if r.get("kind") != "status"]
    paths = [r for r in data if r["stage"] == "paths"]
    assert [r["dtype"] for r in paths] == ["fp32", "bf16"] and all(r["ok"] for r in paths)
    steps = {(r["name"], r["compiled"]): r for r in data if r["stage"] == "steps"}
    assert set(steps) == {(n, c) for n in ("topk", "switch-16", "switch-8-flopmatched") for c in (False, True)}
    assert all(r["ms_per_step"] > 0 and r["encoder_tflops"] > 0 for r in steps.values())
    assert {r["name"] for r in data if r["stage"] == "max_m" and r["fits"]} == {"topk", "switch-16", "switch-128",
                                                                                 "relu", "gated"}
    assert len([r for r in data if r["stage"] == "sweep_record"]) == 5  # TopK, ReLU, Gated, Switch-4, FLOP-matched Switch-2
    (repro,) = [r for r in data if r["stage"] == "reproduce_table"]
    assert repro["resume_command"].startswith("switch-sae reproduce --profile gpu_dry_run --out ")
    assert any(line.startswith("- compiled: FLOP-matched Switch-8 takes ") for line in proc.stdout.splitlines())
    for title in ("fast path (grouped_mm) vs loop path", "Smoke sweep", "Trainer step (bf16 autocast)", "Memory vs M",
                  "Largest M that trained"):
        assert title in proc.stdout


def test_missing_prerequisites_stop_the_run_before_it_starts(monkeypatch):
    """One line naming what is missing and the fix, before any device time is spent."""
    import torch

    gpu = load_driver()
    monkeypatch.setattr(gpu, "PREREQUISITES", ("torch", "no_such_module_26"))
    with pytest.raises(SystemExit, match=r"no_such_module_26 not installed: run bash scripts/setup.sh"):
        gpu.device_header(gpu.Plan())
    monkeypatch.setattr(gpu, "PREREQUISITES", ("torch",))
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match=r"no CUDA device visible to torch.*or pass --dry-run"):
            gpu.device_header(gpu.Plan())
    assert gpu.device_header(gpu.dry_run_plan())["device"] == "cpu"
