"""The latent explorer: `cvae-llama explore`, a web page (Gradio, the `app` extra) to encode texts, sample the prior,
interpolate, move texts along directions and project many texts, on any saved CVAE.

- `gradio_app`: the page, [`build_app`] for a loaded CVAE and [`launch_app`] to load and serve one (needs
  `pip install 'cvae-llama[app]'`).

The operations the page runs are library calls without Gradio, in `cvae_llama.latent_space`: [`posterior`],
[`reconstruct`], [`sample_prior`], [`interpolate`], [`latent_direction`], [`transfer`], [`project_2d`]. They are
re-exported here, where earlier versions defined them, so that `from cvae_llama.app import transfer` keeps working.
"""

from .. import latent_space
from ..latent_space import *  # noqa: F403


__all__ = list(latent_space.__all__)
