"""The one interface between activations and the trainer.

Anything that serves training batches (the cached activation store, the synthetic ground-truth generator,
`TensorSource` for activations already in memory) implements `BatchSource`. Batches are a deterministic function of (batch_size, seed, start), so a resumed
run sees exactly the batches an uninterrupted run would have seen.
"""
from __future__ import annotations

from typing import Iterator, Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor


@runtime_checkable
class BatchSource(Protocol):
    d_in: int
    """Width of every activation vector."""

    def batches(self, batch_size: int, seed: int = 0, start: int = 0) -> Iterator[Tensor]:
        """Yield (batch_size, d_in) float32 batches forever (epoch after epoch), beginning with batch
        number `start` of the stream that `seed` defines."""
        ...


class TensorSource:
    """A BatchSource over activations held in memory: the rows of one (N, d_in) tensor (a synthetic
    benchmark's samples, activations computed in a notebook, a NumPy array through torch.as_tensor).

    The stream is the activation store's (`ActivationStore.batch_rows`): epoch after epoch of a fresh
    permutation of all N rows, drawn from (seed, epoch) by NumPy's default_rng, batch i = stream items
    [i*B, (i+1)*B). Every row is served once per epoch, and any batch is computed without the ones before
    it, so a resumed run sees the same batches. Batches are float32 on the tensor's device.
    Raises ValueError on a tensor that is not (N, d_in) with N >= 1 or not floating point.
    """

    def __init__(self, x_ND: Tensor):
        if not isinstance(x_ND, Tensor) or x_ND.ndim != 2 or x_ND.shape[0] < 1 or not x_ND.is_floating_point():
            shape = tuple(x_ND.shape) if isinstance(x_ND, Tensor) else type(x_ND).__name__
            raise ValueError(f"TensorSource needs a floating-point tensor of shape (rows, d_in) with rows >= 1, got "
                             f"{shape}: flatten (batch, seq, d) activations to (batch*seq, d)")
        self.x_ND = x_ND
        self.d_in = x_ND.shape[1]
        self._perms: dict[tuple[int, int], Tensor] = {}

    def __len__(self) -> int:
        return self.x_ND.shape[0]

    def _permutation(self, seed: int, epoch: int) -> Tensor:
        key = (seed, epoch)
        if key not in self._perms:
            if len(self._perms) > 2:  # only the epochs in use
                self._perms.pop(next(iter(self._perms)))
            perm = np.random.default_rng([seed, epoch]).permutation(len(self))
            self._perms[key] = torch.from_numpy(perm).to(self.x_ND.device)
        return self._perms[key]

    def batch_rows(self, batch_size: int, seed: int, index: int) -> Tensor:
        """(batch_size,) row indices of batch number `index` (the stream described in the class docstring)."""
        pos, end, parts = index * batch_size, (index + 1) * batch_size, []
        while pos < end:
            epoch, offset = divmod(pos, len(self))
            parts.append(self._permutation(seed, epoch)[offset: offset + (end - pos)])
            pos += len(parts[-1])
        return torch.cat(parts)

    def batches(self, batch_size: int, seed: int = 0, start: int = 0) -> Iterator[Tensor]:
        """(batch_size, d_in) float32 batches forever, beginning with batch `start`."""
        index = start
        while True:
            yield self.x_ND[self.batch_rows(batch_size, seed, index)].float()
            index += 1

    def __repr__(self) -> str:
        return f"TensorSource({len(self)} rows x {self.d_in})"
