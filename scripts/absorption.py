"""Feature absorption (SAEBench's first-letter eval, Chanin et al. 2024) of trained SAEs on SmolLM2.

    python scripts/absorption.py probe                      # does the residual stream carry first letters linearly?
    python scripts/absorption.py score DIR [DIR ...]        # absorption of each SAE folder, appended as records

`probe` writes data/results/absorption/probe.json: per layer, the ground-truth probe's per-letter F1 and
accuracy on held-out words, beside chance and beside the same probe trained on shuffled labels.
`score` appends one record per SAE to data/results/absorption/records.jsonl (resumable: an SAE whose weights
and dataset already have a record is skipped). Label and seed: --label/--seed, else the record of the SAE's
cache key (the folder `.../saes/<key>/final`) in --records, else the config's label and no seed.
The first-letter dataset (one SmolLM2 forward pass per word, ~0.4 s each on one CPU thread) is built once
into $SWITCH_SAE_CACHE/first_letter/ and shared by both commands and every SAE.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "data" / "results" / "absorption"
DATASET_LAYERS = (5, 10, 15, 20)  # collected in one pass (the probe check); the cache key depends on them


def hook(layer: int) -> str:
    return f"blocks.{layer}.hook_resid_post"


def load_dataset(args):
    from switch_sae_core.data import first_letter as fl

    return fl.load_or_build(args.model, [hook(L) for L in DATASET_LAYERS], args.n_words, args.data_seed,
                            args.n_icl)


def portable(arg: str) -> str:
    """A path of this machine as a committed table may hold it: under the cache as $SWITCH_SAE_CACHE/..., under
    the checkout relative to it; anything else as given."""
    from switch_sae_core import paths

    p = Path(arg).expanduser()
    if not p.is_absolute():
        return arg
    for root, name in ((paths.cache_dir().resolve(), "$SWITCH_SAE_CACHE/"), (ROOT.resolve(), "")):
        if p.resolve().is_relative_to(root):
            return name + str(p.resolve().relative_to(root))
    return arg


def command_line() -> str:
    return "python scripts/absorption.py " + " ".join(a if a.startswith("$") else shlex.quote(a)
                                                      for a in map(portable, sys.argv[1:]))


def cmd_probe(args) -> None:
    from switch_sae_core.analysis import absorption as ab

    t0 = time.perf_counter()
    data = load_dataset(args)
    layers = {}
    for L in DATASET_LAYERS:
        x_tr, y_tr, _ = data.split(hook(L), train=True)
        x_te, y_te, _ = data.split(hook(L), train=False)
        rep = ab.probe_report(ab.train_letter_probe(x_tr, y_tr), x_te, y_te)
        g = torch.Generator().manual_seed(args.data_seed)
        shuffled = y_tr[torch.randperm(len(y_tr), generator=g)]
        ctrl = ab.probe_report(ab.train_letter_probe(x_tr, shuffled), x_te, y_te)
        control = {k: ctrl[k] for k in ("accuracy", "mean_f1", "n_letters_f1_above_min")}
        layers[str(L)] = {**rep.to_json(), "shuffled_label_control": control}
        print(f"layer {L:2d}: accuracy {rep['accuracy']:.3f} (majority {rep['majority_accuracy']:.3f}, shuffled-label "
              f"probe {ctrl['accuracy']:.3f}); mean F1 {rep['mean_f1']:.3f} (chance {rep['mean_chance_f1']:.3f}); "
              f"{rep['n_letters_f1_above_min']} letters with F1 > {ab.MIN_PROBE_F1}")
    out = dict(command=command_line(), dataset=data.meta, n_train=int(data.train_N.sum()),
               n_test=int((~data.train_N).sum()), probe="scikit-learn LogisticRegression, one-vs-rest per letter, "
               "class_weight='balanced', C=1, standardised inputs; score > 0 = detected; accuracy = argmax",
               min_probe_f1=ab.MIN_PROBE_F1, layers=layers, seconds=time.perf_counter() - t0)
    OUT.mkdir(parents=True, exist_ok=True)
    path = Path(args.out or OUT / "probe.json")
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(out, indent=1))
    tmp.replace(path)
    print(f"wrote {path}")


def file_sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def label_and_seed(folder: Path, cfg, args, records: list[dict]) -> tuple[str, int | None, str | None]:
    """(label, seed, key): the command line's, else the training record of the folder's cache key."""
    from switch_sae_core.results import sae_label

    key = folder.parent.name if folder.name == "final" else folder.name
    match = [r for r in records if r.get("key") == key]
    rec = match[0] if match else {}
    label = args.label or rec.get("label") or sae_label(cfg)
    seed = args.seed if args.seed is not None else rec.get("seed")
    return label, seed, key if match else None


def cmd_score(args) -> None:
    from switch_sae_core.analysis import absorption as ab
    from switch_sae_core.data import first_letter as fl
    from switch_sae_core.results import append_record, git_commit, load_records
    from switch_sae_core.saes.base import load_sae

    folders = [Path(d) for d in args.sae_dirs]
    for d in folders:  # clear errors before the expensive work
        if not ((d / "sae.safetensors").is_file() and (d / "config.json").is_file()):
            sys.exit(f"{d} is not an SAE folder (needs sae.safetensors and config.json)")
    if args.label and len(folders) > 1:
        sys.exit("--label names one SAE: give one folder per call, or let --records name them")
    out_path = Path(args.out or OUT / "records.jsonl")
    done = {(r.get("weights_sha"), r.get("dataset_key")) for r in load_records(out_path)}
    train_records = load_records(args.records) if args.records else []
    h = hook(args.layer)
    if args.layer not in DATASET_LAYERS:
        sys.exit(f"--layer {args.layer}: the dataset holds layers {DATASET_LAYERS}")
    dataset_key = fl.cache_key(args.model, [hook(L) for L in DATASET_LAYERS], args.n_words, args.data_seed, args.n_icl)
    todo = [(d, file_sha(d / "sae.safetensors")) for d in folders]
    todo = [(d, sha) for d, sha in todo if (sha, dataset_key) not in done]
    print(f"{len(folders) - len(todo)} of {len(folders)} SAEs already scored in {out_path}")
    if not todo:
        return
    data = load_dataset(args)
    x_tr, y_tr, _ = data.split(h, train=True)
    x_te, y_te, _ = data.split(h, train=False)
    probe = ab.train_letter_probe(x_tr, y_tr)  # the ground truth: the same for every SAE
    for d, sha in todo:
        t0, c0 = time.perf_counter(), time.process_time()
        sae = load_sae(d).eval()
        if sae.cfg.d_in != x_tr.shape[1]:
            print(f"skip {d}: d_in={sae.cfg.d_in} but {args.model} {h} has width {x_tr.shape[1]}")
            continue
        label, seed, key = label_and_seed(d, sae.cfg, args, train_records)
        scores = ab.evaluate_sae(sae, probe, x_tr, y_tr, x_te, y_te, seed=args.probe_seed)
        cfg = sae.cfg
        record = dict(
            label=label, seed=seed, key=key, sae_dir=portable(str(d.resolve())), weights_sha=sha, arch=cfg.arch,
            n_features=cfg.n_features, n_experts=cfg.n_experts, top_e=cfg.top_e, k=cfg.k, hook=h, model=args.model,
            dataset_key=dataset_key, n_words=args.n_words, n_train=len(y_tr), n_test=len(y_te), n_icl=args.n_icl,
            **{k: v for k, v in scores.items()},
            thresholds=dict(full_cos=ab.FULL_ABSORPTION_PROBE_COS_THRESHOLD,
                            fraction_cos=ab.ABSORPTION_FRACTION_PROBE_COS_THRESHOLD,
                            projection_share=ab.PROBE_PROJECTION_PROPORTION_THRESHOLD,
                            max_absorbers=ab.MAX_ABSORBING_LATENTS, f1_jump=ab.F1_JUMP_THRESHOLD, max_k=ab.MAX_K,
                            min_probe_f1=ab.MIN_PROBE_F1, min_letters=ab.MIN_LETTERS, l1_probe_steps=ab.L1_PROBE_STEPS),
            method="SAEBench absorption (arXiv 2503.09532; Chanin et al. arXiv 2409.14507), adapted: see "
                   "switch_sae_core/analysis/absorption.py",
            seconds=time.perf_counter() - t0, cpu_seconds=time.process_time() - c0, git_commit=git_commit(),
            command=command_line(), finished_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        )
        append_record(out_path, record)
        print(f"{label} seed={seed}: mean absorption fraction {scores['mean_absorption_fraction']:.4f}, full absorption "
              f"{scores['mean_full_absorption']:.4f}, {scores['mean_num_split_features']:.2f} main latents, "
              f"{scores['n_letters']} letters ({record['seconds']:.0f} s, {record['cpu_seconds']:.0f} CPU s)")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    for name in ("probe", "score"):
        s = sub.add_parser(name)
        s.add_argument("--model", default="smollm2-135m")
        s.add_argument("--n-words", type=int, default=4000, help="vocabulary words sampled (SAEBench: all)")
        s.add_argument("--n-icl", type=int, default=10, help="in-context examples per prompt (SAEBench: 10)")
        s.add_argument("--data-seed", type=int, default=0, help="word sample, split and prompts")
        s.add_argument("--out", default=None)
    s = sub.choices["score"]
    s.add_argument("sae_dirs", nargs="+")
    s.add_argument("--layer", type=int, default=20)
    s.add_argument("--label", default=None)
    s.add_argument("--seed", type=int, default=None, help="the SAE's training seed (for the record)")
    s.add_argument("--records", default=str(ROOT / "data" / "results" / "cpu" / "records.jsonl"),
                   help="training records to read each SAE's label and seed from (by cache key)")
    s.add_argument("--probe-seed", type=int, default=0, help="seed of the L1 probe's initialisation and order")
    args = p.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    {"probe": cmd_probe, "score": cmd_score}[args.command](args)


if __name__ == "__main__":
    main()
