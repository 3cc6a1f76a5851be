"""Evaluation of a CVAE-Llama, with the metrics of Zhang et al. (IEEE TAI 2026): every metric is a public function named for what it
computes, and [`evaluation_report`] runs a chosen set on a saved model and a dataset, writing `results.json`,
`results.md` and PNG plots.

| module | what |
|---|---|
| `latent` | [`kl_to_prior`], [`mutual_information`] (in-group I(y; z | x)), [`active_units`], [`in_group_active_units`], [`consistent_units`] |
| `language_modeling` | [`importance_weighted_nll`], [`perplexity`], [`negative_elbo`] |
| `text` | [`distinct_n`], [`self_bleu`], [`bleu`], [`rouge_l`], [`rouge_lsum`], [`bertscore_minilm`] |
| `generation` | [`diverse_generation`], [`base_samples`], [`temperature_sweep`], [`reconstruction`], [`interpolate`] |
| `control` | [`train_label_probe`] ([`fit_logistic_regression`]), [`label_directions`], [`linear_probe_accuracy`], [`shift_latents`], [`latent_guided_control`], [`control_success`] |
| `dialogue` | [`dialogue_metrics`], [`fed_style_score`] (a substitute for FED), [`response_perplexity`] |
| `plots` | the latent space, KL per dimension, the interpolation path, the temperature sweep |
| `report` | [`evaluation_report`] |

Example:

```python
>>> from cvae_llama.evaluation import distinct_n, self_bleu
>>> distinct_n(["the cat sat", "the cat sat"], 1), self_bleu(["the cat sat", "the cat sat"])
(0.5, 100.0)
```
"""

from .control import (
    LabelProbe,
    control_success,
    fit_logistic_regression,
    label_directions,
    latent_guided_control,
    linear_probe_accuracy,
    mean_pooled_hidden_states,
    shift_latents,
    train_label_probe,
)
from .dialogue import (
    FED_STYLE_LABEL,
    FED_TURN_LEVEL_FOLLOW_UPS,
    dialogue_metrics,
    fed_style_score,
    follow_up_nll,
    response_perplexity,
)
from .generation import (
    DEFAULT_TEMPERATURES,
    base_samples,
    diverse_generation,
    diversity_metrics,
    interpolate,
    posterior_of_texts,
    reconstruction,
    temperature_sweep,
)
from .language_modeling import (
    causal_lm_nll,
    count_response_tokens,
    importance_weighted_nll,
    negative_elbo,
    perplexity,
    response_log_likelihood,
)
from .latent import (
    active_units,
    aggregate_posterior_kl,
    consistent_units,
    diagonal_gaussian_log_density,
    group_indices,
    in_group_active_units,
    kl_per_dimension,
    kl_to_prior,
    mutual_information,
)
from .plots import (
    plot_interpolation,
    plot_kl_per_dimension,
    plot_latent_space,
    plot_temperature_sweep,
    principal_components,
)
from .report import METRICS, evaluation_report, results_markdown
from .text import (
    BERTSCORE_LABEL,
    bertscore_minilm,
    bleu,
    distinct_n,
    minilm_model_path,
    rouge_l,
    rouge_lsum,
    self_bleu,
)
from .utils import check_cvae, decode_new_tokens, decoder_as_causal_lm, generate_texts, prompt_inputs


__all__ = [
    "BERTSCORE_LABEL",
    "DEFAULT_TEMPERATURES",
    "FED_STYLE_LABEL",
    "FED_TURN_LEVEL_FOLLOW_UPS",
    "LabelProbe",
    "METRICS",
    "active_units",
    "aggregate_posterior_kl",
    "base_samples",
    "bertscore_minilm",
    "bleu",
    "causal_lm_nll",
    "check_cvae",
    "consistent_units",
    "control_success",
    "count_response_tokens",
    "decode_new_tokens",
    "decoder_as_causal_lm",
    "diagonal_gaussian_log_density",
    "dialogue_metrics",
    "distinct_n",
    "diverse_generation",
    "diversity_metrics",
    "evaluation_report",
    "fed_style_score",
    "fit_logistic_regression",
    "follow_up_nll",
    "generate_texts",
    "group_indices",
    "importance_weighted_nll",
    "in_group_active_units",
    "interpolate",
    "kl_per_dimension",
    "kl_to_prior",
    "label_directions",
    "latent_guided_control",
    "linear_probe_accuracy",
    "mean_pooled_hidden_states",
    "minilm_model_path",
    "mutual_information",
    "negative_elbo",
    "perplexity",
    "plot_interpolation",
    "plot_kl_per_dimension",
    "plot_latent_space",
    "plot_temperature_sweep",
    "posterior_of_texts",
    "principal_components",
    "prompt_inputs",
    "reconstruction",
    "response_log_likelihood",
    "response_perplexity",
    "results_markdown",
    "rouge_l",
    "rouge_lsum",
    "self_bleu",
    "shift_latents",
    "temperature_sweep",
    "train_label_probe",
]
