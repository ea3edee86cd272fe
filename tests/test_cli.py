"""CLI flag parsing: every config field is reachable, values parse to the right types, bad flags fail clearly."""
import dataclasses
import typing

import pytest

from switch_sae_core import cli
from switch_sae_core.config import DataConfig, SAEConfig, TrainConfig
from switch_sae_core.profiles import get_profile


def _flag(name, prefix=""):
    return "--" + prefix + name.replace("_", "-")


def _example_value(cfg_cls, f):
    """A non-default value for field f, as a command-line string, and the value it must parse to."""
    default = getattr(cfg_cls(), f.name)
    choices = typing.get_args(typing.get_type_hints(cfg_cls)[f.name])
    if typing.get_origin(typing.get_type_hints(cfg_cls)[f.name]) is typing.Literal:  # any other allowed value
        other = next(c for c in choices if c != default)
        return other, other
    if isinstance(default, bool):
        return str(not default).lower(), (not default)
    hint = typing.get_type_hints(cfg_cls)[f.name]
    if typing.get_origin(hint) is typing.Literal:  # arch, lr_width, ...: another allowed choice
        choice = next(c for c in typing.get_args(hint) if c != default)
        return choice, choice
    if f.name in ("dtype",):
        return "float64", "float64"
    if isinstance(default, int):
        return str(default + 1), default + 1
    if isinstance(default, float):
        return "0.123", 0.123
    if isinstance(default, tuple):
        return "[0.8, 0.9]", [0.8, 0.9]
    if f.name == "lr":
        return "0.001", 0.001
    if f.name == "tokens":
        return "8192", 8192
    return "xyz", "xyz"  # str / Optional[str]


@pytest.mark.parametrize("cls,prefix", [(SAEConfig, ""), (TrainConfig, ""), (DataConfig, cli.DATA_PREFIX)])
def test_every_field_is_a_train_flag(cls, prefix):
    parser = cli.build_parser()
    for f in dataclasses.fields(cls):
        text, expected = _example_value(cls, f)
        ns = parser.parse_args(["train", _flag(f.name, prefix), text])
        over = cls.overrides_from_args(ns, prefix=prefix)
        assert over == {f.name: expected}, f.name


def test_flags_build_the_configs():
    parser = cli.build_parser()
    ns = parser.parse_args(["train", "--profile", "ci", "--arch", "switch", "--n-experts", "4", "--k", "8",
                            "--steps", "7", "--shared-expert", "true", "--data-layer", "3"])
    profile = cli.profile_from_args(ns)
    assert profile.data.layer == 3 and profile.name == "ci"
    sae_cfg, train_cfg = cli.train_configs_from_args(ns, profile, d_in=64)
    assert (sae_cfg.arch, sae_cfg.n_experts, sae_cfg.k, sae_cfg.shared_expert) == ("switch", 4, 8, True)
    assert sae_cfg.d_in == 64 and sae_cfg.n_features == profile.width_multiple * 64  # defaults from the profile
    assert train_cfg.steps == 7 and train_cfg.batch_size == get_profile("ci").train.batch_size


def test_a_token_budget_flag_replaces_the_profiles_steps():
    ns = cli.build_parser().parse_args(["train", "--profile", "ci", "--tokens", "100000", "--batch-size", "1000"])
    _, train_cfg = cli.train_configs_from_args(ns, cli.profile_from_args(ns), d_in=64)
    assert train_cfg.steps == 100 and train_cfg.batch_size == 1000


def test_unset_flags_keep_profile_values():
    ns = cli.build_parser().parse_args(["train", "--profile", "ci"])
    assert TrainConfig.overrides_from_args(ns) == {}
    assert DataConfig.overrides_from_args(ns, prefix=cli.DATA_PREFIX) == {}


@pytest.mark.parametrize("argv,msg", [
    (["train", "--k", "many"], "invalid int"),
    (["train", "--arch", "moe"], "invalid choice"),
    (["train", "--shared-expert", "maybe"], "expected true/false"),
    (["sweep", "--grid", "wide"], "invalid choice"),
    (["reproduce", "--profile", "huge"], "invalid choice"),
    (["frobnicate"], "invalid choice"),
])
def test_bad_flags_fail_with_a_message(argv, msg, capsys):
    with pytest.raises(SystemExit) as e:
        cli.build_parser().parse_args(argv)
    assert e.value.code == 2
    assert msg in capsys.readouterr().err


def test_inconsistent_config_is_a_clear_error(capsys):
    ns = cli.build_parser().parse_args(["train", "--profile", "ci", "--arch", "switch", "--n-experts", "3"])
    with pytest.raises(Exception, match="divisible"):
        cli.train_configs_from_args(ns, cli.profile_from_args(ns), d_in=64)


def test_notebook_selection_errors_name_the_choices():
    with pytest.raises(Exception, match="not found"):
        cli.notebook_paths(["no_such_notebook.ipynb"])


def test_execute_notebook_sets_the_profile_and_writes_html(tmp_path, capfd):
    import json

    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("PROFILE = 'quick'", metadata={"tags": ["parameters"]}),
                nbformat.v4.new_code_cell("import os\nprint('profile=' + PROFILE + ',' + os.environ['SWITCH_SAE_PROFILE'])")]
    path = tmp_path / "nb" / "99_probe.ipynb"
    path.parent.mkdir()
    nbformat.write(nb, path)
    out = tmp_path / "out"
    cli.execute_notebook(path, out, profile="ci", timeout=120)
    executed = nbformat.read(out / "99_probe.ipynb", as_version=4)
    assert executed.cells[1].metadata["tags"] == ["injected-parameters"]  # papermill's place: after `parameters`
    assert "profile=ci,ci" in executed.cells[2].outputs[0]["text"]
    assert "profile=ci,ci" in (out / "99_probe.html").read_text()
    assert "without encryption" not in capfd.readouterr().err  # issue 28: once per notebook
    cli._record_timings(out / "timings.json", {"a": 1.0})
    cli._record_timings(out / "timings.json", {"b": 2.0})
    assert json.loads((out / "timings.json").read_text()) == {"a": 1.0, "b": 2.0}


def test_a_headless_notebook_shows_its_output_and_progress_as_it_runs(tmp_path, capsys):
    """Issue 28: a notebook run by `reproduce` streams its printed lines and its tqdm bars to the terminal while
    it runs (not only into the .html at the end), a slow cell says its time, and a bar is not shown per redraw."""
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("PROFILE = 'quick'", metadata={"tags": ["parameters"]}),
                nbformat.v4.new_code_cell("import sys\nprint('per-SAE line one')\nprint('oops', file=sys.stderr)\n"
                                          "sys.stdout.write('partial')"),
                nbformat.v4.new_code_cell("from tqdm.auto import tqdm\nfor _ in tqdm(range(50), desc='train probe', "
                                          "mininterval=0): pass"),
                nbformat.v4.new_code_cell("import time\ntime.sleep(1.2)  # a slow cell")]
    path = tmp_path / "98_echo.ipynb"
    nbformat.write(nb, path)
    seen = []

    class Recorder:  # what reaches the terminal, and which cell had started when it did
        def write(self, text):
            seen.append(text)

        def flush(self):
            pass

    cli.execute_notebook(path, tmp_path / "out", profile="ci", timeout=120,
                         echo=cli.NotebookEcho(Recorder(), slow_s=1.0))
    lines = [line for line in "".join(seen).splitlines()]
    assert all(line.startswith(cli.NotebookEcho.PREFIX) for line in lines)
    text = "\n".join(lines)
    assert "per-SAE line one" in text and "oops" in text and "partial" in text
    bars = [line for line in lines if "train probe" in line]
    assert bars and "50/50" in bars[-1] and len(bars) <= 3  # its last state; not 50 redraws
    assert any("done in 1s: import time" in line for line in lines)  # the slow cell, none of the quick ones
    assert sum("done in" in line for line in lines) == 1
    assert capsys.readouterr().out == ""  # everything went through the echo given


def test_notebook_echo_keeps_redraws_and_long_outputs_short():
    import io

    clock = iter(range(0, 1000, 1)).__next__  # one second per reading
    out = io.StringIO()
    echo = cli.NotebookEcho(out, every_s=10, slow_s=1e9, max_lines=3, width=40, clock=lambda: clock())
    echo.cell_started()
    echo.stream("a\nb\rB\n")  # a carriage return redraws the line: its last state
    echo.stream("x" * 50 + "\n")
    echo.stream("d\ne\nf\n")
    for i in range(1, 101):  # a tqdm widget: left text, then right text, per redraw
        echo.widget({"data": {"method": "update", "state": {"value": f"train:\u2007{i}%"}}})
        echo.widget({"data": {"method": "update", "state": {"value": f"{i}/100 [00:0{i % 10}&lt;00:10]"}}})
    echo.widget({"data": {"method": "update", "state": {"value": 3.0}}})  # the bar's number: no line
    echo.cell_finished({"source": "x = 1", "execution_count": 1})
    lines = [line[len(cli.NotebookEcho.PREFIX):] for line in out.getvalue().splitlines()]
    assert lines[:4] == ["a", "B", "x" * 37 + "...", "... (more output in the executed notebook)"]
    bars = lines[4:]
    assert all(b.startswith("train: ") for b in bars)  # d, e, f: over the limit
    assert 5 <= len(bars) <= 12 and bars[-1] == "train: 100% 100/100 [00:00<00:10]"


def test_train_distributed_hands_its_flags_to_the_distributed_entry_point(monkeypatch):
    import switch_sae_core.distributed.launch as launch
    from switch_sae_core import cli

    seen = {}
    monkeypatch.setattr(launch, "main", lambda argv: seen.setdefault("argv", argv) and 0)
    assert cli.main(["train-distributed", "--config", "run.json", "--expert-parallel"]) == 0
    assert seen["argv"] == ["--config", "run.json", "--expert-parallel"]


def test_injected_parameters_replace_an_earlier_injection_and_need_a_parameters_cell():
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell("# t"), nbformat.v4.new_code_cell("SEED = None", metadata={"tags": ["parameters"]}),
                nbformat.v4.new_code_cell("x = 1")]
    cli.inject_parameters(nb, SEED=3)
    cli.inject_parameters(nb, SEED=4, PROFILE="ci")
    assert [c.source for c in nb.cells] == ["# t", "SEED = None", "# Parameters\nSEED = 4\nPROFILE = 'ci'", "x = 1"]
    with pytest.raises(ValueError, match="no cell tagged 'parameters'"):
        cli.inject_parameters(nbformat.v4.new_notebook(), PROFILE="ci")


def test_building_the_parser_imports_no_heavy_module():
    """--help and a bad flag must answer at once: parsing imports neither torch nor transformer_lens
    (a fresh interpreter, since this one has torch loaded already)."""
    import subprocess
    import sys

    probe = ("import sys\nfrom switch_sae_core import cli\n"
             "for argv in (['train', '--k', 'many'], ['--help'], ['sweep', '--help'], ['evaluate', '--help']):\n"
             "    try:\n        cli.main(argv)\n    except SystemExit:\n        pass\n"
             "print(sorted(m for m in ('torch', 'transformer_lens', 'transformers', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_a_missing_sae_folder_is_one_line_naming_it(tmp_path, capsys):
    missing = tmp_path / "does_not_exist"
    with pytest.raises(SystemExit) as e:
        cli.main(["evaluate", str(missing), "--profile", "ci"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1
    assert f"the folder {missing} does not exist" in err and "switch-sae train --out" in err


def test_a_library_error_is_one_line_and_debug_shows_the_traceback(tmp_path, capsys, monkeypatch):
    from switch_sae_core.saes.base import CheckpointError

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit) as e:  # a folder without a checkpoint: the loader's CheckpointError
        cli.main(["evaluate", str(empty), "--profile", "ci", "--no-lm"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 1 and len(err.splitlines()) == 1 and "sae.safetensors is missing" in err
    with pytest.raises(CheckpointError):
        cli.main(["evaluate", str(empty), "--profile", "ci", "--no-lm", "--debug"])
    monkeypatch.setenv(cli.DEBUG_ENV, "1")
    with pytest.raises(CheckpointError):
        cli.main(["evaluate", str(empty), "--profile", "ci", "--no-lm"])


def test_a_bug_still_shows_its_traceback(monkeypatch):
    def broken(ns):
        raise KeyError("a bug, not a user error")

    monkeypatch.setitem(cli.COMMANDS, "cache", broken)
    with pytest.raises(KeyError):
        cli.main(["cache", "--profile", "ci"])


def test_every_deliberate_error_class_is_recognised():
    from switch_sae_core.config import ConfigError
    from switch_sae_core.errors import ModelUnavailableError
    from switch_sae_core.data.extract import ExtractionError
    from switch_sae_core.data.text import DataUnavailableError
    from switch_sae_core.interop.sae_lens import InteropError
    from switch_sae_core.distributed.comm import DistributedConfigError, RankFailureError
    from switch_sae_core.errors import is_deliberate
    from switch_sae_core.saes.base import CheckpointError, SAEInputError
    from switch_sae_core.results import ResultsError
    from switch_sae_core.train import TrainingError

    for cls in (ConfigError, TrainingError, RankFailureError, DistributedConfigError, ResultsError,
                CheckpointError, SAEInputError, DataUnavailableError, ModelUnavailableError, ExtractionError,
                InteropError):
        assert is_deliberate(cls("x")), cls.__name__
    assert not is_deliberate(ValueError("x")) and not is_deliberate(RuntimeError("x"))


@pytest.mark.parametrize("arch,n_experts,words", [("topk", 1, "the dictionary size n_features=1152"),
                                                 ("switch", 4, "an expert's width n_features/n_experts=288")])
def test_too_large_k_names_the_right_width(arch, n_experts, words):
    from switch_sae_core.config import ConfigError

    ns = cli.build_parser().parse_args(["train", "--profile", "ci", "--arch", arch, "--n-experts", str(n_experts),
                                        "--k", "5000"])
    with pytest.raises(ConfigError, match=f"larger than {words}"):
        cli.train_configs_from_args(ns, cli.profile_from_args(ns), d_in=576)


def test_html_export_shows_a_widgets_view_not_an_empty_widget():
    """The executed notebooks' HTML is read offline: a widget output (show_widget) exports as its text/html view."""
    import nbformat
    from nbconvert import HTMLExporter

    nb = nbformat.v4.new_notebook()
    state = {"abc": {"model_name": "VBoxModel", "model_module": "@jupyter-widgets/controls",
                     "model_module_version": "2.0.0", "state": {}}}
    nb.metadata["widgets"] = {"application/vnd.jupyter.widget-state+json": {"version_major": 2, "version_minor": 0,
                                                                             "state": state}}
    cell = nbformat.v4.new_code_cell("explorer.show()")
    cell.outputs = [nbformat.v4.new_output("display_data", data={
        "application/vnd.jupyter.widget-view+json": {"version_major": 2, "version_minor": 0, "model_id": "abc"},
        "text/html": "<b>the-current-view</b>", "text/plain": "VBox()"})]
    nb.cells = [cell]
    html, _ = HTMLExporter(config=cli._offline_html_config()).from_notebook_node(nb)
    assert "the-current-view" in html and '"model_id": "abc"' not in html


@pytest.mark.parametrize("interrupt, says", [
    ("trainer", "stopped by Ctrl-C after step 37 of 600; checkpoint saved in /c/step_00000037; "
                "run the same command again to resume."),
    ("elsewhere", "SAEs finished so far are kept in the cache and the table; run the same command again to resume."),
])
def test_ctrl_c_is_one_line_saying_how_to_resume(monkeypatch, capsys, interrupt, says):
    # issue 28: Ctrl-C printed a 40-line KeyboardInterrupt traceback
    from pathlib import Path

    from switch_sae_core.train import TrainingInterrupted

    def stopped(ns):
        if interrupt == "trainer":
            raise TrainingInterrupted("stopped by Ctrl-C after step 37 of 600; checkpoint saved in /c/step_00000037",
                                      37, Path("/c/step_00000037"))
        raise KeyboardInterrupt

    monkeypatch.setitem(cli.COMMANDS, "sweep", stopped)
    assert cli.main(["sweep", "--profile", "ci"]) == 130
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err == f"switch-sae sweep: interrupted: {says}"
