"""docs/architecture.md holds: every module imports only its own layer or the layers below, and the
'add a new SAE architecture' example runs and trains."""
import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "switch_sae_core"
LAYERS = [  # module-name prefixes per layer, bottom first (docs/architecture.md)
    ("errors", "config", "paths", "profiles", "devices", "durable", "runtime", "keys"),
    ("ops", "kernels", "saes", "metrics"),
    ("train", "optim", "schedule", "initialisation", "training_log", "interrupt", "checkpoint", "continuation", "data",
     "evaluate", "heldout"),
    ("cache", "results", "record", "sweep", "lr_search", "checks", "claims", "ground_truth", "distributed"),
    ("analysis", "viz", "interop"),
    ("cli", "notebook", "notebook_runner", "reproduce", "__main__", "__init__"),
]


def layer_of(module: str) -> int:
    top = module.split(".")[0]
    for i, names in enumerate(LAYERS):
        if top in names:
            return i
    raise AssertionError(f"{module} is in no layer of docs/architecture.md")


def internal_imports(path: Path) -> set[str]:
    """Project modules a file imports (relative imports resolved against the package)."""
    rel = path.relative_to(PACKAGE).with_suffix("")
    package = list(rel.parts[:-1])
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level > 0:
            base = package[:len(package) - node.level + 1]
            mod = ".".join(base + ([node.module] if node.module else []))
            found |= {mod} if node.module else {".".join(base + [a.name]) for a in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("switch_sae_core."):
            found.add(node.module.removeprefix("switch_sae_core."))
    return {m for m in found if m}


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_modules_import_only_their_layer_or_below(path):
    rel = ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
    if rel in ("__init__", "__main__"):
        return
    mine = layer_of(rel)
    upward = sorted(m for m in internal_imports(path) if layer_of(m) > mine)
    assert not upward, f"{rel} (layer {mine}) imports from a higher layer: {upward}"


def test_the_new_architecture_example_runs_and_learns():
    import torch

    from switch_sae_core import metrics
    from switch_sae_core.config import KNOWN_ARCHS
    from switch_sae_core.saes import base

    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "architecture.md").read_text(), re.S)
    assert len(blocks) == 2 and len(blocks[0].splitlines()) <= 30
    scope: dict = {}
    try:
        exec(blocks[0], scope)
        exec(blocks[1], scope)
        trained = scope["result"].sae
        fresh = base.build_sae(trained.cfg)  # through the registry, like a cache or checkpoint load
        x_BD = next(iter(scope["source"].batches(512, seed=123)))
        with torch.no_grad():
            fvu_trained, fvu_fresh = (metrics.fvu(x_BD, sae(x_BD).x_hat).item() for sae in (trained, fresh))
        assert type(fresh) is type(trained) and fvu_trained < 0.5 * fvu_fresh  # it learned
        with pytest.raises(ValueError, match="already registered"):
            base.register("topk")(scope["TiedTopKSAE"])  # a taken name is refused, not overwritten
    finally:
        base.REGISTRY.pop("tied_topk", None)
        KNOWN_ARCHS.discard("tied_topk")


def test_the_command_walks_name_only_what_exists():
    """Every `module.name` in docs/architecture.md's walks of reproduce/train/evaluate is a real attribute of a
    project module (a renamed or moved function makes the walk untrue, and this test fails)."""
    import importlib

    text = (ROOT / "docs" / "architecture.md").read_text()
    walk = text[text.index("## Following a command from the CLI down"):text.index("Where to change one thing:")]
    modules = {p.stem: ".".join(p.relative_to(PACKAGE).with_suffix("").parts) for p in PACKAGE.rglob("*.py")}
    refs = set(re.findall(r"`([a-z_]+)\.([A-Za-z_]+(?:\.[A-Za-z_]+)?)`", walk))
    assert len(refs) > 30
    for mod, name in sorted(refs):
        assert mod in modules, f"`{mod}.{name}`: no module {mod}.py"
        obj = importlib.import_module(f"switch_sae_core.{modules[mod]}")
        for part in name.split("."):
            assert hasattr(obj, part), f"`{mod}.{name}` does not exist"
            obj = getattr(obj, part)
