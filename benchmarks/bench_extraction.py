"""Activation extraction speed of SmolLM2-135M-Instruct on this machine, by layer (stop_at_layer = L + 1), and the
speed of the evaluation's tail run (blocks L+1.. + unembedding, once per SAE and batch).

Both wall-clock and CPU time are measured: on a shared machine the wall-clock rate depends on the other
processes, while tokens per CPU-second times the number of torch threads estimates the rate of an
idle machine. The load average at the start is printed with the table.

    python benchmarks/bench_extraction.py                         # layers 4 8 16 20 29, 8 batches of 16 x 128
    python benchmarks/bench_extraction.py --layers 20 --batches 4 --json out.json
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch

from switch_sae_core.data import lm, text


def timed(fn, repeats: int) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of `repeats` calls of fn, after one warm-up call."""
    fn()
    w0, c0 = time.perf_counter(), time.process_time()
    for _ in range(repeats):
        fn()
    return time.perf_counter() - w0, time.process_time() - c0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--layers", type=int, nargs="+", default=[4, 8, 16, 20, 29])
    p.add_argument("--batch-size", type=int, default=16, help="contexts per forward pass")
    p.add_argument("--context-len", type=int, default=128)
    p.add_argument("--batches", type=int, default=8, help="timed batches per layer")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args()

    load = os.getloadavg()[0]
    model = lm.load_model(args.model, device="cpu")
    ctxs = text.contexts(text.documents("offline"), model.tokenizer, args.context_len, model.prepend_bos)
    tokens = torch.stack([next(ctxs) for _ in range(args.batch_size)])
    n_tok = tokens.numel() * args.batches
    threads = torch.get_num_threads()
    rows = []
    for layer in args.layers:
        hook = f"blocks.{layer}.hook_resid_post"
        wall, cpu = timed(lambda: model.activations(tokens, hook), args.batches)
        acts = model.activations(tokens, hook)
        t_wall, t_cpu = timed(lambda: model.logits_from_resid(acts, layer), args.batches)
        rows.append(dict(layer=layer, extract_tok_s=n_tok / wall, extract_tok_cpu_s=n_tok / cpu,
                         extract_idle_tok_s=n_tok / cpu * threads, tail_tok_s=n_tok / t_wall,
                         tail_idle_tok_s=n_tok / t_cpu * threads))
        print(rows[-1], flush=True)

    print(f"\n{args.model}, {model.backend}, batch {args.batch_size} x {args.context_len} tokens, "
          f"{threads} torch threads, load average {load:.1f} at the start\n")
    print("| layer | extraction tok/s (wall) | extraction tok/s (idle estimate) | eval tail tok/s (wall) | eval tail tok/s (idle estimate) |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['layer']} | {r['extract_tok_s']:.0f} | {r['extract_idle_tok_s']:.0f} | "
              f"{r['tail_tok_s']:.0f} | {r['tail_idle_tok_s']:.0f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(model=args.model, backend=model.backend, threads=threads, load_average=load,
                           batch_size=args.batch_size, context_len=args.context_len, rows=rows), f, indent=2)


if __name__ == "__main__":
    main()
