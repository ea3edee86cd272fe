"""Train our SAEs and SAELens's own TopK on SynthSAEBench activations and score them with SAELens's evaluator.

    .venv-tl3/bin/python scripts/synthsaebench.py --scale 4k            # the CPU grid (issue 22), resumable
    .venv-tl3/bin/python scripts/synthsaebench.py --scale ci --steps 60  # seconds

Every SAE sees one identical activation stream (seeds change only the initialisation); records go to
data/results/synthsaebench/<scale>/records.jsonl as each SAE finishes (`interop.synthsaebench.run_grid`).
Needs sae-lens: the TransformerLens-3.9 venv that `bash scripts/test_tl3.sh` builds.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scale", default="4k", help="a key of interop.synthsaebench.SCALES (16k, 4k, ci)")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--lr-scale", type=float, default=4.0, help="multiple of Gao et al.'s lr law (as the cpu profile)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--only", nargs="*", default=None, help="labels to run (default: all)")
    p.add_argument("--eval-samples", type=int, default=50_000)
    p.add_argument("--no-convergence", action="store_true", help="skip the 2x-steps runs of seed 0")
    p.add_argument("--out", default=None, help="results folder (default data/results/synthsaebench/<scale>)")
    p.add_argument("--cache", default=None, help="model, activations, SAEs (default $SWITCH_SAE_CACHE/synthsaebench)")
    args = p.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))

    from switch_sae_core import paths
    from switch_sae_core.interop.synthsaebench import run_grid

    run_grid(args.scale, out=args.out or ROOT / "data" / "results" / "synthsaebench" / args.scale,
             cache=Path(args.cache or paths.cache_dir() / "synthsaebench") / args.scale, steps=args.steps,
             batch_size=args.batch_size, lr_scale=args.lr_scale, seeds=args.seeds, only=args.only,
             eval_samples=args.eval_samples, convergence=not args.no_convergence,
             log=lambda s: print(s, flush=True))


if __name__ == "__main__":
    main()
