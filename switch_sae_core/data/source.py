"""The one interface between activations and the trainer.

Anything that serves training batches (the cached activation store, the synthetic ground-truth generator)
implements `BatchSource`. Batches are a deterministic function of (batch_size, seed, start), so a resumed
run sees exactly the batches an uninterrupted run would have seen.
"""
from __future__ import annotations

from typing import Iterator, Protocol, runtime_checkable

from torch import Tensor


@runtime_checkable
class BatchSource(Protocol):
    d_in: int
    """Width of every activation vector."""

    def batches(self, batch_size: int, seed: int = 0, start: int = 0) -> Iterator[Tensor]:
        """Yield (batch_size, d_in) float32 batches forever (epoch after epoch), beginning with batch
        number `start` of the stream that `seed` defines."""
        ...
