"""Switch SAE (Mudide et al. 2024) with real routing: no input ever meets an expert it was not sent to.

    p(x)   = softmax(W_router (x - b_router))                  # (N,) router distribution
    E_i(x) = W_dec^i ReLU(TopK(W_enc^i x))                     # expert i, no bias inside
    x_hat  = sum_{i in top_e(p(x))} g_i(x) E_i(x - b_pre) [+ E_shared(x - b_pre)] + b_pre

with gate g_i = p_i(x) (the paper) or 1 ("Heaviside" variant, `scale_by_router_prob=False`).

Computation (`forward` = `route` + `dispatch` + `experts_forward` + combine):
1. `route`: router probabilities, top-e experts and their gates per input.
2. `dispatch`: the (input, expert) assignments sorted by expert (argsort of expert ids, group sizes by
   bincount), so each expert's inputs are contiguous.
3. `experts_forward`: ONE grouped matmul (`ops.grouped_matmul`: (T, D) x (G, M/N, D)) gives each row
   the M/N pre-activations of its own expert only, TopK inside the row (`ops.topk_rows`), the k winners re-attached to
   autograd and decoded sparsely (`ops.sparse_experts`: its backward builds dW_enc and dW_dec with one
   sparse x dense matmul each, touching only the k winners of each row). Works on any stack
   of experts (e.g. one rank's shard in expert parallelism). No (B, M) tensor, forward or backward.
4. combine: gate-scaled expert outputs summed back into input order with one `index_add`.

Scale SAE options (Xu et al. 2025, "Beyond Redundancy: Diverse and Specialized Multi-Expert Sparse
Autoencoder", arXiv 2511.05745; no public code): `top_e >= 2` with

- `global_topk=True` ("multiple expert activation" + "global Top-K"): each input is routed to its top_e experts,
  whose M/N pre-activations each are concatenated, and ONE TopK of k runs over those top_e * M/N values,
  instead of k per expert: L0 = k, whatever top_e. The competition is on the gate-scaled pre-activations
  g_i(x) pre_j(x), which are the latents the decoder multiplies (ReLU(g pre) = g ReLU(pre) as g > 0):

      z = ReLU(TopK_k( concat_{i in top_e(p(x))} g_i(x) pre^i(x) )),   pre^i(x) = W_enc^i (x - b_pre)
      x_hat = sum_j z_j W_dec[j] + b_pre

  Only the routed experts' encoders run (grouped matmul, as above); the k winners are re-attached to autograd
  (`ops.gathered_preacts`) and decoded sparsely, so no (B, M) tensor exists here either. A shared expert, if
  any, joins the competition with gate 1.
- `feature_scaling=True` ("feature scaling", a high-pass filter on the encoder): each expert's encoder rows are
  split into their mean over the expert's M/N features (the low-frequency / "DC" part) and the deviation from
  it (the high-frequency part), and the deviation is amplified by a learned per-expert, per-dimension factor:

      W_enc_eff^i = W_enc^i + omega^i * (W_enc^i - mean_j W_enc^i[j])        omega (G, D), initialised to 0

  The form (x + lambda_h * HC, channel-wise lambda_h initialised at 0) is FeatScale's (Wang et al. 2022,
  "Anti-oversmoothing in deep vision transformers via the Fourier domain analysis", the senior author's
  earlier paper, which the Scale SAE paper's "high-frequency scaling" follows). `encoder_directions()` and the
  SAELens export give W_enc_eff. Forming it costs ~4 M D per BATCH (not per input; fold it once for inference).

What could not be determined from the paper's public text (the html body is not readable here; the abstract, the
Figure 1 caption and four ICLR reviews were): whether the global TopK ranks gate-scaled or raw pre-activations
(here: gate-scaled, the values decoded), whether the low-frequency part is scaled too (FeatScale has a
lambda_d; here: not, since only high-frequency amplification is described), the shape and initialisation of the
scale (here: FeatScale's channel-wise, zero), and whether the decoder is also filtered (here: not). The
paper's load-balancing loss and coefficients are not known either: the Switch SAE's (alpha * d * N sum f_i P_i)
is used.

Shared expert (`shared_expert=True`, not in the paper): one more expert of M/N features that every
input uses, with gate 1, not routed and not in the load-balancing loss. It is stored as expert N of
`W_enc`/`W_dec`, which then have N + 1 experts; its features get the global ids M ... M + M/N - 1
after the routed ones (`n_latents` = M + M/N). `n_params`, `flops_per_input` and
`decoder_directions` all include it.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import metrics
from ..config import SAEConfig
from ..ops import gathered_preacts, grouped_matmul, sparse_decode, sparse_experts, topk_rows
from .base import BaseSAE, SwitchOutput, auxk_loss, recon_loss, register
from .topk import unit_rows


class ExpertsOutput(NamedTuple):
    """What a stack of G experts returns for T group-sorted rows."""

    out_TD: Tensor
    """(T, D) each row's expert reconstruction W_dec^g ReLU(TopK(W_enc^g x)), without gate or bias."""
    acts_TK: Tensor
    """(T, K) values of the k active latents (after ReLU)."""
    ids_TK: Tensor
    """(T, K) feature ids within the given stack: g * (M/N) + position in expert g."""
    pre_TW: Tensor
    """(T, M/N) detached pre-activations of each row's own expert (all that is ever computed)."""


def experts_forward(x_TD: Tensor, group_sizes_G: Tensor, W_enc_GWD: Tensor, W_dec_GWD: Tensor, k: int,
                    fast: bool = True) -> ExpertsOutput:
    """Run a group-sorted batch through a stack of experts.

    x_TD: (T, D) encoder inputs (x - b_pre), rows of expert 0 first, then expert 1, ...
    group_sizes_G: (G,) rows per expert (zeros allowed); W_enc_GWD, W_dec_GWD: (G, W, D).
    fast: False = the reference paths (a loop over experts, embedding_bag backwards); see `ops`.
    """
    G, W, D = W_enc_GWD.shape
    with torch.no_grad():
        pre_TW = grouped_matmul(x_TD.detach(), W_enc_GWD.detach(), group_sizes_G, fast=fast)
        vals_TK, pos_TK = topk_rows(pre_TW, k, fast)
        group_T = torch.repeat_interleave(torch.arange(G, device=x_TD.device), group_sizes_G.to(x_TD.device),
                                          output_size=x_TD.shape[0])
        ids_TK = group_T[:, None] * W + pos_TK
    out_TD, acts_TK = sparse_experts(x_TD, W_enc_GWD.reshape(G * W, D), W_dec_GWD.reshape(G * W, D), ids_TK,
                                     vals_TK, fast)
    return ExpertsOutput(out_TD, acts_TK, ids_TK, pre_TW)


class Dispatch(NamedTuple):
    """(input, expert) assignments sorted by expert."""

    order_T: Tensor
    """(T,) sorted position -> flat assignment index (input b, slot e) = b * E + e."""
    input_T: Tensor
    """(T,) sorted position -> input row b."""
    group_sizes_G: Tensor
    """(G,) assignments per expert."""


def dispatch(experts_BE: Tensor, n_groups: int) -> Dispatch:
    """Sort the B*E assignments (experts_BE: expert id of each input's slot e) by expert."""
    E = experts_BE.shape[1]
    flat_T = experts_BE.reshape(-1)
    order_T = torch.argsort(flat_T, stable=True)
    return Dispatch(order_T, order_T // E, torch.bincount(flat_T, minlength=n_groups))


def inverse_permutation(order_T: Tensor) -> Tensor:
    """(T,) the permutation that undoes `order_T`: inverse_T[order_T[t]] = t."""
    inverse_T = torch.empty_like(order_T)
    inverse_T[order_T] = torch.arange(order_T.numel(), device=order_T.device)
    return inverse_T


def load_balancing_loss(probs_BN: Tensor, experts_BE: Tensor, f_N: Tensor | None = None) -> Tensor:
    """N * sum_i f_i P_i: f_i = fraction of the B*E assignments sent to expert i (no gradient),
    P_i = mean router probability of expert i. 1 for a uniform router, N for a collapsed one.

    f_N: the fractions when they were gathered elsewhere (distributed training passes the f of the
    global batch, all-reduced over ranks); None = computed from experts_BE."""
    N = probs_BN.shape[1]
    if f_N is None:
        f_N = metrics.expert_load(experts_BE, N)
    return N * (f_N.to(probs_BN.dtype) * probs_BN.mean(0)).sum()


@register("switch")
class SwitchSAE(BaseSAE):
    """Parameters: W_enc, W_dec (N [+1 shared], M/N, D) with unit-norm decoder rows, W_router (N, D),
    b_router (D), b_pre (D)."""

    def __init__(self, cfg: SAEConfig | None = None, **kw):
        cfg = cfg or SAEConfig(arch="switch", **kw)
        super().__init__(cfg)
        N, W, D, dt = cfg.n_experts, cfg.expert_width, cfg.d_in, self.param_dtype
        W_dec = unit_rows((self.n_stacked, W, D), dt)
        self.W_dec = nn.Parameter(W_dec)  # rows = feature directions
        self.W_enc = nn.Parameter(W_dec.clone())  # initialised parallel to the decoder (SPEC)
        bound = 1 / math.sqrt(D)  # nn.Linear's default init
        self.W_router = nn.Parameter(torch.empty(N, D, dtype=dt).uniform_(-bound, bound))
        self.b_router = nn.Parameter(torch.zeros(D, dtype=dt))
        self.b_pre = nn.Parameter(torch.zeros(D, dtype=dt))
        if cfg.feature_scaling:  # Scale SAE: identity at the start (FeatScale's zero init)
            self.W_enc_hf_scale = nn.Parameter(torch.zeros(self.n_stacked, D, dtype=dt))

    @property
    def n_stacked(self) -> int:
        """Experts held in W_enc/W_dec: N, plus the shared one."""
        return self.cfg.n_experts + int(self.cfg.shared_expert)

    @property
    def n_latents(self) -> int:
        return self.n_stacked * self.cfg.expert_width

    def effective_encoder(self) -> Tensor:
        """(G, M/N, D) the encoder rows the forward uses: W_enc, or with `feature_scaling` each expert's rows with
        their deviation from the expert's mean row amplified, W_enc + omega * (W_enc - mean_j W_enc[j])."""
        if not self.cfg.feature_scaling:
            return self.W_enc
        high_GWD = self.W_enc - self.W_enc.mean(dim=1, keepdim=True)
        return self.W_enc + self.W_enc_hf_scale[:, None, :] * high_GWD

    def encoder_directions(self) -> Tensor:
        return self.effective_encoder().reshape(-1, self.cfg.d_in)

    # --- the pieces ---------------------------------------------------------------------------------
    def route(self, x_BD: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """-> (probs_BN, experts_BE, gate_BE): router distribution, top-e experts (best first) and the
        factor each expert's output is scaled by (its probability, or 1 for the Heaviside variant)."""
        # softmax in fp32 under any autocast (CUDA autocast does it, CPU autocast would not): the load-balancing
        # loss and the gates are then fp32 on every device
        logits_BN = (x_BD - self.b_router) @ self.W_router.T
        probs_BN = F.softmax(logits_BN, dim=-1, dtype=torch.promote_types(logits_BN.dtype, torch.float32))
        gate_BE, experts_BE = probs_BN.topk(self.cfg.top_e, dim=-1)
        if not self.cfg.scale_by_router_prob:
            gate_BE = torch.ones_like(gate_BE)
        return probs_BN, experts_BE, gate_BE

    def forward(self, x_BD: Tensor, fast: bool = True) -> SwitchOutput:
        """x_hat and, per input, the k latents of each expert it used: latent_acts (B, E*k) are the
        experts' ReLU(TopK) values BEFORE the gate scaling, latent_indices their global ids, slot by
        slot in expert_indices order (then the shared expert); with `global_topk`, (B, k) latents of the global
        TopK, in no particular order. fast=False: the reference paths (`ops`)."""
        x_BD = self.check_input(x_BD)
        B, D = x_BD.shape
        probs_BN, experts_BE, gate_BE = self.route(x_BD)
        aux = load_balancing_loss(probs_BN, experts_BE)
        if self.cfg.shared_expert:  # every input also uses expert N with gate 1
            experts_BE = self._with_shared(experts_BE)
            gate_BE = torch.cat([gate_BE, gate_BE.new_ones(B, 1)], dim=1)
        E = experts_BE.shape[1]
        d = dispatch(experts_BE, self.n_stacked)
        W_enc = self.effective_encoder()
        if self.cfg.global_topk:
            return self._global_topk_forward(x_BD - self.b_pre, d, experts_BE, gate_BE, W_enc, probs_BN, aux, fast)
        # gather, then subtract: the inputs need no gradient, so the backward has no (B, D) scatter of the gradient
        # back to input rows, only b_pre's sum over the T rows
        ex = experts_forward(x_BD[d.input_T] - self.b_pre, d.group_sizes_G, W_enc, self.W_dec, self.cfg.k, fast)
        gate_T = gate_BE.reshape(-1)[d.order_T]
        x_hat_BD = torch.index_add(self.b_pre.expand(B, D), 0, d.input_T, ex.out_TD * gate_T[:, None])
        # back to input order: sorted position of assignment (b, e) = inverse permutation of order_T
        inverse_T = inverse_permutation(d.order_T)
        acts_BK = ex.acts_TK[inverse_T].reshape(B, -1)
        ids_BK = ex.ids_TK[inverse_T].reshape(B, -1)
        pre = ex.pre_TW[inverse_T].reshape(B, -1) if self.cfg.auxk_coeff > 0 else None
        return SwitchOutput(x_hat_BD, acts_BK, ids_BK, experts_BE[:, : self.cfg.top_e], probs_BN, aux, pre)

    def latent_gates(self, out: SwitchOutput) -> Tensor:
        """(B, K_total) the gate each active latent's expert output is scaled by in x_hat: the router
        probability p_i(x) of its expert (1 with `scale_by_router_prob=False`, and for the shared expert)."""
        expert_BK = out.latent_indices // self.cfg.expert_width
        routed_BK = expert_BK < self.cfg.n_experts
        if not self.cfg.scale_by_router_prob:
            return torch.ones_like(out.latent_acts)
        probs_BK = out.router_probs.gather(1, expert_BK.clamp(max=self.cfg.n_experts - 1))
        return torch.where(routed_BK, probs_BK, torch.ones_like(probs_BK))

    def dense_latents(self, out: SwitchOutput) -> Tensor:
        """(B, n_latents) latents as the decoder uses them: each active latent a_j (out.latent_acts) times its
        expert's gate g_i(x) (`latent_gates`), at its global id; zero elsewhere (in every expert not routed
        to). Why gate-scaled: then `decode` is linear, `decode(encode(x)) = x_hat` exactly, and the numbers
        equal SAELens's `encode` of the exported SAE (interop/sae_lens.py). With `scale_by_router_prob=False`
        they are the unscaled a_j of `forward`."""
        acts_BK = out.latent_acts * self.latent_gates(out)
        return acts_BK.new_zeros(acts_BK.shape[0], self.n_latents).scatter(1, out.latent_indices, acts_BK)

    def _global_topk_forward(self, xc_BD: Tensor, d: Dispatch, experts_BE: Tensor, gate_BE: Tensor, W_enc: Tensor,
                             probs_BN: Tensor, aux: Tensor, fast: bool) -> SwitchOutput:
        """Scale SAE: one TopK of k over the gate-scaled pre-activations of all E experts each input uses."""
        B, E, (G, W, D) = xc_BD.shape[0], experts_BE.shape[1], W_enc.shape
        with torch.no_grad():
            pre_TW = grouped_matmul(xc_BD[d.input_T].detach(), W_enc.detach(), d.group_sizes_G, fast=fast)
            pre_BEW = pre_TW[inverse_permutation(d.order_T)].view(B, E, W)  # slot e of input b = row b*E + e
            score_BP = (pre_BEW * gate_BE.detach()[:, :, None]).reshape(B, E * W)
            _, pos_BK = score_BP.topk(self.cfg.k, dim=-1, sorted=False)
            slot_BK = torch.div(pos_BK, W, rounding_mode="floor")
            ids_BK = experts_BE.gather(1, slot_BK) * W + pos_BK % W
            vals_BK = pre_BEW.reshape(B, E * W).gather(1, pos_BK)
        acts_BK = gathered_preacts(xc_BD, W_enc.reshape(G * W, D), ids_BK, vals_BK).relu()
        gated_BK = acts_BK * gate_BE.gather(1, slot_BK)  # the router learns through the gates, as in top-1
        x_hat_BD = sparse_decode(gated_BK, ids_BK, self.W_dec.reshape(G * W, D)) + self.b_pre
        pre = pre_BEW.reshape(B, E * W) if self.cfg.auxk_coeff > 0 else None
        return SwitchOutput(x_hat_BD, acts_BK, ids_BK, experts_BE[:, : self.cfg.top_e], probs_BN, aux, pre)

    # --- objective ------------------------------------------------------------------------------------
    def losses(self, x_BD: Tensor, out: SwitchOutput, dead_mask_F: Tensor | None = None) -> dict[str, Tensor]:
        """Named, already-weighted terms; the training loss is their sum:

            'recon': mean_b ||x_b - x_hat_b||^2                 (squared error summed over D)
            'aux':   aux_alpha * (D if aux_scale_by_d else 1) * out.aux_loss
                     (authors' code: alpha = 3, times D; aux_loss = N sum_i f_i P_i)
            'auxk':  auxk_coeff * base.auxk_loss(...)           (only if auxk_coeff > 0 and a dead mask
                     is given). Dead latents can only be picked among the pre-activations that exist:
                     those of the experts each input was routed to (and the shared expert).
        """
        x_BD = x_BD.to(out.x_hat.dtype)
        scale = self.cfg.aux_alpha * (self.cfg.d_in if self.cfg.aux_scale_by_d else 1)
        losses = {"recon": recon_loss(out.x_hat, x_BD), "aux": scale * out.aux_loss}
        if self.cfg.auxk_coeff > 0 and dead_mask_F is not None:
            if out.pre_acts is None:
                raise ValueError("AuxK needs out.pre_acts: run forward with cfg.auxk_coeff > 0")
            losses["auxk"] = self.cfg.auxk_coeff * auxk_loss(
                x_BD, out.x_hat, x_BD - self.b_pre, out.pre_acts, self._pre_ids(out),
                self._full_dead_mask(dead_mask_F), self.encoder_directions(), self.decoder_directions(),
                self.cfg.auxk_k)
        return losses

    def _pre_ids(self, out: SwitchOutput) -> Tensor:
        """(B, E * M/N) feature id of each entry of out.pre_acts."""
        B, W = out.pre_acts.shape[0], self.cfg.expert_width
        experts_BE = self._with_shared(out.expert_indices) if self.cfg.shared_expert else out.expert_indices
        offsets_W = torch.arange(W, device=experts_BE.device)
        return (experts_BE[:, :, None] * W + offsets_W).reshape(B, -1)

    def _with_shared(self, experts_BE: Tensor) -> Tensor:
        """(B, E) routed experts -> (B, E + 1) with the shared expert (id N) appended to every row."""
        return torch.cat([experts_BE, experts_BE.new_full((experts_BE.shape[0], 1), self.cfg.n_experts)], dim=1)

    def _full_dead_mask(self, dead_mask_F: Tensor) -> Tensor:
        """Accept a mask over n_features (shared expert then counted alive) or over n_latents."""
        dead_mask_F = dead_mask_F.to(torch.bool)
        missing = self.n_latents - dead_mask_F.shape[0]
        if missing < 0 or (missing and missing != self.n_latents - self.cfg.n_features):
            raise ValueError(f"dead mask has {dead_mask_F.shape[0]} entries, expected n_latents={self.n_latents}")
        return F.pad(dead_mask_F, (0, missing), value=False)

    # --- analytic cost -------------------------------------------------------------------------------
    @property
    def n_params(self) -> int:
        """2 M D + N D + 2 D (SPEC), plus 2 (M/N) D for a shared expert, plus G D for feature scaling."""
        D = self.cfg.d_in
        return (2 * self.n_latents * D + self.cfg.n_experts * D + 2 * D
                + int(self.cfg.feature_scaling) * self.n_stacked * D)

    def flops_per_input(self) -> dict[str, int]:
        """Router 2 N D; each of the E experts an input uses (top_e, + shared) 2 (M/N) D to encode; decoding
        2 k D per expert, or 2 k D in all with `global_topk` (k latents over all E experts). Feature scaling
        forms its encoder once per batch (~4 M D, not per input: not counted)."""
        E = self.cfg.top_e + int(self.cfg.shared_expert)
        D = self.cfg.d_in
        decoded = self.cfg.k if self.cfg.global_topk else E * self.cfg.k
        f = {"router": 2 * self.cfg.n_experts * D, "encoder": 2 * E * self.cfg.expert_width * D,
             "decoder": 2 * decoded * D}
        f["total"] = sum(f.values())
        return f
