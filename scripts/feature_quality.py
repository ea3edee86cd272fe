"""Feature quality on real activations (issue 22, items 2-3): seed stability, Switch<->TopK matching, absorption.

    python scripts/feature_quality.py --profile cpu     # after `switch-sae sweep --profile cpu --grid seeds fixed_width`

For the profile's k = claim_k SAEs (TopK and FLOP-matched Switch at every seed of grids "seeds" and "flop_matched"; fixed-width Switch
at the profile's seed), loaded from the one train-or-load cache (trained first if missing):
1. stability: the fraction of each SAE's features that another seed's SAE of the same kind has at decoder
   cos > 0.9, and the same between Switch and TopK (`analysis.stability`), one record per ordered pair, in
   data/results/stability/<profile>/records.jsonl (rewritten: it is a pure function of the SAEs);
2. absorption (SAEBench's first-letter eval, scripts/absorption.py score) of every one of them, appended to
   data/results/absorption/<profile>/records.jsonl (resumable).

    python scripts/feature_quality.py --profile cpu --variants   # after `SWITCH_SAE_RESULTS=data/results/variants/cpu
                                                                  #   switch-sae sweep --profile cpu --grid variants
                                                                  #   [--seed S]` (at each seed wanted)
3. with --variants instead: the duplication of every SAE of the `variants` grid (issue 22 item 4: top-1, top-2,
   shared expert, Scale SAE at equal encoder FLOPs; `analysis.recovery.sae_duplicate_stats`: the fraction of features
   with a decoder neighbour above cos 0.9 anywhere and in another expert), one record per SAE and seed of the
   variants table in
   data/results/variants/<profile>/duplication.jsonl (rewritten: a pure function of the SAEs).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--profile", default="cpu")
    p.add_argument("--no-absorption", action="store_true")
    p.add_argument("--variants", action="store_true", help="only the duplication of the variants grid's SAEs")
    args = p.parse_args(argv)
    if args.variants:
        return variants_duplication(args.profile)

    from switch_sae_core import durable
    from switch_sae_core.analysis.stability import stability_rows, summarize
    from switch_sae_core.cache import train_or_load
    from switch_sae_core.profiles import get_profile
    from switch_sae_core.results import baseline_width, sae_label, setting_of
    from switch_sae_core.sweep import build_context, sweep_jobs

    profile = get_profile(args.profile)
    ctx = build_context(profile, with_lm=False)
    jobs = [(c, t) for c, t in sweep_jobs(profile, ["seeds", "flop_matched", "fixed_width"], ctx)
            if c.arch in ("topk", "switch") and c.k == profile.claim_k]
    dirs, folders = {}, []
    for cfg, train_cfg in jobs:
        sae, info = train_or_load(profile, cfg, ctx.source, train_cfg, ctx.data_cfg, ctx.heldout_BD)
        label = sae_label(cfg) + ("-fm" if setting_of(cfg, baseline_width(profile, ctx.d_in)) == "flop_matched" else "")
        dirs.setdefault(label, {})[train_cfg.seed] = sae.decoder_directions().detach()
        folders.append((label, train_cfg.seed, info["dir"]))
    rows = stability_rows(dirs, reference="topk")
    out = ROOT / "data" / "results" / "stability" / profile.name
    out.mkdir(parents=True, exist_ok=True)
    durable.atomic_write_text(out / "records.jsonl", "".join(json.dumps(dataclasses.replace(r, profile=profile.name).to_json()) + "\n"
                                                             for r in rows))
    for s in summarize(rows):
        print(f"{s['kind']:5s} {s['a']:>12s} -> {s['b']:<12s} n={s['n']}: shared {s['shared_frac']:.3f} "
              f"+- {s['shared_frac_std']:.3f}, mean best cos {s['mean_best_cos']:.3f} (chance {s['chance_best_cos']:.3f})")
    if args.no_absorption:
        return
    absorption_out = ROOT / "data" / "results" / "absorption" / profile.name / "records.jsonl"
    for label, seed, folder in folders:
        subprocess.run([sys.executable, str(ROOT / "scripts" / "absorption.py"), "score", "--label", label,
                        "--seed", str(seed), "--out", str(absorption_out), str(folder)], check=True)


def variants_duplication(profile_name: str) -> None:
    from switch_sae_core import durable
    from switch_sae_core.analysis.feature_quality import table
    from switch_sae_core.analysis.recovery import sae_duplicate_stats
    from switch_sae_core.cache import train_or_load
    from switch_sae_core.profiles import get_profile
    from switch_sae_core.sweep import build_context, variant_configs

    profile = get_profile(profile_name)
    ctx, rows = build_context(profile, with_lm=False), []
    # every seed at which the variants table holds ALL the grid's SAEs (`switch-sae sweep --grid variants --seed S`):
    # they are in the cache; a seed still being swept is skipped (scoring it would train its missing SAEs here)
    from switch_sae_core.keys import config_hash

    recorded = {r["key"] for r in table("variants", profile.name)}
    configs = variant_configs(profile, ctx.d_in)
    for seed in sorted({r["seed"] for r in table("variants", profile.name)}):
        train_cfg = profile.train.replace(seed=seed)
        if any(config_hash(cfg, train_cfg, ctx.data_cfg) not in recorded for cfg in configs.values()):
            print(f"seed {seed}: the variants table does not hold every SAE of the grid yet; skipped")
            continue
        for label, cfg in configs.items():
            sae, info = train_or_load(profile, cfg, ctx.source, train_cfg, ctx.data_cfg, ctx.heldout_BD)
            dup = sae_duplicate_stats(sae).to_json()
            rows.append({"label": label, "seed": seed, "steps": train_cfg.steps, "key": info["key"],
                         "n_latents": int(sae.n_latents), **dup, "profile": profile.name})
            print(f"{label:16s} seed {seed}: duplicated anywhere {dup['duplicate_frac']:.4f}, in another "
                  f"expert {dup.get('cross_expert_duplicate_frac', float('nan')):.4f}")
    out = ROOT / "data" / "results" / "variants" / profile.name
    out.mkdir(parents=True, exist_ok=True)
    durable.atomic_write_text(out / "duplication.jsonl", "".join(json.dumps(r) + "\n" for r in rows))


if __name__ == "__main__":
    main()
