"""A CVAE saved and shared as an adapter on its base LLM (issue 37): `save_pretrained` writes only the CVAE's own
weights with the base's name and the fingerprint of its stored weights; `from_pretrained` (and the auto classes,
remote code, pipelines) loads the base by that name and attaches them, refusing another base; no LLM tensor is held
twice."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import tiny_base_config
from safetensors.torch import load_file
from test_remote_code import CODE_FILES, PACKAGE, assert_same_as_local, run_without_cvae_llama, tiny_tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, pipeline

from cvae_llama import CVAELlamaForCausalLM


pytestmark = pytest.mark.usefixtures("one_thread")


def saved_base(folder: Path, seed: int = 0) -> Path:
    """A tiny seeded Llama saved with its tokenizer into `folder` (a base LLM as users have them: a folder)."""
    torch.manual_seed(seed)
    LlamaForCausalLM(tiny_base_config("llama")).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def cvae_on(base: Path, **fields) -> CVAELlamaForCausalLM:
    """A CVAE around the LLM saved in `base`, with a posterior, memory and skip that differ from a fresh one's."""
    model = CVAELlamaForCausalLM.from_llm(base, latent_size=8, gskip_samples=4, **fields).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if not name.startswith(("model.", "lm_head.")):
                parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    return model


def outputs(model, input_ids, latent):
    with torch.no_grad():
        return {
            "logits": model(input_ids, latent=latent).logits,
            "posterior": model.encode(input_ids)[0],
            "sequences": model.generate(input_ids, latent=latent, max_new_tokens=4, do_sample=False),
        }


INPUTS = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
LATENT = torch.randn(2, 8, generator=torch.Generator().manual_seed(2))


@pytest.fixture
def base(tmp_path) -> Path:
    return saved_base(tmp_path / "llm")


def test_an_adapter_folder_holds_only_the_cvae_and_names_its_base(base, tmp_path):
    model = cvae_on(base)
    model.save_pretrained(tmp_path / "adapter")
    model.save_pretrained(tmp_path / "standalone", standalone=True)
    files = {path.name for path in (tmp_path / "adapter").iterdir()}
    assert files == {"config.json", "generation_config.json", "model.safetensors", *CODE_FILES}
    assert "adapter_config.json" not in files  # transformers would hand the folder to peft
    config = json.loads((tmp_path / "adapter" / "config.json").read_text())
    assert config["saved_as"] == "adapter" and config["base_model_name_or_path"] == str(base)
    assert config["base_model_fingerprint"].startswith("sha256:") and "base_model_revision" in config
    adapter = load_file(tmp_path / "adapter" / "model.safetensors")
    standalone = load_file(tmp_path / "standalone" / "model.safetensors")
    assert adapter and not any(name.startswith(("model.", "lm_head.")) for name in adapter)
    assert {name: tensor for name, tensor in standalone.items() if name in adapter}.keys() == adapter.keys()
    assert all(torch.equal(adapter[name], standalone[name]) for name in adapter)
    assert json.loads((tmp_path / "standalone" / "config.json").read_text())["saved_as"] == "standalone"
    decoder = {name for name in model.state_dict() if name.startswith(("model.", "lm_head."))}
    assert set(standalone) - set(adapter) == decoder - {"lm_head.weight"} or set(standalone) - set(adapter) == decoder
    for name in CODE_FILES:
        assert (tmp_path / "adapter" / name).read_text() == (PACKAGE / name).read_text()


@pytest.mark.parametrize("loader", ["class", "auto"])
def test_the_adapter_round_trip_is_bitwise(base, tmp_path, loader):
    model = cvae_on(base)
    expected = outputs(model, INPUTS, LATENT)
    model.save_pretrained(tmp_path / "adapter")
    if loader == "class":
        loaded = CVAELlamaForCausalLM.from_pretrained(tmp_path / "adapter")
    else:
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "adapter", trust_remote_code=True)
    assert type(loaded.model) is type(model.model) and not loaded.training
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight or not model.config.tie_word_embeddings
    found = outputs(loaded, INPUTS, LATENT)
    assert all(torch.equal(found[key], expected[key]) for key in expected)
    assert loaded.config.decoder_mode == "frozen"
    assert not any(parameter.requires_grad for parameter in loaded.model.parameters())
    # saved again, it is the same adapter
    loaded.save_pretrained(tmp_path / "again")
    first, again = (load_file(tmp_path / name / "model.safetensors") for name in ("adapter", "again"))
    assert first.keys() == again.keys() and all(torch.equal(first[name], again[name]) for name in first)


def test_a_changed_base_is_refused_naming_both(base, tmp_path):
    model = cvae_on(base)
    model.save_pretrained(tmp_path / "adapter")
    shutil.copytree(base, tmp_path / "copy")
    other = saved_base(tmp_path / "other", seed=1)
    refused = r"saved on the base LLM '.*llm'.*fingerprint sha256:.*but '.*other' has sha256"
    with pytest.raises(ValueError, match=refused):
        CVAELlamaForCausalLM.from_pretrained(tmp_path / "adapter", base_model=other)
    # a copy of the base elsewhere is the same base
    loaded = CVAELlamaForCausalLM.from_pretrained(tmp_path / "adapter", base_model=tmp_path / "copy")
    assert torch.equal(outputs(loaded, INPUTS, LATENT)["logits"], outputs(model, INPUTS, LATENT)["logits"])
    # the base replaced where the adapter names it
    shutil.rmtree(base)
    shutil.copytree(other, base)
    with pytest.raises(ValueError, match="its weights differ"):
        CVAELlamaForCausalLM.from_pretrained(tmp_path / "adapter")
    with pytest.raises(ValueError, match="is a standalone folder"):
        model.save_pretrained(tmp_path / "standalone", standalone=True)
        CVAELlamaForCausalLM.from_pretrained(tmp_path / "standalone", base_model=other)


def test_loading_arguments_reach_the_base(base, tmp_path):
    cvae_on(base).save_pretrained(tmp_path / "adapter")
    loaded = CVAELlamaForCausalLM.from_pretrained(
        tmp_path / "adapter", dtype=torch.bfloat16, attn_implementation="eager", device_map="cpu"
    )
    assert loaded.model.embed_tokens.weight.device.type == "cpu"
    assert loaded.model.embed_tokens.weight.dtype == torch.bfloat16 and loaded.dtype == torch.bfloat16
    assert loaded.encoder.norm.weight.dtype == torch.bfloat16  # the CVAE's own modules in the base's dtype
    assert loaded.config._attn_implementation == "eager"
    with pytest.raises(ValueError, match=r"'no-such/base' has no safetensors weights .*'local_files_only': True"):
        CVAELlamaForCausalLM.from_pretrained(tmp_path / "adapter", base_model="no-such/base", local_files_only=True)


def test_where_an_adapter_cannot_be_saved_it_says_why(base, tmp_path):
    # decoder_mode="full": the decoder trains, only a standalone folder keeps it (the default then)
    full = cvae_on(base, decoder_mode="full")
    with pytest.raises(ValueError, match='decoder_mode="full" trains the decoder'):
        full.save_pretrained(tmp_path / "full", standalone=False)
    full.save_pretrained(tmp_path / "full")
    assert json.loads((tmp_path / "full" / "config.json").read_text())["saved_as"] == "standalone"
    # a decoder changed after it was built (LoRA merged into it, trained)
    changed = cvae_on(base)
    with torch.no_grad():
        changed.model.layers[0].self_attn.q_proj.weight.mul_(1.01)
    with pytest.raises(ValueError, match="the decoder is not the base LLM it was built from"):
        changed.save_pretrained(tmp_path / "changed", standalone=False)
    # an LLM that was never saved has nothing to name
    unnamed = CVAELlamaForCausalLM.from_llm(LlamaForCausalLM(tiny_base_config("llama")), latent_size=8)
    with pytest.raises(ValueError, match="has no stored safetensors weights"):
        unnamed.save_pretrained(tmp_path / "unnamed", standalone=False)
    unnamed.save_pretrained(tmp_path / "unnamed")
    assert json.loads((tmp_path / "unnamed" / "config.json").read_text())["saved_as"] == "standalone"
    with pytest.raises(ValueError, match="standalone must be True, False or None"):
        unnamed.save_pretrained(tmp_path / "bad", standalone="yes")


def test_remote_code_loads_an_adapter_without_the_package(base, tmp_path):
    model = cvae_on(base)
    model.save_pretrained(tmp_path / "adapter")
    tiny_tokenizer().save_pretrained(tmp_path / "adapter")
    report, found = run_without_cvae_llama(tmp_path, str(tmp_path / "adapter"))
    assert_same_as_local(model, report, found)


def test_a_pipeline_loads_an_adapter_folder(base, tmp_path):
    model = cvae_on(base)
    model.save_pretrained(tmp_path / "adapter")
    tiny_tokenizer().save_pretrained(tmp_path / "adapter")
    generator = pipeline("text-generation", model=str(tmp_path / "adapter"), trust_remote_code=True)
    assert type(generator.model).__name__ == "CVAELlamaForCausalLM"
    text = generator("w5 w6 w7", latent=LATENT[0], max_new_tokens=4, do_sample=False, return_full_text=False)
    expected = model.generate(torch.tensor([[5, 6, 7]]), latent=LATENT[:1], max_new_tokens=4, do_sample=False)
    assert text[0]["generated_text"].split() == [f"w{index}" for index in expected[0, 3:].tolist()]


def test_the_8b_shape_holds_no_llm_tensor_twice():
    """Llama-3-8B's shape on the meta device: the CVAE's parameters are the LLM's plus its own trainable ones (the
    encoder's copied layers, the memory's MLPs, the skip), none of the LLM's held twice."""
    config = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False)  # fmt: skip
    with torch.device("meta"):
        llm = LlamaForCausalLM(config)
    model = CVAELlamaForCausalLM.from_llm(llm)
    llm_count = sum(parameter.numel() for parameter in llm.parameters())
    breakdown = model.parameter_breakdown()
    assert breakdown["decoder"] == {"trainable": 0, "frozen": llm_count}
    assert breakdown["total"]["frozen"] == llm_count  # no frozen copy of the LLM's tensors
    total = breakdown["total"]["trainable"] + breakdown["total"]["frozen"]
    own = total - llm_count
    # the encoder's two copied layers (trainable, 0.44 B) and the new modules: every own parameter trains
    assert own == breakdown["total"]["trainable"] and own < 0.07 * llm_count
    # and without the encoder's copied layers the CVAE adds under 1 %
    copied_layers = sum(parameter.numel() for parameter in model.encoder.layers.parameters())
    assert own - copied_layers < 0.01 * llm_count


def trained_on_a_named_base(tmp_path: Path, output_dir: str, resume=None, **arguments):
    """`CVAETrainer` for 4 steps on `ddp_train`'s groups, a checkpoint every 2, around a tiny LLM saved in
    `tmp_path / "llm"`: `(trainer, model)`."""
    from ddp_train import build_groups, build_tokenizer

    from cvae_llama.trainer import CVAETrainer, CVAETrainingArguments

    tokenizer = build_tokenizer()
    base = tmp_path / "llm"
    if not base.exists():
        torch.manual_seed(0)
        special = dict(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id)  # fmt: skip
        config = tiny_base_config("llama", vocab_size=len(tokenizer), max_position_embeddings=128, **special)
        LlamaForCausalLM(config).save_pretrained(base)
    model = CVAELlamaForCausalLM.from_llm(base, latent_size=8, gskip_samples=4)
    with torch.no_grad():  # a posterior that differs between texts, as after some training
        model.encoder.to_latent_mean_logvar[-1].weight.normal_(0.0, 0.2, generator=torch.Generator().manual_seed(1))
    args = CVAETrainingArguments(
        output_dir=str(tmp_path / output_dir), max_steps=4, save_steps=2, save_strategy="steps",
        per_device_train_batch_size=1, learning_rate=5e-3, logging_steps=1, report_to="none", disable_tqdm=True,
        use_cpu=True, seed=0, dg_samples=4, max_prompt_tokens=8, max_response_tokens=8, **arguments,
    )  # fmt: skip
    groups = build_groups()
    eval_dataset = groups if arguments.get("eval_strategy") else None
    trainer = CVAETrainer(model, args, train_dataset=groups, eval_dataset=eval_dataset, processing_class=tokenizer)
    trainer.train(resume_from_checkpoint=resume)
    return trainer, model


def test_training_checkpoints_are_adapters_and_resume_bitwise(tmp_path, caplog):
    _, whole = trained_on_a_named_base(tmp_path, "whole")
    checkpoint = tmp_path / "whole" / "checkpoint-2"
    weights = load_file(checkpoint / "model.safetensors")
    assert weights and not any(name.startswith(("model.", "lm_head.")) for name in weights)
    assert json.loads((checkpoint / "config.json").read_text())["saved_as"] == "adapter"
    with caplog.at_level("WARNING"):
        _, resumed = trained_on_a_named_base(tmp_path, "resumed", resume=str(checkpoint))
    assert "missing keys" not in caplog.text  # the decoder is the base's, in memory
    expected, found = whole.state_dict(), resumed.state_dict()
    assert expected.keys() == found.keys()
    assert all(torch.equal(expected[name], found[name]) for name in expected), "resuming is not bitwise"
    # a checkpoint is an adapter folder that loads on its own
    loaded = CVAELlamaForCausalLM.from_pretrained(tmp_path / "whole" / "checkpoint-4")
    assert all(torch.equal(tensor, expected[name]) for name, tensor in loaded.state_dict().items())


def test_best_model_and_checkpoint_limits_work_with_adapter_checkpoints(tmp_path, caplog):
    with caplog.at_level("WARNING"):
        trainer, model = trained_on_a_named_base(
            tmp_path, "best", eval_strategy="steps", eval_steps=2, load_best_model_at_end=True,
            metric_for_best_model="loss", save_total_limit=1, save_only_model=True,
        )  # fmt: skip
    assert "missing keys" not in caplog.text
    best = Path(trainer.state.best_model_checkpoint)
    checkpoints = sorted(path.name for path in (tmp_path / "best").glob("checkpoint-*"))
    assert best.name in checkpoints and len(checkpoints) <= 2  # the limit keeps the best one and the last
    assert not (best / "optimizer.pt").exists()  # save_only_model
    stored = load_file(best / "model.safetensors")
    assert not any(name.startswith(("model.", "lm_head.")) for name in stored)
    state = model.state_dict()
    assert all(torch.equal(stored[name], state[name]) for name in stored)  # the best model was loaded back


def test_export_and_push_to_hub_write_the_adapter_folder(base, tmp_path, monkeypatch):
    from transformers.utils import hub

    from cvae_llama.export import export_hub_folder

    model = cvae_on(base)
    model.save_pretrained(tmp_path / "adapter")
    tiny_tokenizer().save_pretrained(tmp_path / "adapter")
    folder = export_hub_folder(tmp_path / "adapter", tmp_path / "hub", base_model="org/base-lm")
    assert json.loads((folder / "config.json").read_text())["saved_as"] == "adapter"
    card = (folder / "README.md").read_text()
    metadata = card.split("---")[1]
    assert "base_model: org/base-lm" in metadata and "base_model_relation: adapter" in metadata
    assert "This repository is an adapter" in card
    saved = load_file(tmp_path / "adapter" / "model.safetensors")
    assert load_file(folder / "model.safetensors").keys() == saved.keys()
    # a standalone export: the whole model, no adapter relation
    whole = export_hub_folder(tmp_path / "adapter", tmp_path / "whole", base_model="org/base-lm", standalone=True)
    assert "base_model_relation" not in (whole / "README.md").read_text()
    assert "This repository is an adapter" not in (whole / "README.md").read_text()
    assert any(name.startswith("model.") for name in load_file(whole / "model.safetensors"))

    # push_to_hub uploads what save_pretrained writes: the adapter folder (the upload captured, no network)
    uploaded = {}

    class Repo:
        repo_id = "org/cvae"

    monkeypatch.setattr(hub, "hf_api", lambda: type("Api", (), {"create_repo": lambda *args, **kwargs: Repo()})())
    card = type("Card", (), {"save": lambda *args: None})()
    monkeypatch.setattr(hub, "create_and_tag_model_card", lambda *args, **kwargs: card)

    def upload(self, folder, repo_id, **kwargs):
        uploaded.update(config=json.loads((Path(folder) / "config.json").read_text()),
                        weights=load_file(Path(folder) / "model.safetensors"))  # fmt: skip

    monkeypatch.setattr(type(model), "_upload_modified_files", upload)
    model.push_to_hub("org/cvae")
    assert uploaded["config"]["saved_as"] == "adapter"
    assert not any(name.startswith(("model.", "lm_head.")) for name in uploaded["weights"])


def lora_trained(base: Path):
    """A CVAE on `base` with LoRA adapters whose weights are not zero (as after training): `(peft_model, cvae)`."""
    from cvae_llama.training.lora import apply_lora

    peft_model = apply_lora(cvae_on(base), r=2, target_modules=("q_proj", "v_proj"))
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if ".lora_B." in name:
                parameter.copy_(0.1 * torch.randn(parameter.shape, generator=generator))
    return peft_model.eval()


def test_lora_is_saved_unmerged_in_the_adapter_and_loads_bitwise(base, tmp_path):
    from cvae_llama.training.lora import lora_adapter_model

    peft_model = lora_trained(base)
    expected = outputs(peft_model, INPUTS, LATENT)
    model = lora_adapter_model(peft_model)
    assert type(model) is CVAELlamaForCausalLM and model.config.decoder_lora["r"] == 2
    unwrapped = outputs(model, INPUTS, LATENT)
    # the same model (peft's wrappers keep the memory's MLPs from running stacked: equal to rounding)
    torch.testing.assert_close(unwrapped["logits"], expected["logits"], rtol=0, atol=1e-6)
    assert torch.equal(unwrapped["posterior"], expected["posterior"])
    expected = unwrapped
    model.save_pretrained(tmp_path / "adapter")
    weights = load_file(tmp_path / "adapter" / "model.safetensors")
    lora = [name for name in weights if ".lora_" in name]
    assert lora and all(name.startswith("model.layers.") for name in lora)  # LoRA's, on the decoder only
    assert not any(name.startswith(("model.", "lm_head.")) and ".lora_" not in name for name in weights)
    assert not (tmp_path / "adapter" / "adapter_config.json").exists()
    loaded = CVAELlamaForCausalLM.from_pretrained(tmp_path / "adapter")
    assert all(torch.equal(value, expected[key]) for key, value in outputs(loaded, INPUTS, LATENT).items())
    with pytest.raises(ValueError, match="as a standalone folder, which holds the LLM's own layers"):
        loaded.save_pretrained(tmp_path / "standalone", standalone=True)
    # without the package, by its remote code
    tiny_tokenizer().save_pretrained(tmp_path / "adapter")
    report, found = run_without_cvae_llama(tmp_path, str(tmp_path / "adapter"))
    assert_same_as_local(loaded, report, found)


def test_a_lora_adapter_without_peft_says_so(base, tmp_path, monkeypatch):
    from cvae_llama.training.lora import lora_adapter_model

    lora_adapter_model(lora_trained(base)).save_pretrained(tmp_path / "adapter")
    monkeypatch.setitem(__import__("sys").modules, "peft", None)  # `from peft import ...` fails
    with pytest.raises(ImportError, match="decoder has LoRA layers .* needs peft, which is not installed"):
        CVAELlamaForCausalLM.from_pretrained(tmp_path / "adapter")


def test_the_remote_code_imports_peft_only_for_lora_layers():
    """The one import of peft in the remote code is inside `inject_decoder_lora`, which only a folder holding LoRA
    weights reaches."""
    import ast

    tree = ast.parse((PACKAGE / "modeling_cvae_llama.py").read_text())
    found = []
    for function in ast.walk(tree):
        if isinstance(function, ast.FunctionDef):
            for node in ast.walk(function):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    names = [node.module] if isinstance(node, ast.ImportFrom) else [alias.name for alias in node.names]
                    found += [(function.name, name) for name in names if name.split(".")[0] == "peft"]
    top_level = [node for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))]
    assert not any("peft" in ast.dump(node) for node in top_level)
    assert found == [("inject_decoder_lora", "peft")]


@pytest.mark.parametrize("how", ["package imported", "trust_remote_code"])
def test_the_tokenizer_of_an_adapter_folder_loads_without_a_question(base, tmp_path, how):
    """`AutoTokenizer` reads a folder's config.json before its tokenizer files, and transformers asks whether to run
    the folder's code for a model type it does not know: once cvae_llama is imported (it registers the type), or with
    `trust_remote_code=True`, it asks nothing and warns nothing, and the tokenizer is the base's class."""
    import subprocess
    import sys
    import textwrap

    cvae_on(base).save_pretrained(tmp_path / "adapter")
    tiny_tokenizer().save_pretrained(tmp_path / "adapter")
    load = (
        "import cvae_llama; tokenizer = AutoTokenizer.from_pretrained(folder)"
        if how == "package imported"
        else "tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)"
    )
    script = textwrap.dedent(f"""
        import sys
        from transformers import AutoTokenizer
        folder = sys.argv[1]
        {load}
        print(type(tokenizer).__name__, tokenizer.decode([5, 6]))
    """)
    environment = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path / "adapter")], capture_output=True, text=True,
                            stdin=subprocess.DEVNULL, timeout=300, env=environment)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    expected = type(AutoTokenizer.from_pretrained(base)).__name__  # the base's own tokenizer class
    assert result.stdout.strip() == f"{expected} w5 w6"  # one line: nothing asked on stdout
    assert "custom code" not in result.stderr and "model of type" not in result.stderr


def test_the_memory_follows_loras_update_so_merging_keeps_the_model(base):
    """Shared, the memory's keys and values go through the decoder layer's own projections as LoRA adapts them, so
    that merging LoRA into the decoder (peft's `merge_and_unload`) leaves the model's outputs as they were."""
    peft_model = lora_trained(base)  # LoRA on q_proj and v_proj, its B matrices not zero
    cvae = peft_model.get_base_model()
    with torch.no_grad():
        with_lora = cvae.latent_memory.keys_and_values(LATENT, cvae.model)
        logits = peft_model(INPUTS, latent=LATENT).logits
        merged = peft_model.merge_and_unload()
        assert torch.allclose(merged(INPUTS, latent=LATENT).logits, logits, rtol=0, atol=1e-5)
        llm = LlamaForCausalLM.from_pretrained(base).state_dict()
        for name, parameter in merged.named_parameters():
            if name.endswith("v_proj.weight") and name.startswith("model."):  # the LLM's, without LoRA's update
                parameter.copy_(llm[name])
        without_lora = cvae.latent_memory.keys_and_values(LATENT, merged.model)
    assert not torch.equal(with_lora[0][1], without_lora[0][1])
