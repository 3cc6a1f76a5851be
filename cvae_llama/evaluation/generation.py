"""Generation with the latent: diverse generation from the prior, the latent-temperature sweep, reconstruction from
the posterior mean, and interpolation between two responses, as Zhang et al., "Latent Variable Modeling for
Controllable and Diverse Generation From Large Language Models" (IEEE TAI 2026) use the latent."""

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from ..data.budgets import DEFAULT_MAX_PROMPT_TOKENS, DEFAULT_MAX_RESPONSE_TOKENS
from ..data.collator import OneToManyCollator
from ..data.one_to_many import SAMPLING_TEMPERATURE, SAMPLING_TOP_P
from ..modeling_cvae_llama import CVAELlamaForCausalLM
from ..validation import check_positive_int, check_texts
from .text import bleu, distinct_n, rouge_l, rouge_lsum, self_bleu
from .utils import DEFAULT_BATCH_SIZE, DEFAULT_MAX_NEW_TOKENS, check_cvae, generate_texts, prior_latents


DEFAULT_TEMPERATURES = (0.1, 0.4, 0.7, 1.0)


@torch.no_grad()
def posterior_of_texts(
    model,
    tokenizer,
    prompts: Sequence[str],
    responses: Sequence[str],
    max_prompt_tokens: int = DEFAULT_MAX_PROMPT_TOKENS,
    max_response_tokens: int = DEFAULT_MAX_RESPONSE_TOKENS,
    batch_size: int = DEFAULT_BATCH_SIZE,
    desc: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q(z | x, y) of each (prompt, response) pair, tokenised by `OneToManyCollator` as in training, `batch_size`
    pairs at a time (with a progress bar named `desc` over two batches or more, as `generate_texts` shows one).

    Returns:
        `(latent_mean, latent_logvar)`, each `(num_pairs, latent_size)` float32 on the CPU.
    """
    check_cvae(model)
    prompts, responses = check_texts(prompts, "prompts"), check_texts(responses, "responses")
    if len(prompts) != len(responses):
        raise ValueError(f"prompts has {len(prompts)} texts but responses has {len(responses)}; expected pairs")
    collator = OneToManyCollator(tokenizer, max_prompt_tokens, max_response_tokens)
    means, logvars = [], []
    starts = range(0, len(prompts), batch_size)
    for start in tqdm(starts, desc=desc, disable=desc is None or len(starts) < 2, leave=False):
        rows = [
            {"prompt": p, "response": r}
            for p, r in zip(prompts[start : start + batch_size], responses[start : start + batch_size], strict=True)
        ]
        batch = collator(rows)
        mean, logvar = model.encode(batch["input_ids"].to(model.device), batch["attention_mask"].to(model.device))
        means.append(mean.float().cpu())
        logvars.append(logvar.float().cpu())
    return torch.cat(means), torch.cat(logvars)


@torch.no_grad()
def base_samples(
    llm,
    tokenizer,
    prompts: Sequence[str],
    num_samples: int = 8,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    temperature: float = SAMPLING_TEMPERATURE,
    top_p: float = SAMPLING_TOP_P,
    max_prompt_tokens: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    seed: int = 0,
) -> list[list[str]]:
    """The base LM's own `num_samples` samples per prompt (temperature 1.0, top_p 0.95, as the one-to-many data).

    These are the references of diverse generation: a CVAE's prior samples should cover them (ROUGE-Lsum) while
    being as diverse (Distinct-n, Self-BLEU). For a CVAE's own decoder use [`decoder_as_causal_lm`].

    Returns:
        `list[list[str]]`: `num_samples` texts per prompt.
    """
    if isinstance(llm, CVAELlamaForCausalLM):
        raise ValueError(
            "llm is a CVAELlamaForCausalLM, whose samples depend on a latent; pass the base LM, e.g. "
            "decoder_as_causal_lm(model)"
        )
    prompts = check_texts(prompts, "prompts")
    check_positive_int(num_samples, "num_samples")
    expanded = [prompt for prompt in prompts for _ in range(num_samples)]
    device = next(llm.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):  # the caller's RNG left as it was
        torch.manual_seed(seed)
        texts = generate_texts(
            llm,
            tokenizer,
            expanded,
            max_new_tokens=max_new_tokens,
            max_prompt_tokens=max_prompt_tokens,
            batch_size=batch_size,
            desc="Base LM samples",
            do_sample=True,
            temperature=temperature,
            top_p=top_p,
        )
    return [texts[i * num_samples : (i + 1) * num_samples] for i in range(len(prompts))]


def diversity_metrics(groups: Sequence[Sequence[str]], references: Sequence[Sequence[str]] | None = None) -> dict:
    """Distinct-1/2/4 and Self-BLEU-4 inside each group, and ROUGE-Lsum of each group to its references.

    Each metric is computed per group (one prompt's K texts) and averaged over groups, as in the paper. ROUGE-Lsum
    compares the group's texts joined by newlines with its references joined by newlines.

    Returns:
        `dict` with `distinct_1`, `distinct_2`, `distinct_4` (in [0, 1]), `self_bleu_4` (0-100) and, with
        references, `rouge_lsum` (in [0, 1]).
    """
    if len(groups) == 0:
        raise ValueError("groups is empty; expected one list of texts per prompt")
    for index, group in enumerate(groups):
        if len(group) < 2:
            raise ValueError(f"group {index} has {len(group)} text(s); diversity needs K >= 2 texts per prompt")
    mean = lambda values: sum(values) / len(values)  # noqa: E731
    metrics = {f"distinct_{n}": mean([distinct_n(list(group), n) for group in groups]) for n in (1, 2, 4)}
    metrics["self_bleu_4"] = mean([self_bleu(list(group), 4) for group in groups])
    if references is not None:
        if len(references) != len(groups):
            raise ValueError(f"references has {len(references)} groups but there are {len(groups)} groups of texts")
        metrics["rouge_lsum"] = rouge_lsum(["\n".join(group) for group in groups], ["\n".join(r) for r in references])
    return metrics


@torch.no_grad()
def diverse_generation(
    model,
    tokenizer,
    prompts: Sequence[str],
    num_latents: int = 8,
    latent_temperature: float = 1.0,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    references: Sequence[Sequence[str]] | None = None,
    max_prompt_tokens: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    generator: torch.Generator | None = None,
) -> dict:
    """Diverse generation (the paper's use of the latent): K prior latents per prompt, each decoded greedily.

    All diversity comes from z ~ N(0, latent_temperature^2 I). Scored with [`diversity_metrics`] inside each group
    and, given `references` (the base LM's own K samples per prompt, [`base_samples`]), ROUGE-Lsum to them.

    Args:
        model ([`CVAELlamaForCausalLM`]): the CVAE.
        tokenizer: its tokenizer.
        prompts (`list[str]`): the test prompts.
        num_latents (`int`, defaults to 8): K, latents per prompt (>= 2; the paper uses 32).
        latent_temperature (`float`, defaults to 1.0): scale of the prior samples.
        max_new_tokens (`int`, defaults to 32): cap on each generation.
        references (`list[list[str]]`, *optional*): per prompt, the base LM's samples.
        generator (`torch.Generator`, *optional*): CPU generator for reproducible latents.

    Returns:
        `dict`: the metrics of [`diversity_metrics`] plus `generations` (K texts per prompt).
    """
    check_cvae(model)
    prompts = check_texts(prompts, "prompts")
    check_positive_int(num_latents, "num_latents", minimum=2)  # diversity compares K >= 2 texts per prompt
    latents = prior_latents(model, len(prompts) * num_latents, latent_temperature, generator)
    expanded = [prompt for prompt in prompts for _ in range(num_latents)]
    texts = generate_texts(
        model,
        tokenizer,
        expanded,
        latents,
        max_new_tokens=max_new_tokens,
        max_prompt_tokens=max_prompt_tokens,
        batch_size=batch_size,
        desc=f"Prior samples (T={latent_temperature})",
    )
    groups = [texts[i * num_latents : (i + 1) * num_latents] for i in range(len(prompts))]
    return {**diversity_metrics(groups, references), "generations": groups}


def temperature_sweep(
    model,
    tokenizer,
    prompts: Sequence[str],
    temperatures: Sequence[float] = DEFAULT_TEMPERATURES,
    num_latents: int = 8,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    references: Sequence[Sequence[str]] | None = None,
    max_prompt_tokens: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    seed: int = 0,
) -> list[dict]:
    """[`diverse_generation`] at each latent temperature (the paper's 0.1, 0.4, 0.7, 1.0): diversity against quality.

    Returns:
        `list[dict]`: per temperature, `latent_temperature` and the metrics of [`diversity_metrics`] (no texts).
    """
    if len(temperatures) == 0:
        raise ValueError("temperatures is empty; expected latent temperatures such as (0.1, 0.4, 0.7, 1.0)")
    rows = []
    for temperature in tqdm(temperatures, desc="Latent temperature sweep", leave=False):
        generator = torch.Generator().manual_seed(seed)  # the same latent directions at every temperature
        result = diverse_generation(
            model,
            tokenizer,
            prompts,
            num_latents,
            float(temperature),
            max_new_tokens,
            references,
            max_prompt_tokens,
            batch_size,
            generator,
        )
        result.pop("generations")
        rows.append({"latent_temperature": float(temperature), **result})
    return rows


@torch.no_grad()
def reconstruction(
    model,
    tokenizer,
    prompts: Sequence[str],
    responses: Sequence[str],
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    max_prompt_tokens: int = DEFAULT_MAX_PROMPT_TOKENS,
    max_response_tokens: int = DEFAULT_MAX_RESPONSE_TOKENS,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> dict:
    """Reconstruction: decode the posterior mean of each (prompt, response) greedily and compare with the response.

    Returns:
        `dict` with `bleu_4` (corpus BLEU, 0-100), `rouge_l` (mean F-measure, in [0, 1]) and `reconstructions`.
    """
    latent_mean, _ = posterior_of_texts(
        model, tokenizer, prompts, responses, max_prompt_tokens, max_response_tokens, batch_size
    )
    texts = generate_texts(
        model,
        tokenizer,
        list(prompts),
        latent_mean,
        max_new_tokens=max_new_tokens,
        max_prompt_tokens=max_prompt_tokens,
        batch_size=batch_size,
        desc="Reconstruction",
    )
    return {
        "bleu_4": bleu(texts, list(responses), 4),
        "rouge_l": rouge_l(texts, list(responses)),
        "reconstructions": texts,
    }


def interpolation_latents(
    latent_a: torch.Tensor, latent_b: torch.Tensor, steps: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The path z = (1 - t) z_a + t z_b at `steps` evenly spaced values of t from 0 to 1.

    Returns:
        `(t, latents)`: `t` of shape `(steps,)` and `latents` of shape `(steps, latent_size)`.
    """
    t = torch.linspace(0, 1, steps)
    return t, (1 - t)[:, None] * latent_a + t[:, None] * latent_b


@torch.no_grad()
def interpolate(
    model,
    tokenizer,
    text_a: str,
    text_b: str,
    steps: int = 11,
    prompt: str = "",
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    max_prompt_tokens: int = DEFAULT_MAX_PROMPT_TOKENS,
    max_response_tokens: int = DEFAULT_MAX_RESPONSE_TOKENS,
) -> dict:
    """Decode z = (1 - t) z_a + t z_b for `steps` values of t from 0 to 1, z_a, z_b the posterior means of two texts.

    A smooth latent space gives a path whose ROUGE-L to `text_a` falls while its ROUGE-L to `text_b` rises.

    Returns:
        `dict` with `t`, `texts` (greedy decodings), `rouge_l_to_a` and `rouge_l_to_b` (lists of length `steps`).
    """
    check_positive_int(steps, "steps", minimum=2)
    for name, text in (("text_a", text_a), ("text_b", text_b), ("prompt", prompt)):
        if not isinstance(text, str):
            raise ValueError(f"{name} must be a string, got {type(text).__name__}")
    latent_mean, _ = posterior_of_texts(
        model, tokenizer, [prompt, prompt], [text_a, text_b], max_prompt_tokens, max_response_tokens
    )
    t, latents = interpolation_latents(latent_mean[0], latent_mean[1], steps)
    texts = generate_texts(
        model,
        tokenizer,
        [prompt] * steps,
        latents,
        max_new_tokens=max_new_tokens,
        max_prompt_tokens=max_prompt_tokens,
        batch_size=steps,
    )
    return {
        "t": [round(value, 6) for value in t.tolist()],
        "texts": texts,
        "rouge_l_to_a": [rouge_l([text], [text_a]) for text in texts],
        "rouge_l_to_b": [rouge_l([text], [text_b]) for text in texts],
    }


__all__ = [
    "DEFAULT_TEMPERATURES",
    "base_samples",
    "diverse_generation",
    "diversity_metrics",
    "interpolate",
    "interpolation_latents",
    "posterior_of_texts",
    "reconstruction",
    "temperature_sweep",
]
