"""Feature absorption on the first-letter task: SAEBench's `absorption` eval, on tensors.

Sources: Chanin et al. 2024, "A is for Absorption: Studying Feature Splitting and Absorption in Sparse
Autoencoders" (arXiv 2409.14507); SAEBench (Karvonen et al. 2025, arXiv 2503.09532), code
`sae_bench/evals/absorption/` (`probing.py`, `k_sparse_probing.py`, `feature_absorption_calculator.py`,
`main.py`; version 0.6.0). Each function names the SAEBench function it follows; the thresholds are
SAEBench's defaults, named below.

The procedure, for the words of `data.first_letter` (activation x at each word's last token):
1. ground-truth probe: a one-vs-rest logistic regression per letter on the TRAIN words' x;
2. main latents of each letter: an L1-regularised logistic probe on the train words' SAE latents ranks
   the latents; for k = 1..10 a logistic probe on the top-k latents is scored (F1 on the TEST words); the
   main ("split") latents are the top-k of the last k whose F1 rose by more than 0.03 over the previous
   best (SAEBench `add_feature_splits_to_metrics_df`);
3. for every TEST word of the letter that the ground-truth probe detects (a probe true positive), with
   p the unit probe direction, each latent j's contribution to the reconstruction projected on p,
   proj_j = c_j (d_j . p) (c_j its coefficient, d_j its decoder direction; SAEBench's a_j cos(d_j, p) for
   unit-norm decoder rows), and the activation's own projection P = x . p:
   - absorption fraction: 0 if the main latents' sum(proj) >= P, or if the (at most 3) largest positive
     projections of other latents with cos(d_j, p) >= 0.1 sum to less than 0.4 P; 1 if the main latents'
     projection is <= 0; else a / (a + main) with a = min(that sum, P - main);
   - full absorption: no main latent fires, the latent with the largest proj has cos >= 0.025, P >= 0, and
     that latent's proj >= 0.4 P;
4. per letter: the sums of both over the probe true positives / their number; the SAE's scores are the
   means over the letters whose probe F1 on the test words exceeds 0.6 (SAEBench `main.run_eval`).

Adaptations (said in every record): the ground-truth probe is scikit-learn's LogisticRegression on
standardised activations (SAEBench trains the same one-vs-rest BCE objective with Adam); the
L1 probe is SAEBench's objective and optimiser in torch, run for a fixed number of steps (L1_PROBE_STEPS)
instead of 50 epochs, which on a few thousand words would be only 50 steps; the SAE's latent "activation" is its coefficient
in the reconstruction (for a Switch SAE: the expert's latent times the router gate that scales the
expert's output), so that sum_j c_j d_j + bias = x_hat for every architecture (checked by
`check_coefficients`); absorption is scored on the activations of the dataset's test prompts instead of
re-running the model on fresh in-context prompts.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .result_types import LetterScore, ProbeReport

N_LETTERS = 26

# --- SAEBench's thresholds (feature_absorption.py, eval_config.py, k_sparse_probing.py) -------------
FULL_ABSORPTION_PROBE_COS_THRESHOLD = 0.025  # the top-projecting latent's cos with the probe (full absorption)
ABSORPTION_FRACTION_PROBE_COS_THRESHOLD = 0.1  # each candidate absorber's cos with the probe (fraction)
PROBE_PROJECTION_PROPORTION_THRESHOLD = 0.4  # absorbers' share of the probe projection (both metrics)
MAX_ABSORBING_LATENTS = 3  # at most this many latents share the absorbed projection (fraction)
ACTIVE_EPS = 1e-8  # a main latent "fires" above this (feature_absorption_calculator.EPS)
F1_JUMP_THRESHOLD = 0.03  # a k-sparse probe's F1 gain that counts as one more split latent
MAX_K = 10  # largest k of the k-sparse probes
MIN_PROBE_F1 = 0.6  # a letter counts only if the ground-truth probe's test F1 exceeds this
MIN_LETTERS = 20  # SAEBench refuses to score an SAE with fewer letters than this
# the L1 probe that ranks latents (k_sparse_probing.train_sparse_multi_probe / probing.train_multi_probe)
L1_PROBE = dict(l1_decay=0.01, l2_decay=1e-6, lr=0.01, end_lr=1e-5, epochs=50, batch_size=4096)
# Adaptation: SAEBench's 50 epochs take 50 * ceil(n_train / 4096) steps, ~500 on SmolLM2's whole alphabetic
# vocabulary (47,078 words, 80% train); on a few thousand words 50 epochs would be 50 steps, too few for
# the L1 term to separate the latents, so the step count is kept instead of the epoch count.
L1_PROBE_STEPS = 500


class AbsorptionError(ValueError):
    """The inputs cannot give an absorption score; the message says why."""


# --- 1. the ground-truth probe --------------------------------------------------------------------


@dataclasses.dataclass
class LetterProbe:
    """One linear probe per letter on raw activations: score_NL = x_ND @ weights_LD.T + bias_L (> 0: detected)."""

    weights_LD: Tensor
    bias_L: Tensor

    def scores(self, x_ND: Tensor) -> Tensor:
        return x_ND.float() @ self.weights_LD.T + self.bias_L

    def direction(self, letter: int) -> Tensor:
        """(D,) unit direction of one letter's probe."""
        return F.normalize(self.weights_LD[letter], dim=0)


def train_letter_probe(x_ND: Tensor, letters_N: Tensor, C: float = 1.0, max_iter: int = 1000) -> LetterProbe:
    """One-vs-rest logistic regressions, one per letter (SAEBench `train_linear_probe_for_task`: 26 BCE
    probes with balanced positive weights), fitted by scikit-learn on standardised activations and mapped
    back to raw ones (w_raw = w / sigma, b_raw = b - w . mu / sigma). x_ND (N, D); letters_N (N,) in 0..25.
    A letter absent from the training words gets a probe that never fires (weights 0, bias -1)."""
    from sklearn.linear_model import LogisticRegression

    x = x_ND.double().numpy()
    y = letters_N.numpy()
    mu, sigma = x.mean(0), x.std(0) + 1e-8
    z = (x - mu) / sigma
    W = np.zeros((N_LETTERS, x.shape[1]))
    b = -np.ones(N_LETTERS)
    for letter in range(N_LETTERS):
        target = (y == letter).astype(np.int64)
        if 0 < target.sum() < len(target):
            clf = LogisticRegression(C=C, class_weight="balanced", max_iter=max_iter).fit(z, target)
            W[letter] = clf.coef_[0] / sigma
            b[letter] = clf.intercept_[0] - (clf.coef_[0] * mu / sigma).sum()
    return LetterProbe(torch.tensor(W, dtype=torch.float32), torch.tensor(b, dtype=torch.float32))


def binary_f1(pred_N: Tensor, true_N: Tensor) -> float:
    """F1 of a binary prediction (0 when nothing is predicted or nothing is true, as scikit-learn's default)."""
    tp = int((pred_N & true_N).sum())
    denom = int(pred_N.sum()) + int(true_N.sum())
    return 2 * tp / denom if denom else 0.0


def probe_report(probe: LetterProbe, x_ND: Tensor, letters_N: Tensor) -> ProbeReport:
    """How well a probe reads first letters on held-out words, beside chance.

    Per letter: F1, precision, recall of score > 0, support, and chance F1 = the letter's base rate (the
    expected F1 of guessing the letter at its base rate). Overall: accuracy of the argmax over letters,
    beside the majority-letter accuracy."""
    s_NL = probe.scores(x_ND)
    per_letter = {}
    for letter in range(N_LETTERS):
        pred, true = s_NL[:, letter] > 0, letters_N == letter
        tp = int((pred & true).sum())
        per_letter[chr(ord("a") + letter)] = LetterScore(
            f1=binary_f1(pred, true),
            precision=tp / int(pred.sum()) if pred.any() else 0.0,
            recall=tp / int(true.sum()) if true.any() else 0.0,
            support=int(true.sum()),
            chance_f1=float(true.float().mean()),
        )
    counts = torch.bincount(letters_N, minlength=N_LETTERS)
    present = [v for v in per_letter.values() if v["support"] > 0]
    return ProbeReport(
        accuracy=float((s_NL.argmax(1) == letters_N).float().mean()),
        majority_accuracy=float(counts.max() / counts.sum()),
        mean_f1=float(np.mean([v["f1"] for v in present])),
        mean_chance_f1=float(np.mean([v["chance_f1"] for v in present])),
        n_letters_f1_above_min=sum(v["f1"] > MIN_PROBE_F1 for v in present),
        n=int(len(letters_N)),
        per_letter=per_letter,
    )


# --- 2. the SAE's latents -------------------------------------------------------------------------


@torch.no_grad()
def latent_coefficients(sae, x_BD: Tensor, batch_size: int = 1024) -> Tensor:
    """(B, M) dense coefficient of every latent in the reconstruction, from `sae(x)`'s public outputs:
    x_hat = coefficients @ sae.decoder_directions() + bias for every input (see `check_coefficients`).

    Sparse outputs (latent_indices given) are scattered into their global ids; a Switch SAE's latents are
    multiplied by the gate that scales their expert's output (the router probability of the expert in
    `expert_indices`, 1 for the shared expert or with `scale_by_router_prob=False`)."""
    M = sae.decoder_directions().shape[0]
    out_rows = []
    for start in range(0, x_BD.shape[0], batch_size):
        x = x_BD[start:start + batch_size].to(sae.decoder_directions().device)
        out = sae(x)
        acts = out.latent_acts.float()
        if out.latent_indices is None:
            out_rows.append(acts)
            continue
        if hasattr(out, "router_probs"):
            acts = acts * _switch_gates(sae, out, acts.shape[1])
        dense = torch.zeros(acts.shape[0], M)
        dense.scatter_add_(1, out.latent_indices.long().cpu(), acts.cpu())
        out_rows.append(dense)
    return torch.cat(out_rows).cpu()


def _switch_gates(sae, out, n_slots: int) -> Tensor:
    """(B, n_slots) the gate of each latent slot: slots come k per expert, in `expert_indices` order,
    then the shared expert's k (saes/switch.py `SwitchSAE.forward`)."""
    B, top_e = out.expert_indices.shape
    k = n_slots // (top_e + int(getattr(sae.cfg, "shared_expert", False)))
    gates_BE = out.router_probs.gather(1, out.expert_indices).float()
    if not getattr(sae.cfg, "scale_by_router_prob", True):
        gates_BE = torch.ones_like(gates_BE)
    gates = gates_BE.repeat_interleave(k, dim=1)
    return torch.cat([gates, gates.new_ones(B, n_slots - gates.shape[1])], dim=1)


@torch.no_grad()
def check_coefficients(sae, x_BD: Tensor, coefs_BM: Tensor, rtol: float = 1e-3) -> float:
    """Check that x_hat - coefs @ decoder_directions is the SAME vector (the decoder bias) for every input;
    returns the largest deviation relative to ||x_hat||. AbsorptionError if it exceeds `rtol` (the
    coefficients would then not be the latents' contributions, and absorption numbers would be wrong)."""
    x_hat = sae(x_BD).x_hat.float()
    bias_BD = x_hat - coefs_BM @ sae.decoder_directions().float()
    dev = float((bias_BD - bias_BD[:1]).norm(dim=1).max() / x_hat.norm(dim=1).mean())
    if dev > rtol:
        raise AbsorptionError(
            f"latent coefficients do not reconstruct x_hat (relative deviation {dev:.2e}): "
            f"{type(sae).__name__}'s outputs need their own rule in analysis.absorption.latent_coefficients"
        )
    return dev


# --- 3. main latents: L1 ranking and k-sparse probes ------------------------------------------------


def l1_probe_weights(coefs_NM: Tensor, letters_N: Tensor, seed: int = 0, l1_decay: float = L1_PROBE["l1_decay"],
                     steps: int = L1_PROBE_STEPS) -> Tensor:
    """(26, M) weights of SAEBench's L1-regularised one-vs-rest probe on the latents
    (`train_sparse_multi_probe`): mean BCE with pos_weight = negatives / positives per letter, plus
    l1_decay * mean_letters sum_j |w_lj|; Adam (lr 0.01, L2 1e-6) decayed exponentially to 1e-5 over
    the epochs; batches of 4096 in a seeded shuffled order. Adaptation: as many epochs as give `steps`
    optimiser steps (SAEBench: 50 epochs, whose step count grows with the vocabulary; see
    L1_PROBE_STEPS). The latents are used as a sparse matrix. The caller's RNG is left untouched."""
    N, M = coefs_NM.shape
    y_NL = F.one_hot(letters_N, N_LETTERS).float()
    pos = y_NL.sum(0)
    pos_weight = (N - pos) / pos.clamp(min=1)
    bs = L1_PROBE["batch_size"]
    epochs = max(1, math.ceil(steps / math.ceil(N / bs)))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        probe = torch.nn.Linear(M, N_LETTERS)
        opt = torch.optim.Adam(probe.parameters(), lr=L1_PROBE["lr"], weight_decay=L1_PROBE["l2_decay"])
        gamma = math.exp(math.log(L1_PROBE["end_lr"] / L1_PROBE["lr"]) / epochs)
        sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=gamma)
        loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=pos_weight)
        batches = None
        for _ in range(epochs):
            if batches is None or N > bs:  # one full batch: no need to reshuffle or rebuild it
                order = torch.randperm(N)
                batches = [(coefs_NM[idx].to_sparse(), y_NL[idx]) for idx in order.split(bs)]
            for x_sp, y in batches:
                logits = torch.sparse.mm(x_sp, probe.weight.T) + probe.bias
                loss = loss_fn(logits, y) + l1_decay * probe.weight.abs().sum(-1).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
            sched.step()
    return probe.weight.detach()


def split_size(f1_by_k: list[float], f1_jump: float = F1_JUMP_THRESHOLD) -> int:
    """Number of main latents: the last k (from 1) whose F1 beat the best so far by more than `f1_jump`,
    stopping at the first k that does not (SAEBench `add_feature_splits_to_metrics_df`)."""
    best, size = -100.0, 0
    for k, f1 in enumerate(f1_by_k, start=1):
        if f1 <= best + f1_jump:
            break
        best, size = f1, k
    return size


@dataclasses.dataclass
class MainLatents:
    """Per letter: the main latents (global ids), and the test F1 of the k-sparse probe for k = 1..MAX_K."""

    ids: dict[int, list[int]]
    f1_by_k: dict[int, list[float]]


def main_latents(train_coefs_NM: Tensor, train_letters_N: Tensor, test_coefs_NM: Tensor, test_letters_N: Tensor,
                 weights_LM: Tensor, max_k: int = MAX_K, f1_jump: float = F1_JUMP_THRESHOLD) -> MainLatents:
    """For each letter and k = 1..max_k: the top-k latents by L1-probe weight (signed, SAEBench: "only
    features that directly predict the label"), a logistic regression on them (scikit-learn,
    class_weight='balanced', max_iter=500: `train_k_sparse_probes`), its F1 on the test words
    (score > 0: `build_metrics_df`). Main latents: the top-k of the last k whose F1 beat the best so far
    by more than `f1_jump`, starting from k = 1 (`add_feature_splits_to_metrics_df`)."""
    from sklearn.linear_model import LogisticRegression

    ids, f1s = {}, {}
    for letter in range(N_LETTERS):
        y_train = (train_letters_N == letter).numpy()
        y_test = test_letters_N == letter
        if not 0 < y_train.sum() < len(y_train):
            continue
        order = weights_LM[letter].topk(max_k).indices
        f1_by_k = []
        for k in range(1, max_k + 1):
            feats = order[:k].numpy()
            clf = LogisticRegression(max_iter=500, class_weight="balanced").fit(
                train_coefs_NM[:, feats].numpy(), y_train.astype(np.int64))
            score = test_coefs_NM[:, feats].numpy() @ clf.coef_[0] + clf.intercept_[0]
            f1_by_k.append(binary_f1(torch.from_numpy(score > 0), y_test))
        ids[letter], f1s[letter] = order[:split_size(f1_by_k, f1_jump)].tolist(), f1_by_k
    return MainLatents(ids, f1s)


# --- 4. absorption per word and per letter ----------------------------------------------------------


@dataclasses.dataclass
class WordAbsorption:
    """Per word (W words of one letter): absorption_fraction_W in [0, 1], full_W (bool)."""

    absorption_fraction_W: Tensor
    full_W: Tensor


def word_absorption(x_WD: Tensor, coefs_WM: Tensor, decoder_MD: Tensor, probe_dir_D: Tensor,
                    main_ids: list[int]) -> WordAbsorption:
    """SAEBench `FeatureAbsorptionCalculator.calculate_absorption` for W words of one letter, vectorised.

    x_WD: the model's activations; coefs_WM: the SAE's latent coefficients; decoder_MD: decoder
    directions; probe_dir_D: the letter's probe direction (normalised here); main_ids: its main latents."""
    p = F.normalize(probe_dir_D.float(), dim=0)
    dec = decoder_MD.float()
    dot_M = dec @ p  # d_j . p
    cos_M = dot_M / dec.norm(dim=1).clamp(min=1e-12)
    proj_WM = coefs_WM.float() * dot_M  # each latent's contribution to the reconstruction, projected on p
    P_W = x_WD.float() @ p
    main = torch.zeros(dec.shape[0], dtype=torch.bool)
    main[main_ids] = True
    main_proj_W = proj_WM[:, main].sum(1)

    # absorption fraction: up to MAX_ABSORBING_LATENTS other latents aligned with the probe
    candidate_WM = (~main & (cos_M >= ABSORPTION_FRACTION_PROBE_COS_THRESHOLD))[None] & (proj_WM > 0)
    cand_proj = torch.where(candidate_WM, proj_WM, torch.zeros_like(proj_WM))
    top = cand_proj.topk(min(MAX_ABSORBING_LATENTS, cand_proj.shape[1]), dim=1).values.sum(1)
    safe_P = torch.where(P_W > 0, P_W, torch.ones_like(P_W))
    no_absorption = (main_proj_W >= P_W) | (P_W <= 0) | (top / safe_P < PROBE_PROJECTION_PROPORTION_THRESHOLD)
    absorbed = torch.minimum(top, P_W - main_proj_W)
    partial = (absorbed / (absorbed + main_proj_W).clamp(min=1e-12)).clamp(0, 1)
    fraction = torch.where(no_absorption, torch.zeros_like(P_W),
                           torch.where(main_proj_W <= 0, torch.ones_like(P_W), partial))

    # full absorption: the main latents are silent and one aligned latent carries the projection
    top_val, top_id = proj_WM.max(dim=1)
    full = ((coefs_WM[:, main] < ACTIVE_EPS).all(1) & (cos_M[top_id] >= FULL_ABSORPTION_PROBE_COS_THRESHOLD)
            & (P_W >= 0) & (top_val >= PROBE_PROJECTION_PROPORTION_THRESHOLD * P_W))
    return WordAbsorption(fraction, full)


def absorption_scores(probe: LetterProbe, main: MainLatents, test_x_ND: Tensor, test_coefs_NM: Tensor,
                      test_letters_N: Tensor, decoder_MD: Tensor, min_letters: int = MIN_LETTERS) -> dict:
    """The SAE's absorption scores (SAEBench `main._aggregate_results_df` and `run_eval`).

    For each letter whose probe F1 on the test words exceeds MIN_PROBE_F1: the mean absorption fraction
    and the full-absorption rate over the probe's true positives; then their means and standard
    deviations over those letters, and the mean number of main latents. `scored` is False (scores NaN)
    when fewer than `min_letters` letters qualify, where SAEBench refuses to score."""
    s_NL = probe.scores(test_x_ND)
    per_letter = {}
    for letter in range(N_LETTERS):
        true = test_letters_N == letter
        f1 = binary_f1(s_NL[:, letter] > 0, true)
        tp = true & (s_NL[:, letter] > 0)
        if f1 <= MIN_PROBE_F1 or letter not in main.ids or not tp.any():
            continue
        w = word_absorption(test_x_ND[tp], test_coefs_NM[tp], decoder_MD, probe.weights_LD[letter], main.ids[letter])
        per_letter[chr(ord("a") + letter)] = dict(
            probe_f1=f1, n_probe_true_positives=int(tp.sum()), main_latents=main.ids[letter],
            mean_absorption_fraction=float(w.absorption_fraction_W.mean()),
            full_absorption_rate=float(w.full_W.float().mean()), n_full_absorption=int(w.full_W.sum()))
    n = len(per_letter)
    col = lambda key: np.array([v[key] for v in per_letter.values()], dtype=float)  # noqa: E731
    nan = float("nan")
    scored = n >= min_letters
    std = lambda a: float(a.std(ddof=1)) if len(a) > 1 else nan  # noqa: E731  (statistics.stdev, as SAEBench)
    frac, full, n_main = col("mean_absorption_fraction"), col("full_absorption_rate"), np.array(
        [len(v["main_latents"]) for v in per_letter.values()], dtype=float)
    return dict(
        scored=scored, n_letters=n,
        mean_absorption_fraction=float(frac.mean()) if scored else nan,
        mean_full_absorption=float(full.mean()) if scored else nan,
        mean_num_split_features=float(n_main.mean()) if scored else nan,
        std_absorption_fraction=std(frac) if scored else nan,
        std_full_absorption=std(full) if scored else nan,
        per_letter=per_letter,
    )


def evaluate_sae(sae, probe: LetterProbe, train_x_ND: Tensor, train_letters_N: Tensor, test_x_ND: Tensor,
                 test_letters_N: Tensor, seed: int = 0, min_letters: int = MIN_LETTERS,
                 train_coefs_NM: Optional[Tensor] = None) -> dict:
    """Steps 2-4 for one SAE: its coefficients on the train and test words, main latents, absorption."""
    train_coefs = latent_coefficients(sae, train_x_ND) if train_coefs_NM is None else train_coefs_NM
    test_coefs = latent_coefficients(sae, test_x_ND)
    check_coefficients(sae, test_x_ND[:256], test_coefs[:256])
    weights = l1_probe_weights(train_coefs, train_letters_N, seed=seed)
    main = main_latents(train_coefs, train_letters_N, test_coefs, test_letters_N, weights)
    return absorption_scores(probe, main, test_x_ND, test_coefs, test_letters_N, sae.decoder_directions().detach(),
                             min_letters=min_letters)
