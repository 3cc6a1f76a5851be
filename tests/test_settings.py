"""One place for each setting and each policy: the version, the token budgets, the pad-token policy, prior sampling,
the argument checks, and library padding instead of hand-written twins."""

import inspect
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_cvae_config, tiny_llama_config
from test_layout import MODULES, imported_modules
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

import cvae_llama
from cvae_llama import CVAELlamaForCausalLM
from cvae_llama.data import (
    DATASET_BUDGETS,
    DEFAULT_MAX_PROMPT_TOKENS,
    DEFAULT_MAX_RESPONSE_TOKENS,
    IGNORE_INDEX,
    OneToManyCollator,
    group_responses,
    left_pad,
    make_one_to_many,
    split_prompt_response,
)
from cvae_llama.evaluation import (
    follow_up_nll,
    generate_texts,
    generation,
    mean_pooled_hidden_states,
    prompt_inputs,
    report,
)
from cvae_llama.evaluation.utils import prior_latents
from cvae_llama.validation import check_positive_int


REPO = Path(__file__).resolve().parents[1]


def word_tokenizer(pad: bool = True, padding_side: str = "right") -> PreTrainedTokenizerFast:
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{f"w{i}": 4 + i for i in range(20)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>" if pad else None,
        unk_token="<unk>",
        padding_side=padding_side,
    )


# ------------------------------------------------------------------------------------------------------ version


def test_the_version_has_one_source():
    setup_py = (REPO / "setup.py").read_text()
    assert cvae_llama.__version__ not in setup_py  # read from cvae_llama/__init__.py, not written twice
    finished = subprocess.run(
        [sys.executable, "setup.py", "--version"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert finished.stdout.strip().splitlines()[-1] == cvae_llama.__version__


# ------------------------------------------------------------------------------------------------------ budgets


def test_token_budget_defaults_come_from_the_data_package():
    assert DATASET_BUDGETS == {"yelp": (32, 128), "agnews": (8, 32), "dailydialog": (256, 36)}  # the paper's
    expected = {"max_prompt_tokens": DEFAULT_MAX_PROMPT_TOKENS, "max_response_tokens": DEFAULT_MAX_RESPONSE_TOKENS}
    functions = [
        report.evaluation_report,
        generation.posterior_of_texts,
        generation.reconstruction,
        generation.interpolate,
    ]
    for function in functions:
        parameters = inspect.signature(function).parameters
        for name, value in expected.items():
            assert parameters[name].default is value, (function.__name__, name)


def test_no_token_budget_literal_in_the_evaluation_signatures():
    for name in ("report", "generation", "control", "dialogue", "utils", "text"):
        source = (REPO / "cvae_llama" / "evaluation" / f"{name}.py").read_text()
        assert not re.search(r"max_(prompt|response)_tokens: int = \d", source), name


# ---------------------------------------------------------------------------------------------------- pad token


def test_every_library_function_that_pads_refuses_a_tokenizer_without_pad_token(tmp_path):
    """The policy: the library raises (`cvae_llama.validation.pad_token_id`) and never falls back to EOS behind the
    user's back; before, `evaluation.utils` silently padded with EOS while the collator raised."""
    tokenizer = word_tokenizer(pad=False)
    torch.manual_seed(0)
    cvae = CVAELlamaForCausalLM(tiny_cvae_config()).eval()
    llm = LlamaForCausalLM(tiny_llama_config()).eval()
    calls = {
        "prompt_inputs": lambda: prompt_inputs(tokenizer, ["w1 w2", "w3"]),
        "generate_texts": lambda: generate_texts(cvae, tokenizer, ["w1 w2"], max_new_tokens=2),
        "mean_pooled_hidden_states": lambda: mean_pooled_hidden_states(llm, tokenizer, ["w1", "w2 w3"]),
        "follow_up_nll": lambda: follow_up_nll(llm, tokenizer, ["w1"], ["w2 w3"]),
        "left_pad": lambda: left_pad(tokenizer, [[4, 5], [6]]),
        "OneToManyCollator": lambda: OneToManyCollator(tokenizer, 4, 4),
        "make_one_to_many": lambda: make_one_to_many(llm, tokenizer, ["w1"], 2, tmp_path, max_new_tokens=2),
    }
    for name, call in calls.items():
        with pytest.raises(ValueError, match=r"no pad token.*tokenizer.pad_token = tokenizer.eos_token"):
            call()
        assert tokenizer.pad_token is None, name  # nobody set one behind the user's back


# ------------------------------------------------------------------------------------------------------ padding


def hand_written_left_pad(sequences, pad_value, pad_to_multiple_of=None):
    """The collator's former hand-written padding, the reference `tokenizer.pad` must match."""
    length = max(len(sequence) for sequence in sequences)
    if pad_to_multiple_of:
        length = -(-length // pad_to_multiple_of) * pad_to_multiple_of
    padded = torch.full((len(sequences), length), pad_value, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        padded[row, length - len(sequence) :] = torch.tensor(sequence, dtype=torch.long)
        mask[row, length - len(sequence) :] = 1
    return padded, mask


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("pad_to_multiple_of", [None, 4, 8])
def test_left_pad_is_tokenizer_pad_and_matches_the_hand_written_padding(padding_side, pad_to_multiple_of):
    tokenizer = word_tokenizer(padding_side=padding_side)  # left whatever the tokenizer's own side
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        rows = int(torch.randint(1, 6, (1,), generator=generator))
        sequences = [
            torch.randint(1, 24, (int(torch.randint(1, 12, (1,), generator=generator)),), generator=generator).tolist()
            for _ in range(rows)
        ]
        batch = left_pad(tokenizer, sequences, pad_to_multiple_of)
        input_ids, attention_mask = hand_written_left_pad(sequences, tokenizer.pad_token_id, pad_to_multiple_of)
        torch.testing.assert_close(batch["input_ids"], input_ids, rtol=0, atol=0)
        torch.testing.assert_close(batch["attention_mask"], attention_mask, rtol=0, atol=0)
        assert tokenizer.padding_side == padding_side  # not changed


def test_collator_labels_are_the_response_tokens_whatever_the_padding():
    tokenizer = word_tokenizer(padding_side="right")
    collator = OneToManyCollator(tokenizer, 2, 3, pad_to_multiple_of=8)
    batch = collator([{"prompt": "w1 w2 w3", "responses": ["w4", "w5 w6 w7 w8"]}, {"prompt": "", "response": "w9"}])
    assert batch["input_ids"].shape == (3, 8)
    labels = batch["labels"].tolist()
    assert labels[0] == [IGNORE_INDEX] * 6 + [8, 2]  # response w4 and EOS, at the end: left padding
    assert labels[1] == [IGNORE_INDEX] * 5 + [9, 10, 11]  # truncated to 3 tokens, no EOS
    assert labels[2] == [IGNORE_INDEX] * 6 + [13, 2]
    assert (batch["attention_mask"] == (batch["input_ids"] != 0)).all()


# -------------------------------------------------------------------------------------------------- prior samples


def test_prior_latents_are_the_models_sample_prior_on_the_cpu():
    torch.manual_seed(0)
    model = CVAELlamaForCausalLM(tiny_cvae_config()).eval()
    for temperature in (1.0, 0.4, 0.0):
        expected = model.sample_prior(6, temperature, torch.Generator().manual_seed(3))
        actual = prior_latents(model, 6, temperature, torch.Generator().manual_seed(3))
        torch.testing.assert_close(actual, expected, rtol=0, atol=0)
        assert actual.device.type == "cpu" and actual.dtype == torch.float32
    with pytest.raises(ValueError, match="latent_temperature"):
        prior_latents(model, 2, -1.0)


# -------------------------------------------------------------------------------------------------- argument checks


def test_check_positive_int_names_the_argument_and_the_value():
    assert check_positive_int(3, "steps") == 3 and check_positive_int(0, "budget", minimum=0) == 0
    for bad in (0, -1, 2.5, True, "3", None):
        with pytest.raises(ValueError, match=re.escape(f"steps must be an integer >= 1, got steps={bad!r}")):
            check_positive_int(bad, "steps")


def test_data_functions_refuse_non_integer_counts(tmp_path):
    """Before, `make_one_to_many` and `split_prompt_response` only compared with their minimum: a float count or a
    bool passed and failed later inside `generate` or an index (or sampled `True` = 1 response)."""
    from datasets import Dataset

    tokenizer = word_tokenizer()
    llm = LlamaForCausalLM(tiny_llama_config()).eval()
    for name, value in (("num_responses", 2.5), ("num_responses", True), ("batch_size", 1.5), ("max_new_tokens", 2.0)):
        arguments = {"num_responses": 2, "batch_size": 2, "max_new_tokens": 2, name: value}
        num_responses = arguments.pop("num_responses")
        with pytest.raises(ValueError, match=re.escape(f"got {name}={value!r}")):
            make_one_to_many(llm, tokenizer, ["w1"], num_responses, tmp_path / name, **arguments)
    texts = Dataset.from_dict({"text": ["w1 w2 w3"]})
    with pytest.raises(ValueError, match=re.escape("got prompt_tokens=1.5")):
        split_prompt_response(texts, tokenizer, 1.5)
    with pytest.raises(ValueError, match=re.escape("got max_groups_per_prompt=0")):
        group_responses(Dataset.from_dict({"prompt": ["a"], "response": ["b"]}), 1, max_groups_per_prompt=0)


# ------------------------------------------------------------------------------------------------------ layout


def test_the_data_package_imports_nothing_that_depends_on_it():
    forbidden = ("cvae_llama.evaluation", "cvae_llama.cli", "cvae_llama.trainer", "cvae_llama.training")
    data_modules = [name for name in MODULES if name == "cvae_llama.data" or name.startswith("cvae_llama.data.")]
    assert len(data_modules) >= 5
    for name in data_modules:
        imported = imported_modules(name)
        assert not [target for target in imported if target.startswith(forbidden)], (name, imported)


def test_docstrings_cite_the_paper_not_a_file_that_is_not_shipped():
    files = [*sorted((REPO / "cvae_llama" / "data").glob("*.py")), REPO / "cvae_llama" / "validation.py"]
    files += [REPO / "cvae_llama" / "evaluation" / f"{name}.py" for name in ("report", "generation", "control")]
    files += [REPO / "cvae_llama" / "evaluation" / f"{name}.py" for name in ("text", "dialogue", "utils")]
    for file in files:
        assert "METHOD.md" not in file.read_text(), file.name
