"""Why does FLOP-matched Switch lose to TopK at the `quick` scale? One factor at a time (issue 11).

    python scripts/ablation_flop_matched_gap.py                 # every arm, resumable
    python scripts/ablation_flop_matched_gap.py --arms paper lr_expert --seeds 0 1 2

The `quick` profile's training (600 steps x 512 tokens, k = 32) on its cached SmolLM2 layer-20
activations; TopK (M = 4d) against FLOP-matched Switch SAEs with 2 and 4 experts (each expert 4d wide).
Arms change ONE thing of the paper's recipe (two for the combined arm):

- paper:        the paper's recipe (lr from the total width, alpha * d * L_aux, batch 512, outlier filter on)
- lr_expert:    lr from the expert width M/N (TrainConfig.lr_width = "expert"; Switch only)
- alpha_no_d:   alpha * L_aux instead of alpha * d * L_aux (SAEConfig.aux_scale_by_d = False; Switch only)
- lr_expert+alpha_no_d: both of the above
- batch_4096:   batch 4096 instead of 512 (same 600 steps, so 8x the tokens)
- no_filter:    activations cached without the outlier filter (DataConfig.max_norm_ratio = 0)

One record per SAE (the results format of data/results/), plus the column `arm`, in
data/results/ablation/records.jsonl; a killed run resumes (SAEs already there are skipped, unfinished
trainings resume from their checkpoints). Summary: switch_sae_core.claims / docs/convergence.md.
"""
from __future__ import annotations

import argparse
import json

from switch_sae_core.config import SAEConfig
from switch_sae_core.profiles import get_profile
from switch_sae_core.keys import config_hash
from switch_sae_core.results import load_records, results_path
from switch_sae_core.sweep import build_context, train_and_record

K = 32
ARMS = {  # name: (train changes, data changes, sae changes, applies to TopK)
    "paper": ({}, {}, {}, True),
    "lr_expert": ({"lr_width": "expert"}, {}, {}, False),
    "alpha_no_d": ({}, {}, {"aux_scale_by_d": False}, False),
    "lr_expert+alpha_no_d": ({"lr_width": "expert"}, {}, {"aux_scale_by_d": False}, False),
    "batch_4096": ({"batch_size": 4096}, {}, {}, True),
    "no_filter": ({}, {"max_norm_ratio": 0.0}, {}, True),
}


def sae_configs(d_in: int, width_multiple: int, n_experts=(2, 4)) -> list[SAEConfig]:
    m = width_multiple * d_in
    return [SAEConfig(arch="topk", d_in=d_in, n_features=m, k=K)] + [
        SAEConfig(arch="switch", d_in=d_in, n_features=n * m, n_experts=n, k=K) for n in n_experts]


def summary_rows(records: list[dict]) -> list[dict]:
    """Per arm and SAE: held-out MSE over seeds against the TopK SAE trained on the same data and batch (the
    arm's own TopK where it trains one, else the paper arm's), via checks.seed_comparison."""
    from switch_sae_core.checks import seed_comparison

    rows = []
    for arm, (_, _, _, with_topk) in ARMS.items():
        mine = [r for r in records if r.get("arm") == arm]
        if not mine:
            continue
        topk = [r for r in records if r.get("arm") == (arm if with_topk else "paper") and r["arch"] == "topk"]
        for metric in ("mse", "loss_recovered"):
            for row in seed_comparison(topk + [r for r in mine if r["arch"] == "switch"], metric=metric):
                rows.append({"arm": arm, "metric": metric, **row})
    return rows


def write_summary(path) -> str:
    """summary.md beside the table: one line per arm, SAE and metric (mean +- std over seeds, vs TopK)."""
    rows = summary_rows(load_records(path))
    lines = ["| arm | SAE | metric | mean ± std | seeds | vs TopK | beyond the seed spread |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["label"] == "topk" and r["arm"] not in ("paper", "batch_4096", "no_filter"):
            continue
        fmt = "{:.1f}" if r["metric"] == "mse" else "{:.4f}"
        vs = "—" if r["label"] == "topk" else f"{r['relative']:+.1%}"
        beyond = "—" if r["beyond_spread"] is None else ("yes" if r["beyond_spread"] else "no")
        lines.append(f"| {r['arm']} | {r['label']} | {r['metric']} | {fmt.format(r['mean'])} ± {fmt.format(r['std'])} "
                     f"| {r['n']} | {vs} | {beyond} |")
    text = ("Made by `python scripts/ablation_flop_matched_gap.py --summary` from records.jsonl (k = 32, the quick "
            "profile's 600 steps x 512 tokens unless the arm says otherwise; TopK M = 4d = 2304).\n\n" + "\n".join(lines) + "\n")
    (path.parent / "summary.md").write_text(text)
    return text


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--base-profile", default="quick")
    p.add_argument("--no-lm", action="store_true", help="skip the CE loss-recovered evaluation")
    p.add_argument("--summary", action="store_true", help="train nothing: write summary.md from the table")
    a = p.parse_args()
    if a.summary:
        print(write_summary(results_path("ablation")))
        return
    base = get_profile(a.base_profile)
    path = results_path("ablation")
    done = {r["key"] for r in load_records(path)} if path.is_file() else set()
    contexts = {}
    for arm in a.arms:
        train_changes, data_changes, sae_changes, with_topk = ARMS[arm]
        data = base.data.replace(**data_changes)
        key = json.dumps(data.to_dict(), sort_keys=True)
        if key not in contexts:
            contexts[key] = build_context(base.replace(data=data), with_lm=not a.no_lm)
        ctx = contexts[key]
        for seed in a.seeds:
            profile = base.replace(name="ablation", data=data, train=base.train.replace(seed=seed, **train_changes))
            for cfg in sae_configs(ctx.d_in, base.width_multiple):
                if cfg.arch == "topk" and not with_topk:
                    continue
                cfg = cfg.replace(**sae_changes) if cfg.arch == "switch" else cfg
                if config_hash(cfg, profile.train, data) in done:
                    continue
                record = train_and_record(profile, cfg, profile.train, ctx, path, arm=arm,
                                          command="python scripts/ablation_flop_matched_gap.py " + " ".join(
                                              f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
                                              for k, v in vars(a).items() if v not in (False, None)))
                done.add(record["key"])
                print(f"{arm:22s} seed {seed} {record['name']:22s} mse {record['mse']:.1f} "
                      f"({record['wall_clock_s']:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
