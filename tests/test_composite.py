"""viz/composite.py: an empty figure is not drawn; the quickstart legend covers no bar."""
import matplotlib

matplotlib.use("Agg")

from switch_sae_core.viz import composite  # noqa: E402


def test_all_zero_duplication_is_not_drawn():
    zero_bins = [{"frac_duplicated": 0.0, "label": f"q{i}", "n": 5, "mean_nn_cos": 0.2} for i in range(4)]
    rows = [{"N": n, "k": 8, "other_expert": 0.0} for n in (2, 4)]
    assert composite.duplication_figure(rows, {"a": zero_bins}, 0.0, (2, 4), 8, 2) is None
    assert composite.variant_duplication_figure({"a": zero_bins}) is None
    some = [dict(b, frac_duplicated=0.1 * i) for i, b in enumerate(zero_bins)]
    fig = composite.duplication_figure(rows, {"a": some}, 0.0, (2, 4), 8, 2)
    assert fig is not None and all(ax.get_ylim()[0] == 0 for ax in fig.axes)  # a fraction: no negative axis


def test_nothing_to_show():
    assert composite.nothing_to_show([0.0, float("nan")]) and composite.nothing_to_show([])
    assert not composite.nothing_to_show([0.0, 1e-6])


def test_quickstart_legend_covers_no_bar():
    load = [0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.3]  # the busiest expert is the last bar (#7), the tallest
    fig = composite.quickstart_figure({"step": [1, 2], "mse": [2.0, 1.0]}, load)
    fig.canvas.draw()
    ax = fig.axes[1]
    assert len(ax.patches) == len(load) and "balanced" in ax.get_title()
    legend = ax.get_legend()
    for bar in ax.patches if legend is not None else []:
        assert not legend.get_window_extent().overlaps(bar.get_window_extent())


def test_quickstart_says_what_the_orange_bar_is():
    fig = composite.quickstart_figure({"step": [1, 2], "mse": [2.0, 1.0]}, [0.1, 0.6, 0.3])
    title = fig.axes[1].get_title()
    assert "orange: the busiest expert, #1" in title and "dashed: balanced" in title
    bars = fig.axes[1].patches
    assert [matplotlib.colors.to_hex(b.get_facecolor()) for b in bars].count(matplotlib.colors.to_hex("tab:orange")) == 1
