"""switch_sae_core: Switch Sparse Autoencoders (mixture-of-expert SAEs) and their baselines."""
from .config import ConfigError, SAEConfig, TrainConfig

__version__ = "0.1.0"
