"""Interactive explorers for a trained (Switch) SAE: experts, features, tokens.

Rendering only: what they show is computed in `analysis/feature_stats.py` (`compute_feature_stats`: ONE pass
over held-out activations -> per-feature firing frequency, mean activation, top-activating rows, and (Switch)
each row's router choice and probabilities; `features_on_rows`) and `data/contexts.py` (`TokenContexts`: the
token strings of the rows, so a feature's top contexts are printed with the token highlighted); both names are
importable from here too.
- `ExpertExplorer`: choose an expert -> its features' firing frequencies, the router-probability
  histogram for that expert, its features' top contexts and their nearest features in other experts.
- `FeatureExplorer`: by feature id, or by token ("which features fire on ' the'?").

Every view is rendered to an HTML string first (`*_html` functions; images are inline PNG), so the
same HTML is the widget's content, the static fallback of a headless run, and what the tests check.
`.show()` displays ONE output with two representations: the live widget (what Jupyter shows) and its
current view as text/html (what a renderer without a kernel shows: an HTML export, GitHub). ipywidgets
and matplotlib are imported only when a view is built.
"""
from __future__ import annotations

import base64
import html
import io
from typing import Optional

import torch
from torch import Tensor

from ..analysis.feature_stats import (FeatureStats, compute_feature_stats, features_on_rows,  # noqa: F401
                                      sae_blocks, stats_from_codes)  # (re-exported: the notebooks import them here)
from ..analysis.similarity import nearest_features
from ..data.contexts import TokenContexts  # noqa: F401 (re-exported)


# --- HTML views ---------------------------------------------------------------------------------------------

_STYLE = (
    "<style>.ssae-ctx{font-family:monospace;white-space:pre-wrap;margin:1px 0}"
    ".ssae-ctx mark{background:#ffb347;font-weight:bold}.ssae-tab td,.ssae-tab th{padding:1px 8px;text-align:left}</style>"
)


def _show_token(s: str) -> str:
    return html.escape(s.replace("\n", "⏎"))


def context_html(contexts: TokenContexts, row: int, value: Optional[float] = None, before: int = 12, after: int = 4) -> str:
    """One context line with the row's token in <mark>...</mark>."""
    toks, at = contexts.window(row, before, after)
    parts = [f"<mark>{_show_token(t)}</mark>" if i == at else _show_token(t) for i, t in enumerate(toks)]
    val = f"<b>{value:.2f}</b> " if value is not None else ""
    return f'<div class="ssae-ctx">{val}{"".join(parts)}</div>'


def figure_html(fig) -> str:
    """A matplotlib figure as an inline PNG <img> (closed afterwards)."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, bbox_inches="tight")
    plt.close(fig)
    return f'<img src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}"/>'


def feature_html(feature: int, stats: FeatureStats, contexts: Optional[TokenContexts], dirs_MD: Optional[Tensor] = None,
                 n_contexts: int = 5, n_neighbours: int = 5) -> str:
    """A feature: expert, frequency, top-activating contexts, nearest features in other experts."""
    if not 0 <= feature < stats.n_latents:
        return f"<p>feature {feature} does not exist (0 ... {stats.n_latents - 1})</p>"
    e = stats.expert_of(feature)
    where = "shared expert" if e >= stats.n_routed else f"expert {e}"
    head = (f"<h4>feature {feature} ({where}) — fires on {stats.freq_M[feature]:.2%} of {stats.n_rows} tokens, "
            f"mean activation {stats.mean_act_M[feature]:.2f}</h4>")
    lines = [context_html(contexts, int(r), float(a)) if contexts is not None else f"<div>row {int(r)}: {float(a):.2f}</div>"
             for a, r in zip(stats.top_acts_MJ[feature, :n_contexts], stats.top_rows_MJ[feature, :n_contexts]) if r >= 0]
    body = "".join(lines) or "<p>(never active on these tokens: a dead feature)</p>"
    near = ""
    if dirs_MD is not None and stats.n_blocks > 1:
        ids, cos = nearest_features(dirs_MD, feature, stats.n_blocks, n_neighbours, other_expert=True)
        rows = "".join(f"<tr><td>{int(i)}</td><td>{stats.expert_of(int(i))}</td><td>{float(c):.3f}</td>"
                       f"<td>{stats.freq_M[i]:.2%}</td><td>{_top_token(stats, contexts, int(i))}</td></tr>" for i, c in zip(ids, cos))
        near = ("<p>nearest features in other experts (decoder cosine):</p><table class='ssae-tab'><tr><th>feature</th>"
                f"<th>expert</th><th>cosine</th><th>frequency</th><th>top token</th></tr>{rows}</table>")
    return _STYLE + head + body + near


def _top_token(stats: FeatureStats, contexts: Optional[TokenContexts], feature: int) -> str:
    row = int(stats.top_rows_MJ[feature, 0])
    if contexts is None or row < 0:
        return ""
    return _show_token(contexts.token(row))


def expert_summary_figure(expert: int, stats: FeatureStats):
    """Left: firing frequencies of the expert's features; right: its router probability over tokens."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 2.6))
    freq = stats.freq_M[list(stats.expert_features(expert))]
    axes[0].hist(torch.log10(freq.clamp_min(1e-6)).numpy(), bins=30, color="tab:blue")
    axes[0].set(xlabel="log10 firing frequency (dead at -6)", ylabel="features", title=f"expert {expert}: features")
    if stats.router_probs_TN is not None and expert < stats.n_routed:
        p = stats.router_probs_TN[:, expert]
        mine = stats.choice_T == expert
        axes[1].hist([p[mine].numpy(), p[~mine].numpy()], bins=30, range=(0, 1), stacked=True,
                     label=["routed here", "routed elsewhere"], color=["tab:orange", "tab:gray"])
        axes[1].legend(fontsize=7)
        axes[1].set(xlabel=f"router probability p_{expert}(x)", ylabel="tokens", title="router")
    else:
        axes[1].set_axis_off()
    fig.tight_layout()
    return fig


def expert_html(expert: int, stats: FeatureStats, feature: Optional[int], contexts: Optional[TokenContexts],
                dirs_MD: Optional[Tensor] = None, with_figure: bool = True) -> str:
    """An expert: load, dead features, most frequent features, figure, and one feature in detail."""
    feats = list(stats.expert_features(expert))
    freq = stats.freq_M[feats]
    shared = expert >= stats.n_routed
    load = "always on (shared expert)" if shared or stats.choice_T is None else (
        f"receives {(stats.choice_T == expert).float().mean():.1%} of tokens")
    head = (f"<h3>expert {expert}: {len(feats)} features, {load}; {int((freq == 0).sum())} never fired, "
            f"median frequency {freq.median():.2%}</h3>")
    order = freq.argsort(descending=True)[:8]
    top = ", ".join(f"{feats[i]} ({freq[i]:.1%}: {_top_token(stats, contexts, feats[i])})" for i in order.tolist())
    parts = [head, f"<p>most frequent features: {top}</p>"]
    if with_figure:
        parts.append(figure_html(expert_summary_figure(expert, stats)))
    if feature is not None:
        parts.append(feature_html(feature, stats, contexts, dirs_MD))
    return _STYLE + "".join(parts)


@torch.no_grad()
def token_html(text: str, sae, x_TD: Tensor, stats: FeatureStats, contexts: TokenContexts, n_features: int = 10,
               max_rows: int = 512) -> str:
    """Which features fire on a token: over the rows whose token is `text`, how often and how strongly."""
    rows = contexts.rows_with_token(text)
    if rows.numel() == 0:
        return f"<p>the token {_show_token(repr(text))} does not occur in these {contexts.n_rows} rows</p>"
    n_occurrences = rows.numel()
    rows = rows[:max_rows]  # features are counted on the first max_rows occurrences
    count_M, sum_M = features_on_rows(sae, x_TD[rows], stats.n_latents)
    best = count_M.argsort(descending=True)[:n_features]
    table = "".join(f"<tr><td>{int(f)}</td><td>{stats.expert_of(int(f))}</td><td>{int(count_M[f])}/{rows.numel()}</td>"
                    f"<td>{float(sum_M[f] / count_M[f].clamp_min(1)):.2f}</td><td>{stats.freq_M[f]:.2%}</td></tr>"
                    for f in best.tolist() if count_M[f] > 0)
    examples = "".join(context_html(contexts, int(r)) for r in rows[:3])
    return (_STYLE + f"<h4>features on the token <mark>{_show_token(text)}</mark> ({n_occurrences} occurrences)</h4>" + examples
            + "<table class='ssae-tab'><tr><th>feature</th><th>expert</th><th>fires on</th><th>mean act</th>"
            f"<th>overall freq</th></tr>{table}</table>")


# --- the widgets ------------------------------------------------------------------------------------------------


class ExpertExplorer:
    """Choose an expert and one of its features (sorted by frequency); `.widget` is the ipywidgets box,
    `.html.value` its current view, `.show()` displays the widget (`show_widget`)."""

    def __init__(self, sae, stats: FeatureStats, contexts: Optional[TokenContexts] = None, expert: int = 0):
        import ipywidgets as w

        self.sae, self.stats, self.contexts = sae, stats, contexts
        self.dirs_MD = sae.decoder_directions().detach().cpu()
        labels = [(f"expert {e}" + (" (shared)" if e >= stats.n_routed else ""), e) for e in range(stats.n_blocks)]
        self.expert_select = w.Dropdown(options=labels, value=expert, description="expert")
        self.feature_select = w.Dropdown(description="feature")
        self.html = w.HTML()
        self._set_feature_options(expert)
        self.expert_select.observe(self._on_expert, names="value")
        self.feature_select.observe(self._on_feature, names="value")
        self.widget = w.VBox([w.HBox([self.expert_select, self.feature_select]), self.html])
        self.render()

    def _set_feature_options(self, expert: int) -> None:
        feats = list(self.stats.expert_features(expert))
        order = self.stats.freq_M[feats].argsort(descending=True).tolist()
        self._updating = True
        self.feature_select.options = [(f"{feats[i]} ({self.stats.freq_M[feats[i]]:.2%})", feats[i]) for i in order]
        self.feature_select.value = feats[order[0]]
        self._updating = False

    def _on_expert(self, change) -> None:
        self._set_feature_options(change["new"])
        self.render()

    def _on_feature(self, change) -> None:
        if not self._updating:
            self.render()

    def render(self) -> str:
        self.html.value = expert_html(self.expert_select.value, self.stats, self.feature_select.value, self.contexts, self.dirs_MD)
        return self.html.value

    def show(self) -> None:
        show_widget(self.widget, self.html.value)


class FeatureExplorer:
    """Look up a feature by id, or the features that fire on a token string."""

    def __init__(self, sae, stats: FeatureStats, contexts: TokenContexts, x_TD: Tensor, feature: int = 0,
                 token: Optional[str] = None):
        import ipywidgets as w

        self.sae, self.stats, self.contexts, self.x_TD = sae, stats, contexts, x_TD
        self.dirs_MD = sae.decoder_directions().detach().cpu()
        self.feature_box = w.BoundedIntText(value=feature, min=0, max=stats.n_latents - 1, description="feature id")
        self.token_box = w.Text(value=token or "", description="token", placeholder="e.g.  the", continuous_update=False)
        self.html = w.HTML()
        self.feature_box.observe(lambda c: self.show_feature(c["new"]), names="value")
        self.token_box.observe(lambda c: self.show_token(c["new"]) if c["new"] else None, names="value")
        self.widget = w.VBox([w.HBox([self.feature_box, self.token_box]), self.html])
        if token:
            self.show_token(token)
        else:
            self.show_feature(feature)

    def show_feature(self, feature: int) -> str:
        self.html.value = feature_html(int(feature), self.stats, self.contexts, self.dirs_MD)
        return self.html.value

    def show_token(self, text: str) -> str:
        self.html.value = token_html(text, self.sae, self.x_TD, self.stats, self.contexts)
        return self.html.value

    def show(self) -> None:
        show_widget(self.widget, self.html.value)


def show_widget(widget, view_html: str) -> None:
    """Display `widget` as one output whose text/html representation is its current view: a live Jupyter
    front end renders the widget alone (no static copy under it to contradict it after an interaction);
    an HTML export or a viewer without a kernel shows the view as HTML."""
    from IPython.display import display

    bundle = widget._repr_mimebundle_()
    display({**bundle, "text/html": view_html}, raw=True)
