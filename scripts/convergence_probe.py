"""Size a profile's training budget: train one SAE for S and for 2S steps and report how much the held-out
MSE still changes (the convergence check of docs/convergence.md: < 3% means converged).

    python scripts/convergence_probe.py --profile cpu --steps 500 --arch topk
    python scripts/convergence_probe.py --profile cpu --steps 500 --arch switch --n-experts 2

Each trained SAE is a record (with its held-out MSE curve) in data/results/<profile>_sizing/records.jsonl;
trainings resume after a kill (the one train-or-load cache).
"""
from __future__ import annotations

import argparse

from switch_sae_core import checks
from switch_sae_core.config import SAEConfig
from switch_sae_core.profiles import get_profile
from switch_sae_core.keys import config_hash
from switch_sae_core.results import baseline_width, load_records, results_path
from switch_sae_core.sweep import build_context, train_and_record


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--profile", default="cpu")
    p.add_argument("--steps", type=int, required=True, help="S: the SAE is trained for S and for 2S steps")
    p.add_argument("--arch", default="topk", choices=["topk", "switch"])
    p.add_argument("--n-experts", type=int, default=1, help="Switch: FLOP-matched, each expert as wide as TopK")
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch", type=int, default=None, help="activations per step (default: the profile's)")
    p.add_argument("--lr-scale", type=float, default=None, help="multiple of the lr law (default: the profile's lr_scale)")
    p.add_argument("--lr-width", default=None, choices=["total", "expert"],
                   help="the width the lr law reads (default: the profile's; 'expert' = M/N, a named option)")
    p.add_argument("--width-multiple", type=int, default=None, help="M = this x d (default: the profile's)")
    a = p.parse_args()
    base = get_profile(a.profile)
    train = base.train.replace(batch_size=base.train.batch_size if a.batch is None else a.batch,
                               lr_scale=base.train.lr_scale if a.lr_scale is None else a.lr_scale,
                               lr_width=base.train.lr_width if a.lr_width is None else a.lr_width)
    base = base.replace(train=train, width_multiple=base.width_multiple if a.width_multiple is None else a.width_multiple)
    ctx = build_context(base, with_lm=False)
    m = baseline_width(base, ctx.d_in)
    cfg = SAEConfig(arch=a.arch, d_in=ctx.d_in, n_features=m * a.n_experts, n_experts=a.n_experts, k=a.k)
    path = results_path(f"{a.profile}_sizing")
    done = {r["key"]: r for r in load_records(path)}
    mses = []
    for steps in (a.steps, 2 * a.steps):
        # the profile's own eval_every: an SAE trained here is the sweep's SAE (same key, one cache), curve included
        profile = base.replace(name=f"{a.profile}_sizing", train=base.train.replace(steps=steps))
        key = config_hash(cfg, profile.train, profile.data)
        if key not in done:
            # the S-step run keeps its decay-start state: the 2S-step run continues from it (cache.py)
            done[key] = train_and_record(
                profile, cfg, profile.train, ctx, path, keep_decay_checkpoint=steps == a.steps,
                command="python scripts/convergence_probe.py " +
                f"--profile {a.profile} --steps {a.steps} --arch {a.arch} --n-experts {a.n_experts} --k {a.k} " +
                f"--batch {train.batch_size} --lr-scale {train.lr_scale:g} --lr-width {train.lr_width} " +
                f"--width-multiple {base.width_multiple}")
        mses.append(done[key]["mse"])
        print(f"{done[key]['name']} steps {steps} x {base.train.batch_size}: held-out MSE {mses[-1]:.1f} "
              f"(train {done[key]['train_seconds']:.0f} s)", flush=True)
    change = checks.relative_change(*mses)
    print(f"doubling the training from {a.steps} to {2 * a.steps} steps changed held-out MSE by {change:.1%}: "
          f"{'converged' if checks.is_converged(change) else 'NOT converged'} by the < {checks.CONVERGENCE_TOL:.0%} rule")


if __name__ == "__main__":
    main()
