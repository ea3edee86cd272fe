"""Issue 28: every file the project writes gets the mode a plainly created file would (0666 less the umask), the
weights as well as config.json; folders 0777 less the umask (safetensors' save_file alone leaves 0600)."""
import os
import stat
from pathlib import Path

import pytest
import torch

from switch_sae_core import durable, metrics
from switch_sae_core.checkpoint import save_checkpoint
from switch_sae_core.config import SAEConfig, TrainConfig
from switch_sae_core.saes.base import build_sae


@pytest.fixture(params=[0o022, 0o077, 0o002])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def modes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): stat.S_IMODE(p.stat().st_mode) for p in [root, *root.rglob("*")]}


def plain_modes(root: Path, mask: int) -> dict[str, int]:
    return {str(p.relative_to(root)): (0o777 if p.is_dir() else 0o666) & ~mask for p in [root, *root.rglob("*")]}


def test_current_umask_is_the_process_umask(umask):
    assert durable.current_umask() == umask
    assert os.umask(umask) == umask  # reading it left it unchanged


def test_saved_weights_get_the_same_mode_as_their_config(umask, tmp_path):
    sae = build_sae(SAEConfig(arch="topk", d_in=8, n_features=16, k=2))
    folder = sae.save(tmp_path / "sae")
    got = modes(folder)
    assert got["sae.safetensors"] == got["config.json"] == 0o666 & ~umask


def test_a_trainer_checkpoint_is_written_with_plain_modes(umask, tmp_path):
    sae = build_sae(SAEConfig(arch="topk", d_in=8, n_features=16, k=2))
    optimizer = torch.optim.Adam(sae.parameters())
    tracker = metrics.DeadFeatureTracker(16, 64)
    step_dir = save_checkpoint(tmp_path / "ckpt", 3, sae, optimizer, tracker, TrainConfig())
    assert len(modes(step_dir)) > 3
    assert modes(step_dir) == plain_modes(step_dir, umask)


def test_atomic_folder_gives_private_files_and_folders_plain_modes(umask, tmp_path):
    """What a library writes through private temporary names (mkstemp: 0600, mkdtemp: 0700) inside the folder."""
    with durable.atomic_folder(tmp_path / "out") as tmp:
        os.close(os.open(tmp / "weights.bin", os.O_CREAT | os.O_WRONLY, 0o600))
        (tmp / "sub").mkdir(mode=0o700)
        os.close(os.open(tmp / "sub" / "inner.bin", os.O_CREAT | os.O_WRONLY, 0o600))
    out = tmp_path / "out"
    assert modes(out) == plain_modes(out, umask) and len(modes(out)) == 4
    durable.atomic_write_json(tmp_path / "x.json", {"a": 1})
    assert stat.S_IMODE((tmp_path / "x.json").stat().st_mode) == 0o666 & ~umask
