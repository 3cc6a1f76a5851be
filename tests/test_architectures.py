"""The same CVAE around every supported decoder architecture: Llama, Mistral, Qwen2 (and Qwen2.5) and Qwen3.

Each test runs on a tiny random config of each architecture with that architecture's own features switched on
(`conftest.ARCHITECTURE_OVERRIDES`: Mistral's and Qwen2's sliding windows, short enough to act on these inputs,
Qwen2's q/k/v biases, Qwen3's per-head q/k norms and a head size that is not hidden / heads). Plus: a folder saved by
version 0.1.0.dev0, before other architectures than Llama, still loads to the outputs that version computed.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import ARCHITECTURES, open_memory_gates, tiny_base_config, tiny_cvae_config
from ddp_train import build_groups, build_tokenizer
from safetensors.torch import load_file
from test_remote_code import CODE_FILES, PACKAGE, assert_same_as_local, run_without_cvae_llama, tiny_tokenizer
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from cvae_llama import CVAELlamaConfig, CVAELlamaForCausalLM
from cvae_llama.configuration_cvae_llama import BASE_CONFIG_CLASSES
from cvae_llama.evaluation import decoder_as_causal_lm
from cvae_llama.export import export_hub_folder
from cvae_llama.loading import build_or_load_cvae
from cvae_llama.modeling_cvae_llama import DECODER_ARCHITECTURES
from cvae_llama.trainer import CVAETrainer, CVAETrainingArguments


pytestmark = pytest.mark.usefixtures("one_thread")
SAVED_FOLDER = Path(__file__).parent / "fixtures" / "saved_0.1.0.dev0"


def tiny_llm(base_model_type: str, attn_implementation: str = "sdpa", seed: int = 0, **overrides):
    """A seeded tiny LLM of the architecture, its norms' weights moved off 1 so that copying them is visible."""
    config = tiny_base_config(base_model_type, **overrides)
    config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    llm = DECODER_ARCHITECTURES[base_model_type].causal_lm(config).eval()
    with torch.no_grad():
        for name, parameter in llm.named_parameters():
            if "norm" in name:
                parameter.add_(0.1 * torch.randn_like(parameter))
    return llm


def input_ids(batch_size: int = 2, length: int = 9) -> torch.Tensor:
    return torch.randint(3, 99, (batch_size, length), generator=torch.Generator().manual_seed(1))


def test_every_architecture_has_its_config_and_its_transformers_classes():
    assert tuple(BASE_CONFIG_CLASSES) == tuple(DECODER_ARCHITECTURES) == ARCHITECTURES
    for name, architecture in DECODER_ARCHITECTURES.items():
        assert architecture.causal_lm.config_class is BASE_CONFIG_CLASSES[name]
        for part in (architecture.model, architecture.decoder_layer, architecture.attention):
            assert part.__module__ == f"transformers.models.{name}.modeling_{name}", part  # transformers' own


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("base_model_type", ARCHITECTURES)
def test_without_the_memory_the_cvae_is_the_base_model(base_model_type, attn_implementation):
    """Embedding injection only (zero-initialised) and no memory: the CVAE's logits are the LLM's, for any latent,
    with a sliding window shorter than the input and with left padding."""
    llm = tiny_llm(base_model_type, attn_implementation)
    cvae = CVAELlamaForCausalLM.from_llm(llm, latent_injection="embedding", latent_size=8).eval()
    assert type(cvae.model) is DECODER_ARCHITECTURES[base_model_type].model
    assert cvae.config._attn_implementation == attn_implementation
    ids = input_ids()
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    with torch.no_grad():
        for kwargs in ({}, {"attention_mask": mask}):
            expected = llm(ids, **kwargs).logits
            for latent in (None, torch.randn(2, 8)):
                torch.testing.assert_close(cvae(ids, latent=latent, **kwargs).logits, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("share_llm_weights", [True, False])
@pytest.mark.parametrize("base_model_type", ARCHITECTURES)
def test_from_llm_copies_the_weights_bitwise_and_leaves_the_llm_unchanged(base_model_type, share_llm_weights):
    """The decoder and the encoder's layers are copies of the LLM's; the encoder's embedding and the memory's key /
    value projections are the decoder's own modules (no parameter of the CVAE holds them twice), or, with
    `share_llm_weights=False` (folders saved before it), copies of the LLM's."""
    llm = tiny_llm(base_model_type)
    before = {name: tensor.clone() for name, tensor in llm.state_dict().items()}
    cvae = CVAELlamaForCausalLM.from_llm(llm, latent_size=8, share_llm_weights=share_llm_weights)
    after = llm.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[name], after[name]) for name in before)
    state = cvae.state_dict()
    for name, tensor in before.items():  # the decoder: the checkpoint names of the architecture's causal LM
        assert torch.equal(state[name], tensor), name
    assert cvae.config.base_model_type == base_model_type
    for index, layer in enumerate(cvae.encoder.layers):
        assert type(layer) is DECODER_ARCHITECTURES[base_model_type].decoder_layer
        copied = llm.model.layers[index].state_dict()
        assert layer.state_dict().keys() == copied.keys()
        assert all(torch.equal(tensor, copied[name]) for name, tensor in layer.state_dict().items())
    copies = [
        name for name in state
        if name.startswith("encoder.embed_tokens.")
        or (name.startswith("latent_memory.") and any(f".{part}." in name for part in ("k_proj", "v_proj", "k_norm")))
    ]  # fmt: skip
    if share_llm_weights:
        assert copies == [] and cvae.encoder.embed_tokens is None
        assert all(layer.k_proj is None and layer.v_proj is None for layer in cvae.latent_memory.layers)
        storages = [parameter.data_ptr() for parameter in cvae.parameters()]
        assert len(storages) == len(set(storages))  # nothing held twice (the head is tied to the embedding)
        return
    assert copies and torch.equal(cvae.encoder.embed_tokens.weight, llm.model.embed_tokens.weight)
    for memory, layer in zip(cvae.latent_memory.layers, llm.model.layers, strict=True):
        parts = ("k_proj", "v_proj", "k_norm") if base_model_type == "qwen3" else ("k_proj", "v_proj")
        assert (memory.k_norm is not None) == (base_model_type == "qwen3")
        for part in parts:
            mine, theirs = getattr(memory, part).state_dict(), getattr(layer.self_attn, part).state_dict()
            assert mine.keys() == theirs.keys() and all(torch.equal(mine[key], theirs[key]) for key in mine), part
    if base_model_type == "qwen2":  # Qwen2's key / value projections have biases, the memory's copies too
        assert cvae.latent_memory.layers[0].k_proj.bias is not None


@pytest.mark.parametrize("base_model_type", ARCHITECTURES)
def test_the_memory_keys_are_computed_as_the_architecture_computes_keys(base_model_type):
    """Each layer's memory keys are the layer's own attention applied to the slots' states: its key projection, its
    key norm (Qwen3), its rotary embedding at the slots' positions 0 .. slots - 1."""
    llm = tiny_llm(base_model_type)
    cvae = CVAELlamaForCausalLM.from_llm(llm, latent_size=8).eval()
    module = __import__(DECODER_ARCHITECTURES[base_model_type].model.__module__, fromlist=["apply_rotary_pos_emb"])
    latent = torch.randn(3, 8)
    num_slots = cvae.config.num_memory_slots
    with torch.no_grad():
        memory = cvae.latent_memory.keys_and_values(latent, cvae.model)
        cos, sin = cvae.model.rotary_emb(latent, position_ids=torch.arange(num_slots)[None])
        for index, (memory_layer, layer) in enumerate(zip(cvae.latent_memory.layers, cvae.model.layers, strict=True)):
            attention = layer.self_attn
            states = memory_layer.norm(memory_layer.to_states(latent).view(3, num_slots, -1))
            shape = (3, num_slots, -1, attention.head_dim)
            key = attention.k_proj(states).view(shape)
            if base_model_type == "qwen3":
                key = attention.k_norm(key)
            _, key = module.apply_rotary_pos_emb(key.transpose(1, 2), key.transpose(1, 2), cos, sin)
            value = attention.v_proj(states).view(shape).transpose(1, 2)
            torch.testing.assert_close(memory[index][0], key, rtol=0, atol=1e-6)
            torch.testing.assert_close(memory[index][1], value, rtol=0, atol=1e-6)


@pytest.mark.parametrize("base_model_type", ARCHITECTURES)
def test_cached_generation_equals_a_full_forward(base_model_type):
    """Greedy decoding with the cache writes the tokens that a full forward of the whole sequence predicts, past the
    sliding window too (with a window the memory goes to every step's attention rather than into the cache)."""
    cvae = open_memory_gates(CVAELlamaForCausalLM.from_llm(tiny_llm(base_model_type), latent_size=8).eval())
    with torch.no_grad():
        cvae.latent_memory.layers[0].to_states[-1].weight.mul_(20)  # a latent the decoder cannot miss
    ids, latent = input_ids(), torch.randn(2, 8, generator=torch.Generator().manual_seed(2))
    output = cvae.generate(ids, latent=latent, max_new_tokens=8, do_sample=False, output_scores=True,
                           return_dict_in_generate=True)  # fmt: skip
    with torch.no_grad():
        logits = cvae(output.sequences, latent=latent, use_cache=False).logits[:, ids.shape[1] - 1 : -1]
    torch.testing.assert_close(torch.stack(output.scores, dim=1), logits, rtol=1e-4, atol=1e-4)
    assert torch.equal(logits.argmax(-1), output.sequences[:, ids.shape[1] :])
    other = cvae.generate(ids, latent=-latent, max_new_tokens=8, do_sample=False, output_scores=True,
                          return_dict_in_generate=True)  # fmt: skip
    assert (other.scores[-1] - output.scores[-1]).abs().max() > 1e-3  # the latent reaches the last cached step


def cvae_for_tokenizer(tokenizer, base_model_type: str, **cvae_fields) -> CVAELlamaForCausalLM:
    overrides = dict(vocab_size=len(tokenizer), max_position_embeddings=128, pad_token_id=tokenizer.pad_token_id,
                     bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)  # fmt: skip
    torch.manual_seed(0)
    return CVAELlamaForCausalLM(tiny_cvae_config(overrides, base_model_type, **cvae_fields))


def train_briefly(model, tokenizer, output_dir, **overrides) -> CVAETrainer:
    values = dict(
        output_dir=str(output_dir), per_device_train_batch_size=1, max_steps=3, learning_rate=1e-2, logging_steps=1,
        save_strategy="no", report_to="none", disable_tqdm=True, use_cpu=True, seed=0, dg_samples=4,
        max_prompt_tokens=8, max_response_tokens=8,
    )  # fmt: skip
    args = CVAETrainingArguments(**{**values, **overrides})
    trainer = CVAETrainer(model, args, train_dataset=build_groups(), processing_class=tokenizer)
    trainer.train()
    return trainer


@pytest.mark.parametrize("base_model_type", ARCHITECTURES)
def test_dg_gskip_training_runs_and_moves_every_trainable_part(base_model_type, tmp_path):
    tokenizer = build_tokenizer()
    model = cvae_for_tokenizer(tokenizer, base_model_type)
    assert (model.config.skip_connection, model.config.decoder_mode) == ("gskip", "frozen")
    initial = {name: parameter.detach().clone() for name, parameter in model.named_parameters()}
    trainer = train_briefly(model, tokenizer, tmp_path, objective="dg")
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 3 and all(torch.isfinite(torch.tensor(entry["loss"])) for entry in logs)
    for name, parameter in model.named_parameters():
        moved = not torch.equal(parameter, initial[name])
        assert moved == parameter.requires_grad, name  # the trained parts move, the frozen copies and LLM do not
    assert any(
        name.startswith("latent_skip.") and parameter.requires_grad for name, parameter in model.named_parameters()
    )


@pytest.mark.parametrize("base_model_type", ARCHITECTURES)
def test_saved_folder_loads_by_remote_code_without_the_package(base_model_type, tmp_path):
    torch.manual_seed(0)
    model = CVAELlamaForCausalLM(tiny_cvae_config(base_model_type=base_model_type)).eval()
    with torch.no_grad():
        model.encoder.to_latent_mean_logvar[-1].weight.normal_(std=0.5)
    folder = tmp_path / "saved"
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    assert config["base_model_type"] == base_model_type and config["model_type"] == "cvae_llama"
    report, outputs = run_without_cvae_llama(tmp_path, str(folder))
    assert_same_as_local(model, report, outputs)


@pytest.mark.parametrize("base_model_type", ARCHITECTURES)
def test_lora_mode_merges_and_reloads(base_model_type, tmp_path):
    tokenizer = build_tokenizer()
    model = cvae_for_tokenizer(tokenizer, base_model_type, decoder_mode="lora")
    peft_model = train_briefly(model, tokenizer, tmp_path, objective="dg", learning_rate=5e-2).model
    lora_b = [parameter for name, parameter in peft_model.named_parameters() if ".lora_B." in name]
    assert lora_b and all(parameter.abs().max() > 0 for parameter in lora_b)
    ids = torch.tensor([[1, 5, 9, 12, 7], [1, 20, 21, 22, 2]])
    latent = torch.randn(2, 8, generator=torch.Generator().manual_seed(0))
    peft_model.eval()
    with torch.no_grad():
        before = peft_model(input_ids=ids, latent=latent).logits
    merged = peft_model.merge_and_unload()
    assert type(merged) is CVAELlamaForCausalLM
    merged.save_pretrained(tmp_path / "merged")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", trust_remote_code=True).eval()
    assert reloaded.config.base_model_type == base_model_type
    with torch.no_grad():
        for candidate in (merged.eval(), reloaded):
            torch.testing.assert_close(candidate(input_ids=ids, latent=latent).logits, before, rtol=0, atol=1e-5)


@pytest.mark.parametrize("base_model_type", ARCHITECTURES)
def test_the_command_lines_loader_builds_around_a_saved_llm_whose_plain_decoder_is_its_class(
    base_model_type, tmp_path
):
    llm = tiny_llm(base_model_type)
    llm.save_pretrained(tmp_path / "llm")
    cvae = build_or_load_cvae(tmp_path / "llm", {"latent_size": 8, "latent_injection": "embedding"}).eval()
    assert cvae.config.base_model_type == base_model_type
    plain = decoder_as_causal_lm(cvae)
    assert type(plain) is type(llm) and type(plain.config) is type(llm.config)
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids()).logits, llm(input_ids()).logits, rtol=0, atol=1e-5)


def test_the_command_line_trains_generates_and_exports_around_a_qwen3_llm(tmp_path):
    from test_cli import TRAIN_FLAGS, run

    tiny_llm("qwen3").save_pretrained(tmp_path / "llm")
    tiny_tokenizer().save_pretrained(tmp_path / "llm")
    rows = [{"prompt": f"w{5 + i} w{6 + i}", "response": f"w{20 + i} w{30 + j} w{40 + i + j}"} for i in range(4)
            for j in range(3)]  # fmt: skip
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    trained = tmp_path / "trained"
    assert run("train", "--model_name_or_path", tmp_path / "llm", "--dataset", tmp_path / "pairs.jsonl",
               "--output_dir", trained, "--group_size", 3, "--max_steps", 2, "--seed", 0, *TRAIN_FLAGS) == 0  # fmt: skip
    assert json.loads((trained / "config.json").read_text())["base_model_type"] == "qwen3"
    assert run("generate", "--model_name_or_path", trained, "--prompt", "w5 w6", "--num_samples", 2,
               "--max_new_tokens", 3, "--output_file", tmp_path / "samples.json") == 0  # fmt: skip
    assert len(json.loads((tmp_path / "samples.json").read_text())["texts"]) == 2
    assert run("export", "--model_name_or_path", trained, "--output_dir", tmp_path / "hub") == 0
    assert "`Qwen3ForCausalLM` architecture" in (tmp_path / "hub" / "README.md").read_text()


def test_an_unsupported_llm_gets_an_error_that_lists_the_supported_ones(tmp_path):
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=99))
    with pytest.raises(ValueError, match="GPT2LMHeadModel") as error:
        CVAELlamaForCausalLM.from_llm(gpt2)
    for name in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"):
        assert name in str(error.value)
    gpt2.save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ValueError, match="'gpt2' model.*'llama', 'mistral', 'qwen2', 'qwen3'"):
        build_or_load_cvae(tmp_path / "gpt2")
    with pytest.raises(ValueError, match="must be the config of a supported decoder architecture.*GPT2Config"):
        CVAELlamaConfig.from_base_config(gpt2.config)


def test_a_subclass_of_a_supported_config_builds_as_its_architecture():
    from transformers import Qwen3Config

    class MyQwen3Config(Qwen3Config):  # e.g. a user's config with an extra field of its own
        pass

    config = CVAELlamaConfig.from_base_config(MyQwen3Config(**tiny_base_config("qwen3").to_dict()), latent_size=8)
    assert config.base_model_type == "qwen3" and config.head_dim == 16


def test_config_validation_knows_each_architectures_fields():
    with pytest.raises(ValueError, match="`base_model_type` must be one of .*got 'gemma'"):
        CVAELlamaConfig(base_model_type="gemma")
    with pytest.raises(ValueError, match="'qwen3' decoder's fields are not valid"):  # Qwen3Config's own check
        CVAELlamaConfig(base_model_type="qwen3", num_hidden_layers=2, layer_types=["full_attention"])
    # the architecture's derived fields are completed, and survive a save / load round trip
    config = CVAELlamaConfig(base_model_type="qwen2", num_hidden_layers=3, use_sliding_window=True, max_window_layers=1,
                             sliding_window=8)  # fmt: skip
    assert config.layer_types == ["full_attention", "sliding_attention", "sliding_attention"]
    reloaded = CVAELlamaConfig.from_dict(config.to_dict())
    assert (reloaded.base_model_type, reloaded.layer_types) == ("qwen2", config.layer_types)
    assert type(reloaded.base_config()) is BASE_CONFIG_CLASSES["qwen2"]


def test_the_model_card_records_the_base_architecture(tmp_path):
    torch.manual_seed(0)
    CVAELlamaForCausalLM(tiny_cvae_config(base_model_type="qwen3")).save_pretrained(tmp_path / "cvae")
    tiny_tokenizer().save_pretrained(tmp_path / "cvae")
    card = (export_hub_folder(tmp_path / "cvae", tmp_path / "hub") / "README.md").read_text()
    assert "`Qwen3ForCausalLM` architecture" in card and "(`base_model_type` qwen3)" in card
    assert "- qwen3" in card.split("---")[1]  # a tag of the card's metadata


# ------------------------------------------------------------------------------ folders saved by earlier versions
def test_a_folder_saved_by_version_0_1_0_loads_to_the_outputs_it_had(tmp_path):
    """`tests/fixtures/saved_0.1.0.dev0` (written by `make_saved_folder.py` with that version, whose config has no
    `base_model_type`): this version's package, and its remote code beside the old config and weights, give the outputs
    that version computed."""
    expected = load_file(SAVED_FOLDER / "expected.safetensors")
    assert "base_model_type" not in json.loads((SAVED_FOLDER / "config.json").read_text())
    model = CVAELlamaForCausalLM.from_pretrained(SAVED_FOLDER).eval()
    assert model.config.base_model_type == "llama"
    ids, latent = expected["input_ids"], expected["latent"]
    with torch.no_grad():
        torch.testing.assert_close(model(ids, latent=latent).logits, expected["logits"], rtol=0, atol=1e-6)
        torch.testing.assert_close(model.encode(ids)[0], expected["latent_mean"], rtol=0, atol=1e-6)
    assert torch.equal(model.generate(ids, latent=latent, max_new_tokens=5, do_sample=False), expected["sequences"])

    folder = tmp_path / "upgraded"  # the old weights and config with this version's two code files
    shutil.copytree(SAVED_FOLDER, folder)
    for name in CODE_FILES:
        shutil.copy(PACKAGE / name, folder / name)
    tiny_tokenizer().save_pretrained(folder)
    report, outputs = run_without_cvae_llama(tmp_path, str(folder))
    assert_same_as_local(model, report, outputs)
