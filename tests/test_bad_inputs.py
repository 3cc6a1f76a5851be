"""The bad-input catalogue (issue 7): every bad input is refused with an exception of the expected type whose message
names the argument and the bad value, and no file of the input folder changes.

One table of cases across the config, loading, `forward`, `encode`, `generate`, the trainer (`CVAETrainingArguments`,
`CVAETrainer`), the data readers and the command line. Each case is a function of the input folder (a tiny CVAE,
a plain Llama and a GPT-2 with their tokenizer, damaged copies of the CVAE, data files) and of a fresh output
folder; it must raise `case.error` with every fragment of `case.fragments` in the message. Command-line cases run
`cvae_llama.cli.main` (or `python -m cvae_llama` in a subprocess) and must exit with `case.exit_code` after one line
`cvae-llama COMMAND: error: ...` on stderr, never a traceback.

A `config.json` without a CVAE field: every saved CVAE-Llama config records all the CVAE fields, so a missing one
means a hand-edited or foreign file, and its default (e.g. `latent_size=32`) could build another architecture than
the weights; when the shapes differ the load fails, but a missing `latent_injection` or `skip_connection` could
silently drop or re-initialise a module. So the config refuses it, naming the field (`CVAELlamaConfig.from_dict`);
a field present but edited (a config that does not fit its weights) is refused by the loader, naming the folder and
the config's CVAE fields.
"""

import contextlib
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import tiny_cvae_config, tiny_llama_config
from datasets import Dataset
from ddp_train import build_groups, build_model, build_tokenizer
from test_remote_code import saved_tiny_model, tiny_tokenizer
from transformers import GPT2Config, GPT2LMHeadModel, LlamaForCausalLM

from cvae_llama.cli import main
from cvae_llama.configuration_cvae_llama import CVAELlamaConfig
from cvae_llama.data import (
    OneToManyCollator,
    group_responses,
    load_dailydialog,
    load_prompt_response_file,
    load_yelp,
    make_one_to_many,
)
from cvae_llama.loading import pretrained_cvae
from cvae_llama.modeling_cvae_llama import CVAELlamaForCausalLM
from cvae_llama.trainer import CVAETrainer, CVAETrainingArguments


pytestmark = pytest.mark.usefixtures("one_thread")


REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------------- the inputs
@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """The input folder every case reads (and none may change)."""
    root = tmp_path_factory.mktemp("inputs")
    saved_tiny_model(root / "cvae")
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config()).save_pretrained(root / "llama")
    tiny_tokenizer().save_pretrained(root / "llama")
    GPT2LMHeadModel(GPT2Config(vocab_size=99, n_embd=32, n_layer=2, n_head=4, n_positions=64)).save_pretrained(
        root / "gpt2"
    )
    tiny_tokenizer().save_pretrained(root / "gpt2")

    def damaged_copy(name: str) -> Path:
        shutil.copytree(root / "cvae", root / name)
        return root / name

    weights = (damaged_copy("truncated") / "model.safetensors")
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    weights = damaged_copy("corrupted") / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[8:40] = b"\xff" * 32  # garbage in the JSON header
    weights.write_bytes(bytes(data))
    edits = {"no_latent_size": lambda c: c.pop("latent_size"), "edited": lambda c: c.update(latent_size=16)}
    for name, edit in edits.items():
        config_file = damaged_copy(name) / "config.json"
        config = json.loads(config_file.read_text())
        edit(config)
        config_file.write_text(json.dumps(config))

    rows = [{"prompt": f"w{5 + i}", "response": f"w{20 + i} w{30 + j}"} for i in range(2) for j in range(3)]
    (root / "pairs.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (root / "empty.jsonl").write_text("")
    (root / "malformed.jsonl").write_text('{"prompt": "w5", "response": \n')
    (root / "dailydialog").mkdir()
    (root / "dailydialog" / "train.zip").write_bytes(b"PK but not a zip archive")
    (root / "yelp").mkdir()
    (root / "yelp" / "sentiment.dev.0").write_text("\n  \n\n")
    return root


def folder_hash(folder: Path) -> dict[str, str]:
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
        for path in sorted(folder.rglob("*"))
    }


def ids(*rows) -> torch.Tensor:
    return torch.tensor(rows)


PROMPT = ids([5, 6, 7, 8, 9], [10, 11, 12, 13, 14])  # (2, 5)


def cvae(inputs: Path) -> CVAELlamaForCausalLM:
    return CVAELlamaForCausalLM.from_pretrained(inputs / "cvae").eval()


def training_args(output: Path, **overrides) -> CVAETrainingArguments:
    values = dict(
        output_dir=str(output), per_device_train_batch_size=1, max_steps=2, save_strategy="no", report_to="none",
        disable_tqdm=True, use_cpu=True, dg_samples=4, max_prompt_tokens=8, max_response_tokens=8,
    )  # fmt: skip
    values.update(overrides)
    return CVAETrainingArguments(**values)


def trainer(output: Path, dataset, model=None) -> CVAETrainer:
    tokenizer = build_tokenizer()
    model = build_model(tokenizer) if model is None else model
    return CVAETrainer(model, training_args(output), train_dataset=dataset, processing_class=tokenizer)


class CommandFailed(Exception):
    """A command line that exited with a non-zero status; `line` is its `cvae-llama ...: error:` line."""

    def __init__(self, code: int, stderr: str):
        assert "Traceback" not in stderr, stderr
        lines = [line for line in stderr.splitlines() if line.startswith("cvae-llama") and "error:" in line]
        assert len(lines) == 1, f"expected one error line, got:\n{stderr}"
        super().__init__(lines[0])
        self.code = code


def cli(*argv) -> None:
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
        code = main([str(argument) for argument in argv])
    if code != 0:
        raise CommandFailed(code, stderr.getvalue())


def cli_subprocess(*argv) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run([sys.executable, "-m", "cvae_llama", *map(str, argv)], capture_output=True, text=True,
                            timeout=300, env=env, cwd=REPO)  # fmt: skip
    if result.returncode != 0:
        assert result.stderr.strip().splitlines()[-1].startswith("cvae-llama"), result.stderr
        raise CommandFailed(result.returncode, result.stderr)


# ---------------------------------------------------------------------------------------------------- the table
@dataclass(frozen=True)
class Case:
    call: Callable[[Path, Path], object]  # (inputs, output folder)
    error: type[BaseException]
    fragments: tuple[str, ...]  # each must be in the message: the argument and the value, at least
    exit_code: int | None = None  # command-line cases


def train_flags(inputs: Path, output: Path, *flags) -> list:
    return ["train", "--model_name_or_path", inputs / "llama", "--dataset", inputs / "pairs.jsonl", "--output_dir",
            output / "trained", "--group_size", 2, "--max_steps", 1, "--report_to", "none", "--latent_size", 8,
            "--dg_samples", 4, *flags]  # fmt: skip


def generate_flags(model: Path, *flags) -> list:
    return ["generate", "--model_name_or_path", model, "--num_samples", 1, "--max_new_tokens", 2, *flags]


CASES = {
    # ---- config
    "config: latent_size not divisible by num_latent_queries": Case(
        lambda i, o: tiny_cvae_config(latent_size=12, num_latent_queries=8, posterior_pooling="queries"),
        ValueError, ("`latent_size` (12)", "`num_latent_queries` (8)"),
    ),
    "config: from_pretrained keyword out of range": Case(
        lambda i, o: CVAELlamaConfig.from_pretrained(i / "cvae", num_memory_slots=0),
        ValueError, ("`num_memory_slots`", "got 0"),
    ),
    "config: config.json without latent_size": Case(
        lambda i, o: CVAELlamaForCausalLM.from_pretrained(i / "no_latent_size"),
        ValueError, ("config.json", "['latent_size']"),
    ),
    "config: config.json of another model type (gpt2)": Case(
        lambda i, o: CVAELlamaConfig.from_pretrained(i / "gpt2"),
        ValueError, ("model_type 'gpt2'", "from_llm"),
    ),
    # ---- loading
    "load: a plain Llama folder where a CVAE is expected": Case(
        lambda i, o: CVAELlamaForCausalLM.from_pretrained(i / "llama"),
        ValueError, ("model_type 'llama'", "from_llm"),
    ),
    "load: config.json edited to another latent_size": Case(
        lambda i, o: pretrained_cvae(i / "edited"),
        ValueError, ("edited'", "latent_size=16", "do not have the shapes"),
    ),
    "load: truncated model.safetensors": Case(
        lambda i, o: pretrained_cvae(i / "truncated"),
        ValueError, ("truncated'", "truncated or corrupted"),
    ),
    "load: corrupted model.safetensors header": Case(
        lambda i, o: pretrained_cvae(i / "corrupted"),
        ValueError, ("corrupted'", "truncated or corrupted", "header"),
    ),
    "from_llm: a base model of another architecture (gpt2 folder)": Case(
        lambda i, o: CVAELlamaForCausalLM.from_llm(str(i / "gpt2")),
        ValueError, ("LlamaForCausalLM", "GPT2LMHeadModel", "'gpt2'"),
    ),
    "from_llm: a CVAE folder where a base LLM is expected": Case(
        lambda i, o: CVAELlamaForCausalLM.from_llm(str(i / "cvae")),
        ValueError, ("got CVAELlamaForCausalLM", "'cvae_llama'"),
    ),
    "from_llm: more encoder layers than the LLM has": Case(
        lambda i, o: CVAELlamaForCausalLM.from_llm(str(i / "llama"), num_encoder_layers=3),
        ValueError, ("`num_encoder_layers` (3)", "`num_hidden_layers` (2)"),
    ),
    # ---- forward
    "forward: float input_ids": Case(
        lambda i, o: cvae(i)(PROMPT.float()), ValueError, ("input_ids", "torch.float32"),
    ),
    "forward: 1-D input_ids": Case(lambda i, o: cvae(i)(PROMPT[0]), ValueError, ("input_ids", "(5,)")),
    "forward: empty sequence": Case(lambda i, o: cvae(i)(PROMPT[:, :0]), ValueError, ("input_ids", "(2, 0)")),
    "forward: token id outside the vocabulary": Case(
        lambda i, o: cvae(i)(PROMPT.index_fill(1, torch.tensor([2]), 99)),
        ValueError, ("input_ids[0, 2] = 99", "99 tokens"),
    ),
    "forward: labels (-100) passed as input_ids": Case(
        lambda i, o: cvae(i)(PROMPT.index_fill(1, torch.tensor([0]), -100)),
        ValueError, ("input_ids[0, 0] = -100",),
    ),
    "forward: labels of another shape": Case(
        lambda i, o: cvae(i)(PROMPT, labels=PROMPT[:, :3]), ValueError, ("labels", "(2, 3)", "(2, 5)"),
    ),
    "forward: attention_mask of another shape": Case(
        lambda i, o: cvae(i)(PROMPT, attention_mask=torch.ones(2, 4, dtype=torch.long)),
        ValueError, ("attention_mask", "(2, 4)", "(2, 5)"),
    ),
    "forward: integer latent": Case(
        lambda i, o: cvae(i)(PROMPT, latent=torch.zeros(2, 8, dtype=torch.long)),
        ValueError, ("latent", "torch.int64"),
    ),
    "forward: float posterior_input_ids": Case(
        lambda i, o: cvae(i)(PROMPT, posterior_input_ids=PROMPT.float()),
        ValueError, ("posterior_input_ids", "torch.float32"),
    ),
    # ---- encode
    "encode: empty batch": Case(lambda i, o: cvae(i).encode(PROMPT[:0]), ValueError, ("input_ids", "(0, 5)")),
    "encode: a list instead of a tensor": Case(
        lambda i, o: cvae(i).encode([[5, 6, 7]]), ValueError, ("input_ids", "got list"),
    ),
    "encode: token id outside the vocabulary": Case(
        lambda i, o: cvae(i).encode(ids([5, 500])), ValueError, ("input_ids[0, 1] = 500",),
    ),
    # ---- generate
    "generate: latent with inf": Case(
        lambda i, o: cvae(i).generate(PROMPT, latent=torch.full((2, 8), float("inf")), max_new_tokens=2),
        ValueError, ("latent", "inf"),
    ),
    "generate: negative latent_temperature": Case(
        lambda i, o: cvae(i).generate(PROMPT, latent_temperature=-1.0, max_new_tokens=2),
        ValueError, ("latent_temperature", "-1.0"),
    ),
    "generate: num_return_sequences=0": Case(
        lambda i, o: cvae(i).generate(PROMPT, num_return_sequences=0, max_new_tokens=2),
        ValueError, ("num_return_sequences", "got 0"),
    ),
    "generate: empty prompt": Case(
        lambda i, o: cvae(i).generate(PROMPT[:, :0], max_new_tokens=2), ValueError, ("inputs", "(2, 0)"),
    ),
    # ---- trainer
    "trainer args: learning_rate nan": Case(
        lambda i, o: training_args(o, learning_rate=float("nan")), ValueError, ("learning_rate", "nan"),
    ),
    "trainer args: per_device_train_batch_size 0": Case(
        lambda i, o: training_args(o, per_device_train_batch_size=0),
        ValueError, ("per_device_train_batch_size", "0"),
    ),
    "trainer args: gradient_accumulation_steps 0": Case(
        lambda i, o: training_args(o, gradient_accumulation_steps=0),
        ValueError, ("gradient_accumulation_steps", "0"),
    ),
    "trainer args: cycle_ramp_end above 1": Case(
        lambda i, o: training_args(o, cycle_ramp_end=1.5), ValueError, ("cycle_ramp_end", "1.5"),
    ),
    "trainer: a plain Llama model": Case(
        lambda i, o: trainer(o, build_groups(), model=LlamaForCausalLM(tiny_llama_config())),
        ValueError, ("model must be a CVAELlamaForCausalLM", "LlamaForCausalLM"),
    ),
    "trainer: responses column of strings, not lists": Case(
        lambda i, o: trainer(o, Dataset.from_dict({"prompt": ["the cat"], "responses": ["a dog ran"]})),
        ValueError, ("responses", "list"),
    ),
    "trainer: empty response strings": Case(
        lambda i, o: trainer(o, Dataset.from_dict({"prompt": ["the cat"], "responses": [["", ""]]})),
        ValueError, ("response ''",),
    ),
    "trainer: tokenizer larger than the model's vocabulary": Case(
        lambda i, o: trainer(o, build_groups(), model=CVAELlamaForCausalLM(
            tiny_cvae_config(dict(vocab_size=20)))).train(),
        ValueError, ("input_ids", "20 tokens"),
    ),  # fmt: skip
    # ---- data
    "data: empty .jsonl file": Case(
        lambda i, o: load_prompt_response_file(i / "empty.jsonl"), ValueError, ("empty.jsonl", "0 bytes"),
    ),
    "data: malformed .jsonl file": Case(
        lambda i, o: load_prompt_response_file(i / "malformed.jsonl"), ValueError, ("malformed.jsonl", "JSON"),
    ),
    "data: group_size=True": Case(
        lambda i, o: group_responses(load_prompt_response_file(i / "pairs.jsonl"), True),
        ValueError, ("group_size=True",),
    ),
    "data: fractional max_response_tokens": Case(
        lambda i, o: OneToManyCollator(build_tokenizer(), 8, 2.5), ValueError, ("max_response_tokens=2.5",),
    ),
    "data: a DailyDialog .zip that is no zip": Case(
        lambda i, o: load_dailydialog(i / "dailydialog"), ValueError, ("train.zip", "not a zip archive"),
    ),
    "data: Yelp files of blank lines": Case(lambda i, o: load_yelp(i / "yelp"), ValueError, ("yelp'", "no text")),
    "data: top_p above 1 for sampling": Case(
        lambda i, o: make_one_to_many(LlamaForCausalLM(tiny_llama_config()), tiny_tokenizer(), ["w5"], 2,
                                      o / "sampled", max_new_tokens=2, top_p=2.0),
        ValueError, ("top_p=2.0",),
    ),  # fmt: skip
    # ---- command line
    "cli: generate from a truncated model.safetensors": Case(
        lambda i, o: cli(*generate_flags(i / "truncated")),
        CommandFailed, ("truncated'", "truncated or corrupted"), exit_code=1,
    ),
    "cli: generate from a config.json without latent_size": Case(
        lambda i, o: cli(*generate_flags(i / "no_latent_size")),
        CommandFailed, ("config.json", "['latent_size']"), exit_code=1,
    ),
    "cli: generate with a negative --latent_temperature": Case(
        lambda i, o: cli(*generate_flags(i / "cvae", "--latent_temperature", -1)),
        CommandFailed, ("--latent_temperature", "-1"), exit_code=1,
    ),
    "cli: generate with --num_samples 0": Case(
        lambda i, o: cli(*generate_flags(i / "cvae", "--num_samples", 0)),
        CommandFailed, ("--num_samples", "got 0"), exit_code=1,
    ),
    "cli: generate with a negative --max_prompt_tokens": Case(
        lambda i, o: cli(*generate_flags(i / "cvae", "--prompt", "w5 w6", "--max_prompt_tokens", -1)),
        CommandFailed, ("--max_prompt_tokens", "-1"), exit_code=1,
    ),
    "cli: generate with an infinite --control_strength": Case(
        lambda i, o: cli(*generate_flags(i / "cvae", "--control_label", "0", "--control_strength", "inf",
                                         "--directions", json.dumps([[0.0] * 8, [1.0] * 8]))),
        CommandFailed, ("--control_strength", "inf"), exit_code=1,
    ),  # fmt: skip
    "cli: unknown option (a train flag given to generate)": Case(
        lambda i, o: cli(*generate_flags(i / "cvae", "--latent_size", 8)),
        CommandFailed, ("--latent_size",), exit_code=2,
    ),
    "cli: train around a GPT-2": Case(
        lambda i, o: cli(*train_flags(i, o)[:2], i / "gpt2", *train_flags(i, o)[3:]),
        CommandFailed, ("--model_name_or_path", "'gpt2'"), exit_code=1,
    ),
    "cli: train on an empty dataset file": Case(
        lambda i, o: cli(*train_flags(i, o)[:4], i / "empty.jsonl", *train_flags(i, o)[5:]),
        CommandFailed, ("empty.jsonl", "0 bytes"), exit_code=1,
    ),
    "cli: train with --learning_rate nan": Case(
        lambda i, o: cli(*train_flags(i, o, "--learning_rate", "nan")),
        CommandFailed, ("learning_rate", "nan"), exit_code=2,
    ),
    "cli: train resuming from a folder that is no complete checkpoint": Case(
        lambda i, o: cli(*train_flags(i, o, "--resume_from_checkpoint", i / "truncated")),
        CommandFailed, ("truncated'", "checkpoint"), exit_code=1,
    ),
    "cli: python -m cvae_llama export of a truncated model": Case(
        lambda i, o: cli_subprocess("export", "--model_name_or_path", i / "truncated", "--output_dir", o / "hub"),
        CommandFailed, ("truncated'", "truncated or corrupted"), exit_code=1,
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_refused_clearly_and_changes_no_file(inputs, tmp_path, name):
    case = CASES[name]
    before = folder_hash(inputs)
    with pytest.raises(case.error) as raised:
        case.call(inputs, tmp_path)
    message = str(raised.value)
    missing = [fragment for fragment in case.fragments if fragment not in message]
    assert not missing, f"the message lacks {missing}: {message}"
    if case.exit_code is not None:
        assert raised.value.code == case.exit_code, message
    assert folder_hash(inputs) == before, "a bad input changed the input folder"


def test_the_catalogue_covers_every_part_with_at_least_25_cases():
    parts = {name.split(":")[0].split(" ")[0] for name in CASES}
    assert {"config", "load", "forward", "encode", "generate", "trainer", "data", "cli"} <= parts
    assert len(CASES) >= 25
