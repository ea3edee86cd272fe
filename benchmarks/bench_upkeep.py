"""Decoder upkeep of one step, fused vs unfused (process CPU time, median of `--repeats`, one process):

- unfused (the recipe before): `g -= einsum(g, w) w` over the whole decoder, torch's
  `clip_grad_norm_` (a norm pass and an unconditional scale pass over every gradient), then
  `W /= W.norm(dim=-1)`;
- fused: `BaseSAE.upkeep_gradients` (projection and the clipping norm per cache-sized block of decoder
  rows, scaling only when clipping) and the blocked `BaseSAE.normalize_decoder`.

    python benchmarks/bench_upkeep.py --threads 1
"""
from __future__ import annotations

import argparse

import torch
from timing import cpu_time

from switch_sae_core.config import SAEConfig
from switch_sae_core.saes import build_sae



@torch.no_grad()
def unfused(sae, max_norm: float) -> None:
    g, w = sae.W_dec.grad, sae.W_dec
    g.addcmul_(torch.einsum("...d,...d->...", g, w).unsqueeze(-1), w, value=-1)
    torch.nn.utils.clip_grad_norm_(sae.parameters(), max_norm)
    w.div_(w.norm(dim=-1, keepdim=True).clamp_min(1e-12))


def fused(sae, max_norm: float) -> None:
    sae.upkeep_gradients(max_norm)
    sae.normalize_decoder()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print("| config | M | unfused (s) | fused (s) |\n|---|---|---|---|")
    for name, m, n in (("topk", 24576, 1), ("switch-8-flopmatched", 196608, 8)):
        torch.manual_seed(0)
        sae = build_sae(SAEConfig(arch="topk" if n == 1 else "switch", d_in=768, n_features=m, k=32, n_experts=n))
        for p_ in sae.parameters():
            p_.grad = torch.randn_like(p_)
        # max_norm = 1e9: the gradients stay unclipped over the repeats (the fused path then skips the
        # scaling pass, torch's clip_grad_norm_ multiplies by 1.0)
        t = [cpu_time(lambda: f(sae, 1e9), args.repeats) for f in (unfused, fused)]
        print(f"| {name} | {m} | {t[0]:.3f} | {t[1]:.3f} |", flush=True)


if __name__ == "__main__":
    main()
