"""`pipeline("text-generation")` on a saved CVAE-Llama folder, with and without `latent=` (passed on to `generate`)."""

import pytest
import torch
from test_remote_code import saved_tiny_model
from transformers import pipeline


@pytest.fixture(scope="module")
def text_generator(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-cvae")
    saved_tiny_model(folder)
    return pipeline("text-generation", model=str(folder), trust_remote_code=True)


def greedy_text(generator, prompt: str, latent: torch.Tensor, max_new_tokens: int = 5) -> str:
    """What `model.generate` writes after `prompt` for `latent`, decoded."""
    input_ids = generator.tokenizer(prompt, return_tensors="pt").input_ids
    sequences = generator.model.generate(input_ids, latent=latent, max_new_tokens=max_new_tokens, do_sample=False)
    return generator.tokenizer.decode(sequences[0, input_ids.shape[1]:], skip_special_tokens=True)


def captured_latents(generator):
    seen = []
    handle = generator.model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["latent"].clone()), with_kwargs=True
    )
    return seen, handle


def test_pipeline_loads_the_cvae(text_generator):
    assert type(text_generator.model).__name__ == "CVAELlamaForCausalLM"
    assert text_generator.model.config.model_type == "cvae_llama"


def test_pipeline_with_a_latent(text_generator):
    latent = torch.randn(8, generator=torch.Generator().manual_seed(0))
    kwargs = dict(latent=latent, max_new_tokens=5, do_sample=False, return_full_text=False)
    first = text_generator("w5 w6 w7", **kwargs)
    second = text_generator("w5 w6 w7", **kwargs)
    assert first == second  # a fixed latent with greedy decoding writes the same text
    assert first[0]["generated_text"].strip() == greedy_text(text_generator, "w5 w6 w7", latent)
    assert len(first[0]["generated_text"].split()) == 5
    # the latent reaches the model unchanged
    seen, handle = captured_latents(text_generator)
    text_generator("w5 w6 w7", **kwargs)
    handle.remove()
    assert torch.equal(seen[0], latent[None])
    # one (latent_size,) latent shared by a list of prompts
    batch = text_generator(["w5 w6 w7", "w9 w10"], **kwargs)
    assert batch[0] == first
    assert batch[1][0]["generated_text"].strip() == greedy_text(text_generator, "w9 w10", latent)


def test_pipeline_without_a_latent_samples_the_prior(text_generator):
    seen, handle = captured_latents(text_generator)
    outputs = text_generator("w5 w6 w7", max_new_tokens=4, do_sample=False, num_return_sequences=3)
    handle.remove()
    assert len(outputs) == 3 and all(output["generated_text"].startswith("w5 w6 w7") for output in outputs)
    assert seen[0].shape == (3, 8) and torch.unique(seen[0], dim=0).shape[0] == 3  # one prior sample per sequence
    seen, handle = captured_latents(text_generator)
    text_generator("w5 w6 w7", max_new_tokens=2, do_sample=False)
    text_generator("w5 w6 w7", max_new_tokens=2, do_sample=False)
    handle.remove()
    assert not torch.equal(seen[0], seen[-1])  # a fresh prior sample per call


def test_pipeline_rejects_a_bad_latent(text_generator):
    with pytest.raises(ValueError, match=r"latent has shape \(1, 5\) but the model expects \(batch, 8\)"):
        text_generator("w5 w6 w7", latent=torch.zeros(1, 5), max_new_tokens=2)
