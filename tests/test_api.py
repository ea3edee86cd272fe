"""The top-level API: every exported name, a light package import, and the README's Python example."""
from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import switch_sae_core

ROOT = Path(__file__).resolve().parents[1]
EXPORTS = {
    "SwitchSAE": "switch_sae_core.saes.switch", "TopKSAE": "switch_sae_core.saes.topk",
    "ReLUSAE": "switch_sae_core.saes.relu", "GatedSAE": "switch_sae_core.saes.gated",
    "SAEConfig": "switch_sae_core.config", "TrainConfig": "switch_sae_core.config",
    "DataConfig": "switch_sae_core.config", "train_sae": "switch_sae_core.train",
    "load_sae": "switch_sae_core.saes.base", "ActivationStore": "switch_sae_core.data.store",
    "get_profile": "switch_sae_core.profiles",
}


@pytest.mark.parametrize("name", sorted(EXPORTS))
def test_root_exports_the_defining_object(name):
    assert getattr(switch_sae_core, name) is getattr(importlib.import_module(EXPORTS[name]), name)
    assert name in switch_sae_core.__all__ and name in dir(switch_sae_core)


def test_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="has no attribute 'SwitchSae'"):
        switch_sae_core.SwitchSae  # noqa: B018


def _modules_after(code: str) -> set[str]:
    """Top-level modules loaded by `code` in a fresh interpreter that imports THIS checkout."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys; print(' '.join(sys.modules))"],
                         capture_output=True, text=True, env=env, check=True, cwd=ROOT).stdout
    return {m.split(".")[0] for m in out.split()}


def test_importing_the_root_stays_light():
    loaded = _modules_after("import switch_sae_core")
    assert not loaded & {"transformer_lens", "matplotlib", "plotly", "torch"}
    # ...and using a name loads only what it needs: an SAE class brings torch, not transformer_lens
    loaded = _modules_after("from switch_sae_core import SwitchSAE, ActivationStore, train_sae")
    assert "torch" in loaded and not loaded & {"transformer_lens", "matplotlib", "plotly"}


def readme_python_example() -> str:
    """The first ```python block after the README's '## From Python' heading."""
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## From Python\n", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.slow
def test_readme_python_example_runs(tmp_path, monkeypatch, capsys):
    code = readme_python_example()
    assert "train_sae(" in code and "load_sae(" in code and ".save(" in code
    monkeypatch.setenv("SWITCH_SAE_PROFILE", "ci")
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
    assert (tmp_path / "my-switch-sae" / "sae.safetensors").is_file()
    printed = capsys.readouterr().out
    recovered = float(re.search(r"'loss_recovered': ([-\d.e]+)", printed).group(1))
    assert 0.0 < recovered <= 1.0  # a trained SAE recovers some of the loss, never more than all of it


def test_readme_in_memory_example_runs():
    text = (ROOT / "README.md").read_text()
    section = text.split("\n### From activations in memory\n", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert "TensorSource(" in code and "tokens=" in code and ".encode(" in code and ".decode(" in code
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    sae, z, x_hat, x_ND = scope["sae"], scope["z"], scope["x_hat"], scope["x_ND"]
    assert z.shape == (10, 512) and (z != 0).sum(1).le(8).all()
    torch.testing.assert_close(x_hat, sae(x_ND[:10]).x_hat, atol=1e-5, rtol=1e-5)
