"""`memory_attention="gated"` (issue 27, the default since issue 38): the LLM's attention over the text plus
`g * attention over the memory`, with gates that start at 0, so that a fresh CVAE scores and generates as its LLM does,
for any z, in every architecture and attention implementation, with and without a mask, a cache or gradient
checkpointing; the gates train, `memory_gate_scale` times faster than stored as they are."""

import json

import pytest
import torch
from conftest import ARCHITECTURES, open_memory_gates, tiny_base_config
from transformers import AutoModelForCausalLM

from cvae_llama import CVAELlamaConfig, CVAELlamaForCausalLM


pytestmark = pytest.mark.usefixtures("one_thread")


def fresh_pair(base_model_type: str, implementation: str, memory_attention: str = "gated"):
    torch.manual_seed(0)
    config = tiny_base_config(base_model_type)
    config._attn_implementation = implementation
    llm = AutoModelForCausalLM.from_config(config).eval()
    return llm, CVAELlamaForCausalLM.from_llm(llm, latent_size=8, memory_attention=memory_attention).eval()


def assert_same_logits(actual_model, expected_model):
    """The two models give the same logits for a left-padded batch and a random latent."""
    input_ids, attention_mask = inputs()
    latent = torch.randn(2, 8)
    with torch.no_grad():
        expected = expected_model(input_ids=input_ids, attention_mask=attention_mask, latent=latent).logits
        actual = actual_model(input_ids=input_ids, attention_mask=attention_mask, latent=latent).logits
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def inputs(batch: int = 2, length: int = 9):
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, 99, (batch, length), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1:, :3] = 0  # left padding
    return input_ids, attention_mask


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("base_model_type", ARCHITECTURES)
def test_a_fresh_gated_cvae_is_its_llm_for_any_latent(base_model_type, implementation):
    llm, cvae = fresh_pair(base_model_type, implementation)
    input_ids, attention_mask = inputs()
    latent = torch.randn(2, 8) * 3
    with torch.no_grad():
        for mask in (attention_mask, None):
            expected = llm(input_ids=input_ids, attention_mask=mask).logits
            actual = cvae(input_ids=input_ids, attention_mask=mask, latent=latent).logits
            rows = slice(None) if mask is None else attention_mask.bool()
            torch.testing.assert_close(actual[rows], expected[rows], rtol=1e-5, atol=1e-5)
        expected = llm.generate(input_ids, attention_mask=attention_mask, max_new_tokens=6, do_sample=False)
        actual = cvae.generate(input_ids, attention_mask=attention_mask, max_new_tokens=6, do_sample=False,
                               latent=latent)  # fmt: skip
    assert torch.equal(actual, expected)


def test_the_gated_memory_is_the_default_and_the_joint_memory_changes_a_fresh_cvae():
    """The gated memory, with gates stored divided by 100, is the default; the paper's memory (one softmax over slots
    and text) stays available, and its slots take attention mass."""
    config = CVAELlamaConfig()
    assert (config.memory_attention, config.memory_gate_scale) == ("gated", 100.0)
    llm, cvae = fresh_pair("llama", "sdpa", "joint")
    assert cvae.latent_memory.layers[0].gate is None
    input_ids, attention_mask = inputs()
    with torch.no_grad():
        difference = llm(input_ids=input_ids).logits - cvae(input_ids=input_ids).logits
    assert difference.abs().max() > 1e-2


def test_the_gate_is_its_scale_times_the_stored_parameter():
    """The same gates stored at two scales give the same model; one Adam step opens them by about lr * scale."""
    _, scaled = fresh_pair("llama", "sdpa")
    plain = CVAELlamaForCausalLM(CVAELlamaConfig(**{**scaled.config.to_dict(), "memory_gate_scale": 1.0})).eval()
    plain.load_state_dict(scaled.state_dict())
    open_memory_gates(scaled, 0.7)
    open_memory_gates(plain, 0.7)
    assert plain.latent_memory.layers[0].gate[0].item() == pytest.approx(0.7)
    assert_same_logits(scaled, plain)

    _, fresh = fresh_pair("llama", "sdpa")
    fresh.train()
    input_ids, attention_mask = inputs()
    gates = [layer.gate for layer in fresh.latent_memory.layers]
    optimizer = torch.optim.Adam(gates, lr=1e-3)
    fresh(input_ids=input_ids, attention_mask=attention_mask, labels=input_ids).loss.backward()
    optimizer.step()
    opened = torch.cat([layer.gate_scale * layer.gate.detach() for layer in fresh.latent_memory.layers]).abs()
    torch.testing.assert_close(opened, torch.full_like(opened, 0.1), rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("checkpointing", [None, {"use_reentrant": True}, {"use_reentrant": False}],
                         ids=["no_gc", "reentrant", "non_reentrant"])  # fmt: skip
def test_the_gates_and_then_the_memory_train(checkpointing):
    """At 0 the gates get a gradient (the memory none yet); once open, the memory's weights get one too."""
    _, cvae = fresh_pair("llama", "sdpa")
    if checkpointing is not None:
        cvae.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing)
    cvae.train()
    input_ids, attention_mask = inputs()
    layer = cvae.latent_memory.layers[-1]
    cvae(input_ids=input_ids, attention_mask=attention_mask, labels=input_ids).loss.backward()
    assert layer.gate.grad is not None and layer.gate.grad.abs().min() > 0
    assert not layer.to_states[2].weight.grad.any()
    cvae.zero_grad()
    open_memory_gates(cvae, 0.5)
    cvae(input_ids=input_ids, attention_mask=attention_mask, labels=input_ids).loss.backward()
    assert layer.to_states[2].weight.grad.abs().sum() > 0
    assert any(p.grad is not None and p.grad.any() for p in cvae.encoder.parameters())


def test_an_open_gate_adds_the_memory_in_training_and_decoding_alike():
    """The memory passed to the attention (training, no cache) and the memory in the KV cache (decoding) give the
    same logits once the gates are open."""
    _, cvae = fresh_pair("llama", "sdpa")
    open_memory_gates(cvae, 1.0)
    input_ids, attention_mask = inputs()
    latent = torch.randn(2, 8)
    with torch.no_grad():
        full = cvae(input_ids=input_ids, attention_mask=attention_mask, latent=latent, use_cache=False).logits
        prefix = cvae(input_ids=input_ids[:, :-1], attention_mask=attention_mask[:, :-1], latent=latent,
                      use_cache=True)  # fmt: skip
        step = cvae(input_ids=input_ids[:, -1:], attention_mask=attention_mask, latent=latent,
                    cache=prefix.cache, use_cache=True)  # fmt: skip
        closed = CVAELlamaForCausalLM.from_llm(fresh_pair("llama", "sdpa")[0], latent_size=8,
                                               memory_attention="gated").eval()  # fmt: skip
        baseline = closed(input_ids=input_ids, attention_mask=attention_mask, latent=latent).logits
    torch.testing.assert_close(step.logits[:, -1], full[:, -1], rtol=1e-4, atol=1e-4)
    assert (full - baseline)[attention_mask.bool()].abs().max() > 1e-3  # the open memory does change the text's logits


def test_a_folder_saved_before_the_gate_scale_loads_its_gates_as_they_were(tmp_path):
    """A gated folder saved before `memory_gate_scale` stored the gates themselves: it loads with scale 1."""
    _, cvae = fresh_pair("llama", "sdpa")
    open_memory_gates(cvae, 0.3)
    cvae.save_pretrained(tmp_path)
    config_path = tmp_path / "config.json"
    saved = json.loads(config_path.read_text())
    del saved["memory_gate_scale"]
    config_path.write_text(json.dumps(saved))
    from safetensors.torch import load_file, save_file

    weights = load_file(tmp_path / "model.safetensors")
    for name in [name for name in weights if name.endswith(".gate")]:
        weights[name] = weights[name] * cvae.config.memory_gate_scale  # the gate itself, as such a folder holds it
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    reloaded = CVAELlamaForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.config.memory_gate_scale == 1.0
    assert_same_logits(reloaded, cvae)


def test_a_folder_saved_before_the_field_loads_with_joint_memory(tmp_path):
    _, cvae = fresh_pair("llama", "sdpa", "joint")
    cvae.save_pretrained(tmp_path)
    config_path = tmp_path / "config.json"
    saved = json.loads(config_path.read_text())
    del saved["memory_attention"]
    config_path.write_text(json.dumps(saved))
    reloaded = CVAELlamaForCausalLM.from_pretrained(tmp_path)
    assert reloaded.config.memory_attention == "joint" and reloaded.latent_memory.layers[0].gate is None


def test_an_unknown_memory_attention_is_refused():
    with pytest.raises(ValueError, match="memory_attention. must be one of .*joint.*gated.*got 'softmax'"):
        CVAELlamaConfig(memory_attention="softmax")


@pytest.mark.parametrize("scale", [0, -1.0, float("nan"), float("inf"), True, "100"])
def test_a_gate_scale_that_is_not_a_finite_positive_number_is_refused(scale):
    with pytest.raises(ValueError, match=f"memory_gate_scale. must be a finite positive number, got {scale!r}"):
        CVAELlamaConfig(memory_gate_scale=scale)
