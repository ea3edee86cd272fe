"""The SAEs that notebooks 04 and 05 study, trained once through the one cache, and notebook 05's
measurements of them (expert similarity, duplication, feature matching, CKA).

`study_configs(profile, d_in)` names every SAE: Switch SAEs over N (at the middle k) and over k (at the
main N), a shared-expert and a top-2 variant of the main one, the TopK SAE of the same width, and a
second TopK SAE with seed 1 (same-seed SAEs of equal width START from the same random dictionary).
All of them are `cache.train_or_load` entries: the ones in the sweep's fixed-width grid are the very
SAEs of the results table, and notebook 04's Switch and TopK SAEs are the same entries as 05's.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from .. import metrics
from ..cache import train_or_load
from ..config import SAEConfig
from ..profiles import Profile
from ..results import baseline_width
from . import similarity as S
from .result_types import DuplicationRow, DuplicationStats, ExpertStudy, FrequencyBin

SECOND_SEED = 1  # the TopK SAE matched against: another seed, so matches are not shared initialisations


class StudySAE(NamedTuple):
    cfg: SAEConfig
    seed: int


def main_n_k(profile: Profile) -> tuple[int, int]:
    """(N, k) of the main Switch SAE: the second fixed-width expert count (or the only one), the middle k."""
    ns = profile.fixed_width_experts
    return ns[min(1, len(ns) - 1)], profile.ks[len(profile.ks) // 2]


def study_configs(profile: Profile, d_in: int) -> dict[str, StudySAE]:
    """{name: (SAEConfig, seed)}; the main Switch SAE is named f'N={N} k={k}', see `main_name`."""
    m, (n0, k0) = baseline_width(profile, d_in), main_n_k(profile)
    seed = profile.train.seed

    def switch(n: int = n0, k: int = k0, **variant) -> StudySAE:
        return StudySAE(SAEConfig(arch="switch", d_in=d_in, n_features=m, n_experts=n, k=k, **variant), seed)

    out = {f"N={n} k={k0}": switch(n) for n in profile.fixed_width_experts}
    out.update({f"N={n0} k={k}": switch(k=k) for k in profile.ks})
    # at the main SAE's L0: a Switch SAE keeps k per ACTIVE expert, so the two variants (2 experts per input)
    # take k/2 each (k each doubled their L0 before December 2026: the committed figures/ of notebook 05 until redrawn)
    out["shared expert"] = switch(k=k0 // 2, shared_expert=True)
    out["top_e=2"] = switch(k=k0 // 2, top_e=2)
    topk = SAEConfig(arch="topk", d_in=d_in, n_features=m, k=k0)
    out["TopK"] = StudySAE(topk, seed)
    out[f"TopK seed {SECOND_SEED}"] = StudySAE(topk, SECOND_SEED)
    return out


def main_name(profile: Profile) -> str:
    n0, k0 = main_n_k(profile)
    return f"N={n0} k={k0}"


def load_study_sae(profile: Profile, spec: StudySAE, source: Any, need_history: bool = False):
    """(sae, info) of one study SAE from the cache (trained there the first time)."""
    train_cfg = profile.train if spec.seed == profile.train.seed else profile.train.replace(seed=spec.seed)
    return train_or_load(profile, spec.cfg, source, train_cfg=train_cfg, need_history=need_history)


def duplication(dirs_MD: Tensor, n_blocks: int, scope: str, control_blocks: int, freq_M: Tensor | None) -> DuplicationStats:
    """`similarity.duplication_stats` of one dictionary. A dictionary with no experts (TopK) is cut into
    `control_blocks` random blocks for scope 'other_expert' (block order is random: no frequency split)."""
    if scope == "other_expert" and n_blocks < 2:
        cos, _ = S.nearest_neighbour_cosines(S.random_blocks(dirs_MD), control_blocks, scope)
        return S.duplication_stats(cos)
    cos, _ = S.nearest_neighbour_cosines(dirs_MD, n_blocks, scope)
    return S.duplication_stats(cos, freq_M)


def expert_similarity_study(profile: Profile, store: Any, n_eval: int = 4096, n_cka: int = 2048) -> ExpertStudy:
    """Every number notebook 05 shows, from the study SAEs on `n_eval` held-out activations of `store`.

    Returns an `ExpertStudy` (read as a dict too, `study["dup"]`): 'saes', 'codes', 'fvu', 'main', 'n0', 'k0', 'sim'/'ctrl' ((N, N) expert x expert
    best-cosine matrices of the main Switch SAE and of the TopK SAE cut into N random blocks),
    'summary' ({'switch'|'control': (within, across)}), 'dup' ({(name, scope): duplication stats}),
    'rows' (duplication of the plain Switch SAEs by N and k), 'random_nn' (mean nearest-neighbour cosine
    of a random Gaussian dictionary), 'match' (feature matching to the seed-1 TopK SAE) and 'cka'
    ({name: (biased, debiased) linear CKA with the seed-1 TopK latents on `n_cka` tokens}) and 'moved'
    ({name: `similarity.distance_from_init`}: how far training moved each SAE's features)."""
    x_eval = store.eval_activations()[:n_eval]
    specs = study_configs(profile, store.d_in)
    saes = {name: load_study_sae(profile, spec, store)[0] for name, spec in specs.items()}
    main, (n0, k0) = main_name(profile), main_n_k(profile)
    moved = {name: S.distance_from_init(sae, specs[name].seed) for name, sae in saes.items()}
    codes = {name: S.collect_codes(sae, x_eval) for name, sae in saes.items()}
    dirs = {name: sae.decoder_directions() for name, sae in saes.items()}
    freq = {name: S.firing_frequency(codes[name], dirs[name].shape[0]) for name in saes}
    with torch.no_grad():
        fvu = {name: metrics.fvu(x_eval, sae(x_eval).x_hat).item() for name, sae in saes.items()}
    sim = S.expert_similarity_matrix(dirs[main], n0)
    ctrl = S.expert_similarity_matrix(S.random_blocks(dirs["TopK"], seed=0), n0)
    off = ~torch.eye(n0, dtype=torch.bool)
    summary = {name: (m.diagonal().mean().item(), m[off].mean().item()) for name, m in (("switch", sim), ("control", ctrl))}
    dup = {(name, scope): duplication(dirs[name], getattr(saes[name], "n_stacked", 1), scope, n0, freq[name])
           for name in saes for scope in ("other_expert", "anywhere")}
    rows = [DuplicationRow(name=name, N=spec.cfg.n_experts, k=spec.cfg.k, mean_nn_cos=dup[(name, "other_expert")].mean_nn_cos,
                           **{scope: dup[(name, scope)].frac_duplicated for scope in ("other_expert", "anywhere")})
            for name, spec in specs.items()
            if spec.cfg.arch == "switch" and not spec.cfg.shared_expert and spec.cfg.top_e == 1]
    m, d = dirs["TopK"].shape
    random_cos, _ = S.nearest_neighbour_cosines(torch.randn(m, d, generator=torch.Generator().manual_seed(0)), n0, "other_expert")
    other = dirs[f"TopK seed {SECOND_SEED}"]
    hungarian = m * m <= 25_000_000  # the one-to-one assignment is O(M^3): skipped for large dictionaries
    match = {
        "Switch -> TopK": S.match_features(dirs[main][:m], other, hungarian),
        "TopK -> TopK (other seed)": S.match_features(dirs["TopK"], other, hungarian),
        "Switch -> TopK (same seed, same init)": S.match_features(dirs[main][:m], dirs["TopK"], hungarian),
    }
    t = min(n_cka, x_eval.shape[0])
    gram = {name: S.linear_gram(S.sparse_latents(c.acts_TK[:t], c.ids_TK[:t], dirs[name].shape[0])) for name, c in codes.items()}
    gram["activations"] = S.linear_gram(x_eval[:t])
    ref = f"TopK seed {SECOND_SEED}"
    cka = {name: (S.cka_from_grams(g, gram[ref]), S.cka_from_grams(g, gram[ref], debiased=True))
           for name, g in gram.items() if name != ref}
    return ExpertStudy(saes=saes, codes=codes, freq=freq, fvu=fvu, x_eval=x_eval, main=main, n0=n0, k0=k0, sim=sim,
                       ctrl=ctrl, summary=summary, dup=dup, rows=rows, hungarian=hungarian,
                       random_nn=random_cos.mean().item(), match=match, moved=moved, cka=cka, cka_tokens=t)


# --- notebook 05's tables: the study's numbers as pandas DataFrames, one row per SAE (or per row of a figure) ----
def sae_table(study: ExpertStudy):
    """Per study SAE: its features (M, a shared expert's included), held-out FVU, the fraction dead on the
    held-out tokens, and the mean |cos| of its decoder and encoder directions to their initial ones
    (`similarity.distance_from_init`: 1 = never moved; `claims.moved_from_init_line` says it in words)."""
    import pandas as pd

    return pd.DataFrame({name: {"features": sae.decoder_directions().shape[0], "FVU": study["fvu"][name],
                                "dead on held-out": (study["freq"][name] == 0).float().mean().item(),
                                "decoder |cos| to init": study["moved"][name]["decoder_mean_abs_cos"],
                                "encoder |cos| to init": study["moved"][name]["encoder_mean_abs_cos"]}
                         for name, sae in study["saes"].items()}).T.astype({"features": int}).round(3)


def similarity_table(study: ExpertStudy):
    """The expert x expert best-cosine matrices summed up: mean on the diagonal (within an expert) and off it
    (across experts), for the main Switch SAE and the TopK control cut into N random blocks."""
    import pandas as pd

    return pd.DataFrame(study["summary"], index=["within expert (diagonal)", "across experts (off-diagonal)"]).T.round(3)


def duplication_table(study: ExpertStudy):
    """Per study SAE: the fraction of features whose nearest neighbour (decoder cosine) is above
    `similarity.DUPLICATE_COSINE` in another expert and anywhere, and the mean nearest-neighbour cosine in
    another expert (a TopK dictionary: in another of N random blocks)."""
    import pandas as pd

    dup = study["dup"]
    return pd.DataFrame({name: {"duplicated, other expert": dup[(name, "other_expert")]["frac_duplicated"],
                                "duplicated, anywhere": dup[(name, "anywhere")]["frac_duplicated"],
                                "mean NN cosine, other expert": dup[(name, "other_expert")]["mean_nn_cos"]}
                         for name in study["saes"]}).T.round(4)


def frequency_table(by_frequency: list[FrequencyBin]):
    """`similarity.duplication_stats`'s 'by_frequency' bins (rarest quartile first, dead features left out): per
    bin its features, the fraction duplicated and the mean nearest-neighbour cosine."""
    import pandas as pd

    return pd.DataFrame([{"firing-frequency bin": b["label"], "features": b["n"], "duplicated": b["frac_duplicated"],
                          "mean NN cosine": b["mean_nn_cos"]} for b in by_frequency]).set_index("firing-frequency bin").round(4)


def matching_table(study: ExpertStudy):
    """Per matching of one dictionary to another (`similarity.match_features`): the mean best decoder cosine,
    the fraction above `similarity.DUPLICATE_COSINE`, and (when computed) the one-to-one Hungarian mean."""
    import pandas as pd

    rows = {}
    for name, m in study["match"].items():
        rows[name] = {"mean best cosine": m["best_cos"].mean().item(),
                      f"best cosine > {S.DUPLICATE_COSINE}": (m["best_cos"] > S.DUPLICATE_COSINE).float().mean().item()}
        if study["hungarian"]:
            rows[name]["Hungarian one-to-one mean"] = m["assigned_cos"].nanmean().item()
    return pd.DataFrame(rows).T.round(3)


def cka_table(study: ExpertStudy):
    """Linear CKA (biased, debiased) of each study SAE's latents, and of the raw activations, with the latents of
    the TopK SAE of seed `SECOND_SEED` on the same `study['cka_tokens']` held-out tokens."""
    import pandas as pd

    return pd.DataFrame(study["cka"], index=["CKA", "debiased CKA"]).T.round(3)


def variant_table(study: ExpertStudy, variants: list[str]):
    """Per Switch variant (the main SAE, a shared expert, top-2 routing): duplicated across experts overall and
    in the most frequent quartile, the mean nearest-neighbour cosine in another expert, and held-out FVU."""
    import pandas as pd

    dup = study["dup"]
    return pd.DataFrame({v: {"duplicated across experts": dup[(v, "other_expert")]["frac_duplicated"],
                             "... in the most frequent quartile": dup[(v, "other_expert")]["by_frequency"][-1]["frac_duplicated"],
                             "mean NN cosine, other expert": dup[(v, "other_expert")]["mean_nn_cos"],
                             "FVU": study["fvu"][v]} for v in variants}).T.round(4)
