#!/usr/bin/env bash
# One command per baseline family (issue 23 item 3, docs/baselines.md): the family's lr search on the validation split
# (scripts/lr_search.py, into data/results/lr_search/<profile>/), then, for ReLU, Gated and JumpReLU, its frontier at
# the chosen lr multiplier (grid frontier_<family>, into data/results/frontiers/<profile>/ or $SWITCH_SAE_RESULTS),
# each in two single-thread shards, one per core. After a kill, run the same command again: recorded runs are
# skipped, an unfinished one resumes from its checkpoint.
#
#   scripts/baselines.sh relu            # profile cpu
#   scripts/baselines.sh gated cpu
#   scripts/baselines.sh topk cpu        # TopK / BatchTopK: the lr search only (they have no frontier grid)
#
# Each shard's log: <cache>/logs/baselines_<profile>_<family>_<step>_shard<i>.log. The python: as scripts/site.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
FAMILY=${1:?usage: scripts/baselines.sh FAMILY [PROFILE] (FAMILY: relu, gated, jumprelu, topk, batchtopk)}
PROFILE=${2:-cpu}
if [ -z "${PYTHON:-}" ]; then
  if [ -n "${VIRTUAL_ENV:-}${CONDA_PREFIX:-}" ]; then PYTHON=python; else PYTHON=.venv/bin/python; fi
fi
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 SWITCH_SAE_THREADS=1
cli() { "$PYTHON" -m switch_sae_core.cli "$@"; }
logs="$("$PYTHON" -c "from switch_sae_core import paths; print(paths.cache_dir())")/logs"
mkdir -p "$logs"

pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true' INT TERM   # Ctrl-C / a kill of this script stops its shards too
shards() {  # shards STEP COMMAND...: COMMAND --shard I/2 for I = 0, 1 side by side
  local step=$1; shift
  pids=()
  for i in 0 1; do
    "$@" --shard "$i/2" >"$logs/baselines_${PROFILE}_${FAMILY}_${step}_shard$i.log" 2>&1 &
    pids+=($!)
  done
  local failed=0
  for i in 0 1; do
    wait "${pids[$i]}" || { failed=1; echo "$step shard $i/2 failed:" >&2; tail -5 "$logs/baselines_${PROFILE}_${FAMILY}_${step}_shard$i.log" >&2; }
  done
  [ "$failed" = 0 ] || exit 1
}

SECONDS=0
echo "== $PROFILE $FAMILY: the activation cache"
cli cache --profile "$PROFILE"
echo "== $PROFILE $FAMILY: the lr search (validation split), 2 shards (logs: $logs)"
shards lr_search "$PYTHON" scripts/lr_search.py --profile "$PROFILE" --family "$FAMILY"
"$PYTHON" scripts/lr_search.py --profile "$PROFILE" --family "$FAMILY"   # complete: trains nothing, prints the choice
case "$FAMILY" in
  relu|gated|jumprelu)
    export SWITCH_SAE_RESULTS=${SWITCH_SAE_RESULTS:-data/results/frontiers/$PROFILE}
    echo "== $PROFILE $FAMILY: the frontier at the chosen lr, 2 shards, into $SWITCH_SAE_RESULTS"
    shards frontier cli sweep --profile "$PROFILE" --grid "frontier_$FAMILY"
    cli sweep --profile "$PROFILE" --grid "frontier_$FAMILY" 2>&1 | tail -1;;
esac
echo "== $PROFILE $FAMILY: done in ${SECONDS}s"
