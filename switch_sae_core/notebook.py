"""What every numbered notebook does first, in one explicit call after its parameters cell:

    from switch_sae_core.notebook import setup
    nb = setup(PROFILE, SEED, OUTPUT_DIR)

`nb.profile` is the named scale (`profiles.get_profile`), `nb.site` the model and hook its activations come from,
`nb.show(fig, name)` saves a figure under the notebook's output folder and shows it, `nb.say(markdown)` shows a
verdict. Importing this module changes nothing global; `setup` does, on purpose: it sets plotly's default renderer.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

from .profiles import Profile, get_profile

# interactive in Jupyter and in the exported HTML, offline: the figure's JSON goes in the notebook ("plotly_mimetype")
# and plotly.js is embedded once ("notebook"), so neither needs a CDN
PLOTLY_RENDERER = "plotly_mimetype+notebook"


@dataclasses.dataclass(frozen=True)
class Notebook:
    """A notebook's settings once resolved: the profile and where its figures go (None: `paths.figures_dir`,
    outputs/<profile>/figures/ unless the environment says otherwise)."""

    profile: Profile
    output_dir: Optional[str] = None

    @property
    def site(self) -> str:
        """The activations' site, as the figures' titles name it: the model's exact name and the hook
        (`DataConfig.site_label`, e.g. 'SmolLM2-135M-Instruct blocks.20.hook_resid_post')."""
        return self.profile.data.site_label

    def show(self, fig, name: str, **kwargs) -> None:
        """Save `fig` as <name>.png and .svg in the notebook's figure folder and show it (`viz.composite.show`:
        a figure function's None is printed as its `empty_message` instead)."""
        from .viz import composite

        composite.show(fig, name, self.profile.name, self.output_dir, **kwargs)

    def say(self, markdown: str) -> None:
        """Show a verdict (the library's Markdown sentences) as formatted text."""
        from IPython.display import Markdown, display

        display(Markdown(markdown))


def setup(profile: str, seed: Optional[int] = None, output_dir: Optional[str] = None) -> Notebook:
    """A notebook's shared set-up: the profile named `profile` (None: $SWITCH_SAE_PROFILE, else 'quick'; its
    training seed replaced by `seed` unless None; ConfigError for an unknown name) and plotly's default renderer
    set to PLOTLY_RENDERER."""
    import plotly.io as pio

    nb = Notebook(get_profile(profile, seed=seed), output_dir)  # first: a bad name changes nothing
    pio.renderers.default = PLOTLY_RENDERER
    return nb
