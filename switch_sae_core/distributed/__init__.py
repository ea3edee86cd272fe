"""Training one SAE across processes with torch.distributed (see docs/distributed.md).

    torchrun --nproc_per_node=P -m switch_sae_core.distributed --config run.json [--expert-parallel]

- data parallelism for every architecture: each rank trains on B/P rows of the global batch, gradients
  are all-reduced; the result equals a single-process run over the global batch (up to fp32 rounding);
- expert parallelism for Switch SAEs: each rank owns N/P experts (weights and Adam state); the router
  and biases are replicated; inputs travel to their expert's rank by all-to-all and come back.
"""
from .comm import (DistContext, DistributedConfigError, RankFailureError, init_distributed,  # noqa: F401
                   shutdown)
from .expert_parallel import load_sharded  # noqa: F401
from .trainer import train_distributed  # noqa: F401
