"""The latent space of a saved CVAE as library calls: encode texts (their posteriors and reconstructions), decode
prior samples, interpolate between two texts, build a direction from two sets of example texts and move texts along
it (latent arithmetic, e.g. sentiment transfer), and project the posterior means of many texts on their first two
principal components. The latent explorer (`cvae-llama explore`, `cvae_llama.app`), the command line and the
experiments call these.

Each call composes what the package has: `posterior_of_texts` (tokenised as in training), `prior_latents`,
`generate_texts` (greedy: the latent alone decides the text), `reconstruction` and `interpolate` of
`cvae_llama.evaluation.generation`, `shift_latents` of `cvae_llama.evaluation.control`, `principal_components` of
`cvae_llama.evaluation.plots`. What they add is the checks: a text longer than the model takes is refused (never
silently truncated), and so is a direction of the wrong size or an unknown label, each with a `ValueError` that names
the argument, its value and what was expected.

Example:

```python
>>> from cvae_llama.latent_space import latent_direction, transfer
>>> from cvae_llama.loading import load_cvae
>>> model, tokenizer = load_cvae("cvae-yelp")
>>> direction = latent_direction(model, tokenizer, ["The food was great."], ["The food was awful."])
>>> transfer(model, tokenizer, ["The staff were rude."], direction, strength=1.0)["texts"]
```
"""

import math
import os
from collections.abc import Sequence

import torch

from .data.budgets import DEFAULT_MAX_PROMPT_TOKENS, DEFAULT_MAX_RESPONSE_TOKENS
from .evaluation.control import shift_latents
from .evaluation.generation import interpolate as interpolation_path
from .evaluation.generation import posterior_of_texts, reconstruction
from .evaluation.plots import principal_components
from .evaluation.utils import DEFAULT_BATCH_SIZE, DEFAULT_MAX_NEW_TOKENS, check_cvae, generate_texts, prior_latents
from .export import read_training_record
from .validation import check_positive_int, check_texts


# Prior samples decoded side by side by default, and the steps of an interpolation path.
DEFAULT_NUM_SAMPLES = 4
DEFAULT_INTERPOLATION_STEPS = 11


# ---------------------------------------------------------------------------------------------------- checks
def text_budgets(model_name_or_path: str | os.PathLike) -> dict[str, int]:
    """The token budgets a saved CVAE was trained with (its training record), the longest texts it reads:
    `{"max_prompt_tokens", "max_response_tokens"}`; the package's defaults for a folder without a record."""
    arguments = read_training_record(model_name_or_path).get("training_arguments", {})
    return {
        "max_prompt_tokens": int(arguments.get("max_prompt_tokens") or DEFAULT_MAX_PROMPT_TOKENS),
        "max_response_tokens": int(arguments.get("max_response_tokens") or DEFAULT_MAX_RESPONSE_TOKENS),
    }


def _preview(text: str, width: int = 40) -> str:
    return repr(text if len(text) <= width else text[:width] + "...")


def check_texts_fit(tokenizer, texts: Sequence[str], max_tokens: int, name: str, budget: str) -> list[str]:
    """`texts` as a list if each has at most `max_tokens` tokens; else `ValueError` naming the text (`name`, or
    `name[i]` in a list of several), its length and the budget (`budget`, e.g. `"max_response_tokens"`).

    The explorer refuses what training would truncate: a posterior of half a text would be shown as the text's.
    """
    texts = check_texts(texts, name)
    lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    for index, (text, length) in enumerate(zip(texts, lengths, strict=True)):
        if length > max_tokens:
            where = name if len(texts) == 1 else f"{name}[{index}]"
            raise ValueError(
                f"{where} {_preview(text)} has {length} tokens but the model takes at most {max_tokens} "
                f"({budget}); shorten it or pass a larger {budget}"
            )
    return texts


def _check_responses(tokenizer, texts: Sequence[str], max_tokens: int, name: str) -> list[str]:
    """Texts to encode: not blank (the posterior of nothing tells nothing) and within the response budget."""
    texts = check_texts(texts, name)
    for index, text in enumerate(texts):
        if not text.strip():
            raise ValueError(f"{name if len(texts) == 1 else f'{name}[{index}]'} is empty; expected a text to encode")
    return check_texts_fit(tokenizer, texts, max_tokens, name, "max_response_tokens")


def check_direction(direction, latent_size: int, name: str = "direction") -> torch.Tensor:
    """`direction` (a tensor or a list of numbers, of shape `(latent_size,)` or `(1, latent_size)`) as a float32
    `(latent_size,)` tensor; else `ValueError` naming `name`, its shape and the expected one."""
    try:
        tensor = torch.as_tensor(direction, dtype=torch.float32).detach().cpu()
    except (TypeError, ValueError, RuntimeError) as error:
        raise ValueError(f"{name} must be a tensor or a list of {latent_size} numbers ({error})") from error
    if tensor.ndim == 2 and tensor.shape[0] == 1:
        tensor = tensor[0]
    if tensor.ndim != 1 or tensor.shape[0] != latent_size:
        raise ValueError(
            f"{name} has shape {tuple(tensor.shape)} but the model expects ({latent_size},), one number per latent "
            "dimension (latent_size)"
        )
    if not torch.isfinite(tensor).all():
        raise ValueError(f"{name} contains NaN or inf")
    return tensor


def label_index(
    names: Sequence[str],
    label: str | int,
    name: str = "label",
    source: str = "the directions",
    num_rows: int | None = None,
) -> int:
    """The row of `label` among label directions named `names` (as `read_directions` gives them): its place in
    `names`, or a row index below `num_rows` (default: `len(names)`) given as a number; else `ValueError` naming the
    argument (`name`), the labels and where they come from (`source`)."""
    label, names = str(label), list(names)
    if label in names:
        return names.index(label)
    if label.isdigit() and int(label) < (len(names) if num_rows is None else num_rows):
        return int(label)
    raise ValueError(f"{name} {label!r} is not one of the labels {names} of {source}")


def select_direction(directions: torch.Tensor, names: Sequence[str], label: str | int) -> torch.Tensor:
    """The row of `directions` `(num_labels, latent_size)` for `label`: one of `names` (as `read_directions` gives
    them), or a row index ([`label_index`]); else `ValueError` listing the labels."""
    return directions[label_index(names, label, num_rows=len(directions))]


# ---------------------------------------------------------------------------------------------------- operations
def encode_texts(
    model,
    tokenizer,
    texts: Sequence[str],
    prompts: str | Sequence[str] = "",
    max_prompt_tokens: int = DEFAULT_MAX_PROMPT_TOKENS,
    max_response_tokens: int = DEFAULT_MAX_RESPONSE_TOKENS,
    batch_size: int = DEFAULT_BATCH_SIZE,
    name: str = "texts",
) -> tuple[torch.Tensor, torch.Tensor]:
    """q(z | x, y) of each text y after its prompt x (one prompt for all, or one per text), after the checks.

    Returns:
        `(latent_mean, latent_logvar)`, each `(num_texts, latent_size)` float32 on the CPU.
    """
    check_cvae(model)
    texts = _check_responses(tokenizer, texts, max_response_tokens, name)
    if isinstance(prompts, str):
        prompts = check_texts_fit(tokenizer, [prompts], max_prompt_tokens, "prompt", "max_prompt_tokens") * len(texts)
    else:
        prompts = check_texts_fit(tokenizer, prompts, max_prompt_tokens, "prompts", "max_prompt_tokens")
    if len(prompts) != len(texts):
        raise ValueError(f"prompts has {len(prompts)} texts but {name} has {len(texts)}; expected one prompt per text")
    # a progress bar (over two batches or more) that the app's page follows
    return posterior_of_texts(model, tokenizer, prompts, texts, max_prompt_tokens, max_response_tokens, batch_size,
                              desc="Encoding")  # fmt: skip


def posterior(
    model,
    tokenizer,
    text: str,
    prompt: str = "",
    max_prompt_tokens: int = DEFAULT_MAX_PROMPT_TOKENS,
    max_response_tokens: int = DEFAULT_MAX_RESPONSE_TOKENS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The posterior q(z | x, y) of one text y (after `prompt` x), per latent dimension.

    Returns:
        `(mean, std)`, each `(latent_size,)`: the posterior's mean and standard deviation exp(logvar / 2).
    """
    if not isinstance(text, str):
        raise ValueError(f"text must be a string, got {type(text).__name__}")
    mean, logvar = encode_texts(model, tokenizer, [text], prompt, max_prompt_tokens, max_response_tokens, name="text")
    return mean[0], (0.5 * logvar[0]).exp()


def reconstruct(
    model,
    tokenizer,
    texts: Sequence[str],
    prompt: str = "",
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    max_prompt_tokens: int = DEFAULT_MAX_PROMPT_TOKENS,
    max_response_tokens: int = DEFAULT_MAX_RESPONSE_TOKENS,
) -> dict:
    """Decode the posterior mean of each text greedily (`cvae_llama.evaluation.reconstruction`).

    Returns:
        `dict` with `reconstructions` (one text per input), `bleu_4` (corpus BLEU, 0-100) and `rouge_l` (in [0, 1])
        of the reconstructions to the texts.
    """
    check_cvae(model)
    texts = _check_responses(tokenizer, texts, max_response_tokens, "texts")
    check_texts_fit(tokenizer, [prompt], max_prompt_tokens, "prompt", "max_prompt_tokens")
    check_positive_int(max_new_tokens, "max_new_tokens")
    return reconstruction(model, tokenizer, [prompt] * len(texts), texts, max_new_tokens, max_prompt_tokens,
                          max_response_tokens)  # fmt: skip


def sample_prior(
    model,
    tokenizer,
    prompt: str = "",
    num_samples: int = DEFAULT_NUM_SAMPLES,
    seed: int = 0,
    temperature: float = 1.0,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    max_prompt_tokens: int = DEFAULT_MAX_PROMPT_TOKENS,
) -> dict:
    """`num_samples` latents z ~ N(0, temperature^2 I) (drawn on the CPU from `seed`: the same on every machine),
    each decoded greedily after `prompt`.

    Returns:
        `dict` with `latents` (`(num_samples, latent_size)`) and `texts`.
    """
    check_cvae(model)
    check_positive_int(num_samples, "num_samples")
    check_positive_int(max_new_tokens, "max_new_tokens")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got seed={seed!r}")
    check_texts_fit(tokenizer, [prompt], max_prompt_tokens, "prompt", "max_prompt_tokens")
    latents = prior_latents(model, num_samples, temperature, torch.Generator().manual_seed(seed))
    texts = generate_texts(model, tokenizer, [prompt] * num_samples, latents, max_new_tokens=max_new_tokens,
                           max_prompt_tokens=max_prompt_tokens)  # fmt: skip
    return {"latents": latents, "texts": texts}


def interpolate(
    model,
    tokenizer,
    text_a: str,
    text_b: str,
    steps: int = DEFAULT_INTERPOLATION_STEPS,
    prompt: str = "",
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    max_prompt_tokens: int = DEFAULT_MAX_PROMPT_TOKENS,
    max_response_tokens: int = DEFAULT_MAX_RESPONSE_TOKENS,
) -> dict:
    """Decode z = (1 - t) z_a + t z_b at `steps` values of t from 0 to 1, z_a and z_b the posterior means of the two
    texts (`cvae_llama.evaluation.interpolate`, after the explorer's checks).

    Returns:
        `dict` with `t`, `texts`, `rouge_l_to_a` and `rouge_l_to_b` (lists of length `steps`).
    """
    check_cvae(model)
    for name, text in (("text_a", text_a), ("text_b", text_b)):
        if not isinstance(text, str):
            raise ValueError(f"{name} must be a string, got {type(text).__name__}")
        _check_responses(tokenizer, [text], max_response_tokens, name)
    check_texts_fit(tokenizer, [prompt], max_prompt_tokens, "prompt", "max_prompt_tokens")
    check_positive_int(max_new_tokens, "max_new_tokens")
    return interpolation_path(model, tokenizer, text_a, text_b, steps, prompt, max_new_tokens, max_prompt_tokens,
                              max_response_tokens)  # fmt: skip


def latent_direction(
    model,
    tokenizer,
    texts_a: Sequence[str],
    texts_b: Sequence[str],
    prompt: str = "",
    max_prompt_tokens: int = DEFAULT_MAX_PROMPT_TOKENS,
    max_response_tokens: int = DEFAULT_MAX_RESPONSE_TOKENS,
) -> torch.Tensor:
    """The direction from texts B to texts A in the latent space: the mean posterior mean of `texts_a` minus that
    of `texts_b` (latent arithmetic, as in Optimus). Not normalised: moving a text of B by strength 1 moves it by the
    distance between the two sets' means.

    Returns:
        `torch.Tensor` of shape `(latent_size,)`.
    """
    means_a, _ = encode_texts(model, tokenizer, texts_a, prompt, max_prompt_tokens, max_response_tokens, name="texts_a")
    means_b, _ = encode_texts(model, tokenizer, texts_b, prompt, max_prompt_tokens, max_response_tokens, name="texts_b")
    return means_a.mean(0) - means_b.mean(0)


def transfer(
    model,
    tokenizer,
    texts: Sequence[str],
    direction,
    strength: float = 1.0,
    prompt: str = "",
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    max_prompt_tokens: int = DEFAULT_MAX_PROMPT_TOKENS,
    max_response_tokens: int = DEFAULT_MAX_RESPONSE_TOKENS,
) -> dict:
    """Move texts along a direction: encode each text (posterior mean z), decode z + strength * direction greedily.

    Args:
        direction: `(latent_size,)`, from [`latent_direction`] (strength 1: the distance between two sets' means) or
            a row of the label directions `cvae-llama evaluate --metrics control` writes (unit vectors; the paper
            uses strength 16).
        strength (`float`, defaults to 1.0): k of z + k * direction; negative moves the other way.

    Returns:
        `dict` with `texts` (the decodings), `latents` (the shifted latents, `(num_texts, latent_size)`) and
        `strength`.
    """
    check_cvae(model)
    direction = check_direction(direction, model.config.latent_size)
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not math.isfinite(strength):
        raise ValueError(f"strength must be a finite number, got strength={strength!r}")
    check_positive_int(max_new_tokens, "max_new_tokens")
    means, _ = encode_texts(model, tokenizer, texts, prompt, max_prompt_tokens, max_response_tokens)
    latents = shift_latents(means, direction[None], float(strength))[0]  # z + k * direction
    decoded = generate_texts(model, tokenizer, [prompt] * len(latents), latents, max_new_tokens=max_new_tokens,
                             max_prompt_tokens=max_prompt_tokens)  # fmt: skip
    return {"texts": decoded, "latents": latents, "strength": float(strength)}


def project_2d(
    model,
    tokenizer,
    texts: Sequence[str],
    labels: Sequence | None = None,
    prompts: str | Sequence[str] = "",
    max_prompt_tokens: int = DEFAULT_MAX_PROMPT_TOKENS,
    max_response_tokens: int = DEFAULT_MAX_RESPONSE_TOKENS,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> dict:
    """The posterior means of `texts` projected on their first two principal components (the evaluation report's
    latent-space plot, as numbers).

    Returns:
        `dict` with `x`, `y` (the two coordinates of each text), `labels` (as given, or `None`),
        `explained_variance_ratio` (of the two components) and `latent_means` (`(num_texts, latent_size)`).
    """
    texts = check_texts(texts, "texts", min_count=2)
    if labels is not None and len(labels) != len(texts):
        raise ValueError(f"labels has {len(labels)} entries but texts has {len(texts)}; expected one label per text")
    means, _ = encode_texts(model, tokenizer, texts, prompts, max_prompt_tokens, max_response_tokens, batch_size)
    projections, ratio = principal_components(means)
    return {
        "x": projections[:, 0].tolist(),
        "y": projections[:, 1].tolist(),
        "labels": list(labels) if labels is not None else None,
        "explained_variance_ratio": ratio.tolist(),
        "latent_means": means,
    }


__all__ = [
    "DEFAULT_INTERPOLATION_STEPS",
    "DEFAULT_NUM_SAMPLES",
    "check_direction",
    "check_texts_fit",
    "encode_texts",
    "interpolate",
    "label_index",
    "latent_direction",
    "posterior",
    "project_2d",
    "reconstruct",
    "sample_prior",
    "select_direction",
    "text_budgets",
    "transfer",
]
