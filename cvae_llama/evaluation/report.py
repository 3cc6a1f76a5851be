"""One call that evaluates a CVAE on a dataset and writes `results.json`, `results.md` and PNG plots.

Every metric of the report is one function of an [`EvaluationRun`] (the model, the data, the settings and what several
metrics share, computed once) in the registry [`METRIC_FUNCTIONS`] (name -> function, run in that order, which returns
the metric's entry of `results.json`), and its section of `results.md` is one function of the results in
[`MARKDOWN_SECTIONS`].

The metrics, in the report's order ([`METRICS`]; the names in backquotes are [`evaluation_report`]'s arguments):
- `latent`: KL to the prior, MI I(y; z | x), AU (whole set, delta 0.01; in group at 0.03 / 0.1 / 0.3), CU
  (0.03 / 0.1 / 0.3), and how much the decoder reads z (`information`: a response's NLL decoded from a sibling's
  posterior mean minus from its own, nats; 0 when the decoder ignores z); plots `latent_space.png` (PCA of the posterior means by label) and
  `kl_per_dimension.png`;
- `language_modeling`: importance-weighted NLL (k = `iw_samples`) and perplexity, -ELBO;
- `diversity`: `num_latents` prior latents per prompt, greedy, against the base LM's samples; the base LM's own
  diversity alongside;
- `temperature_sweep`: the same at each of `temperatures`; plot `temperature_sweep.png`;
- `reconstruction`: the posterior mean of each prompt's first response, decoded;
- `interpolation`: between two responses of the first prompt; plot `interpolation.png`;
- `control`: a label probe on the base LM (trained on `probe_dataset`, else on the responses and their prompt's
  label), directions from the first half of the prompts, control on the second half;
- `dialogue`: one prior-latent response per context against the first reference: BLEU-1/2, Distinct-1/2,
  BERTScore (MiniLM-L6), the FED-style substitute and the base LM's perplexity of the responses.

A plain causal LM (the base or fine-tuned LLM, the rows a CVAE is compared with) is evaluated on [`LM_METRICS`]
the same way, its samples at temperature 1.0, top-p 0.95 (as the one-to-many data) in place of the CVAE's prior
latents decoded greedily; the metrics that need a latent are refused for it.
"""

import json
import math
import os
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..data.budgets import DEFAULT_MAX_PROMPT_TOKENS, DEFAULT_MAX_RESPONSE_TOKENS
from ..data.collator import OneToManyCollator
from ..data.grouping import group_responses
from ..data.one_to_many import SAMPLING_TEMPERATURE, SAMPLING_TOP_P
from ..loading import load_tokenizer, saved_cvae_or_causal_lm
from ..modeling_cvae_llama import CVAELlamaForCausalLM
from ..validation import check_positive_int, pad_token_id
from .control import CONTROL_STRENGTH, label_directions, latent_guided_control, train_label_probe
from .dialogue import FED_STYLE_LABEL, dialogue_metrics
from .generation import (
    DEFAULT_TEMPERATURES,
    base_samples,
    diverse_generation,
    diversity_metrics,
    interpolate,
    reconstruction,
    temperature_sweep,
)
from .language_modeling import (
    causal_lm_nll,
    check_prior_samples,
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
    in_group_active_units,
    kl_per_dimension,
    kl_to_prior,
    mutual_information,
)
from .plots import plot_interpolation, plot_kl_per_dimension, plot_latent_space, plot_temperature_sweep
from .text import BERTSCORE_LABEL
from .utils import check_cvae, decoder_as_causal_lm, generate_texts, prior_latents


# metrics that compare a prompt's responses with each other: they need >= 2 responses per prompt
GROUP_METRICS = ("latent", "control")
# metrics that read the posteriors of every response (one encoder pass shared by all of them)
POSTERIOR_METRICS = ("latent", "language_modeling", "control")
# metrics scored against references: the dataset's responses, else the base LM's own samples
REFERENCE_METRICS = ("diversity", "temperature_sweep")
# metrics a plain causal LM is evaluated on (sampled instead of decoded from prior latents)
LM_METRICS = ("diversity", "dialogue")
# points on the interpolation path, t = 0, 0.1, ..., 1 (the paper's)
INTERPOLATION_STEPS = 11
DISPLAY_NAMES = {
    "kl": "KL(q(z|x,y) || p(z)) (nats)",
    "information": "decoder reads z: NLL(y | sibling's mean) - NLL(y | own mean) (nats)",
    "mutual_information": "MI I(y; z | x) (nats)",
    "active_units_whole_set": "AU over the whole set (delta 0.01)",
    "active_units": "AU in group (var > {threshold})",
    "consistent_units": "CU (aggregate KL < {threshold} nats)",
    "iw_nll": "IW-NLL per response (nats, k={k})",
    "iw_perplexity": "IW perplexity per token",
    "iw_nll_defensive": "IW-NLL per response, {m} of k={k} samples from the prior (nats)",
    "iw_perplexity_defensive": "IW perplexity per token, {m} of k={k} samples from the prior",
    "negative_elbo": "-ELBO per response (nats)",
    "elbo_perplexity": "ELBO perplexity per token (upper bound)",
    "base_lm_nll": "base LM NLL per response (nats, no latent)",
    "base_lm_perplexity": "base LM perplexity per token",
    "distinct_1": "Distinct-1",
    "distinct_2": "Distinct-2",
    "distinct_4": "Distinct-4",
    "self_bleu_4": "Self-BLEU-4 (0-100)",
    "rouge_lsum": "ROUGE-Lsum to base LM samples",
    "bleu_4": "BLEU-4 to reference (0-100)",
    "rouge_l": "ROUGE-L to reference",
    "probe_held_out_accuracy": "label probe held-out accuracy",
    "mean_success": "control success: p(target label)",
    "mean_win_rate": "control win rate vs reconstruction",
    "bleu_1": "BLEU-1 (0-100)",
    "bleu_2": "BLEU-2 (0-100)",
    "bertscore_minilm_f1": BERTSCORE_LABEL + " F1",
    "fed_style": FED_STYLE_LABEL,
}
DIALOGUE_KEYS = (
    "bleu_1", "bleu_2", "distinct_1", "distinct_2", "bertscore_minilm_f1", "fed_style", "base_lm_perplexity",
)  # fmt: skip


@dataclass
class EvaluationRun:
    """What the metrics of one report read: the model, its base LM, the groups, the settings, and what several
    metrics share (the posteriors of every response, the references of diverse generation), computed once; a metric
    adds its texts to `samples`, its plots (file names in `output_dir`) to `plots` and the display names of
    substitute metrics to `labels`."""

    model: torch.nn.Module
    tokenizer: object
    llm: torch.nn.Module
    groups: list[dict]
    output_dir: Path
    label_names: dict
    num_latents: int
    max_prompt_tokens: int
    max_response_tokens: int
    max_new_tokens: int
    temperatures: Sequence[float]
    iw_samples: int
    iw_prior_samples: int
    mc_samples: int
    control_strength: float
    control_temperature: float | None
    batch_size: int
    seed: int
    probe_dataset: object = None
    posteriors: dict | None = None
    references: list[list[str]] | None = None
    reference_source: str | None = None
    samples: dict = field(default_factory=dict)
    plots: dict = field(default_factory=dict)
    labels: dict = field(default_factory=dict)

    @property
    def prompts(self) -> list[str]:
        return [group["prompt"] for group in self.groups]

    @property
    def first_responses(self) -> list[str]:
        return [group["responses"][0] for group in self.groups]

    @property
    def is_cvae(self) -> bool:
        return isinstance(self.model, CVAELlamaForCausalLM)

    def lm_samples(self, num_samples: int) -> list[list[str]]:
        """A plain LM's `num_samples` samples per prompt (temperature 1.0, top-p 0.95), seeded by the report's seed."""
        return base_samples(
            self.model, self.tokenizer, self.prompts, num_samples, self.max_new_tokens,
            max_prompt_tokens=self.max_prompt_tokens, batch_size=self.batch_size, seed=self.seed,
        )  # fmt: skip

    @property
    def has_labels(self) -> bool:
        return all(group["label"] is not None for group in self.groups)

    @property
    def decoding(self) -> dict:
        """The decoding settings every generating metric shares."""
        return {
            "max_new_tokens": self.max_new_tokens,
            "max_prompt_tokens": self.max_prompt_tokens,
            "batch_size": self.batch_size,
        }

    def generator(self) -> torch.Generator:
        """A CPU generator seeded with the report's seed: each metric draws the same numbers whatever ran before."""
        return torch.Generator().manual_seed(self.seed)


# ------------------------------------------------------------------------------------------------------ metrics


def _latent_quality(run: EvaluationRun) -> dict:
    """KL to the prior, MI, AU, CU and the density gap; plots of the latent space and of the KL per dimension."""
    mean, logvar, ids = run.posteriors["latent_mean"], run.posteriors["latent_logvar"], run.posteriors["group_ids"]
    generator = run.generator()
    aggregate = aggregate_posterior_kl(mean, logvar, ids, run.mc_samples, generator)
    result = {
        "kl": kl_to_prior(mean, logvar),
        "information": run.posteriors["information"].mean().item(),
        "mutual_information": mutual_information(mean, logvar, ids, run.mc_samples, generator),
        "active_units_whole_set": active_units(mean, 0.01),
        "active_units": in_group_active_units(mean, ids),
        "consistent_units": consistent_units(mean, logvar, ids, num_samples=run.mc_samples, generator=generator),
        "latent_size": run.model.config.latent_size,
        "kl_per_dimension": kl_per_dimension(mean, logvar).tolist(),
        "aggregate_kl_per_dimension": aggregate.mean(0).tolist(),
        "density_gap": aggregate.sum(-1).mean().item(),
    }
    labels = run.posteriors["labels"] if run.has_labels else None
    run.plots["latent_space"] = plot_latent_space(
        mean, labels, run.output_dir / "latent_space.png", run.label_names
    ).name
    run.plots["kl_per_dimension"] = plot_kl_per_dimension(
        result["kl_per_dimension"], run.output_dir / "kl_per_dimension.png", result["aggregate_kl_per_dimension"]
    ).name
    return result


def _language_modeling(run: EvaluationRun) -> dict:
    """Importance-weighted NLL and perplexity, -ELBO, and the base LM's NLL, from the shared posterior pass."""
    posteriors, tokens = run.posteriors, run.posteriors["num_tokens"]
    return {
        "iw_nll": posteriors["iw_nll"].mean().item(),
        "iw_perplexity": perplexity(posteriors["iw_nll"], tokens),
        "negative_elbo": posteriors["negative_elbo"].mean().item(),
        "elbo_perplexity": perplexity(posteriors["negative_elbo"], tokens),
        "base_lm_nll": posteriors["base_nll"].mean().item(),
        "base_lm_perplexity": perplexity(posteriors["base_nll"], tokens),
        "iw_samples": run.iw_samples,
        "num_tokens": int(tokens.sum()),
        **(
            {
                "iw_prior_samples": run.iw_prior_samples,
                "iw_nll_defensive": posteriors["iw_nll_defensive"].mean().item(),
                "iw_perplexity_defensive": perplexity(posteriors["iw_nll_defensive"], tokens),
            }
            if run.iw_prior_samples
            else {}
        ),
    }


def _diversity(run: EvaluationRun) -> dict:
    """`num_latents` prior latents per prompt, greedy (a plain LM: `num_latents` samples), against the references;
    the references' own diversity."""
    if not run.is_cvae:
        groups = run.lm_samples(run.num_latents)
        run.samples["diversity"] = [
            {"prompt": p, "llm": g, "references": r}
            for p, g, r in zip(run.prompts, groups, run.references, strict=True)
        ]
        return {"llm": diversity_metrics(groups, run.references), "references": run.reference_source,
                "base_lm": diversity_metrics(run.references)}  # fmt: skip
    result = diverse_generation(
        run.model,
        run.tokenizer,
        run.prompts,
        run.num_latents,
        1.0,
        references=run.references,
        generator=run.generator(),
        **run.decoding,
    )
    run.samples["diversity"] = [
        {"prompt": p, "cvae": g, "references": r}
        for p, g, r in zip(run.prompts, result.pop("generations"), run.references, strict=True)
    ]
    return {"cvae": result, "references": run.reference_source, "base_lm": diversity_metrics(run.references)}


def _temperature_sweep(run: EvaluationRun) -> list[dict]:
    """Diverse generation at each latent temperature; plot `temperature_sweep.png`."""
    rows = temperature_sweep(
        run.model,
        run.tokenizer,
        run.prompts,
        run.temperatures,
        run.num_latents,
        references=run.references,
        seed=run.seed,
        **run.decoding,
    )
    run.plots["temperature_sweep"] = plot_temperature_sweep(rows, run.output_dir / "temperature_sweep.png").name
    return rows


def _reconstruction(run: EvaluationRun) -> dict:
    """The posterior mean of each prompt's first response, decoded greedily."""
    first = run.first_responses
    result = reconstruction(
        run.model, run.tokenizer, run.prompts, first, max_response_tokens=run.max_response_tokens, **run.decoding
    )
    run.samples["reconstruction"] = [
        {"prompt": p, "reference": r, "reconstruction": t}
        for p, r, t in zip(run.prompts, first, result.pop("reconstructions"), strict=True)
    ]
    return result


def _interpolation(run: EvaluationRun) -> dict:
    """The path between two responses of the first prompt (else the first responses of the first two prompts)."""
    if len(run.groups[0]["responses"]) >= 2:
        text_a, text_b = run.groups[0]["responses"][:2]
    else:
        text_a, text_b = run.groups[0]["responses"][0], run.groups[1]["responses"][0]
    prompt = run.prompts[0]
    path = interpolate(
        run.model,
        run.tokenizer,
        text_a,
        text_b,
        INTERPOLATION_STEPS,
        prompt,
        run.max_new_tokens,
        run.max_prompt_tokens,
        run.max_response_tokens,
    )
    result = {"prompt": prompt, "text_a": text_a, "text_b": text_b, **path}
    run.plots["interpolation"] = plot_interpolation(result, run.output_dir / "interpolation.png").name
    return result


def _control(run: EvaluationRun) -> dict:
    """A label probe on the base LM, directions from the first half of the prompts (validation), control on the
    second half (test)."""
    probe = train_label_probe(run.llm, run.tokenizer, *_probe_data(run), seed=run.seed)
    num_validation = max(1, len(run.groups) // 2)
    ids, latent_mean = run.posteriors["group_ids"], run.posteriors["latent_mean"]
    validation = ids < num_validation
    responses = [response for group in run.groups for response in group["responses"]]
    validation_texts = [text for text, keep in zip(responses, validation.tolist(), strict=True) if keep]
    directions = label_directions(latent_mean[validation], probe.predict_proba(validation_texts), ids[validation])
    test = ~validation
    test_prompts = [run.groups[i]["prompt"] for i in ids[test].tolist()]
    result = latent_guided_control(
        run.model,
        run.tokenizer,
        probe,
        test_prompts,
        latent_mean[test],
        directions,
        run.control_strength,
        temperature=run.control_temperature,
        **run.decoding,
    )
    texts = {"reconstructions": result.pop("reconstructions"), "controlled": result.pop("controlled")}
    run.samples["control"] = {"prompts": test_prompts, **texts}
    result.update(
        probe_held_out_accuracy=probe.held_out_accuracy,
        probe_train_accuracy=probe.history["train_accuracy"],
        num_validation_prompts=num_validation,
        num_test_responses=int(test.sum()),
        directions=directions.tolist(),
    )
    result["label_names"] = [run.label_names.get(label, str(label)) for label in result["labels"]]
    return result


def _probe_data(run: EvaluationRun) -> tuple[list[str], list]:
    """The label probe's texts and labels: `probe_dataset`'s, else the responses and their prompt's label."""
    if run.probe_dataset is not None:
        columns = run.probe_dataset.column_names
        column = "response" if "response" in columns else "text"
        if column not in columns or "label" not in columns:
            raise ValueError(f"probe_dataset has columns {columns}; expected 'label' and 'response' or 'text'")
        pairs = list(zip(run.probe_dataset[column], run.probe_dataset["label"], strict=True))
    else:
        pairs = [(response, group["label"]) for group in run.groups for response in group["responses"]]
    pairs = [(text, label) for text, label in pairs if label is not None]  # e.g. DailyDialog's unaligned acts
    return [text for text, _ in pairs], [label for _, label in pairs]


def _dialogue(run: EvaluationRun) -> dict:
    """One prior-latent response per context (a plain LM: one sample) against the first reference."""
    if run.is_cvae:
        latents = prior_latents(run.model, len(run.groups), 1.0, run.generator())
        candidates = generate_texts(
            run.model, run.tokenizer, run.prompts, latents, desc="Dialogue responses", **run.decoding
        )
    else:
        candidates = [samples[0] for samples in run.lm_samples(1)]
    first = run.first_responses
    result = dialogue_metrics(candidates, first, run.prompts, run.llm, run.tokenizer)
    run.labels.update(result.pop("labels"))
    run.samples["dialogue"] = [
        {"context": p, "reference": r, "response": c} for p, r, c in zip(run.prompts, first, candidates, strict=True)
    ]
    return result


# name -> the function that computes the metric's entry of `results.json`, in the order the report runs them
METRIC_FUNCTIONS: dict[str, Callable[[EvaluationRun], dict | list]] = {
    "latent": _latent_quality,
    "language_modeling": _language_modeling,
    "diversity": _diversity,
    "temperature_sweep": _temperature_sweep,
    "reconstruction": _reconstruction,
    "interpolation": _interpolation,
    "control": _control,
    "dialogue": _dialogue,
}
METRICS = tuple(METRIC_FUNCTIONS)


# ------------------------------------------------------------------------------------------------------- report


def evaluation_report(
    model_path_or_model,
    dataset,
    output_dir: str | os.PathLike,
    metrics: Sequence[str] | None = None,
    *,
    tokenizer=None,
    base_model=None,
    probe_dataset=None,
    num_prompts: int | None = None,
    group_size: int | None = None,
    num_latents: int = 8,
    max_prompt_tokens: int = DEFAULT_MAX_PROMPT_TOKENS,
    max_response_tokens: int = DEFAULT_MAX_RESPONSE_TOKENS,
    max_new_tokens: int | None = None,
    temperatures: Sequence[float] = DEFAULT_TEMPERATURES,
    iw_samples: int = 32,
    iw_prior_samples: int = 0,
    mc_samples: int = 16,
    control_strength: float = CONTROL_STRENGTH,
    control_temperature: float | None = None,
    batch_size: int = 16,
    seed: int = 0,
    label_names: Sequence[str] | None = None,
) -> dict:
    """Evaluate a CVAE on a dataset and write `results.json`, `results.md` and PNG plots into `output_dir`.

    Metrics: any subset of [`METRICS`], run in that order (the module docstring says what each computes); `None` runs
    all that the data allow: `dialogue` only when asked, `control` only when the dataset has labels.

    Args:
        model_path_or_model: a saved CVAE folder, or a [`CVAELlamaForCausalLM`] (then pass `tokenizer`); or a
            plain causal LM (folder or model), evaluated from its samples on [`LM_METRICS`] (default `diversity`).
        dataset (`datasets.Dataset`): one-to-many test data, flat `{prompt, response[, prompt_id][, label]}` rows
            (as `make_one_to_many` writes) or groups `{prompt, responses[, label]}`. The responses of a prompt are the
            base LM's samples, the references of diverse generation; `latent` and `control` need 2 or more per prompt.
        output_dir (`str` or `os.PathLike`): created if needed; existing report files are replaced.
        metrics (`list[str]`, *optional*): names from [`METRICS`].
        tokenizer: the model's tokenizer (read from the folder when not given).
        base_model: the base causal LM for references (when prompts have a single response), the label probe and
            the FED-style score and perplexity; defaults to the CVAE's own decoder without the latent
            ([`decoder_as_causal_lm`]), which is the base LM when the decoder was frozen (a plain LM: itself).
        probe_dataset (`datasets.Dataset`, *optional*): `{response or text, label}` rows to train the label probe.
        num_prompts (`int`, *optional*): evaluate the first `num_prompts` prompts only.
        group_size (`int`, *optional*): responses per prompt (defaults to the smallest count in the data).
        num_latents (`int`, defaults to 8): K, prior latents per prompt (>= 2).
        max_prompt_tokens, max_response_tokens (`int`): token budgets, as in training (`DATASET_BUDGETS`).
        max_new_tokens (`int`, *optional*): cap on generated tokens (defaults to `max_response_tokens`).
        iw_samples (`int`, defaults to 32): k of the importance-weighted NLL.
        iw_prior_samples (`int`, defaults to 0): when m > 0, the importance-weighted NLL is estimated a second time
            with m of its k samples drawn from the prior, the weights divided by the mixture they come from
            (`importance_weighted_nll`'s `prior_samples`), and reported beside the plain estimate as
            `iw_nll_defensive` / `iw_perplexity_defensive`.
        mc_samples (`int`, defaults to 16): Monte-Carlo samples per posterior for MI and CU.
        control_strength (`float`, defaults to 16.0): k of z + k * direction.
        control_temperature (`float`, *optional*): decoding temperature of control (greedy when `None`).
        batch_size (`int`, defaults to 16): rows per forward or `generate` call.
        seed (`int`, defaults to 0): seeds every Monte-Carlo estimate, prior sample and base LM sample.
        label_names (`list[str]`, *optional*): the name of each label value 0, 1, ... for plots and tables
            (defaults to the names of the dataset's `ClassLabel`, e.g. `cvae_llama.data.DATASET_LABEL_NAMES`).

    Returns:
        `dict`: what `results.json` holds.
    """
    chosen, groups = _metrics_and_groups(dataset, metrics, group_size, num_prompts, num_latents, iw_samples, iw_prior_samples)
    model, tokenizer = _load_model(model_path_or_model, tokenizer)
    chosen = _runnable_metrics(chosen, groups, dataset.column_names, isinstance(model, CVAELlamaForCausalLM))
    llm = base_model if base_model is not None else _own_lm(model)
    with _eval_mode(model):
        run = EvaluationRun(
            model=model, tokenizer=tokenizer, groups=groups, output_dir=Path(output_dir), llm=llm,
            label_names=_label_names(dataset, label_names),
            num_latents=num_latents, max_prompt_tokens=max_prompt_tokens, max_response_tokens=max_response_tokens,
            max_new_tokens=max_new_tokens or max_response_tokens, temperatures=temperatures, iw_samples=iw_samples,
            iw_prior_samples=iw_prior_samples, mc_samples=mc_samples, control_strength=control_strength,
            control_temperature=control_temperature, batch_size=batch_size, seed=seed, probe_dataset=probe_dataset,
        )  # fmt: skip
        results = _run_metrics(run, model_path_or_model, chosen, base_model_given=base_model is not None)
    _write_report(run, results)
    return results


def _metrics_and_groups(
    dataset, metrics, group_size: int | None, num_prompts: int | None, num_latents: int, iw_samples: int,
    iw_prior_samples: int,
) -> tuple[list[str], list[dict]]:  # fmt: skip
    """Check the report's arguments against each other and the data; return the metrics to run and the groups."""
    chosen = _known_metrics(metrics)
    check_positive_int(num_latents, "num_latents", minimum=2)  # diversity compares K >= 2 texts per prompt
    check_positive_int(iw_samples, "iw_samples")
    check_prior_samples(iw_prior_samples, iw_samples, "iw_prior_samples", "iw_samples")
    return chosen, _groups_of(dataset, group_size, num_prompts)


def _run_metrics(run: EvaluationRun, model_path_or_model, chosen: list[str], base_model_given: bool) -> dict:
    """Compute what the chosen metrics share (posteriors, references), then each metric: what `results.json` holds."""
    run.output_dir.mkdir(parents=True, exist_ok=True)
    results = _results_header(run, model_path_or_model, chosen, base_model_given=base_model_given)
    steps = tqdm(chosen, desc="Evaluation", unit="metric")
    if any(name in chosen for name in POSTERIOR_METRICS):
        collator = OneToManyCollator(run.tokenizer, run.max_prompt_tokens, run.max_response_tokens)
        run.posteriors = _posteriors(
            run, collator, language_modeling="language_modeling" in chosen, decoder_reads_z="latent" in chosen
        )
    if any(name in chosen for name in REFERENCE_METRICS):
        run.references, run.reference_source = _references(run, base_model_given=base_model_given)
    for name in steps:
        steps.set_postfix_str(name)
        results[name] = METRIC_FUNCTIONS[name](run)
    steps.close()
    return results


def _write_report(run: EvaluationRun, results: dict) -> None:
    """Write `results.json`, `samples.json` and `results.md` into the run's output folder."""
    (run.output_dir / "results.json").write_text(json.dumps(results, indent=2, default=_json_default))
    (run.output_dir / "samples.json").write_text(json.dumps(run.samples, indent=2, ensure_ascii=False))
    (run.output_dir / "results.md").write_text(results_markdown(results))


def _results_header(run: EvaluationRun, model_path_or_model, chosen: list[str], base_model_given: bool) -> dict:
    """What `results.json` holds before the metrics: the model, the data, the settings, labels and plots."""
    own_lm = "the CVAE's decoder without the latent" if run.is_cvae else "the evaluated LM itself"
    generation = "prior latents, greedy" if run.is_cvae else f"samples (temperature {SAMPLING_TEMPERATURE}, top_p {SAMPLING_TOP_P})"
    model = model_path_or_model
    if not isinstance(model, (str, os.PathLike)):
        model = getattr(model, "name_or_path", "") or type(model).__name__
    return {
        "model": str(model),
        "data": {
            "num_prompts": len(run.groups),
            "responses_per_prompt": min(len(group["responses"]) for group in run.groups),
            "num_responses": sum(len(group["responses"]) for group in run.groups),
        },
        "settings": {
            "metrics": chosen,
            "num_latents": run.num_latents,
            "max_prompt_tokens": run.max_prompt_tokens,
            "max_response_tokens": run.max_response_tokens,
            "max_new_tokens": run.max_new_tokens,
            "iw_samples": run.iw_samples,
            "iw_prior_samples": run.iw_prior_samples,
            "mc_samples": run.mc_samples,
            "seed": run.seed,
            "base_model": "given" if base_model_given else own_lm,
            "generation": generation,
        },
        "labels": run.labels,  # filled by the metrics that label substitutes (dialogue)
        "plots": run.plots,  # filled by the metrics that draw
    }


def _known_metrics(metrics: Sequence[str] | str | None) -> list[str] | None:
    """The asked metrics in the report's order (`None`: not chosen yet); `ValueError` for an unknown name."""
    if metrics is None:
        return None
    if isinstance(metrics, str):
        metrics = [metrics]
    unknown = [name for name in metrics if name not in METRIC_FUNCTIONS]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; expected names from {list(METRIC_FUNCTIONS)}")
    return [name for name in METRIC_FUNCTIONS if name in metrics]


def _runnable_metrics(
    chosen: list[str] | None, groups: list[dict], columns: list[str], is_cvae: bool = True
) -> list[str]:
    """The metrics to run (by default all that the data allow); `ValueError` when a chosen one cannot run."""
    has_labels = all(group["label"] is not None for group in groups)
    if not is_cvae:
        chosen = ["diversity"] if chosen is None else chosen
        needs_latent = [name for name in chosen if name not in LM_METRICS]
        if needs_latent:
            raise ValueError(
                f"metric(s) {needs_latent} need a CVAE's latent, but the model is a plain causal LM; it can be "
                f"evaluated on {list(LM_METRICS)}"
            )
    if chosen is None:
        chosen = [name for name in METRIC_FUNCTIONS if name != "dialogue" and (name != "control" or has_labels)]
    if "control" in chosen and not has_labels:
        raise ValueError(f"metric 'control' needs a 'label' column in dataset (columns: {columns})")
    smallest = min(len(group["responses"]) for group in groups)
    for name in GROUP_METRICS:
        if name in chosen and smallest < 2:
            raise ValueError(
                f"metric {name!r} needs one-to-many data, at least 2 responses per prompt, but a prompt has "
                f"{smallest}; sample them with cvae_llama.data.make_one_to_many"
            )
    if "control" in chosen and len(groups) < 2:
        raise ValueError(
            f"metric 'control' needs at least 2 prompts (directions from one half, control on the other), "
            f"got {len(groups)}"
        )
    if "interpolation" in chosen and sum(len(group["responses"]) for group in groups) < 2:
        raise ValueError("metric 'interpolation' needs at least 2 responses in dataset")
    return chosen


def _load_model(model_path_or_model, tokenizer):
    """The model and tokenizer to evaluate: a saved CVAE (or plain causal LM) folder loaded by the library's loaders,
    or the model given."""
    from transformers import PreTrainedModel

    if isinstance(model_path_or_model, (str, os.PathLike)):
        model = saved_cvae_or_causal_lm(model_path_or_model, "model_path_or_model")
        tokenizer = load_tokenizer(model_path_or_model) if tokenizer is None else tokenizer
    else:
        model = model_path_or_model
        if tokenizer is None:
            name = getattr(model, "name_or_path", "")
            if not name or not Path(name).is_dir():
                raise ValueError("tokenizer is required when a model object is given (it has no local folder)")
            tokenizer = load_tokenizer(name)
    if not isinstance(model, PreTrainedModel) or not model.can_generate():
        check_cvae(model)  # the error says what is expected
    pad_token_id(tokenizer)
    return model, tokenizer


def _own_lm(model):
    """The LM that judges when no base model is given: a CVAE's decoder without the latent, a plain LM itself."""
    return decoder_as_causal_lm(model) if isinstance(model, CVAELlamaForCausalLM) else model


@contextmanager
def _eval_mode(model):
    """Evaluate in eval mode (no dropout), then give the model back in the mode it came in."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def _groups_of(dataset, group_size: int | None, num_prompts: int | None) -> list[dict]:
    """The dataset as groups `{prompt, responses, label}`, grouped rows kept, flat rows grouped by prompt."""
    from datasets import Dataset

    if not isinstance(dataset, Dataset):
        raise ValueError(f"dataset must be a datasets.Dataset, got {type(dataset).__name__}")
    columns = dataset.column_names
    if "prompt" not in columns or ("response" not in columns and "responses" not in columns):
        raise ValueError(
            f"dataset has columns {columns}; expected 'prompt' and 'response' (flat one-to-many rows) "
            "or 'prompt' and 'responses' (groups)"
        )
    if len(dataset) == 0:
        raise ValueError("dataset is empty (0 rows)")
    if "responses" not in columns:
        key = "prompt_id" if "prompt_id" in columns else "prompt"
        counts = {}
        for value, response in zip(dataset[key], dataset["response"], strict=True):
            counts[value] = counts.get(value, 0) + bool(response.strip())
        if not any(counts.values()):
            raise ValueError("dataset has only empty responses; expected response texts")
        size = group_size or min(count for count in counts.values() if count > 0)
        dataset = group_responses(dataset, size)
    groups = [
        {"prompt": row["prompt"] or "", "responses": list(row["responses"]), "label": row.get("label")}
        for row in dataset
    ]
    if group_size is not None:
        groups = [{**group, "responses": group["responses"][:group_size]} for group in groups]
    if num_prompts is not None:
        groups = groups[: check_positive_int(num_prompts, "num_prompts")]
    return groups


def _label_names(dataset, given: Sequence[str] | None = None) -> dict:
    """`{label value: name}`: the names given, else those of the dataset's `ClassLabel` (none: `{}`)."""
    if given is not None:
        return dict(enumerate(given))
    feature = dataset.features.get("label")
    names = getattr(feature, "names", None)
    return dict(enumerate(names)) if names else {}


@torch.no_grad()
def _posteriors(run: EvaluationRun, collator: OneToManyCollator, language_modeling: bool,
                decoder_reads_z: bool = False) -> dict:  # fmt: skip
    """Posterior means and log-variances of every response (and, optionally, the IW-NLL, -ELBO and base LM NLL, and
    how much the decoder reads z: NLL(y | x, mean of a sibling response) - NLL(y | x, its own mean), in nats)."""
    model, groups = run.model, run.groups
    generator = run.generator()
    means, logvars, group_ids, labels, iw, defensive, elbo, base, tokens = [], [], [], [], [], [], [], [], []
    information = []
    per_batch = max(1, run.batch_size // max(len(group["responses"]) for group in groups))
    for start in tqdm(range(0, len(groups), per_batch), desc="Posteriors", leave=False):
        chunk = groups[start : start + per_batch]
        batch = collator([{"prompt": g["prompt"], "responses": g["responses"]} for g in chunk])
        mean, logvar = model.encode(batch["input_ids"].to(model.device), batch["attention_mask"].to(model.device))
        means.append(mean.float().cpu())
        logvars.append(logvar.float().cpu())
        group_ids.append(batch["group_ids"] + start)
        labels += [group["label"] for group in chunk for _ in group["responses"]]
        if decoder_reads_z:
            sibling = _next_in_group(batch["group_ids"])
            own = response_log_likelihood(model, batch, mean)
            information.append((own - response_log_likelihood(model, batch, mean[sibling.to(mean.device)])).cpu())
        if language_modeling:
            iw.append(importance_weighted_nll(model, batch, run.iw_samples, generator))
            if run.iw_prior_samples:
                defensive.append(
                    importance_weighted_nll(
                        model, batch, run.iw_samples, generator, prior_samples=run.iw_prior_samples
                    )
                )
            elbo.append(negative_elbo(model, batch, 1, generator))
            base.append(causal_lm_nll(run.llm, batch))
            tokens.append(count_response_tokens(batch["labels"]))
    result = {
        "latent_mean": torch.cat(means),
        "latent_logvar": torch.cat(logvars),
        "group_ids": torch.cat(group_ids),
        "labels": labels,
    }
    if decoder_reads_z:
        result["information"] = torch.cat(information)
    if language_modeling:
        result.update(
            iw_nll=torch.cat(iw), negative_elbo=torch.cat(elbo), base_nll=torch.cat(base), num_tokens=torch.cat(tokens)
        )
        if defensive:
            result["iw_nll_defensive"] = torch.cat(defensive)
    return result


def _next_in_group(group_ids: torch.Tensor) -> torch.Tensor:
    """For each row, the index of the next row of its group (cyclically): a sibling response of the same prompt."""
    index = torch.arange(len(group_ids))
    sibling = index.clone()
    for group in group_ids.unique():
        rows = index[group_ids == group]
        sibling[rows] = rows.roll(-1)
    return sibling


def _references(run: EvaluationRun, base_model_given: bool) -> tuple[list[list[str]], str]:
    """The references of diverse generation and where they come from: the dataset's responses when every prompt has
    two or more (and no base model is given), else `num_latents` samples of the base LM per prompt."""
    if min(len(group["responses"]) for group in run.groups) >= 2 and not base_model_given:
        return [group["responses"] for group in run.groups], "dataset responses"
    references = base_samples(
        run.llm,
        run.tokenizer,
        run.prompts,
        run.num_latents,
        run.max_new_tokens,
        max_prompt_tokens=run.max_prompt_tokens,
        batch_size=run.batch_size,
        seed=run.seed,
    )
    return references, f"samples of the base LM (temperature {SAMPLING_TEMPERATURE}, top_p {SAMPLING_TOP_P})"


def _json_default(value):
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


# ----------------------------------------------------------------------------------------------------- markdown


def _format(value) -> str:
    """A table cell: numbers to 4 significant digits, missing values as a dash, pipes escaped."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|").replace("\n", "\\n")


def _table(title: str, rows) -> list[str]:
    """A two-column `| metric | value |` table under a heading."""
    return [
        f"## {title}",
        "",
        "| metric | value |",
        "|---|---|",
        *(f"| {_format(name)} | {_format(value)} |" for name, value in rows),
        "",
    ]


def _wide_table(first_header: str, keys: list[str], rows) -> list[str]:
    """A table with one column per metric of `keys`, one row per `(name, values)` of `rows`."""
    return [
        "| "
        + (f"{first_header} | " if first_header else "| ")
        + " | ".join(_format(DISPLAY_NAMES[key]) for key in keys)
        + " |",
        "|---" * (len(keys) + 1) + "|",
        *(f"| {name} | " + " | ".join(_format(values.get(key)) for key in keys) + " |" for name, values in rows),
    ]


_DIVERSITY_KEYS = ("distinct_1", "distinct_2", "distinct_4", "self_bleu_4", "rouge_lsum")


def _latent_markdown(results: dict) -> list[str]:
    latent = results["latent"]
    rows = [(DISPLAY_NAMES[key], latent[key]) for key in ("kl", "information", "mutual_information",
                                                         "active_units_whole_set") if key in latent]  # fmt: skip
    rows += [(DISPLAY_NAMES["active_units"].format(threshold=t), v) for t, v in latent["active_units"].items()]
    rows += [(DISPLAY_NAMES["consistent_units"].format(threshold=t), v) for t, v in latent["consistent_units"].items()]
    rows += [
        ("latent size", latent["latent_size"]),
        ("density gap (sum over dimensions, nats)", latent["density_gap"]),
    ]
    return _table("Latent quality", rows)


def _language_modeling_markdown(results: dict) -> list[str]:
    lm = results["language_modeling"]
    rows = [(DISPLAY_NAMES["iw_nll"].format(k=lm["iw_samples"]), lm["iw_nll"])]
    rows += [
        (DISPLAY_NAMES[key], lm[key])
        for key in ("iw_perplexity", "negative_elbo", "elbo_perplexity", "base_lm_nll", "base_lm_perplexity")
    ]
    if "iw_nll_defensive" in lm:
        m, k = lm["iw_prior_samples"], lm["iw_samples"]
        rows += [
            (DISPLAY_NAMES["iw_nll_defensive"].format(k=k, m=m), lm["iw_nll_defensive"]),
            (DISPLAY_NAMES["iw_perplexity_defensive"].format(k=k, m=m), lm["iw_perplexity_defensive"]),
        ]
    return _table("Language modelling", rows)


def _diversity_markdown(results: dict) -> list[str]:
    diversity = results["diversity"]
    count = results.get("settings", {}).get("num_latents")
    name, evaluated, how = ("CVAE", "cvae", "prior latents per prompt, greedy") if "cvae" in diversity else (
        "LM samples", "llm", "samples per prompt")  # fmt: skip
    keys = [key for key in _DIVERSITY_KEYS if key in diversity[evaluated]]
    return [
        f"## Diverse generation ({count} {how})",
        "",
        f"References: {diversity['references']}.",
        "",
        *_wide_table("", keys, [(name, diversity[evaluated]), ("references", diversity["base_lm"])]),
        "",
    ]


def _temperature_sweep_markdown(results: dict) -> list[str]:
    rows = results["temperature_sweep"]
    keys = [key for key in _DIVERSITY_KEYS if key in rows[0]]
    return [
        "## Latent temperature sweep",
        "",
        *_wide_table("latent temperature", keys, [(f"{row['latent_temperature']:g}", row) for row in rows]),
        "",
    ]


def _reconstruction_markdown(results: dict) -> list[str]:
    rows = [(DISPLAY_NAMES[key], results["reconstruction"][key]) for key in ("bleu_4", "rouge_l")]
    return _table("Reconstruction (posterior mean, greedy)", rows)


def _interpolation_markdown(results: dict) -> list[str]:
    interpolation = results["interpolation"]
    path = zip(
        interpolation["t"],
        interpolation["rouge_l_to_a"],
        interpolation["rouge_l_to_b"],
        interpolation["texts"],
        strict=True,
    )
    return [
        "## Interpolation",
        "",
        "| t | ROUGE-L to A | ROUGE-L to B | text |",
        "|---|---|---|---|",
        *(f"| {t:.1f} | {a:.3f} | {b:.3f} | {_format(text[:80])} |" for t, a, b, text in path),
        "",
    ]


def _control_markdown(results: dict) -> list[str]:
    control = results["control"]
    rows = [(DISPLAY_NAMES[key], control[key]) for key in ("probe_held_out_accuracy", "mean_success", "mean_win_rate")]
    names = control.get("label_names") or [str(label) for label in control["labels"]]
    rows += [(f"success toward {name}", value) for name, value in zip(names, control["success"], strict=True)]
    rows += [(f"win rate toward {name}", value) for name, value in zip(names, control["win_rate"], strict=True)]
    return _table(f"Latent-guided control (k = {control['strength']:g})", rows)


def _dialogue_markdown(results: dict) -> list[str]:
    dialogue = results["dialogue"]
    return _table(
        "Dialogue (substitutes labelled)",
        [(DISPLAY_NAMES[key], dialogue[key]) for key in DIALOGUE_KEYS if key in dialogue],
    )


# name -> the function that writes the metric's section of `results.md`
MARKDOWN_SECTIONS: dict[str, Callable[[dict], list[str]]] = {
    "latent": _latent_markdown,
    "language_modeling": _language_modeling_markdown,
    "diversity": _diversity_markdown,
    "temperature_sweep": _temperature_sweep_markdown,
    "reconstruction": _reconstruction_markdown,
    "interpolation": _interpolation_markdown,
    "control": _control_markdown,
    "dialogue": _dialogue_markdown,
}


def results_markdown(results: dict) -> str:
    """The scalar results as markdown tables (one per metric group) with the plots embedded."""
    data = results.get("data", {})
    lines = [
        f"# Evaluation of `{results.get('model', '')}`",
        "",
        f"{data.get('num_prompts')} prompts, {data.get('num_responses')} responses "
        f"(at least {data.get('responses_per_prompt')} per prompt).",
        "",
    ]
    for name, section in MARKDOWN_SECTIONS.items():
        if name in results:
            lines += section(results)
    if results.get("plots"):
        lines += ["## Plots", "", *(f"![{name}]({file})" for name, file in results["plots"].items()), ""]
    return "\n".join(lines)


__all__ = [
    "EvaluationRun",
    "MARKDOWN_SECTIONS",
    "METRICS",
    "METRIC_FUNCTIONS",
    "evaluation_report",
    "results_markdown",
]
