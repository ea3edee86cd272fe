#!/usr/bin/env bash
# Run the transformer_lens adapter's tests under TransformerLens 3.x (HookedTransformer), the line
# SAELens needs (transformer-lens<4), in a second small venv that shares everything else with the
# main environment (--system-site-packages) and shadows its TL 4.x.
#
#   scripts/test_tl3.sh            # creates .venv-tl3 once, then runs the tests
#   scripts/test_tl3.sh -m "not slow"   # extra pytest arguments
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${TL3_VENV:-.venv-tl3}
PY=${PYTHON:-python}

if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv --system-site-packages "$VENV"
    "$VENV/bin/pip" install --quiet "transformer-lens==3.9.*" sae-lens
fi

# TL 3.9 must shadow the main environment's TL 4.x, and HookedTransformer must import.
"$VENV/bin/python" - <<'PY'
import importlib.metadata, warnings
version = importlib.metadata.version("transformer-lens")
assert version.startswith("3."), f"the TL3 venv resolves transformer-lens {version}, not 3.x"
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from transformer_lens import HookedTransformer  # noqa: F401  (removed in 4.0)
print(f"transformer-lens {version} (HookedTransformer available)")
PY

# SAELens's pins must resolve together with this environment (a dry run: nothing is installed).
if [ "${CHECK_SAELENS:-1}" = "1" ]; then
    log=$(mktemp)
    if "$VENV/bin/pip" install --dry-run --quiet "sae-lens" "transformer-lens==3.9.*" >"$log" 2>&1; then
        echo "sae-lens resolves with transformer-lens 3.9 in $VENV"
    else
        echo "WARNING: sae-lens does not resolve with transformer-lens 3.9 here (or the index is unreachable):"
        tail -5 "$log"
    fi
    rm -f "$log"
fi

# The adapter's tests (data/lm.py) plus everything else that goes through it; slow ones load SmolLM2.
exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/test_lm.py tests/test_store.py tests/test_evaluate.py tests/test_sae_lens.py "$@"
