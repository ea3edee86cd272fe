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
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import Tensor

from .. import durable, metrics
from ..config import SAEConfig
from ..profiles import routing_variants
from ..results import load_records
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
    durable.normal_permissions(tmp)  # mkdtemp makes it 0700, safetensors its weights 0600
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


# --- the grid ---------------------------------------------------------------------------------------------------
ALPHA_ONLY = "(alpha*L_aux)"  # label suffix of the Switch SAEs trained with aux_scale_by_d=False


def grid(width: int, k: int) -> dict[str, dict]:
    """label -> SAEConfig fields (d_in comes from the scale), every SAE at L0 = k. Fixed width: M = width.
    FLOP-matched: every input's encoder scores `width` latents (top-1 Switch-N with experts `width` wide; top-2,
    shared expert and the Scale SAE over 8 experts of width/2, 2 of them active: `profiles.routing_variants`)."""
    paper = {
        "topk": dict(arch="topk", n_features=width, k=k),
        "switch-4": dict(arch="switch", n_features=width, n_experts=4, k=k),
        "switch-8": dict(arch="switch", n_features=width, n_experts=8, k=k),
        "switch-16": dict(arch="switch", n_features=width, n_experts=16, k=k),
        "flop-matched-2": dict(arch="switch", n_features=2 * width, n_experts=2, k=k),
        **routing_variants(width, k),
    }
    # The paper's load-balancing weight is alpha * d * L_aux (alpha = 3): ~2x the reconstruction at GPT-2's MSE
    # (~1000), but ~35x it at this benchmark's (~20). The same SAEs with alpha * L_aux (aux_scale_by_d=False):
    for label in ("switch-4", "switch-16", "flop-matched-2", "flop-matched-4", "scale (8x)"):
        paper[f"{label} {ALPHA_ONLY}"] = dict(paper[label], aux_scale_by_d=False)
    return paper


REFERENCE_LABEL = "sae-lens topk"


def grid_configs(scale: BenchScale) -> dict[str, dict]:
    """label -> the `sae` field a record of that label carries (SAEConfig.to_dict, or the SAELens reference's)."""
    return {REFERENCE_LABEL: {"arch": "sae_lens.topk", "n_features": scale.sae_width, "k": scale.k},
            **{label: SAEConfig(d_in=scale.hidden_dim, **fields).to_dict()
               for label, fields in grid(scale.sae_width, scale.k).items()}}


def _records_of_this_grid(records: list[dict], configs: dict[str, dict], path: Path) -> list[dict]:
    """The records whose label names the SAE the grid trains under it now. A label of the grid on a record of
    another configuration (the grid's definition changed since, e.g. top-2 at k instead of k/2 per expert) is a
    ConfigError: summaries group by label, so the two would be averaged silently."""
    from ..config import ConfigError

    stale = sorted({r["label"] for r in records if r["label"] in configs and r.get("sae") != configs[r["label"]]})
    if stale:
        raise ConfigError(f"{path} has records labelled {stale} of another SAE configuration than the grid's now: "
                          "relabel them (as '(8x, L0 2k)' was) or write to another --out")
    return [r for r in records if r["label"] in configs]


def run_grid(scale_name: str, out: str | Path, cache: str | Path, steps: int = 3000, batch_size: int = 512,
             lr_scale: float = 4.0, seeds=(0, 1, 2), only=None, eval_samples: int = 50_000,
             convergence: bool = True, log=None) -> Path:
    """Train every SAE of `grid` (and SAELens's own TopK) at every seed on one fixed activation stream, score each
    with SAELens's evaluator, and append one record per SAE to `out`/records.jsonl as it finishes (a killed run
    resumes: records already there are skipped). `convergence`: seed 0 of each SAE also at 2 x steps (the 2x rule).
    SAEs are saved under `cache`/saes/ for later analyses. Returns the records file."""
    from ..analysis.recovery import feature_recovery, sae_duplicate_stats
    from ..config import TrainConfig
    from ..heldout import reconstruction_metrics
    from ..results import append_record
    from ..train import base_lr, train_sae

    log = log or (lambda message: None)
    scale, cache, t0 = SCALES[scale_name], Path(cache), time.time()
    cache.mkdir(parents=True, exist_ok=True)
    records_file = Path(out) / "records.jsonl"
    log(f"[synthsaebench] model {scale_name}: {scale}")
    model = load_or_build_model(scale, cache / "model")
    n_train = (2 if convergence else 1) * steps * batch_size
    source = ArraySource(generate_activations(model, n_train, cache / f"train_{n_train}.npy", seed=1))
    heldout = torch.from_numpy(generate_activations(model, 32_768, cache / "heldout.npy", seed=2).astype("float32"))
    log(f"[synthsaebench] data ready ({n_train} training rows) after {time.time() - t0:.0f} s")
    labels = [REFERENCE_LABEL, *grid(scale.sae_width, scale.k)]
    runs = [(label, seed, steps) for seed in seeds for label in labels]
    runs += [(label, 0, 2 * steps) for label in labels] if convergence else []
    runs = [r for r in runs if only is None or r[0] in only]
    configs = grid_configs(scale)
    done = {(r["label"], r["seed"], r["steps"]) for r in _records_of_this_grid(load_records(records_file), configs,
                                                                              records_file)}
    todo = [r for r in runs if r not in done]
    log(f"[synthsaebench] {len(runs)} SAEs, {len(runs) - len(todo)} already in {records_file}")
    for i, (label, seed, n_steps) in enumerate(todo):
        t1 = time.time()
        train_cfg = TrainConfig(steps=n_steps, batch_size=batch_size, lr_scale=lr_scale, seed=seed, log_every=50,
                                dead_window_tokens=200_000, progress=False)
        if label == REFERENCE_LABEL:
            sl = train_sae_lens_topk(scale.hidden_dim, scale.sae_width, scale.k, source.batches(batch_size), n_steps,
                                     batch_size, lr=base_lr(train_cfg, scale.sae_width),
                                     decay_frac=train_cfg.lr_decay_frac, seed=seed).eval()
            with torch.no_grad():
                x_hat = torch.cat([sl.decode(sl.encode(x)) for x in heldout.split(4096)])
            recon = {"mse": float(metrics.mse(heldout, x_hat)), "fvu": float(metrics.fvu(heldout, x_hat))}
            sae_cfg, dup = configs[REFERENCE_LABEL], {}
        else:
            cfg = SAEConfig.from_dict(configs[label])
            sae = train_sae(cfg, source, train_cfg).sae.eval()
            sae.save(cache / "saes" / f"{label.replace(' ', '_')}_seed{seed}_steps{n_steps}")
            recon = reconstruction_metrics(sae, heldout)
            dup = sae_duplicate_stats(sae).to_json()
            sl, sae_cfg = to_sae_lens(sae), cfg.to_dict()
        scores = evaluate(sl, model, eval_samples, seed=3)
        true_FD, learned_MD = model.feature_dict.feature_vectors.detach(), sl.W_dec.detach().float()
        every = feature_recovery(true_FD, learned_MD)
        frequent = feature_recovery(true_FD[:scale.sae_width], learned_MD)  # Zipfian: feature 0 fires most often
        rec = {"label": label, "seed": seed, "steps": n_steps, "batch_size": batch_size, "scale": scale_name,
               "lr_scale": lr_scale, "sae": sae_cfg, **recon, **dup, **scores,
               "recovered_frac": every["recovered_frac"], "redundant_frac": every["redundant_frac"],
               "mmcs": every["mmcs"], "recovered_frac_frequent": frequent["recovered_frac"],
               "train_seconds": time.time() - t1}
        append_record(records_file, rec)
        log(f"[synthsaebench] {i + 1}/{len(todo)} {label} seed {seed} steps {n_steps}: mse {recon['mse']:.3f} "
            f"mcc {scores['mcc']:.3f} uniq {scores['uniqueness']:.3f} f1 {scores['f1']:.3f} ({time.time() - t1:.0f} s)")
    log(f"[synthsaebench] done in {time.time() - t0:.0f} s")
    return records_file


def profile_records(profile: str) -> tuple[str, list[dict], bool]:
    """What notebook 08 shows for a profile: (scale, records, trained_here). Profile `ci` with sae-lens installed
    trains the toy grid now (seconds) into a temporary table; otherwise the committed table of the profile's
    scale (`16k` for gpu/paper, else `4k`; `4k` when that one is not committed yet) is read."""
    import importlib.util

    from ..ground_truth import bench_records

    if profile == "ci" and importlib.util.find_spec("sae_lens") is not None:
        tmp = tempfile.mkdtemp(prefix="synthsaebench-ci-")
        return "ci", load_records(run_grid("ci", out=tmp, cache=tmp, steps=20, batch_size=64, eval_samples=1000)), True
    scale = "16k" if profile in ("gpu", "paper") else "4k"
    scale = scale if bench_records(scale) else "4k"
    return scale, bench_records(scale), False


__all__ = ["profile_records", "grid", "run_grid", "REFERENCE_LABEL", "BenchScale", "SCALES", "model_config", "load_or_build_model", "generate_activations", "ArraySource",
           "evaluate", "train_sae_lens_topk", "InteropError", "SAEConfig"]
