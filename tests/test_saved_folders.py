"""Folders saved by earlier code load to the outputs that code computed from them, bitwise: logits, losses,
gradients, posteriors and generations (greedy, sampled with a seed, unprompted, beam search) in evaluation and in
training. The folders and their outputs are written by `tests/fixtures/make_reference_outputs.py`."""

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cvae_llama import CVAELlamaForCausalLM


sys.path.insert(0, str(Path(__file__).parent / "fixtures"))
from make_reference_outputs import FOLDER, VARIANTS, outputs  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_a_folder_saved_before_issue_36_gives_the_same_outputs_bitwise(variant):
    expected = load_file(FOLDER / variant / "expected.safetensors")
    model = CVAELlamaForCausalLM.from_pretrained(FOLDER / variant)
    found = outputs(model)
    assert set(found) == set(expected)
    different = [key for key in expected if not torch.equal(found[key], expected[key])]
    assert not different, {
        key: (found[key] - expected[key]).abs().max().item() for key in different if found[key].is_floating_point()
    } or different
