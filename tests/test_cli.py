"""The `cvae-llama` command line on a tiny seeded Llama, its CVAE and a few rows: every subcommand, its `--help`,
resuming `train`, `generate` with every latent source, `export` to a folder that loads by repo id from a Hub-layout
cache without cvae_llama, and bad input that ends in one clear line and a non-zero exit."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama_config
from safetensors.torch import load_file, save_file
from test_remote_code import (
    assert_same_as_local,
    lay_out_as_the_hub,
    run_without_cvae_llama,
    saved_tiny_model,
    tiny_tokenizer,
)
from transformers import LlamaForCausalLM

from cvae_llama.cli import COMMANDS, build_parser, main
from cvae_llama.latent_io import read_latent
from cvae_llama.loading import detect_dataset_format, load_rows, load_tokenizer
from cvae_llama.modeling_cvae_llama import CVAELlamaForCausalLM


REPO = Path(__file__).resolve().parents[1]
# the tiny models' training flags: fast, logged every step, no report_to integrations
TRAIN_FLAGS = ["--report_to", "none", "--logging_steps", "1", "--per_device_train_batch_size", "2",
               "--learning_rate", "1e-2", "--dg_samples", "4", "--max_prompt_tokens", "8", "--max_response_tokens", "8",
               "--gskip_samples", "4", "--latent_size", "8"]  # fmt: skip


def run(*argv) -> int:
    return main([str(arg) for arg in argv])


def error_line(capsys) -> str:
    """The single `cvae-llama ...: error: ...` line on stderr (logging may add other lines, never a traceback)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("cvae-llama") and "error:" in line]
    assert len(lines) == 1, err
    return lines[0]


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


# ---------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A tiny Llama LM with its tokenizer (`llm/`), prompt / response pairs (`pairs.jsonl`), and a tiny CVAE with a
    non-trivial posterior and a strong latent memory (`cvae/`)."""
    root = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config()).save_pretrained(root / "llm")
    tiny_tokenizer().save_pretrained(root / "llm")
    rows = [
        {"prompt": f"w{5 + i} w{6 + i}", "response": f"w{20 + i} w{30 + j} w{40 + i + j}", "label": i % 2}
        for i in range(4)
        for j in range(3)
    ]
    (root / "pairs.jsonl").write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    model = saved_tiny_model(root / "cvae")
    with torch.no_grad():  # a latent memory strong enough that different latents write different greedy texts
        for layer in model.latent_memory.layers:
            layer.to_states[-1].weight.mul_(50.0)
    model.save_pretrained(root / "cvae")
    return root


@pytest.fixture(scope="module")
def one_to_many(workspace) -> Path:
    """`cvae-llama sample`: 4 prompts x 4 responses from the tiny LM."""
    output = workspace / "one_to_many"
    assert run("sample", "--model_name_or_path", workspace / "llm", "--dataset", workspace / "pairs.jsonl",
               "--output_dir", output, "--num_responses", 4, "--max_new_tokens", 4, "--batch_size", 2) == 0
    return output


@pytest.fixture(scope="module")
def trained(workspace, one_to_many) -> Path:
    """`cvae-llama train`: 4 steps of DG + G-Skip around the tiny LM, checkpoints at steps 2 and 4."""
    output = workspace / "trained"
    assert run("train", "--model_name_or_path", workspace / "llm", "--dataset", one_to_many, "--output_dir", output,
               "--group_size", 4, "--max_steps", 4, "--save_steps", 2, "--seed", 0, *TRAIN_FLAGS) == 0
    return output


# ---------------------------------------------------------------------------------------------------- help
def test_overview_lists_every_step(capsys):
    assert run("--help") == 0
    out = capsys.readouterr().out
    for name in ("sft", "sample", "train", "evaluate", "generate", "export", "demo"):
        assert f"  {name} " in out
    assert "accelerate launch -m cvae_llama train" in out
    assert run() == 2  # no command: the overview, and a usage error


@pytest.mark.parametrize(
    "command, flags",
    [
        ("sft", ["--model_name_or_path", "--dataset", "--learning_rate", "--max_prompt_tokens", "--overwrite"]),
        ("sample", ["--num_responses", "--temperature", "--top_p", "--output_dir", "--resume"]),
        ("train", ["--objective", "--skip_connection", "--decoder_mode", "--latent_size", "--num_memory_slots",
                   "--dg_samples", "--kl_weight", "--group_size", "--resume_from_checkpoint", "--learning_rate",
                   "--deepspeed", "--fsdp", "--lora_r"]),
        ("evaluate", ["--metrics", "--num_latents", "--base_model", "--output_dir"]),
        ("generate", ["--latent", "--reconstruct", "--interpolate", "--control_label", "--directions",
                      "--latent_temperature", "--save_latents"]),
        ("export", ["--results", "--base_model", "--license", "--tags", "--push_to_hub"]),
        ("demo", ["--quick", "--output_dir", "--overwrite"]),
    ],
)  # fmt: skip
def test_each_command_explains_its_step_and_flags(capsys, command, flags):
    assert run(command, "--help") == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: cvae-llama {command}")
    assert COMMANDS[command].description.split(".")[0].split()[0] in out  # the step's explanation
    for flag in flags:
        assert flag in out, flag
    assert "example:" in out


def test_the_cvae_flags_are_the_config_fields():
    """`train`'s CVAE flags come from `CVAELlamaConfig`: its fields, types, allowed values and documented help."""
    import dataclasses

    from cvae_llama.cli.arguments import CVAEArguments, documented_arguments
    from cvae_llama.configuration_cvae_llama import CVAE_FIELD_CHOICES, CVAE_FIELDS, CVAELlamaConfig

    flags = {flag.name: flag for flag in dataclasses.fields(CVAEArguments)}
    assert tuple(flags) == CVAE_FIELDS
    documented = documented_arguments(CVAELlamaConfig)
    for name, flag in flags.items():
        assert flag.default is None  # unset: the config's default
        assert flag.metadata["help"].startswith(documented[name]) and len(documented[name]) > 20, name
        assert flag.metadata.get("choices") == (list(CVAE_FIELD_CHOICES[name]) if name in CVAE_FIELD_CHOICES else None)
    assert "stage 2" in flags["decoder_mode"].metadata["help"]  # frozen is the authors' stage 2, not their command
    parser = build_parser("train")
    parsed = parser.parse_args_into_dataclasses(
        ["--model_name_or_path", "m", "--dataset", "d", "--output_dir", "o", "--decoder_mode", "lora",
         "--posterior_batch_norm", "false", "--latent_size", "16"]
    )  # fmt: skip
    (cvae_args,) = [args for args in parsed if isinstance(args, CVAEArguments)]
    assert cvae_args.fields_given() == {"latent_size": 16, "decoder_mode": "lora", "posterior_batch_norm": False}


def test_no_library_module_imports_the_command_line():
    """The library (the demo included) never imports `cvae_llama.cli`; the command line imports the library."""
    code = (
        "import sys, cvae_llama.demo, cvae_llama.export, cvae_llama.loading, cvae_llama.latent_io, cvae_llama.sft; "
        "print(sorted(name for name in sys.modules if name.startswith('cvae_llama.cli')))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"


@pytest.mark.slow
def test_console_script_and_python_m():
    script = shutil.which("cvae-llama")
    assert script is not None, "the console script cvae-llama is not installed (pip install -e .)"
    result = subprocess.run([script, "--version"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.startswith("cvae-llama ")
    result = subprocess.run([sys.executable, "-m", "cvae_llama", "generate", "--help"], capture_output=True,
                            text=True, timeout=120, cwd=REPO)
    assert result.returncode == 0 and "--latent" in result.stdout


# ---------------------------------------------------------------------------------------------------- sft, sample
def test_sft_fine_tunes_the_base_lm(workspace, tmp_path):
    output = tmp_path / "sft"
    assert run("sft", "--model_name_or_path", workspace / "llm", "--dataset", workspace / "pairs.jsonl",
               "--output_dir", output, "--max_steps", 3, "--learning_rate", 1e-2, "--report_to", "none",
               "--per_device_train_batch_size", 4, "--save_strategy", "no") == 0
    before, after = weights(workspace / "llm"), weights(output)
    assert type(LlamaForCausalLM.from_pretrained(output)) is LlamaForCausalLM
    assert any(not torch.equal(before[name], after[name]) for name in before)
    assert (output / "tokenizer.json").is_file()


def test_sample_writes_one_to_many_rows_and_keeps_labels(one_to_many, workspace, capsys):
    from datasets import load_from_disk

    rows = load_from_disk(str(one_to_many))
    assert len(rows) == 16 and set(rows.column_names) >= {"prompt", "response", "prompt_id", "label"}
    assert sorted(rows["prompt_id"]) == sorted([i for i in range(4) for _ in range(4)])
    assert rows.filter(lambda row: row["prompt"] == "w6 w7")["label"] == [1] * 4
    # a finished dataset is not overwritten without --overwrite
    argv = ("sample", "--model_name_or_path", workspace / "llm", "--dataset", workspace / "pairs.jsonl",
            "--output_dir", one_to_many, "--num_responses", 4, "--max_new_tokens", 4)
    capsys.readouterr()
    assert run(*argv) == 1
    assert "overwrite" in error_line(capsys)


# ---------------------------------------------------------------------------------------------------- train
def test_train_builds_trains_and_records(trained, workspace):
    config = json.loads((trained / "config.json").read_text())
    assert config["model_type"] == "cvae_llama" and config["latent_size"] == 8
    assert {"configuration_cvae_llama.py", "modeling_cvae_llama.py", "tokenizer.json"} <= {
        path.name for path in trained.iterdir()
    }
    record = json.loads((trained / "cvae_training.json").read_text())
    assert record["training_arguments"]["objective"] == "dg" and record["global_step"] == 4
    assert record["num_groups"] == 4 and record["responses_per_group"] == 4
    for term in ("reconstruction_loss", "kl", "dg", "mutual_info", "active_units"):
        assert term in record["final_log"]
    model = CVAELlamaForCausalLM.from_pretrained(trained)
    llm = weights(workspace / "llm")
    trained_weights = model.state_dict()
    assert torch.equal(trained_weights["model.layers.0.mlp.up_proj.weight"], llm["model.layers.0.mlp.up_proj.weight"])
    assert not torch.equal(model.encoder.to_latent_mean_logvar[-1].weight, torch.zeros_like(
        model.encoder.to_latent_mean_logvar[-1].weight))  # the read-out left its zero initialisation


def test_train_resumes_to_the_same_weights(trained, one_to_many, workspace, tmp_path, capsys):
    interrupted = tmp_path / "interrupted"
    interrupted.mkdir()
    shutil.copytree(trained / "checkpoint-2", interrupted / "checkpoint-2")
    argv = ["train", "--model_name_or_path", workspace / "llm", "--dataset", one_to_many, "--output_dir", interrupted,
            "--group_size", 4, "--max_steps", 4, "--save_steps", 2, "--seed", 0, *TRAIN_FLAGS]
    capsys.readouterr()
    assert run(*argv) == 1  # a non-empty output_dir is neither resumed nor overwritten unless asked
    assert "--resume_from_checkpoint last" in error_line(capsys)
    assert run(*argv, "--resume_from_checkpoint", "last") == 0
    expected, resumed = weights(trained), weights(interrupted)
    assert expected.keys() == resumed.keys()
    assert all(torch.equal(expected[name], resumed[name]) for name in expected)


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--objective", "kl", "--kl_weight", "0.5", "--skip_connection", "skip", "--decoder_mode", "full"],
         {"skip_connection": "skip", "decoder_mode": "full"}),
        (["--objective", "bow", "--decoder_mode", "lora", "--lora_r", "2", "--num_memory_slots", "2"],
         {"decoder_mode": "lora", "num_memory_slots": 2}),
        # QLoRA: the LLM's linear layers in 4 bits (the saved adapter records it, and reloads the base so)
        (["--quantization", "4bit", "--decoder_mode", "lora", "--lora_r", "2"],
         {"decoder_mode": "lora", "base_model_quantization_config": {"load_in_4bit": True}}),
    ],
)  # fmt: skip
def test_train_with_other_objectives_and_architectures(one_to_many, workspace, tmp_path, flags, expected):
    output = tmp_path / "cvae"
    assert run("train", "--model_name_or_path", workspace / "llm", "--dataset", one_to_many, "--output_dir", output,
               "--group_size", 2, "--max_steps", 2, "--save_strategy", "no", *TRAIN_FLAGS, *flags) == 0
    config = json.loads((output / "config.json").read_text())
    assert {key: config[key] for key in expected} == {
        key: value if not isinstance(value, dict) else {**config[key], **value} for key, value in expected.items()
    }
    saved = weights(output)
    assert not any("bow_head" in name or "modules_to_save" in name or "base_layer" in name for name in saved)
    # around a saved LLM: an adapter (LoRA's weights unmerged in it), the whole model when the decoder trains
    lora = [name for name in saved if ".lora_" in name]
    assert bool(lora) == (expected["decoder_mode"] == "lora") and all(name.startswith("model.") for name in lora)
    assert config["saved_as"] == ("standalone" if expected["decoder_mode"] == "full" else "adapter")
    loaded = CVAELlamaForCausalLM.from_pretrained(output)
    assert type(loaded) is CVAELlamaForCausalLM
    assert getattr(loaded, "is_loaded_in_4bit", False) == ("--quantization" in flags)


@pytest.mark.parametrize("source", ["lines", "text_column"])
def test_train_on_unconditional_text_makes_every_line_its_own_example(workspace, tmp_path, source):
    """A plain VAE over texts: a file of lines (or a table with a `text` column) trains with every text its own
    example and the density gap over the batch, not as one group of 16 texts of one empty prompt."""
    texts = [f"w{10 + i} w{20 + i % 5} w{30 + i % 7}" for i in range(12)]
    if source == "lines":
        data = tmp_path / "texts.txt"
        data.write_text("\n".join(texts) + "\n\n")  # a blank line is skipped
    else:
        data = tmp_path / "texts.jsonl"
        data.write_text("\n".join(json.dumps({"text": text}) for text in texts) + "\n")
    output = tmp_path / "cvae"
    assert run("train", "--model_name_or_path", workspace / "llm", "--dataset", data, "--output_dir", output,
               "--max_steps", 3, "--save_strategy", "no", *TRAIN_FLAGS, "--per_device_train_batch_size", 4) == 0
    record = json.loads((output / "cvae_training.json").read_text())
    assert record["num_groups"] == 12 and record["responses_per_group"] == 1
    assert record["training_arguments"]["dg_grouping"] == "batch"
    assert record["training_arguments"]["objective"] == "dg"


@pytest.mark.slow
def test_train_under_accelerate_launch(one_to_many, workspace, tmp_path):
    """`accelerate launch -m cvae_llama train ...` with 2 processes on the CPU (accelerate's multi-process launcher,
    torch.distributed over gloo)."""
    output = tmp_path / "ddp"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "cvae_llama", "train",
               "--model_name_or_path", str(workspace / "llm"), "--dataset", str(one_to_many), "--output_dir",
               str(output), "--group_size", "4", "--max_steps", "2", "--save_strategy", "no", "--use_cpu", "true",
               *TRAIN_FLAGS, "--per_device_train_batch_size", "1"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((output / "cvae_training.json").read_text())
    assert record["world_size"] == 2 and record["global_step"] == 2
    assert type(CVAELlamaForCausalLM.from_pretrained(output)) is CVAELlamaForCausalLM


# ---------------------------------------------------------------------------------------------------- generate
def generate(capsys, model: Path, *flags) -> dict:
    """Run `cvae-llama generate` and return what it writes with --output_file."""
    output = model.parent / f"generated-{abs(hash(flags))}.json"
    output.unlink(missing_ok=True)
    capsys.readouterr()
    assert run("generate", "--model_name_or_path", model, "--max_new_tokens", 5, "--output_file", output, *flags) == 0
    printed = capsys.readouterr().out
    result = json.loads(output.read_text())
    for text in result["texts"]:
        assert text in printed
    return result


def test_generate_from_the_prior_and_from_saved_latents(workspace, capsys, tmp_path):
    model = workspace / "cvae"
    prior = generate(capsys, model, "--prompt", "w5 w6", "--num_samples", 3, "--save_latents", tmp_path / "z.safetensors")
    assert prior["mode"] == "prior" and len(prior["texts"]) == 3
    assert len(set(prior["texts"])) > 1  # different latents, different greedy texts
    saved = load_file(str(tmp_path / "z.safetensors"))["latent"]
    assert saved.shape == (3, 8) and torch.allclose(saved, torch.tensor(prior["latents"]))
    again = generate(capsys, model, "--prompt", "w5 w6", "--num_samples", 3)
    assert again["texts"] == prior["texts"]  # seeded

    # each latent source decodes the same latent to the same text
    torch.save(saved.clone(), tmp_path / "z.pt")
    (tmp_path / "z.json").write_text(json.dumps({"latent": saved.tolist()}))
    for source in (tmp_path / "z.safetensors", tmp_path / "z.pt", tmp_path / "z.json", json.dumps(saved.tolist())):
        given = generate(capsys, model, "--prompt", "w5 w6", "--latent", str(source))
        assert given["mode"] == "latent" and given["texts"] == prior["texts"], source
    single = generate(capsys, model, "--prompt", "w5 w6", "--latent", json.dumps(saved[1].tolist()))
    assert single["texts"] == [prior["texts"][1]]


def test_generate_reconstruction_interpolation_and_control(workspace, capsys, tmp_path):
    model = workspace / "cvae"
    text_a, text_b = "w20 w30 w40 w41", "w70 w71 w90 w91"
    reconstruction = generate(capsys, model, "--prompt", "w5", "--reconstruct", text_a)
    assert reconstruction["mode"] == "reconstruct" and len(reconstruction["texts"]) == 1
    path = generate(capsys, model, "--prompt", "w5", "--interpolate", text_a, text_b, "--interpolation_steps", 3)
    assert [caption.split(" = ")[1] for caption in path["captions"]] == ["0.00", "0.50", "1.00"]
    assert path["texts"][0] == reconstruction["texts"][0]  # t = 0 is the posterior mean of A
    # (encoded in a batch of two instead of one: equal up to float rounding)
    torch.testing.assert_close(torch.tensor(path["latents"][0]), torch.tensor(reconstruction["latents"][0]))
    middle = torch.tensor(path["latents"][1])
    torch.testing.assert_close(middle, (torch.tensor(path["latents"][0]) + torch.tensor(path["latents"][2])) / 2)

    # control: z + k * direction of the label, from a directions file
    directions = torch.nn.functional.normalize(torch.randn(2, 8, generator=torch.Generator().manual_seed(1)), dim=-1)
    torch.save(directions, tmp_path / "directions.pt")
    controlled = generate(capsys, model, "--prompt", "w5", "--reconstruct", text_a, "--control_label", "1",
                          "--directions", tmp_path / "directions.pt", "--control_strength", 4)
    expected = torch.tensor(reconstruction["latents"][0]) + 4 * directions[1]
    torch.testing.assert_close(torch.tensor(controlled["latents"][0]), expected)
    by_latent = generate(capsys, model, "--prompt", "w5", "--latent", json.dumps(expected.tolist()))
    assert controlled["texts"] == by_latent["texts"]


# ---------------------------------------------------------------------------------------------------- evaluate, export
@pytest.fixture(scope="module")
def report(trained, one_to_many) -> Path:
    output = trained.parent / "report"
    assert run("evaluate", "--model_name_or_path", trained, "--dataset", one_to_many, "--output_dir", output,
               "--metrics", "latent", "diversity", "reconstruction", "interpolation", "control", "--num_latents", 2,
               "--max_new_tokens", 4, "--max_prompt_tokens", 8, "--max_response_tokens", 8) == 0
    return output


def test_evaluate_writes_the_report(report, trained, one_to_many, capsys):
    results = json.loads((report / "results.json").read_text())
    assert {"latent", "diversity", "reconstruction", "interpolation", "control"} <= results.keys()
    for name in ("results.md", "samples.json", "latent_space.png", "kl_per_dimension.png", "interpolation.png"):
        assert (report / name).is_file(), name
    assert len(results["control"]["directions"]) == 2  # labels 0 and 1: what generate --directions reads
    capsys.readouterr()
    assert run("evaluate", "--model_name_or_path", trained, "--dataset", one_to_many, "--output_dir", report,
               "--metrics", "latent") == 1
    assert "--overwrite" in error_line(capsys)


def test_generate_controls_with_the_reports_directions(report, trained, capsys):
    result = generate(capsys, trained, "--prompt", "w5 w6", "--num_samples", 2, "--control_label", "0",
                      "--directions", report / "results.json")
    assert all("shifted toward 0" in caption for caption in result["captions"])


def test_export_writes_a_hub_repo_with_a_card(trained, report, tmp_path, capsys):
    from huggingface_hub import ModelCard

    output = tmp_path / "exported"
    assert run("export", "--model_name_or_path", trained, "--results", report / "results.json", "--output_dir",
               output, "--base_model", "HuggingFaceTB/SmolLM2-135M-Instruct", "--tags", "demo-tag") == 0
    files = {path.name for path in output.iterdir()}
    assert {"README.md", "config.json", "configuration_cvae_llama.py", "modeling_cvae_llama.py", "model.safetensors",
            "generation_config.json", "tokenizer.json", "tokenizer_config.json", "cvae_training.json"} <= files
    assert {"results.json", "results.md", "latent_space.png", "interpolation.png"} <= {
        path.name for path in (output / "evaluation").iterdir()
    }
    card = ModelCard.load(output / "README.md")
    assert card.data.library_name == "transformers"
    assert card.data.pipeline_tag == "text-generation"
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    # trained around a saved LLM, the CVAE is exported as an adapter on it, which the card's metadata says
    assert json.loads((output / "config.json").read_text())["saved_as"] == "adapter"
    assert card.data.to_dict()["base_model_relation"] == "adapter"
    assert card.data.license == "apache-2.0"
    assert {"cvae-llama", "demo-tag"} <= set(card.data.tags)
    results = json.loads((report / "results.json").read_text())
    assert "Latent quality" in card.text and "evaluation/latent_space.png" in card.text
    assert f"{results['latent']['kl']:.4g}" in card.text  # the report's numbers
    assert "density gap" in card.text and "4 optimizer steps" in card.text  # the training record
    assert "local_files_only" not in (output / "tokenizer_config.json").read_text()
    # the folder is not replaced without --overwrite
    capsys.readouterr()
    assert run("export", "--model_name_or_path", trained, "--output_dir", output) == 1
    assert "--overwrite" in error_line(capsys)
    assert run("export", "--model_name_or_path", trained, "--output_dir", output, "--overwrite") == 0
    assert not (output / "evaluation").exists()  # replaced, not merged
    assert run("export", "--model_name_or_path", trained, "--output_dir", output, "--overwrite", "--standalone") == 0
    assert json.loads((output / "config.json").read_text())["saved_as"] == "standalone"
    assert "base_model_relation" not in (output / "README.md").read_text()


def test_exported_folder_loads_by_repo_id_from_a_hub_cache_offline(workspace, tmp_path):
    output = tmp_path / "exported"
    assert run("export", "--model_name_or_path", workspace / "cvae", "--output_dir", output) == 0
    cache = tmp_path / "hub"
    lay_out_as_the_hub(output, cache, "cvae-org/exported-tiny")
    report, outputs = run_without_cvae_llama(tmp_path, "cvae-org/exported-tiny", {"HF_HUB_CACHE": str(cache)})
    assert_same_as_local(CVAELlamaForCausalLM.from_pretrained(workspace / "cvae").eval(), report, outputs)


def test_push_to_hub_offline_is_a_clear_error_after_writing_the_folder(workspace, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    output = tmp_path / "exported"
    capsys.readouterr()
    assert run("export", "--model_name_or_path", workspace / "cvae", "--output_dir", output, "--push_to_hub",
               "cvae-org/tiny") == 1
    assert "--push_to_hub 'cvae-org/tiny': the upload failed" in error_line(capsys)
    assert (output / "model.safetensors").is_file() and (output / "README.md").is_file()


# ---------------------------------------------------------------------------------------------------- data formats
def test_dataset_formats_are_told_from_the_path(shared_data, workspace, one_to_many, tmp_path):
    (tmp_path / "pairs.csv").write_text("prompt,response\nw5,w6 w7\n")
    (tmp_path / "pairs.parquet").touch()
    cases = {
        shared_data / "yelp": "yelp",
        shared_data / "yelp" / "sentiment.dev.1": "yelp",
        shared_data / "agnews": "agnews",
        shared_data / "agnews" / "test.csv": "agnews",
        shared_data / "dailydialog": "dailydialog",
        shared_data / "dailydialog" / "validation.zip": "dailydialog",
        workspace / "pairs.jsonl": "prompt_response",
        tmp_path / "pairs.csv": "prompt_response",
        tmp_path / "pairs.parquet": "prompt_response",
        one_to_many: "prompt_response",
        "someone/some-dataset": "hub",
    }
    for path, expected in cases.items():
        assert detect_dataset_format(str(path)) == expected, path


def test_shared_data_and_hub_datasets_reach_the_commands(shared_data, workspace, tmp_path, monkeypatch):
    from datasets import Dataset

    tokenizer = load_tokenizer(str(workspace / "llm"))
    rows, found = load_rows(shared_data / "agnews", tokenizer, split="validation")
    assert found == "agnews" and {"prompt", "response", "label"} <= set(rows.column_names)
    rows, found = load_rows(shared_data / "dailydialog", tokenizer, split="validation")
    assert found == "dailydialog" and len(rows) == 7069

    # a Hub dataset with other column names (datasets.load_dataset stands in for the download)
    hub = Dataset.from_dict({"question": ["w5 w6", "w7"], "answer": ["w8 w9", "w10"]})
    monkeypatch.setattr("datasets.load_dataset", lambda name, config=None, split=None: hub)
    output = tmp_path / "from_hub"
    assert run("sample", "--model_name_or_path", workspace / "llm", "--dataset", "someone/qa-pairs", "--prompt_column",
               "question", "--response_column", "answer", "--output_dir", output, "--num_responses", 2,
               "--max_new_tokens", 3) == 0
    from datasets import load_from_disk

    assert load_from_disk(str(output))["prompt"] == ["w5 w6", "w5 w6", "w7", "w7"]


def test_load_tokenizer_gives_a_tokenizer_without_pad_its_eos_token(tmp_path):
    """The pad-token policy, in one place: a command's tokenizer gets `pad_token = eos_token` when it has none."""
    tokenizer = tiny_tokenizer()
    tokenizer.pad_token = None
    tokenizer.save_pretrained(tmp_path)
    loaded = load_tokenizer(tmp_path)
    assert loaded.pad_token == loaded.eos_token is not None and loaded.padding_side == "left"


def test_an_unreachable_hub_dataset_is_one_line(workspace, tmp_path, capsys):
    capsys.readouterr()
    assert run("sample", "--model_name_or_path", workspace / "llm", "--dataset", "no-such-org/no-such-dataset",
               "--output_dir", tmp_path / "out") == 1
    assert "is not a local path, and loading it from the Hub failed" in error_line(capsys)


# ---------------------------------------------------------------------------------------------------- bad input
def bad_inputs(workspace: Path, tmp: Path) -> dict[str, tuple[list, str]]:
    (tmp / "text_only.jsonl").write_text(json.dumps({"sentence": "w5 w6"}) + "\n")  # (a `text` column is valid)
    (tmp / "existing.json").write_text("{}")
    torch.save(torch.zeros(5), tmp / "short.pt")
    save_file({"latent": torch.zeros(2, 3)}, str(tmp / "narrow.safetensors"))
    torch.save({"latent": torch.zeros(8), "code": Path("x")}, tmp / "pickled.pt")  # not loadable with weights_only
    (tmp / "not_a_model").mkdir(exist_ok=True)
    cvae, llm = workspace / "cvae", workspace / "llm"
    return {
        "missing dataset": (["train", "--model_name_or_path", llm, "--dataset", tmp / "nope.jsonl", "--output_dir",
                             tmp / "out1"], "does not exist"),
        "dataset without columns": (["sample", "--model_name_or_path", llm, "--dataset", tmp / "text_only.jsonl",
                                     "--output_dir", tmp / "out2"], "prompt"),
        "missing model": (["generate", "--model_name_or_path", tmp / "nope"], "does not exist"),
        "folder that is no model": (["generate", "--model_name_or_path", tmp / "not_a_model"], "config.json"),
        "model that is not a CVAE": (["generate", "--model_name_or_path", llm], "not a CVAE-Llama"),
        "LLM for export": (["export", "--model_name_or_path", llm, "--output_dir", tmp / "out3"], "not a CVAE-Llama"),
        "latent of the wrong size": (["generate", "--model_name_or_path", cvae, "--latent", tmp / "short.pt"],
                                     "has shape (5,) but the model expects (8,) or (n, 8)"),
        "latent of the wrong width": (["generate", "--model_name_or_path", cvae, "--latent",
                                       tmp / "narrow.safetensors"], "has shape (2, 3) but the model expects"),
        "inline latent of the wrong size": (["generate", "--model_name_or_path", cvae, "--latent", "[1, 2]"],
                                            "has shape (2,)"),
        "latent file that is not weights only": (["generate", "--model_name_or_path", cvae, "--latent",
                                                  tmp / "pickled.pt"], "weights_only=True"),
        "missing latent file": (["generate", "--model_name_or_path", cvae, "--latent", tmp / "z.pt"],
                                "does not exist"),
        "two latent sources": (["generate", "--model_name_or_path", cvae, "--latent", "[1]", "--reconstruct", "w5"],
                               "exclude each other"),
        "output file exists": (["generate", "--model_name_or_path", cvae, "--output_file", tmp / "existing.json"],
                               "--overwrite"),
        "unknown label": (["generate", "--model_name_or_path", cvae, "--control_label", "7", "--directions",
                           json.dumps([[0.0] * 8, [1.0] * 8])], "not one of the labels"),
        "missing results": (["export", "--model_name_or_path", cvae, "--output_dir", tmp / "out4", "--results",
                             tmp / "results.json"], "does not exist"),
        "demo into a non-empty folder": (["demo", "--output_dir", tmp], "pass --overwrite"),
    }


@pytest.mark.parametrize(
    "case",
    [
        "missing dataset", "dataset without columns", "missing model", "folder that is no model",
        "model that is not a CVAE", "LLM for export", "latent of the wrong size", "latent of the wrong width",
        "inline latent of the wrong size", "latent file that is not weights only", "missing latent file",
        "two latent sources", "output file exists", "unknown label", "missing results", "demo into a non-empty folder",
    ],
)  # fmt: skip
def test_bad_input_is_one_clear_line_and_a_non_zero_exit(workspace, tmp_path, capsys, case):
    argv, message = bad_inputs(workspace, tmp_path)[case]
    capsys.readouterr()
    assert run(*argv) == 1
    line = error_line(capsys)
    assert message in line, line
    assert (tmp_path / "existing.json").read_text() == "{}"  # nothing the user gave was overwritten


def test_malformed_command_lines_exit_2(capsys):
    assert run("frobnicate") == 2
    assert "unknown command 'frobnicate'" in error_line(capsys)
    assert run("generate", "--model_name_or_path", "x", "--no_such_flag", "1") == 2
    assert "--no_such_flag" in error_line(capsys)
    assert run("train", "--model_name_or_path", "x", "--dataset", "y") == 2  # --output_dir is required
    assert "--output_dir" in capsys.readouterr().err
    assert run("train", "--model_name_or_path", "x", "--dataset", "y", "--output_dir", "z", "--objective", "elbo") == 2
    assert "invalid choice" in capsys.readouterr().err


def test_bad_input_in_a_subprocess_prints_no_traceback(workspace, tmp_path):
    torch.save(torch.zeros(3, 5), tmp_path / "bad.pt")
    result = subprocess.run(
        [sys.executable, "-m", "cvae_llama", "generate", "--model_name_or_path", str(workspace / "cvae"), "--latent",
         str(tmp_path / "bad.pt")],
        capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"cvae-llama generate: error: --latent '{tmp_path / 'bad.pt'}' has shape (3, 5) but the model expects (8,) or "
        "(n, 8)"
    )


def test_read_latent_shapes():
    assert read_latent("[0, 1, 2, 3]", 4).shape == (1, 4)
    assert read_latent("[[0, 1], [2, 3], [4, 5]]", 2).shape == (3, 2)
    with pytest.raises(ValueError, match="NaN"):
        read_latent("[0, NaN]", 2)
