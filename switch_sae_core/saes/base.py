"""What every SAE shares: typed outputs, input checks, decoder upkeep, the common inference interface.

Conventions (all architectures):
- decoder weights `W_dec` store one feature direction per ROW along the last dim (`(..., d)`), so
  unit-norm upkeep is `W_dec / W_dec.norm(dim=-1)` whatever the leading shape.
- `forward(x_BD)` returns a NamedTuple whose first field is `x_hat` (B, D).
- `losses(x_BD, out, dead_mask_F=None)` returns a dict of NAMED, already-weighted loss terms; the
  trainer sums them. This is the one place each architecture's objective is written.
- Checkpoint = `sae.safetensors` (weights) + `config.json` (SAEConfig): `serialization.py`. Loading never unpickles.
- The shared loss terms: `losses.py`; the architectures by name: `registry.py`. Their names are importable from here
  as well (`from switch_sae_core.saes.base import load_sae, recon_loss, register`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple, Optional

import torch
from torch import Tensor, nn

from ..config import SAEConfig
from ..errors import SwitchSAEError
from .losses import auxk_loss, recon_loss  # noqa: F401 (re-exported)
from .registry import REGISTRY, build_sae, initial_sae, register  # noqa: F401 (re-exported)
from .serialization import (CONFIG_FILE, FORMAT_UPGRADES, FORMAT_VERSION, WEIGHTS_FILE,  # noqa: F401 (re-exported)
                            CheckpointError, check_weights, load_sae, read_config_dict, read_metadata, save_weights,
                            tensors_sha256, write_config)


class SAEOutput(NamedTuple):
    """Output of TopK, ReLU and Gated SAEs."""

    x_hat: Tensor
    """(B, D) reconstruction."""
    latent_acts: Tensor
    """(B, K) values of the active latents (TopK), or (B, M) dense latents (ReLU, Gated)."""
    latent_indices: Optional[Tensor]
    """(B, K) global feature ids of `latent_acts` (TopK); None when latents are dense."""
    pre_acts: Optional[Tensor] = None
    """(B, M) pre-activations when the architecture has them anyway (needed by AuxK / gated aux)."""


class SwitchOutput(NamedTuple):
    """Output of the Switch SAE."""

    x_hat: Tensor
    """(B, D) reconstruction `p_i*(x) E_i*(x - b_pre) + b_pre`."""
    latent_acts: Tensor
    """(B, K_total) values of the active latents over all experts the input used."""
    latent_indices: Tensor
    """(B, K_total) global feature ids (expert e's features are e*M/N ... (e+1)*M/N - 1)."""
    expert_indices: Tensor
    """(B, top_e) experts each input was routed to, best first."""
    router_probs: Tensor
    """(B, N) softmax router distribution p(x)."""
    aux_loss: Tensor
    """() load-balancing loss N * sum_i f_i P_i (1 for a uniform router), unweighted."""
    pre_acts: Optional[Tensor] = None
    """(B, E * M/N) detached pre-activations of the experts each input used (routed experts in
    `expert_indices` order, then the shared expert); only kept when AuxK is on (`auxk_coeff > 0`)."""


class SAEInputError(SwitchSAEError, ValueError):
    """An input batch is unusable (wrong width, dtype, NaN/Inf); the message says what is wrong."""


class BaseSAE(nn.Module):
    cfg: SAEConfig
    unit_norm_decoder: bool = True  # False for the ReLU SAE (its L1 is weighted by decoder norms)
    # where the SAE was trained: {"model", "hook", "layer", "dataset", "data_content"} (saved with the weights and
    # checked by `switch-sae evaluate`; SAELens keeps model_name / hook_name for the same reason); None = unknown
    trained_on: Optional[dict[str, Any]] = None

    def __init__(self, cfg: SAEConfig):
        super().__init__()
        self.cfg = cfg

    @property
    def n_latents(self) -> int:
        """Number of feature ids (size of a dead-feature mask): n_features, plus M/N for a Switch SAE
        with a shared expert."""
        return self.cfg.n_features

    @property
    def param_dtype(self) -> torch.dtype:
        return getattr(torch, self.cfg.dtype)

    # --- input checks -----------------------------------------------------------------------------
    def check_input(self, x_BD: Tensor) -> Tensor:
        """Clear errors instead of deep torch stack traces or silently wrong numbers.

        Returns the batch cast to the parameter dtype: floating inputs of another precision (an fp16
        activation cache, a float64 array) are converted, integer or bool inputs are refused.
        """
        if not isinstance(x_BD, Tensor):
            raise SAEInputError(f"expected a torch.Tensor of shape (batch, {self.cfg.d_in}), got {type(x_BD).__name__}")
        if x_BD.ndim != 2 or x_BD.shape[1] != self.cfg.d_in:
            raise SAEInputError(
                f"expected activations of shape (batch, {self.cfg.d_in}), got {tuple(x_BD.shape)}: "
                "the SAE's d_in must match the hooked site's width (flatten (batch, seq, d) to (batch*seq, d))"
            )
        if x_BD.shape[0] == 0:
            raise SAEInputError("got an empty batch (0 activation vectors): pass at least one row")
        if not x_BD.is_floating_point():
            raise SAEInputError(
                f"expected floating-point activations, got dtype {x_BD.dtype}: pass model activations "
                f"(e.g. x.to({self.param_dtype})), not token ids or masks"
            )
        device = self.W_dec.device
        if x_BD.device != device:
            raise SAEInputError(f"activations are on {x_BD.device} but the SAE is on {device}: move one with .to()")
        # a finite sum proves every entry finite (NaN and inf propagate) in one pass without a (B, D) mask;
        # a non-finite sum (NaN, inf, or an overflow of finite values) takes the exact test
        if not torch.isfinite(x_BD.sum()) and not torch.isfinite(x_BD).all():
            n_bad = int((~torch.isfinite(x_BD)).any(dim=1).sum())
            raise SAEInputError(
                f"{n_bad} of {x_BD.shape[0]} activation vectors contain NaN or Inf: drop them or fix the "
                "activation source (an fp16 overflow?)"
            )
        return x_BD.to(self.W_dec.dtype)

    # --- decoder upkeep (SPEC: unit-norm feature directions = the rows here; parallel gradient removed) ---
    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Decoder rows to unit norm: one pass over W_dec (norm and division per cache-sized block)."""
        if self.unit_norm_decoder:
            for w in _row_blocks(self.W_dec):
                _unit_rows_(w)

    @torch.no_grad()
    def remove_parallel_grads(self) -> None:
        """Project out of each decoder row's gradient its component along that (unit) row."""
        self.upkeep_gradients(0.0)

    @torch.no_grad()
    def upkeep_gradients(self, max_norm: float = 0.0, grad_norm: Optional[Callable[[], Tensor]] = None,
                         scale: bool = True) -> Tensor:
        """The step's gradient upkeep, fused: remove from each decoder row's gradient its component along
        that (unit) row, `g -= (g . w) w` (SPEC), then clip every gradient to global norm `max_norm`
        (torch's `clip_grad_norm_` rule: scale by min(1, max_norm / (norm + 1e-6)); <= 0: no clipping).

        One pass over the decoder (per cache-sized block of rows: the row dot products, the projection
        and the block's squared norm), one norm pass over each other gradient, and a scaling pass only
        when the norm exceeds max_norm. `grad_norm()`: the global norm when no process sees all
        gradients (expert parallelism), called after the projection. Returns the norm () clipped by
        (0 when max_norm <= 0 and grad_norm is None). scale=False: the norm only, the gradients are not
        scaled (`optim.fused_step` scales them inside its Adam pass).
        """
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        g_dec = self.W_dec.grad if self.unit_norm_decoder else None
        sq = torch.zeros((), dtype=torch.float64, device=self.W_dec.device)
        if g_dec is not None:
            block_norms = []  # float32 per block (as clip_grad_norm_ per tensor), summed in float64 below
            for g, w in zip(_row_blocks(g_dec, UPKEEP_BLOCK_BYTES), _row_blocks(self.W_dec, UPKEEP_BLOCK_BYTES)):
                g.addcmul_(w, torch.linalg.vecdot(g, w).unsqueeze(-1), value=-1)
                if max_norm > 0 and grad_norm is None:
                    block_norms.append(torch.linalg.vector_norm(g))
            if block_norms:
                sq = torch.stack(block_norms).double().square().sum()
        if max_norm <= 0 or not grads:
            return grad_norm() if grad_norm is not None else sq
        if grad_norm is not None:
            total = grad_norm()
        else:
            others = [g for g in grads if g is not g_dec]
            if others:
                sq += torch.stack([n.double() for n in torch._foreach_norm(others)]).square().sum()
            total = sq.sqrt()
        coef = max_norm / (float(total) + 1e-6)
        if coef < 1 and scale:
            torch._foreach_mul_(grads, coef)
        return total

    # --- analytic cost -----------------------------------------------------------------------------
    @property
    def n_params(self) -> int:
        """Number of parameters; subclasses give the analytic formula (tests compare with a count)."""
        return sum(p.numel() for p in self.parameters())

    def flops_per_input(self) -> dict[str, int]:
        """Multiply-adds x2 per input: {'router', 'encoder', 'decoder', 'total'}."""
        raise NotImplementedError

    def decoder_directions(self) -> Tensor:
        """(M, D) every feature's decoder direction, in global feature-id order."""
        return self.W_dec.reshape(-1, self.cfg.d_in)

    # --- the common inference interface: dense latents, the same for every architecture -----------------
    @property
    def W_dec_flat(self) -> Tensor:
        """(n_latents, D) the decoder as one matrix, row i = feature i's direction (a view of W_dec, which is
        (N [+1], M/N, D) for a Switch SAE): SAELens's `W_dec` layout, so `decode(z) = z @ W_dec_flat + b`."""
        return self.decoder_directions()

    @property
    def decoder_bias(self) -> Tensor:
        """(D,) the bias `decode` adds: b_pre (TopK, Switch: also subtracted from the input) or b_dec
        (ReLU, Gated)."""
        for name in ("b_dec", "b_pre"):
            if hasattr(self, name):
                return getattr(self, name)
        raise NotImplementedError(f"{type(self).__name__} has neither b_dec nor b_pre: override decoder_bias")

    def encode(self, x_BD: Tensor) -> Tensor:
        """(B, D) activations -> (B, n_latents) DENSE latents z, zero where a feature is off, such that
        `decode(encode(x))` equals `forward(x).x_hat` (the latents the decoder really multiplies).

        Same signature for every architecture, and SAELens's convention (`SAE.encode` / `SAE.decode`,
        decode linear: z @ W_dec + b_dec), so a SAELens evaluator takes our SAEs as they are. For a Switch
        SAE, z holds the latents of the expert(s) each input was routed to at those experts' slices, scaled
        by the router gate (see `SwitchSAE.dense_latents`). Differentiable. Builds a (B, n_latents) tensor:
        for evaluation and analysis; training uses `forward`, which never does.
        Raises SAEInputError on a bad batch (as `forward`)."""
        return self.dense_latents(self(x_BD))

    def decode(self, latents_BM: Tensor) -> Tensor:
        """(B, n_latents) dense latents (as `encode` returns them) -> (B, D) reconstruction
        `latents @ W_dec_flat + decoder_bias`. Raises SAEInputError on a wrong width."""
        if latents_BM.ndim != 2 or latents_BM.shape[1] != self.n_latents:
            raise SAEInputError(f"expected latents of shape (batch, {self.n_latents}) (as encode returns them), "
                                f"got {tuple(latents_BM.shape)}")
        return latents_BM.to(self.W_dec.dtype) @ self.W_dec_flat + self.decoder_bias

    def dense_latents(self, out: Any) -> Tensor:
        """(B, n_latents) the latents of a forward output, dense: `out.latent_acts` as they are when dense
        (ReLU, Gated), else scattered to `out.latent_indices` (TopK)."""
        if out.latent_indices is None:
            return out.latent_acts
        acts_BK = out.latent_acts
        return acts_BK.new_zeros(acts_BK.shape[0], self.n_latents).scatter(1, out.latent_indices, acts_BK)

    def encoder_directions(self) -> Tensor:
        """(M, D) every feature's encoder row, in global feature-id order."""
        return self.W_enc.reshape(-1, self.cfg.d_in)

    # --- checkpoint format ------------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        return save_weights(self, self.cfg, directory, trained_on=self.trained_on)


UPKEEP_BLOCK_BYTES = 1 << 20
"""Block of decoder-gradient rows `upkeep_gradients` projects at a time (1 MiB: measured at d = 768, M = 24576,
one thread, 17 ms for the projection and norm pass, against 21 ms with 256 KiB blocks (more Python per row)
and 25 ms when each block's norm was taken in float64 (a converted copy of the block))."""


def _row_blocks(W: Tensor, block_bytes: int = 1 << 18) -> Iterator[Tensor]:
    """Views of W (..., D) as blocks of whole rows of about `block_bytes` (256 KiB: a block of a
    gradient and of its weights stay in a CPU core's cache between two operations); on an
    accelerator the whole matrix at once."""
    W_RD = W.view(-1, W.shape[-1])
    if W.device.type != "cpu":
        yield W_RD
        return
    rows = max(1, block_bytes // (W.shape[-1] * W.element_size()))
    yield from W_RD.split(rows)


def _unit_rows_(w_RD: Tensor) -> None:
    """Each row of a block to unit norm, in place (the renormalisation of decoder rows)."""
    w_RD.div_(w_RD.norm(dim=-1, keepdim=True).clamp_min(1e-12))


def dense_flops(cfg: SAEConfig) -> dict[str, int]:
    """FLOPs per input of an SAE with a dense encoder and decoder (ReLU, Gated, JumpReLU): 2 M D each, no router."""
    M, D = cfg.n_features, cfg.d_in
    return {"router": 0, "encoder": 2 * M * D, "decoder": 2 * M * D, "total": 4 * M * D}
