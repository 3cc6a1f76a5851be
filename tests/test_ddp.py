"""Data parallelism: `torchrun --nproc_per_node 2` (gloo, CPU) ends at the weights of one process with the same
global batch."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ddp_train import main as train_main
from safetensors.torch import load_file


pytestmark = pytest.mark.slow  # two torchrun processes and a reference run per test

SCRIPT = Path(__file__).with_name("ddp_train.py")
REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(script: Path, *arguments: str) -> subprocess.CompletedProcess:
    """`script` run by `torchrun --nproc_per_node 2` (one thread each, offline, this checkout importable)."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    command = [
        sys.executable, "-m", "torch.distributed.run",
        "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
        str(script), *arguments,
    ]  # fmt: skip
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


def run_arguments(output_dir: Path, objective: str, per_device_batch: int) -> list[str]:
    return [
        "--output_dir", str(output_dir),
        "--objective", objective,
        "--per_device_train_batch_size", str(per_device_batch),
        "--max_steps", "2",
        "--optim", "sgd",
        "--learning_rate", "0.2",
        "--lr_scheduler_type", "constant",
        "--max_grad_norm", "0",
        "--train_sampling_strategy", "sequential",
        "--dg_samples", "4",
        "--max_prompt_tokens", "8",
        "--max_response_tokens", "8",
        "--use_cpu", "True",
        "--save_strategy", "no",
        "--logging_steps", "1",
        "--report_to", "none",
        "--disable_tqdm", "True",
        "--seed", "0",
    ]  # fmt: skip


@pytest.mark.parametrize("objective", ["dg", "bow"])
def test_torchrun_two_processes_match_one_process_with_the_same_global_batch(tmp_path, objective):
    # 2 processes x 1 group per step (the groups' responses differ in length, so the tokens are counted globally)
    result = torchrun(SCRIPT, *run_arguments(tmp_path / "ddp", objective, per_device_batch=1), "--ddp_backend", "gloo")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert "rank 0 of 2" in result.stdout

    # the same run in this process, 2 groups per step
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_main(run_arguments(tmp_path / "single", objective, per_device_batch=2))
    finally:
        torch.set_num_threads(threads)

    distributed = load_file(tmp_path / "ddp" / "final_weights.safetensors")
    single = load_file(tmp_path / "single" / "final_weights.safetensors")
    assert distributed.keys() == single.keys()
    assert ("bow_head.to_vocab.weight" in single) == (objective == "bow")
    for name in single:
        torch.testing.assert_close(distributed[name], single[name], rtol=0, atol=1e-5, msg=name)
