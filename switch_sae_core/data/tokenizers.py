"""The two tokenizers a `LanguageModel` has, behind the same four members (`encode`, `decode`, `str_tokens`,
`special_ids`): UTF-8 bytes for `tiny-random`, and a HuggingFace tokenizer for every real model."""
from __future__ import annotations


class ByteTokenizer:
    """UTF-8 bytes as token ids 0..255, BOS = 256: the tokenizer of `tiny-random`."""

    bos_token_id = 256
    eos_token_id = None
    special_ids = frozenset({256})
    vocab_size = 257

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if int(i) < 256).decode("utf-8", errors="replace")

    def str_tokens(self, ids) -> list[str]:
        return ["<bos>" if int(i) == 256 else bytes([int(i)]).decode("utf-8", errors="replace") for i in ids]


class HFTokenizer:
    """A HuggingFace tokenizer seen through the same four methods as `ByteTokenizer`."""

    def __init__(self, tok):
        self.tok = tok
        self.bos_token_id = tok.bos_token_id
        self.eos_token_id = tok.eos_token_id
        self.special_ids = frozenset(int(i) for i in tok.all_special_ids)
        self.vocab_size = len(tok)

    def encode(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids])

    def str_tokens(self, ids) -> list[str]:
        return [self.tok.decode([int(i)]) for i in ids]
