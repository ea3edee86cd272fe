"""Where each activation row comes from: row t is token `position_T[t]` of context `context_T[t]` (`TokenContexts`),
so a feature's top-activating rows can be shown in their text."""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch import Tensor


@dataclasses.dataclass
class TokenContexts:
    """Where each activation row comes from: row t is token `position_T[t]` of context `context_T[t]`."""

    tokens_CL: Tensor
    """(C, L) token ids of the contexts."""
    context_T: Tensor
    """(T,) context of each row."""
    position_T: Tensor
    """(T,) position of each row within its context."""
    str_tokens: Callable[[Sequence[int]], list[str]]
    """token ids -> their strings (e.g. `data.lm.load_tokenizer(name).str_tokens`)."""

    def __post_init__(self) -> None:
        if self.context_T.shape != self.position_T.shape:
            raise ValueError(f"context_T {tuple(self.context_T.shape)} and position_T {tuple(self.position_T.shape)} differ")

    @classmethod
    def from_store(cls, store, split: str = "eval", n_rows: Optional[int] = None) -> "TokenContexts":
        """The contexts of an `ActivationStore`'s rows: split 'eval' matches `store.eval_activations()`;
        `n_rows` keeps only the first rows (those of `store.eval_activations()[:n_rows]`)."""
        if split not in ("train", "eval"):
            raise ValueError(f"split={split!r}: choose 'train' or 'eval'")
        tokens = store.eval_tokens if split == "eval" else torch.from_numpy(np.asarray(store.train_tokens, dtype=np.int64))
        rows = torch.from_numpy(np.asarray(store.eval_rows if split == "eval" else store.train_rows, dtype=np.int64))
        rows = rows[:n_rows]
        return cls(tokens, rows[:, 0], rows[:, 1], store.tokenizer.str_tokens)

    @property
    def n_rows(self) -> int:
        return self.context_T.shape[0]

    def token(self, row: int) -> str:
        return self.str_tokens([int(self.tokens_CL[self.context_T[row], self.position_T[row]])])[0]

    def window(self, row: int, before: int = 12, after: int = 4) -> tuple[list[str], int]:
        """Token strings around a row's token and the index of that token in the list."""
        c, p = int(self.context_T[row]), int(self.position_T[row])
        lo, hi = max(0, p - before), min(self.tokens_CL.shape[1], p + after + 1)
        return self.str_tokens(self.tokens_CL[c, lo:hi].tolist()), p - lo

    def rows_with_token(self, text: str) -> Tensor:
        """(R,) rows whose token string is `text` (exact match, else match ignoring surrounding spaces)."""
        ids = self.tokens_CL[self.context_T, self.position_T]
        uniq = ids.unique()
        strings = self.str_tokens(uniq.tolist())
        wanted = [int(u) for u, s in zip(uniq, strings) if s == text]
        if not wanted:
            wanted = [int(u) for u, s in zip(uniq, strings) if s.strip() == text.strip()]
        return torch.nonzero(torch.isin(ids, torch.tensor(wanted, dtype=ids.dtype))).flatten()
