"""`cvae_llama.export` as a library: saving a trained CVAE (the bag-of-words head and its hook gone, LoRA merged) with
its training record, and the Hub-ready folder written without the command line."""

import dataclasses
import json

import pytest
import torch
from datasets import Dataset
from ddp_train import build_groups, build_model, build_tokenizer
from safetensors.torch import load_file

from cvae_llama.data import unconditional_rows
from cvae_llama.export import (
    TRAINING_RECORD,
    export_hub_folder,
    model_card,
    read_training_record,
    save_trained_cvae,
    training_record,
)
from cvae_llama.modeling_cvae_llama import CVAELlamaForCausalLM
from cvae_llama.trainer import CVAETrainer, CVAETrainingArguments


pytestmark = pytest.mark.usefixtures("one_thread")


def trained_with_bow(tmp_path, decoder_mode: str):
    """Two steps of `objective="bow"` on a tiny CVAE: `(trainer, groups, metrics)`."""
    tokenizer = build_tokenizer()
    groups = build_groups()
    model = build_model(tokenizer, decoder_mode=decoder_mode)
    args = CVAETrainingArguments(
        output_dir=str(tmp_path / "run"), objective="bow", max_steps=2, per_device_train_batch_size=2,
        save_strategy="no", report_to="none", logging_steps=1, max_prompt_tokens=8, max_response_tokens=8,
        lora_r=2, use_cpu=True,
    )  # fmt: skip
    trainer = CVAETrainer(model, args, train_dataset=groups, processing_class=tokenizer)
    result = trainer.train()
    return trainer, groups, result.metrics


@pytest.mark.parametrize("decoder_mode", ["frozen", "lora"])
def test_saving_after_bow_training_removes_the_head_and_its_hook(tmp_path, decoder_mode):
    trainer, groups, metrics = trained_with_bow(tmp_path, decoder_mode)
    cvae = trainer.accelerator.unwrap_model(trainer.model)
    cvae = cvae.get_base_model() if hasattr(cvae, "get_base_model") else cvae
    assert cvae.bow_head is not None and len(cvae._forward_hooks) == 1  # what training attached

    record = training_record(trainer, groups, "groups", "prompt_response", "tiny-llm", metrics)
    saved = save_trained_cvae(trainer, tmp_path / "cvae", record)

    assert isinstance(saved, CVAELlamaForCausalLM)
    assert getattr(saved, "bow_head", None) is None
    assert len(saved._forward_hooks) == 0, "the bag-of-words hook is still registered"
    assert getattr(saved, "_bow_hook", None) is None
    weights = load_file(str(tmp_path / "cvae" / "model.safetensors"))
    assert not any("bow_head" in name or "lora" in name for name in weights)
    reloaded = CVAELlamaForCausalLM.from_pretrained(tmp_path / "cvae")
    assert getattr(reloaded, "bow_head", None) is None and len(reloaded._forward_hooks) == 0
    assert read_training_record(tmp_path / "cvae") == json.loads(json.dumps(record, default=str))


def test_the_training_record_holds_every_training_argument(tmp_path):
    trainer, groups, metrics = trained_with_bow(tmp_path, "frozen")
    record = training_record(trainer, groups, "groups", "prompt_response", "tiny-llm", metrics)
    arguments = record["training_arguments"]
    assert {field.name for field in dataclasses.fields(CVAETrainingArguments)} <= set(arguments)
    assert arguments["objective"] == "bow" and arguments["max_steps"] == 2 and arguments["lora_r"] == 2
    assert arguments["dg_grouping"] == trainer.dg_grouping  # as resolved from the data, not "auto"
    assert arguments["hub_token"] in (None, "<HUB_TOKEN>")  # TrainingArguments.to_dict redacts tokens
    assert record["global_step"] == 2 and record["num_groups"] == len(groups)


def test_the_training_record_of_flat_rows_counts_one_response_each(tmp_path):
    """Unconditional text (`unconditional_rows`: one `response` a row, no `responses`) trains and is recorded."""
    tokenizer = build_tokenizer()
    rows = unconditional_rows(Dataset.from_dict({"text": ["a cat sat", "a dog ran", "the sun set", "rain fell"]}))
    args = CVAETrainingArguments(
        output_dir=str(tmp_path / "run"), max_steps=1, per_device_train_batch_size=4, save_strategy="no",
        report_to="none", max_prompt_tokens=8, max_response_tokens=8, use_cpu=True,
    )  # fmt: skip
    trainer = CVAETrainer(build_model(tokenizer), args, train_dataset=rows, processing_class=tokenizer)
    record = training_record(trainer, rows, "texts", "text", "tiny-llm", trainer.train().metrics)
    assert record["num_groups"] == 4 and record["responses_per_group"] == 1 and record["global_step"] == 1
    save_trained_cvae(trainer, tmp_path / "cvae", record)
    assert read_training_record(tmp_path / "cvae")["dataset_format"] == "text"


def test_export_hub_folder_without_the_command_line(tmp_path):
    tokenizer = build_tokenizer()
    model = build_model(tokenizer)
    model.save_pretrained(tmp_path / "cvae")
    tokenizer.save_pretrained(tmp_path / "cvae")
    (tmp_path / "cvae" / TRAINING_RECORD).write_text(json.dumps({"base_model": "org/base-lm"}))

    folder = export_hub_folder(tmp_path / "cvae", tmp_path / "hub", tags=["extra-tag"])
    assert {"README.md", "config.json", "model.safetensors", "modeling_cvae_llama.py", TRAINING_RECORD} <= {
        path.name for path in folder.iterdir()
    }
    card = (folder / "README.md").read_text()
    assert "extra-tag" in card and "org/base-lm" in card
    with pytest.raises(ValueError, match=r"output_dir .* already exists; pass overwrite=True"):
        export_hub_folder(tmp_path / "cvae", tmp_path / "hub")
    with pytest.raises(ValueError, match="not a CVAE-Llama"):
        llm = tmp_path / "llm"
        torch.manual_seed(0)
        from conftest import tiny_llama_config
        from transformers import LlamaForCausalLM

        LlamaForCausalLM(tiny_llama_config()).save_pretrained(llm)
        export_hub_folder(llm, tmp_path / "hub2")


@pytest.mark.parametrize("prior_and_quantization", [False, True])
def test_the_card_says_which_prior_generate_samples_and_how_the_base_loads(prior_and_quantization):
    model = build_model(build_tokenizer())
    if prior_and_quantization:
        model.add_learned_prior()
        model.config.base_model_quantization_config = {"quant_method": "bitsandbytes", "load_in_4bit": True,
                                                       "bnb_4bit_quant_type": "nf4"}  # fmt: skip
    card = str(model_card(model, record={}, results=None, base_model="org/base-lm", repo_id="you/cvae",
                          model_name="cvae", license="apache-2.0", tags=[], training_data=None, adapter=True))  # fmt: skip
    assert ("draws z from it for the prompt" in card) == prior_and_quantization
    assert ("draws a fresh prior sample z ~ N(0, I)" in card) != prior_and_quantization
    assert ("The base loads quantised as the CVAE was trained on it (bitsandbytes 4-bit (nf4)" in card) == (
        prior_and_quantization
    )
