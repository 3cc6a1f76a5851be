"""The latent explorer: `cvae-llama explore`, a web page (Gradio, the `app` extra) to encode texts, sample the prior,
interpolate, move texts along directions and project many texts, on any saved CVAE.

- `explore`: the operations as library calls, without Gradio: [`posterior`], [`reconstruct`], [`sample_prior`],
  [`interpolate`], [`latent_direction`], [`transfer`], [`project_2d`];
- `gradio_app`: the page, [`build_app`] for a loaded CVAE and [`launch_app`] to load and serve one (needs
  `pip install 'cvae-llama[app]'`).
"""

from .explore import (
    DEFAULT_INTERPOLATION_STEPS,
    DEFAULT_NUM_SAMPLES,
    check_direction,
    check_texts_fit,
    encode_texts,
    interpolate,
    latent_direction,
    posterior,
    project_2d,
    reconstruct,
    sample_prior,
    select_direction,
    text_budgets,
    transfer,
)


__all__ = [
    "DEFAULT_INTERPOLATION_STEPS",
    "DEFAULT_NUM_SAMPLES",
    "check_direction",
    "check_texts_fit",
    "encode_texts",
    "interpolate",
    "latent_direction",
    "posterior",
    "project_2d",
    "reconstruct",
    "sample_prior",
    "select_direction",
    "text_budgets",
    "transfer",
]
