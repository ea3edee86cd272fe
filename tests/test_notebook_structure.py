"""The notebooks only narrate: a papermill parameters cell of plain assignments first, a Colab install
cell that is a no-op where the package imports, the shared set-up in one call, no function definitions, short
code cells."""
import ast
import json
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
MAX_CELL_LINES = 15


def code_cells(path):
    return [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_first_code_cell_is_the_parameters_cell(path):
    first = code_cells(path)[0]
    assert first["metadata"].get("tags") == ["parameters"]
    tree = ast.parse("".join(first["source"]))
    names = []
    for node in tree.body:
        if isinstance(node, ast.Import):  # `import os`, for the SWITCH_SAE_PROFILE default
            assert [a.name for a in node.names] == ["os"]
            continue
        assert isinstance(node, ast.Assign), ast.dump(node)
        names += [t.id for t in node.targets]
    assert names == ["PROFILE", "SEED", "OUTPUT_DIR"]
    assert "SWITCH_SAE_PROFILE" in "".join(first["source"])


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_install_cell_does_nothing_where_the_package_imports(path):
    # where the package is missing (Colab) it runs the one install script, the README's: no pins of its own
    install = "".join(code_cells(path)[1]["source"])
    assert 'if importlib.util.find_spec("switch_sae_core") is None:' in install
    assert '"switch-sae/scripts/setup.sh"' in install and "pip" not in install


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_the_shared_set_up_is_one_call(path):
    # after the install cell: one call of `notebook.setup` with the parameters; no notebook sets plotly's renderer
    # or resolves the profile itself
    setup_cell = "".join(code_cells(path)[2]["source"])
    assert "from switch_sae_core.notebook import setup\n" in setup_cell
    assert "nb = setup(PROFILE, SEED, OUTPUT_DIR)\n" in setup_cell
    every_cell = "".join("".join(c["source"]) for c in code_cells(path))
    assert "pio.renderers" not in every_cell and "get_profile" not in every_cell


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_cells_only_call_the_library(path):
    for cell in code_cells(path):
        src = "".join(cell["source"])
        tree = ast.parse(src)
        assert not any(isinstance(n, (ast.FunctionDef, ast.ClassDef, ast.Lambda)) for n in ast.walk(tree)), src[:80]
        assert len(src.splitlines()) <= MAX_CELL_LINES, src[:80]


def test_fixed_width_and_flop_matched_differ_only_in_their_setting():
    a, b = (["".join(c["source"]) for c in code_cells(p)] for p in NOTEBOOKS if p.name[:2] in ("01", "02"))
    diff = [(x, y) for x, y in zip(a, b) if x != y]
    assert len(a) == len(b) and len(diff) == 2  # the SETTING line and the figure's file name


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_titles_name_the_model_exactly(path):
    """Issue 23 item 6: a title or printout names the site by `DataConfig.site_label` (the model's exact name),
    never by its cache id (`profile.data.model`, e.g. 'smollm2-135m')."""
    for cell in code_cells(path):
        assert "data.model" not in "".join(cell["source"])
