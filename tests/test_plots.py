"""Figure details a reader relies on: legends for colours, whole-number expert ticks, titles that fit,
shades that tell Switch SAEs apart."""
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from switch_sae_core.viz import plots  # noqa: E402


def test_expert_heatmaps_have_whole_number_ticks():
    rng = np.random.default_rng(0)
    fig = plots.plot_expert_similarity(rng.random((16, 16)), rng.random((16, 16)))
    fig.canvas.draw()
    for ax in fig.axes[:2]:  # the two heatmaps (then their colour bars)
        for ticks in (ax.get_xticks(), ax.get_yticks()):
            shown = [t for t in ticks if -0.5 <= t <= 15.5]
            assert len(shown) >= 2 and all(float(t).is_integer() for t in shown), shown
    plt.close(fig)


def test_tsne_legend_names_every_expert_in_its_colour():
    rng = np.random.default_rng(0)
    e = np.repeat(np.arange(8), 10)
    fig = plots.plot_tsne_by_expert(rng.normal(size=(80, 2)), e, rng.normal(size=(80, 2)), e)
    legend = fig.legends[0]
    assert [t.get_text() for t in legend.get_texts()] == [f"expert {i}" for i in range(8)]
    points = fig.axes[0].collections[0].get_facecolors()
    for i, handle in enumerate(legend.legend_handles):  # the legend's colour is the points' colour
        np.testing.assert_allclose(matplotlib.colors.to_rgba(handle.get_color())[:3], points[e == i][0][:3])
    plt.close(fig)


@pytest.mark.parametrize("setting,ns", [("flop_matched", (2, 4, 8)), ("fixed_width", (4, 16))])
def test_switch_shades_are_told_apart(setting, ns):
    """The Switch SAEs of one figure (quick: N = 2, 4 FLOP-matched; 4, 16 fixed width) in clearly different
    shades: RGB distance > 0.3 (the old FLOP-matched switch-2 and switch-4 were 0.15 apart)."""
    rgb = [np.array(matplotlib.colors.to_rgb(plots.label_color(f"switch-{n}", setting))) for n in ns]
    for a, b in zip(rgb, rgb[1:]):
        assert np.linalg.norm(a - b) > 0.3, (setting, ns)


def test_plotly_title_fits_the_figure_width():
    title = "fixed_width: L0 vs CE loss recovered (SmolLM2-135M-Instruct, layer 20, 100K tokens)"
    records = [{"label": "topk", "setting": "baseline", "l0": 16.0, "loss_recovered": 0.9, "name": "topk",
                "flops_per_input": 1, "train_seconds": 1.0}]
    fig = plots.plotly_pareto(records, "l0", "loss_recovered", title)
    text, size = fig.layout.title.text, fig.layout.title.font.size
    assert text.replace("<br>", " ") == title
    assert max(len(line) for line in text.split("<br>")) * 0.6 * size <= fig.layout.width
