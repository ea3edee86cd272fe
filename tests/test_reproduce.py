"""`switch-sae reproduce`: trains into the user's own table, compares it with the reference table, and never
writes the committed results or figures unless asked."""
import json

import pytest

from switch_sae_core import cli, paths, results, sweep
from switch_sae_core.data.synthetic import SyntheticConfig, SyntheticSource
from switch_sae_core.profiles import PAPER_GRIDS, get_profile


@pytest.fixture
def ci_on_synthetic_data(tmp_path, monkeypatch):
    """The `ci` profile's sweeps on synthetic activations (d = 64): the real grids and trainer in seconds;
    trained SAEs cached in tmp, the committed results root replaced by an empty tmp folder."""
    monkeypatch.setenv("SWITCH_SAE_CACHE", str(tmp_path / "cache"))
    for name in (paths.RESULTS_ENV, paths.FIGURES_ENV, paths.UPDATE_FIGURES_ENV):
        monkeypatch.delenv(name, raising=False)
    committed = tmp_path / "committed"
    monkeypatch.setattr(paths, "results_root", lambda: committed)
    ci = get_profile("ci")  # its grids, fewer and smaller steps
    profile = ci.replace(train=ci.train.replace(steps=6, batch_size=64, geometric_median_batch=128), n_heldout=128)
    monkeypatch.setattr(cli, "get_profile", lambda name=None: profile)
    source = SyntheticSource(SyntheticConfig(d_in=64, n_features=256, n_clusters=8, l0=4))
    ctx = sweep.SweepContext(source, profile.data, sweep.heldout_activations(source, 128), evaluator=None)
    monkeypatch.setattr(sweep, "build_context", lambda *a, **kw: ctx)
    return committed


def test_reproduce_trains_its_own_table_and_compares_it(ci_on_synthetic_data, tmp_path, capsys):
    committed = ci_on_synthetic_data
    mine = tmp_path / "mine"
    assert cli.main(["reproduce", "--profile", "ci", "--out", str(mine), "--notebooks"]) == 0
    records = results.load_records(mine / results.RESULTS_FILE)
    assert len(records) == len(sweep.sweep_configs(cli.get_profile(), PAPER_GRIDS, sweep.build_context())) == 6
    assert not committed.exists()  # the committed table is neither read for training nor written
    assert "no reference table" in capsys.readouterr().out

    # a reference that differs in one SAE's MSE by 10%: the comparison finds exactly that SAE first
    reference = tmp_path / "reference"
    reference.mkdir()
    changed = dict(records[2], mse=records[2]["mse"] / 1.1)
    lines = [json.dumps(changed if r["key"] == changed["key"] else r) for r in records]
    (reference / results.RESULTS_FILE).write_text("\n".join(lines) + "\n")
    again = tmp_path / "again"
    assert cli.main(["reproduce", "--profile", "ci", "--out", str(again), "--reference", str(reference),
                     "--notebooks"]) == 0
    lines = capsys.readouterr().out.splitlines()
    summary = next(i for i, line in enumerate(lines) if line.startswith("your run vs the reference"))
    rows = [line.split() for line in lines[summary + 1:] if line.startswith("  ") and "%" in line]
    assert len(rows) == 6 and rows[0][0] == records[2]["name"] and rows[0][1] == "10.00%"
    assert all(r[1] == "0.00%" for r in rows[1:])  # the others were loaded by config hash: identical

    # issue 28: each SAE's comparison is printed as it finishes, under the sweep's line of that SAE, not only
    # in the summary after the last one
    trained = [i for i, line in enumerate(lines[:summary]) if "steps): mse=" in line]
    assert len(trained) == 6
    each = [lines[i + 1].split() for i in trained]
    assert all(e[:2] == ["vs", "reference:"] for e in each)
    assert [e[2] for e in each] == ["10.00%" if r["key"] == changed["key"] else "0.00%" for r in records]


def test_from_committed_trains_nothing(ci_on_synthetic_data, tmp_path, monkeypatch):
    monkeypatch.setattr(sweep, "train_or_load", lambda *a, **kw: pytest.fail("--from-committed must not train"))
    assert cli.main(["reproduce", "--profile", "ci", "--out", str(tmp_path / "o"), "--from-committed",
                     "--notebooks"]) == 0
    assert not (tmp_path / "o" / results.RESULTS_FILE).exists()


def test_compare_records_takes_the_largest_relative_difference_per_sae():
    ref = [{"key": "a", "name": "A", "mse": 100.0, "fvu": 0.5, "l0": 16.0, "loss_recovered": None},
           {"key": "b", "name": "B", "mse": 10.0, "fvu": 0.1, "l0": 8.0, "loss_recovered": 0.9}]
    mine = [{"key": "a", "name": "A", "mse": 101.0, "fvu": 0.4, "l0": 16.0, "loss_recovered": 0.8},
            {"key": "b", "name": "B", "mse": 10.0, "fvu": 0.1, "l0": 8.0, "loss_recovered": 0.9},
            {"key": "c", "name": "C", "mse": 1.0, "fvu": 0.1, "l0": 8.0, "loss_recovered": 0.9}]
    rows = results.compare_records(mine, ref)
    assert [r["name"] for r in rows] == ["A", "B"] and rows[0]["metric"] == "fvu"  # C: no reference; None skipped
    assert rows[0]["rel_diff"] == pytest.approx(0.2) and rows[1]["rel_diff"] == 0.0


def test_figures_go_to_the_output_folder_unless_a_developer_asks(monkeypatch, tmp_path):
    for name in (paths.FIGURES_ENV, paths.UPDATE_FIGURES_ENV):
        monkeypatch.delenv(name, raising=False)
    root = paths.project_root()
    assert paths.figures_dir("quick") == root / "outputs" / "quick" / "figures"
    monkeypatch.setenv(paths.UPDATE_FIGURES_ENV, "1")
    assert paths.figures_dir("quick") == root / "figures" and paths.figures_dir("ci") == root / "figures" / "ci"
    monkeypatch.setenv(paths.FIGURES_ENV, str(tmp_path))
    assert paths.figures_dir("quick") == tmp_path


def test_notebooks_flag_alone_selects_none():
    assert cli.notebook_paths([]) == []
    assert len(cli.notebook_paths(None)) >= 7


def test_the_comparison_covers_every_sae_of_the_reference_table_seeds_and_doubled_runs_included(tmp_path, capsys):
    """A `cpu` run returns seed-1 and twice-as-long SAEs too: each is compared with its reference record (by key),
    none is reported as 'only in yours'."""
    mine = [{"key": k, "name": n, "mse": m, "seed": s, "steps": st} for k, n, m, s, st in
            (("a", "topk_M8_k2", 10.0, 0, 6), ("b", "topk_M8_k2", 11.0, 1, 6), ("c", "topk_M8_k2", 9.0, 0, 12))]
    ref = [dict(r, mse=r["mse"] * 1.1) if r["key"] == "b" else r for r in mine]
    (tmp_path / results.RESULTS_FILE).write_text("".join(json.dumps(r) + "\n" for r in ref))
    cli.print_comparison(get_profile("ci"), mine, tmp_path)
    out = capsys.readouterr().out
    assert "3 SAEs in both (0 only in yours)" in out
    assert [line.split()[1] for line in out.splitlines() if line.startswith("  ")][0] == "9.09%"  # b: 11 vs 12.1
