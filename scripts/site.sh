#!/usr/bin/env bash
# One command per data site of issue 23 (docs/sites.md): build the profile's activation cache, then train and
# record its grids (profiles.site_profile: TopK vs FLOP-matched Switch-2/4 at k = 32, 3 seeds, and the convergence
# check at 3 seeds) in two single-thread shards, one per core, into data/results/<profile>/records.jsonl
# (or $SWITCH_SAE_RESULTS). After a kill, run the same command again: the cache build resumes from its last
# progress point, the sweep skips recorded SAEs and resumes an unfinished one from its checkpoint.
#
#   scripts/site.sh cpu_l10      # SmolLM2-135M-Instruct layer 10
#   scripts/site.sh cpu_gemma    # Gemma-3-270M layer 9
#
# Each shard's log: <cache>/logs/site_<profile>_shard<i>.log ($SWITCH_SAE_CACHE, or .cache/switch-sae).
# The python of the environment scripts/setup.sh installed into: $PYTHON, else the active venv's, else .venv's.
set -euo pipefail
cd "$(dirname "$0")/.."
PROFILE=${1:?usage: scripts/site.sh PROFILE (e.g. cpu_l10, cpu_gemma)}
if [ -z "${PYTHON:-}" ]; then
  if [ -n "${VIRTUAL_ENV:-}${CONDA_PREFIX:-}" ]; then PYTHON=python; else PYTHON=.venv/bin/python; fi
fi
# one torch thread per process: two shards share the 2 cores (a second thread each makes both many times slower)
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 SWITCH_SAE_THREADS=1
cli() { "$PYTHON" -m switch_sae_core.cli "$@"; }
grids=$("$PYTHON" -c "import sys
from switch_sae_core.config import ConfigError
from switch_sae_core.profiles import get_profile
try:
    print(*get_profile(sys.argv[1]).reproduce_grids)
except ConfigError as e:
    sys.exit(f'scripts/site.sh: {e}')" "$PROFILE")
logs="$("$PYTHON" -c "from switch_sae_core import paths; print(paths.cache_dir())")/logs"
mkdir -p "$logs"

SECONDS=0
echo "== $PROFILE: the activation cache"
# one thread by default; SITE_CACHE_THREADS=2 lets the extraction (alone at that point) use both cores when they are
# free (not measured here: the machine was busy when this was written)
SWITCH_SAE_THREADS=${SITE_CACHE_THREADS:-1} cli cache --profile "$PROFILE"
echo "== $PROFILE: cache ready after ${SECONDS}s; sweeping $grids in 2 shards (logs: $logs/site_${PROFILE}_shard*.log)"
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true' INT TERM   # Ctrl-C / a kill of this script stops its shards too
for i in 0 1; do
  cli sweep --profile "$PROFILE" --grid $grids --shard "$i/2" >"$logs/site_${PROFILE}_shard$i.log" 2>&1 &
  pids+=($!)
done
failed=0
for i in 0 1; do
  wait "${pids[$i]}" || { failed=1; echo "shard $i/2 failed: see $logs/site_${PROFILE}_shard$i.log" >&2; tail -5 "$logs/site_${PROFILE}_shard$i.log" >&2; }
done
[ "$failed" = 0 ] || exit 1
echo "== $PROFILE: done in ${SECONDS}s"
cli sweep --profile "$PROFILE" --grid $grids 2>&1 | tail -1   # every SAE recorded: trains nothing, says where
