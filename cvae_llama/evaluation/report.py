"""One call that evaluates a CVAE on a dataset and writes `results.json`, `results.md` and PNG plots."""

import json
import math
import os
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..data import OneToManyCollator, group_responses
from .control import label_directions, latent_guided_control, train_label_probe
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
    count_response_tokens,
    importance_weighted_nll,
    negative_elbo,
    perplexity,
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
from .utils import check_cvae, check_positive_int, decoder_as_causal_lm, generate_texts


METRICS = (
    "latent",
    "language_modeling",
    "diversity",
    "temperature_sweep",
    "reconstruction",
    "interpolation",
    "control",
    "dialogue",
)
# metrics that compare a prompt's responses with each other: they need >= 2 responses per prompt
GROUP_METRICS = ("latent", "control")

DISPLAY_NAMES = {
    "kl": "KL(q(z|x,y) || p(z)) (nats)",
    "mutual_information": "MI I(y; z | x) (nats)",
    "active_units_whole_set": "AU over the whole set (delta 0.01)",
    "active_units": "AU in group (var > {threshold})",
    "consistent_units": "CU (aggregate KL < {threshold} nats)",
    "iw_nll": "IW-NLL per response (nats, k={k})",
    "iw_perplexity": "IW perplexity per token",
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


def _load_model(model_path_or_model, tokenizer):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if isinstance(model_path_or_model, (str, os.PathLike)):
        path = Path(model_path_or_model)
        config = AutoConfig.from_pretrained(path)
        if config.model_type != "cvae_llama":
            raise ValueError(
                f"model_path_or_model={str(path)!r} holds a {config.model_type!r} model; expected a CVAE-Llama "
                "folder (model_type 'cvae_llama', e.g. written by CVAELlamaForCausalLM.save_pretrained)"
            )
        model = AutoModelForCausalLM.from_pretrained(path)
        if tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(path)
    else:
        model = model_path_or_model
        if tokenizer is None:
            name = getattr(model, "name_or_path", "")
            if not name or not Path(name).is_dir():
                raise ValueError("tokenizer is required when a model object is given (it has no local folder)")
            tokenizer = AutoTokenizer.from_pretrained(name)
    check_cvae(model)
    if tokenizer.pad_token_id is None:
        raise ValueError(
            "the tokenizer has no pad token: set one first, e.g. tokenizer.pad_token = tokenizer.eos_token"
        )
    return model, tokenizer


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


def _label_names(dataset) -> dict:
    feature = dataset.features.get("label")
    names = getattr(feature, "names", None)
    return dict(enumerate(names)) if names else {}


@torch.no_grad()
def _posteriors(model, llm, groups, collator, language_modeling: bool, iw_samples: int, batch_size: int, seed: int):
    """Posterior means and log-variances of every response (and, optionally, the IW-NLL, -ELBO and base LM NLL)."""
    generator = torch.Generator().manual_seed(seed)
    means, logvars, group_ids, labels, iw, elbo, base, tokens = [], [], [], [], [], [], [], []
    per_batch = max(1, batch_size // max(len(group["responses"]) for group in groups))
    for start in tqdm(range(0, len(groups), per_batch), desc="Posteriors", leave=False):
        chunk = groups[start : start + per_batch]
        batch = collator([{"prompt": g["prompt"], "responses": g["responses"]} for g in chunk])
        mean, logvar = model.encode(batch["input_ids"].to(model.device), batch["attention_mask"].to(model.device))
        means.append(mean.float().cpu())
        logvars.append(logvar.float().cpu())
        group_ids.append(batch["group_ids"] + start)
        labels += [group["label"] for group in chunk for _ in group["responses"]]
        if language_modeling:
            iw.append(importance_weighted_nll(model, batch, iw_samples, generator))
            elbo.append(negative_elbo(model, batch, 1, generator))
            base.append(causal_lm_nll(llm, batch))
            tokens.append(count_response_tokens(batch["labels"]))
    result = {
        "latent_mean": torch.cat(means),
        "latent_logvar": torch.cat(logvars),
        "group_ids": torch.cat(group_ids),
        "labels": labels,
    }
    if language_modeling:
        result.update(
            iw_nll=torch.cat(iw), negative_elbo=torch.cat(elbo), base_nll=torch.cat(base), num_tokens=torch.cat(tokens)
        )
    return result


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
    max_prompt_tokens: int = 64,
    max_response_tokens: int = 64,
    max_new_tokens: int | None = None,
    temperatures: Sequence[float] = DEFAULT_TEMPERATURES,
    iw_samples: int = 32,
    mc_samples: int = 16,
    control_strength: float = 16.0,
    control_temperature: float | None = None,
    batch_size: int = 16,
    seed: int = 0,
    label_names: Sequence[str] | None = None,
) -> dict:
    """Evaluate a CVAE on a dataset and write `results.json`, `results.md` and PNG plots into `output_dir`.

    Metrics (any subset, in this order; `None` runs all that the data allow: `dialogue` only when asked, `control`
    only when the dataset has labels):
    - `latent`: KL to the prior, MI I(y; z | x), AU (whole set, delta 0.01; in group at 0.03 / 0.1 / 0.3), CU
      (0.03 / 0.1 / 0.3); plots `latent_space.png` (PCA of the posterior means by label) and
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
      BERTScore (MiniLM-L6) and the FED-style substitute.

    Args:
        model_path_or_model: a saved CVAE folder, or a [`CVAELlamaForCausalLM`] (then pass `tokenizer`).
        dataset (`datasets.Dataset`): one-to-many test data, flat `{prompt, response[, prompt_id][, label]}` rows
            (as `make_one_to_many` writes) or groups `{prompt, responses[, label]}`. The responses of a prompt are the
            base LM's samples, the references of diverse generation; `latent` and `control` need 2 or more per prompt.
        output_dir (`str` or `os.PathLike`): created if needed; existing report files are replaced.
        metrics (`list[str]`, *optional*): names from [`METRICS`].
        tokenizer: the model's tokenizer (read from the folder when not given).
        base_model: the base causal LM for references (when prompts have a single response), the label probe and
            the FED-style score; defaults to the CVAE's own decoder without the latent ([`decoder_as_causal_lm`]),
            which is the base LM when the decoder was frozen.
        probe_dataset (`datasets.Dataset`, *optional*): `{response or text, label}` rows to train the label probe.
        num_prompts (`int`, *optional*): evaluate the first `num_prompts` prompts only.
        group_size (`int`, *optional*): responses per prompt (defaults to the smallest count in the data).
        num_latents (`int`, defaults to 8): K, prior latents per prompt (>= 2).
        max_prompt_tokens, max_response_tokens (`int`): token budgets, as in training (`DATASET_BUDGETS`).
        max_new_tokens (`int`, *optional*): cap on generated tokens (defaults to `max_response_tokens`).
        iw_samples (`int`, defaults to 32): k of the importance-weighted NLL.
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
    if metrics is None:
        chosen = None
    else:
        if isinstance(metrics, str):
            metrics = [metrics]
        unknown = [name for name in metrics if name not in METRICS]
        if unknown:
            raise ValueError(f"unknown metric(s) {unknown}; expected names from {list(METRICS)}")
        chosen = [name for name in METRICS if name in metrics]
    if isinstance(num_latents, bool) or not isinstance(num_latents, int) or num_latents < 2:
        raise ValueError(
            f"num_latents must be an integer >= 2 (K latents per prompt for diversity), got {num_latents!r}"
        )
    groups = _groups_of(dataset, group_size, num_prompts)
    has_labels = all(group["label"] is not None for group in groups)
    if chosen is None:
        chosen = [name for name in METRICS if name != "dialogue" and (name != "control" or has_labels)]
    if "control" in chosen and not has_labels:
        raise ValueError(f"metric 'control' needs a 'label' column in dataset (columns: {dataset.column_names})")
    smallest = min(len(group["responses"]) for group in groups)
    for name in GROUP_METRICS:
        if name in chosen and smallest < 2:
            raise ValueError(
                f"metric {name!r} needs one-to-many data, at least 2 responses per prompt, but a prompt has "
                f"{smallest}; "
                "sample them with cvae_llama.data.make_one_to_many"
            )
    if "control" in chosen and len(groups) < 2:
        raise ValueError(
            f"metric 'control' needs at least 2 prompts (directions from one half, control on the other), "
            f"got {len(groups)}"
        )
    if "interpolation" in chosen and sum(len(group["responses"]) for group in groups) < 2:
        raise ValueError("metric 'interpolation' needs at least 2 responses in dataset")

    model, tokenizer = _load_model(model_path_or_model, tokenizer)
    with _eval_mode(model):
        llm = base_model if base_model is not None else decoder_as_causal_lm(model)
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        max_new_tokens = max_new_tokens or max_response_tokens
        prompts = [group["prompt"] for group in groups]
        label_names = dict(enumerate(label_names)) if label_names is not None else _label_names(dataset)
        common = {"max_new_tokens": max_new_tokens, "max_prompt_tokens": max_prompt_tokens, "batch_size": batch_size}
        results = {
            "model": str(model_path_or_model)
            if isinstance(model_path_or_model, (str, os.PathLike))
            else getattr(model, "name_or_path", "") or type(model).__name__,
            "data": {
                "num_prompts": len(groups),
                "responses_per_prompt": smallest,
                "num_responses": sum(len(group["responses"]) for group in groups),
            },
            "settings": {
                "metrics": chosen,
                "num_latents": num_latents,
                "max_prompt_tokens": max_prompt_tokens,
                "max_response_tokens": max_response_tokens,
                "max_new_tokens": max_new_tokens,
                "iw_samples": iw_samples,
                "mc_samples": mc_samples,
                "seed": seed,
                "base_model": "given" if base_model is not None else "the CVAE's decoder without the latent",
            },
            "labels": {},
            "plots": {},
        }
        samples = {}

        steps = tqdm(chosen, desc="Evaluation", unit="metric")
        posteriors = None
        if any(name in chosen for name in ("latent", "language_modeling", "control")):
            collator = OneToManyCollator(tokenizer, max_prompt_tokens, max_response_tokens)
            posteriors = _posteriors(
                model, llm, groups, collator, "language_modeling" in chosen, iw_samples, batch_size, seed
            )
        references, reference_source = None, None
        if any(name in chosen for name in ("diversity", "temperature_sweep")):
            if smallest >= 2 and base_model is None:
                references, reference_source = [group["responses"] for group in groups], "dataset responses"
            else:
                references = base_samples(
                    llm,
                    tokenizer,
                    prompts,
                    num_latents,
                    max_new_tokens,
                    max_prompt_tokens=max_prompt_tokens,
                    batch_size=batch_size,
                    seed=seed,
                )
                reference_source = "samples of the base LM (temperature 1.0, top_p 0.95)"

        for name in steps:
            steps.set_postfix_str(name)
            generator = torch.Generator().manual_seed(seed)
            if name == "latent":
                mean, logvar, ids = posteriors["latent_mean"], posteriors["latent_logvar"], posteriors["group_ids"]
                aggregate = aggregate_posterior_kl(mean, logvar, ids, mc_samples, generator)
                results["latent"] = {
                    "kl": kl_to_prior(mean, logvar),
                    "mutual_information": mutual_information(mean, logvar, ids, mc_samples, generator),
                    "active_units_whole_set": active_units(mean, 0.01),
                    "active_units": in_group_active_units(mean, ids),
                    "consistent_units": consistent_units(
                        mean, logvar, ids, num_samples=mc_samples, generator=generator
                    ),
                    "latent_size": model.config.latent_size,
                    "kl_per_dimension": kl_per_dimension(mean, logvar).tolist(),
                    "aggregate_kl_per_dimension": aggregate.mean(0).tolist(),
                    "density_gap": aggregate.sum(-1).mean().item(),
                }
                results["plots"]["latent_space"] = plot_latent_space(
                    mean, posteriors["labels"] if has_labels else None, output_dir / "latent_space.png", label_names
                ).name
                results["plots"]["kl_per_dimension"] = plot_kl_per_dimension(
                    results["latent"]["kl_per_dimension"],
                    output_dir / "kl_per_dimension.png",
                    results["latent"]["aggregate_kl_per_dimension"],
                ).name
            elif name == "language_modeling":
                tokens = posteriors["num_tokens"]
                results["language_modeling"] = {
                    "iw_nll": posteriors["iw_nll"].mean().item(),
                    "iw_perplexity": perplexity(posteriors["iw_nll"], tokens),
                    "negative_elbo": posteriors["negative_elbo"].mean().item(),
                    "elbo_perplexity": perplexity(posteriors["negative_elbo"], tokens),
                    "base_lm_nll": posteriors["base_nll"].mean().item(),
                    "base_lm_perplexity": perplexity(posteriors["base_nll"], tokens),
                    "iw_samples": iw_samples,
                    "num_tokens": int(tokens.sum()),
                }
            elif name == "diversity":
                result = diverse_generation(
                    model, tokenizer, prompts, num_latents, 1.0, references=references, generator=generator, **common
                )
                samples["diversity"] = [
                    {"prompt": p, "cvae": g, "references": r}
                    for p, g, r in zip(prompts, result.pop("generations"), references, strict=True)
                ]
                results["diversity"] = {
                    "cvae": result,
                    "references": reference_source,
                    "base_lm": diversity_metrics(references),
                }
            elif name == "temperature_sweep":
                rows = temperature_sweep(
                    model, tokenizer, prompts, temperatures, num_latents, references=references, seed=seed, **common
                )
                results["temperature_sweep"] = rows
                results["plots"]["temperature_sweep"] = plot_temperature_sweep(
                    rows, output_dir / "temperature_sweep.png"
                ).name
            elif name == "reconstruction":
                first = [group["responses"][0] for group in groups]
                result = reconstruction(
                    model, tokenizer, prompts, first, max_response_tokens=max_response_tokens, **common
                )
                samples["reconstruction"] = [
                    {"prompt": p, "reference": r, "reconstruction": t}
                    for p, r, t in zip(prompts, first, result.pop("reconstructions"), strict=True)
                ]
                results["reconstruction"] = result
            elif name == "interpolation":
                if len(groups[0]["responses"]) >= 2:
                    text_a, text_b = groups[0]["responses"][:2]
                else:
                    text_a, text_b = groups[0]["responses"][0], groups[1]["responses"][0]
                result = interpolate(
                    model,
                    tokenizer,
                    text_a,
                    text_b,
                    11,
                    prompts[0],
                    max_new_tokens,
                    max_prompt_tokens,
                    max_response_tokens,
                )
                results["interpolation"] = {"prompt": prompts[0], "text_a": text_a, "text_b": text_b, **result}
                results["plots"]["interpolation"] = plot_interpolation(
                    results["interpolation"], output_dir / "interpolation.png"
                ).name
            elif name == "control":
                results["control"], samples["control"] = _control(
                    model,
                    tokenizer,
                    llm,
                    groups,
                    posteriors,
                    probe_dataset,
                    control_strength,
                    control_temperature,
                    seed,
                    **common,
                )
                results["control"]["label_names"] = [
                    label_names.get(label, str(label)) for label in results["control"]["labels"]
                ]
            elif name == "dialogue":
                latents = torch.randn(len(groups), model.config.latent_size, generator=generator)
                candidates = generate_texts(model, tokenizer, prompts, latents, desc="Dialogue responses", **common)
                first = [group["responses"][0] for group in groups]
                result = dialogue_metrics(candidates, first, prompts, llm, tokenizer)
                results["labels"].update(result.pop("labels"))
                samples["dialogue"] = [
                    {"context": p, "reference": r, "response": c}
                    for p, r, c in zip(prompts, first, candidates, strict=True)
                ]
                results["dialogue"] = result
        steps.close()

    (output_dir / "results.json").write_text(json.dumps(results, indent=2, default=_json_default))
    (output_dir / "samples.json").write_text(json.dumps(samples, indent=2, ensure_ascii=False))
    (output_dir / "results.md").write_text(results_markdown(results))
    return results


def _control(model, tokenizer, llm, groups, posteriors, probe_dataset, strength, temperature, seed, **common):
    if probe_dataset is not None:
        column = "response" if "response" in probe_dataset.column_names else "text"
        if column not in probe_dataset.column_names or "label" not in probe_dataset.column_names:
            raise ValueError(
                f"probe_dataset has columns {probe_dataset.column_names}; expected 'label' and 'response' or 'text'"
            )
        pairs = list(zip(probe_dataset[column], probe_dataset["label"], strict=True))
    else:
        pairs = [(response, group["label"]) for group in groups for response in group["responses"]]
    pairs = [(text, label) for text, label in pairs if label is not None]  # e.g. DailyDialog's unaligned acts
    probe = train_label_probe(llm, tokenizer, [text for text, _ in pairs], [label for _, label in pairs], seed=seed)
    # directions from the first half of the prompts (validation), control on the second half (test)
    num_validation = max(1, len(groups) // 2)
    ids = posteriors["group_ids"]
    validation = ids < num_validation
    responses = [response for group in groups for response in group["responses"]]
    validation_texts = [text for text, keep in zip(responses, validation.tolist(), strict=True) if keep]
    directions = label_directions(
        posteriors["latent_mean"][validation], probe.predict_proba(validation_texts), ids[validation]
    )
    test = ~validation
    test_prompts = [groups[i]["prompt"] for i in ids[test].tolist()]
    result = latent_guided_control(
        model,
        tokenizer,
        probe,
        test_prompts,
        posteriors["latent_mean"][test],
        directions,
        strength,
        temperature=temperature,
        **common,
    )
    texts = {"reconstructions": result.pop("reconstructions"), "controlled": result.pop("controlled")}
    result.update(
        probe_held_out_accuracy=probe.held_out_accuracy,
        probe_train_accuracy=probe.history["train_accuracy"],
        num_validation_prompts=num_validation,
        num_test_responses=int(test.sum()),
        directions=directions.tolist(),
    )
    return result, {"prompts": test_prompts, **texts}


def _json_default(value):
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _format(value) -> str:
    """A table cell: numbers to 4 significant digits, missing values as a dash, pipes escaped."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|").replace("\n", "\\n")


def results_markdown(results: dict) -> str:
    """The scalar results as markdown tables (one per metric group) with the plots embedded."""
    lines = [f"# Evaluation of `{results.get('model', '')}`", ""]
    data = results.get("data", {})
    lines += [
        f"{data.get('num_prompts')} prompts, {data.get('num_responses')} responses "
        f"(at least {data.get('responses_per_prompt')} per prompt).",
        "",
    ]
    settings = results.get("settings", {})

    def table(title, rows):
        nonlocal lines
        lines += [f"## {title}", "", "| metric | value |", "|---|---|"]
        lines += [f"| {_format(name)} | {_format(value)} |" for name, value in rows]
        lines.append("")

    if "latent" in results:
        latent = results["latent"]
        rows = [(DISPLAY_NAMES[key], latent[key]) for key in ("kl", "mutual_information", "active_units_whole_set")]
        rows += [(DISPLAY_NAMES["active_units"].format(threshold=t), v) for t, v in latent["active_units"].items()]
        rows += [
            (DISPLAY_NAMES["consistent_units"].format(threshold=t), v) for t, v in latent["consistent_units"].items()
        ]
        rows += [
            ("latent size", latent["latent_size"]),
            ("density gap (sum over dimensions, nats)", latent["density_gap"]),
        ]
        table("Latent quality", rows)
    if "language_modeling" in results:
        lm = results["language_modeling"]
        table(
            "Language modelling",
            [
                (DISPLAY_NAMES["iw_nll"].format(k=lm["iw_samples"]), lm["iw_nll"]),
                (DISPLAY_NAMES["iw_perplexity"], lm["iw_perplexity"]),
                (DISPLAY_NAMES["negative_elbo"], lm["negative_elbo"]),
                (DISPLAY_NAMES["elbo_perplexity"], lm["elbo_perplexity"]),
                (DISPLAY_NAMES["base_lm_nll"], lm["base_lm_nll"]),
                (DISPLAY_NAMES["base_lm_perplexity"], lm["base_lm_perplexity"]),
            ],
        )
    if "diversity" in results:
        diversity = results["diversity"]
        keys = [
            key
            for key in ("distinct_1", "distinct_2", "distinct_4", "self_bleu_4", "rouge_lsum")
            if key in diversity["cvae"]
        ]
        lines += [
            f"## Diverse generation ({settings.get('num_latents')} prior latents per prompt, greedy)",
            "",
            f"References: {diversity['references']}.",
            "",
            "| | " + " | ".join(_format(DISPLAY_NAMES[key]) for key in keys) + " |",
            "|---" * (len(keys) + 1) + "|",
            "| CVAE | " + " | ".join(_format(diversity["cvae"][key]) for key in keys) + " |",
            "| base LM samples | " + " | ".join(_format(diversity["base_lm"].get(key)) for key in keys) + " |",
            "",
        ]
    if "temperature_sweep" in results:
        rows = results["temperature_sweep"]
        keys = [
            key for key in ("distinct_1", "distinct_2", "distinct_4", "self_bleu_4", "rouge_lsum") if key in rows[0]
        ]
        lines += [
            "## Latent temperature sweep",
            "",
            "| latent temperature | " + " | ".join(_format(DISPLAY_NAMES[key]) for key in keys) + " |",
            "|---" * (len(keys) + 1) + "|",
        ]
        lines += [
            f"| {row['latent_temperature']:g} | " + " | ".join(_format(row[key]) for key in keys) + " |"
            for row in rows
        ]
        lines.append("")
    if "reconstruction" in results:
        table(
            "Reconstruction (posterior mean, greedy)",
            [(DISPLAY_NAMES[key], results["reconstruction"][key]) for key in ("bleu_4", "rouge_l")],
        )
    if "interpolation" in results:
        interpolation = results["interpolation"]
        lines += ["## Interpolation", "", "| t | ROUGE-L to A | ROUGE-L to B | text |", "|---|---|---|---|"]
        lines += [
            f"| {t:.1f} | {a:.3f} | {b:.3f} | {_format(text[:80])} |"
            for t, a, b, text in zip(
                interpolation["t"],
                interpolation["rouge_l_to_a"],
                interpolation["rouge_l_to_b"],
                interpolation["texts"],
                strict=True,
            )
        ]
        lines.append("")
    if "control" in results:
        control = results["control"]
        rows = [
            (DISPLAY_NAMES[key], control[key]) for key in ("probe_held_out_accuracy", "mean_success", "mean_win_rate")
        ]
        names = control.get("label_names") or [str(label) for label in control["labels"]]
        rows += [(f"success toward {name}", value) for name, value in zip(names, control["success"], strict=True)]
        rows += [(f"win rate toward {name}", value) for name, value in zip(names, control["win_rate"], strict=True)]
        table(f"Latent-guided control (k = {control['strength']:g})", rows)
    if "dialogue" in results:
        dialogue = results["dialogue"]
        keys = [
            key
            for key in ("bleu_1", "bleu_2", "distinct_1", "distinct_2", "bertscore_minilm_f1", "fed_style")
            if key in dialogue
        ]
        table("Dialogue (substitutes labelled)", [(DISPLAY_NAMES[key], dialogue[key]) for key in keys])
    if results.get("plots"):
        lines += ["## Plots", ""]
        lines += [f"![{name}]({file})" for name, file in results["plots"].items()]
        lines.append("")
    return "\n".join(lines)


__all__ = ["METRICS", "evaluation_report", "results_markdown"]
