"""The torchrun entry point: train one SAE over all processes of the job.

    torchrun --standalone --nproc_per_node=P -m switch_sae_core.distributed --config run.json [--expert-parallel]
    torchrun ... -m switch_sae_core.distributed --config run.json --n-experts 64 --steps 1000 --out sae_dir

run.json: {"sae": {SAEConfig fields}, "train": {TrainConfig fields}, and one data section:
"data": {DataConfig fields} (the cached activations of a language model; rank 0 builds the cache, the
others wait and load it) or "synthetic": {SyntheticConfig fields} (ground-truth activations)}.
Every SAEConfig / TrainConfig field is also a flag (`--batch-size`, `--n-experts`), applied on top.
TrainConfig.batch_size is the GLOBAL batch; every rank trains on batch_size / P rows of it.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

from ..config import ConfigError, DataConfig, SAEConfig, TrainConfig
from .comm import (DEFAULT_TIMEOUT_S, DistributedConfigError, RankFailureError, barrier, init_distributed,
                   exit_now, long_barrier, shutdown)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m switch_sae_core.distributed",
                                description="Train one SAE across the processes of a torchrun job "
                                            "(data-parallel, or expert-parallel for Switch SAEs).")
    p.add_argument("--config", required=True, help="JSON with 'sae', 'train' and 'data' or 'synthetic' sections")
    p.add_argument("--expert-parallel", action="store_true", help="shard the Switch experts over the ranks")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in checkpoint_dir")
    p.add_argument("--out", default=None, help="rank 0 saves the whole trained SAE here (expert parallelism: "
                                                "assembled from the sharded checkpoint; needs the memory for it)")
    p.add_argument("--timeout-s", type=float, default=DEFAULT_TIMEOUT_S,
                   help="a collective waiting longer than this fails (a dead or hung rank)")
    SAEConfig.add_arguments(p)
    TrainConfig.add_arguments(p)
    return p


def read_run_config(path: str | Path) -> dict[str, Any]:
    try:
        run = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"cannot read the run config {path}: {e}") from None
    unknown = sorted(set(run) - {"sae", "train", "data", "synthetic"})
    if unknown or ("data" in run) == ("synthetic" in run):
        raise ConfigError(f"{path}: expected keys 'sae', 'train' and exactly one of 'data' / 'synthetic'; "
                          f"got {sorted(run)}")
    return run


def make_source(run: dict[str, Any], ctx):
    """The BatchSource every rank reads the same global batches from."""
    if "synthetic" in run:
        from ..data.synthetic import SyntheticConfig, SyntheticSource

        return SyntheticSource(SyntheticConfig.from_dict(run["synthetic"]))
    from ..data.store import ActivationStore

    data_cfg = DataConfig.from_dict(run["data"])
    if ctx.is_main:  # one rank extracts; the others would race on the same cache folder
        ActivationStore.build_or_load(data_cfg)
    long_barrier(ctx, "waiting for rank 0 to build the activation cache")
    return ActivationStore.build_or_load(data_cfg, verify="size")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Exit status 0; 2 for a configuration error, 1 when a rank failed (the message says why)."""
    from ..saes.base import CheckpointError

    try:
        return train_from_args(build_parser().parse_args(argv))
    except (ConfigError, DistributedConfigError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    except RankFailureError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        exit_now(1)


def train_from_args(ns: argparse.Namespace) -> int:
    from .trainer import train_distributed

    run = read_run_config(ns.config)
    sae_cfg = SAEConfig.from_dict({**run.get("sae", {}), **SAEConfig.overrides_from_args(ns)})
    train_cfg = TrainConfig.from_dict({**run.get("train", {}), **TrainConfig.overrides_from_args(ns)})
    if ns.expert_parallel and not train_cfg.checkpoint_dir and ns.out:
        train_cfg = train_cfg.replace(checkpoint_dir=str(Path(ns.out) / "shards"))
    ctx = init_distributed(train_cfg.device, timeout_s=ns.timeout_s)
    try:
        source = make_source(run, ctx)
        if source.d_in != sae_cfg.d_in:
            raise ConfigError(f"sae.d_in={sae_cfg.d_in} but the activations have width {source.d_in}")
        result = train_distributed(sae_cfg, source, train_cfg, ctx=ctx, expert_parallel=ns.expert_parallel,
                                   resume=ns.resume)
        if ctx.is_main and result.history:
            last = result.history[-1]
            print(f"[rank 0/{ctx.world_size}] step {last['step']}: loss {last['loss']:.5g}  mse {last['mse']:.5g}  "
                  f"l0 {last['l0']:.1f}  dead {last['dead_frac']:.3f}", flush=True)
        if ns.out and ctx.is_main:
            if ns.expert_parallel:
                from .expert_parallel import load_sharded

                load_sharded(train_cfg.checkpoint_dir).save(ns.out)
            else:
                result.sae.save(ns.out)
            print(f"[rank 0] saved the trained SAE to {ns.out}", flush=True)
        barrier(ctx, "end of training")
    except RankFailureError:
        raise  # no teardown of a broken process group (see exit_now)
    except BaseException:
        shutdown()
        raise
    shutdown()
    return 0


if __name__ == "__main__":
    exit_now(main())  # a finished run leaves without the interpreter's finalization too (see there)
