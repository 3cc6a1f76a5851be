"""`cvae-llama demo`: its embedded prompts and settings (fast), and the README's demo command run with `--quick` in
a subprocess on SmolLM2-135M (slow; still in CI): every output file, the model card, and the reload without the
package."""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cvae_llama.demo import (
    DEMO_PROMPTS,
    DEMO_TOPICS,
    FULL,
    QUICK,
    _columns,
    demo_prompts,
)


README = Path(__file__).resolve().parents[1] / "README.md"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def readme_block(marker: str) -> str:
    """The command in the code fence after `marker` in README.md (what .ci/run extracts for the test command)."""
    match = re.search(re.escape(marker) + r"\s*```bash\n(.*?)\n```", README.read_text(), flags=re.DOTALL)
    assert match, f"README.md has no ```bash block after {marker}"
    return match.group(1).strip()


def demo_command() -> list[str]:
    """The last part of the README's first command (after the installs): the demo as a user runs it."""
    last = readme_block("<!-- demo-command -->").split("&&")[-1]
    argv = shlex.split(last)
    assert argv[:2] == ["cvae-llama", "demo"], argv
    return argv


# ---------------------------------------------------------------------------------------------------- fast
def test_prompts_are_distinct_and_split_into_train_and_held_out():
    prompts = [prompt for topic in DEMO_TOPICS for prompt in DEMO_PROMPTS[topic]]
    assert len(prompts) == len(set(prompts)) == 20
    for settings in (FULL, QUICK):
        train, held_out = demo_prompts(settings)
        assert len(train) == settings.train_prompts_per_topic * len(DEMO_TOPICS)
        assert len(held_out) == settings.num_eval_prompts
        assert not {prompt for prompt, _ in train} & {prompt for prompt, _ in held_out}
        assert {label for _, label in train} == set(range(len(DEMO_TOPICS)))
        assert settings.group_size <= settings.num_responses and settings.num_latents >= 2


def test_quick_is_a_smaller_run_of_the_same_steps():
    for name in ("train_prompts_per_topic", "num_responses", "max_new_tokens", "max_steps"):
        assert getattr(QUICK, name) < getattr(FULL, name), name


def test_side_by_side_columns_fit_the_width():
    lines = _columns("left", ["a " * 40, "b"], "right", ["c", "d " * 50, "e"], width=80)
    assert all(len(line) <= 80 for line in lines)
    assert lines[0].startswith("left") and "| right" in lines[0]
    assert any(line.startswith("3. ") or "| 3. e" in line for line in lines)


# ---------------------------------------------------------------------------------------------------- the README's demo
@pytest.mark.slow
def test_readme_demo_command_quick_writes_everything_and_reloads(tmp_path):
    from huggingface_hub import ModelCard

    output = tmp_path / "demo"
    argv = demo_command() + ["--quick", "--output_dir", str(output)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    script = shutil.which("cvae-llama")  # the console script; `python -m cvae_llama` is the same entry point
    command = ([script] if script else [sys.executable, "-m", "cvae_llama"]) + argv[1:]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    out = result.stdout

    # what it prints: the steps, the two columns, an interpolation, the metrics, the reload
    for step in range(1, 8):
        assert f"=== [{step}/7]" in out
    assert "base LM: sampled" in out and "CVAE: greedy from z ~ N(0, I)" in out
    assert "Interpolation between two responses" in out and "t = 1.0" in out
    assert "Distinct-2" in out and "Self-BLEU-4" in out and "mutual information" in out
    assert "(remote code: True): the same greedy text for the same latents: True" in out

    # every output file
    for split in ("train", "eval"):
        assert (output / "one_to_many" / split / "dataset_info.json").is_file()
    for name in ("config.json", "model.safetensors", "cvae_training.json", "tokenizer.json",
                 "configuration_cvae_llama.py", "modeling_cvae_llama.py"):
        assert (output / "cvae" / name).is_file(), name
    evaluation = output / "evaluation"
    results = json.loads((evaluation / "results.json").read_text())
    assert {"latent", "diversity", "reconstruction", "interpolation"} <= results.keys()
    for name in ("results.md", "samples.json", "latent_space.png", "kl_per_dimension.png", "interpolation.png"):
        assert (evaluation / name).is_file(), name
    export = output / "export"
    for name in ("README.md", "config.json", "configuration_cvae_llama.py", "modeling_cvae_llama.py",
                 "model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 "cvae_training.json", "evaluation/results.json", "evaluation/results.md",
                 "evaluation/latent_space.png", "evaluation/interpolation.png"):
        assert (export / name).is_file(), name
    for png in [*evaluation.glob("*.png"), *(export / "evaluation").glob("*.png")]:
        data = png.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5_000, png
    config = json.loads((export / "config.json").read_text())
    assert config["model_type"] == "cvae_llama" and set(config["auto_map"]) == {
        "AutoConfig", "AutoModel", "AutoModelForCausalLM"}

    card = ModelCard.load(export / "README.md")
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "text-generation"
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct" and card.data.license == "apache-2.0"
    assert "cvae-llama" in card.data.tags
    assert "Latent quality" in card.text and "Diverse generation" in card.text

    summary = json.loads((output / "demo.json").read_text())
    assert summary["quick"] is True
    assert summary["reload_check"] == {**summary["reload_check"], "remote_code": True, "same_generations": True}
    assert summary["reload_check"]["class"].startswith("transformers_modules.")
    assert set(summary["seconds_per_step"]) == {"base LM", "sampling", "training", "evaluation", "side by side",
                                                "export", "reload"}
    assert "base LM: sampled" in (output / "demo.md").read_text()
    print(f"\ndemo --quick: {summary['total_seconds']} s, per step {summary['seconds_per_step']}")

    # the finished demo is not replaced without --overwrite
    again = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert again.returncode == 1 and "Traceback" not in again.stderr
    assert again.stderr.strip().splitlines()[-1].startswith("cvae-llama demo: error: --output_dir")
