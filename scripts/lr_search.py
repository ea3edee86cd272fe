"""Choose a baseline family's lr multiplier on the validation split (issue 23 item 3, docs/baselines.md).

    python scripts/lr_search.py --profile cpu --family relu              # one process
    python scripts/lr_search.py --profile cpu --family relu --shard 0/2  # two, one per core (cache built first)

Trains the family's claim SAE (the frontier coefficient expected nearest L0 = claim_k; TopK/BatchTopK: k = claim_k)
at every multiplier of profile.lr_search_scales and records each run, measured on the validation rows, in
data/results/lr_search/<profile>/records.jsonl ($SWITCH_SAE_LR_SEARCH: another folder). After a kill, run the same
command again: recorded runs are skipped, an unfinished one resumes from its checkpoint. Prints the table and the
chosen multiplier (the lowest validation objective), which the frontier grids then train with.
"""
from __future__ import annotations

import argparse
import sys

from switch_sae_core.cli import _shard, prepare_process
from switch_sae_core.errors import SwitchSAEError
from switch_sae_core.lr_search import LR_FAMILIES, run_lr_search
from switch_sae_core.profiles import get_profile


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--profile", default="cpu")
    p.add_argument("--family", required=True, choices=LR_FAMILIES)
    p.add_argument("--shard", type=_shard, default=(0, 1), metavar="I/N",
                   help="train only the multipliers I, I+N, ... (N processes share one search and one table)")
    a = p.parse_args()
    try:
        profile = get_profile(a.profile)
        prepare_process(argparse.Namespace())
        choice = run_lr_search(profile, a.family, shard=a.shard)
    except SwitchSAEError as e:
        sys.exit(f"lr_search.py: {e}")
    for row in choice["rows"]:
        print(f"lr x{row['lr_scale']:g}: validation objective {row['objective']:.5g}, MSE {row['mse']:.5g}, "
              f"L0 {row['l0']:.1f}, dead {row['dead_fraction']:.3f}")
    if choice["chosen"] is None:
        print(f"not complete: multipliers {choice['missing']} not recorded yet (another shard, or run this again)")
    else:
        edge = " (at the edge of the range tried: widen lr_search_scales)" if choice["at_edge"] else ""
        print(f"{a.family}: chosen lr multiplier x{choice['chosen']:g}{edge}")


if __name__ == "__main__":
    main()
