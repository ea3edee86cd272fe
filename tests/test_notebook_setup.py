"""`notebook.setup`, the notebooks' one set-up call: importing it changes nothing global, calling it sets plotly's
renderer and resolves the profile; `nb.show` saves where OUTPUT_DIR says."""
import subprocess
import sys

import pytest

from switch_sae_core.config import ConfigError


def test_import_changes_nothing_and_setup_sets_the_renderer():
    code = ("import plotly.io as pio; before = pio.renderers.default; import switch_sae_core.notebook as n; "
            "assert pio.renderers.default == before, before; nb = n.setup('ci', 7, None); "
            "assert pio.renderers.default == n.PLOTLY_RENDERER == 'plotly_mimetype+notebook'; "
            "print(nb.profile.name, nb.profile.train.seed, nb.site)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    from switch_sae_core.profiles import get_profile

    ci = get_profile("ci")
    assert out.stdout.strip() == f"ci 7 {ci.data.site_label}"  # the model's exact name and the hook


def test_unknown_profile_is_one_clear_error_and_changes_nothing():
    import plotly.io as pio

    from switch_sae_core.notebook import setup

    before = pio.renderers.default
    with pytest.raises(ConfigError, match="unknown profile 'nope'"):
        setup("nope")
    assert pio.renderers.default == before


def test_show_saves_the_figure_in_output_dir(tmp_path, capsys, monkeypatch):
    import matplotlib
    import plotly.io as pio

    monkeypatch.setattr(pio.renderers, "default", pio.renderers.default)  # restored after setup sets it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from switch_sae_core.notebook import setup

    nb = setup("ci", None, str(tmp_path))
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    nb.show(fig, "probe")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["probe.png", "probe.svg"]
    nb.show(None, "nothing", empty_message="nothing to draw")  # a figure function's None: its sentence instead
    assert capsys.readouterr().out.strip() == "nothing to draw" and not (tmp_path / "nothing.png").exists()
