"""A CVAE on a quantised LLM (issue 39): `from_llm(path, quantization_config=BitsAndBytesConfig(...))` builds a CVAE
whose decoder is the LLM's 4-bit (or 8-bit) layers, frozen, while the CVAE's own modules train in a normal dtype; it
generates with a latent, saves as an adapter that records the quantisation, and reloads quantised (with or without the
package) to the same logits. What cannot work with quantised weights is refused."""

import json
from pathlib import Path

import pytest
import torch
from conftest import open_memory_gates, tiny_base_config
from safetensors.torch import load_file
from test_remote_code import run_without_cvae_llama, tiny_tokenizer
from torch import nn
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaForCausalLM

from cvae_llama import CVAELlamaForCausalLM


bnb = pytest.importorskip("bitsandbytes")
pytestmark = pytest.mark.usefixtures("one_thread")

# bitsandbytes quantises in blocks of 64 inputs: the tiny decoder is 64 wide (the common tests' is 32)
WIDE = dict(hidden_size=64, intermediate_size=128)
NF4 = dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
INPUTS = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16]])
LATENT = torch.randn(2, 8, generator=torch.Generator().manual_seed(2))


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A tiny seeded Llama saved with its tokenizer: the base LLM, as users have one."""
    folder = tmp_path_factory.mktemp("quantized") / "llm"
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_base_config("llama", **WIDE)).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def quantized_cvae(base: Path, bits: int = 4, **fields) -> CVAELlamaForCausalLM:
    settings = NF4 if bits == 4 else dict(load_in_8bit=True)
    fields.setdefault("latent_size", 8)
    return CVAELlamaForCausalLM.from_llm(base, quantization_config=BitsAndBytesConfig(**settings), **fields)


def trained_a_little(model: CVAELlamaForCausalLM, steps: int = 3) -> CVAELlamaForCausalLM:
    """A few AdamW steps on the negative ELBO with the gates open: the zero-initialised read-out moves, so that every
    trainable tensor gets a gradient afterwards."""
    open_memory_gates(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(steps):
        model(INPUTS, labels=INPUTS).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


def quantized_linears(module: nn.Module) -> list[str]:
    return [name for name, sub in module.named_modules() if isinstance(sub, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))]


@pytest.mark.parametrize("bits", [4, 8])
def test_the_decoder_is_quantised_and_the_cvae_s_own_modules_are_not(base, bits):
    model = quantized_cvae(base, bits)
    decoder_linears = [name for name, sub in model.model.layers.named_modules() if isinstance(sub, nn.Linear)]
    assert decoder_linears and quantized_linears(model.model.layers) == decoder_linears  # every linear of the decoder
    own = [model.encoder, model.latent_memory, model.latent_skip]
    assert all(quantized_linears(module) == [] for module in own)
    assert all(p.dtype == torch.float32 for module in own for p in module.parameters())
    assert model.quantization_method == "bitsandbytes" and getattr(model, f"is_loaded_in_{bits}bit")
    recorded = model.config.base_model_quantization_config
    assert recorded["quant_method"] == "bitsandbytes" and recorded[f"load_in_{bits}bit"]
    assert not hasattr(model.config, "quantization_config")  # which would quantise the CVAE's own layers on loading
    if bits == 4:  # the encoder's layers start as the dequantised LLM's
        llm = AutoModelForCausalLM.from_pretrained(base, quantization_config=BitsAndBytesConfig(**NF4))
        weight = llm.model.layers[0].mlp.up_proj.weight
        expected = bnb.functional.dequantize_4bit(weight.data, weight.quant_state)
        torch.testing.assert_close(model.encoder.layers[0].mlp.up_proj.weight, expected)
    with pytest.raises(ValueError, match="cannot cast a bitsandbytes model"):  # transformers' guard, as for the LLM
        model.to(torch.bfloat16)


def test_a_fresh_quantised_cvae_is_its_quantised_llm(base):
    model = quantized_cvae(base).eval()
    llm = AutoModelForCausalLM.from_pretrained(base, quantization_config=BitsAndBytesConfig(**NF4)).eval()
    for module in llm.modules():  # the stored form of the weights, as the CVAE keeps it (see `adopt_quantization`)
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    with torch.no_grad():
        torch.testing.assert_close(model(INPUTS, latent=LATENT).logits, llm(INPUTS).logits)


def test_a_4bit_cvae_trains_its_own_modules_and_no_quantised_weight(base):
    model = trained_a_little(quantized_cvae(base))
    model.train()
    model(INPUTS, labels=INPUTS).loss.backward()
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {name for name, p in model.named_parameters() if not name.startswith(("model.", "lm_head."))
                         and ".embed_tokens." not in name}  # fmt: skip
    missing = [
        name for name, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())
    ]
    assert missing == []
    quantized = [name for name, p in model.named_parameters() if type(p).__name__ == "Params4bit"]
    assert quantized and all(not dict(model.named_parameters())[name].requires_grad for name in quantized)
    assert all(dict(model.named_parameters())[name].grad is None for name in quantized)


def test_a_4bit_cvae_generates_what_its_latent_says(base):
    model = trained_a_little(quantized_cvae(base))
    first = model.generate(INPUTS, latent=LATENT, max_new_tokens=6, do_sample=False)
    assert torch.equal(first, model.generate(INPUTS, latent=LATENT, max_new_tokens=6, do_sample=False))
    with torch.no_grad():
        logits = model(INPUTS, latent=LATENT).logits
        assert not torch.allclose(logits, model(INPUTS, latent=-LATENT).logits)  # the decoder reads z


def test_a_4bit_cvae_saves_as_an_adapter_and_reloads_quantised(base, tmp_path):
    model = trained_a_little(quantized_cvae(base))
    model.save_pretrained(tmp_path / "cvae")
    saved = json.loads((tmp_path / "cvae" / "config.json").read_text())
    assert saved["saved_as"] == "adapter" and "quantization_config" not in saved
    assert saved["base_model_quantization_config"]["load_in_4bit"]
    weights = load_file(tmp_path / "cvae" / "model.safetensors")
    assert weights and not any(name.startswith(("model.", "lm_head.")) for name in weights)
    assert all(tensor.dtype == torch.float32 for tensor in weights.values() if tensor.is_floating_point())

    loaded = CVAELlamaForCausalLM.from_pretrained(tmp_path / "cvae")
    assert quantized_linears(loaded.model) == quantized_linears(model.model)
    assert quantized_linears(loaded.encoder) == quantized_linears(loaded.latent_memory) == []
    with torch.no_grad():
        torch.testing.assert_close(loaded(INPUTS, latent=LATENT).logits, model(INPUTS, latent=LATENT).logits,
                                   rtol=0, atol=0)  # fmt: skip
        torch.testing.assert_close(loaded.encode(INPUTS)[0], model.encode(INPUTS)[0], rtol=0, atol=0)
    # saved again after use, the folder is the same (nothing in the decoder moved)
    loaded.generate(INPUTS, latent=LATENT, max_new_tokens=2, do_sample=False)
    loaded.save_pretrained(tmp_path / "again")
    assert load_file(tmp_path / "again" / "model.safetensors").keys() == weights.keys()


def test_remote_code_loads_a_4bit_cvae_quantised_without_the_package(base, tmp_path):
    model = trained_a_little(quantized_cvae(base))
    model.save_pretrained(tmp_path / "cvae")
    tiny_tokenizer().save_pretrained(tmp_path / "cvae")
    report, found = run_without_cvae_llama(tmp_path, str(tmp_path / "cvae"))
    assert report["installed_modules"] == [] and report["decoder_linear"] == "Linear4bit"
    with torch.no_grad():
        logits = model(found["inputs"]["input_ids"], latent=found["inputs"]["latent"]).logits
    torch.testing.assert_close(found["logits"], logits, rtol=0, atol=0)


def test_what_cannot_work_with_a_quantised_decoder_is_refused(base, tmp_path):
    with pytest.raises(ValueError, match=r'decoder_mode="full" trains the decoder, but its weights are quantised'):
        quantized_cvae(base, decoder_mode="full")
    model = quantized_cvae(base)
    model.config.decoder_mode = "full"
    with pytest.raises(ValueError, match="bitsandbytes 4-bit \\(nf4\\)"):
        model.apply_decoder_mode()
    model.config.decoder_mode = "frozen"
    with pytest.raises(ValueError, match="standalone=True was asked"):
        model.save_pretrained(tmp_path / "standalone", standalone=True)
    # an LLM object without stored weights to name: no adapter can be saved, and no standalone folder either
    llm = AutoModelForCausalLM.from_pretrained(base, quantization_config=BitsAndBytesConfig(**NF4))
    llm.name_or_path = ""
    unnamed = CVAELlamaForCausalLM.from_llm(llm, latent_size=8)
    with pytest.raises(ValueError, match="the decoder is quantised .* it cannot here: its base LLM"):
        unnamed.save_pretrained(tmp_path / "unnamed")
    assert not (tmp_path / "unnamed" / "model.safetensors").exists()


def test_a_quantised_llm_object_is_taken_as_it_is_with_a_warning(base, caplog):
    llm = AutoModelForCausalLM.from_pretrained(base, quantization_config=BitsAndBytesConfig(**NF4)).eval()
    with torch.no_grad():
        before = llm(INPUTS).logits
    model = CVAELlamaForCausalLM.from_llm(llm, latent_size=8)
    assert "the CVAE takes its decoder and head as they are" in caplog.text
    assert model.model is llm.model and model.lm_head is llm.lm_head
    with torch.no_grad():
        torch.testing.assert_close(llm(INPUTS).logits, before, rtol=0, atol=0)  # the LLM alone runs as before


def test_qlora_lora_on_a_4bit_decoder_trains_saves_and_reloads(base, tmp_path):
    from cvae_llama.training.lora import apply_lora, lora_adapter_model

    peft_model = apply_lora(quantized_cvae(base), r=4, target_modules=("q_proj", "v_proj"))
    lora_layers = [
        sub for sub in peft_model.modules() if type(sub).__name__ == "Linear4bit" and hasattr(sub, "lora_A")
    ]
    assert len(lora_layers) == 2 * 2  # peft's 4-bit LoRA layers on the decoder's q and v projections
    model = peft_model.get_base_model()
    open_memory_gates(model)
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    peft_model.train()
    for _ in range(3):
        peft_model(input_ids=INPUTS, labels=INPUTS).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    trained = {name: p for name, p in peft_model.named_parameters() if p.requires_grad}
    assert any(".lora_B." in name and p.any() for name, p in trained.items())  # LoRA moved
    assert not any(type(p).__name__ == "Params4bit" for p in trained.values())

    model = lora_adapter_model(peft_model).eval()
    model.save_pretrained(tmp_path / "qlora")
    saved = json.loads((tmp_path / "qlora" / "config.json").read_text())
    assert saved["decoder_lora"]["r"] == 4 and saved["base_model_quantization_config"]["load_in_4bit"]
    loaded = CVAELlamaForCausalLM.from_pretrained(tmp_path / "qlora")
    assert quantized_linears(loaded.model.layers) == quantized_linears(model.model.layers)
    with torch.no_grad():
        torch.testing.assert_close(loaded(INPUTS, latent=LATENT).logits, model(INPUTS, latent=LATENT).logits,
                                   rtol=0, atol=0)  # fmt: skip
    # merging LoRA into 4-bit weights rounds them: the merged decoder is not the base, and no folder holds it
    to_merge = apply_lora(quantized_cvae(base), r=4)
    with torch.no_grad():
        for name, parameter in to_merge.named_parameters():
            if ".lora_B." in name:
                parameter.normal_(std=0.5)
    merged = to_merge.merge_and_unload()
    with pytest.raises(ValueError, match="the decoder is quantised .* the decoder is not the base LLM"):
        merged.save_pretrained(tmp_path / "merged")


@pytest.mark.parametrize("checkpointing", [False, True])
def test_the_qlora_recipe_peft_s_kbit_preparation_then_lora_trains_every_trainable_tensor(base, checkpointing):
    """peft's QLoRA recipe on the CVAE, the LLM loaded in bfloat16 and computing in bfloat16:
    `prepare_model_for_kbit_training` (it freezes everything, casts the norms and embeddings to float32 and, with
    checkpointing, makes the inputs require gradients), then `apply_lora`, which trains the CVAE's own modules again."""
    from peft import prepare_model_for_kbit_training

    from cvae_llama.training.lora import apply_lora

    quantization = BitsAndBytesConfig(**{**NF4, "bnb_4bit_compute_dtype": torch.bfloat16,
                                         "bnb_4bit_use_double_quant": True})  # fmt: skip
    model = CVAELlamaForCausalLM.from_llm(base, quantization_config=quantization, dtype=torch.bfloat16, latent_size=8)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing)
    assert model.model.norm.weight.dtype == torch.float32 and not any(p.requires_grad for p in model.parameters())
    open_memory_gates(model)
    with torch.no_grad():  # a read-out that has moved, so that the encoder's layers get a gradient
        model.encoder.to_latent_mean_logvar[-1].weight.normal_(std=0.1)
    peft_model = apply_lora(model, r=4)
    with torch.no_grad():  # LoRA's B has moved too, so that its A gets a gradient
        for name, parameter in peft_model.named_parameters():
            if ".lora_B." in name:
                parameter.normal_(std=0.1)
    peft_model.train()
    peft_model(input_ids=INPUTS, labels=INPUTS).loss.backward()
    trainable = {name: p for name, p in peft_model.named_parameters() if p.requires_grad}
    assert any(".lora_A." in name for name in trainable) and any(".encoder." in name for name in trainable)
    assert [name for name, p in trainable.items() if p.grad is None or not p.grad.any()] == []
    assert {p.dtype for p in trainable.values()} == {torch.float32}
    assert model.model.layers[0].self_attn.q_proj.base_layer.weight.grad is None


def test_loading_arguments_choose_another_quantisation_of_the_base(base, tmp_path):
    trained_a_little(quantized_cvae(base)).save_pretrained(tmp_path / "cvae")
    plain = CVAELlamaForCausalLM.from_pretrained(tmp_path / "cvae", quantization_config=None)
    assert quantized_linears(plain) == [] and not getattr(plain, "is_loaded_in_4bit", False)
    assert not hasattr(plain.config, "base_model_quantization_config")
    eight = AutoModelForCausalLM.from_pretrained(tmp_path / "cvae", trust_remote_code=True,
                                                 quantization_config=BitsAndBytesConfig(load_in_8bit=True))  # fmt: skip
    assert eight.is_loaded_in_8bit and eight.config.base_model_quantization_config["load_in_8bit"]
    assert all(isinstance(module, bnb.nn.Linear8bitLt) for module in
               (eight.model.layers[0].self_attn.q_proj, eight.model.layers[1].mlp.down_proj))  # fmt: skip


def test_a_standalone_folder_is_not_loaded_quantised(base, tmp_path):
    """transformers would quantise a standalone folder whole, the CVAE's own layers too: refused."""
    CVAELlamaForCausalLM.from_llm(base, latent_size=8).save_pretrained(tmp_path / "whole", standalone=True)
    with pytest.raises(ValueError, match="is a standalone folder, which transformers would quantise whole"):
        CVAELlamaForCausalLM.from_pretrained(tmp_path / "whole", quantization_config=BitsAndBytesConfig(**NF4))
