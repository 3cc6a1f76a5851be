"""Loading what a user names by a local path or a Hub id: models, their tokenizers, and datasets of prompt / response
rows, each with one clear `ValueError` when the name is not what is expected (a missing folder, a folder that is no
model, an LLM where a CVAE is needed, a dataset without the needed columns).

Each function names the value it was given as its `argument` in its messages; the command line passes its flag
(`"--model_name_or_path"`, `"--dataset"`), and the hints in a message then name flags too (`--split`).

The pad-token policy lives here: [`load_tokenizer`] gives a tokenizer without a pad token its end-of-sequence token
as pad token (padding is masked out and never scored). The rest of the library never changes a tokenizer: it asks for
a pad token through `cvae_llama.validation.pad_token_id`.
"""

import os
import re
from pathlib import Path
from typing import Any


# The formats `load_rows` reads; "auto" tells the format from the path (`detect_dataset_format`).
DATASET_FORMATS = ("auto", "yelp", "agnews", "dailydialog", "prompt_response", "text", "hub")
_FILE_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet", ".txt", ".zip", ".pt", ".pth", ".bin", ".safetensors")


def _named(argument: str, name: str) -> str:
    """`name` as the caller's naming style has it: a flag (`--split`) when `argument` is a flag, else as is."""
    return f"--{name}" if argument.startswith("--") else name


def looks_like_hub_id(name: str) -> bool:
    """`name` or `owner/name` without a file suffix: a Hub repo id rather than a local path."""
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?", name)) and not name.lower().endswith(_FILE_SUFFIXES)


# ---------------------------------------------------------------------------------------------------- models
def model_config(name_or_path: str | os.PathLike, argument: str = "model_name_or_path"):
    """The config of a model folder or Hub repo (`AutoConfig`), with one clear error when there is none."""
    from transformers import AutoConfig

    name_or_path = str(name_or_path)
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"{argument} {name_or_path!r} is a file; expected a model folder (with config.json)")
        if not (path / "config.json").is_file():
            raise ValueError(f"{argument} {name_or_path!r} is a folder without config.json: not a model folder")
    elif not looks_like_hub_id(name_or_path):
        raise ValueError(f"{argument} {name_or_path!r} does not exist")
    try:
        return AutoConfig.from_pretrained(str(path) if path.exists() else name_or_path)
    except (OSError, ValueError) as error:
        if path.exists():
            raise ValueError(f"{argument} {name_or_path!r}: could not read its config.json: {error}") from error
        raise ValueError(
            f"{argument} {name_or_path!r} is not a local folder, and no such model could be fetched from the Hub "
            f"(offline, or no such repo)"
        ) from error


def load_tokenizer(name_or_path: str | os.PathLike):
    """The model's tokenizer with left padding and a pad token (its end-of-sequence token when it has none)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(name_or_path), padding_side="left")
    except (OSError, ValueError, TypeError) as error:
        raise ValueError(f"{str(name_or_path)!r} has no usable tokenizer: {error}") from error
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"the tokenizer of {str(name_or_path)!r} has neither a pad nor an end-of-sequence token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_cvae(name_or_path: str | os.PathLike, argument: str = "model_name_or_path", **kwargs):
    """A saved [`CVAELlamaForCausalLM`] (in eval mode) and its tokenizer; a clear error for any other folder.

    `kwargs` go to `from_pretrained` (`dtype`, `attn_implementation`, ...).
    """
    return saved_cvae(name_or_path, argument, **kwargs), load_tokenizer(name_or_path)


def load_cvae_or_causal_lm(name_or_path: str | os.PathLike, argument: str = "model_name_or_path", **kwargs):
    """A saved CVAE ([`load_cvae`]), or any other causal LM (the base or fine-tuned LLM a CVAE is compared with), in
    eval mode, and its tokenizer."""
    return saved_cvae_or_causal_lm(name_or_path, argument, **kwargs), load_tokenizer(name_or_path)


def saved_cvae_or_causal_lm(name_or_path: str | os.PathLike, argument: str = "model_name_or_path", **kwargs):
    """[`load_cvae_or_causal_lm`]'s model alone, in eval mode (for a caller that brings its own tokenizer)."""
    if model_config(name_or_path, argument).model_type == "cvae_llama":
        return saved_cvae(name_or_path, argument, **kwargs)
    return causal_lm_model(name_or_path, argument, **kwargs).eval()


def saved_cvae(name_or_path: str | os.PathLike, argument: str = "model_name_or_path", **kwargs):
    """A saved [`CVAELlamaForCausalLM`], in eval mode; a clear error for any other folder (see [`load_cvae`])."""
    config = model_config(name_or_path, argument)
    if config.model_type != "cvae_llama":
        raise ValueError(
            f"{argument} {str(name_or_path)!r} holds a {config.model_type!r} model, not a CVAE-Llama (model_type "
            "'cvae_llama'); build one around it with CVAELlamaForCausalLM.from_llm (`cvae-llama train`)"
        )
    return pretrained_cvae(name_or_path, **kwargs).eval()


def pretrained_cvae(name_or_path: str | os.PathLike, **kwargs):
    """`CVAELlamaForCausalLM.from_pretrained`, with transformers' and safetensors' refusals of a folder whose weights
    do not fit its config, or cannot be read, said in terms of the folder."""
    from safetensors import SafetensorError

    from .configuration_cvae_llama import CVAE_FIELDS, CVAELlamaConfig
    from .modeling_cvae_llama import CVAELlamaForCausalLM

    source = str(name_or_path)
    try:
        return CVAELlamaForCausalLM.from_pretrained(source, **kwargs)
    except RuntimeError as error:  # transformers' refusal of weights whose shapes differ from the config's
        if "ignore_mismatched_sizes" not in str(error):
            raise
        config = kwargs.get("config")
        if not isinstance(config, CVAELlamaConfig):
            config = CVAELlamaConfig.from_pretrained(source)
        fields = ", ".join(f"{name}={getattr(config, name)!r}" for name in (*CVAE_FIELDS, "vocab_size"))
        raise ValueError(
            f"the weights in {source!r} do not have the shapes its config gives ({fields}; see the load report "
            "above for the tensors): its config.json was edited, or belongs to other weights"
        ) from error
    except SafetensorError as error:
        raise ValueError(
            f"{source!r} holds a .safetensors file that cannot be read: it is truncated or corrupted ({error}); "
            "save or download the model again"
        ) from error


def load_causal_lm(name_or_path: str | os.PathLike, argument: str = "model_name_or_path", **kwargs):
    """Any causal LM (a CVAE included, `AutoModelForCausalLM`) and its tokenizer."""
    return causal_lm_model(name_or_path, argument, **kwargs), load_tokenizer(name_or_path)


def causal_lm_model(name_or_path: str | os.PathLike, argument: str = "model_name_or_path", **kwargs):
    """[`load_causal_lm`]'s model alone."""
    from transformers import AutoModelForCausalLM

    model_config(name_or_path, argument)
    try:
        return AutoModelForCausalLM.from_pretrained(str(name_or_path), **kwargs)
    except ValueError as error:
        raise ValueError(f"{argument} {str(name_or_path)!r} is not a causal LM: {error}") from error


def build_or_load_cvae(
    name_or_path: str | os.PathLike, cvae_fields: dict[str, Any] | None = None, argument: str = "model_name_or_path",
    **kwargs,
):  # fmt: skip
    """A CVAE to train: built around the LLM of `name_or_path` (an architecture of `BASE_CONFIG_CLASSES`:
    `CVAELlamaForCausalLM.from_llm` with the CVAE config fields `cvae_fields`), or the saved CVAE there, to continue
    training (whose config must then agree with `cvae_fields`). `kwargs` go to `from_pretrained` / `from_llm`."""
    from .configuration_cvae_llama import BASE_CONFIG_CLASSES
    from .modeling_cvae_llama import CVAELlamaForCausalLM

    name = str(name_or_path)
    fields = dict(cvae_fields or {})
    config = model_config(name, argument)
    if config.model_type == "cvae_llama":
        different = {key: value for key, value in fields.items() if getattr(config, key) != value}
        if different:
            raise ValueError(
                f"{argument} {name!r} is already a CVAE whose config differs from {different}: the CVAE fields apply "
                "when a CVAE is built around an LLM"
            )
        return pretrained_cvae(name, **kwargs)
    if config.model_type not in BASE_CONFIG_CLASSES:
        raise ValueError(
            f"{argument} {name!r} holds a {config.model_type!r} model; the CVAE is built around an LLM of model_type "
            f"{', '.join(map(repr, BASE_CONFIG_CLASSES))} or continues a CVAE-Llama"
        )
    return CVAELlamaForCausalLM.from_llm(name, **fields, **kwargs)


# ---------------------------------------------------------------------------------------------------- datasets
def detect_dataset_format(dataset: str | os.PathLike, argument: str = "dataset") -> str:
    """The format of a dataset path: one of `DATASET_FORMATS` (never `"auto"`), told from the path.

    A folder written by `save_to_disk`, or a .json / .jsonl / .parquet file, or a .csv whose header names columns, is
    `prompt_response`; `sentiment.<split>.<label>` files are Yelp; a header-less .csv (or a folder of test.csv /
    train.csv) is AG News; a .zip (or a folder of <split>.zip / dialogues_<split>.txt) is DailyDialog; a .txt file is
    unconditional text, one text per line; a path that does not exist is a Hub name.
    """
    dataset = str(dataset)
    path = Path(dataset).expanduser()
    if not path.exists():
        if looks_like_hub_id(dataset):
            return "hub"
        raise ValueError(f"{argument} {dataset!r} does not exist")
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
        raise ValueError(
            f"{argument} {dataset!r} is a folder of no known format (a save_to_disk dataset, Yelp, AG News or "
            f"DailyDialog); pass {_named(argument, 'dataset_format')}"
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
    raise ValueError(
        f"{argument} {dataset!r}: cannot tell its format from the name; pass {_named(argument, 'dataset_format')} "
        f"(one of {', '.join(DATASET_FORMATS[1:])})"
    )


def load_rows(
    dataset: str | os.PathLike,
    tokenizer=None,
    *,
    dataset_format: str = "auto",
    dataset_config: str | None = None,
    split: str | None = None,
    prompt_column: str = "prompt",
    response_column: str = "response",
    label_column: str = "label",
    needs_response: bool = True,
    argument: str = "dataset",
):
    """The rows of a dataset as a `datasets.Dataset` with `prompt`, `response` (or `responses`) and maybe `label`.

    Args:
        dataset: a path (the Yelp, AG News or DailyDialog data in their shared formats, a .json / .jsonl / .csv /
            .parquet file of prompt / response rows, a `save_to_disk` folder, a .txt file of texts) or a Hub name.
        tokenizer: the tokenizer the Yelp and AG News readers split prompts with.
        dataset_format: one of `DATASET_FORMATS`; `"auto"` tells it from the path ([`detect_dataset_format`]).
        dataset_config, split: the config name (Hub datasets) and the split to read (reader's default when unset).
        prompt_column, response_column, label_column: the source columns, renamed to `prompt`, `response`, `label`.
        needs_response: require a `response` (or `responses`) column.
        argument: how messages name `dataset`.

    Returns:
        `(rows, format)`, the format as found when `"auto"`.
    """
    dataset = str(dataset)
    if dataset_format == "auto":
        dataset_format = detect_dataset_format(dataset, argument)
    renames = {prompt_column: "prompt", response_column: "response", label_column: "label"}
    renames = {source: target for source, target in renames.items() if source != target}
    if dataset_format == "hub":
        rows = _hub_rows(dataset, dataset_config, split, argument)
    elif dataset_format == "prompt_response" and renames:
        rows = _raw_prompt_response_rows(dataset, split, argument)
    else:
        rows = _format_rows(dataset, dataset_format, tokenizer, split, argument)
    if isinstance(rows, dict):  # a DatasetDict
        raise ValueError(f"{argument} {dataset!r} holds the splits {list(rows)}: pass {_named(argument, 'split')}")
    return _standard_columns(rows, renames, needs_response, dataset, argument), dataset_format


def _hub_rows(dataset: str, dataset_config: str | None, split: str | None, argument: str):
    """A Hub dataset's split (`train` by default), with one clear error when it cannot be loaded."""
    from datasets import load_dataset

    try:
        return load_dataset(dataset, dataset_config, split=split or "train")
    except Exception as error:  # datasets raises many types for an unreachable or unknown name
        raise ValueError(
            f"{argument} {dataset!r} is not a local path, and loading it from the Hub failed "
            f"({type(error).__name__}: {' '.join(str(error).split())[:300]})"
        ) from error


def _raw_prompt_response_rows(dataset: str, split: str | None, argument: str):
    """A `save_to_disk` folder or a .json / .jsonl / .csv / .parquet file with its columns as they are."""
    from datasets import Dataset, load_dataset, load_from_disk

    path = Path(dataset).expanduser()
    builders = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
    if path.is_dir():
        rows = load_from_disk(str(path))
        return rows if isinstance(rows, Dataset) else rows[split or "train"]
    if path.suffix.lower() in builders:
        return load_dataset(builders[path.suffix.lower()], data_files=str(path), split="train")
    raise ValueError(f"{argument} {dataset!r} is not a .json / .jsonl / .csv / .parquet file")


def _format_rows(dataset: str, dataset_format: str, tokenizer, split: str | None, argument: str):
    """The rows of a local dataset read by the reader of its format, its errors naming `dataset`."""
    from .data import load_dataset_by_name, load_prompt_response_file, load_text_file

    kwargs = {"tokenizer": tokenizer} if dataset_format in ("yelp", "agnews") else {}
    try:
        if dataset_format == "prompt_response":
            return load_prompt_response_file(dataset, split=split or "train")
        if dataset_format == "text":
            return load_text_file(dataset)
        return load_dataset_by_name(dataset_format, dataset, split=split, **kwargs)
    except ValueError as error:
        raise ValueError(f"{argument} {dataset!r} ({dataset_format}): {error}") from error


def _standard_columns(rows, renames: dict[str, str], needs_response: bool, dataset: str, argument: str):
    """`rows` with the source columns renamed to `prompt` / `response` / `label`; `ValueError` when one is missing."""
    from .data import unconditional_rows

    renames = {source: target for source, target in renames.items() if source in rows.column_names}
    if renames:
        rows = rows.remove_columns([target for target in renames.values() if target in rows.column_names])
        rows = rows.rename_columns(renames)
    if "prompt" not in rows.column_names and {"response", "text"} & set(rows.column_names):
        # texts without prompts (a `text` column, or a response column alone): unconditional, x is empty
        rows = unconditional_rows(rows, "response" if "response" in rows.column_names else "text")
    needed = ["prompt"] + (["response"] if needs_response and "responses" not in rows.column_names else [])
    missing = [column for column in needed if column not in rows.column_names]
    if missing:
        raise ValueError(
            f"{argument} {dataset!r} has the columns {rows.column_names} but needs {missing} (rename with "
            f"{_named(argument, 'prompt_column')} / {_named(argument, 'response_column')})"
        )
    if len(rows) == 0:
        raise ValueError(f"{argument} {dataset!r} has no rows")
    return rows


__all__ = [
    "DATASET_FORMATS",
    "build_or_load_cvae",
    "detect_dataset_format",
    "load_causal_lm",
    "load_cvae",
    "load_rows",
    "load_tokenizer",
    "looks_like_hub_id",
    "model_config",
    "pretrained_cvae",
    "saved_cvae",
]
