"""`switch-sae`: the command line. Every config field is a flag (`Config.add_arguments`).

    switch-sae reproduce --profile quick        # sweeps + every notebook, headless -> outputs/quick/
    switch-sae train --profile quick --arch switch --n-experts 8 --k 32 --steps 500
    switch-sae sweep --profile quick --grid flop_matched
    switch-sae cache --profile quick            # build the cached activations only
    switch-sae evaluate path/to/sae_dir --profile quick

Flags: SAEConfig and TrainConfig fields as `--name` (`--n-experts`, `--batch-size`), DataConfig fields
as `--data-name` (`--data-layer`, `--data-n-train-tokens`). Booleans take true/false, tuples/lists JSON.

Errors the library raises on purpose are printed as one line (problem and fix) with a non-zero exit status;
`--debug` or SWITCH_SAE_DEBUG=1 shows the traceback. Building the parser imports no torch: heavy modules are
imported by the command that needs them, so `--help` and a bad flag answer at once.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

from .config import ConfigError, DataConfig, SAEConfig, TrainConfig
from .errors import is_deliberate
from .profiles import FRONTIER_GRIDS, GRIDS, PROFILES, Profile, get_profile
from .notebook_runner import (NotebookEcho, _environment, _offline_html_config, execute_notebook,  # noqa: F401
                              inject_parameters, notebook_paths)  # (the runner's names, as `cli.X` in the tests)
from .reproduce import (_record_timings, print_comparison, print_one_comparison,  # noqa: F401 (re-exported)
                        reference_records, reproduce)

DATA_PREFIX = "data-"


# --- parser -------------------------------------------------------------------------------------------
def _add_profile(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", choices=sorted(PROFILES), default=None,
                   help="pipeline scale (default: $SWITCH_SAE_PROFILE or 'quick')")


def _shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give I/N, e.g. 0/2") from None
    if not 0 <= i < n:
        raise argparse.ArgumentTypeError(f"{text!r}: I/N needs 0 <= I < N")
    return i, n


DEBUG_ENV = "SWITCH_SAE_DEBUG"
_COMMON = argparse.ArgumentParser(add_help=False)
_COMMON.add_argument("--debug", action="store_true", help=f"on an error, show the traceback (also: {DEBUG_ENV}=1)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="switch-sae", description="Switch Sparse Autoencoders: train, sweep, reproduce.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("reproduce", parents=[_COMMON], help="train the sweeps into your own results table, compare it with the committed "
                                         "one, run every notebook headless; figures and HTML go to --out")
    _add_profile(p)
    p.add_argument("--out", default=None,
                   help="output folder: your results table (records.jsonl), figures/, executed notebooks "
                        "(default: outputs/<profile>/)")
    p.add_argument("--from-committed", action="store_true",
                   help="train nothing: draw the figures from the committed table data/results/<profile>/")
    p.add_argument("--reference", default=None,
                   help="folder of the results table to compare yours with (default: data/results/<profile>/)")
    p.add_argument("--update-figures", action="store_true",
                   help="write the figures into the committed figures/ (developers refreshing the README's figures; "
                        "same as SWITCH_SAE_UPDATE_FIGURES=1)")
    p.add_argument("--skip-sweep", action="store_true",
                   help="do not run the sweeps first (notebooks 01-03 still train what their figures need)")
    p.add_argument("--notebooks", nargs="*", default=None,
                   help="notebook files to run (default: all in notebooks/; the flag alone: none)")

    p = sub.add_parser("train", parents=[_COMMON], help="train one SAE; every SAEConfig/TrainConfig field is a flag, DataConfig as --data-*")
    _add_profile(p)
    SAEConfig.add_arguments(p)
    TrainConfig.add_arguments(p)
    DataConfig.add_arguments(p, prefix=DATA_PREFIX)
    p.add_argument("--out", default=None, help="also save the trained SAE to this folder")
    p.add_argument("--no-lm", action="store_true", help="skip the CE-loss-recovered evaluation")

    p = sub.add_parser("sweep", parents=[_COMMON], help="train and evaluate every SAE of the named grids (resumes, skips finished)")
    _add_profile(p)
    # the frontier grids run only when named: they need each family's lr search first (docs/baselines.md)
    p.add_argument("--grid", nargs="+", choices=GRIDS,
                   default=[g for g in GRIDS if g != "frontiers" and g not in FRONTIER_GRIDS])
    p.add_argument("--no-lm", action="store_true", help="skip the CE-loss-recovered evaluation")
    p.add_argument("--seed", type=int, default=None,
                   help="train every SAE of the grids at this seed instead of the profile's own (e.g. the variants grid "
                        "at seeds 1 and 2; grid 'seeds' already runs the claim at every seed of the profile)")
    p.add_argument("--shard", type=_shard, default=(0, 1), metavar="I/N",
                   help="train only the SAEs I, I+N, I+2N, ... of the grids' job list: N processes started with the "
                        "same --grid list share one sweep and one table (one per core or GPU; build the cache first)")

    p = sub.add_parser("cache", parents=[_COMMON], help="build (or check) the cached activations of a profile")
    _add_profile(p)
    DataConfig.add_arguments(p, prefix=DATA_PREFIX)

    p = sub.add_parser("evaluate", parents=[_COMMON], help="MSE, FVU, L0 and CE loss recovered of a saved SAE")
    p.add_argument("sae_dir", help="a folder with sae.safetensors + config.json")
    _add_profile(p)
    DataConfig.add_arguments(p, prefix=DATA_PREFIX)
    p.add_argument("--no-lm", action="store_true", help="skip the CE-loss-recovered evaluation")
    p.add_argument("--allow-other-site", action="store_true",
                   help="evaluate the SAE on another model or hook than it was trained on (warns instead of refusing)")

    p = sub.add_parser("train-distributed", add_help=False,
                       help="one SAE over P processes, launched by torchrun (data- or expert-parallel; "
                            "docs/distributed.md); the arguments are switch_sae_core.distributed's")
    p.add_argument("args", nargs=argparse.REMAINDER)
    return parser


# --- config assembly --------------------------------------------------------------------------------------
def profile_from_args(ns: argparse.Namespace) -> Profile:
    """The profile with the --data-* overrides applied."""
    profile = get_profile(ns.profile)
    data_over = DataConfig.overrides_from_args(ns, prefix=DATA_PREFIX)
    return profile.replace(data=profile.data.replace(**data_over)) if data_over else profile


def train_configs_from_args(ns: argparse.Namespace, profile: Profile, d_in: int) -> tuple[SAEConfig, TrainConfig]:
    """SAEConfig from flags (d_in from the activations, n_features default = the profile's baseline
    width, for every arch: a FLOP-matched Switch SAE needs --n-features N*M); TrainConfig = profile's + flags."""
    from .results import baseline_width

    sae_over = SAEConfig.overrides_from_args(ns)
    sae_over.setdefault("d_in", d_in)
    sae_over.setdefault("n_features", baseline_width(profile, d_in))
    sae_cfg = SAEConfig.from_dict({**SAEConfig().to_dict(), **sae_over})
    train_cfg = profile.train.replace(**TrainConfig.overrides_from_args(ns))
    return sae_cfg, train_cfg


# --- commands ------------------------------------------------------------------------------------------------
def cmd_cache(ns: argparse.Namespace) -> int:
    from .data.store import ActivationStore

    profile = profile_from_args(ns)
    t0 = time.perf_counter()
    store = ActivationStore.build_or_load(profile.data)
    print(f"activations for profile {profile.name!r} ready ({time.perf_counter() - t0:.0f}s): {store}")
    return 0


def cmd_train(ns: argparse.Namespace) -> int:
    from .cache import train_or_load
    from .results import make_record
    from .sweep import build_context

    profile = profile_from_args(ns)
    width = model_width(profile.data.model)
    if width is not None:  # every flag checked before the activations are extracted (minutes on `quick`)
        train_configs_from_args(ns, profile, width)[0].check_trainable()
    else:
        profile.train.replace(**TrainConfig.overrides_from_args(ns))
    ctx = build_context(profile, with_lm=not ns.no_lm)
    sae_cfg, train_cfg = train_configs_from_args(ns, profile, ctx.d_in)
    run_profile = profile.replace(train=train_cfg)
    sae, info = train_or_load(run_profile, sae_cfg, ctx.source, train_cfg, profile.data, ctx.heldout_BD)
    record = make_record(run_profile, sae_cfg, sae, info, ctx.heldout_BD, ctx.evaluator)
    if ns.out:
        sae.save(ns.out)
        print(f"saved to {ns.out}")
    print(f"trained SAE cached in {info['dir']}")
    _print_summary(record)
    return 0


def model_width(model: str) -> Optional[int]:
    """The residual width of a model known without loading it (the built-in names, a local HF folder); None
    otherwise."""
    from .config import MODELS

    if model in MODELS:
        return MODELS[model].d_model
    config = Path(model).expanduser() / "config.json"
    try:
        c = json.loads(config.read_text())
        return int(c.get("hidden_size") or c.get("n_embd") or c.get("d_model"))
    except (OSError, ValueError, TypeError):
        return None


def check_environment() -> None:
    """The folders the environment points at, checked at the start of every command (not after hours of work)."""
    from . import durable, paths

    for name in ("SWITCH_SAE_CACHE", paths.RESULTS_ENV, paths.FIGURES_ENV):
        if os.environ.get(name):
            durable.check_writable_dir(os.environ[name], name)


def cmd_sweep(ns: argparse.Namespace) -> int:
    from .results import results_path
    from .sweep import run_sweep

    profile = get_profile(ns.profile, seed=ns.seed)
    per_seed = sorted(set(ns.grid) & {"seeds", "convergence", "schedules"})
    if ns.seed is not None and per_seed:
        raise ConfigError(f"--seed does not apply to grid(s) {per_seed}: they run every seed of the profile "
                          "themselves; sweep them without --seed")
    records = run_sweep(profile, ns.grid, with_lm=not ns.no_lm, shard=ns.shard)
    print(f"{len(records)} records for profile {profile.name!r} in {results_path(profile)}")
    return 0


def cmd_evaluate(ns: argparse.Namespace) -> int:
    profile = profile_from_args(ns)
    sae_dir = Path(ns.sae_dir)
    if not sae_dir.is_dir():
        raise ConfigError(f"the folder {sae_dir} does not exist: give the folder an SAE was saved to "
                          "(`switch-sae train --out DIR` writes one)")
    from .saes.base import load_sae
    from .heldout import reconstruction_metrics
    from .sweep import build_context

    sae = load_sae(sae_dir)
    check_site(sae, profile.data, allow=ns.allow_other_site)  # before the activations are extracted
    ctx = build_context(profile, with_lm=not ns.no_lm)
    if sae.cfg.d_in != ctx.d_in:
        raise ConfigError(f"the SAE has d_in={sae.cfg.d_in} but the profile's activations have width {ctx.d_in}: "
                          "pick the profile / --data-model / --data-layer the SAE was trained on")
    result = reconstruction_metrics(sae, ctx.heldout_BD)
    if ctx.evaluator is not None:
        result.update(ctx.evaluator(sae))
    print(json.dumps(result, indent=2, default=float))
    return 0


def check_site(sae, data_cfg: DataConfig, allow: bool = False) -> None:
    """Refuse (or, with `allow`, warn about) applying `sae` to another model or hook than the one it was trained
    on (`BaseSAE.trained_on`; SAEs saved before it was recorded cannot be checked)."""
    site = sae.trained_on
    if not site:
        return
    diff = [f"{name} {site.get(name)!r} (here {here!r})" for name, here in
            (("model", data_cfg.model), ("hook", data_cfg.hook_name)) if site.get(name) != here]
    if not diff:
        return
    message = (f"the SAE was trained on {', '.join(diff)}: its numbers here would describe another site. Pick "
               f"--data-model {site.get('model')} --data-layer {site.get('layer')} (or --data-hook {site.get('hook')})")
    if not allow:
        raise ConfigError(message + ", or pass --allow-other-site to evaluate it here anyway")
    import warnings

    warnings.warn(message + " (evaluating anyway: --allow-other-site)", stacklevel=2)


def _print_summary(record: dict[str, Any]) -> None:
    keys = ("name", "mse", "fvu", "l0", "loss_recovered", "kl", "dead_fraction", "flops_per_input", "train_seconds")
    print(json.dumps({k: record.get(k) for k in keys}, indent=2, default=float))


# --- reproduce -------------------------------------------------------------------------------------------------
def cmd_reproduce(ns: argparse.Namespace) -> int:
    """`reproduce.reproduce` with the profile and the flags."""
    return reproduce(get_profile(ns.profile), ns.out, from_committed=ns.from_committed, skip_sweep=ns.skip_sweep,
                     reference=ns.reference, update_figures=ns.update_figures, notebooks=ns.notebooks)


TRAINING_COMMANDS = ("reproduce", "train", "sweep")


def prepare_process(ns: argparse.Namespace) -> None:
    """A training command's process settings (`runtime.prepare_training_process`): glibc keeps freed memory,
    one torch thread on CPU; SWITCH_SAE_KEEP_FREED_MEMORY=0 and SWITCH_SAE_THREADS=N|keep override."""
    from .devices import resolve_device
    from .runtime import prepare_training_process

    from .config import check_device

    device = getattr(ns, "device", None) or "auto"  # `train --device`; the other commands train where cuda is
    check_device("train", device)  # a bad --device is one line here, not torch's error from inside the setting
    prepare_training_process(resolve_device("auto") if device == "auto" else device)


COMMANDS = {"reproduce": cmd_reproduce, "train": cmd_train, "sweep": cmd_sweep, "cache": cmd_cache, "evaluate": cmd_evaluate}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Exit status 0; 2 for a bad flag or configuration; 1 for another error the library raised on purpose
    (each printed as one line; --debug or SWITCH_SAE_DEBUG=1 shows the traceback)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["train-distributed"]:  # its flags belong to the distributed entry point
        from .distributed.launch import main as distributed_main

        return distributed_main(argv[1:])
    parser = build_parser()
    ns = parser.parse_args(argv)
    try:
        check_environment()
        if ns.command in TRAINING_COMMANDS:
            prepare_process(ns)
        return COMMANDS[ns.command](ns)
    except KeyboardInterrupt as e:  # Ctrl-C: one line, not a traceback (the trainer saved a checkpoint)
        where = f"{e}; " if str(e) else "SAEs finished so far are kept in the cache and the table; "
        print(f"\nswitch-sae {ns.command}: interrupted: {where}run the same command again to resume.",
              file=sys.stderr, flush=True)
        return 130
    except Exception as e:
        if not is_deliberate(e) or ns.debug or os.environ.get(DEBUG_ENV) == "1":
            raise
        message = " ".join(str(e).split())  # one line, whatever the message's layout
        parser.exit(2 if isinstance(e, ValueError) else 1,
                    f"switch-sae {ns.command}: error: {message} (--debug shows the traceback)\n")


if __name__ == "__main__":
    sys.exit(main())
