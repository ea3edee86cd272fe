"""benchmarks/README.md is generated (benchmarks/make_readme.py) from its template and the committed results."""
import importlib.util
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _make_readme():
    spec = importlib.util.spec_from_file_location("make_readme", BENCH / "make_readme.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_is_the_generated_one():
    assert (BENCH / "README.md").read_text() == _make_readme().render(), \
        "benchmarks/README.md is stale or hand-edited: python benchmarks/make_readme.py"


def test_every_include_is_a_committed_results_file_and_is_inlined():
    mk = _make_readme()
    text = mk.render()
    assert "<!-- include:" not in text
    for name in mk.INCLUDE.findall(mk.TEMPLATE.read_text()):
        assert (BENCH / name).read_text().strip() in text


def test_a_missing_results_file_is_named():
    with pytest.raises(FileNotFoundError, match="results/nope.md"):
        _make_readme().render("<!-- include: results/nope.md -->\n")
