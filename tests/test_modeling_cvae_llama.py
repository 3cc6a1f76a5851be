"""CVAELlamaForCausalLM on tiny seeded configs: outputs, gradients, G-Skip, checkpointing, generate, HF common checks.

Numbers are exact (`torch.equal`) where the method promises identity (G-Skip's zero forward, the N(0, I) posterior
of a fresh model), and to 1e-5/1e-6 where two computation orders are compared (cache vs. full forward,
checkpointing vs. not, eager vs. sdpa).
"""

import math

import pytest
import torch
from conftest import open_memory_gates, tiny_cvae_config, tiny_llama_config
from transformers import (
    GemmaConfig,
    GemmaForCausalLM,
    GenerationConfig,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaForCausalLM,
)
from transformers.testing_utils import CaptureLogger
from transformers.utils import logging

from cvae_llama.configuration_cvae_llama import CVAELlamaConfig
from cvae_llama.modeling_cvae_llama import (
    LATENT_MEMORY_ATTENTION,
    CVAELlamaForCausalLM,
    CVAELlamaModel,
    CVAELlamaOutput,
    ZeroInitLinear,
    gaussian_kl,
    reparameterize,
)


BOS = 1
PAD = 0


def make_model(seed: int = 0, perturb_zero_init: bool = False, **fields) -> CVAELlamaForCausalLM:
    """A tiny seeded CVAE in eval mode. `perturb_zero_init` gives the zero-initialised layers (the posterior read-out,
    the embedding injection) small random weights and opens the gated memory's gates (about 0.5), as after some
    training, so that gradients reach the layers before them, the decoder reads z and the posterior is not exactly
    N(0, I)."""
    torch.manual_seed(seed)
    model = CVAELlamaForCausalLM(tiny_cvae_config(**fields))
    if perturb_zero_init:
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, ZeroInitLinear):
                    module.weight.normal_(std=0.5)
                    module.bias.normal_(std=0.5)
        open_memory_gates(model)
    return model.eval()


def random_ids(batch: int, length: int, seed: int = 1) -> torch.LongTensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, 99, (batch, length), generator=generator)


def left_padded(prompts: list[list[int]]) -> tuple[torch.LongTensor, torch.LongTensor]:
    """Left-pad a list of token lists: `(input_ids, attention_mask)`, each `(batch, max_length)`."""
    length = max(len(prompt) for prompt in prompts)
    input_ids = torch.full((len(prompts), length), PAD, dtype=torch.long)
    attention_mask = torch.zeros(len(prompts), length, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, length - len(prompt):] = torch.tensor(prompt)
        attention_mask[row, length - len(prompt):] = 1
    return input_ids, attention_mask


def latents(batch: int, size: int = 8, seed: int = 2) -> torch.Tensor:
    return torch.randn(batch, size, generator=torch.Generator().manual_seed(seed))


def capture_latents(model: CVAELlamaForCausalLM) -> tuple[list[torch.Tensor], torch.utils.hooks.RemovableHandle]:
    """Record the `latent` every forward call receives."""
    seen = []

    def hook(module, args, kwargs):
        seen.append(kwargs["latent"].clone())

    return seen, model.register_forward_pre_hook(hook, with_kwargs=True)


# ------------------------------------------------------------------------------------------------ helpers of the math
def test_gaussian_kl_and_reparameterize():
    mean, logvar = torch.tensor([[0.0, 1.0, -2.0]]), torch.tensor([[0.0, math.log(4.0), -1.0]])
    expected = 0.5 * (mean**2 + logvar.exp() - logvar - 1)
    torch.testing.assert_close(gaussian_kl(mean, logvar), expected)
    assert torch.equal(gaussian_kl(torch.zeros(2, 5), torch.zeros(2, 5)), torch.zeros(2, 5))
    torch.manual_seed(0)
    samples = reparameterize(mean.expand(4, -1), logvar.expand(4, -1), num_samples=20000)
    assert samples.shape == (20000, 4, 3)
    torch.testing.assert_close(samples.mean(dim=(0, 1)), mean[0], atol=0.05, rtol=0)
    torch.testing.assert_close(samples.std(dim=(0, 1)), (0.5 * logvar[0]).exp(), atol=0.05, rtol=0.02)
    assert reparameterize(mean, logvar).shape == (1, 3)


# ------------------------------------------------------------------------------------------------ outputs
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_output_fields_shapes_and_dtypes(dtype):
    model = make_model(perturb_zero_init=True).to(dtype)
    input_ids = random_ids(3, 7)
    output = model(input_ids, labels=input_ids, use_cache=True)
    assert isinstance(output, CVAELlamaOutput)
    assert output.logits.shape == (3, 7, 99) and output.logits.dtype == dtype
    for name in ("loss", "reconstruction_loss", "kl_loss"):  # losses in float32, as transformers computes them
        assert getattr(output, name).shape == (), name
        assert getattr(output, name).dtype == torch.float32, name
    for name in ("latent", "latent_mean", "latent_logvar"):
        assert getattr(output, name).shape == (3, 8), name
        assert getattr(output, name).dtype == dtype, name
    # the memory slots sit in front of the real tokens in the cache
    assert output.cache.get_seq_length() == model.config.num_memory_slots + 7
    # default loss: reconstruction + KL(q || N(0, I)) summed over dimensions, averaged over the batch
    assert torch.equal(output.loss, output.reconstruction_loss + output.kl_loss)
    torch.testing.assert_close(
        output.kl_loss, gaussian_kl(output.latent_mean.float(), output.latent_logvar.float()).sum(-1).mean()
    )
    assert output.kl_loss > 0
    mean, logvar = model.encode(input_ids)
    assert torch.equal(mean, output.latent_mean) and torch.equal(logvar, output.latent_logvar)


def test_which_latent_forward_uses():
    model = make_model(perturb_zero_init=True)
    input_ids, posterior_ids = random_ids(2, 6), random_ids(2, 9, seed=5)
    # eval mode without labels: the prior's mean z = 0, no posterior, no loss
    output = model(input_ids)
    assert torch.equal(output.latent, torch.zeros(2, 8)) and output.latent_mean is None and output.kl_loss is None
    assert output.loss is None and output.reconstruction_loss is None
    # labels: the posterior of input_ids, its mean in eval mode
    output = model(input_ids, labels=input_ids)
    mean, logvar = model.encode(input_ids)
    assert torch.equal(output.latent, mean) and torch.equal(output.latent_mean, mean)
    # in training mode one reparameterised sample of it
    model.train()
    torch.manual_seed(3)
    output = model(input_ids, labels=input_ids)
    mean, logvar = model.encode(input_ids)
    torch.manual_seed(3)
    assert torch.equal(output.latent, reparameterize(mean, logvar))
    # training mode without labels: the posterior as well
    output = model(input_ids)
    assert output.latent_mean is not None and output.kl_loss is not None and output.loss is None
    model.eval()
    # posterior_input_ids: the posterior of that sequence
    output = model(input_ids, posterior_input_ids=posterior_ids)
    assert torch.equal(output.latent_mean, model.encode(posterior_ids)[0])
    # an explicit latent: used as given; the loss is the reconstruction alone
    latent = latents(2)
    output = model(input_ids, labels=input_ids, latent=latent)
    assert torch.equal(output.latent, latent) and output.latent_mean is None and output.kl_loss is None
    assert torch.equal(output.loss, output.reconstruction_loss)
    # a (latent_size,) latent is shared by the batch
    shared = model(input_ids, latent=latent[0]).logits
    torch.testing.assert_close(shared, model(input_ids, latent=latent[0].expand(2, -1)).logits, rtol=0, atol=0)


def test_prompt_tokens_and_padding_are_not_scored():
    model = make_model()
    input_ids = random_ids(1, 8)
    latent = latents(1)
    labels = input_ids.clone()
    labels[:, :4] = -100  # the prompt x
    output = model(input_ids, labels=labels, latent=latent)
    log_probs = output.logits[:, :-1].log_softmax(-1).gather(-1, input_ids[:, 1:, None])[..., 0]
    torch.testing.assert_close(output.reconstruction_loss, -log_probs[:, 3:].mean())


# ------------------------------------------------------------------------------------------------ gradients
def trainable_step(model: CVAELlamaForCausalLM, seed: int = 4) -> CVAELlamaOutput:
    model.train()
    model.zero_grad(set_to_none=True)
    input_ids = random_ids(2, 6)
    torch.manual_seed(seed)
    output = model(input_ids, labels=input_ids)
    output.loss.backward()
    return output


@pytest.mark.parametrize("share_llm_weights", [True, False])
@pytest.mark.parametrize("decoder_mode", ["frozen", "full", "lora"])
@pytest.mark.parametrize("latent_injection", ["memory", "embedding", "memory+embedding"])
def test_gradients_reach_exactly_the_trainable_parameters(decoder_mode, latent_injection, share_llm_weights):
    model = make_model(perturb_zero_init=True, decoder_mode=decoder_mode, latent_injection=latent_injection,
                       share_llm_weights=share_llm_weights)  # fmt: skip
    frozen_names = model.frozen_parameter_names()
    llm_names = {name for name, _ in model.named_parameters() if name.startswith(("model.", "lm_head."))}
    if decoder_mode == "full":  # the LLM trains
        assert not frozen_names & llm_names
    else:  # the paper: the LLM is frozen
        assert {name for name in frozen_names if name.startswith(("model.", "lm_head."))} == llm_names
    # shared, the encoder's embedding and the memory's projections are the decoder's and train with it; as copies
    # (folders saved before `share_llm_weights`) they stay frozen in every mode; the rest trains
    copies = set() if share_llm_weights else {"encoder.embed_tokens.weight"}
    if model.latent_memory is not None and not share_llm_weights:
        copies |= {name for name, _ in model.latent_memory.named_parameters(prefix="latent_memory")
                   if name.endswith(("k_proj.weight", "v_proj.weight"))}
        assert "latent_memory.layers.1.v_proj.weight" in copies
        assert "latent_memory.layers.0.to_states.0.weight" not in frozen_names
    assert frozen_names - llm_names == copies
    trainable_step(model)
    for name, parameter in model.named_parameters():
        assert parameter.requires_grad == (name not in frozen_names), name
        if parameter.requires_grad:
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, f"no gradient reaches {name}"
        else:
            assert parameter.grad is None, f"frozen {name} got a gradient"


def test_decoder_mode_leaves_attached_modules_trainable():
    model = make_model(decoder_mode="frozen")
    model.bow_head = torch.nn.Linear(8, 99)  # as the trainer attaches its bag-of-words head
    model.apply_decoder_mode()
    assert model.bow_head.weight.requires_grad and model.bow_head.bias.requires_grad
    assert not model.lm_head.weight.requires_grad
    assert model.parameter_breakdown()["skip"]["trainable"] == sum(
        p.numel() for name, p in model.named_parameters() if name.startswith(("latent_skip.", "bow_head."))
    )


@pytest.mark.parametrize("share_llm_weights", [True, False])
@pytest.mark.parametrize("decoder_mode", ["frozen", "full"])
def test_parameter_breakdown_matches_named_parameters(decoder_mode, share_llm_weights, capsys):
    model = make_model(decoder_mode=decoder_mode, share_llm_weights=share_llm_weights)
    breakdown = model.print_parameter_breakdown()
    assert breakdown == model.parameter_breakdown()
    assert set(breakdown) == {"encoder", "latent_memory", "skip", "decoder", "total"}
    parameters = dict(model.named_parameters())  # tied lm_head / embedding counted once
    assert breakdown["total"]["trainable"] == sum(p.numel() for p in parameters.values() if p.requires_grad)
    assert breakdown["total"]["frozen"] == sum(p.numel() for p in parameters.values() if not p.requires_grad)

    def count(prefix, trainable=None):
        return sum(
            p.numel()
            for name, p in parameters.items()
            if name.startswith(prefix) and (trainable is None or p.requires_grad == trainable)
        )

    # the decoder is exactly a LlamaForCausalLM of the same config
    llm_size = sum(p.numel() for p in LlamaForCausalLM(tiny_llama_config()).parameters())
    assert sum(breakdown["decoder"].values()) == llm_size
    assert sum(breakdown["encoder"].values()) == count("encoder.")
    assert sum(breakdown["latent_memory"].values()) == count("latent_memory.")
    assert sum(breakdown["skip"].values()) == count("latent_skip.") + count("latent_to_embedding.")
    embedding = kv = 0  # shared: no copies
    if not share_llm_weights:
        embedding = model.encoder.embed_tokens.weight.numel()
        kv = sum(p.numel() for layer in model.latent_memory.layers for p in (*layer.k_proj.parameters(),
                                                                             *layer.v_proj.parameters()))  # fmt: skip
    # the copies of the LLM's embedding and attention projections are frozen in both modes
    assert breakdown["encoder"] == {"trainable": count("encoder.") - embedding, "frozen": embedding}
    assert breakdown["latent_memory"] == {"trainable": count("latent_memory.") - kv, "frozen": kv}
    assert breakdown["skip"]["frozen"] == 0
    if decoder_mode == "frozen":
        assert breakdown["decoder"] == {"trainable": 0, "frozen": llm_size}
    else:
        assert breakdown["decoder"] == {"trainable": llm_size, "frozen": 0}
        assert breakdown["total"]["frozen"] == embedding + kv
    printed = capsys.readouterr().out
    assert "encoder" in printed and f"{breakdown['total']['trainable']:,}" in printed


# ------------------------------------------------------------------------------------------------ G-Skip
def test_gskip_is_zero_forward_but_a_live_gradient_path():
    gskip = make_model(perturb_zero_init=True, skip_connection="gskip").train()
    none = CVAELlamaForCausalLM(tiny_cvae_config(skip_connection="none"))
    missing, unexpected = none.load_state_dict(gskip.state_dict(), strict=False)
    assert missing == [] and unexpected and all(key.startswith("latent_skip.") for key in unexpected)
    none.train()
    input_ids = random_ids(2, 6)
    grads = {}
    for name, model in (("gskip", gskip), ("none", none)):
        torch.manual_seed(7)  # the same reparameterised latent for both
        output = model(input_ids, labels=input_ids)
        output.loss.backward()
        grads[name] = (output, {n: p.grad.clone() for n, p in model.encoder.named_parameters() if p.grad is not None})
    (out_gskip, grad_gskip), (out_none, grad_none) = grads["gskip"], grads["none"]
    assert torch.equal(out_gskip.latent, out_none.latent)
    assert torch.equal(out_gskip.logits, out_none.logits)  # bitwise: r - r.detach() is exactly zero
    assert torch.equal(out_gskip.loss, out_none.loss)
    assert grad_gskip.keys() == grad_none.keys()
    read_out = "to_latent_mean_logvar.2.weight"
    assert not torch.allclose(grad_gskip[read_out], grad_none[read_out])  # the short path adds its gradient
    assert all(not torch.equal(grad_gskip[name], grad_none[name]) for name in grad_gskip)
    # at inference G-Skip is a no-op as well
    gskip.eval(), none.eval()
    latent = latents(2)
    assert torch.equal(gskip(input_ids, latent=latent).logits, none(input_ids, latent=latent).logits)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_stacked_latent_memory_computes_each_layers_own_forward(dtype):
    """The memory runs all layers at once over stacked weights; it must give what each layer gives on its own."""
    model = make_model(perturb_zero_init=True).train().to(dtype)
    memory = model.latent_memory
    with torch.no_grad():
        for layer in memory.layers:  # distinct norm weights, so that a mix-up of layers shows
            layer.norm.weight.normal_(1.0, 0.3)
    assert memory._stackable()
    latent = latents(3).to(dtype).requires_grad_()
    stacked = memory(latent)  # (batch, layers, slots, hidden)
    each = torch.stack([layer(latent) for layer in memory.layers], dim=1)
    close = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(stacked, each, **close)

    # the MLPs' and norms' weights (the gates act in the attention, not here; the k/v copies are frozen)
    trained = [latent] + [p for name, p in memory.named_parameters() if p.requires_grad and not name.endswith(".gate")]
    assert len(trained) == 1 + 5 * len(memory.layers)

    def gradients(states):
        objective = (states.float() ** 2).sum() + (states.float() * torch.linspace(-1, 1, states.shape[-1])).sum()
        return torch.autograd.grad(objective, trained)

    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    for grad, own in zip(gradients(stacked), gradients(each), strict=True):
        torch.testing.assert_close(grad.float(), own.float(), rtol=tolerance, atol=tolerance * own.float().abs().max())


def test_latent_memory_runs_layer_by_layer_when_a_part_is_hooked():
    """A hook (or a PEFT/accelerate wrapper) on a memory part must see its call: the memory falls back to per-layer
    forwards, with the same output."""
    model = make_model(perturb_zero_init=True)
    input_ids, latent = random_ids(2, 6), latents(2)
    stacked_logits = model(input_ids, latent=latent).logits
    calls = []
    handle = model.latent_memory.layers[1].norm.register_forward_hook(lambda module, args, output: calls.append(1))
    assert not model.latent_memory._stackable()
    torch.testing.assert_close(model(input_ids, latent=latent).logits, stacked_logits, rtol=1e-6, atol=1e-6)
    assert calls == [1]
    handle.remove()
    assert model.latent_memory._stackable()


def test_plain_skip_changes_the_logits():
    skip = make_model(skip_connection="skip")
    none = CVAELlamaForCausalLM(tiny_cvae_config(skip_connection="none")).eval()
    none.load_state_dict(skip.state_dict(), strict=False)
    input_ids, latent = random_ids(2, 6), latents(2)
    difference = (skip(input_ids, latent=latent).logits - none(input_ids, latent=latent).logits).abs().max()
    assert difference > 1e-3
    # and it depends on the latent, in generation too
    assert not torch.equal(skip(input_ids, latent=latent).logits, skip(input_ids, latent=-latent).logits)


# ------------------------------------------------------------------------------------------------ fresh posterior
@pytest.mark.parametrize("fields", [{}, {"num_latent_queries": 2, "latent_size": 6}, {"num_encoder_layers": 1}])
def test_fresh_posterior_is_exactly_standard_normal(fields):
    model = make_model(**fields)
    input_ids, attention_mask = left_padded([[5, 6, 7, 8, 9], [10, 11]])
    mean, logvar = model.encode(input_ids, attention_mask)
    size = model.config.latent_size
    assert torch.equal(mean, torch.zeros(2, size)) and torch.equal(logvar, torch.zeros(2, size))
    model.train()
    output = model(input_ids, attention_mask=attention_mask, labels=input_ids)
    assert output.kl_loss == 0


def test_encoder_ignores_left_padding():
    model = make_model(perturb_zero_init=True)
    input_ids, attention_mask = left_padded([[5, 6, 7, 8, 9], [10, 11]])
    mean, logvar = model.encode(input_ids, attention_mask)
    alone_mean, alone_logvar = model.encode(torch.tensor([[10, 11]]))
    torch.testing.assert_close(mean[1:], alone_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logvar[1:], alone_logvar, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------ checkpointing
CHECKPOINTING = {
    "reentrant": lambda model: model.gradient_checkpointing_enable({"use_reentrant": True}),
    "non-reentrant": lambda model: model.gradient_checkpointing_enable({"use_reentrant": False}),
    "activation_checkpointing_enable": lambda model: model.activation_checkpointing_enable(),
    "reentrant-every-2-layers": lambda model: model.activation_checkpointing_enable(
        {"use_reentrant": True}, every_n_layers=2
    ),
}


@pytest.mark.parametrize("how", list(CHECKPOINTING))
@pytest.mark.parametrize("latent_injection", ["memory", "memory+embedding"])
@pytest.mark.parametrize("decoder_mode", ["frozen", "full"])
@pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated")
def test_gradient_checkpointing_keeps_the_latent_path(how, latent_injection, decoder_mode):
    has_activation_checkpointing = hasattr(CVAELlamaForCausalLM, "activation_checkpointing_enable")  # transformers 5.x
    if how != "reentrant" and how != "non-reentrant" and not has_activation_checkpointing:
        pytest.skip("this transformers has no activation_checkpointing_enable")
    model = make_model(perturb_zero_init=True, latent_injection=latent_injection, decoder_mode=decoder_mode)
    reference = trainable_step(model)
    reference_grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    CHECKPOINTING[how](model)
    assert model.model.layers[0].gradient_checkpointing
    checkpointed = trainable_step(model)
    torch.testing.assert_close(checkpointed.loss, reference.loss, rtol=0, atol=1e-6)
    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    assert grads.keys() == reference_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, reference_grads[name], rtol=1e-5, atol=1e-6, msg=name)
    memory_grad = model.latent_memory.layers[1].to_states[0].weight.grad
    assert memory_grad.abs().sum() > 0  # the latent reached the last layer under checkpointing


# ------------------------------------------------------------------------------------------------ generate
def stack_logits(generated) -> torch.Tensor:
    return torch.stack(generated.logits, dim=1)  # (batch, new_tokens, vocab)


@pytest.mark.parametrize("latent_injection", ["memory", "embedding", "memory+embedding"])
def test_cached_generation_equals_full_forward(latent_injection):
    model = make_model(latent_injection=latent_injection)
    input_ids, attention_mask = left_padded([[5, 6, 7, 8, 9], [10, 11, 12]])
    latent = latents(2)
    generated = model.generate(
        input_ids,
        attention_mask=attention_mask,
        latent=latent,
        max_new_tokens=6,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
    )
    sequences = generated.sequences
    full_mask = torch.cat([attention_mask, torch.ones(2, 6, dtype=torch.long)], dim=1)
    full = model(sequences, attention_mask=full_mask, latent=latent, use_cache=False).logits
    torch.testing.assert_close(stack_logits(generated), full[:, input_ids.shape[1] - 1:-1], rtol=0, atol=1e-5)
    for cache in (dict(use_cache=False), dict(cache_implementation="static")):
        again = model.generate(input_ids, attention_mask=attention_mask, latent=latent, max_new_tokens=6,
                               do_sample=False, **cache)
        assert torch.equal(again, sequences), cache


def test_left_padded_batch_equals_one_by_one():
    model = make_model()
    prompts = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]
    latent = latents(3)
    input_ids, attention_mask = left_padded(prompts)
    batched = model.generate(
        input_ids, attention_mask=attention_mask, latent=latent, max_new_tokens=6, do_sample=False,
        output_logits=True, return_dict_in_generate=True,
    )
    for row, prompt in enumerate(prompts):
        alone = model.generate(
            torch.tensor([prompt]), latent=latent[row], max_new_tokens=6, do_sample=False,
            output_logits=True, return_dict_in_generate=True,
        )
        assert torch.equal(batched.sequences[row, -6:], alone.sequences[0, -6:])
        torch.testing.assert_close(stack_logits(batched)[row], stack_logits(alone)[0], rtol=0, atol=1e-5)


def test_fixed_latent_greedy_is_deterministic():
    model = make_model()
    input_ids, latent = random_ids(2, 4), latents(2)
    torch.manual_seed(0)
    first = model.generate(input_ids, latent=latent, max_new_tokens=8, do_sample=False)
    torch.manual_seed(1)
    second = model.generate(input_ids, latent=latent, max_new_tokens=8, do_sample=False)
    assert torch.equal(first, second)


def test_latent_reaches_generation():
    model = make_model(perturb_zero_init=True)  # the gates open
    input_ids = random_ids(1, 4)
    scores = [
        stack_logits(model.generate(input_ids, latent=z, max_new_tokens=3, do_sample=False, output_logits=True,
                                    return_dict_in_generate=True))
        for z in (latents(1, seed=3), latents(1, seed=4))
    ]
    assert (scores[0] - scores[1]).abs().max() > 1e-4


def test_generate_without_prompt_takes_the_batch_from_the_latent():
    model = make_model()
    latent = latents(3)
    generated = model.generate(latent=latent, max_new_tokens=5, do_sample=False)
    assert generated.shape == (3, 6) and (generated[:, 0] == BOS).all()
    bos = torch.full((3, 1), BOS)
    assert torch.equal(generated, model.generate(bos, latent=latent, max_new_tokens=5, do_sample=False))
    # a single latent: one sequence; with num_return_sequences, one row per returned sequence
    assert model.generate(latent=latent[0], max_new_tokens=5, do_sample=False).shape == (1, 6)
    assert model.generate(latent=latent[:2], num_return_sequences=2, max_new_tokens=3, do_sample=False).shape == (2, 4)
    # no prompt and no latent: one prior sample
    assert model.generate(max_new_tokens=5, do_sample=False).shape == (1, 6)


def test_prompt_as_keyword_or_embeddings():
    model = make_model()
    input_ids, attention_mask = left_padded([[5, 6, 7, 8], [10, 11, 12]])
    latent = latents(2)
    kwargs = dict(attention_mask=attention_mask, latent=latent, max_new_tokens=5, do_sample=False)
    positional = model.generate(input_ids, **kwargs)
    assert torch.equal(model.generate(input_ids=input_ids, **kwargs), positional)
    embeds = model.get_input_embeddings()(input_ids)
    from_embeds = model.generate(inputs_embeds=embeds, **kwargs)
    assert torch.equal(from_embeds, positional[:, input_ids.shape[1]:])  # only the new tokens, as for any LLM
    expanded = model.generate(inputs_embeds=embeds, num_return_sequences=2, **{**kwargs, "latent": None})
    assert expanded.shape == (4, 5)


def test_sampling():
    model = make_model()
    input_ids, latent = random_ids(2, 4), latents(2)
    kwargs = dict(latent=latent, max_new_tokens=6, do_sample=True, top_k=0, temperature=1.5)
    torch.manual_seed(0)
    first = model.generate(input_ids, **kwargs)
    torch.manual_seed(0)
    assert torch.equal(first, model.generate(input_ids, **kwargs))
    assert first.shape == (2, 10) and torch.equal(first[:, :4], input_ids)
    torch.manual_seed(1)
    assert not torch.equal(first, model.generate(input_ids, **kwargs))


@pytest.mark.parametrize("given_latent", [True, False])
def test_beam_search_scores_match_the_full_forward(given_latent):
    model = make_model()
    input_ids, attention_mask = left_padded([[5, 6, 7, 8], [10, 11, 12]])
    latent = latents(2) if given_latent else None
    seen, handle = capture_latents(model)
    generated = model.generate(
        input_ids, attention_mask=attention_mask, latent=latent, max_new_tokens=4, num_beams=3,
        num_return_sequences=2, length_penalty=0.0, do_sample=False, return_dict_in_generate=True, output_scores=True,
    )
    handle.remove()
    assert generated.sequences.shape == (4, 8)
    used = seen[0][::3]  # the beams of a prompt share its latent
    assert torch.equal(seen[0], used.repeat_interleave(3, dim=0))
    if given_latent:
        assert torch.equal(used, latent)
    # with length_penalty 0 a beam's score is its log-likelihood: recompute it with a full forward of its latent
    sequences = generated.sequences
    mask = torch.cat([attention_mask, torch.ones(2, 4, dtype=torch.long)], dim=1).repeat_interleave(2, dim=0)
    latent_per_row = used.repeat_interleave(2, dim=0)
    logits = model(sequences, attention_mask=mask, latent=latent_per_row, use_cache=False).logits
    log_probs = logits[:, 3:-1].log_softmax(-1).gather(-1, sequences[:, 4:, None])[..., 0]
    eos = sequences[:, 4:] == model.generation_config.eos_token_id
    log_probs = log_probs.masked_fill(eos.cumsum(-1) - eos.long() > 0, 0).sum(-1)  # a beam ends at its EOS
    torch.testing.assert_close(generated.sequences_scores, log_probs, rtol=0, atol=1e-4)
    assert (generated.sequences_scores[0::2] >= generated.sequences_scores[1::2]).all()


def test_one_prior_sample_per_returned_sequence():
    model = make_model()
    input_ids, attention_mask = left_padded([[5, 6, 7], [10, 11]])
    seen, handle = capture_latents(model)
    generated = model.generate(
        input_ids, attention_mask=attention_mask, num_return_sequences=4, max_new_tokens=3, do_sample=False
    )
    handle.remove()
    assert generated.shape == (8, 6)
    assert torch.equal(generated[:4, :3], input_ids[[0] * 4]) and torch.equal(generated[4:, :3], input_ids[[1] * 4])
    assert all(latent.shape == (8, 8) for latent in seen) and all(torch.equal(seen[0], latent) for latent in seen)
    assert torch.unique(seen[0], dim=0).shape[0] == 8  # eight different latents
    # latent_temperature scales the prior samples; 0 gives z = 0 for every row
    seen, handle = capture_latents(model)
    model.generate(num_return_sequences=8, latent_temperature=0.0, max_new_tokens=2, do_sample=False)
    handle.remove()
    assert torch.equal(seen[0], torch.zeros(8, 8))
    # the same latent for every returned sequence when one latent per prompt is given
    seen, handle = capture_latents(model)
    model.generate(input_ids, attention_mask=attention_mask, latent=latents(2), num_return_sequences=3,
                   max_new_tokens=2, do_sample=False)
    handle.remove()
    assert torch.equal(seen[0], latents(2).repeat_interleave(3, dim=0))


def test_no_generation_config_warning_when_none_is_passed():
    model = make_model()
    input_ids = random_ids(1, 3)
    logger = logging.get_logger("transformers.generation.utils")
    logger.warning_once.cache_clear()
    with CaptureLogger(logger) as captured:
        model.generate(input_ids, max_new_tokens=2, do_sample=False, num_return_sequences=2)
        model.generate(input_ids, generation_config=GenerationConfig(max_new_tokens=2, num_return_sequences=2,
                                                                    do_sample=True))
        model.generate(input_ids, generation_config=GenerationConfig(max_new_tokens=2, num_beams=2,
                                                                    num_return_sequences=2))
    assert "generation_config" not in captured.out, captured.out


def test_generation_config_is_honoured():
    model = make_model()
    input_ids = random_ids(2, 3)
    config = GenerationConfig(max_new_tokens=4, num_return_sequences=3, do_sample=True, bos_token_id=BOS)
    seen, handle = capture_latents(model)
    generated = model.generate(input_ids, generation_config=config)
    handle.remove()
    assert generated.shape == (6, 7) and torch.unique(seen[0], dim=0).shape[0] == 6
    model.generation_config.update(num_return_sequences=2, do_sample=True)  # the model's own defaults count as well
    seen, handle = capture_latents(model)
    assert model.generate(input_ids, max_new_tokens=1).shape == (4, 4)
    handle.remove()
    assert torch.unique(seen[0], dim=0).shape[0] == 4


# ------------------------------------------------------------------------------------------------ a trained toy
@pytest.fixture(scope="module")
def trained_toy():
    """A tiny CVAE trained until its latent carries which of four random sequences to write.

    The decoder sees only BOS, so telling the sequences apart needs the latent. A small KL weight (beta = 0.02) keeps
    the posteriors near the prior, so that prior samples decode to the training sequences as well. (Training this
    toy can merge two of the four posteriors into one mode, depending on the seed and the platform's arithmetic: the
    assertions below hold either way.)"""
    torch.manual_seed(0)
    model = CVAELlamaForCausalLM(tiny_cvae_config(decoder_mode="full")).train()
    sequences = random_ids(4, 6, seed=1)
    input_ids = torch.cat([torch.full((4, 1), BOS), sequences], dim=1).repeat(2, 1)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    steps = 300
    scheduler = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1.0, end_factor=0.0, total_iters=steps)
    for _ in range(steps):
        output = model(input_ids, labels=input_ids)
        (output.reconstruction_loss + 0.02 * output.kl_loss).backward()
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
    return model.eval(), sequences


def is_training_sequence(row: torch.Tensor, sequences: torch.Tensor) -> bool:
    return bool((sequences == row).all(-1).any())


def test_trained_toy_latents_decode_to_different_texts(trained_toy):
    model, sequences = trained_toy
    input_ids = torch.cat([torch.full((4, 1), BOS), sequences], dim=1)
    latent_mean, _ = model.encode(input_ids)
    decoded = model.generate(latent=latent_mean, max_new_tokens=6, do_sample=False)[:, 1:]
    assert all(is_training_sequence(row, sequences) for row in decoded)  # the latent picks a training sequence
    assert (decoded == sequences).all(-1).sum() >= 2  # and reconstructs (most of) them from their posterior mean
    distinct = torch.unique(decoded, dim=0)
    assert distinct.shape[0] >= 2  # different latents, different texts
    # interpolating between two latents that write different texts goes from one text to the other
    first = 0
    second = next(row for row in range(4) if not torch.equal(decoded[row], decoded[first]))
    steps = torch.linspace(0, 1, 5)[:, None]
    path_latents = (1 - steps) * latent_mean[first] + steps * latent_mean[second]
    path = model.generate(latent=path_latents, max_new_tokens=6, do_sample=False)[:, 1:]
    assert torch.equal(path[0], decoded[first]) and torch.equal(path[-1], decoded[second])


def test_trained_toy_prior_samples_are_diverse(trained_toy):
    model, sequences = trained_toy
    torch.manual_seed(0)
    decoded = model.generate(num_return_sequences=8, max_new_tokens=6, do_sample=False)[:, 1:]
    assert decoded.shape == (8, 6)
    assert torch.unique(decoded, dim=0).shape[0] >= 2  # greedy decoding: the diversity comes from the prior samples
    assert sum(is_training_sequence(row, sequences) for row in decoded) >= 6  # the prior lands where training was


# ------------------------------------------------------------------------------------------------ HF common checks
@pytest.mark.parametrize("memory_attention", ["joint", "gated"])
def test_hidden_states_and_attentions(memory_attention):
    """The joint memory's maps have the slots' columns first (one softmax); the gated memory's are the text's own
    softmax, the LLM's shape (the memory adds `g` times a softmax of its own)."""
    model = make_model(perturb_zero_init=True, num_memory_slots=3, memory_attention=memory_attention)
    model.set_attn_implementation("eager")
    input_ids = random_ids(2, 5)
    output = model(input_ids, latent=latents(2), output_hidden_states=True, output_attentions=True)
    slots = 3 if memory_attention == "joint" else 0
    assert len(output.hidden_states) == 3 and all(h.shape == (2, 5, 32) for h in output.hidden_states)
    assert len(output.attentions) == 2 and all(a.shape == (2, 4, 5, slots + 5) for a in output.attentions)
    for attention in output.attentions:
        torch.testing.assert_close(attention.sum(-1), torch.ones(2, 4, 5))
        assert (attention[..., :slots] > 0).all()  # every token sees the memory slots
        assert torch.equal(attention[..., slots:].triu(1), torch.zeros(2, 4, 5, 5))  # and is causal over real tokens


@pytest.mark.parametrize("latent_injection", ["memory", "memory+embedding"])
def test_eager_and_sdpa_agree(latent_injection, tmp_path):
    model = make_model(perturb_zero_init=True, latent_injection=latent_injection)
    assert model.config._attn_implementation.endswith("sdpa")
    model.save_pretrained(tmp_path)
    eager = CVAELlamaForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert eager.config._attn_implementation.endswith("eager")
    input_ids, attention_mask = left_padded([[5, 6, 7, 8, 9], [10, 11]])
    latent = latents(2)
    for use_mask in (True, False):
        mask = attention_mask if use_mask else None
        # the real tokens' logits (a padding position sees no text: eager and sdpa differ there, as in the LLM)
        rows = attention_mask.bool() if use_mask else slice(None)
        torch.testing.assert_close(
            eager(input_ids, attention_mask=mask, latent=latent).logits[rows],
            model(input_ids, attention_mask=mask, latent=latent).logits[rows],
            rtol=0, atol=1e-5,
        )
    torch.testing.assert_close(eager.encode(input_ids, attention_mask), model.encode(input_ids, attention_mask),
                               rtol=0, atol=1e-5)
    sequences = [m.generate(input_ids, attention_mask=attention_mask, latent=latent, max_new_tokens=5, do_sample=False)
                 for m in (eager, model)]
    assert torch.equal(*sequences)


def test_unsupported_attention_implementation():
    model = make_model()
    with pytest.raises(ValueError, match="flex_attention"):
        model.set_attn_implementation("flex_attention")


@pytest.mark.parametrize("decoder_mode", ["frozen", "full"])
@pytest.mark.parametrize("tie_word_embeddings", [False, True])
def test_resize_token_embeddings(decoder_mode, tie_word_embeddings):
    """The decoder's vocabulary, and the encoder's copy of the embedding in folders saved before
    `share_llm_weights` (shared, the encoder reads the decoder's)."""
    torch.manual_seed(0)
    config = tiny_cvae_config(
        dict(tie_word_embeddings=tie_word_embeddings), decoder_mode=decoder_mode, share_llm_weights=False
    )
    model = CVAELlamaForCausalLM(config).eval()
    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    old_encoder_embedding = model.encoder.embed_tokens.weight.clone()
    model.resize_token_embeddings(120)
    assert model.config.vocab_size == 120
    assert model.model.embed_tokens.weight.shape == (120, 32)
    assert model.lm_head.weight.shape == (120, 32)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == model.config.tie_word_embeddings
    assert model.encoder.embed_tokens.weight.shape == (120, 32)
    assert torch.equal(model.encoder.embed_tokens.weight[:99], old_encoder_embedding)
    assert {name: p.requires_grad for name, p in model.named_parameters()} == requires_grad
    input_ids = torch.tensor([[5, 110, 119, 7]])
    output = model(input_ids, labels=input_ids)
    assert output.logits.shape == (1, 4, 120) and torch.isfinite(output.loss)
    assert model.generate(input_ids, max_new_tokens=3, do_sample=False).shape == (1, 7)


def test_training_with_labels_lowers_the_loss():
    model = make_model(perturb_zero_init=True).train()
    input_ids, attention_mask = left_padded([[5, 6, 7, 8, 9, 10], [11, 12, 13]])
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for step in range(15):
        torch.manual_seed(step)
        output = model(input_ids, attention_mask=attention_mask, labels=labels)
        output.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(output.loss.item())
    assert losses[-1] < losses[0] - 0.5, losses


@pytest.mark.parametrize("fields", [{}, {"latent_injection": "memory+embedding", "skip_connection": "skip"}])
def test_save_load_keeps_weights_and_logits(fields, tmp_path):
    model = make_model(perturb_zero_init=True, decoder_mode="frozen", **fields)
    model.save_pretrained(tmp_path)
    loaded = CVAELlamaForCausalLM.from_pretrained(tmp_path).eval()
    state, loaded_state = model.state_dict(), loaded.state_dict()
    assert state.keys() == loaded_state.keys()
    assert all(torch.equal(state[key], loaded_state[key]) for key in state)
    assert {n: p.requires_grad for n, p in loaded.named_parameters()} == {
        n: p.requires_grad for n, p in model.named_parameters()
    }
    input_ids, latent = random_ids(2, 6), latents(2)
    assert torch.equal(loaded(input_ids, latent=latent).logits, model(input_ids, latent=latent).logits)
    assert torch.equal(loaded.encode(input_ids)[0], model.encode(input_ids)[0])


# ------------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    "latent, message",
    [
        (torch.zeros(2, 5), r"latent has shape \(2, 5\) but the model expects \(batch, 8\)"),
        (torch.zeros(2, 1, 8), r"latent has shape \(2, 1, 8\) but the model expects \(batch, 8\)"),
        (torch.zeros(3, 8), r"latent has batch size 3 but the inputs have batch size 2"),
        (torch.zeros(2, 8, dtype=torch.long), r"latent must be a floating-point tensor, got dtype torch.int64"),
        ([[0.0] * 8] * 2, r"latent must be a torch.Tensor of shape \(batch, 8\), got list"),
        (torch.zeros(2, 8).index_fill(1, torch.tensor([3]), float("nan")), r"latent contains .*nan"),
        (torch.zeros(2, 8).index_fill(0, torch.tensor([1]), float("inf")), r"latent contains .*inf"),
    ],
    ids=["size", "ndim", "batch", "dtype", "list", "nan", "inf"],
)
def test_bad_latent(latent, message):
    model = make_model()
    input_ids = random_ids(2, 4)
    with pytest.raises(ValueError, match=message):
        model(input_ids, latent=latent)
    with pytest.raises(ValueError, match=message):
        model.generate(input_ids, latent=latent, max_new_tokens=2)


def test_bad_num_return_sequences_for_the_latent():
    model = make_model()
    input_ids = random_ids(2, 4)
    with pytest.raises(ValueError, match=r"latent has batch size 3.*2 prompt\(s\).*num_return_sequences=2"):
        model.generate(input_ids, latent=latents(3), num_return_sequences=2, max_new_tokens=2)
    with pytest.raises(ValueError, match=r"latent has batch size 4.*num_beams=2.*beams of a prompt share"):
        model.generate(input_ids, latent=latents(4), num_beams=2, num_return_sequences=2, max_new_tokens=2)
    with pytest.raises(ValueError, match=r"num_return_sequences.*\(3\).*num_beams.*\(2\)"):  # transformers' check
        model.generate(input_ids, num_beams=2, num_return_sequences=3, max_new_tokens=2)


def test_bad_encoder_inputs():
    model = make_model()
    with pytest.raises(ValueError, match=r"input_ids has shape \(4,\)"):
        model.encode(torch.tensor([5, 6, 7, 8]))
    with pytest.raises(ValueError, match=r"attention_mask has shape \(1, 3\) but input_ids has \(1, 4\)"):
        model.encode(torch.tensor([[5, 6, 7, 8]]), torch.ones(1, 3))
    with pytest.raises(ValueError, match=r"posterior_input_ids has batch size 1 but input_ids has 2"):
        model(random_ids(2, 4), posterior_input_ids=random_ids(1, 4))
    with pytest.raises(ValueError, match=r"batch_size must be a positive integer, got 0"):
        model.sample_prior(0)
    with pytest.raises(ValueError, match=r"temperature must be a finite number >= 0, got -1.0"):
        model.sample_prior(2, temperature=-1.0)


@pytest.mark.parametrize(
    "llm",
    [
        lambda: GPT2LMHeadModel(GPT2Config(vocab_size=99, n_embd=32, n_layer=2, n_head=4)),
        lambda: GemmaForCausalLM(GemmaConfig(vocab_size=99, hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                             head_dim=8)),
    ],
    ids=["gpt2", "gemma"],
)
def test_from_llm_rejects_unsupported_models(llm):
    # Llama, Mistral, Qwen2 and Qwen3 are supported (tests/test_architectures.py)
    model = llm()
    with pytest.raises(ValueError, match=rf"supports the causal LMs LlamaForCausalLM .*Qwen3ForCausalLM \('qwen3'\); "
                                         rf"got {type(model).__name__} \(model_type '{model.config.model_type}'\)"):
        CVAELlamaForCausalLM.from_llm(model)


def test_from_llm_rejects_other_objects():
    with pytest.raises(ValueError, match=r"model_or_path must be a causal LM, a folder or a repo id, got int"):
        CVAELlamaForCausalLM.from_llm(3)


def test_from_llm_builds_in_the_llms_dtype_with_its_weights():
    """from_llm builds the CVAE where the LLM is and in its dtype (not in float32 first): every parameter is bf16 and
    the decoder's weights are the LLM's, bit for bit."""
    torch.manual_seed(0)
    llm = LlamaForCausalLM(tiny_llama_config()).to(torch.bfloat16).eval()
    model = CVAELlamaForCausalLM.from_llm(llm, latent_size=8, decoder_mode="frozen")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16} and model.dtype == llm.dtype
    assert model.device == llm.device and model.config.dtype == torch.bfloat16
    for name, tensor in llm.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name
    output = model(random_ids(2, 5), latent=latents(2).to(torch.bfloat16))
    assert output.logits.dtype == torch.bfloat16 and torch.isfinite(output.logits).all()


def test_from_llm_on_a_tiny_llama(tmp_path):
    torch.manual_seed(0)
    llm = LlamaForCausalLM(tiny_llama_config()).eval()
    before = {name: tensor.clone() for name, tensor in llm.state_dict().items()}
    model = CVAELlamaForCausalLM.from_llm(llm, latent_size=8, decoder_mode="frozen").eval()
    assert isinstance(model.config, CVAELlamaConfig) and model.config.latent_size == 8
    assert all(torch.equal(tensor, llm.state_dict()[name]) for name, tensor in before.items())  # left unchanged
    assert all(p.requires_grad for p in llm.parameters())
    for name, tensor in llm.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name
    for index, layer in enumerate(model.encoder.layers):
        for name, tensor in layer.state_dict().items():
            assert torch.equal(tensor, llm.model.layers[index].state_dict()[name])
    # the encoder's embedding and the memory's projections are the decoder's (copies of the LLM's), not copies
    assert model.encoder.embed_tokens is None and model.latent_memory.layers[0].k_proj is None
    # with embedding injection only, a fresh CVAE is the LLM it wraps (the injection starts at zero)
    embedding = CVAELlamaForCausalLM.from_llm(llm, latent_size=8, latent_injection="embedding").eval()
    input_ids = random_ids(2, 6)
    torch.testing.assert_close(embedding(input_ids).logits, llm(input_ids).logits, rtol=0, atol=1e-6)
    # and from a folder
    llm.save_pretrained(tmp_path)
    from_folder = CVAELlamaForCausalLM.from_llm(tmp_path, latent_size=8)
    assert torch.equal(from_folder.model.embed_tokens.weight, llm.model.embed_tokens.weight)


# ------------------------------------------------------------------------------------------ the latent memory's home
def memory_call_order(model, run) -> list[tuple[str, int]]:
    """The order in which decoder layers start and the memory's key projections run during `run()`."""
    order, handles = [], []
    for index, layer in enumerate(model.model.layers):
        handles.append(layer.register_forward_pre_hook(lambda *_, i=index: order.append(("layer", i))))
    for index, layer in enumerate(model.latent_memory.layers):

        def keys_and_values(*args, layer=layer, index=index):
            order.append(("memory", index))
            return type(layer).keys_and_values(layer, *args)

        layer.keys_and_values = keys_and_values
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
        for layer in model.latent_memory.layers:
            del layer.keys_and_values
    return order


@pytest.mark.parametrize("memory_attention", ["joint", "gated"])
def test_each_layers_memory_keys_are_computed_inside_that_layers_call(memory_attention):
    """Not all layers' keys up front: layer l's memory keys are computed while decoder layer l runs (so that an
    FSDP-sharded layer has its weights gathered when they are read), in training, scoring and generation (the first
    step only, when the slots go into the KV cache)."""
    model = make_model(perturb_zero_init=True, memory_attention=memory_attention)
    ids, latent = random_ids(2, 5), latents(2)
    layers = range(model.config.num_hidden_layers)
    interleaved = [entry for index in layers for entry in (("layer", index), ("memory", index))]
    assert memory_call_order(model, lambda: model(ids, latent=latent)) == interleaved
    model.train()
    assert memory_call_order(model, lambda: model(ids, labels=ids)) == interleaved
    model.eval()
    steps = memory_call_order(model, lambda: model.generate(ids, latent=latent, max_new_tokens=3, do_sample=False))
    assert steps[: 2 * len(layers)] == interleaved
    assert [entry for entry in steps[2 * len(layers) :] if entry[0] == "memory"] == []  # later steps: from the cache
    assert len(steps) == 2 * len(layers) + 2 * len(layers)  # 2 more decoding steps


def test_the_decoders_attention_reads_a_plain_config_that_names_the_memory_attention():
    """No proxy: the decoder's attention modules hold a config of the model's own class naming the registered
    memory attention, while the model's config keeps "sdpa" / "eager", and switching the implementation switches the
    attention the memory wraps."""
    model = make_model(perturb_zero_init=True)
    attention_config = model.model.layers[0].self_attn.config
    assert type(attention_config) is type(model.config) and attention_config is not model.config
    assert attention_config._attn_implementation == LATENT_MEMORY_ATTENTION
    assert model.config._attn_implementation == "sdpa" and model.model.config is model.config
    ids, latent = random_ids(2, 5), latents(2)
    sdpa = model(ids, latent=latent).logits
    model.set_attn_implementation("eager")
    assert model.config._attn_implementation == "eager"
    eager = model(ids, latent=latent, output_attentions=True)  # eager alone returns the attention maps
    assert eager.attentions[0].shape[-1] == ids.shape[1]  # the gated memory's: the text's own softmax
    torch.testing.assert_close(eager.logits, sdpa, rtol=1e-5, atol=1e-5)


def test_the_decoder_run_on_its_own_is_the_llm():
    """`model.model` run by a tool outside the CVAE's forward (in evaluation) attends as the LLM does, without the
    memory: the same hidden states as the architecture's own model with the same weights."""
    model = make_model(perturb_zero_init=True)
    llm = LlamaForCausalLM(tiny_llama_config()).eval()
    llm.load_state_dict({name: tensor for name, tensor in model.state_dict().items()
                         if name.startswith(("model.", "lm_head."))})  # fmt: skip
    ids = random_ids(2, 5)
    with torch.no_grad():
        torch.testing.assert_close(model.model(ids).last_hidden_state, llm.model(ids).last_hidden_state)


def test_the_base_model_gives_the_hidden_states_the_head_reads():
    """`CVAELlamaModel` (the decoder run with the latent) returns the hidden states from which the causal LM's head
    gives its logits, with the same latent and posterior."""
    causal_lm = make_model(perturb_zero_init=True)
    base = CVAELlamaModel(causal_lm.config).eval()
    assert base.lm_head is None and not hasattr(base, "generate")
    missing, unexpected = base.load_state_dict(causal_lm.state_dict(), strict=False)
    assert not missing and unexpected == ["lm_head.weight"]
    ids = random_ids(2, 5)
    with torch.no_grad():
        full = causal_lm(ids, labels=ids)
        hidden = base(ids, encode_input_ids=True)
    torch.testing.assert_close(causal_lm.lm_head(hidden.last_hidden_state), full.logits)
    torch.testing.assert_close(hidden.latent_mean, full.latent_mean)


def test_precomputed_memory_states_of_the_wrong_shape_are_refused():
    model = make_model()
    ids, latent = random_ids(2, 5), latents(2)
    states = model.latent_memory(latent)
    torch.testing.assert_close(model(ids, latent=latent, latent_memory=states).logits, model(ids, latent=latent).logits)
    for bad in (states[:1], states[:, :1], tuple(states.unbind(1))):
        with pytest.raises(ValueError, match=r"latent_memory is .* \(batch, num_hidden_layers, num_memory_slots"):
            model(ids, latent=latent, latent_memory=bad)


@pytest.mark.parametrize("decoder_mode", ["frozen", "full", "lora"])
def test_decoder_mode_freezes_after_every_way_parameters_are_put_in_place(tmp_path, decoder_mode):
    """One home for the freezing (`tie_weights`, which transformers calls whenever it places parameters): a built
    model, one loaded from a folder (loading makes new, trainable parameters), one built around an LLM and one whose
    vocabulary was resized all train exactly the parameters `decoder_mode` says."""
    model = make_model(decoder_mode=decoder_mode)
    model.save_pretrained(tmp_path)
    llm = LlamaForCausalLM(tiny_llama_config())
    resized = make_model(decoder_mode=decoder_mode)
    resized.resize_token_embeddings(120, mean_resizing=False)
    for built in (model, CVAELlamaForCausalLM.from_pretrained(tmp_path),
                  CVAELlamaForCausalLM.from_llm(llm, latent_size=8, decoder_mode=decoder_mode), resized):  # fmt: skip
        frozen = built.frozen_parameter_names()
        assert {name for name, p in built.named_parameters() if not p.requires_grad} == frozen
        assert not any(name.startswith(("encoder.", "latent_memory.")) for name in frozen)  # no copies to freeze
        assert any(name.startswith("model.") for name in frozen) == (decoder_mode != "full")
