"""Named scales of the whole pipeline: `ci` (seconds), `quick` (offline SmolLM2 on a 2-core CPU),
`paper` (GPT-2 small layer 8, OpenWebText, 100K steps x 8192, for a GPU with internet).

Select one with the environment variable SWITCH_SAE_PROFILE (notebooks) or `--profile` (CLI).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Optional

from .config import Config, ConfigError, DataConfig, TrainConfig


@dataclasses.dataclass
class Profile(Config):
    name: str = "quick"
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    width_multiple: int = 8  # baseline dictionary size M = width_multiple * d_model (paper: 32)
    ks: tuple[int, ...] = (16, 32, 64)  # paper: 8, 16, 32, 48, 64, 96, 128, 192
    fixed_width_experts: tuple[int, ...] = (4, 8, 16, 32)  # paper: 16, 32, 64, 128
    flop_matched_experts: tuple[int, ...] = (2, 4, 8)  # paper: 2, 4, 8
    # ReLU/Gated have no k: their sparsity coefficient lambda spans an L0 range instead, one value per k.
    # Relative values: lambda = value * sqrt(E||x||^2 / d) (the loss is quadratic in x, the L1 term linear).
    relu_l1_coeffs: tuple[float, ...] = (8.0, 4.0, 2.0)
    gated_l1_coeffs: tuple[float, ...] = (8.0, 4.0, 2.0)
    # BatchTopK (k per input on average) and JumpReLU (lambda in the paper's units, saes/jumprelu.py) in the
    # fixed_width / flop_matched grids; empty = not in the grid. JumpReLU trains with Adam betas (0, 0.999) and
    # these warm-ups (the paper's recipe; the other SAEs' training is unchanged)
    batchtopk_ks: tuple[int, ...] = ()
    jumprelu_l0_coeffs: tuple[float, ...] = ()
    jumprelu_lr_warmup_steps: int = 0
    jumprelu_sparsity_warmup_steps: int = 0
    eval_every: int = 10  # steps between held-out MSE evaluations (the sample-efficiency curves)
    n_heldout: int = 8192  # held-out activations for MSE / FVU / L0 of every record
    ce_contexts: Optional[int] = None  # held-out contexts for CE loss recovered / KL of every record; None = all
    # the scaling grid (notebook 07): TopK and Switch (N in scaling_experts, where M/N >= 2k) at k = scaling_k over
    # these widths M, every SAE on the same tokens: scaling_steps (None = train.steps) x train.batch_size.
    scaling_widths: tuple[int, ...] = tuple(2**i for i in range(10, 16))  # paper's scaling laws on a GPU: 2^12 ... 2^17
    scaling_experts: tuple[int, ...] = (8, 64)  # paper: 8, 64
    scaling_k: int = 32  # paper: 32
    scaling_steps: Optional[int] = None  # training steps of every scaling SAE (same tokens at every width); None = train.steps
    # the claims with error bars: TopK and FLOP-matched Switch at k = claim_k, once per seed (grid "seeds"), and
    # the convergence check: the same SAEs (fewest experts) at the profile's steps and twice as long (grid
    # "convergence"; the longer run continues the shorter one from its decay start), at each of
    # convergence_seeds (None = the profile's own seed; more seeds measure the change with its spread)
    claim_k: int = 32
    seeds: tuple[int, ...] = (0, 1, 2)
    convergence_seeds: Optional[tuple[int, ...]] = None
    # sample efficiency at matched schedules (grid "schedules", issue 23 item 4): the SAEs of the claim trained for
    # each of these step counts with their own lr decay, at every seed; each run continues the next shorter one from
    # its decay start (the runs are the same up to there). Empty = not run.
    schedule_steps: tuple[int, ...] = ()
    reproduce_grids: tuple[str, ...] = ("fixed_width", "flop_matched")  # what `switch-sae reproduce` sweeps
    # baselines tuned alike (issue 23 item 3, docs/baselines.md): each family's lr multiplier (TrainConfig.lr_scale) is
    # chosen among lr_search_scales by lr_search.py on n_validation eval rows that are not the held-out ones
    # (heldout.validation_activations), training the family's claim SAE; the frontier grids then train each family's
    # coefficients at its chosen multiplier. The FIRST coefficient of a frontier is its claim SAE, the one expected
    # nearest L0 = claim_k (trained by the lr search and at every seed of `seeds`); the rest span L0 16-64. ReLU/Gated
    # values are relative as relu_l1_coeffs, JumpReLU's are lambda as jumprelu_l0_coeffs. Empty = no frontier.
    n_validation: int = 4096
    lr_search_scales: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0)
    frontier_relu_l1_coeffs: tuple[float, ...] = ()
    frontier_gated_l1_coeffs: tuple[float, ...] = ()
    frontier_jumprelu_l0_coeffs: tuple[float, ...] = ()

    @classmethod
    def from_dict(cls, d):
        d = dict(d)
        d["data"] = DataConfig.from_dict(d.get("data", {}))
        d["train"] = TrainConfig.from_dict(d.get("train", {}))
        return super().from_dict(d)


# the sweeps a profile can run (switch_sae_core.sweep.grid_configs builds them)
FRONTIER_GRIDS = ("frontier_relu", "frontier_gated", "frontier_jumprelu")  # one per family; "frontiers": all three
GRIDS = ("fixed_width", "flop_matched", "scaling", "seeds", "convergence", "variants", "schedules", "frontiers") + FRONTIER_GRIDS


def routing_variants(width: int, k: int) -> dict[str, dict]:
    """Beyond top-1 routing at equal encoder FLOPs AND equal L0: label -> SAEConfig fields (d_in comes from the
    caller) of Switch SAEs whose encoder scores `width` latents per input and whose decoder sums k latents: the
    paper's top-1 FLOP-matched Switch-4 (experts `width` wide, k per input) and, over 8 experts of width/2 with 2
    of them scoring each input, top-2 routing and a shared expert (one always-on expert beside a routed one), each
    with k // 2 per expert (a Switch SAE keeps k per ACTIVE expert: k each would double L0; an odd k gives them
    L0 = k - 1, e.g. SynthSAEBench-16k's 25 -> 24), and the Scale SAE (Xu et al. 2025, arXiv 2511.05745: ONE
    global TopK of k over the active experts' latents, and the high-frequency feature scaling). The `variants`
    grid (issue 22 item 4) and the SynthSAEBench grid use them."""
    return {
        "flop-matched-4": dict(arch="switch", n_features=4 * width, n_experts=4, k=k),
        "top-2 (8x)": dict(arch="switch", n_features=4 * width, n_experts=8, top_e=2, k=k // 2),
        "shared (8x)": dict(arch="switch", n_features=4 * width, n_experts=8, shared_expert=True, k=k // 2),
        "scale (8x)": dict(arch="switch", n_features=4 * width, n_experts=8, top_e=2, global_topk=True,
                           feature_scaling=True, k=k),
    }
PAPER_GRIDS = ("fixed_width", "flop_matched")  # the default of Profile.reproduce_grids (notebook 07 runs "scaling")

PROFILES: dict[str, Profile] = {
    # seconds: the pipeline end to end on a few thousand tokens (tests and `pytest --nbmake` in CI)
    "ci": Profile(
        name="ci",
        data=DataConfig(n_train_tokens=4096, n_eval_tokens=1024),
        train=TrainConfig(steps=30, batch_size=256, progress=False, log_every=10, dead_window_tokens=4096,
                          geometric_median_batch=1024),
        width_multiple=2,
        ks=(16,),
        fixed_width_experts=(4, 8),
        flop_matched_experts=(2,),
        relu_l1_coeffs=(2.0,),
        gated_l1_coeffs=(2.0,),
        eval_every=10,
        n_heldout=1024,
        scaling_widths=(256, 512, 1024),  # three tiny widths: TopK and Switch-8 (Switch-64 needs M >= 64 * 2k)
        scaling_k=16,  # k = 32 would need M >= 512 for Switch-8 (twice the CPU time of this grid)
    ),
    # < 45 min on a 2-core CPU: offline SmolLM2-135M-Instruct layer 20, 100K tokens, 21 SAEs of < 1 min each
    "quick": Profile(
        name="quick",
        # SmolLM2 layer 20 (DataConfig default): blocks.20.hook_resid_post is after 21 of 30 blocks (0.70 depth),
        # like the paper's GPT-2 layer 8 (after 9 of 12); stop_at_layer=21 keeps extraction at ~2/3 of a full
        # forward pass. Deeper layers cost more to extract, shallower ones are less abstract (docs/activations.md).
        data=DataConfig(n_train_tokens=100_000, n_eval_tokens=4096),
        train=TrainConfig(steps=600, batch_size=512, log_every=10, dead_window_tokens=50_000),
        width_multiple=4,
        ks=(16, 32, 64),
        fixed_width_experts=(4, 16),
        flop_matched_experts=(2, 4),
        relu_l1_coeffs=(8.0, 6.0, 4.5),  # measured: 4 -> L0 87, 10 -> L0 1.5 after 100 steps
        gated_l1_coeffs=(24.0, 12.0, 6.0),
        eval_every=10,
        n_heldout=4096,
        ce_contexts=16,
        scaling_widths=(1024, 2048, 4096, 8192),  # 10 SAEs: TopK and Switch-8 at 4 widths, Switch-64 at 2
        # the convergence check (TopK and FLOP-matched Switch-2 at 1200 steps) tells its notebooks they are a first look
        reproduce_grids=("fixed_width", "flop_matched", "convergence"),
    ),
    # SAEs trained to convergence on a 2-core CPU (docs/convergence.md): 1M tokens of offline SmolLM2 layer 20
    "cpu": Profile(
        name="cpu",
        data=DataConfig(n_train_tokens=1_000_000, n_eval_tokens=16_384),
        # 3M tokens per SAE at 4x the lr law (a named option, TrainConfig.lr_scale; 1x, 8x and 16x were measured worse):
        # the paper's lr is still improving by 10% per doubling there (docs/convergence.md, data/results/cpu_sizing/)
        # 4000 steps: at 3000, FLOP-matched Switch-2 changed by 3.2% +- 0.2% over 3 seeds when trained twice as long
        train=TrainConfig(steps=4000, batch_size=1024, lr_scale=4.0, log_every=50, dead_window_tokens=1_000_000),
        width_multiple=4,
        ks=(16, 32, 64),
        fixed_width_experts=(4, 16),
        flop_matched_experts=(2, 4),  # N = 8 (1.6x TopK's step time) does not fit the 3-hour budget
        # two values each, within TopK's L0 range 16-64 (a ReLU step costs ~2x, a Gated step ~3.5x TopK's: a third
        # value of each would put the profile over 3 hours): at 3000 steps ReLU 2.5 / 1.9 / 1.1 gave L0 14 / 21 / 51,
        # Gated 4 / 2 / 1 gave L0 16 / 41 / 109
        relu_l1_coeffs=(2.5, 1.5),
        gated_l1_coeffs=(4.0, 2.0),
        eval_every=100,
        n_heldout=8192,
        ce_contexts=32,
        # 16 SAEs, each on 3M tokens (at 512K tokens MSE rose with width: docs/convergence.md)
        scaling_widths=tuple(2**i for i in range(10, 16)),
        scaling_steps=3000,
        # the 2x rule at the three claim seeds (Switch-2 passed by 0.14 points at seed 0 alone: issue 23); the
        # seed-0 pair is recorded, seeds 1 and 2 add four 8000-step runs (~45 min of one core)
        convergence_seeds=(0, 1, 2),
        # matched schedules (issue 23 item 4; not in reproduce_grids): a ladder trained by ONE code version into its
        # own table and SAE cache (docs/sites.md: SWITCH_SAE_RESULTS=data/results/schedules/cpu, a fresh
        # SWITCH_SAE_CACHE beside the activations), `switch-sae sweep --profile cpu --grid schedules --no-lm`
        schedule_steps=(1000, 2000, 3000, 4000),
        # the convergence check first, so its verdict lands early; each shard trains a run and its continuation
        reproduce_grids=("convergence", "flop_matched", "fixed_width", "seeds"),
        # frontiers (docs/baselines.md), claim SAE first. L0 against the coefficient in this table (lr 4x; 4000 steps
        # where measured, else 3000): ReLU 2.5 -> 13.9, 1.9 -> 21, 1.5 -> 30.4, 1.1 -> 51 is a power law L0 ~ c^-1.55,
        # so 1.15 -> ~48 and 0.9 -> ~70; Gated 4 -> 14.5, 2 -> 37.4, 1 -> 109 is L0 ~ c^-1.38, so 2.2 -> ~33,
        # 1.6 -> ~50, 1.25 -> ~70. The ends lie just outside 16-64 so that TopK's k = 16 and 64 fall inside each
        # frontier (the lr chosen may move L0: re-read the frontier's L0s before adding points). JumpReLU has no run
        # here yet: its lambdas are the marginal MSE per latent of this table's TopK, lambda ~ -d(MSE / E||x||^2)/dL0
        # = 0.031 / L0 (MSE 6070 / 4724 / 3583 at k = 16 / 32 / 64, E||x||^2 = 58,000), for L0 ~ 32, 14, 50, 75:
        # a first guess to check against the search's L0
        frontier_relu_l1_coeffs=(1.5, 2.5, 1.15, 0.9),
        frontier_gated_l1_coeffs=(2.2, 4.0, 1.6, 1.25),
        frontier_jumprelu_l0_coeffs=(1e-3, 2.2e-3, 6e-4, 4e-4),
    ),
    # the paper's grid on one H200-class GPU, offline: SmolLM2 layer 20 on every offline corpus (~3.6M tokens,
    # extracted in about a minute on a GPU), bf16 autocast. Sized (not yet measured: no GPU was available) for
    # < 1 hour: 72 SAEs x 4000 steps x 8192 tokens, ~3-6 ms per step for M = 32 d on an H200.
    "gpu": Profile(
        name="gpu",
        data=DataConfig(n_train_tokens=3_400_000, n_eval_tokens=65_536, model_batch_size=64),
        train=TrainConfig(steps=4000, batch_size=8192, log_every=100, autocast_bf16=True),
        width_multiple=32,
        ks=(8, 16, 32, 48, 64, 96, 128, 192),
        fixed_width_experts=(16, 32, 64, 128),
        flop_matched_experts=(2, 4, 8),
        relu_l1_coeffs=(16.0, 11.0, 8.0, 6.0, 5.0, 4.0, 3.0, 2.0),
        gated_l1_coeffs=(48.0, 32.0, 24.0, 16.0, 12.0, 9.0, 6.0, 4.0),
        eval_every=200,
        n_heldout=16_384,
        ce_contexts=64,
        scaling_widths=tuple(2**i for i in range(12, 18)),
    ),
    # scripts/gpu_smoke.sh: the gpu profile's code paths (CUDA grouped_mm, bf16) in a few minutes
    "gpu_smoke": Profile(
        name="gpu_smoke",
        data=DataConfig(n_train_tokens=200_000, n_eval_tokens=8192, model_batch_size=64),
        train=TrainConfig(steps=300, batch_size=8192, log_every=50, autocast_bf16=True),
        width_multiple=8,
        ks=(32,),
        fixed_width_experts=(16,),
        flop_matched_experts=(2,),
        relu_l1_coeffs=(6.0,),
        gated_l1_coeffs=(12.0,),
        eval_every=50,
        n_heldout=8192,
        ce_contexts=32,
        scaling_widths=(4096, 8192),  # the scaling grid's code paths: TopK, Switch-8 and Switch-64 at two widths
    ),
    # the paper's setting (GPT-2 small, OpenWebText, needs the HF hub and a GPU)
    "paper": Profile(
        name="paper",
        # 820M x 768 activations: ~1.26 TB on disk even as float16 (docs/activations.md)
        data=DataConfig(model="gpt2", layer=8, dataset="openwebtext", n_train_tokens=820_000_000, n_eval_tokens=131_072,
                        store_dtype="float16"),
        train=TrainConfig(steps=100_000, batch_size=8192, log_every=100),
        width_multiple=32,
        ks=(8, 16, 32, 48, 64, 96, 128, 192),
        fixed_width_experts=(16, 32, 64, 128),
        flop_matched_experts=(2, 4, 8),
        relu_l1_coeffs=(16.0, 11.0, 8.0, 6.0, 5.0, 4.0, 3.0, 2.0),
        gated_l1_coeffs=(16.0, 11.0, 8.0, 6.0, 5.0, 4.0, 3.0, 2.0),
        eval_every=1000,
        n_heldout=65_536,
        scaling_widths=tuple(2**i for i in range(12, 18)),
    ),
}
# scripts/gpu_smoke.sh --dry-run (CI): gpu_smoke's code paths (bf16 autocast) at the ci profile's sizes, on the CPU
PROFILES["gpu_dry_run"] = PROFILES["ci"].replace(
    name="gpu_dry_run", train=PROFILES["ci"].train.replace(steps=6, log_every=2, autocast_bf16=True),
    fixed_width_experts=(4,), eval_every=2, ce_contexts=4)


# --- more sites (issue 23): the cpu profile's k = claim_k claim where only the data site differs ---------------
SITE_GRIDS = ("convergence", "flop_matched", "seeds")  # convergence first: its verdict lands early


def site_profile(base: Profile, name: str, **data_changes) -> Profile:
    """`base` at another data site (`data_changes`: DataConfig fields), reduced to the claim at k = claim_k:
    TopK and each FLOP-matched Switch at every seed of `base.seeds` (grids flop_matched, at the profile's own seed,
    and seeds), and the convergence check at every one of those seeds (its continuations start from the decay
    start). No ReLU/Gated and no other k: those are other items of issue 23. One command runs it: scripts/site.sh
    (docs/sites.md: the sizes and the time on the 2 cores)."""
    return base.replace(name=name, data=base.data.replace(**data_changes), ks=(base.claim_k,), relu_l1_coeffs=(),
                        gated_l1_coeffs=(), convergence_seeds=tuple(base.seeds), reproduce_grids=SITE_GRIDS)


# SmolLM2-135M-Instruct layer 10 (after 11 of 30 blocks: 0.37 depth; ~2x faster to extract than layer 20)
PROFILES["cpu_l10"] = site_profile(PROFILES["cpu"], "cpu_l10", layer=10)
# Gemma-3-270M layer 9 (after 10 of 18 blocks: 0.56 depth, the middle). Four contexts per forward pass: its
# 262k-token vocabulary makes the CE evaluation's logits 0.5 GB per context batch of 4 (2 GB at 16), and two
# shards run side by side in 24 GB (model_batch_size changes no key)
PROFILES["cpu_gemma"] = site_profile(PROFILES["cpu"], "cpu_gemma", model="gemma3-270m", layer=9, model_batch_size=4)
# the `cpu` site with dictionaries twice as wide (M = 8·d = 4608; issue 23 item 2): the same claim, plus fixed-width
# Switch-16 at that width (seed 0); the `cpu` activation cache serves it
PROFILES["cpu_wide"] = site_profile(PROFILES["cpu"], "cpu_wide").replace(
    width_multiple=8, fixed_width_experts=(16,), reproduce_grids=SITE_GRIDS + ("fixed_width",))
# the site path at the ci profile's sizes on the tiny random model (tests/test_sites.py runs scripts/site.sh with it)
PROFILES["ci_site"] = site_profile(PROFILES["ci"].replace(claim_k=16, flop_matched_experts=(2, 4)), "ci_site",
                                   model="tiny-random", layer=1)
# scripts/baselines.sh at the ci profile's sizes on the tiny random model (tests/test_baselines.py runs it): an eval
# split large enough for a validation split after the held-out rows, two lr multipliers, a 4-point ReLU frontier
PROFILES["ci_baselines"] = PROFILES["ci"].replace(
    name="ci_baselines", data=DataConfig(model="tiny-random", layer=1, n_train_tokens=4096, n_eval_tokens=2048),
    n_heldout=512, n_validation=256, ce_contexts=4, lr_search_scales=(1.0, 4.0),
    frontier_relu_l1_coeffs=(1.0, 2.0, 0.5, 0.25))

def get_profile(name: str | None = None, seed: Optional[int] = None) -> Profile:
    """The named profile; default from $SWITCH_SAE_PROFILE, else 'quick'. `seed` (None = the profile's)
    replaces its training seed (a notebook's SEED parameter)."""
    name = name or os.environ.get("SWITCH_SAE_PROFILE", "quick")
    if name not in PROFILES:
        raise ConfigError(f"unknown profile {name!r}: choose one of {sorted(PROFILES)} (env SWITCH_SAE_PROFILE)")
    profile = PROFILES[name]
    return profile if seed is None else profile.replace(train=profile.train.replace(seed=seed))


# Sizes of the synthetic ground-truth benchmark (notebook 06) per profile: d, F true features, C clusters, true
# mean l0, SAE width and k, steps, batch, held-out samples, the expert counts, ks, leakages and load-balancing
# alphas swept; leakage / freq_exponent / cohesion of the main data; lr 1e-2 (small dictionaries on small data
# train well with a larger lr than Gao et al.'s law gives).
_SYNTHETIC_DATA = dict(leakage=0.05, freq_exponent=0.5, cohesion=0.3, lr=1e-2)
SYNTHETIC_SCALES: dict[str, dict] = {
    "ci": dict(d=16, F=48, C=4, l0=2.0, width=96, k=2, steps=100, batch=128, n_eval=1024,
               fixed_width=(2, 4), flop_matched=(2,), ks=(1, 2), leakages=(0.0, 0.3), alphas=(0.0, 1.0), **_SYNTHETIC_DATA),
    "quick": dict(d=64, F=256, C=8, l0=3.0, width=512, k=3, steps=2000, batch=256, n_eval=8192,
                  fixed_width=(2, 4, 8, 16), flop_matched=(2, 4), ks=(2, 3, 6), leakages=(0.0, 0.05, 0.2, 0.5),
                  alphas=(0.0, 0.1, 1.0, 10.0), **_SYNTHETIC_DATA),
    "paper": dict(d=256, F=4096, C=16, l0=8.0, width=8192, k=8, steps=20_000, batch=4096, n_eval=65_536,
                  fixed_width=(2, 4, 8, 16, 32), flop_matched=(2, 4, 8), ks=(4, 8, 16), leakages=(0.0, 0.05, 0.2, 0.5),
                  alphas=(0.0, 0.1, 1.0, 10.0), **_SYNTHETIC_DATA),
}
# the synthetic benchmark needs no language model: the CPU profiles share quick's sizes, the GPU ones the paper's
SYNTHETIC_SCALES["cpu"] = SYNTHETIC_SCALES["quick"]
SYNTHETIC_SCALES["gpu"] = SYNTHETIC_SCALES["paper"]
SYNTHETIC_SCALES["gpu_smoke"] = SYNTHETIC_SCALES["quick"]
SYNTHETIC_SCALES["gpu_dry_run"] = SYNTHETIC_SCALES["ci"]
SYNTHETIC_SCALES["cpu_l10"] = SYNTHETIC_SCALES["cpu_gemma"] = SYNTHETIC_SCALES["cpu_wide"] = SYNTHETIC_SCALES["quick"]
SYNTHETIC_SCALES["ci_site"] = SYNTHETIC_SCALES["ci_baselines"] = SYNTHETIC_SCALES["ci"]


def synthetic_scale(profile: str | Profile) -> dict:
    """The synthetic benchmark's sizes for a profile (see SYNTHETIC_SCALES)."""
    name = profile.name if isinstance(profile, Profile) else profile
    if name not in SYNTHETIC_SCALES:
        raise ConfigError(f"no synthetic benchmark sizes for profile {name!r}: add it to profiles.SYNTHETIC_SCALES")
    return SYNTHETIC_SCALES[name]
