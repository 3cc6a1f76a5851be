"""Resuming CVAE training (issue 7): a run killed with SIGKILL and resumed ends bitwise where an uninterrupted run
ends; a half-written checkpoint folder is refused with a clear message, never loaded in part; with a seed, training
and sampling are reproducible run to run.

The killed run is `tests/resume_train.py` in a subprocess (a tiny CVAE, 8 steps, a checkpoint every 2), killed as
soon as its first checkpoint is complete; the half-written checkpoints are made from a real one by truncating or
removing what a run killed while saving leaves truncated or unwritten (the `Trainer` writes a checkpoint in place:
the weights, the optimizer, scheduler and RNG states, and `trainer_state.json` last).
"""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from ddp_train import build_groups, build_model, build_tokenizer, trainable_state
from safetensors.torch import load_file

from cvae_llama.trainer import CVAETrainer, CVAETrainingArguments


pytestmark = pytest.mark.usefixtures("one_thread")


SCRIPT = Path(__file__).resolve().parent / "resume_train.py"
MAX_STEPS, SAVE_STEPS = 8, 2


@pytest.fixture
def runs():
    """Start `resume_train.py` runs; any still running when the test ends (a failure) is killed."""
    started = []

    def start(output_dir: Path, *flags) -> subprocess.Popen:
        started.append(start_run(output_dir, *flags))
        return started[-1]

    yield start
    for process in started:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.log.close()


def start_run(output_dir: Path, *flags) -> subprocess.Popen:
    """`resume_train.py` in a subprocess, its output in `output_dir.log`."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    log = open(output_dir.with_suffix(".log"), "w")  # noqa: SIM115 (closed with the process below)
    command = [sys.executable, str(SCRIPT), "--output_dir", str(output_dir), "--max_steps", str(MAX_STEPS),
               "--save_steps", str(SAVE_STEPS), *flags]  # fmt: skip
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    process.log = log
    return process


def finish(process: subprocess.Popen, output_dir: Path, timeout: float = 240) -> None:
    try:
        process.wait(timeout=timeout)
    finally:
        process.log.close()
    log = output_dir.with_suffix(".log").read_text()
    assert process.returncode == 0, log[-3000:]


def complete_checkpoint(checkpoint: Path) -> bool:
    """Whether the Trainer has finished writing `checkpoint` (its trainer_state.json, written last, parses)."""
    try:
        return "global_step" in json.loads((checkpoint / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False


def folder_hash(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        digest.update(str(path.relative_to(folder)).encode())
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------------- killed mid-way
@pytest.mark.slow
def test_a_run_killed_mid_way_resumes_to_bitwise_the_weights_of_an_uninterrupted_run(tmp_path, runs):
    uninterrupted = runs(tmp_path / "uninterrupted")
    killed_dir = tmp_path / "killed"
    killed = runs(killed_dir, "--step_delay", "1.0")  # slow steps: the kill lands between two checkpoints
    first_checkpoint = killed_dir / f"checkpoint-{SAVE_STEPS}"
    deadline = time.monotonic() + 180
    while not complete_checkpoint(first_checkpoint):
        assert killed.poll() is None, (killed_dir.with_suffix(".log")).read_text()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint appeared in 180 s"
        time.sleep(0.02)
    killed.send_signal(signal.SIGKILL)
    killed.wait(timeout=60)
    assert killed.returncode == -signal.SIGKILL
    assert not (killed_dir / "model.safetensors").exists() and not (killed_dir / f"checkpoint-{MAX_STEPS}").exists()

    # resume from the newest complete checkpoint, as a user would after the kill
    checkpoints = sorted(killed_dir.glob("checkpoint-*"), key=lambda path: int(path.name.split("-")[1]))
    last = [checkpoint for checkpoint in checkpoints if complete_checkpoint(checkpoint)][-1]
    assert int(last.name.split("-")[1]) < MAX_STEPS
    resumed = runs(killed_dir, "--resume_from_checkpoint", str(last))
    finish(uninterrupted, tmp_path / "uninterrupted")
    finish(resumed, killed_dir)

    expected = load_file(tmp_path / "uninterrupted" / "model.safetensors")
    actual = load_file(killed_dir / "model.safetensors")
    assert expected.keys() == actual.keys()
    different = [name for name in expected if not torch.equal(expected[name], actual[name])]
    assert not different, f"{len(different)} tensors differ after the resume, e.g. {different[:3]}"
    initial = build_model(build_tokenizer()).state_dict()
    read_out = "encoder.to_latent_mean_logvar.0.weight"
    assert not torch.equal(initial[read_out], actual[read_out]), "nothing trained"
    # the same losses step by step, and the same samples from the trained model with the same seed
    expected_losses = json.loads((tmp_path / "uninterrupted" / "losses.json").read_text())
    assert json.loads((killed_dir / "losses.json").read_text()) == expected_losses
    assert len(expected_losses) == MAX_STEPS
    samples = load_file(killed_dir / "samples.safetensors")["samples"]
    assert torch.equal(samples, load_file(tmp_path / "uninterrupted" / "samples.safetensors")["samples"])


# ---------------------------------------------------------------------------------------------------- half-written
def make_args(output_dir: Path, **overrides) -> CVAETrainingArguments:
    values = dict(
        output_dir=str(output_dir), per_device_train_batch_size=1, max_steps=4, save_strategy="steps", save_steps=2,
        learning_rate=5e-3, logging_steps=1, report_to="none", disable_tqdm=True, use_cpu=True, seed=0, dg_samples=4,
        max_prompt_tokens=8, max_response_tokens=8,
    )  # fmt: skip
    values.update(overrides)
    return CVAETrainingArguments(**values)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """An output folder with complete checkpoints at steps 2 and 4."""
    output_dir = tmp_path_factory.mktemp("run")
    tokenizer = build_tokenizer()
    CVAETrainer(build_model(tokenizer), make_args(output_dir), train_dataset=build_groups(),
                processing_class=tokenizer).train()  # fmt: skip
    assert complete_checkpoint(output_dir / "checkpoint-2") and complete_checkpoint(output_dir / "checkpoint-4")
    return output_dir


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def kill_while_saving(checkpoint: Path) -> None:
    """What a run killed while writing its optimizer state leaves: weights, half an optimizer, nothing after."""
    truncate(checkpoint / "optimizer.pt")
    for name in ("scheduler.pt", "rng_state.pth", "trainer_state.json"):
        (checkpoint / name).unlink()


# (how the checkpoint is damaged, the file the refusal must name)
HALF_WRITTEN = {
    "model.safetensors truncated": (lambda c: truncate(c / "model.safetensors"), "model.safetensors"),
    "model.safetensors missing": (lambda c: (c / "model.safetensors").unlink(), "model.safetensors"),
    "trainer_state.json missing": (lambda c: (c / "trainer_state.json").unlink(), "trainer_state.json"),
    "trainer_state.json truncated": (lambda c: truncate(c / "trainer_state.json"), "trainer_state.json"),
    "optimizer.pt missing": (lambda c: (c / "optimizer.pt").unlink(), "optimizer.pt"),
    "optimizer.pt truncated": (lambda c: truncate(c / "optimizer.pt"), "optimizer.pt"),
    "scheduler.pt missing": (lambda c: (c / "scheduler.pt").unlink(), "scheduler.pt"),
    "rng_state.pth missing": (lambda c: (c / "rng_state.pth").unlink(), "rng_state.pth"),
    "killed while saving": (kill_while_saving, "trainer_state.json"),
}


@pytest.mark.parametrize("resume_latest", [False, True], ids=["given path", "resume_from_checkpoint=True"])
@pytest.mark.parametrize("case", list(HALF_WRITTEN))
def test_a_half_written_checkpoint_is_refused_and_never_loaded(finished_run, tmp_path, case, resume_latest):
    damage, file_name = HALF_WRITTEN[case]
    output_dir = tmp_path / "run"
    shutil.copytree(finished_run, output_dir)
    checkpoint = output_dir / "checkpoint-4"  # the newest: what resume_from_checkpoint=True picks
    damage(checkpoint)
    before = folder_hash(output_dir)
    tokenizer = build_tokenizer()
    model = build_model(tokenizer)
    initial = trainable_state(model)
    trainer = CVAETrainer(model, make_args(output_dir), train_dataset=build_groups(), processing_class=tokenizer)

    with pytest.raises(ValueError) as raised:
        trainer.train(resume_from_checkpoint=True if resume_latest else str(checkpoint))
    message = str(raised.value)
    assert str(checkpoint) in message and file_name in message, message
    if resume_latest:  # the refusal points to the newest complete checkpoint
        assert str(output_dir / "checkpoint-2") in message, message
    assert trainer.state.global_step == 0, "training ran from a half-written checkpoint"
    after = trainable_state(model)
    assert all(torch.equal(initial[name], after[name]) for name in initial), "weights were loaded before refusing"
    assert folder_hash(output_dir) == before, "the refusal changed the output folder"


# ---------------------------------------------------------------------------------------------------- determinism
def test_training_and_sampling_are_reproducible_run_to_run(tmp_path):
    tokenizer = build_tokenizer()
    prompt = tokenizer(["the cat", "a dog"], return_tensors="pt", padding=True)

    def run(seed: int):
        model = build_model(tokenizer)  # the same initial weights every time: only the training seed varies
        trainer = CVAETrainer(model, make_args(tmp_path / f"seed{seed}", save_strategy="no", seed=seed),
                              train_dataset=build_groups(), processing_class=tokenizer)  # fmt: skip
        trainer.train()
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        torch.manual_seed(seed)
        samples = model.eval().generate(**prompt, do_sample=True, max_new_tokens=6, num_return_sequences=2)
        return trainable_state(model), losses, samples

    weights, losses, samples = run(0)
    again_weights, again_losses, again_samples = run(0)
    assert losses == again_losses and len(losses) == 4
    assert all(torch.equal(weights[name], again_weights[name]) for name in weights)
    assert torch.equal(samples, again_samples)
    other_weights, other_losses, _ = run(1)  # the seed matters (data order and the posterior's noise)
    assert other_losses != losses
    assert any(not torch.equal(weights[name], other_weights[name]) for name in weights)
