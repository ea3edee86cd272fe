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


# --- issue 28: what a reader needs from each figure, checked on the drawn artists -------------------------------
def _marker_points_px(ax) -> np.ndarray:
    """Display coordinates of every data point drawn with a marker (lines with markers, scatter offsets)."""
    pts = [ax.transData.transform(np.column_stack(line.get_data()).astype(float)) for line in ax.get_lines()
           if line.get_marker() not in (None, "None", "", " ") and len(line.get_xdata())]
    pts += [ax.transData.transform(c.get_offsets()) for c in ax.collections if len(c.get_offsets())]
    return np.concatenate(pts) if pts else np.zeros((0, 2))


def assert_no_legend_over_data(fig) -> None:
    """No axes' legend box contains one of its data points, and every legend lies inside the saved figure."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    whole = fig.get_tightbbox(renderer).transformed(fig.dpi_scale_trans)  # what savefig(bbox_inches="tight") keeps
    for ax in fig.axes:
        legend = ax.get_legend()
        if legend is None:
            continue
        box = legend.get_window_extent(renderer)
        pts = _marker_points_px(ax)
        inside = (pts[:, 0] >= box.x0) & (pts[:, 0] <= box.x1) & (pts[:, 1] >= box.y0) & (pts[:, 1] <= box.y1)
        assert not inside.any(), f"the legend of '{ax.get_title()}' covers {int(inside.sum())} data point(s)"
        assert whole.x0 - 1 <= box.x0 and box.x1 <= whole.x1 + 1 and whole.y0 - 1 <= box.y0
    boxes = [ax.get_legend().get_window_extent(renderer) for ax in fig.axes if ax.get_legend() is not None]
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:]), "two legends overlap"


@pytest.mark.parametrize("profile", ["quick", "cpu"])
def test_scaling_legends_cover_no_data_and_say_the_trend_in_words(profile):
    # notebook 07's figure from the committed tables: on quick the legends covered points and "b = -0.06"
    # (a rising MSE) read like a falling one
    import warnings

    from switch_sae_core import results
    from switch_sae_core.analysis import scaling
    from switch_sae_core.profiles import get_profile
    from switch_sae_core.viz.scaling import scaling_figure

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", results.ResultsWarning)
        analysis = scaling.analyse(results.load_records(results.results_path(profile)), get_profile(profile))
    assert analysis.points
    fig = scaling_figure(analysis, profile)
    assert_no_legend_over_data(fig)
    for ax, x in zip(fig.axes, scaling.AXES):
        texts = [t.get_text() for t in ax.get_legend().get_texts()]
        for fit in analysis.fits[x].values():
            words = f"MSE rises as X^{-fit.b:.2f}" if fit.b < 0 else f"MSE falls as X^{-fit.b:.2f}"
            assert any(t.startswith(f"fit: {words}") for t in texts), (words, texts)
    plt.close(fig)


def test_heatmap_colourbars_name_their_metric():
    rng = np.random.default_rng(0)
    for fig in (plots.plot_expert_similarity(rng.random((4, 4)), rng.random((4, 4))),
                plots.plot_router_alignment(rng.normal(size=(4, 4)), rng.normal(size=(4, 4))),
                plots.plot_ground_truth(rng.random(8), rng.random(8), rng.normal(size=(8, 8)), np.arange(8) % 2)):
        bars = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]
        assert bars and all("cosine" in ax.get_ylabel() for ax in bars), [ax.get_ylabel() for ax in bars]
        plt.close(fig)


@pytest.mark.parametrize("n", [4, 16, 24, 64])
def test_every_expert_gets_its_own_colour(n):
    # routing_over_training drew 16 experts with a 10-colour palette
    rng = np.random.default_rng(0)
    fig = plots.plot_routing_history(list(range(5)), rng.dirichlet(np.ones(n), size=5), rng.random(5), n)
    colours = {matplotlib.colors.to_hex(line.get_color()) for line in fig.axes[0].get_lines()[:n]}
    assert len(colours) == n
    plt.close(fig)
    e = np.arange(n).repeat(3)
    fig = plots.plot_tsne_by_expert(rng.normal(size=(3 * n, 2)), e, rng.normal(size=(3 * n, 2)), e)
    assert len({tuple(np.round(c, 4)) for c in fig.axes[0].collections[0].get_facecolors()}) == n
    plt.close(fig)


def test_the_threshold_line_is_in_the_legend():
    ax = plots.plot_cosine_histograms({"Switch -> TopK": np.linspace(0, 1, 50)}, "best match", threshold=0.9)
    assert "cosine 0.9 (near-duplicate)" in [t.get_text() for t in ax.get_legend().get_texts()]
    plt.close(ax.figure)


def test_synthsaebench_bars_keep_grey_for_topk_only():
    """Notebook 08's figure: grey marks the two TopK rows; 18 Switch arms (more than tab10's 9 non-grey colours,
    as many as tab20's) each get a distinct colour that is not grey, in the README table's order."""
    from matplotlib.colors import to_rgba

    from switch_sae_core.ground_truth import DISPLAY
    from switch_sae_core.viz.experts import _is_grey
    from switch_sae_core.viz.ground_truth import plot_bench

    switch = [f"arm-{i}" for i in range(12)] + [lab for lab in DISPLAY if "topk" not in lab]
    rows = [{"label": lab, "n": 3, "mcc": 0.5, "mse": 1.0} for lab in switch[::-1] + ["topk", "sae-lens topk"]]
    fig = plot_bench(rows)
    ax = fig.axes[0]
    names = [t.get_text() for t in ax.get_xticklabels()]
    assert names[:2] == ["topk", "sae-lens topk"] and names[2:2 + len(DISPLAY) - 2] == list(DISPLAY)[2:]
    colors = [to_rgba(p.get_facecolor()) for p in ax.patches]
    assert all(_is_grey(c) for c in colors[:2])
    assert not any(_is_grey(c) for c in colors[2:]) and len(set(colors[2:])) == len(switch)
    plt.close(fig)


def test_sites_figure_bars_are_each_sae_against_its_sites_topk():
    """Notebook 09's figure from the committed cpu table: one bar per Switch SAE, its height the % change of its
    seed mean against TopK's at the same site, every SAE in its own non-grey colour with a legend entry."""
    from matplotlib.colors import to_rgb

    from switch_sae_core.analysis.sites import display, site_rows
    from switch_sae_core.viz.sites import plot_sites

    rows = site_rows("cpu")
    fig = plot_sites({"cpu": rows})
    topk = next(r for r in rows if r.label == "topk")
    others = [r for r in rows if r.label != "topk"]
    bars = fig.axes[0].patches
    assert sorted(round(b.get_height(), 6) for b in bars) == sorted(
        round(100 * (r.mean["mse"] / topk.mean["mse"] - 1), 6) for r in others)
    colours = {to_rgb(b.get_facecolor()) for b in bars}
    assert len(colours) == len(others) and not any(c[0] == c[1] == c[2] for c in colours)
    assert sorted(t.get_text() for t in fig.legends[0].get_texts()) == sorted(display(r.label) for r in others)
    assert plot_sites({"cpu_gemma": []}) is None
