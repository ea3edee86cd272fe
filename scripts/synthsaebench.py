"""Train our SAEs and SAELens's own TopK on SynthSAEBench activations and score them with SAELens's evaluator.

    .venv-tl3/bin/python scripts/synthsaebench.py --scale 4k            # the CPU grid (issue 22), resumable
    .venv-tl3/bin/python scripts/synthsaebench.py --scale ci --steps 60  # tests

Every SAE sees the same activation stream (one fixed array, the same batches in the same order; seeds change only
the initialisation). Records go to data/results/synthsaebench/<scale>/records.jsonl as each SAE finishes (a killed
run resumes where it stopped); the convergence check (the project's 2x rule) trains seed 0 of each SAE for twice
the steps. Needs sae-lens (the TransformerLens-3.9 venv: bash scripts/test_tl3.sh builds it).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def grid(width: int, k: int) -> dict[str, dict]:
    """label -> SAEConfig fields. Fixed width: M = width. FLOP-matched: every input's encoder scores `width`
    latents (top-1 Switch-N with experts `width` wide; top-2, shared expert and Scale over 8 experts of width/2)."""
    return {
        "topk": dict(arch="topk", n_features=width),
        "switch-4": dict(arch="switch", n_features=width, n_experts=4),
        "switch-8": dict(arch="switch", n_features=width, n_experts=8),
        "switch-16": dict(arch="switch", n_features=width, n_experts=16),
        "flop-matched-2": dict(arch="switch", n_features=2 * width, n_experts=2),
        "flop-matched-4": dict(arch="switch", n_features=4 * width, n_experts=4),
        "top-2 (8x)": dict(arch="switch", n_features=4 * width, n_experts=8, top_e=2),
        "shared (8x)": dict(arch="switch", n_features=4 * width, n_experts=8, shared_expert=True),
        "scale (8x)": dict(arch="switch", n_features=4 * width, n_experts=8, top_e=2, global_topk=True,
                           feature_scaling=True),
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scale", default="4k")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--lr-scale", type=float, default=4.0)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--only", nargs="*", default=None, help="labels to run (default: all)")
    p.add_argument("--eval-samples", type=int, default=50_000)
    p.add_argument("--no-convergence", action="store_true")
    p.add_argument("--out", default=None, help="results folder (default data/results/synthsaebench/<scale>)")
    p.add_argument("--cache", default=None, help="model + activations (default $SWITCH_SAE_CACHE/synthsaebench)")
    args = p.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))

    from switch_sae_core import claims, paths
    from switch_sae_core.config import SAEConfig, TrainConfig
    from switch_sae_core.heldout import reconstruction_metrics
    from switch_sae_core.interop import synthsaebench as sb
    from switch_sae_core.results import append_record, load_records
    from switch_sae_core.train import base_lr, train_sae

    scale = sb.SCALES[args.scale]
    cache = Path(args.cache or paths.cache_dir() / "synthsaebench") / args.scale
    cache.mkdir(parents=True, exist_ok=True)
    out = Path(args.out or ROOT / "data" / "results" / "synthsaebench" / args.scale)
    records_file = out / "records.jsonl"
    t0 = time.time()
    print(f"[synthsaebench] model {args.scale}: {scale}", flush=True)
    model = sb.load_or_build_model(scale, cache / "model")
    doubled = 0 if args.no_convergence else 2
    n_train = max(doubled, 1) * args.steps * args.batch_size
    train_rows = sb.generate_activations(model, n_train, cache / f"train_{n_train}.npy", seed=1)
    heldout = torch.from_numpy(sb.generate_activations(model, 32_768, cache / "heldout.npy", seed=2).astype("float32"))
    print(f"[synthsaebench] data ready ({n_train} training rows) after {time.time() - t0:.0f} s", flush=True)
    source = sb.ArraySource(train_rows)

    done = {(r["label"], r["seed"], r["steps"]) for r in load_records(records_file)}
    labels = ["sae-lens topk", *grid(scale.sae_width, scale.k)]  # SAELens's own TopK beside ours, same stream
    runs = [(label, seed, args.steps) for seed in args.seeds for label in labels]
    runs += [] if args.no_convergence else [(label, 0, 2 * args.steps) for label in labels]
    if args.only:
        runs = [r for r in runs if r[0] in args.only]
    todo = [r for r in runs if r not in done]
    print(f"[synthsaebench] {len(runs)} SAEs, {len(runs) - len(todo)} already in {records_file}", flush=True)
    for i, (label, seed, steps) in enumerate(todo):
        t1 = time.time()
        lr_law_cfg = SAEConfig(arch="topk", d_in=scale.hidden_dim, n_features=scale.sae_width, k=scale.k)
        train_cfg = TrainConfig(steps=steps, batch_size=args.batch_size, lr_scale=args.lr_scale, seed=seed,
                                log_every=50, dead_window_tokens=200_000, progress=False)
        if label == "sae-lens topk":
            sl = sb.train_sae_lens_topk(scale.hidden_dim, scale.sae_width, scale.k,
                                        source.batches(args.batch_size), steps, args.batch_size,
                                        lr=base_lr(train_cfg, scale.sae_width), decay_frac=train_cfg.lr_decay_frac,
                                        seed=seed)
            sl.eval()
            with torch.no_grad():
                x_hat = torch.cat([sl.decode(sl.encode(x)) for x in heldout.split(4096)])
            from switch_sae_core import metrics
            recon = {"mse": float(metrics.mse(heldout, x_hat)), "fvu": float(metrics.fvu(heldout, x_hat))}
            sae_cfg, dup = {"arch": "sae_lens.topk", "n_features": scale.sae_width, "k": scale.k}, {}
        else:
            fields = grid(scale.sae_width, scale.k)[label]
            try:
                cfg = SAEConfig(d_in=scale.hidden_dim, k=scale.k, **fields)
            except TypeError as e:
                print(f"[synthsaebench] skip {label}: this checkout cannot build it ({e})", flush=True)
                continue
            sae = train_sae(cfg, source, train_cfg).sae
            sae.save(cache / "saes" / f"{label.replace(' ', '_')}_seed{seed}_steps{steps}")  # for later analyses
            recon = reconstruction_metrics(sae, heldout)
            from switch_sae_core.analysis.recovery import duplicate_stats
            dup = duplicate_stats(sae.decoder_directions().detach(), n_experts=sae.n_latents // cfg.expert_width
                                  if cfg.arch == "switch" else 1)
            sl = sb.as_sae_lens(sae)
            sae_cfg = cfg.to_dict()
        scores = sb.evaluate(sl, model, args.eval_samples, seed=3)
        from switch_sae_core.analysis.recovery import feature_recovery
        true_FD, learned_MD = model.feature_dict.feature_vectors.detach(), sl.W_dec.detach().float()
        rec_all = feature_recovery(true_FD, learned_MD)
        frequent = feature_recovery(true_FD[:scale.sae_width], learned_MD)  # Zipfian: feature 0 fires most often
        scores.update(recovered_frac=rec_all["recovered_frac"], redundant_frac=rec_all["redundant_frac"],
                      mmcs=rec_all["mmcs"], recovered_frac_frequent=frequent["recovered_frac"])
        rec = {"label": label, "seed": seed, "steps": steps, "batch_size": args.batch_size, "scale": args.scale,
               "lr_scale": args.lr_scale, "sae": sae_cfg, **recon, **dup, **scores,
               "train_seconds": time.time() - t1}
        append_record(records_file, rec)
        print(f"[synthsaebench] {i + 1}/{len(todo)} {label} seed {seed} steps {steps}: mse {recon['mse']:.3f} "
              f"mcc {scores['mcc']:.3f} uniq {scores['uniqueness']:.3f} f1 {scores['f1']:.3f} "
              f"({time.time() - t1:.0f} s)", flush=True)
    print(f"[synthsaebench] done in {time.time() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    sys.exit(main())
