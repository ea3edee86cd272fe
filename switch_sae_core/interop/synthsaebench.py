"""SynthSAEBench (SAELens's synthetic ground-truth benchmark) for our SAEs: its model, its data, its scores.

SynthSAEBench (Chanin et al. 2026, arXiv 2602.14687; `sae_lens.synthetic`, SAELens >= 6.35) builds activations
as sparse sums of known feature vectors with Zipfian firing, a feature hierarchy with mutually exclusive children,
low-rank correlated firing and per-feature magnitudes. Its standard model SynthSAEBench-16k is a config
(`SCALES["16k"]`, from the SAELens docs) that we BUILD offline instead of downloading; `SCALES["4k"]` is the same
generator scaled down so that this 2-core CPU trains an SAE in minutes (what was scaled and why: docstring there).

Scoring goes through SAELens's OWN evaluator, `eval_sae_on_synthetic_data` (MCC by Hungarian matching,
uniqueness, per-latent precision/recall/F1, explained variance, L0, dead latents, shrinkage): each of our SAEs is
converted to a SAELens SAE (`interop.sae_lens.to_sae_lens`) and handed to it, so our numbers are the benchmark's.

sae-lens is optional (it needs transformer-lens < 4: the TransformerLens-3.9 venv of scripts/test_tl3.sh);
every entry point raises `InteropError` with the install line when it is missing.
"""
from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import Tensor

from ..config import SAEConfig
from ..saes.base import BaseSAE
from .sae_lens import InteropError, require_sae_lens, to_sae_lens


@dataclasses.dataclass(frozen=True)
class BenchScale:
    """One synthetic model: the parameters of `sae_lens.synthetic.SyntheticModelConfig` we vary, and the SAE
    width/k its benchmark trains at (SynthSAEBench-16k: 4096 latents, the L0 of its 4096 most frequent features)."""

    num_features: int
    hidden_dim: int
    root_nodes: int  # hierarchy: root nodes (branching factor 4, depth 3, all children mutually exclusive)
    correlation_rank: int
    ortho_steps: int  # orthogonalisation of the feature vectors (lr 3e-4)
    sae_width: int
    k: int
    seed: int = 42


SCALES: dict[str, BenchScale] = {
    # SynthSAEBench-16k as documented (SAELens docs, "SynthSAEBench"): 16,384 features in d = 768, Zipfian firing
    # (exponent 0.5, p_max 0.4, p_min 5e-4), 128 roots x branching 4 x depth 3, low-rank correlations (rank 25,
    # scale 0.1), 100 orthogonalisation steps at lr 3e-4, mean magnitudes 5 -> 4, std folded normal (0.5, 0.5).
    "16k": BenchScale(16_384, 768, 128, 25, 100, 4096, 25),
    # The CPU scale: features and SAE width / 4, d / 3 (features per dimension 16 instead of 21: the same regime of
    # superposition), roots / 4 (the hierarchy covers the same two thirds of the features), every distribution
    # parameter unchanged. Its true L0 is ~6 (the Zipfian tail over 4x fewer features), so k = 6.
    "4k": BenchScale(4096, 256, 32, 25, 100, 1024, 6),
    # Tests only.
    "ci": BenchScale(256, 32, 4, 4, 5, 64, 3),
}


def model_config(scale: BenchScale):
    """The `SyntheticModelConfig` of a scale (every parameter not in BenchScale as in SynthSAEBench-16k)."""
    require_sae_lens()
    from sae_lens.synthetic import (FoldedNormalMagnitudeConfig, HierarchyConfig, LinearMagnitudeConfig,
                                    SyntheticModelConfig, ZipfianFiringProbabilityConfig)
    from sae_lens.synthetic.synthetic_model import LowRankCorrelationConfig, OrthogonalizationConfig

    return SyntheticModelConfig(
        num_features=scale.num_features, hidden_dim=scale.hidden_dim,
        firing_probability=ZipfianFiringProbabilityConfig(exponent=0.5, max_prob=0.4, min_prob=5e-4),
        hierarchy=HierarchyConfig(total_root_nodes=scale.root_nodes, branching_factor=4, max_depth=3,
                                  mutually_exclusive_portion=1.0),
        correlation=LowRankCorrelationConfig(rank=scale.correlation_rank, correlation_scale=0.1),
        orthogonalization=OrthogonalizationConfig(num_steps=scale.ortho_steps, lr=3e-4),
        mean_firing_magnitudes=LinearMagnitudeConfig(start=5.0, end=4.0),
        std_firing_magnitudes=FoldedNormalMagnitudeConfig(mean=0.5, std=0.5),
        seed=scale.seed)


def load_or_build_model(scale: BenchScale, directory: str | Path):
    """The synthetic model of `scale`, built once (orthogonalisation takes minutes) and saved in `directory`
    by SAELens's own `SyntheticModel.save`."""
    require_sae_lens()
    from sae_lens.synthetic import SyntheticModel

    directory = Path(directory)
    if (directory / "synthetic_model_config.json").exists():
        return SyntheticModel.load_from_disk(directory)
    model = SyntheticModel(model_config(scale))
    tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.tmp"))
    model.save(tmp)
    tmp.rename(directory)  # atomic: a kill leaves no half-saved model behind
    return model


def generate_activations(model, n: int, path: str | Path, seed: int, chunk: int = 8192) -> np.ndarray:
    """(n, d) float16 activations from `model` (SAELens's sampler, torch seed `seed`), written once to `path`
    (.npy) and memory-mapped afterwards. float16 holds these magnitudes (|x| < 100) to 3 significant digits."""
    path = Path(path)
    if not path.exists():
        torch.manual_seed(seed)
        out = np.lib.format.open_memmap(path.with_suffix(".tmp.npy"), mode="w+", dtype=np.float16,
                                        shape=(n, model.cfg.hidden_dim))
        for s in range(0, n, chunk):
            out[s:s + chunk] = model.sample(min(chunk, n - s)).numpy().astype(np.float16)
        out.flush()
        del out
        path.with_suffix(".tmp.npy").rename(path)
    return np.load(path, mmap_mode="r")


class ArraySource:
    """A BatchSource over a fixed (n, d) array: batch i is rows i*B ... (i+1)*B - 1 (wrapping), the same for
    every seed, so every SAE of a comparison (and SAELens's trainer) sees one identical activation stream."""

    def __init__(self, rows_ND: np.ndarray):
        self.rows, self.d_in = rows_ND, rows_ND.shape[1]

    def batches(self, batch_size: int, seed: int = 0, start: int = 0) -> Iterator[Tensor]:
        n, i = len(self.rows), start * batch_size
        while True:
            idx = np.arange(i, i + batch_size) % n
            s = idx[0]
            rows = self.rows[s:s + batch_size] if s + batch_size <= n else self.rows[idx]
            yield torch.from_numpy(np.asarray(rows, dtype=np.float32))
            i += batch_size


def as_sae_lens(sae: BaseSAE):
    """Our SAE as a SAELens SAE object (through SAELens's own on-disk format and loader)."""
    require_sae_lens()
    import sae_lens

    with tempfile.TemporaryDirectory() as d:
        to_sae_lens(sae, d, hook_name="synthetic")
        return sae_lens.SAE.load_from_disk(d)


def evaluate(sae_lens_sae, model, n_samples: int, seed: int, batch_size: int = 4096) -> dict[str, Any]:
    """SAELens's `eval_sae_on_synthetic_data` on fresh samples (torch seed `seed`), flattened:
    mcc, uniqueness, explained_variance, sae_l0, true_l0, dead_latents, shrinkage, precision, recall, f1."""
    require_sae_lens()
    from sae_lens.synthetic import eval_sae_on_synthetic_data

    torch.manual_seed(seed)
    res = eval_sae_on_synthetic_data(sae_lens_sae, model.feature_dict, model.activation_generator,
                                     num_samples=n_samples, batch_size=batch_size).to_dict()
    cls = res.pop("classification")
    return {**res, "precision": cls["precision"], "recall": cls["recall"], "f1": cls["f1_score"]}


def train_sae_lens_topk(d_in: int, width: int, k: int, batches: Iterator[Tensor], steps: int, batch_size: int,
                        lr: float, decay_frac: float, seed: int):
    """SAELens's own TopK SAE trained by SAELens's own `SAETrainer` (its defaults: AuxK coefficient 1, decoder
    norm rescaling, its initialisation) on `batches`, with our lr and schedule (constant, then linear decay to 0
    over the last `decay_frac` of the steps), Adam (0.9, 0.999). The cross-implementation reference row."""
    require_sae_lens()
    from sae_lens.config import LoggingConfig, SAETrainerConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.training.sae_trainer import SAETrainer

    torch.manual_seed(seed)
    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d_in, d_sae=width, k=k))
    cfg = SAETrainerConfig(
        total_training_samples=steps * batch_size, train_batch_size_samples=batch_size, lr=lr, lr_end=0.0,
        lr_scheduler_name="constant", lr_decay_steps=round(decay_frac * steps), device="cpu",
        dead_feature_window=1000, feature_sampling_window=2000, n_checkpoints=0, checkpoint_path=None,
        save_final_checkpoint=False, logger=LoggingConfig(log_to_wandb=False, eval_every_n_wandb_logs=2**31 - 1))
    trainer = SAETrainer(cfg=cfg, sae=sae, data_provider=batches, save_checkpoint_fn=lambda *a, **kw: None)
    return trainer.fit()


__all__ = ["BenchScale", "SCALES", "model_config", "load_or_build_model", "generate_activations", "ArraySource",
           "as_sae_lens", "evaluate", "train_sae_lens_topk", "InteropError", "SAEConfig"]
