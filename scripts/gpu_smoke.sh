#!/usr/bin/env bash
# The GPU run, in one command, inside a wall-clock budget (default 420 s: GPU_SMOKE_BUDGET_S or --budget):
#   1. smoke: CUDA grouped_mm vs the per-expert loop (fp32 and bf16), one short sweep (profile gpu_smoke), notebook 00;
#   2. the step table at the paper's size (d=768, M=24576, k=32, batch 8192, bf16): TopK, Switch-16/32/64/128,
#      FLOP-matched Switch-2/4/8, eager and compiled, and the encoder GEMM alone vs the card's bf16 peak;
#   3. the largest M each architecture trains at (memory vs M);
#   4. as much of `switch-sae reproduce --profile gpu` as the budget leaves (rerun to resume).
# Every number goes to ONE results file as it is measured (benchmarks/results/gpu_<device>.jsonl; a kill keeps it);
# the tables are printed at the end. `--dry-run` runs every stage on the CPU at tiny sizes (profile gpu_dry_run):
# CI runs it (tests/test_gpu_smoke.py). Details: benchmarks/gpu_smoke.py, docs/gpu.md.
#   bash scripts/gpu_smoke.sh [--dry-run] [--budget SECONDS] [--stages smoke steps max_m reproduce] [--out FILE]
set -euo pipefail
cd "$(dirname "$0")/.."
exec python benchmarks/gpu_smoke.py "$@"
