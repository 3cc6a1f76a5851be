"""Shared pieces of the evaluation: model checks, the base LM inside a CVAE, prior samples, prompt encoding and
batched decoding."""

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from ..data.collator import prompt_inputs
from ..modeling_cvae_llama import DECODER_ARCHITECTURES, CVAELlamaForCausalLM
from ..validation import check_non_negative_float, check_positive_int, check_texts, pad_token_id


# Defaults of the evaluation functions: the cap on generated tokens, and the rows of one forward or `generate` call.
DEFAULT_MAX_NEW_TOKENS = 32
DEFAULT_BATCH_SIZE = 32


def check_cvae(model) -> CVAELlamaForCausalLM:
    """Raise `ValueError` unless `model` is a [`CVAELlamaForCausalLM`] (a peft-wrapped one must be merged first)."""
    if not isinstance(model, CVAELlamaForCausalLM):
        hint = " (merge LoRA adapters first: model.merge_and_unload())" if hasattr(model, "get_base_model") else ""
        raise ValueError(
            f"model must be a CVAELlamaForCausalLM (a CVAE with a posterior encoder and a latent), got "
            f"{type(model).__name__}{hint}"
        )
    return model


def decoder_as_causal_lm(model: CVAELlamaForCausalLM):
    """The CVAE's decoder as a plain causal LM of its architecture (`LlamaForCausalLM`, `Qwen3ForCausalLM`, ...:
    the same modules, shared, not copied), without the latent.

    With `decoder_mode="frozen"` (the paper) this is exactly the LLM the CVAE was built from: its samples are the
    base LM's samples. Positions start at 0, as in the LLM, and no memory slot is attended to.
    """
    check_cvae(model)
    config = model.config.base_config()
    config._attn_implementation = model.config._attn_implementation
    with torch.device("meta"):  # no weights allocated: the modules come from the CVAE
        llm = DECODER_ARCHITECTURES[model.config.base_model_type].causal_lm(config)
    llm.model, llm.lm_head = model.model, model.lm_head
    llm.generation_config = model.generation_config.__class__.from_dict(model.generation_config.to_dict())
    return llm.train(model.training)


def prior_latents(
    model: CVAELlamaForCausalLM,
    num_latents: int,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """`(num_latents, latent_size)` prior samples z ~ N(0, temperature^2 I), float32 on the CPU.

    The same numbers as `model.sample_prior(num_latents, temperature, generator)` on a CPU model, drawn on the CPU
    whatever the model's device: `sample_prior` draws on the model's device, where a CPU `generator` cannot be used
    and a CUDA one gives other numbers, while an evaluation's seed must give the same latents (and texts) on every
    machine. `generator` is a CPU generator; the global CPU random state when `None`.
    """
    check_positive_int(num_latents, "num_latents")
    temperature = check_non_negative_float(temperature, "latent_temperature")
    return temperature * torch.randn(num_latents, model.config.latent_size, generator=generator)


def decode_new_tokens(tokenizer, sequences: torch.Tensor, prompt_length: int) -> list[str]:
    """Texts of the generated continuations (after `prompt_length`), special tokens skipped, whitespace stripped."""
    return [text.strip() for text in tokenizer.batch_decode(sequences[:, prompt_length:], skip_special_tokens=True)]


@torch.no_grad()
def generate_texts(
    model,
    tokenizer,
    prompts: Sequence[str],
    latents: torch.Tensor | None = None,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    max_prompt_tokens: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    desc: str | None = None,
    **generate_kwargs,
) -> list[str]:
    """One continuation per prompt, in batches; with a CVAE, row i is conditioned on `latents[i]`.

    Greedy unless `generate_kwargs` ask otherwise (`do_sample=True`, `temperature=...`).
    """
    prompts = check_texts(prompts, "prompts")
    if latents is not None and latents.shape[0] != len(prompts):
        raise ValueError(
            f"latents has {latents.shape[0]} rows but there are {len(prompts)} prompts; expected one latent per prompt"
        )
    generate_kwargs.setdefault("do_sample", False)
    generate_kwargs.setdefault("pad_token_id", pad_token_id(tokenizer))
    if not generate_kwargs["do_sample"]:
        generate_kwargs.update(temperature=None, top_p=None, top_k=None)
    texts = []
    starts = range(0, len(prompts), batch_size)
    for start in tqdm(starts, desc=desc, disable=desc is None or len(starts) < 2, leave=False):
        inputs = prompt_inputs(tokenizer, prompts[start : start + batch_size], max_prompt_tokens)
        inputs = {key: value.to(model.device) for key, value in inputs.items()}
        if latents is not None:
            generate_kwargs["latent"] = latents[start : start + batch_size].to(device=model.device, dtype=model.dtype)
        sequences = model.generate(**inputs, max_new_tokens=max_new_tokens, **generate_kwargs)
        texts.extend(decode_new_tokens(tokenizer, sequences, inputs["input_ids"].shape[1]))
    return texts


__all__ = [
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_MAX_NEW_TOKENS",
    "check_cvae",
    "decode_new_tokens",
    "decoder_as_causal_lm",
    "generate_texts",
    "prior_latents",
    "prompt_inputs",
]
