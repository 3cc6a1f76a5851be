"""The steps of `cvae-llama`, one function per subcommand: each checks its flags, calls the library
(`cvae_llama.loading`, `.data`, `.trainer`, `.evaluation`, `.latent_io`, `.export`, `.demo`) and says what comes next.
"""

import json
import math
from pathlib import Path

import torch

from ..export import export_hub_folder, push_folder, save_trained_cvae, training_record
from ..latent_io import read_directions, read_latent, save_latents
from ..loading import build_or_load_cvae, load_causal_lm, load_cvae, load_cvae_or_causal_lm, load_rows, load_tokenizer
from ..validation import check_non_negative_float, check_positive_int, non_empty_dir, refuse_to_overwrite
from .arguments import (
    CVAEArguments,
    CVAETrainingArguments,
    DataArguments,
    DemoArguments,
    EvaluateArguments,
    ExploreArguments,
    ExportArguments,
    GenerateArguments,
    ModelArguments,
    OutputArguments,
    SampleArguments,
    SFTTrainingArguments,
    TrainDataArguments,
)


PROG = "cvae-llama"


class CommandLineError(ValueError):
    """A user error found by the command line itself (printed as one line, exit status 1)."""


# ---------------------------------------------------------------------------------------------------- helpers
def rows_of(data_args: DataArguments, tokenizer, needs_response: bool = True):
    """`load_rows` of `--dataset` with the data flags: `(rows, format)`."""
    return load_rows(data_args.dataset, tokenizer, needs_response=needs_response, argument="--dataset",
                     **data_args.load_kwargs())  # fmt: skip


def _first(rows, count: int | None):
    """The first `--max_samples` rows (all when unset)."""
    if count is None:
        return rows
    check_positive_int(count, "--max_samples")
    return rows.select(range(min(count, len(rows))))


def _resolve_resume(resume: str | None, output_dir: str) -> str | None:
    """`--resume_from_checkpoint`: a checkpoint folder, or `last` / `true` for the latest one in `--output_dir`."""
    from transformers.trainer_utils import get_last_checkpoint

    if resume is None or resume.lower() in ("false", "no", ""):
        return None
    if resume.lower() in ("true", "last", "latest", "yes"):
        last = get_last_checkpoint(output_dir) if Path(output_dir).is_dir() else None
        if last is None:
            raise CommandLineError(
                f"--resume_from_checkpoint {resume}: --output_dir {output_dir!r} has no checkpoint-*"
            )
        return last
    if not Path(resume).is_dir():
        raise CommandLineError(f"--resume_from_checkpoint {resume!r} is not a checkpoint folder")
    return resume


def _check_training_output(output_dir: str, overwrite: bool, resume: str | None) -> None:
    if resume is None and not overwrite and non_empty_dir(output_dir):
        raise CommandLineError(
            f"--output_dir {str(output_dir)!r} is not empty: pass --resume_from_checkpoint last to continue the run "
            "there, or --overwrite to train into it anyway"
        )


# ---------------------------------------------------------------------------------------------------- sft
def run_sft(model_args: ModelArguments, data_args: DataArguments, training_args: SFTTrainingArguments,
            output_args: OutputArguments) -> None:  # fmt: skip
    """`cvae-llama sft`: fine-tune a causal LM on the prompt / response pairs of `--dataset` with `Trainer`."""
    from transformers import Trainer

    from ..sft import PromptResponseCollator, prompt_response_pairs

    resume = _resolve_resume(training_args.resume_from_checkpoint, training_args.output_dir)
    _check_training_output(training_args.output_dir, output_args.overwrite, resume)
    model, tokenizer = load_causal_lm(
        model_args.model_name_or_path, "--model_name_or_path", **model_args.load_kwargs()
    )
    rows, _ = rows_of(data_args, tokenizer)
    rows = _first(prompt_response_pairs(rows), data_args.max_samples)
    collator = PromptResponseCollator(tokenizer, training_args.max_prompt_tokens, training_args.max_response_tokens)
    trainer = Trainer(model=model, args=training_args, train_dataset=rows, data_collator=collator,
                      processing_class=tokenizer)  # fmt: skip
    trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(training_args.output_dir)
    if trainer.is_world_process_zero():
        print(
            f"Saved the fine-tuned LM to {training_args.output_dir}; next: {PROG} sample --model_name_or_path "
            f"{training_args.output_dir} --dataset {data_args.dataset} --output_dir ONE_TO_MANY_DIR"
        )


# ---------------------------------------------------------------------------------------------------- sample
def run_sample(model_args: ModelArguments, data_args: DataArguments, sample_args: SampleArguments):
    """`cvae-llama sample`: `--num_responses` responses per distinct prompt of `--dataset`, saved with
    `make_one_to_many` (resumable); returns the dataset."""
    from ..data import DATASET_BUDGETS, make_one_to_many

    output_dir = Path(sample_args.output_dir)
    if not sample_args.overwrite:
        if (output_dir / "dataset_info.json").exists():
            raise CommandLineError(
                f"--output_dir {str(output_dir)!r} already holds a finished dataset; pass --overwrite to replace it"
            )
        interrupted = (output_dir / "shards").is_dir()  # an interrupted run there resumes
        if non_empty_dir(output_dir) and not interrupted:
            raise CommandLineError(
                f"--output_dir {str(output_dir)!r} already holds other files; pass --overwrite to write there"
            )
    model, tokenizer = load_causal_lm(
        model_args.model_name_or_path, "--model_name_or_path", **model_args.load_kwargs()
    )
    rows, dataset_format = rows_of(data_args, tokenizer, needs_response=False)
    has_label = "label" in rows.column_names
    first_label = {}  # prompt -> label of its first row, in order of first appearance
    for prompt, label in zip(rows["prompt"], rows["label"] if has_label else [None] * len(rows), strict=True):
        first_label.setdefault(prompt or "", label)
    prompts, labels = list(first_label), list(first_label.values())
    if data_args.max_samples is not None:
        prompts, labels = prompts[: data_args.max_samples], labels[: data_args.max_samples]
    budget = DATASET_BUDGETS.get(dataset_format)
    dataset = make_one_to_many(
        model.eval(),
        tokenizer,
        prompts,
        sample_args.num_responses,
        output_dir,
        max_new_tokens=sample_args.max_new_tokens or (budget[1] if budget else 64),
        temperature=sample_args.temperature,
        top_p=sample_args.top_p,
        batch_size=sample_args.batch_size,
        seed=sample_args.seed,
        labels=labels if has_label and all(label is not None for label in labels) else None,
        max_prompt_tokens=sample_args.max_prompt_tokens or (budget[0] if budget else None),
        resume=sample_args.resume,
        overwrite=sample_args.overwrite,
    )
    print(f"Wrote {len(dataset)} rows ({len(prompts)} prompts x {sample_args.num_responses} responses) to "
          f"{output_dir}; next: {PROG} train --model_name_or_path {model_args.model_name_or_path} --dataset "
          f"{output_dir} --output_dir CVAE_DIR")  # fmt: skip
    return dataset


# ---------------------------------------------------------------------------------------------------- train
def train_groups(data_args: DataArguments, train_args: TrainDataArguments, tokenizer, seed: int = 0):
    """The training groups `{prompt, responses[, label]}` of `--dataset`: flat rows grouped by `group_responses`, or,
    for unconditional text (every prompt empty), every row its own example (the density gap then aggregates over the
    batch, `dg_grouping="auto"`)."""
    from ..data import group_responses, is_unconditional, single_response_groups

    rows, dataset_format = rows_of(data_args, tokenizer)
    if "responses" not in rows.column_names and is_unconditional(rows):
        rows = single_response_groups(rows)
    elif "responses" not in rows.column_names:
        rows = group_responses(
            rows, train_args.group_size, seed, max_groups_per_prompt=train_args.max_groups_per_prompt
        )
    return _first(rows, data_args.max_samples), dataset_format


def run_train(model_args: ModelArguments, cvae_args: CVAEArguments, data_args: DataArguments,
              train_args: TrainDataArguments, training_args: CVAETrainingArguments) -> Path:  # fmt: skip
    """`cvae-llama train`: build (or continue) the CVAE, train it with `CVAETrainer` on the grouped one-to-many rows
    of `--dataset`, save it (LoRA merged) with its training record; returns `--output_dir`."""
    from ..trainer import CVAETrainer

    resume = _resolve_resume(training_args.resume_from_checkpoint, training_args.output_dir)
    _check_training_output(training_args.output_dir, train_args.overwrite, resume)
    tokenizer = load_tokenizer(model_args.model_name_or_path)
    groups, dataset_format = train_groups(data_args, train_args, tokenizer, training_args.seed)
    model = build_or_load_cvae(model_args.model_name_or_path, cvae_args.fields_given(), "--model_name_or_path",
                               **model_args.load_kwargs())  # fmt: skip
    trainer = CVAETrainer(model, training_args, train_dataset=groups, processing_class=tokenizer)
    if trainer.is_world_process_zero():
        model.print_parameter_breakdown()
    result = trainer.train(resume_from_checkpoint=resume)
    output_dir = Path(training_args.output_dir)
    record = training_record(trainer, groups, data_args.dataset, dataset_format, model_args.model_name_or_path,
                             result.metrics)  # fmt: skip
    save_trained_cvae(trainer, output_dir, record)
    if trainer.is_world_process_zero():
        print(
            f"Saved the CVAE to {output_dir}; next: {PROG} evaluate --model_name_or_path {output_dir} --dataset "
            "TEST_ONE_TO_MANY --output_dir REPORT_DIR"
        )
    return output_dir


# ---------------------------------------------------------------------------------------------------- generate
def _check_generate_flags(args: GenerateArguments) -> list[str]:
    """The latent source given (none: prior samples); `CommandLineError` for flags that do not go together."""
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
    check_non_negative_float(args.latent_temperature, "--latent_temperature")
    if not math.isfinite(args.control_strength):
        raise CommandLineError(f"--control_strength must be a finite number, got {args.control_strength}")
    for argument in ("save_latents", "output_file"):
        if getattr(args, argument):
            refuse_to_overwrite(getattr(args, argument), args.overwrite, f"--{argument}")
    return modes


def run_generate(model_args: ModelArguments, args: GenerateArguments) -> dict:
    """`cvae-llama generate`: decode `--prompt` from prior samples, a given latent, the posterior mean of a reference,
    an interpolation, each optionally shifted toward a label; prints and returns the texts and latents."""
    from ..evaluation.generation import interpolation_latents, posterior_of_texts
    from ..evaluation.utils import generate_texts, prior_latents
    from ..latent_space import label_index

    modes = _check_generate_flags(args)
    model, tokenizer = load_cvae(model_args.model_name_or_path, "--model_name_or_path", **model_args.load_kwargs())
    size = model.config.latent_size
    mode = modes[0] if modes else "prior"
    if mode == "latent":
        latents = read_latent(args.latent, size, "--latent")
        captions = [f"given latent {i + 1}" for i in range(len(latents))]
    elif mode == "reconstruct":
        latents, _ = posterior_of_texts(model, tokenizer, [args.prompt], [args.reconstruct])
        captions = ["posterior mean of the reference"]
    elif mode == "interpolate":
        means, _ = posterior_of_texts(model, tokenizer, [args.prompt] * 2, list(args.interpolate))
        t, latents = interpolation_latents(means[0], means[1], args.interpolation_steps)  # z = (1 - t) z_A + t z_B
        captions = [f"t = {value:.2f}" for value in t.tolist()]
    else:
        generator = torch.Generator().manual_seed(args.seed)
        latents = prior_latents(model, args.num_samples, args.latent_temperature, generator)
        captions = [f"z ~ N(0, {args.latent_temperature:g}^2 I) #{i + 1}" for i in range(args.num_samples)]
    if args.control_label is not None:
        directions, names = read_directions(args.directions, size, "--directions")
        index = label_index(names, args.control_label, "--control_label", "--directions")
        # latent-guided control, z + k * direction (Zhang et al., IEEE TAI 2026, latent-guided generation)
        latents = latents + args.control_strength * directions[index]
        captions = [
            f"{caption}, shifted toward {names[index]} (k = {args.control_strength:g})" for caption in captions
        ]

    torch.manual_seed(args.seed)
    decoding = {"do_sample": args.do_sample}
    if args.do_sample:
        decoding.update(temperature=args.temperature, top_p=args.top_p)
    texts = generate_texts(model, tokenizer, [args.prompt] * len(latents), latents, max_new_tokens=args.max_new_tokens,
                           max_prompt_tokens=args.max_prompt_tokens, **decoding)  # fmt: skip
    print(f"Prompt: {args.prompt!r}" if args.prompt else "Unconditional (no prompt)")
    for caption, text in zip(captions, texts, strict=True):
        print(f"[{caption}] {text}")
    result = {"prompt": args.prompt, "mode": mode, "captions": captions, "texts": texts, "latents": latents.tolist()}
    if args.save_latents:
        save_latents(args.save_latents, latents)
    if args.output_file:
        path = Path(args.output_file)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2, ensure_ascii=False))
    return result


# ---------------------------------------------------------------------------------------------------- evaluate
def run_evaluate(model_args: ModelArguments, data_args: DataArguments, args: EvaluateArguments) -> dict:
    """`cvae-llama evaluate`: the evaluation report of a saved CVAE (or of a plain causal LM, on the metrics that
    need no latent, from its samples) on `--dataset`, printed and written."""
    from ..evaluation import evaluation_report

    output_dir = Path(args.output_dir)
    if (output_dir / "results.json").exists() and not args.overwrite:
        raise CommandLineError(
            f"--output_dir {str(output_dir)!r} already holds a report; pass --overwrite to replace it"
        )
    model, tokenizer = load_cvae_or_causal_lm(
        model_args.model_name_or_path, "--model_name_or_path", **model_args.load_kwargs()
    )
    rows, _ = rows_of(data_args, tokenizer)
    base_model = None
    if args.base_model is not None:
        base_model, _ = load_causal_lm(args.base_model, "--base_model")
        base_model.eval()
    budgets = {name: getattr(args, name) for name in ("max_prompt_tokens", "max_response_tokens")}
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
        max_new_tokens=args.max_new_tokens,
        iw_samples=args.iw_samples,
        iw_prior_samples=args.iw_prior_samples,
        mc_samples=args.mc_samples,
        control_strength=args.control_strength,
        batch_size=args.batch_size,
        seed=args.seed,
        **{name: value for name, value in budgets.items() if value is not None},  # unset: evaluation_report's
    )
    print((output_dir / "results.md").read_text())
    print(f"Wrote the report to {output_dir}")
    return results


# ---------------------------------------------------------------------------------------------------- export
def run_export(model_args: ModelArguments, args: ExportArguments) -> Path:
    """`cvae-llama export`: `export_hub_folder` of `--model_name_or_path` into `--output_dir`, uploaded with
    `--push_to_hub`. Returns the folder."""
    source = Path(model_args.model_name_or_path).expanduser()
    output_dir = Path(args.output_dir)
    if source.exists() and output_dir.exists() and output_dir.resolve() == source.resolve():
        raise CommandLineError("--output_dir must differ from --model_name_or_path (export writes a new folder)")
    refuse_to_overwrite(output_dir, args.overwrite, "--output_dir")
    folder = export_hub_folder(
        model_args.model_name_or_path,
        output_dir,
        results=args.results,
        base_model=args.base_model,
        license=args.license,
        tags=args.tags,
        model_name=args.model_name,
        repo_id=args.repo_id or args.push_to_hub,
        training_data=args.training_data,
        overwrite=args.overwrite,
        standalone=True if args.standalone else None,
        **model_args.load_kwargs(),
    )
    print(f"Wrote the Hub-ready folder {folder}: " + ", ".join(sorted(path.name for path in folder.iterdir())))
    if args.push_to_hub:
        push_folder(folder, args.push_to_hub, args.private, argument="--push_to_hub")
        print(f"Pushed {folder} to https://huggingface.co/{args.push_to_hub}")
    return folder


# ---------------------------------------------------------------------------------------------------- explore
def run_explore(model_args: ModelArguments, args: ExploreArguments):
    """`cvae-llama explore`: `cvae_llama.app.launch_app` of `--model_name_or_path`, served until interrupted."""
    try:
        from ..app.gradio_app import launch_app
    except ModuleNotFoundError as error:
        if error.name != "gradio":
            raise
        raise ImportError("the explorer needs Gradio: pip install 'cvae-llama[app]'") from error

    if args.port is not None and not 0 < args.port < 65536:
        raise CommandLineError(f"--port must be in 1 .. 65535, got {args.port}")
    return launch_app(model_args.model_name_or_path, args.directions, args.host, args.port,
                      argument="--model_name_or_path", **model_args.load_kwargs())  # fmt: skip


# ---------------------------------------------------------------------------------------------------- demo
def run_demo_command(args: DemoArguments) -> dict:
    """`cvae-llama demo`: `cvae_llama.demo.run_demo` with the flags."""
    from ..demo import run_demo

    refuse_to_overwrite(args.output_dir, args.overwrite, "--output_dir")
    return run_demo(args.output_dir, quick=args.quick, overwrite=args.overwrite,
                    model_name_or_path=args.model_name_or_path, seed=args.seed, num_threads=args.num_threads)  # fmt: skip


__all__ = [
    "PROG",
    "CommandLineError",
    "run_demo_command",
    "run_evaluate",
    "run_explore",
    "run_export",
    "run_generate",
    "run_sample",
    "run_sft",
    "run_train",
    "train_groups",
]
