"""Downstream evaluation: the only place an SAE meets the language model.

For a fixed held-out token set (`ActivationStore.eval_tokens`, the same for every SAE of a comparison):

- CE_clean: next-token cross-entropy of the unmodified model;
- CE_sae:   the SAE's reconstruction spliced in at the hook;
- CE_zero:  zeros spliced in at the hook;
- loss recovered = (CE_zero - CE_sae) / (CE_zero - CE_clean)   (1 = perfect, 0 = as bad as zeros);
- KL(clean || spliced) of the next-token distributions.

CE and KL are averaged over every next-token prediction of every context (positions 0..S-2).

Splicing: the SAE sees the activation at every position except, when `keep_special_clean` (the
default, matching `DataConfig.drop_special_tokens`), the BOS/special-token positions: those keep their
clean activation in BOTH the SAE run and the zero-ablation run. The SAE never saw them in training (the
BOS residual of a Llama-like model is huge and feature-less), and patching them would measure the
model's reaction to a broken attention sink rather than the SAE.

`prepare_reference` computes everything that depends only on the model and the tokens (clean CE,
zero-ablation CE, the clean activations at the hook) ONCE; `evaluate_saes` then evaluates any number of
SAEs against it, sharing the clean forward pass of each batch. For a `blocks.{L}.hook_resid_post` hook
only the blocks after L are re-run for each SAE (from the cached residual stream); other hooks re-run
the whole model with a replacing hook.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Mapping, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from .data import text
from .data.lm import LanguageModel, hook_layer

Reconstructor = Union[nn.Module, Callable[[Tensor], Tensor]]


@dataclasses.dataclass(frozen=True)
class CEResult:
    """Downstream quality of one SAE on the reference token set."""

    ce_clean: float  # nats per token, unmodified model
    ce_sae: float  # nats per token, SAE reconstruction spliced in at the hook
    ce_zero: float  # nats per token, zeros spliced in at the hook
    loss_recovered: float  # (ce_zero - ce_sae) / (ce_zero - ce_clean)
    kl: float  # mean KL(clean || spliced) of the next-token distribution, nats
    n_tokens: int  # next-token predictions averaged over

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class CEReference:
    """The model's side of an evaluation on one token set, computed once and reused for every SAE."""

    tokens: Tensor  # (C, S) int64 held-out contexts
    hook: str
    splice_mask: Tensor  # (C, S) bool: True where the SAE output (or zeros) replaces the activation
    acts: Tensor  # (C, S, D) clean activations at the hook (the SAE's inputs)
    ce_clean: float
    ce_zero: float
    batch_size: int

    @property
    def n_tokens(self) -> int:
        return self.tokens.shape[0] * (self.tokens.shape[1] - 1)


def loss_recovered(ce_clean: float, ce_zero: float, ce_sae: float) -> float:
    """Fraction of CE loss recovered (SPEC): 1 for a perfect reconstruction, 0 for zero-ablation."""
    gap = ce_zero - ce_clean
    return (ce_zero - ce_sae) / gap if gap != 0 else math.nan


def _next_token_ce_sum(logits_BSV: Tensor, tokens_BS: Tensor) -> Tensor:
    """Sum of the next-token cross-entropies of positions 0..S-2."""
    return F.cross_entropy(logits_BSV[:, :-1].flatten(0, 1), tokens_BS[:, 1:].flatten().to(logits_BSV.device), reduction="sum")


def _kl_sum(clean_logits_BSV: Tensor, logits_BSV: Tensor) -> Tensor:
    """Sum over positions 0..S-2 of KL(clean || other) of the next-token distributions."""
    logp_clean = clean_logits_BSV[:, :-1].log_softmax(-1)
    logp = logits_BSV[:, :-1].log_softmax(-1)
    return (logp_clean.exp() * (logp_clean - logp)).sum()


def _fast_layer(model: LanguageModel, hook: str) -> Optional[int]:
    """Block L when `hook` is blocks.{L}.hook_resid_post (logits can be computed from it directly)."""
    layer = hook_layer(hook)
    return layer if layer is not None and hook == f"blocks.{layer}.hook_resid_post" else None


def _splice(acts_BSD: Tensor, new_BSD: Tensor, mask_BS: Tensor) -> Tensor:
    return torch.where(mask_BS.unsqueeze(-1).to(acts_BSD.device), new_BSD.to(acts_BSD.dtype), acts_BSD)


def _logits_with(model: LanguageModel, tokens_BS: Tensor, hook: str, acts_BSD: Tensor) -> Tensor:
    """Logits of a run whose activation at `hook` is `acts_BSD`."""
    layer = _fast_layer(model, hook)
    if layer is not None:
        return model.logits_from_resid(acts_BSD, layer)
    return model.logits_with_replacement(tokens_BS, hook, lambda _: acts_BSD)


@torch.no_grad()
def prepare_reference(
    model: LanguageModel,
    tokens: Tensor,
    hook: str,
    keep_special_clean: bool = True,
    batch_size: int = 8,
    progress: bool = True,
) -> CEReference:
    """Clean CE, zero-ablation CE and the clean activations at `hook` on `tokens` (C, S)."""
    model.check_hook(hook)
    tokens = tokens.long().cpu()
    if keep_special_clean:
        splice_mask = ~text.special_mask(tokens, model.tokenizer)
    else:
        splice_mask = torch.ones_like(tokens, dtype=torch.bool)
    acts, ce_clean, ce_zero = [], 0.0, 0.0
    for start in tqdm(range(0, len(tokens), batch_size), desc="clean + zero-ablated CE", disable=not progress):
        toks_BS, mask_BS = tokens[start : start + batch_size], splice_mask[start : start + batch_size]
        acts_BSD = model.activations(toks_BS, hook)
        clean = _logits_with(model, toks_BS, hook, acts_BSD)
        zero = _logits_with(model, toks_BS, hook, _splice(acts_BSD, torch.zeros_like(acts_BSD), mask_BS))
        ce_clean += _next_token_ce_sum(clean, toks_BS).item()
        ce_zero += _next_token_ce_sum(zero, toks_BS).item()
        acts.append(acts_BSD.cpu())
    n = tokens.shape[0] * (tokens.shape[1] - 1)
    return CEReference(tokens, hook, splice_mask, torch.cat(acts), ce_clean / n, ce_zero / n, batch_size)


def _reconstruct(sae: Reconstructor, x_ND: Tensor) -> Tensor:
    """x_hat of an SAE module (its forward's `.x_hat`, or a tensor) or of a plain function."""
    was_training = isinstance(sae, nn.Module) and sae.training
    if isinstance(sae, nn.Module):
        param = next(sae.parameters(), None)
        if param is not None:
            x_ND = x_ND.to(param.device, param.dtype)
        sae.eval()  # the per-input forward (a BatchTopK SAE's threshold, not its batch-level TopK)
    try:
        out = sae(x_ND)
    finally:
        if was_training:
            sae.train()
    return out if isinstance(out, Tensor) else out.x_hat


@torch.no_grad()
def evaluate_saes(
    model: LanguageModel, saes: Mapping[str, Reconstructor], reference: CEReference, progress: bool = True
) -> dict[str, CEResult]:
    """CE with each SAE spliced in, loss recovered and KL, for every SAE on the reference tokens."""
    tokens, hook, bs = reference.tokens, reference.hook, reference.batch_size
    ce = {name: 0.0 for name in saes}
    kl = {name: 0.0 for name in saes}
    for start in tqdm(range(0, len(tokens), bs), desc=f"CE with {len(saes)} SAE(s) spliced", disable=not progress):
        toks_BS = tokens[start : start + bs]
        mask_BS = reference.splice_mask[start : start + bs]
        acts_BSD = reference.acts[start : start + bs].to(model.device)
        clean = _logits_with(model, toks_BS, hook, acts_BSD)
        for name, sae in saes.items():
            x_hat_BSD = _reconstruct(sae, acts_BSD.flatten(0, 1)).reshape(acts_BSD.shape).to(model.device)
            logits = _logits_with(model, toks_BS, hook, _splice(acts_BSD, x_hat_BSD, mask_BS))
            ce[name] += _next_token_ce_sum(logits, toks_BS).item()
            kl[name] += _kl_sum(clean, logits).item()
    n = reference.n_tokens
    return {
        name: CEResult(
            ce_clean=reference.ce_clean,
            ce_sae=ce[name] / n,
            ce_zero=reference.ce_zero,
            loss_recovered=loss_recovered(reference.ce_clean, reference.ce_zero, ce[name] / n),
            kl=kl[name] / n,
            n_tokens=n,
        )
        for name in saes
    }


def evaluate_sae(model: LanguageModel, sae: Reconstructor, reference: CEReference, progress: bool = True) -> CEResult:
    """`evaluate_saes` for one SAE."""
    return evaluate_saes(model, {"sae": sae}, reference, progress)["sae"]


def make_lm_evaluator(store, data_cfg=None, model: Optional[LanguageModel] = None, progress: bool = True):
    """sae -> CEResult.to_dict() on the store's fixed held-out tokens. The model and the reference
    (clean and zero-ablated CE) are loaded/computed once, on the first call, and shared by every SAE."""
    from .data.lm import load_model

    data_cfg = data_cfg or store.config
    state: dict = {}

    def evaluate(sae: Reconstructor) -> dict:
        if "reference" not in state:
            lm = model or load_model(data_cfg.model, device=data_cfg.device)
            state["model"] = lm
            state["reference"] = prepare_reference(
                lm, store.eval_tokens, data_cfg.hook_name, keep_special_clean=data_cfg.drop_special_tokens,
                batch_size=data_cfg.model_batch_size, progress=progress,
            )
        return evaluate_sae(state["model"], sae, state["reference"], progress=progress).to_dict()

    return evaluate
