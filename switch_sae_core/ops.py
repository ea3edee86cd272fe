"""Fast kernels with plain-PyTorch fallbacks: sparse decode and the grouped expert matmul.

The slow references these are checked against live in the tests.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def sparse_decode(acts_BK: Tensor, indices_BK: Tensor, W_dec_MD: Tensor) -> Tensor:
    """sum_k acts[b, k] * W_dec[indices[b, k]] -> (B, D), without the dense (B, M) latent matrix."""
    return F.embedding_bag(indices_BK, W_dec_MD, per_sample_weights=acts_BK.to(W_dec_MD.dtype), mode="sum")
