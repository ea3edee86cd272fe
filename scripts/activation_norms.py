"""Measure the norm distribution of cached-to-be activations, per offline corpus, to choose the
outlier filter's default (`DataConfig.max_norm_ratio`).

    python scripts/activation_norms.py --model smollm2-135m --layer 20 --tokens 16384

For each offline source it extracts `--tokens` activations (special tokens dropped, as the store does),
prints quantiles of ||x|| / median(||x||), the share of sum ||x||^2 carried by rows above several ratios,
and the positions of the largest rows. Writes the table as CSV next to --out when given.
"""
from __future__ import annotations

import argparse
import csv

import numpy as np
import torch

from switch_sae_core.data import lm, text


def source_norms(model: lm.LanguageModel, source: str, hook: str, n_tokens: int, context_len: int = 128):
    docs = text.offline_documents(seed=0, sources=[source])
    norms, positions = [], []
    got = 0
    batch = []
    for ctx in text.contexts(iter(docs), model.tokenizer, context_len, model.prepend_bos):
        batch.append(ctx)
        if len(batch) < 16:
            continue
        toks = torch.stack(batch)
        batch = []
        acts = model.activations(toks, hook)
        keep = ~text.special_mask(toks, model.tokenizer)
        norms.append(acts.norm(dim=-1)[keep].numpy())
        positions.append(keep.nonzero()[:, 1].numpy())
        got += int(keep.sum())
        if got >= n_tokens:
            break
    return np.concatenate(norms)[:n_tokens], np.concatenate(positions)[:n_tokens]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--layer", type=int, default=20)
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--sources", default=",".join(text.OFFLINE_SOURCES))
    p.add_argument("--out", default=None, help="CSV file for the table")
    a = p.parse_args()
    model = lm.load_model(a.model, device="cpu")
    hook = f"blocks.{a.layer}.hook_resid_post"
    ratios = (3, 5, 10, 20, 50)
    quantiles = (0.5, 0.9, 0.99, 0.999, 1.0)
    rows = []
    for source in a.sources.split(","):
        n, pos = source_norms(model, source, hook, a.tokens)
        r = n / np.median(n)
        sq = n.astype(np.float64) ** 2
        row = {"model": a.model, "hook": hook, "source": source, "rows": len(n), "median_norm": float(np.median(n))}
        row |= {f"q{q:g}": float(np.quantile(r, q)) for q in quantiles}
        for t in ratios:
            above = r > t
            row[f"frac_above_{t}"] = float(above.mean())
            row[f"sq_share_above_{t}"] = float(sq[above].sum() / sq.sum())
        top = np.argsort(-r)[:5]
        row["top_ratios"] = " ".join(f"{r[i]:.1f}@pos{pos[i]}" for i in top)
        rows.append(row)
        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
    if a.out:
        with open(a.out, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)


if __name__ == "__main__":
    main()
