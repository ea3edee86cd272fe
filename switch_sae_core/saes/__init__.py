"""The SAE architectures: Switch (the paper's), and the TopK, ReLU, Gated, BatchTopK and JumpReLU baselines."""
from .base import (BaseSAE, CheckpointError, SAEInputError, SAEOutput, SwitchOutput, build_sae,  # noqa: F401
                   load_sae)
from .batchtopk import BatchTopKSAE  # noqa: F401
from .gated import GatedSAE  # noqa: F401
from .jumprelu import JumpReLUSAE  # noqa: F401
from .relu import ReLUSAE  # noqa: F401
from .switch import SwitchSAE, experts_forward  # noqa: F401
from .topk import TopKSAE  # noqa: F401
