"""The sentences every notebook prints about the paper's claims ("what we see"), made from the numbers of
checks.py (the paper's reference numbers, the ordering checks, sample efficiency, seed statistics, the convergence
rule) by rules tested on cases (tests/test_claims.py): a word like "higher" or "re-learn" appears only when the
numbers it summarises say so.
"""
from __future__ import annotations

import math
from typing import Any, Optional

import torch

from . import metrics
from .checks import (CONVERGENCE_TOL, MOVED_FAR_COS, NEAR_INIT_COS, convergence_check, is_converged,
                     near_initialisation, ordering_checks, paper_reference, sample_efficiency, seed_stats)  # noqa: F401 (paper_reference, sample_efficiency: claims.* in notebooks)
from .config import model_display_name
from .profiles import Profile
from .results import baseline_width


# --- words for numbers --------------------------------------------------------------------------------------
def compare(a: float, b: float, tol: float) -> str:
    """'about equal' if |a - b| <= tol, else 'lower' or 'higher' (a compared with b)."""
    return "about equal" if abs(a - b) <= tol else "lower" if a < b else "higher"


def change(a: float, b: float, tol: float) -> str:
    """How a value goes from a to b: 'rises', 'falls' or 'stays about the same' (within tol)."""
    return "rises" if b > a + tol else "falls" if b < a - tol else "stays about the same"


def join_words(parts: list[str]) -> str:
    """'a', 'a and b', 'a, b and c'; equal neighbours collapse ('about equal and about equal' -> 'both about equal')."""
    if len(parts) > 1 and len(set(parts)) == 1:
        return ("both " if len(parts) == 2 else "all ") + parts[0]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


MOSTLY_HELD_SHARE = 0.75  # a claim that held in at least this share of its comparisons "mostly held"
MOSTLY_HELD_SHARE_WORDS = ("**held**: in every comparison at equal L0; **mostly held**: in at least 3/4 of them; "
                           "**did not hold**: in fewer")


def claim_verdict(check: Optional[dict[str, Any]], paper: bool = False) -> str:
    """A table cell for one `ordering_checks` entry: held / mostly held (>= 3/4 of the comparisons) /
    did not hold, with the share; or why it could not be tested."""
    if check is None:
        return "n/a"
    if check["held"] is None:
        if paper and any(b in check["claim"] for b in ("Gated", "ReLU")):
            return "stated in the paper's text (its CSV has no ReLU/Gated numbers)"
        return "not comparable (no overlapping L0 range)"
    share = f"{check['wins']}/{check['compared']} comparisons at equal L0"
    if check["held"]:
        return f"**held** ({share})"
    return f"**mostly held** ({share})" if check["wins"] >= MOSTLY_HELD_SHARE * check["compared"] else f"**did not hold** ({share})"


def ordering_report(ours: list[dict], setting: str, profile: Profile) -> str:
    """Markdown: the paper's claims for `setting` checked on our records and on the paper's CSV, then
    a summary (how many held, the lowest MSE, the range of CE loss recovered)."""
    model = profile.data.site_label
    mine = ordering_checks(ours, setting)
    base = lambda c: (c["claim"].split(" (")[0], c["metric"])  # noqa: E731 (claim names carry N lists)
    theirs = {base(c): c for c in ordering_checks(paper_reference(), setting)}
    rows = [f"| {c['claim']} | {c['metric']} | {claim_verdict(c)} | {claim_verdict(theirs.get(base(c)), paper=True)} |"
            for c in mine]
    held = [c for c in mine if c["held"]]
    failed = [c for c in mine if c["held"] is False]
    untestable = [c for c in mine if c["held"] is None]
    best = min(ours, key=lambda r: r["mse"])
    rec = [r["loss_recovered"] for r in ours if r.get("loss_recovered") is not None]
    m = baseline_width(profile, ours[0]["sae_config"]["d_in"])
    text = (f"| claim | metric | ours ({model}) | paper (GPT-2) |\n|---|---|---|---|\n" + "\n".join(rows) + "\n\n"
            f"({MOSTLY_HELD_SHARE_WORDS}.)\n\n"
            f"At this scale ({profile.train.steps} steps x {profile.train.batch_size} tokens, M = {m}), "
            f"{len(held)} of {len(mine)} checks held, {len(failed)} did not (fully) and {len(untestable)} could not be tested")
    text += (f" (not fully: {'; '.join(sorted({c['claim'] + ' [' + c['metric'] + ']' for c in failed}))})." if failed else ".")
    text += f" The lowest MSE is {best['mse']:.4g} ({best['name']})"
    text += (f"; loss recovered ranges from {min(rec):.3f} to {max(rec):.3f}." if rec else
             "; no CE loss recovered was measured (records made with --no-lm).")
    return text


def sample_efficiency_report(results: dict[int, dict[str, Any]], profile: Profile) -> str:
    """Markdown: for each k, when each FLOP-matched Switch SAE reaches TopK's final held-out MSE, and
    whether the paper's ordering (Switch gets there in fewer steps) held for all, some or none."""
    lines = []
    for k, res in results.items():
        parts = []
        for c in res["curves"]:
            if c["label"] == "topk":
                continue
            s, speed = c["reach_step"], res["speedups"][c["label"]]
            factor = f" ({speed:.1f}x)" if speed is not None else ""
            parts.append(f"{c['label']} reaches it at step {s:.0f}{factor}" if s else f"{c['label']} never reaches it")
        topk = "never" if res["topk_steps"] is None else f"after {res['topk_steps']:.0f} steps"
        lines.append(f"- k = {k}: TopK's final held-out MSE {res['target']:.4g}, reached {topk}; " + "; ".join(parts) + ".")
    speedups = [s for res in results.values() for s in res["speedups"].values()]
    faster = [s for s in speedups if s is not None and s > 1]
    verdict = "**held**" if speedups and len(faster) == len(speedups) else "**partly held**" if faster else "**did not hold**"
    text = ("\n".join(lines) + "\n\n"
            f"The paper's ordering (FLOP-matched Switch reaches TopK's final MSE sooner) {verdict} here: "
            f"{len(faster)} of {len(speedups)} Switch SAEs got there in fewer steps (a speed-up above 1x; **held** needs all "
            "of them, **partly held** at least one)")
    text += f", with speed-ups from {min(faster):.1f}x to {max(faster):.1f}x" if faster else ""
    text += f" (paper: about 5x on GPT-2 after 100K steps; these runs have {profile.train.steps} steps"
    text += (f", so early-training noise and the learning-rate decay over the last {profile.train.lr_decay_frac:.0%} "
             "of steps weigh much more)." if profile.train.steps < 10_000 else ").")
    if not all(res.get("target_from_table", True) for res in results.values()):
        text += (" Some records predate curves on the table's held-out rows: their target is the curve's last point "
                 "(rerun the sweep with a fresh cache to refresh them).")
    return text


# --- what we see: the notebooks' closing text --------------------------------------------------------------
def quickstart_report(cfg, profile: Profile, rec: dict, lm: dict, flops: dict, load_N, n_never: int, n_heldout: int) -> str:
    """Notebook 00: one Switch SAE's held-out numbers, CE loss recovered, FLOPs and router load."""
    n = cfg.n_experts
    load = [float(v) for v in load_N]
    busiest = max(range(n), key=load.__getitem__)
    balance = float(metrics.load_entropy(torch.tensor(load))) / math.log(n)  # load entropy / its maximum log N
    dense = 2 * cfg.n_features * cfg.d_in  # a TopK encoder of the same width: 2 M d FLOPs
    return (
        f"- A Switch SAE with {n} experts of {cfg.expert_width} features (k = {cfg.k}) trained for "
        f"{profile.train.steps} steps ({profile.train.steps * profile.train.batch_size:,} tokens) reconstructs held-out "
        f"activations with MSE {rec['mse']:.4g} (FVU {rec['fvu']:.3f}) at L0 {rec['l0']:.1f}.\n"
        f"- Spliced into {model_display_name(profile.data.model)} at `{profile.data.hook_name}` it recovers {lm['loss_recovered']:.1%} of the "
        f"CE loss (CE {lm['ce_clean']:.3f} clean, {lm['ce_sae']:.3f} with the SAE, {lm['ce_zero']:.3f} zero-ablated; KL {lm['kl']:.3f}).\n"
        f"- Per input it spends {flops['encoder']:,} encoder FLOPs, {dense / flops['encoder']:.3g}x fewer than a TopK SAE of "
        f"the same width ({dense:,}); router {flops['router']:,}.\n"
        f"- The router uses its experts with a load entropy of {balance:.0%} of the balanced maximum; the busiest expert "
        f"(#{busiest}) takes {load[busiest]:.1%} of tokens. {n_never} of {cfg.n_features} features never fired on "
        f"{n_heldout:,} held-out tokens.")


SILHOUETTE_TOL = 0.01  # silhouettes closer than this count as no difference


def silhouette_claim(encoder: float, decoder: float, tol: float = SILHOUETTE_TOL) -> str:
    """The paper's 'encoder features cluster by expert, decoder features much less', judged on silhouettes."""
    return ("holds here" if encoder > decoder + tol else "is reversed here" if decoder > encoder + tol
            else "is not visible here (no difference)")


def router_report(profile: Profile, geo: dict, n_experts: int, steps: list[int], load_SN: list, entropy_S: list,
                  sil_2d: dict[str, float]) -> str:
    """Notebook 04: clustering by expert, router rows vs expert means, the router as a pooled dense
    encoder, subspaces, and load balancing over training."""
    clu, al, pooled, probe = geo["clustering"], geo["alignment"], geo["pooled"], geo["probe"]
    se, sd = clu["silhouette_encoder"], clu["silhouette_decoder"]
    enc, dec = al["encoder"], al["decoder"]
    ang_enc, ang_act = geo["angles_encoder"], geo["angles_activations"]
    final = [float(v) for v in load_SN[-1]]
    return f"""
- **Training budget**: {profile.name} profile, {profile.train.steps} steps x {profile.train.batch_size} tokens (the paper: 100K x 8192).
- **Clustering by expert** (paper: encoder clusters, decoder much less): silhouette by expert is
  **{se:.3f}** for encoder features and **{sd:.3f}** for decoder features (cosine distance in the original space), so the claim {silhouette_claim(se, sd)}
  (silhouettes within {SILHOUETTE_TOL} count as no difference);
  in the t-SNE plane the silhouettes are {sil_2d['encoder']:.3f} (encoder) and {sil_2d['decoder']:.3f} (decoder).
- **Router rows vs expert means**: the centred router row i has cosine {enc['diag_mean']:+.3f} with its own expert's mean
  encoder direction (other experts: {enc['offdiag_mean']:+.3f}; own expert is the best match for {enc['own_is_best']:.0%} of rows);
  with the mean decoder direction {dec['diag_mean']:+.3f} (others {dec['offdiag_mean']:+.3f}, best for {dec['own_is_best']:.0%}).
- **Router as a pooled dense encoder**: pooling a dense TopK SAE's activations by matched expert picks the router's expert on
  **{pooled['accuracy']:.1%}** of held-out tokens (chance {pooled['chance']:.1%}; uniform {pooled['uniform_chance']:.1%});
  a router built from pooled TopK encoder rows agrees on {geo['pooled_rows']['accuracy']:.1%}; a linear probe on the TopK latents on
  {probe['accuracy']:.1%} (the same probe on the activations themselves: {geo['probe_activations']['accuracy']:.1%}).
- **Subspaces**: the router's {ang_enc['dim']}-dimensional row space has mean cos² {ang_enc['mean_cos2']:.3f} with the top principal
  subspace of the TopK encoder and {ang_act['mean_cos2']:.3f} with that of the activations, vs {ang_enc['random_mean_cos2']:.3f} for a random subspace.
- **Load balancing**: after {steps[-1]} steps the expert loads range {min(final):.3f}–{max(final):.3f} (uniform {1 / n_experts:.3f});
  mean router entropy went from {entropy_S[0]:.3f} to {entropy_S[-1]:.3f} nats (uniform router: {math.log(n_experts):.3f}).
"""


SIMILARITY_TOL = 0.005  # mean cosines closer than this count as about equal
DUPLICATE_TOL = 0.001  # duplicated fractions closer than this (0.1 percentage points) count as equal


def relearning_verdict(across: float, across_control: float, dup: float, dup_control: float,
                       tol: float = SIMILARITY_TOL, dup_tol: float = DUPLICATE_TOL) -> str:
    """Across-expert similarity of a Switch SAE vs its TopK control, in words. 'Experts re-learn each
    other's features' is said only when BOTH the similarity is higher AND more features have a near-copy
    (cosine > 0.9) in another expert than in the control."""
    words = f"{compare(across, across_control, tol)} compared with the control's"
    if words.startswith("higher"):
        if dup > dup_control + dup_tol:
            return words + " — experts re-learn each other's features"
        return words + ", but no more features have a near-copy in another expert than in the control"
    return words


def frequency_verdict(by_frequency: list[dict], tol: float = DUPLICATE_TOL) -> str:
    """The paper's 'duplicates concentrate in frequent features', judged on the rarest vs the most
    frequent quartile of duplicated fractions: holds when the frequent one is higher by more than `tol`."""
    fracs = [b["frac_duplicated"] for b in by_frequency if not math.isnan(b["frac_duplicated"])]
    if not fracs or max(fracs) == 0:
        return "cannot be judged (no duplicates at all)"
    return "holds" if fracs[-1] > fracs[0] + tol else "does not hold"


THRESHOLDS_INIT = f"below {MOVED_FAR_COS} counts as moved far, above {NEAR_INIT_COS} as still close"


def distance_words(mean_abs_cos: float) -> str:
    """How far features moved from their initial directions, judged on their mean |cos| to them
    (`similarity.distance_from_init`): 'has moved far from' (< MOVED_FAR_COS), 'is still close to'
    (> NEAR_INIT_COS), else 'has NOT moved far from' (trained partway)."""
    if mean_abs_cos < MOVED_FAR_COS:
        return "has moved far from"
    return "is still close to" if mean_abs_cos > NEAR_INIT_COS else "has NOT moved far from"


def moved_from_init_line(name: str, moved: dict[str, float]) -> str:
    """One line for notebooks 04-05: how far training moved an SAE's features (`similarity.distance_from_init`),
    the decoder and the encoder each judged by `distance_words`, the thresholds stated."""
    dec, enc, rnd = moved["decoder_mean_abs_cos"], moved["encoder_mean_abs_cos"], moved["random"]
    verdict = f"the decoder {distance_words(dec)} its initialisation, the encoder {distance_words(enc)} its initialisation"
    return (f"{name}: mean |cos| of each feature to its initial direction: decoder {dec:.3f}, encoder {enc:.3f} "
            f"(1 = never moved, {rnd:.3f} = unrelated directions; {THRESHOLDS_INIT}): {verdict}")


def budget_words(decoder_cos: float, encoder_cos: float, nn_cos: float, random_nn_cos: float) -> str:
    """Notebook 05's verdict on its dictionaries' training budget: still close to the init (`near_initialisation`),
    NOT far from it (decoder or encoder at mean |cos| >= MOVED_FAR_COS to the init), or well away from it."""
    if near_initialisation(decoder_cos, nn_cos, random_nn_cos):
        return ("still close to their random initialisation, so duplication cannot show at this training budget (more "
                "training is needed: a longer profile, or more steps)")
    if max(decoder_cos, encoder_cos) >= MOVED_FAR_COS:
        return ("NOT far from their random initialisation (trained only partway), so read the duplication numbers "
                "below as a first look at features still forming")
    return "well away from their random initialisation"


def expert_similarity_report(study: dict, profile: Profile) -> str:
    """Notebook 05: training budget, expert x expert similarity, duplication over N, k and frequency,
    Switch vs TopK matching, CKA, and the shared-expert / top-2 variants."""
    main, n0, k0 = study["main"], study["n0"], study["k0"]
    (sd, so), (cd, co) = study["summary"]["switch"], study["summary"]["control"]
    dup, match, cka, fvu = study["dup"], study["match"], study["cka"], study["fvu"]
    d_main, d_topk = dup[(main, "other_expert")], dup[("TopK", "other_expert")]
    fr = d_main["by_frequency"]
    trend_n = ", ".join(f"{r['other_expert']:.1%} (N={r['N']})" for r in sorted((r for r in study["rows"] if r["k"] == k0), key=lambda r: r["N"]))
    trend_k = ", ".join(f"{r['other_expert']:.1%} (k={r['k']})" for r in sorted((r for r in study["rows"] if r["N"] == n0), key=lambda r: r["k"]))
    sw, tt = match["Switch -> TopK"], match["TopK -> TopK (other seed)"]
    sh, t2 = dup[("shared expert", "other_expert")], dup[("top_e=2", "other_expert")]
    moved, moved_enc = study["moved"][main]["decoder_mean_abs_cos"], study["moved"][main]["encoder_mean_abs_cos"]
    budget = budget_words(moved, moved_enc, d_main["mean_nn_cos"], study["random_nn"])
    variants = join_words([compare(v["frac_duplicated"], d_main["frac_duplicated"], DUPLICATE_TOL) for v in (sh, t2)])
    return f"""
- **Training budget** ({profile.name} profile: {profile.train.steps} steps x {profile.train.batch_size} tokens): the main Switch SAE's
  decoder directions have mean |cos| {moved:.3f} to their initial directions, its encoder directions {moved_enc:.3f} (1 = never moved;
  {THRESHOLDS_INIT}); its mean nearest-neighbour cosine is {d_main['mean_nn_cos']:.3f} vs {study['random_nn']:.3f} for random
  directions (within 0.05 counts as random): the dictionaries are {budget}.
- **Expert x expert similarity**: in the Switch SAE ({n0} experts) a feature's best match in ANOTHER expert has mean cosine
  **{so:.3f}**, vs {sd:.3f} within its own expert; in the TopK control (random blocks) {co:.3f} across and {cd:.3f} within.
  Across-expert similarity is {relearning_verdict(so, co, d_main['frac_duplicated'], d_topk['frac_duplicated'])}
  (mean cosines within {SIMILARITY_TOL} count as about equal, duplicated fractions within {DUPLICATE_TOL:.1%}).
- **Duplication** (nearest neighbour in another expert above cosine 0.9): {d_main['frac_duplicated']:.2%} of the main Switch
  SAE's features vs {d_topk['frac_duplicated']:.2%} for the TopK dictionary cut into random blocks. Over N at k={k0}:
  {trend_n}; over k at N={n0}: {trend_k}.
- **By frequency**: duplicated fraction from the rarest to the most frequent quartile: {', '.join(f"{b['frac_duplicated']:.1%}" for b in fr)}
  (mean nearest-neighbour cosine {fr[0]['mean_nn_cos']:.3f} → {fr[-1]['mean_nn_cos']:.3f}).
  The paper's "duplicates concentrate in frequent features" {frequency_verdict(fr)} here (the most frequent quartile
  must exceed the rarest by more than {DUPLICATE_TOL:.1%}).
- **Switch vs TopK features**: a Switch feature's best TopK match has mean cosine {sw['best_cos'].mean():.3f}
  ({(sw['best_cos'] > 0.9).float().mean():.1%} above 0.9), vs {tt['best_cos'].mean():.3f} ({(tt['best_cos'] > 0.9).float().mean():.1%}) between two TopK SAEs that differ only in seed.
- **CKA** with the TopK latents (other seed): Switch {cka[main][0]:.3f} (debiased {cka[main][1]:.3f}); the same-width TopK SAE {cka['TopK'][0]:.3f}
  (debiased {cka['TopK'][1]:.3f}); raw activations {cka['activations'][0]:.3f}.
- **Shared expert / top-2 routing** (k/2 per active expert: the main SAE's L0): duplicated across experts {sh['frac_duplicated']:.2%} with a shared expert and {t2['frac_duplicated']:.2%}
  with top_e=2, vs {d_main['frac_duplicated']:.2%} for the plain Switch SAE ({variants}; within {DUPLICATE_TOL:.1%} counts as about equal); FVU {fvu['shared expert']:.3f} / {fvu['top_e=2']:.3f} / {fvu[main]:.3f}.
"""


RECOVERY_TOL = 0.01  # recovered fractions, NMIs: closer than this count as the same
SYNTHETIC_THRESHOLDS = (f"Words above: 'more', 'rises' and 'falls' need a change above {RECOVERY_TOL:g} in a recovered "
                        f"fraction or NMI, above {SIMILARITY_TOL:g} in the duplicated fraction; smaller changes "
                        "'stay about the same'.")


def synthetic_report(rows: list[dict], n_experts: int, n_true: int, true_l0: float, n_eval: int) -> str:
    """Notebook 06: feature recovery and routing vs the true clusters, from `recovery_sweep` rows."""
    def experiment(name):
        return [r for r in rows if r["experiment"] == name]

    width = experiment("width")
    topk = next(r for r in width if r["name"] == "topk")
    main = next(r for r in width if r["name"] == f"switch-{n_experts}")
    fm = [r for r in width if r["setting"] == "flop_matched"]
    best_fm = max(fm, key=lambda r: r["recovered_frac"])
    by_n = sorted((r for r in width if r["setting"] == "fixed_width"), key=lambda r: r["n_experts"])
    leak = sorted((r for r in experiment("leakage") if r["arch"] == "switch"), key=lambda r: r["leakage"])
    leak_topk = sorted((r for r in experiment("leakage") if r["arch"] == "topk"), key=lambda r: r["leakage"])
    ks = {arch: sorted((r for r in experiment("k") if r["arch"] == arch), key=lambda r: r["k"]) for arch in ("topk", "switch")}
    alpha = sorted(experiment("aux_alpha"), key=lambda r: r["aux_alpha"])
    best_alpha = max(alpha, key=lambda r: r["expert_nmi"])
    more = "more" if best_fm["recovered_frac"] > topk["recovered_frac"] + RECOVERY_TOL else "no more"
    dup0, dup1 = by_n[0]["cross_expert_duplicate_frac"], by_n[-1]["cross_expert_duplicate_frac"]
    lines = [
        f"- TopK recovers {topk['recovered_frac']:.0%} of the {n_true} true features (MMCS {topk['mmcs']:.3f}); "
        f"the fixed-width Switch SAE with {n_experts} experts recovers {main['recovered_frac']:.0%} (MMCS {main['mmcs']:.3f}), "
        f"with FVU {main['fvu']:.3f} vs TopK's {topk['fvu']:.3f}.",
        f"- FLOP-matched, the best Switch SAE ({best_fm['name']}) recovers {best_fm['recovered_frac']:.0%} "
        f"({more} than TopK) at FVU {best_fm['fvu']:.3f}.",
        f"- Routing vs the true clusters: NMI(expert, cluster) = {main['expert_nmi']:.2f} for N={n_experts}, "
        f"{main['expert_nmi'] / max(main['random_nmi'], 1e-6):.0f}x a random routing's {main['random_nmi']:.3f} and "
        f"{main['expert_nmi'] / main['max_nmi']:.0%} of the best possible {main['max_nmi']:.2f}; expert purity "
        f"{main['expert_purity']:.2f}. Across N: "
        + ", ".join(f"N={r['n_experts']}: NMI {r['expert_nmi']:.2f} (best possible {r['max_nmi']:.2f}), "
                    f"recovered {r['recovered_frac']:.0%}" for r in by_n) + ".",
        f"- Dead latents (never fired on {n_eval} held-out samples): TopK {topk['dead_frac']:.0%}, "
        + ", ".join(f"{r['name']} {r['dead_frac']:.0%}" for r in by_n + fm) + ".",
        f"- The fraction of features duplicated in another expert {change(dup0, dup1, SIMILARITY_TOL)}: "
        f"{dup0:.1%} at N={by_n[0]['n_experts']}, {dup1:.1%} at N={by_n[-1]['n_experts']}; TopK has "
        f"{topk['duplicate_frac']:.1%} features with a duplicate. True features learned more than once: "
        f"TopK {topk['redundant_frac']:.1%}, Switch N={n_experts} {main['redundant_frac']:.1%}.",
        f"- As leakage goes from {leak[0]['leakage']:g} to {leak[-1]['leakage']:g}, the Switch SAE's NMI "
        f"{change(leak[0]['expert_nmi'], leak[-1]['expert_nmi'], RECOVERY_TOL)} ({leak[0]['expert_nmi']:.2f} -> {leak[-1]['expert_nmi']:.2f}) and "
        f"its recovery {change(leak[0]['recovered_frac'], leak[-1]['recovered_frac'], RECOVERY_TOL)} ({leak[0]['recovered_frac']:.0%} -> "
        f"{leak[-1]['recovered_frac']:.0%}); the TopK SAE's recovery "
        f"{change(leak_topk[0]['recovered_frac'], leak_topk[-1]['recovered_frac'], RECOVERY_TOL)} "
        f"({leak_topk[0]['recovered_frac']:.0%} -> {leak_topk[-1]['recovered_frac']:.0%}).",
        f"- k against the true L0 of {true_l0:.1f}: recovered "
        + "; ".join(f"{arch} " + ", ".join(f"k={r['k']}: {r['recovered_frac']:.0%}" for r in rs) for arch, rs in ks.items()) + ".",
        f"- Load balancing: NMI is highest at alpha = {best_alpha['aux_alpha']:g} ({best_alpha['expert_nmi']:.2f}); "
        f"alpha = {alpha[0]['aux_alpha']:g} gives load balance {alpha[0]['load_balance']:.2f} and NMI {alpha[0]['expert_nmi']:.2f}; "
        f"the paper's 3d ({alpha[-1]['aux_alpha']:g}) gives load balance {alpha[-1]['load_balance']:.2f}, "
        f"NMI {alpha[-1]['expert_nmi']:.2f}, recovered {alpha[-1]['recovered_frac']:.0%}.",
        f"- {SYNTHETIC_THRESHOLDS}",
    ]
    return "\n".join(lines)


# --- seeds: is a difference larger than the seed spread? ---------------------------------------------------
def seed_comparison_report(rows: list[dict[str, Any]], metric: str = "mse") -> str:
    """One line per group of `seed_comparison`: mean +- std over seeds, the difference to the baseline,
    and whether it exceeds the seed spread."""
    lines = []
    for r in rows:
        head = f"{r['label']}: {metric} {r['mean']:.5g} +- {r['std']:.2g} ({r['n']} seed{'s' * (r['n'] > 1)})"
        if r["label"] == rows[0]["label"]:
            lines.append(head + " (the baseline)")
            continue
        if r["beyond_spread"] is None:
            verdict = "too few seeds to judge"
        elif r["beyond_spread"]:
            verdict = "larger than the seed spread"
        else:
            verdict = "within the seed spread"
        p = f", Welch p = {r['p_value']:.2g}" if r["p_value"] is not None else ""
        lines.append(f"{head}: {r['relative']:+.1%} vs the baseline, {verdict}{p}")
    return "\n".join(lines)


# --- convergence: does training twice as long still change the held-out MSE? ---------------------------------
def profile_convergence_report(profile: Profile, root=None) -> str:
    """`convergence_report` of a profile's results table: every SAE of grid "convergence" (twice the steps, at
    each of profile.convergence_seeds) paired with the same SAE and seed at the profile's steps."""
    from .results import profile_records

    return convergence_report(convergence_check(profile_records(profile, root, all_seeds=True),
                                                profile_records(profile, root, all_seeds=True, steps_factor=2)))


def convergence_report(rows: list[dict[str, Any]], tol: float = CONVERGENCE_TOL) -> str:
    """The sentence a notebook opens with: are its SAEs converged (by the 2x rule), with the numbers. An SAE
    checked at several seeds is judged on its mean change over them (± the std across seeds)."""
    if not rows:
        return ("Convergence not checked for this profile (no SAE trained twice as long: grid 'convergence'); "
                "treat its SAEs as not shown to be converged.")
    groups: dict[str, list[dict]] = {}  # one SAE (its config) over its seeds
    for r in rows:
        groups.setdefault(r["sae"], []).append(r)
    parts, converged, labels = [], [], []
    for rs in groups.values():
        label, k = rs[0]["label"], rs[0]["k"]
        each = [f"{r['mse']:.5g} -> {r['mse_2x']:.5g} ({-r['change']:+.1%})" for r in rs]
        stats = seed_stats([r["change"] for r in rs])
        converged.append(is_converged(stats["mean"], tol))
        labels.append(f"{label} (k={k})")
        if len(rs) == 1:
            parts.append(f"{label} (k={k}): {each[0]}")
        else:
            parts.append(f"{label} (k={k}), {len(rs)} seeds: mean {-stats['mean']:+.1%} ± {stats['std']:.1%} "
                         f"({', '.join(each)})")
    if all(converged):
        verdict = "converged by the rule"
    elif not any(converged):
        verdict = "NOT converged: its SAEs are still improving, read its figures as a first look"
    else:  # say which pass: a profile where TopK converged and Switch did not is not a "first look" at TopK
        passed = ", ".join(lb for lb, c in zip(labels, converged) if c)
        failed = ", ".join(lb for lb, c in zip(labels, converged) if not c)
        verdict = (f"NOT converged as a whole: {passed} converged by the rule, {failed} did not (still improving: "
                   f"its numbers are not final)")
    return (f"Training twice as long ({rows[0]['steps']} -> {2 * rows[0]['steps']} steps) changed held-out MSE by: "
            + "; ".join(parts) + f". Rule: < {tol:.0%} change. This profile is {verdict}.")
