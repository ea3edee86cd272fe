"""How peaked a Switch SAE's router is at initialisation, per data site (issue 23: why Gemma-3-270M differs).

The router's logits are W_router (x - b_router): with nn.Linear's init they grow with the input's norm, and the
SAEs here train on raw activations (the paper's choice). For each site's held-out activations (4096 rows), a
FLOP-matched-width Switch SAE is built as the trainer builds it (`initialisation.init_biases`: every centring bias
at the geometric median), and the router's mean entropy and mean top probability are averaged over 3 init seeds.
No training. Writes data/results/router_init/entropy.md.

    python scripts/router_init_entropy.py [--profiles cpu cpu_l10 cpu_gemma]
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from switch_sae_core import durable, metrics
from switch_sae_core.config import SAEConfig
from switch_sae_core.data.store import ActivationStore
from switch_sae_core.initialisation import init_biases
from switch_sae_core.profiles import get_profile
from switch_sae_core.saes.switch import SwitchSAE

OUT = Path(__file__).resolve().parents[1] / "data" / "results" / "router_init" / "entropy.md"


def router_at_init(x_BD: torch.Tensor, n_experts: int, seed: int) -> tuple[float, float]:
    """(mean entropy in nats, mean top probability) of a freshly initialised router on `x_BD`."""
    torch.manual_seed(seed)
    sae = SwitchSAE(SAEConfig(arch="switch", d_in=x_BD.shape[1], n_features=4 * x_BD.shape[1], n_experts=n_experts,
                              k=32))
    with torch.no_grad():
        init_biases(sae, x_BD)
        probs_BN = sae.route(x_BD)[0]
    return float(metrics.router_entropy(probs_BN)), float(probs_BN.max(-1).values.mean())


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--profiles", nargs="+", default=["cpu", "cpu_l10", "cpu_gemma"])
    args = p.parse_args(argv)
    rows = ["| site | median ‖x‖ | experts | router entropy at init (nats) | uniform | mean top probability |",
            "|---|---|---|---|---|---|"]
    for name in args.profiles:
        profile = get_profile(name)
        store = ActivationStore.build_or_load(profile.data, progress=False)
        x_BD = torch.as_tensor(store.eval_activations()[:4096]).float()
        median_norm = float(x_BD.norm(dim=1).median())
        for n in (2, 4, 16):
            entropy, top = zip(*(router_at_init(x_BD, n, seed) for seed in range(3)))
            rows.append(f"| {profile.data.site_label} | {median_norm:.0f} | {n} | "
                        f"{sum(entropy) / 3:.3f} | {math.log(n):.3f} | {sum(top) / 3:.3f} |")
            print(rows[-1], flush=True)
    header = (f"`python scripts/router_init_entropy.py --profiles {' '.join(args.profiles)}` "
              "(3 init seeds, 4096 held-out rows)\n\n")
    durable.atomic_write_text(OUT, header + "\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
