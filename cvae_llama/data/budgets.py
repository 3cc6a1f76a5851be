"""Token budgets: the one place that says how many prompt and response tokens an example keeps.

[`DATASET_BUDGETS`] are the paper's per-dataset budgets (Zhang et al., "Latent Variable Modeling for Controllable and
Diverse Generation From Large Language Models", IEEE TAI 2026, the experimental setup; the authors'
`get_dataset_max_seq_length`). [`DEFAULT_MAX_PROMPT_TOKENS`] and [`DEFAULT_MAX_RESPONSE_TOKENS`] are the budgets of
data that is none of those datasets: the defaults of the evaluation functions and of the command line.
"""

# (prompt tokens, response tokens) of each dataset of the paper
DATASET_BUDGETS: dict[str, tuple[int, int]] = {"yelp": (32, 128), "agnews": (8, 32), "dailydialog": (256, 36)}

DEFAULT_MAX_PROMPT_TOKENS = 64
DEFAULT_MAX_RESPONSE_TOKENS = 64


__all__ = ["DATASET_BUDGETS", "DEFAULT_MAX_PROMPT_TOKENS", "DEFAULT_MAX_RESPONSE_TOKENS"]
