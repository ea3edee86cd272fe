"""Expert / feature explorers and the one-pass feature statistics (switch_sae_core.viz.widgets)."""
import pytest
import torch

from switch_sae_core.config import SAEConfig
from switch_sae_core.saes.base import build_sae
from switch_sae_core.analysis.similarity import collect_codes
from switch_sae_core.viz.widgets import (
    ExpertExplorer,
    FeatureExplorer,
    TokenContexts,
    compute_feature_stats,
    context_html,
    stats_from_codes,
)

TEXT = "the cat sat on the mat. a dog ran to the park and the cat hid under the bed again."


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    sae = build_sae(SAEConfig(arch="switch", d_in=16, n_features=64, n_experts=4, k=4))
    ids = torch.tensor([ord(c) for c in TEXT])  # one token per character
    L = 20
    tokens_CL = ids[: len(ids) // L * L].view(-1, L)
    C = tokens_CL.shape[0]
    contexts = TokenContexts(tokens_CL, torch.arange(C).repeat_interleave(L), torch.arange(L).repeat(C),
                             lambda token_ids: [chr(i) for i in token_ids])
    x_TD = torch.randn(contexts.n_rows, 16)
    stats = stats_from_codes(collect_codes(sae, x_TD, batch_size=7), 4, 4, 64, top_n=3, chunk=7)  # many chunks
    return sae, contexts, x_TD, stats


def test_feature_stats_match_a_dense_reference(setup):
    sae, _, x_TD, stats = setup
    with torch.no_grad():
        out = sae(x_TD)
    dense_TM = torch.zeros(x_TD.shape[0], 64).scatter_(1, out.latent_indices, out.latent_acts.clamp_min(0))
    torch.testing.assert_close(stats.freq_M, (dense_TM > 0).float().mean(0))
    top_vals, top_rows = dense_TM.topk(3, dim=0)
    torch.testing.assert_close(stats.top_acts_MJ, top_vals.T)
    active = top_vals.T > 0
    assert torch.equal(stats.top_rows_MJ[active], top_rows.T[active]) and (stats.top_rows_MJ[~active] == -1).all()
    assert torch.equal(stats.choice_T, out.expert_indices[:, 0])
    assert stats.n_blocks == 4 and stats.width == 16 and stats.expert_of(33) == 2
    one_pass = compute_feature_stats(sae, x_TD, top_n=3)
    assert torch.equal(one_pass.top_rows_MJ, stats.top_rows_MJ) and torch.equal(one_pass.freq_M, stats.freq_M)


def test_context_html_highlights_the_row_token(setup):
    _, contexts, _, _ = setup
    row = 1  # "h" of "the"
    assert contexts.token(row) == "h"
    assert "t<mark>h</mark>e" in context_html(contexts, row, before=2, after=1)
    assert set(contexts.rows_with_token("c").tolist()) == {i for i, ch in enumerate(TEXT[: contexts.n_rows]) if ch == "c"}


def test_expert_explorer_callback_renders_the_chosen_expert_and_feature(setup):
    sae, contexts, _, stats = setup
    ex = ExpertExplorer(sae, stats, contexts)
    assert "expert 0" in ex.html.value and "<img" in ex.html.value
    ex.expert_select.value = 2  # the callback re-renders
    feature = ex.feature_select.value
    assert stats.expert_of(feature) == 2 and f"feature {feature} (expert 2)" in ex.html.value
    top_row = int(stats.top_rows_MJ[feature, 0])
    assert f"<mark>{contexts.token(top_row)}</mark>" in ex.html.value
    assert "nearest features in other experts" in ex.html.value


def test_feature_explorer_by_id_and_by_token(setup):
    sae, contexts, x_TD, stats = setup
    fx = FeatureExplorer(sae, stats, contexts, x_TD)
    fired = int(stats.freq_M.argmax())
    fx.feature_box.value = fired
    assert f"feature {fired}" in fx.html.value and "<mark>" in fx.html.value
    fx.token_box.value = "c"
    n_c = TEXT[: contexts.n_rows].count("c")
    assert f"<mark>c</mark> ({n_c} occurrences)" in fx.html.value
    fx.token_box.value = "Z"
    assert "does not occur" in fx.html.value


def test_show_displays_one_output_live_widget_with_its_view_as_fallback(setup):
    """No static copy under the live widget: one display output, whose text/html is the current view."""
    from IPython.core.interactiveshell import InteractiveShell
    from IPython.utils.capture import capture_output

    sae, contexts, x_TD, stats = setup
    InteractiveShell.instance()
    for explorer in (ExpertExplorer(sae, stats, contexts), FeatureExplorer(sae, stats, contexts, x_TD)):
        with capture_output() as captured:
            explorer.show()
        assert len(captured.outputs) == 1
        data = captured.outputs[0].data
        assert data["application/vnd.jupyter.widget-view+json"]["model_id"] == explorer.widget.model_id
        assert data["text/html"] == explorer.html.value
