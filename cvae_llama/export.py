"""Saving a trained CVAE and exporting it to the Hub.

- [`save_trained_cvae`]: the plain folder a training run ends with (LoRA adapters merged, the training-only
  bag-of-words head and its hook removed), with its training record [`TRAINING_RECORD`] ([`training_record`]);
- [`export_hub_folder`]: a folder that is a complete Hub repo: config.json with `auto_map`, the two code files (it
  loads with `trust_remote_code=True`, no package needed), the weights, the tokenizer, and a model card (`README.md`,
  from the template `model_card.md`) filled in from the training record and an evaluation's `results.json`;
- [`push_folder`]: uploads such a folder with `huggingface_hub`.
"""

import json
import os
import re
import shutil
from pathlib import Path

from .loading import load_cvae, looks_like_hub_id
from .modeling_cvae_llama import DECODER_ARCHITECTURES, describe_quantization
from .validation import refuse_to_overwrite


# Written beside a trained model; `export_hub_folder` reads it to fill in the model card's training section.
TRAINING_RECORD = "cvae_training.json"
# Tags every exported card carries (the caller's `tags` are added).
BASE_TAGS = ("cvae-llama", "cvae", "vae", "latent-variable", "text-generation", "custom_code")  # + the architecture's
# The folder of an exported repo that holds the evaluation's results.json, results.md and plots.
EVALUATION_FOLDER = "evaluation"


# ---------------------------------------------------------------------------------------------------- training
def training_record(trainer, groups, dataset: str, dataset_format: str, base_model: str, metrics: dict) -> dict:
    """What a training run records beside its model: the data, the CVAE config, every training argument (as
    `TrainingArguments.to_dict` writes them, tokens redacted), the step reached and the last logged terms.

    Args:
        trainer: the [`CVAETrainer`] after `train()`.
        groups: its training data: groups `{prompt, responses[, label]}` or flat rows `{prompt, response[, label]}`
            (one response each).
        dataset, dataset_format: where the data came from (recorded as given).
        base_model: the LLM the CVAE was built around (the config's `base_model_name_or_path` wins when set).
        metrics: `trainer.train().metrics`.
    """
    from .configuration_cvae_llama import CVAE_FIELDS

    model = trainer.accelerator.unwrap_model(trainer.model)
    model = model.get_base_model() if hasattr(model, "get_base_model") else model
    args = trainer.args
    return {
        "base_model": getattr(model.config, "base_model_name_or_path", None) or base_model,
        "dataset": str(dataset),
        "dataset_format": dataset_format,
        "num_groups": len(groups),
        "responses_per_group": (
            min(len(responses) for responses in groups["responses"]) if "responses" in groups.column_names else 1
        ),
        "cvae_config": {key: getattr(model.config, key) for key in CVAE_FIELDS},
        # dg_grouping as the trainer resolved it from the data when "auto"
        "training_arguments": {**args.to_dict(), "dg_grouping": trainer.dg_grouping},
        "world_size": args.world_size,
        "global_step": trainer.state.global_step,
        "train_runtime_s": metrics.get("train_runtime"),
        "final_log": next((entry for entry in reversed(trainer.state.log_history) if "loss" in entry), {}),
    }


def save_trained_cvae(trainer, output_dir: str | os.PathLike, record: dict | None = None):
    """Save the trained CVAE of `trainer` to `output_dir` as a folder that `from_pretrained` loads, the bag-of-words
    head (training only) and its forward hook removed (`remove_bow_head`); and, from the main process, the training
    `record` as [`TRAINING_RECORD`]. An adapter on the base LLM where the CVAE was built around a named one
    (`save_pretrained`'s default), LoRA's weights unmerged in it ([`lora_adapter_model`]); else the whole model, LoRA
    merged into the decoder.

    Under several processes the head stays (every process must save the same model); `from_pretrained` drops its
    weights as unexpected.

    Returns:
        The model saved (under LoRA, in the main process, the CVAE with its LoRA layers, or merged).
    """
    from peft import PeftModel

    from .trainer import remove_bow_head
    from .training.lora import lora_adapter_model, unwrap_cvae

    output_dir = Path(output_dir)
    model = trainer.accelerator.unwrap_model(trainer.model)
    if isinstance(model, PeftModel):
        if trainer.is_world_process_zero():  # saved by the main process alone
            named_base = getattr(unwrap_cvae(model).config, "base_model_fingerprint", None)
            model = remove_bow_head(lora_adapter_model(model) if named_base else model.merge_and_unload())
            model.save_pretrained(output_dir)
            trainer.processing_class.save_pretrained(output_dir)
    else:
        if trainer.args.world_size == 1:
            remove_bow_head(model)
        trainer.save_model(str(output_dir))
    if record is not None and trainer.is_world_process_zero():
        write_training_record(output_dir, record)
    return model


def write_training_record(folder: str | os.PathLike, record: dict) -> Path:
    """Write `record` ([`training_record`]) as `folder / TRAINING_RECORD`."""
    path = Path(folder) / TRAINING_RECORD
    path.write_text(json.dumps(record, indent=2, default=str))
    return path


def read_training_record(folder: str | os.PathLike) -> dict:
    """The training record saved in `folder`, or `{}` when there is none (a folder not written by training)."""
    path = Path(folder).expanduser() / TRAINING_RECORD
    return json.loads(path.read_text()) if path.is_file() else {}


# ---------------------------------------------------------------------------------------------------- the model card
def model_card_template_path() -> Path:
    """`model_card.md`: shipped inside the package (package data), or at the root of a source checkout."""
    package = Path(__file__).resolve().parent
    for candidate in (package / "model_card.md", package.parent / "model_card.md"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"the model card template model_card.md is missing from the installation (looked in {package} and "
        f"{package.parent})"
    )


def read_results(path: str | os.PathLike, argument: str = "results") -> tuple[dict, Path]:
    """The `results.json` of an evaluation (`path` may be its folder): `(results, path of the file)`."""
    results_path = Path(path).expanduser()
    if results_path.is_dir():
        results_path = results_path / "results.json"
    if not results_path.is_file():
        raise ValueError(f"{argument} {str(path)!r} does not exist (expected the results.json of an evaluation)")
    try:
        results = json.loads(results_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{argument} {str(path)!r} is not valid JSON: {error}") from error
    if not isinstance(results, dict) or "settings" not in results:
        raise ValueError(f"{argument} {str(path)!r} is not a results.json written by `evaluation_report`")
    return results, results_path


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
    ]  # fmt: skip
    final = record.get("final_log", {})
    if final:
        terms = ", ".join(
            f"{key} {final[key]:.4g}"
            for key in ("reconstruction_loss", "kl", "dg", "mutual_info", "active_units")
            if isinstance(final.get(key), float)
        )
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
        "bow": "reconstruction + KL",
    }
    text = described.get(objective, objective)
    bow_weight = args.get("bow_weight")
    if bow_weight is None and objective == "bow":  # saved when the weight of objective bow had the default 1.0
        bow_weight = 1.0
    if bow_weight:
        text += f" + {bow_weight} x bag-of-words loss"
    return f"`{objective}`: {text}"


def _training_data_text(record: dict) -> str | None:
    if not record:
        return None
    return (
        f"{record.get('num_groups')} one-to-many groups of {record.get('responses_per_group')} responses "
        f"({record.get('dataset_format')} data from `{Path(str(record.get('dataset'))).name}`)"
    )


def model_card(model, *, record: dict, results: dict | None, base_model: str | None, repo_id: str,
               model_name: str, license: str, tags, training_data: str | None, template_path=None,
               adapter: bool = False):  # fmt: skip
    """The `huggingface_hub.ModelCard` of an exported CVAE, from the template `model_card.md` (or `template_path`).
    `adapter`: the folder holds only the CVAE's weights on `base_model` (`base_model_relation: adapter`, which links
    the repo to its base on the Hub)."""
    from huggingface_hub import ModelCard, ModelCardData

    relation = {"base_model_relation": "adapter"} if adapter and base_model else {}  # the Hub's link to the base
    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag="text-generation",
        license=license,
        tags=list(dict.fromkeys([*BASE_TAGS, model.config.base_model_type, *tags])),
        base_model=base_model,
        model_name=model_name,
        **relation,
    )
    config = model.config
    base_class = DECODER_ARCHITECTURES[config.base_model_type].causal_lm.__name__
    return ModelCard.from_template(
        card_data,
        template_path=str(template_path or model_card_template_path()),
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
        memory_attention=(
            "in a softmax of their own, added behind a gate per layer and head that starts at 0 (a fresh CVAE is its "
            "LLM)"
            if config.memory_attention == "gated"
            else "in one softmax with the text's keys"
        ),
        decoder_mode=config.decoder_mode,
        learned_prior=config.learned_prior,
        base_quantization=(
            describe_quantization(config.base_model_quantization_config)
            if getattr(config, "base_model_quantization_config", None)
            else None
        ),
        base_model_type=config.base_model_type,
        base_architecture=base_class.removesuffix("ForCausalLM"),
        base_model_class=base_class,
        training_data=training_data or _training_data_text(record),
        objective=_objective_text(record),
        training_setup=_training_setup(record) if record else None,
        adapter=adapter,
        results_table=_card_results_table(results, EVALUATION_FOLDER) if results is not None else None,
    )


# ---------------------------------------------------------------------------------------------------- export
def _drop_session_settings(tokenizer_config: Path) -> None:
    """Remove what the saving session's offline mode wrote into the tokenizer config (`local_files_only`,
    `is_local`): a Hub repo's tokenizer must not ask its users to stay offline."""
    if tokenizer_config.is_file():
        values = json.loads(tokenizer_config.read_text(encoding="utf-8"))
        removed = [values.pop(key) for key in ("local_files_only", "is_local") if key in values]
        if removed:
            tokenizer_config.write_text(json.dumps(values, indent=2, ensure_ascii=False) + "\n")


def export_hub_folder(
    model_name_or_path: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    results: str | os.PathLike | None = None,
    base_model: str | None = None,
    license: str = "apache-2.0",
    tags=(),
    model_name: str | None = None,
    repo_id: str | None = None,
    training_data: str | None = None,
    overwrite: bool = False,
    standalone: bool | None = None,
    **model_kwargs,
) -> Path:
    """Write `output_dir`, a complete Hub repo of the saved CVAE `model_name_or_path` (see the module docstring).

    Args:
        results: the `results.json` of an evaluation (or its folder), whose numbers (and plots) go into the card; it
            is copied with its plots into `output_dir / "evaluation"`.
        base_model: the Hub id of the base LM for the card's metadata (default: the one recorded, when a Hub id).
        license, tags, model_name: the card's metadata (`tags` are added to [`BASE_TAGS`]; the title defaults to the
            folder's name).
        repo_id: the repo id shown in the card's usage code (default: the folder's name).
        training_data: a description of the training data (default: from the training record).
        overwrite: replace an existing `output_dir` (never done otherwise).
        standalone: as for `save_pretrained`: by default an adapter on the base LLM where the model is one (its
            weights only, the card's metadata `base_model_relation: adapter`), else the whole model.
        model_kwargs: for `from_pretrained` (`dtype`, ...).

    Returns:
        `output_dir` as a `Path`.
    """
    output_dir = Path(output_dir)
    source = Path(model_name_or_path).expanduser()
    if source.exists() and output_dir.exists() and output_dir.resolve() == source.resolve():
        raise ValueError("output_dir must differ from model_name_or_path (the export writes a new folder)")
    refuse_to_overwrite(output_dir, overwrite, "output_dir")
    results_path = None
    if results is not None:
        results, results_path = read_results(results)
    template = model_card_template_path()
    model, tokenizer = load_cvae(model_name_or_path, **model_kwargs)
    record = read_training_record(source) if source.is_dir() else {}

    if output_dir.is_dir() and overwrite:
        shutil.rmtree(output_dir)
    elif output_dir.exists() and overwrite:
        output_dir.unlink()
    output_dir.mkdir(parents=True, exist_ok=True)
    # config (auto_map), the two code files, model.safetensors, generation config
    model.save_pretrained(output_dir, standalone=standalone)
    adapter = json.loads((output_dir / "config.json").read_text())["saved_as"] == "adapter"
    tokenizer.save_pretrained(output_dir)
    _drop_session_settings(output_dir / "tokenizer_config.json")
    if record:
        (output_dir / TRAINING_RECORD).write_text(json.dumps(record, indent=2))
    if results is not None:
        evaluation_dir = output_dir / EVALUATION_FOLDER
        evaluation_dir.mkdir()
        (evaluation_dir / "results.json").write_text(json.dumps(results, indent=2))
        for name in ["results.md", *results.get("plots", {}).values()]:
            plot = results_path.parent / name
            if plot.is_file():
                shutil.copy2(plot, evaluation_dir / name)

    if base_model is None:
        recorded = record.get("base_model") or getattr(model.config, "base_model_name_or_path", None)
        if recorded and not Path(recorded).exists() and looks_like_hub_id(recorded):
            base_model = recorded
    card = model_card(
        model, record=record, results=results, base_model=base_model, repo_id=repo_id or output_dir.name,
        model_name=model_name or output_dir.name, license=license, tags=tags, training_data=training_data,
        template_path=template, adapter=adapter,
    )  # fmt: skip
    card.save(output_dir / "README.md")
    return output_dir


def push_folder(folder: str | os.PathLike, repo_id: str, private: bool = False, argument: str = "repo_id") -> str:
    """Upload `folder` to the Hub repo `repo_id` (created if needed) with `huggingface_hub`; returns the commit URL.

    Raises:
        OSError: the upload failed (network, authentication, offline mode), naming `repo_id` as `argument`.
    """
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        commit = api.upload_folder(folder_path=str(folder), repo_id=repo_id, commit_message="Upload CVAE-Llama")
    except Exception as error:  # network, authentication and offline mode each raise their own type
        raise OSError(
            f"{argument} {repo_id!r}: the upload failed ({type(error).__name__}: "
            f"{' '.join(str(error).split())[:300]}); the folder {folder} is complete and can be uploaded later"
        ) from error
    return str(getattr(commit, "commit_url", commit))


__all__ = [
    "BASE_TAGS",
    "TRAINING_RECORD",
    "export_hub_folder",
    "model_card",
    "model_card_template_path",
    "push_folder",
    "read_results",
    "read_training_record",
    "save_trained_cvae",
    "training_record",
    "write_training_record",
]
