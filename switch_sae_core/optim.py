"""The step's passes over the parameters, fused: decoder-gradient projection, clipping, Adam, renormalisation.

    norm = fused_step(sae, optimizer, max_norm)    # = upkeep_gradients(max_norm); optimizer.step(); normalize_decoder()

The multi-pass recipe streams every parameter-sized array through memory once per operation: the
projection of the decoder gradients, the clipping scale, Adam (gradient, two moments, weights) and the
decoder renormalisation. Here:

1. a pre-pass (`BaseSAE.upkeep_gradients(..., scale=False)`): the decoder rows' projection `g -= (g . w) w`
   and every gradient's squared norm, per cache-sized block of rows; the clipping factor needs the
   norm of ALL gradients, so it cannot be folded into the pass that uses it;
2. torch's own fused Adam kernel (`torch._fused_adam_`, the kernel of `torch.optim.Adam(fused=True)`: same
   update, same bias correction, same state), after the clipping scale (only when the norm exceeds
   max_norm): one multiply and one kernel call for all parameters but the decoder, whose rows are scaled,
   updated and renormalised per cache-sized block, while the block is still in cache.

On CPU, for float32 tensors with torch on one thread (the trainer's default), the same passes run in the C++
kernels of `kernels/` (compiled on first use; the torch path above when they are switched off with
SWITCH_SAE_KERNELS=0 or cannot be built): one pass over the decoder gradient (projection and its squared norm)
and, per parameter, one call that streams each row once for the clipping scale, Adam and the decoder row's
renormalisation. Adam there is torch's CPU kernel operation for operation; the reductions (row dot products,
norms) accumulate in float64, so results differ from the torch path in the last bits (tests/test_kernels.py).

Semantics are exactly the multi-pass recipe's (tests/test_optim.py compares them step by step): the
clipping rule of torch's `clip_grad_norm_` (scale by max_norm / (norm + 1e-6) when below 1), Adam
(Kingma & Ba 2015, torch's implementation and state layout, so checkpoints are the same), unit-norm
decoder rows (the SPEC). An optimizer other than `torch.optim.Adam(fused=True)` without amsgrad, capturable,
differentiable or decoupled weight decay takes the multi-pass recipe.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from . import kernels
from .saes.base import BaseSAE, _row_blocks, _unit_rows_

FUSED_BLOCK_BYTES = 1 << 20
"""Bytes of one parameter block (1 MiB; the block of the weights, gradient and both Adam moments stay in
cache between the Adam kernel and the renormalisation). Measured at d = 768 on the shared 2-core machine
(one thread, CPU time, load 5-6): 64-256 KiB blocks were 5-45% slower than the multi-pass recipe (a few
microseconds of Python and dispatch per block and op), 1-2 MiB within the noise (+-10%) of it. So on that
CPU this pass saves no measurable time over the multi-pass recipe (benchmarks/README.md, bench_floor.py's
"trainer multi-pass" rows); the saving it is built for (one read of each array instead of one per pass)
needs a kernel that does the whole row update at once: `kernels/`, the default on one CPU thread."""


def fused_step(sae: BaseSAE, optimizer: torch.optim.Optimizer, max_norm: float,
               grad_norm: Optional[Callable[[], Tensor]] = None) -> Tensor:
    """Projection, clipping to global norm `max_norm` (<= 0: none), `optimizer.step()` and decoder
    renormalisation, in a norm pre-pass and one blocked pass per parameter (module docstring). Returns the
    gradient norm clipped by (as `BaseSAE.upkeep_gradients`). `grad_norm()`: the global norm when no process
    sees all gradients. Falls back to the three separate calls for an optimizer it does not support."""
    if not supports_fused_step(optimizer):
        total = sae.upkeep_gradients(max_norm, grad_norm)
        optimizer.step()
        sae.normalize_decoder()
        return total
    lib = _kernels_for(sae, optimizer)
    if lib is not None:
        return _kernel_step(lib, sae, optimizer, max_norm, grad_norm)
    with torch.no_grad():
        total = sae.upkeep_gradients(max_norm, grad_norm, scale=False)
        coef = max_norm / (float(total) + 1e-6) if max_norm > 0 else 1.0
        decoder = sae.W_dec if sae.unit_norm_decoder else None
        for group in optimizer.param_groups:
            _adam_group(optimizer, group, coef if coef < 1 else None, decoder)
        if decoder is not None and decoder.grad is None:  # untouched by this step: still renormalised
            sae.normalize_decoder()
    return total


def supports_fused_step(optimizer: torch.optim.Optimizer) -> bool:
    """torch.optim.Adam with fused=True and none of the options this pass does not implement."""
    return type(optimizer) is torch.optim.Adam and all(
        g.get("fused") and not (g.get("amsgrad") or g.get("capturable") or g.get("differentiable")
                                or g.get("decoupled_weight_decay")) for g in optimizer.param_groups)


def _adam_state(optimizer: torch.optim.Adam, p: Tensor) -> dict:
    """The parameter's Adam state, created as `torch.optim.Adam(fused=True)` creates it on its first step."""
    state = optimizer.state[p]
    if not state:
        state["step"] = torch.tensor(0.0, dtype=torch.float32, device=p.device)  # fused Adam: float32, on p's device
        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    return state


def _adam_group(optimizer: torch.optim.Adam, group: dict, coef: Optional[float], decoder: Optional[Tensor]) -> None:
    beta1, beta2 = (float(b) for b in group["betas"])
    hyper = dict(lr=float(group["lr"]), beta1=beta1, beta2=beta2, weight_decay=group["weight_decay"],
                 eps=group["eps"], amsgrad=False, maximize=group["maximize"])
    whole = ([], [], [], [], [])  # parameters updated in one kernel call: all but the decoder
    for p in group["params"]:
        if p.grad is None:
            continue
        if p.grad.is_sparse:
            raise RuntimeError("Adam does not support sparse gradients")
        state = _adam_state(optimizer, p)
        state["step"] += 1
        if p is not decoder:
            for lst, t in zip(whole, (p, p.grad, state["exp_avg"], state["exp_avg_sq"], state["step"])):
                lst.append(t)
            continue
        blocks = zip(*(_row_blocks(t, FUSED_BLOCK_BYTES) for t in (p, p.grad, state["exp_avg"], state["exp_avg_sq"])))
        for w, g, m, v in blocks:  # the decoder's rows renormalised while the block is in cache
            if coef is not None:
                g.mul_(coef)
            torch._fused_adam_([w], [g], [m], [v], [], [state["step"]], **hyper)
            _unit_rows_(w)
    if whole[0]:
        if coef is not None:  # one multiply pass (exactly clip_grad_norm_'s), then one kernel call: less Python than blocks
            torch._foreach_mul_(whole[1], coef)
        torch._fused_adam_(*whole[:4], [], whole[4], **hyper)


# --- the C++ kernels' path (kernels/cpu_kernels.cpp): the same passes, each row block streamed once ----------------
def _kernels_for(sae: BaseSAE, optimizer: torch.optim.Adam):
    """The compiled kernels when every parameter, gradient and Adam moment the step touches is a contiguous
    float32 CPU tensor and torch runs on one thread (kernels.eligible); else None (the torch path)."""
    tensors = [p for p in sae.parameters()] + [p.grad for p in sae.parameters()]
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            tensors += [p, p.grad, state.get("exp_avg"), state.get("exp_avg_sq")]
    if not kernels.eligible(*tensors):
        return None
    return kernels.cpu_kernels()  # compiled on the first call of the process (or loaded from the cache)


def _kernel_step(lib, sae: BaseSAE, optimizer: torch.optim.Adam, max_norm: float,
                 grad_norm: Optional[Callable[[], Tensor]]) -> Tensor:
    """`fused_step` in two passes over the decoder gradient and one over everything else: (1) per decoder row,
    the projection and its squared norm (the clip needs the global norm before any update); the squared
    norms of the other gradients; (2) per parameter, one kernel call: the clipping scale, Adam and, for the
    decoder, each row's renormalisation while the row is in cache. Same rule and order of operations as
    `upkeep_gradients` + the blocked Adam pass (tests/test_kernels.py compares them)."""
    with torch.no_grad():
        decoder = sae.W_dec if sae.unit_norm_decoder else None
        g_dec = decoder.grad if decoder is not None else None
        own_norm = max_norm > 0 and grad_norm is None
        sq = kernels.project_rows_(lib, g_dec, decoder, own_norm) if g_dec is not None else 0.0
        grads = [p.grad for p in sae.parameters() if p.grad is not None]
        if max_norm <= 0 or not grads:
            total = grad_norm() if grad_norm is not None else torch.zeros((), dtype=torch.float64)
        elif grad_norm is not None:
            total = grad_norm()
        else:
            sq += sum(kernels.sumsq(lib, g) for g in grads if g is not g_dec)
            total = torch.tensor(sq, dtype=torch.float64).sqrt()
        coef = max_norm / (float(total) + 1e-6) if max_norm > 0 else 1.0
        for group in optimizer.param_groups:
            beta1, beta2 = (float(b) for b in group["betas"])
            hyper = dict(lr=float(group["lr"]), beta1=beta1, beta2=beta2, weight_decay=float(group["weight_decay"]),
                         eps=float(group["eps"]), maximize=bool(group["maximize"]), coef=coef if coef < 1 else None)
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = _adam_state(optimizer, p)
                state["step"] += 1
                kernels.adam_(lib, p, p.grad, state["exp_avg"], state["exp_avg_sq"], float(state["step"]),
                              unit_rows=p is decoder, **hyper)
        if decoder is not None and decoder.grad is None:  # untouched by this step: still renormalised
            sae.normalize_decoder()
    return total
