"""The first-letter dataset of the feature-absorption metric, built from the model's own vocabulary.

Source: SAEBench's `absorption` eval (Karvonen et al. 2025, arXiv 2503.09532; code
`sae_bench/evals/absorption/{vocab,prompting,probing}.py`), after Chanin et al. 2024 ("A is for
Absorption", arXiv 2409.14507). What it does, as SAEBench does it:

- words: every vocabulary token that is ASCII letters only, after at most one leading space
  (`get_alpha_tokens`); the label is its first letter, case-folded (26 classes);
- split: the words are shuffled and split 80/20 into train and test words (`create_dataset_probe_training`);
- prompt: in-context examples drawn from the word's own split, then the word,
  "\\n{ex} has the first letter: {EX[0]}" x n_icl + "\\n{word} has the first letter:" (the template
  `VERBOSE_FIRST_LETTER_TEMPLATE`, answers " X" in capitals, separator "\\n" also before the first
  example, BOS prepended as HookedTransformer does);
- position: the word's last token, i.e. the token just before the template's suffix (SAEBench's
  `prompt_token_pos = -6` for the 5 suffix tokens " has| the| first| letter|:"; here the suffix's length
  is read from the tokenizer and every prompt is checked to end with it).

Adaptations for this project (also in the dataset's `meta`): a random subset of `n_words` words instead
of the whole vocabulary (the CPU cost is one forward pass per word); activations of several layers
collected in the same pass (the probe check of issue 22); prompts of different token lengths are batched
by length instead of padded.
"""
from __future__ import annotations

import dataclasses
import json
import random
import shutil
import string
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .. import durable, paths
from ..keys import stable_hash

LETTERS = string.ascii_lowercase
TEMPLATE = "{word} has the first letter:"  # SAEBench's VERBOSE_FIRST_LETTER_TEMPLATE
SEPARATOR = "\n"  # SAEBench's example_separator (also prepended to the first example)
N_ICL = 10  # SAEBench's max_icl_examples
TRAIN_FRACTION = 0.8  # SAEBench's train_test_fraction
_ALPHA = frozenset(string.ascii_letters)


def is_alpha_word(token_text: str) -> bool:
    """SAEBench's `get_alpha_tokens` filter: ASCII letters only, after at most one leading space."""
    word = token_text[1:] if token_text.startswith(" ") else token_text
    return len(word) > 0 and all(c in _ALPHA for c in word)


def alpha_vocab(tokenizer) -> list[str]:
    """Sorted, distinct texts of the non-special vocabulary tokens that pass `is_alpha_word`
    (e.g. ' cat', 'cat', ' CAT': distinct tokens, all kept, as in SAEBench)."""
    texts = {tokenizer.decode([i]) for i in range(tokenizer.vocab_size) if i not in tokenizer.special_ids}
    return sorted(t for t in texts if is_alpha_word(t))


def first_letter(word: str) -> int:
    """Class 0..25 of the word's first letter, case-folded."""
    return LETTERS.index(word.strip()[0].lower())


def icl_prompt(word: str, examples: list[str]) -> str:
    """The prompt for `word` after its in-context examples (SAEBench `create_icl_prompt` with
    `prepend_separator_to_first_example=True` and the `first_letter_formatter` answers)."""
    shots = [TEMPLATE.format(word=ex) + " " + ex.strip()[0].upper() for ex in examples]
    return SEPARATOR + SEPARATOR.join(shots + [TEMPLATE.format(word=word)])


@dataclasses.dataclass
class FirstLetterData:
    """Words, their first letters, the train/test split and the residual stream at each word's last token.

    words: N strings; letters_N: (N,) int64 in 0..25; train_N: (N,) bool; acts: {hook: (N, D) float32};
    meta: how it was built (model, hooks, n_icl, seed, template, counts)."""

    words: list[str]
    letters_N: Tensor
    train_N: Tensor
    acts: dict[str, Tensor]
    meta: dict

    def split(self, hook: str, train: bool) -> tuple[Tensor, Tensor, list[str]]:
        """(acts (n, D), letters (n,), words) of the train or the test words at `hook`."""
        mask = self.train_N if train else ~self.train_N
        idx = mask.nonzero().squeeze(1)
        return self.acts[hook][idx], self.letters_N[idx], [self.words[i] for i in idx.tolist()]


def make_prompts(words: list[str], seed: int, n_icl: int = N_ICL,
                 train_fraction: float = TRAIN_FRACTION) -> tuple[list[str], list[bool], list[str]]:
    """Shuffle `words`, split them train/test, and give each its prompt with `n_icl` examples drawn from
    its own split (never the word itself). -> (words in shuffled order, is_train, prompts)."""
    rng = random.Random(seed)
    shuffled = rng.sample(words, len(words))
    cut = int(len(shuffled) * train_fraction)
    out_words, out_train, prompts = [], [], []
    for part, is_train in ((shuffled[:cut], True), (shuffled[cut:], False)):
        if len(part) <= n_icl:
            raise ValueError(f"{len(part)} words in a split cannot give {n_icl} in-context examples: use more words")
        for word in part:
            examples = rng.sample(part, n_icl + 1)
            examples = [e for e in examples if e != word][:n_icl]
            out_words.append(word)
            out_train.append(is_train)
            prompts.append(icl_prompt(word, examples))
    return out_words, out_train, prompts


def word_positions(tokenizer, prompts: list[str], prepend_bos: bool) -> tuple[list[list[int]], list[Optional[int]]]:
    """Token ids of each prompt and the position of its word's last token (the token before the
    template's suffix); None where the prompt does not end with the suffix's own tokens (a merge across
    the boundary), so that the position would not be the word's."""
    suffix = tokenizer.encode(TEMPLATE.format(word=""))  # " has the first letter:"
    ids_list, positions = [], []
    bos = [tokenizer.bos_token_id] if prepend_bos else []
    for prompt in prompts:
        ids = bos + tokenizer.encode(prompt)
        ok = ids[-len(suffix):] == suffix
        ids_list.append(ids)
        positions.append(len(ids) - len(suffix) - 1 if ok else None)
    return ids_list, positions


@torch.no_grad()
def build_first_letter_data(lm, hooks: list[str], n_words: int, seed: int = 0, n_icl: int = N_ICL,
                            batch_size: int = 16, progress: bool = True) -> FirstLetterData:
    """Sample `n_words` alphabetic vocabulary words of `lm` (a `data.lm.LanguageModel`), prompt each, and
    read the residual stream at its last token at every hook in one forward pass per batch.

    Prompts of equal token length are batched together (no padding). Words whose prompt's tokenization
    merges across the suffix boundary are dropped (counted in meta['n_dropped'])."""
    vocab = alpha_vocab(lm.tokenizer)
    if n_words > len(vocab):
        raise ValueError(f"n_words={n_words} but {lm.name} has only {len(vocab)} alphabetic tokens")
    chosen = random.Random(seed).sample(vocab, n_words)
    words, is_train, prompts = make_prompts(chosen, seed, n_icl)
    ids_list, positions = word_positions(lm.tokenizer, prompts, lm.prepend_bos)
    keep = [i for i, p in enumerate(positions) if p is not None]
    by_len: dict[int, list[int]] = {}
    for i in keep:
        by_len.setdefault(len(ids_list[i]), []).append(i)
    acts = {h: torch.empty(len(words), lm.d_model) for h in hooks}
    bar = tqdm(total=len(keep), desc="first-letter prompts", disable=not progress)
    for _, rows in sorted(by_len.items()):
        for start in range(0, len(rows), batch_size):
            batch = rows[start:start + batch_size]
            tokens_BS = torch.tensor([ids_list[i] for i in batch])
            pos_B = torch.tensor([positions[i] for i in batch])
            out = lm.activations_at(tokens_BS, hooks)
            for h in hooks:
                acts[h][batch] = out[h][torch.arange(len(batch)), pos_B].cpu()
            bar.update(len(batch))
    bar.close()
    keep_t = torch.tensor(keep)
    meta = dict(model=lm.name, hooks=list(hooks), n_words=n_words, seed=seed, n_icl=n_icl, template=TEMPLATE,
                train_fraction=TRAIN_FRACTION, prepend_bos=lm.prepend_bos, n_vocab_alpha=len(vocab),
                n_dropped=len(words) - len(keep), source="SAEBench absorption (arXiv 2503.09532), adapted")
    return FirstLetterData(
        words=[words[i] for i in keep],
        letters_N=torch.tensor([first_letter(words[i]) for i in keep]),
        train_N=torch.tensor([is_train[i] for i in keep]),
        acts={h: a[keep_t].contiguous() for h, a in acts.items()},
        meta=meta,
    )


# --- the cache: built once per (model, hooks, size, seed), shared by every SAE ------------------------


def cache_key(model: str, hooks: list[str], n_words: int, seed: int, n_icl: int) -> str:
    spec = dict(model=model, hooks=sorted(hooks), n_words=n_words, seed=seed, n_icl=n_icl, template=TEMPLATE,
                train_fraction=TRAIN_FRACTION, version=1)
    return stable_hash(spec, digits=12)


def cache_path(model: str, hooks: list[str], n_words: int, seed: int, n_icl: int) -> Path:
    return paths.cache_dir() / "first_letter" / f"{model}--{cache_key(model, hooks, n_words, seed, n_icl)}"


def save(data: FirstLetterData, folder: Path) -> None:
    """safetensors + JSON, written into a temporary folder renamed at the end (never half a dataset)."""
    from safetensors.torch import save_file

    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # left by a killed run
    tmp.mkdir(parents=True)
    tensors = {"letters": data.letters_N, "train": data.train_N.to(torch.uint8)}
    tensors.update({f"acts/{h}": a for h, a in data.acts.items()})
    save_file(tensors, str(tmp / "data.safetensors"))
    (tmp / "meta.json").write_text(json.dumps(dict(meta=data.meta, words=data.words)))
    durable.normal_permissions(tmp)  # save_file leaves 0600
    tmp.rename(folder)


def load(folder: Path) -> FirstLetterData:
    from safetensors.torch import load_file

    t = load_file(str(folder / "data.safetensors"))
    info = json.loads((folder / "meta.json").read_text())
    acts = {k[len("acts/"):]: v for k, v in t.items() if k.startswith("acts/")}
    return FirstLetterData(info["words"], t["letters"], t["train"].bool(), acts, info["meta"])


def load_or_build(model: str, hooks: list[str], n_words: int, seed: int = 0, n_icl: int = N_ICL,
                  batch_size: int = 16, progress: bool = True) -> FirstLetterData:
    """The cached dataset, built (model loaded) only if the cache lacks it."""
    folder = cache_path(model, hooks, n_words, seed, n_icl)
    if (folder / "meta.json").is_file():
        return load(folder)
    from .lm import load_model

    lm = load_model(model, device="cpu")
    data = build_first_letter_data(lm, hooks, n_words, seed, n_icl, batch_size, progress)
    save(data, folder)
    return data
