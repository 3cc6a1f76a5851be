"""What code written for every transformers model relies on, in this project's own words (issue 14): evaluation
harnesses that score texts, peft / trl / accelerate, scripts that read `config._attn_implementation`, ask for
attention maps, pass `return_dict=False` or the old `past_key_values` name, and `from cvae_llama import CVAETrainer`.
`test_transformers_common.py` runs transformers' own tests; these say what each fix gives a user. (The tokenizer of a
saved folder loading without `trust_remote_code` is checked in `test_remote_code.py`, where the folder loads in a
process without this package.)
"""

import dataclasses
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path
from unittest import mock

import pytest
import torch
from conftest import tiny_cvae_config
from test_modeling_cvae_llama import make_model
from transformers import DynamicCache

import cvae_llama
from cvae_llama import modeling_cvae_llama
from cvae_llama.modeling_cvae_llama import CVAELlamaForCausalLM, reparameterize


def trained_looking_model(seed: int = 0, **fields) -> CVAELlamaForCausalLM:
    """A tiny model in eval mode whose zero-initialised layers have random weights, as after training: its posterior
    is not N(0, I) and the embedding injection is live."""
    return make_model(seed, perturb_zero_init=True, **fields)


def token_ids(batch: int = 2, length: int = 6, seed: int = 1) -> torch.LongTensor:
    return torch.randint(3, 99, (batch, length), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------ 1. determinism
def test_scoring_a_text_gives_the_same_result_every_time():
    model = trained_looking_model()
    input_ids = token_ids()
    # without a latent and without a posterior: the prior's mean, z = 0
    first, second = model(input_ids), model(input_ids)
    assert torch.equal(first.logits, second.logits)
    assert torch.equal(first.latent, torch.zeros(2, 8))
    assert torch.equal(first.logits, model(input_ids, latent=torch.zeros(8)).logits)
    assert first.latent_mean is None and first.kl_loss is None
    # with labels (a perplexity, a log-likelihood benchmark): the posterior's mean in eval mode
    first, second = model(input_ids, labels=input_ids), model(input_ids, labels=input_ids)
    assert torch.equal(first.loss, second.loss) and torch.equal(first.logits, second.logits)
    mean, logvar = model.encode(input_ids)
    assert torch.equal(first.latent, mean) and not torch.equal(mean, torch.zeros_like(mean))
    assert torch.equal(first.loss, first.reconstruction_loss + first.kl_loss)
    # an explicit latent is used as given
    latent = torch.randn(2, 8, generator=torch.Generator().manual_seed(2))
    assert torch.equal(model(input_ids, latent=latent).latent, latent)
    assert not torch.equal(model(input_ids, latent=latent).logits, first.logits)


def test_training_draws_a_posterior_sample():
    model = trained_looking_model().train()
    input_ids = token_ids()
    torch.manual_seed(3)
    output = model(input_ids, labels=input_ids)
    mean, logvar = model.encode(input_ids)
    torch.manual_seed(3)
    assert torch.equal(output.latent, reparameterize(mean, logvar))
    assert not torch.equal(model(input_ids, labels=input_ids).latent, output.latent)  # a fresh sample each step


def test_generate_still_draws_one_prior_sample_per_returned_sequence():
    model = trained_looking_model()
    prompt = token_ids(1, 3)
    seen = []
    handle = model.register_forward_pre_hook(lambda m, a, kwargs: seen.append(kwargs["latent"]), with_kwargs=True)
    model.generate(prompt, num_return_sequences=3, max_new_tokens=2, do_sample=False)
    model.generate(prompt, num_return_sequences=3, max_new_tokens=2, do_sample=False)
    model.generate(prompt, num_return_sequences=2, latent_temperature=0.0, max_new_tokens=2, do_sample=False)
    handle.remove()
    first_call, second_call, cold = seen[0], seen[2], seen[-1]
    assert first_call.shape == (3, 8) and torch.unique(first_call, dim=0).shape[0] == 3
    assert not torch.equal(first_call, second_call)  # a fresh sample per call
    assert torch.equal(cold, torch.zeros(2, 8))  # latent_temperature scales the samples: 0 is the prior's mean
    # greedy decoding from z = 0 continues as forward's default scores
    greedy = model.generate(prompt, latent_temperature=0.0, max_new_tokens=1, do_sample=False)
    assert greedy[0, -1] == model(prompt).logits[0, -1].argmax()


# ------------------------------------------------------------------------------------------------ 2. attention maps
@pytest.mark.parametrize("memory_attention", ["gated", "joint"])
def test_attention_maps_with_eager_attention(tmp_path, memory_attention):
    trained_looking_model(memory_attention=memory_attention).save_pretrained(tmp_path)
    model = CVAELlamaForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    output = model(token_ids(2, 5), output_attentions=True)
    slots = model.config.num_memory_slots if model.config.memory_attention == "joint" else 0  # gated: the text's
    assert len(output.attentions) == model.config.num_hidden_layers
    assert all(attention.shape == (2, 4, 5, slots + 5) for attention in output.attentions)  # the slots come first
    for attention in output.attentions:
        torch.testing.assert_close(attention.sum(-1), torch.ones(2, 4, 5))
        assert (attention[..., :slots] > 0).all()
    # asked for through the config, as `from_pretrained(..., output_attentions=True)` or a script does
    model = CVAELlamaForCausalLM.from_pretrained(tmp_path, attn_implementation="eager", output_attentions=True)
    assert model.config.output_attentions
    assert all(torch.equal(a, b) for a, b in zip(model.eval()(token_ids(2, 5)).attentions, output.attentions))
    model.config.output_attentions = False
    assert model(token_ids(2, 5)).attentions is None
    model.config.output_attentions = True
    assert len(model(token_ids(2, 5)).attentions) == model.config.num_hidden_layers


# ------------------------------------------------------------------------------------------------ 3. attention name
def test_attn_implementation_is_the_plain_name_and_switches(tmp_path):
    model = trained_looking_model()
    assert model.config._attn_implementation == "sdpa"
    model.save_pretrained(tmp_path)
    assert CVAELlamaForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").config._attn_implementation == (
        "eager"
    )
    input_ids = token_ids()
    latents = torch.randn(2, 2, 8, generator=torch.Generator().manual_seed(4))
    llama = modeling_cvae_llama.DECODER_ARCHITECTURES["llama"]  # the eager attention the memory's wrapper calls
    eager = mock.Mock(wraps=llama.eager_attention)
    replaced = {"llama": dataclasses.replace(llama, eager_attention=eager)}
    with mock.patch.dict(modeling_cvae_llama.DECODER_ARCHITECTURES, replaced):
        sdpa_logits = [model(input_ids, latent=latent).logits for latent in latents]
        assert eager.call_count == 0
        model.set_attn_implementation("eager")
        assert model.config._attn_implementation == "eager" == model.model.config._attn_implementation
        eager_logits = [model(input_ids, latent=latent).logits for latent in latents]
        assert eager.call_count == 2 * model.config.num_hidden_layers  # the decoder switched with the config
    # under either name the latent reaches every layer, and both compute the same
    assert not torch.allclose(sdpa_logits[0], sdpa_logits[1]) and not torch.allclose(eager_logits[0], eager_logits[1])
    for sdpa, eager in zip(sdpa_logits, eager_logits):
        torch.testing.assert_close(sdpa, eager, rtol=0, atol=1e-5)
    model.set_attn_implementation("sdpa")
    assert model.config._attn_implementation == "sdpa"
    with pytest.raises(ValueError, match=r"flex_attention"):
        model.set_attn_implementation("flex_attention")


# ------------------------------------------------------------------------------------------------ 4. outputs, TP, BC
def test_return_dict_false_gives_the_tuple_of_the_outputs():
    model = trained_looking_model()
    input_ids = token_ids()
    for kwargs in ({}, {"labels": input_ids}):
        as_tuple = model(input_ids, return_dict=False, use_cache=False, **kwargs)
        as_output = model(input_ids, use_cache=False, **kwargs)
        assert isinstance(as_tuple, tuple) and len(as_tuple) == len(as_output.to_tuple())
        for value, expected in zip(as_tuple, as_output.to_tuple()):
            assert torch.equal(value, expected)
    assert torch.equal(model(input_ids, return_dict=False, labels=input_ids)[0], as_output.loss)  # the loss first


@pytest.mark.parametrize("share_llm_weights", [True, False])
@pytest.mark.parametrize("latent_injection", ["memory", "embedding"])
def test_tensor_parallel_plan_shards_the_tied_head_with_the_embedding(latent_injection, share_llm_weights):
    config = tiny_cvae_config(
        dict(tie_word_embeddings=True), latent_injection=latent_injection, share_llm_weights=share_llm_weights
    )
    model = CVAELlamaForCausalLM(config)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    plan = model.tp_plan
    assert plan["lm_head"] == "colwise_gather_output" and plan["model.embed_tokens"] == "embedding_rowwise"
    # the memory's copies of the key / value projections (folders saved before `share_llm_weights`) are sharded by
    # heads as the decoder layers' own; shared, they are the decoder layers' own
    memory = {"latent_memory.layers.*.k_proj": "colwise", "latent_memory.layers.*.v_proj": "colwise"}
    assert (memory.items() <= plan.items()) == (latent_injection == "memory" and not share_llm_weights)
    # the gated memory's gates (the default), one per query head, are sharded as the heads
    gates = {"latent_memory.layers.*.gate": "colwise"}
    assert (gates.items() <= plan.items()) == (latent_injection == "memory")
    assert {key for key in plan if key.startswith("latent_memory")} <= {*memory, *gates}


def test_past_key_values_is_the_deprecated_name_of_cache():
    model = trained_looking_model()
    input_ids = token_ids()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        old = model(input_ids, past_key_values=DynamicCache(config=model.config), use_cache=True)
    assert any("`past_key_values` is deprecated" in str(warning.message) for warning in caught)
    new = model(input_ids, cache=DynamicCache(config=model.config), use_cache=True)
    assert old.cache.get_seq_length() == new.cache.get_seq_length() == model.config.num_memory_slots + 6
    assert torch.equal(old.logits, new.logits)


# ------------------------------------------------------------------------------------------------ imports
def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300)


def test_trainer_names_import_from_the_package_lazily():
    result = run_python(
        """
        import sys
        import cvae_llama
        assert "cvae_llama.trainer" not in sys.modules and "datasets" not in sys.modules, "imported eagerly"
        assert "CVAETrainer" in dir(cvae_llama) and "CVAETrainer" in cvae_llama.__all__
        from cvae_llama import CVAETrainer, CVAETrainingArguments, density_gap, gaussian_kl, free_bits_kl
        import cvae_llama.trainer as trainer
        assert CVAETrainer is trainer.CVAETrainer and CVAETrainingArguments is trainer.CVAETrainingArguments
        assert density_gap is trainer.density_gap and gaussian_kl is trainer.gaussian_kl
        print("ok")
        """
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]


def test_the_package_exports_every_name_of_the_trainer():
    from cvae_llama import trainer

    assert set(trainer.__all__) <= set(cvae_llama.__all__)
    for name in trainer.__all__:
        assert getattr(cvae_llama, name) is getattr(trainer, name), name
    with pytest.raises(AttributeError, match="module 'cvae_llama' has no attribute 'CVAETrainner'"):
        cvae_llama.CVAETrainner  # noqa: B018


def test_readme_and_model_card_state_which_latent_each_call_uses():
    for name in ("README.md", "model_card.md"):
        text = " ".join((Path(__file__).resolve().parents[1] / name).read_text(encoding="utf-8").split())
        assert "**deterministic in eval mode**" in text and "**the prior's mean, z = 0**" in text, name
        assert "**per returned sequence**" in text and "`latent_temperature` scales it" in text, name
