#!/usr/bin/env bash
# Run the transformer_lens adapter's and the SAELens interop's tests under TransformerLens 3.9
# (HookedTransformer), the line SAELens needs (transformer-lens<4), in a second venv built from the project's own files alone: the same setup as
# the main environment (scripts/setup.sh: the torch pin first, the project with its extras, the offline
# packages, every later install constrained to that torch), then transformer-lens 3.9 in the same pinned step.
# Nothing is inherited from another interpreter (no --system-site-packages).
#
#   scripts/test_tl3.sh                 # builds .venv-tl3 once (rebuilt when pyproject.toml or the scripts change)
#   scripts/test_tl3.sh -m "not slow"   # extra pytest arguments
#   TL3_VENV=../tl3-venv TORCH_SPEC=torch scripts/test_tl3.sh   # another folder; the CUDA torch on a GPU machine
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${TL3_VENV:-.venv-tl3}
BASE_PY=${PYTHON:-python3}
stamp="$VENV/.switch-sae-setup"
want=$(cat pyproject.toml scripts/setup.sh scripts/test_tl3.sh | sha256sum | cut -d' ' -f1)

if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "== building $VENV (the project's setup + transformer-lens 3.9 + sae-lens)"
    rm -rf "$VENV"
    "$BASE_PY" -m venv "$VENV"
    # ---- SAELens: the `sae-lens` extra (pyproject.toml) is installed HERE, in the same pinned step as
    # ---- transformer-lens 3.9; its tests are on the pytest line at the end of this script.
    PYTHON="$VENV/bin/python" bash scripts/setup.sh "transformer-lens==3.9.*" -e ".[sae-lens]"
    echo "$want" >"$stamp"   # written last: an interrupted build is redone
fi

# TL 3.9 is the one installed, HookedTransformer imports, and torch is still the pinned build.
"$VENV/bin/python" - <<'PY'
import importlib.metadata, warnings
version = importlib.metadata.version("transformer-lens")
assert version.startswith("3."), f"the TL3 venv resolves transformer-lens {version}, not 3.x"
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from transformer_lens import HookedTransformer  # noqa: F401  (removed in 4.0)
import torch
print(f"transformer-lens {version} (HookedTransformer available), torch {torch.__version__}")
PY

# The adapter's tests (data/lm.py) plus everything else that goes through it; slow ones load SmolLM2. SAELens's
# synthetic benchmark (tests/test_synthsaebench.py) and notebook 08, which trains its toy grid here, need sae-lens.
SWITCH_SAE_PROFILE=ci exec "$VENV/bin/python" -m pytest -q -rs -p no:cacheprovider tests/test_lm.py tests/test_store.py \
    tests/test_evaluate.py tests/test_sae_lens.py tests/test_synthsaebench.py --nbmake notebooks/08_synthsaebench.ipynb "$@"
