"""SAELens interoperability: our SAEs in SAELens's on-disk format, SAELens SAEs as ours.

    sl_sae = to_sae_lens(sae)                          # in memory: a SAELens SAE, same encode/decode
    to_sae_lens(sae, "out/", hook_name="blocks.8.hook_resid_post", model_name="gpt2")   # and on disk
    sl_sae = sae_lens.SAE.load_from_disk("out/")      # after importing this module (Switch SAEs)
    ours = from_sae_lens("out/")                      # or from_sae_lens(sl_sae)

SAELens (>= 6, which needs transformer-lens < 4) is optional and imported only here. Importing this
module registers the Switch SAE as the SAELens architecture "switch" (`sae_lens.register_sae_class`),
so `SAE.load_from_disk` of an exported Switch SAE returns a `SwitchSAELensSAE` with routing.

The maths of each mapping (ours -> SAELens; `from_sae_lens` inverts it; all exact, no retraining):

- TopK   -> "topk":  W_enc^T, b_enc = 0, W_dec, b_dec = b_pre, apply_b_dec_to_input, no decoder-norm rescale.
            SAELens: ReLU(TopK((x - b_dec) W_enc + b_enc)) W_dec + b_dec  (its topk_sae.py).
- ReLU   -> "standard": W_enc^T, b_enc, W_dec, b_dec, apply_b_dec_to_input = False (ours does not centre
            the input). The decoder-norm-weighted L1 is a training term only: the forward is unchanged
            and decoder norms are kept, so latents equal ours.
- Gated  -> "gated": W_enc^T (= W_gate), b_gate, r_mag, b_mag, W_dec, b_dec (SAELens gated_sae.py has
            the same tied-magnitude parametrisation, Rajamanoharan et al. 2024).
- BatchTopK -> "jumprelu" (SAELens saves its BatchTopK SAEs so, batchtopk_sae.py): W_enc^T, b_enc, W_dec, b_dec,
            threshold = the estimated theta on every latent, apply_b_dec_to_input: our eval-mode forward
            ReLU(pre) 1[pre > theta]. Imported back as BatchTopK when our config in the metadata says so.
- JumpReLU -> "jumprelu": W_enc^T, b_enc, W_dec, b_dec, threshold = exp(log_threshold), apply_b_dec_to_input =
            False (the paper's uncentred encoder). Imported: log_threshold = log(threshold) (exp(log) may move
            theta by an ulp); `input_scale`, a training-only buffer, is 1.
- Switch -> "switch" (registered here): W_enc (D, M_total) = our (G, M/N, D) stacked, W_dec (M_total, D),
            b_dec = b_pre, W_router, b_router. Its `encode` returns the GATE-SCALED latents
            g_i(x) * a_j(x) (dense, zero outside the routed experts), so that `decode` stays linear and
            decode(encode(x)) is our x_hat; our `latent_acts` are the unscaled a_j.

Errors (one line, `InteropError`): sae_lens missing, an SAE SAELens cannot represent, a SAELens SAE we
cannot represent (nonzero TopK encoder bias, activation normalisation, hook_z reshaping, other
architectures: transcoders, Matryoshka, ...).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import SAEConfig
from ..errors import SwitchSAEError
from ..saes.base import BaseSAE, build_sae

SWITCH_ARCH = "switch"
INSTALL = "pip install sae-lens 'transformer-lens>=2.16.1,<4' (see docs/sae_lens.md)"
CFG_FILE, WEIGHTS_FILE = "cfg.json", "sae_weights.safetensors"  # SAELens's file names (sae_lens/constants.py)

try:
    import sae_lens
    from sae_lens.saes.sae import SAEMetadata
    from transformer_lens.hook_points import HookPoint
except ImportError as e:  # optional dependency: every entry point below says how to get it
    sae_lens, _IMPORT_ERROR = None, e


class InteropError(SwitchSAEError, ValueError):
    """An SAE cannot cross between switch_sae_core and SAELens; the message says why and what to do."""


def require_sae_lens() -> None:
    if sae_lens is None:
        raise InteropError(f"sae_lens is not importable here ({_IMPORT_ERROR}): {INSTALL}")


# --- the Switch SAE as a SAELens architecture ------------------------------------------------------------
if sae_lens is not None:

    @dataclasses.dataclass
    class SwitchSAELensConfig(sae_lens.SAEConfig):
        """SAELens config of a Switch SAE; d_sae = (n_experts + shared_expert) * M/N."""

        n_experts: int = 1
        k: int = 32  # active latents per expert
        top_e: int = 1
        shared_expert: bool = False
        scale_by_router_prob: bool = True
        global_topk: bool = False  # Scale SAE: one TopK of k over all routed experts' latents

        @classmethod
        def architecture(cls) -> str:
            return SWITCH_ARCH

        def __post_init__(self):
            super().__post_init__()
            if (self.normalize_activations, self.reshape_activations, self.apply_b_dec_to_input) != ("none", "none", True):
                raise ValueError("a Switch SAE needs normalize_activations='none', reshape_activations='none', "
                                 "apply_b_dec_to_input=True (write it with switch_sae_core's to_sae_lens)")

    class SwitchSAELensSAE(sae_lens.SAE):
        """Switch SAE (Mudide et al. 2024) as an inference SAELens SAE, computed densely over all experts
        (same numbers as switch_sae_core's SwitchSAE, without its FLOP saving):

            p(x) = softmax(W_router (x - b_router)),   g = p on the top_e experts (or 1), 0 elsewhere
            encode(x)[i, j] = g_i(x) ReLU(TopK_k over expert i of ((x - b_dec) W_enc)[i, :])
            (global_topk: ONE TopK_k over g_i(x) ((x - b_dec) W_enc)[i, j] of all routed experts i)
            decode(f) = f W_dec + b_dec

        Hooks: the SAELens ones plus `hook_router_probs` (..., n_experts)."""

        W_router: nn.Parameter
        b_router: nn.Parameter

        def __init__(self, cfg: SwitchSAELensConfig, use_error_term: bool = False):
            super().__init__(cfg, use_error_term)
            self.hook_router_probs = HookPoint()
            self.setup()  # register the extra hook point

        @property
        def n_stacked(self) -> int:
            return self.cfg.n_experts + int(self.cfg.shared_expert)

        def initialize_weights(self) -> None:
            super().initialize_weights()
            D, N = self.cfg.d_in, self.cfg.n_experts
            self.W_router = nn.Parameter(torch.zeros(N, D, dtype=self.dtype, device=self.device))
            self.b_router = nn.Parameter(torch.zeros(D, dtype=self.dtype, device=self.device))

        def gates(self, x: Tensor) -> Tensor:
            """(..., G) factor of each expert's output: router probability (or 1) on the top_e experts,
            1 on the shared expert, 0 elsewhere."""
            probs = self.hook_router_probs(F.softmax((x - self.b_router) @ self.W_router.T, dim=-1))
            gate_vals, experts = probs.topk(self.cfg.top_e, dim=-1)
            if not self.cfg.scale_by_router_prob:
                gate_vals = torch.ones_like(gate_vals)
            gate_G = F.pad(torch.zeros_like(probs), (0, self.n_stacked - self.cfg.n_experts), value=1.0)
            return gate_G.scatter(-1, experts, gate_vals)

        def encode(self, x: Tensor) -> Tensor:
            x = x.to(self.dtype)
            gate_G = self.gates(x)
            pre = self.hook_sae_acts_pre(self.process_sae_in(x) @ self.W_enc)
            pre_GW = pre.unflatten(-1, (self.n_stacked, -1))
            if self.cfg.global_topk:  # gate-scaled pre-activations of the routed experts compete for k places
                scored = (pre_GW * gate_G.unsqueeze(-1)).masked_fill(gate_G.unsqueeze(-1) == 0, float("-inf"))
                vals, idx = scored.flatten(-2).topk(self.cfg.k, dim=-1, sorted=False)
                return self.hook_sae_acts_post(torch.zeros_like(pre).scatter(-1, idx, vals.relu()))
            vals, idx = pre_GW.topk(self.cfg.k, dim=-1, sorted=False)
            acts_GW = torch.zeros_like(pre_GW).scatter(-1, idx, vals.relu())
            return self.hook_sae_acts_post((acts_GW * gate_G.unsqueeze(-1)).flatten(-2))

        def decode(self, feature_acts: Tensor) -> Tensor:
            out = self.hook_sae_recons(feature_acts @ self.W_dec + self.b_dec)
            return self.reshape_fn_out(self.run_time_activation_norm_fn_out(out), self.d_head)

    try:
        sae_lens.register_sae_class(SWITCH_ARCH, SwitchSAELensSAE, SwitchSAELensConfig)
    except ValueError:  # already registered: this module was reloaded
        pass


# --- ours -> SAELens ---------------------------------------------------------------------------------
def _export(sae: BaseSAE) -> tuple[str, dict[str, Any], dict[str, Tensor]]:
    """-> (SAELens architecture, its config fields beyond d_in/d_sae/dtype, state dict in its layout)."""
    c, D = sae.cfg, sae.cfg.d_in
    if c.arch == "topk":
        return "topk", dict(k=c.k, rescale_acts_by_decoder_norm=False), dict(
            W_enc=sae.W_enc.T, b_enc=torch.zeros_like(sae.W_enc[:, 0]), W_dec=sae.W_dec, b_dec=sae.b_pre)
    if c.arch == "relu":
        return "standard", dict(apply_b_dec_to_input=False), dict(
            W_enc=sae.W_enc.T, b_enc=sae.b_enc, W_dec=sae.W_dec, b_dec=sae.b_dec)
    if c.arch == "gated":
        return "gated", {}, dict(W_enc=sae.W_enc.T, b_gate=sae.b_gate, r_mag=sae.r_mag, b_mag=sae.b_mag,
                                 W_dec=sae.W_dec, b_dec=sae.b_dec)
    if c.arch == "batchtopk":  # SAELens's convention: a BatchTopK SAE is saved as a JumpReLU, theta on every latent
        return "jumprelu", {}, dict(W_enc=sae.W_enc.T, b_enc=sae.b_enc, W_dec=sae.W_dec, b_dec=sae.b_dec,
                                    threshold=sae.threshold.to(sae.W_dec.dtype).expand(c.n_features))
    if c.arch == "jumprelu":
        return "jumprelu", dict(apply_b_dec_to_input=False), dict(
            W_enc=sae.W_enc.T, b_enc=sae.b_enc, W_dec=sae.W_dec, b_dec=sae.b_dec, threshold=sae.threshold)
    if c.arch == "switch":
        fields = dict(n_experts=c.n_experts, k=c.k, top_e=c.top_e, shared_expert=c.shared_expert,
                      scale_by_router_prob=c.scale_by_router_prob, global_topk=c.global_topk)
        # feature scaling (Scale SAE) is folded: SAELens gets the encoder rows the forward uses
        return SWITCH_ARCH, fields, dict(W_enc=sae.encoder_directions().T, W_dec=sae.W_dec.reshape(-1, D),
                                         b_dec=sae.b_pre, W_router=sae.W_router, b_router=sae.b_router)
    raise InteropError(f"arch={c.arch!r} has no SAELens mapping: export a topk, relu, gated, batchtopk, jumprelu "
                       "or switch SAE")


def to_sae_lens(sae: BaseSAE, path: Union[str, Path, None] = None, *, hook_name: str | None = None,
                model_name: str | None = None):
    """Our SAE as a SAELens SAE (an `sae_lens.SAE`) with the same numbers: `forward`, `encode` (the dense
    latents of our `encode`) and `decode`. In memory by default; with `path`, also written there in
    SAELens's format (cfg.json + sae_weights.safetensors, via SAELens's own `save_model`) and returned as
    it loads back.

    hook_name: the TransformerLens hook the SAE reads (e.g. 'blocks.8.hook_resid_post'), which
    `HookedSAETransformer` attaches it to; model_name: stored in the metadata. Both default to where the SAE
    was trained (`sae.trained_on`) and must agree with it; both may be None when there is no language model
    (a synthetic benchmark, in-memory activations).
    Raises InteropError when sae_lens is missing, `sae` is not a switch_sae_core SAE, or hook_name /
    model_name contradict where it was trained."""
    require_sae_lens()
    if not isinstance(sae, BaseSAE):
        raise InteropError(f"to_sae_lens expects a switch_sae_core SAE (TopKSAE, ReLUSAE, GatedSAE, BatchTopKSAE, JumpReLUSAE, "
                           f"SwitchSAE), "
                           f"got {type(sae).__name__}")
    hook_name, model_name = _site(sae, hook_name, model_name)
    arch, fields, tensors = _export(sae)
    sae_cls, cfg_cls = _sae_lens_classes()[arch]
    # our full config rides along, so that from_sae_lens restores the training-only fields (l1_coeff, ...)
    metadata = SAEMetadata(hook_name=hook_name, model_name=model_name, switch_sae_config=sae.cfg.to_dict())
    device = str(sae.W_dec.device)
    sl_cfg = cfg_cls(d_in=sae.cfg.d_in, d_sae=tensors["W_dec"].shape[0], dtype=sae.cfg.dtype, device=device,
                     metadata=metadata, **fields)
    sl_sae = sae_cls(sl_cfg)
    with torch.no_grad():  # strict: names and shapes
        sl_sae.load_state_dict({k: v.detach().clone() for k, v in tensors.items()})
    if path is not None:
        sl_sae.save_model(path)
    return sl_sae


def _site(sae: BaseSAE, hook_name: str | None, model_name: str | None) -> tuple[str | None, str | None]:
    """(hook_name, model_name) of the export: the given ones, else where the SAE was trained (None for both when
    neither is known: an SAE trained on in-memory or synthetic activations reads no language-model hook)."""
    site = sae.trained_on or {}
    for given, name in ((hook_name, "hook"), (model_name, "model")):
        if given is not None and site.get(name) is not None and given != site[name]:
            raise InteropError(f"{name} {given!r} is not the {site[name]!r} the SAE was trained on: export it "
                               f"with {name}_name={site[name]!r} (or omit it)")
    return hook_name or site.get("hook"), model_name or site.get("model")


def _sae_lens_classes() -> dict[str, tuple[type, type]]:
    return {"topk": (sae_lens.TopKSAE, sae_lens.TopKSAEConfig),
            "standard": (sae_lens.StandardSAE, sae_lens.StandardSAEConfig),
            "gated": (sae_lens.GatedSAE, sae_lens.GatedSAEConfig),
            "jumprelu": (sae_lens.JumpReLUSAE, sae_lens.JumpReLUSAEConfig),
            SWITCH_ARCH: (SwitchSAELensSAE, SwitchSAELensConfig)}


# --- SAELens -> ours ---------------------------------------------------------------------------------
def from_sae_lens(path_or_sae, device: str | torch.device = "cpu") -> BaseSAE:
    """A SAELens SAE (an `sae_lens.SAE`, or a folder with cfg.json + sae_weights.safetensors) as our SAE
    with the same forward: "topk" -> TopKSAE, "standard" -> ReLUSAE, "gated" -> GatedSAE, "jumprelu" ->
    JumpReLUSAE (or BatchTopKSAE, for one that `to_sae_lens` wrote from a BatchTopKSAE), "switch" -> SwitchSAE.

    Exact rewrites: an input-centring choice (apply_b_dec_to_input) is folded into the encoder bias, a
    TopK SAE's decoder-norm rescaling into W_enc / W_dec. Refused (InteropError): a TopK SAE whose
    effective encoder bias is nonzero (our TopK SAE has none), activation normalisation, hook_z
    reshaping, other architectures (transcoders, ...)."""
    require_sae_lens()
    sl = path_or_sae if isinstance(path_or_sae, sae_lens.SAE) else _load_sae_lens(path_or_sae)
    cfg = sl.cfg
    arch = cfg.architecture()
    if arch not in _IMPORTERS:
        raise InteropError(f"SAELens architecture {arch!r} has no switch_sae_core equivalent (supported: "
                           f"{', '.join(_IMPORTERS)}): use the SAELens SAE itself, a callable x -> x_hat")
    if cfg.normalize_activations != "none":
        raise InteropError(f"the SAELens SAE normalises its inputs (normalize_activations="
                           f"{cfg.normalize_activations!r}); ours take raw activations: fold it into the weights "
                           "first (sae.fold_activation_norm_scaling_factor / fold_activation_whitening)")
    if cfg.reshape_activations != "none":
        raise InteropError(f"the SAELens SAE reshapes its inputs (reshape_activations={cfg.reshape_activations!r}); "
                           "ours take flat (batch, d_in) vectors: use the SAELens SAE itself")
    with torch.no_grad():
        t = {k: v.detach().to("cpu", torch.float64) for k, v in sl.state_dict().items()}
        dtype = str(sl.dtype).removeprefix("torch.")
        fields, tensors = _IMPORTERS[arch](cfg, t)
        stored = cfg.metadata.get("switch_sae_config") or {}  # written by to_sae_lens: training-only fields
        sae = build_sae(SAEConfig.from_dict({**stored, **fields, "dtype": dtype}))
        sae.load_state_dict({k: v.to(sae.state_dict()[k].dtype) for k, v in tensors.items()})
    hook = getattr(cfg.metadata, "hook_name", None)
    if hook:  # where it was trained, as SAELens records it
        from ..data.lm import hook_layer

        sae.trained_on = {"model": getattr(cfg.metadata, "model_name", None), "hook": hook, "layer": hook_layer(hook)}
    return sae.to(device)


def _load_sae_lens(path: Union[str, Path]):
    path = Path(path)
    for name in (CFG_FILE, WEIGHTS_FILE):
        if not (path / name).is_file():
            raise InteropError(f"{path} is not a SAELens SAE folder: {name} is missing")
    arch = json.loads((path / CFG_FILE).read_text()).get("architecture", "standard")
    if arch not in _IMPORTERS:  # before SAELens, which would fail with a KeyError deep inside
        raise InteropError(f"SAELens architecture {arch!r} in {path / CFG_FILE} has no switch_sae_core "
                           f"equivalent (supported: {', '.join(_IMPORTERS)}): use sae_lens.SAE.load_from_disk")
    try:
        return sae_lens.SAE.load_from_disk(path)
    except Exception as e:  # noqa: BLE001  (one line instead of a traceback from inside SAELens)
        raise InteropError(f"SAELens could not load {path} ({type(e).__name__}: {e}): check the folder") from None


# Each importer: (SAELens cfg, its state dict in float64) -> (the SAEConfig fields SAELens determines,
# our state dict).
def _centring_shift(cfg, t: dict[str, Tensor]) -> Tensor:
    """(d_sae,) b_dec W_enc when SAELens does NOT subtract b_dec from the input (apply_b_dec_to_input
    False), else 0: x W_enc + b = (x - b_dec) W_enc + (b + shift)."""
    return (t["b_dec"] @ t["W_enc"]) if not cfg.apply_b_dec_to_input else torch.zeros_like(t["W_enc"][0])


def _topk_from(cfg, t):
    W_enc, b_enc, W_dec = t["W_enc"], t["b_enc"], t["W_dec"]
    if cfg.rescale_acts_by_decoder_norm:  # TopK over pre * ||W_dec||, decode with W_dec / ||W_dec||: fold it
        norm = W_dec.norm(dim=-1).clamp_min(1e-8)  # SAELens's clamp (sae.py get_W_dec_norm)
        W_enc, b_enc, W_dec = W_enc * norm, b_enc * norm, W_dec / norm[:, None]
    bias = b_enc + _centring_shift(cfg, {**t, "W_enc": W_enc})
    scale = max(1.0, float((t["b_dec"] @ W_enc).abs().max()))
    if float(bias.abs().max()) > 1e-6 * scale:
        raise InteropError(f"the SAELens TopK SAE has a nonzero encoder bias (max |b_enc| = {float(bias.abs().max()):.3g}); "
                           "our TopKSAE has none (Gao et al.): use the SAELens SAE itself, a callable x -> x_hat")
    our = dict(arch="topk", d_in=cfg.d_in, n_features=cfg.d_sae, k=cfg.k)
    return our, dict(W_enc=W_enc.T, W_dec=W_dec, b_pre=t["b_dec"])


def _relu_from(cfg, t):
    our = dict(arch="relu", d_in=cfg.d_in, n_features=cfg.d_sae)
    b_enc = t["b_enc"] - (0 if not cfg.apply_b_dec_to_input else t["b_dec"] @ t["W_enc"])
    return our, dict(W_enc=t["W_enc"].T, b_enc=b_enc, W_dec=t["W_dec"], b_dec=t["b_dec"])


def _gated_from(cfg, t):
    shift = _centring_shift(cfg, t)  # our gated SAE always centres by b_dec
    our = dict(arch="gated", d_in=cfg.d_in, n_features=cfg.d_sae)
    return our, dict(W_enc=t["W_enc"].T, b_gate=t["b_gate"] + shift, r_mag=t["r_mag"],
                     b_mag=t["b_mag"] + t["r_mag"].exp() * shift, W_dec=t["W_dec"], b_dec=t["b_dec"])


def _switch_from(cfg, t):
    G = cfg.n_experts + int(cfg.shared_expert)
    our = dict(arch="switch", d_in=cfg.d_in, n_features=cfg.d_sae // G * cfg.n_experts, k=cfg.k,
               n_experts=cfg.n_experts, top_e=cfg.top_e, shared_expert=cfg.shared_expert,
               scale_by_router_prob=cfg.scale_by_router_prob, global_topk=cfg.global_topk)
    ours = dict(W_enc=t["W_enc"].T.reshape(G, -1, cfg.d_in), W_dec=t["W_dec"].reshape(G, -1, cfg.d_in),
                W_router=t["W_router"], b_router=t["b_router"], b_pre=t["b_dec"])
    if (cfg.metadata.get("switch_sae_config") or {}).get("feature_scaling"):  # exported folded: scale 0
        ours["W_enc_hf_scale"] = torch.zeros(G, cfg.d_in, dtype=t["W_enc"].dtype)
    return our, ours


def _jumprelu_from(cfg, t):
    """-> our JumpReLUSAE (log_threshold = log theta; thresholds <= 0 become the smallest positive float32, which
    changes no latent but one whose pre-activation lies in (0, 1.2e-38]); or back to our BatchTopKSAE when
    `to_sae_lens` wrote it from one (its config rides in the metadata) and theta is one value."""
    b_enc = t["b_enc"] - (t["b_dec"] @ t["W_enc"] if cfg.apply_b_dec_to_input else 0)
    theta = t["threshold"]
    stored = (cfg.metadata.get("switch_sae_config") or {}).get("arch")
    if stored == "batchtopk" and cfg.apply_b_dec_to_input and bool((theta == theta[0]).all()):
        return dict(arch="batchtopk", d_in=cfg.d_in, n_features=cfg.d_sae), dict(
            W_enc=t["W_enc"].T, b_enc=t["b_enc"], W_dec=t["W_dec"], b_dec=t["b_dec"], threshold=theta[0])
    log_theta = theta.clamp_min(torch.finfo(torch.float32).tiny).log()
    return dict(arch="jumprelu", d_in=cfg.d_in, n_features=cfg.d_sae), dict(
        W_enc=t["W_enc"].T, b_enc=b_enc, log_threshold=log_theta, W_dec=t["W_dec"], b_dec=t["b_dec"],
        input_scale=torch.ones((), dtype=torch.float64))


_IMPORTERS: dict[str, Callable] = {"topk": _topk_from, "standard": _relu_from, "gated": _gated_from,
                                   "jumprelu": _jumprelu_from, SWITCH_ARCH: _switch_from}
