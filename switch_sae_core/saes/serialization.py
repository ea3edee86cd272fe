"""An SAE on disk: `sae.safetensors` (the weights, their checksum and the config in its metadata) + `config.json`
(the SAEConfig and its format version, docs/checkpoints.md). `save_weights` writes, `load_sae` reads and checks;
loading never unpickles, and anything wrong raises `CheckpointError` naming the file and the fix.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from .. import durable
from ..config import ConfigError, SAEConfig
from ..errors import SwitchSAEError
from .registry import build_sae

WEIGHTS_FILE = "sae.safetensors"
CONFIG_FILE = "config.json"


class CheckpointError(SwitchSAEError, RuntimeError):
    """A checkpoint is missing, unreadable or does not match its config."""


def save_weights(module: nn.Module, cfg: SAEConfig, directory: str | Path, fmt: str = "switch-sae/1",
                 trained_on: Optional[dict[str, Any]] = None) -> Path:
    """The checkpoint format: the module's state as sae.safetensors + its SAEConfig as config.json.

    The weights file's metadata repeats the config ("sae_config"): fields no tensor shape reveals
    (k, top_e, ...) are then checked against config.json on load. It also holds the sha256 of the tensors
    ("tensors_sha256", checked on load: a flipped bit is refused) and where the SAE was trained ("trained_on")."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
    metadata = {"format": fmt, "sae_config": json.dumps(cfg.to_dict(), sort_keys=True),
                "tensors_sha256": tensors_sha256(tensors)}
    if trained_on is not None:
        metadata["trained_on"] = json.dumps(trained_on, sort_keys=True)
    save_file(tensors, str(directory / WEIGHTS_FILE), metadata=metadata)
    durable.normal_permissions(directory / WEIGHTS_FILE)  # save_file leaves 0600; config.json is 0644
    write_config(cfg, directory / CONFIG_FILE)
    return directory


FORMAT_VERSION = 2
"""config.json's "format_version". 1: no such field (checkpoints written before it existed); 2: the field
added, files otherwise unchanged."""
FORMAT_UPGRADES: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {1: lambda d: d}
"""version v -> rewrites a version-v config dict (without "format_version") as version v + 1."""


def write_config(cfg: SAEConfig, path: Path) -> None:
    """config.json: the SAEConfig fields plus "format_version"."""
    path.write_text(json.dumps({"format_version": FORMAT_VERSION, **cfg.to_dict()}, indent=2) + "\n")


def read_config_dict(path: Path) -> dict[str, Any]:
    """The SAEConfig dict of a config.json of any known format version, upgraded to the current one.
    Raises CheckpointError for a version this code does not know (newer, or not a version at all)."""
    d = json.loads(Path(path).read_text())
    if not isinstance(d, dict):
        raise CheckpointError(f"{path} is not a JSON object: restore the config.json written with the weights")
    version = d.pop("format_version", 1)
    if isinstance(version, int) and version > FORMAT_VERSION:
        raise CheckpointError(f"{path} has checkpoint format {version}, newer than this switch-sae reads "
                              f"(up to {FORMAT_VERSION}): update this checkout (git pull, then bash scripts/setup.sh)")
    if not isinstance(version, int) or version not in FORMAT_UPGRADES and version != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format_version={version!r} is not a switch-sae checkpoint format "
                              f"(1..{FORMAT_VERSION}): restore the config.json written with the weights")
    for v in range(version, FORMAT_VERSION):
        d = FORMAT_UPGRADES[v](d)
    return d


def tensors_sha256(tensors: dict[str, Tensor]) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes, in name order (the weights' checksum)."""
    import hashlib

    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def check_weights(directory: Path, tensors: dict[str, Tensor], metadata: dict[str, str]) -> None:
    """Refuse weights that differ from their recorded checksum (a flipped bit, an edit) or hold NaN/inf
    (a diverged or corrupt save): CheckpointError naming the file and the tensors."""
    recorded = metadata.get("tensors_sha256")
    if recorded is not None and tensors_sha256(tensors) != recorded:
        raise CheckpointError(f"{directory / WEIGHTS_FILE} does not match the checksum saved with it (corrupt: a "
                              "flipped bit or an edit): restore it from a copy or retrain")
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise CheckpointError(f"{directory / WEIGHTS_FILE} holds NaN or inf in {sorted(bad)}: a diverged or corrupt "
                              "save; retrain, or resume from an earlier checkpoint")


def read_metadata(directory: str | Path) -> dict[str, str]:
    """The metadata of a saved SAE's weights file ({} if it has none)."""
    from safetensors import safe_open

    with safe_open(str(Path(directory) / WEIGHTS_FILE), framework="pt") as f:
        return dict(f.metadata() or {})


def _check_recorded_config(directory: Path, cfg: SAEConfig, metadata: dict[str, str]) -> None:
    """Refuse a config.json that contradicts the config recorded in the weights file's metadata (checkpoints
    written before that record existed cannot be checked and load as before)."""
    recorded = metadata.get("sae_config")
    if recorded is None:
        return
    # a field added to SAEConfig after the checkpoint was written was at its default then
    defaults = {f.name: f.default for f in dataclasses.fields(SAEConfig)}
    saved, given = {**defaults, **json.loads(recorded)}, json.loads(json.dumps(cfg.to_dict()))
    diff = {k: (saved.get(k), given.get(k)) for k in sorted(set(saved) | set(given)) if saved.get(k) != given.get(k)}
    if diff:
        fields = ", ".join(f"{k}={new!r} (trained with {old!r})" for k, (old, new) in diff.items())
        raise CheckpointError(
            f"{directory / CONFIG_FILE} contradicts the weights: {fields}. Restore config.json; to use the SAE "
            "with other settings, load it and change sae.cfg explicitly"
        )


def load_sae(directory: str | Path, device: str | torch.device = "cpu") -> BaseSAE:
    """Load `sae.safetensors` + `config.json`; clear errors for missing or corrupt files."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    for name in (WEIGHTS_FILE, CONFIG_FILE):
        if not (directory / name).is_file():
            raise CheckpointError(f"{directory} is not an SAE checkpoint: {name} is missing")
    try:
        cfg = SAEConfig.from_dict(read_config_dict(directory / CONFIG_FILE))
    except (json.JSONDecodeError, ConfigError, TypeError) as e:
        raise CheckpointError(f"{directory / CONFIG_FILE} is not a valid SAE config: {e}") from None
    try:
        tensors = load_file(str(directory / WEIGHTS_FILE), device=str(device))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{directory / WEIGHTS_FILE} is unreadable (truncated or corrupt?): {e}") from None
    sae = build_sae(cfg).to(device)
    expected = {k: tuple(v.shape) for k, v in sae.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in tensors.items()}
    if expected != got:
        raise CheckpointError(f"{directory}: weights do not match config.json (expected {expected}, got {got})")
    metadata = read_metadata(directory)
    _check_recorded_config(directory, cfg, metadata)  # what no shape reveals: k, top_e, ...
    check_weights(directory, tensors, metadata)
    sae.load_state_dict(tensors)
    if metadata.get("trained_on"):
        sae.trained_on = json.loads(metadata["trained_on"])
    return sae
