"""One expert weight gradient, dW = A^T g with A the (T, F) matrix holding k values per row at the
TopK ids, four ways (process CPU time, median of `--repeats`, one process):

- `embedding_bag`: the reference path's backward (`F.embedding_bag(...).backward`: a sort of the ids and
  a zero-filled (F, D) buffer);
- `csr addmm`: `ops._SparseExperts`' backward until issue 25 (one sort of unique int keys, a CSR (F, T)
  matrix, `torch.addmm(..., beta=0, out=...)` into a fresh buffer that is never zero-filled);
- `bag per feature`: `ops._SparseExperts`' backward now (`ops._feature_major_matmul`: the same index, one
  `embedding_bag` over g with a bag per feature, into a fresh buffer);
- `dense grouped_mm`: the (T, F/G) per-group gradient scattered into zeros and one
  `F.grouped_mm(A^T, g)` over the groups (2 T (F/G) D FLOPs instead of 2 T k D).

    python benchmarks/bench_expert_backward.py                      # Switch-16 and FLOP-matched-8 shapes
    python benchmarks/bench_expert_backward.py --threads 1

Writes benchmarks/results/expert_backward_cpu.md (the command, date and load average above the table).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

import torch
from timing import cpu_time
import torch.nn.functional as F

from switch_sae_core.ops import _feature_major_index, _feature_major_matmul

SHAPES = {"switch-16": (16, 1536), "switch-8-flopmatched": (8, 24576), "topk": (1, 24576)}  # G, W



def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "expert_backward_cpu.md")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    T, D, K = args.batch, 768, 32
    lines = [f"`python benchmarks/bench_expert_backward.py {' '.join(sys.argv[1:])}` — T={T}, D={D}, k={K}, torch threads "
             f"{torch.get_num_threads()}, torch {torch.__version__}, cpus={os.cpu_count()}, {time.strftime('%Y-%m-%d %H:%M')}, "
             f"load average at start {os.getloadavg()[0]:.1f}; CPU s per weight gradient", "",
             "| shape | G x W | embedding_bag (the reference path) | csr addmm (before issue 25) | bag per feature (ours) "
             "| dense grouped_mm |", "|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    for name, (G, W) in SHAPES.items():
        torch.manual_seed(0)
        n_features = G * W
        ids_TK = torch.cat([torch.randint(0, W, (T // G, K)) + g * W for g in range(G)])
        acts_TK, g_TD = torch.rand(T, K), torch.randn(T, D)
        offs_G = torch.full((G,), T // G).cumsum(0).to(torch.int32)

        def embedding_bag():
            W_leaf = torch.zeros(n_features, D, requires_grad=True)
            F.embedding_bag(ids_TK, W_leaf, per_sample_weights=acts_TK, mode="sum").backward(g_TD)
            return W_leaf.grad

        def csr_addmm():
            crow, col, order = _feature_major_index(ids_TK, n_features)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                A_FT = torch.sparse_csr_tensor(crow, col, acts_TK.reshape(-1)[order], size=(n_features, T),
                                               check_invariants=False)
            out_FD = torch.empty(n_features, D)
            return torch.addmm(out_FD, A_FT, g_TD, beta=0, out=out_FD)

        def dense_grouped():
            A_TW = torch.zeros(T, W).scatter_add_(1, ids_TK % W, acts_TK)
            return F.grouped_mm(A_TW.t(), g_TD, offs=offs_G).reshape(n_features, D)

        def bag_per_feature():
            return _feature_major_matmul(_feature_major_index(ids_TK, n_features), acts_TK, g_TD)

        fns = (embedding_bag, csr_addmm, bag_per_feature, dense_grouped)
        ref = embedding_bag()
        for fn in fns[1:]:
            torch.testing.assert_close(fn(), ref, rtol=1e-4, atol=1e-4)
        t = [cpu_time(fn, args.repeats) for fn in fns]
        lines.append(f"| {name} | {G} x {W} | " + " | ".join(f"{v:.3f}" for v in t) + " |")
        print(lines[-1], flush=True)
    lines[0] += f"; load average at end {os.getloadavg()[0]:.1f}"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
