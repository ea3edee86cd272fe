"""Capacity on paper: memory per rank and communication per step of expert-parallel Switch SAE training.

All sizes in bytes, fp32 everywhere (4 bytes), Adam. The tables in docs/distributed.md come from
`python -m switch_sae_core.distributed.capacity`.
"""
from __future__ import annotations

import math

FP32 = 4
STATE_COPIES = 4  # parameter + gradient + Adam first and second moments
GIB = 2**30
H200_USABLE_GIB = 139.0  # 141 GB nominal; what torch reports as usable on one H200


def param_counts(M: int, N: int, d: int, P: int) -> dict[str, int]:
    """Parameters held by one rank: its N/P experts (W_enc and W_dec, M/P features each) and the
    replicated router W_router (N, d), b_router and b_pre (d each)."""
    return {"experts": 2 * M * d // P, "replicated": N * d + 2 * d}


def train_bytes_per_rank(M: int, N: int, d: int, P: int) -> int:
    """(params + grads + 2 Adam moments) x fp32 on one rank: 16 (2 M d / P + N d + 2 d)."""
    return STATE_COPIES * FP32 * sum(param_counts(M, N, d, P).values())


def activation_bytes_per_rank(b: int, M: int, N: int, d: int, E: int = 1, k: int = 32, imbalance: float = 1.0) -> int:
    """Rough peak of one step's activations on one rank: the b*E*imbalance rows it receives need
    their expert's M/N pre-activations (the grouped matmul's output, fp32) plus a few (rows, d)
    buffers (sent/received inputs and outputs, their gradients) and the (b, N) router probabilities."""
    rows = math.ceil(b * E * imbalance)
    return FP32 * (rows * (M // N) + 8 * rows * d + 2 * b * N + 4 * rows * k)


def min_ranks(M: int, N: int, d: int, B: int, usable_gib: float = H200_USABLE_GIB, E: int = 1,
              power_of_two: bool = True) -> int:
    """Fewest ranks whose memory holds the training state and one step's activations (B / P rows per
    rank). power_of_two: P a power of two dividing N (every rank must own N / P experts)."""
    P = 1
    while P <= N:
        fits = train_bytes_per_rank(M, N, d, P) + activation_bytes_per_rank(math.ceil(B / P), M, N, d, E) \
            <= usable_gib * GIB
        if fits and (not power_of_two or N % P == 0):
            return P
        P = P * 2 if power_of_two else P + 1
    raise ValueError(f"even one expert per rank (P = N = {N}) does not fit in {usable_gib} GiB")


def all_to_all_bytes_per_rank(b: int, d: int, P: int, E: int = 1, k: int = 32) -> int:
    """Bytes one rank SENDS per step in the all-to-alls under balanced routing: of its b*E assignment
    rows a fraction (P-1)/P leave the rank; each carries d floats out (x - b_pre), d floats back (the
    expert output), and in backward the two gradients (d floats each way), plus its expert id (int64)
    and its k latent values (fp32) and ids (int64) on the way back. It receives as much."""
    rows_out = b * E * (P - 1) / P
    return round(rows_out * (4 * d * FP32 + 8 + k * (FP32 + 8)))


def allreduce_bytes_per_rank(N: int, d: int, P: int) -> int:
    """Ring all-reduce of the replicated gradients (W_router, b_router, b_pre): each rank sends
    2 (P-1)/P times their size."""
    return round(2 * (P - 1) / P * (N * d + 2 * d) * FP32)


def report(M: int, N: int, d: int, B: int, E: int = 1, k: int = 32) -> str:
    P = min_ranks(M, N, d, B, E=E)
    P_any = min_ranks(M, N, d, B, E=E, power_of_two=False)
    b = B // P
    lines = [
        f"M = {M:,} features, N = {N:,} experts of {M // N:,}, d = {d}, global batch B = {B:,}, top_e = {E}, k = {k}",
        f"  all parameters: {2 * M * d + N * d + 2 * d:,}; training state (x16 bytes): "
        f"{train_bytes_per_rank(M, N, d, 1) / GIB:,.0f} GiB in total",
        f"  fewest H200s ({H200_USABLE_GIB:.0f} GiB usable): {P_any} by memory alone; {P} with P dividing N",
        f"  at P = {P}: state {train_bytes_per_rank(M, N, d, P) / GIB:.1f} GiB per rank "
        f"(experts {STATE_COPIES * FP32 * param_counts(M, N, d, P)['experts'] / GIB:.1f}, replicated router "
        f"{STATE_COPIES * FP32 * param_counts(M, N, d, P)['replicated'] / GIB:.2f}), activations "
        f"{activation_bytes_per_rank(b, M, N, d, E, k) / 2**20:.1f} MiB (b = {b} rows per rank)",
        f"  per step and rank: all-to-all sends {all_to_all_bytes_per_rank(b, d, P, E, k) / 2**20:.2f} MiB, "
        f"router-gradient all-reduce sends {allreduce_bytes_per_rank(N, d, P) / 2**20:.0f} MiB",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    for d in (768, 4096):
        print(report(M=2**30, N=2**15, d=d, B=8192))
        print(report(M=2**30, N=2**15, d=d, B=2**20))
        print()
