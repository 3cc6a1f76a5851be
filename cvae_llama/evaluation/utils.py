"""Shared pieces of the evaluation: model checks, the base LM inside a CVAE, prompt encoding and batched decoding."""

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm
from transformers import LlamaConfig, LlamaForCausalLM

from ..configuration_cvae_llama import CVAE_FIELDS
from ..data import encode_prompts
from ..modeling_cvae_llama import CVAELlamaForCausalLM


def check_cvae(model) -> CVAELlamaForCausalLM:
    """Raise `ValueError` unless `model` is a [`CVAELlamaForCausalLM`] (a peft-wrapped one must be merged first)."""
    if not isinstance(model, CVAELlamaForCausalLM):
        hint = " (merge LoRA adapters first: model.merge_and_unload())" if hasattr(model, "get_base_model") else ""
        raise ValueError(
            f"model must be a CVAELlamaForCausalLM (a CVAE with a posterior encoder and a latent), got "
            f"{type(model).__name__}{hint}"
        )
    return model


def check_texts(texts, name: str) -> list[str]:
    if isinstance(texts, str) or not isinstance(texts, Sequence) or not all(isinstance(t, str) for t in texts):
        raise ValueError(f"{name} must be a list of strings, got {type(texts).__name__}")
    if len(texts) == 0:
        raise ValueError(f"{name} is empty; expected at least one text")
    return list(texts)


def check_positive_int(value, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def decoder_as_causal_lm(model: CVAELlamaForCausalLM) -> LlamaForCausalLM:
    """The CVAE's decoder as a plain `LlamaForCausalLM` (the same modules, shared, not copied), without the latent.

    With `decoder_mode="frozen"` (the paper) this is exactly the LLM the CVAE was built from: its samples are the
    base LM's samples. Positions start at 0, as in the LLM, and no memory slot is attended to.
    """
    check_cvae(model)
    values = model.config.to_dict()
    for key in (*CVAE_FIELDS, "model_type", "architectures", "auto_map", "base_model_name_or_path"):
        values.pop(key, None)
    config = LlamaConfig(**values)
    config._attn_implementation = model.config._attn_implementation
    with torch.device("meta"):  # no weights allocated: the modules come from the CVAE
        llm = LlamaForCausalLM(config)
    llm.model, llm.lm_head = model.model, model.lm_head
    llm.generation_config = model.generation_config.__class__.from_dict(model.generation_config.to_dict())
    return llm.train(model.training)


def pad_token_id(tokenizer) -> int:
    """The tokenizer's pad token, else its end-of-sequence token."""
    token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if token_id is None:
        raise ValueError("the tokenizer has neither a pad token nor an end-of-sequence token; set tokenizer.pad_token")
    return token_id


def prompt_inputs(tokenizer, prompts: Sequence[str], max_prompt_tokens: int | None = None) -> dict[str, torch.Tensor]:
    """`input_ids` and `attention_mask` of prompts for `generate`, left-padded, tokenised exactly as the collator does
    (`cvae_llama.data.encode_prompts`: the tokenizer's BOS once, the prompt's last `max_prompt_tokens` tokens)."""
    ids = encode_prompts(tokenizer, list(prompts), max_prompt_tokens)
    length = max(len(row) for row in ids)
    input_ids = torch.full((len(ids), length), pad_token_id(tokenizer), dtype=torch.long)
    attention_mask = torch.zeros((len(ids), length), dtype=torch.long)
    for row, tokens in enumerate(ids):
        input_ids[row, length - len(tokens) :] = torch.tensor(tokens, dtype=torch.long)
        attention_mask[row, length - len(tokens) :] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def decode_new_tokens(tokenizer, sequences: torch.Tensor, prompt_length: int) -> list[str]:
    """Texts of the generated continuations (after `prompt_length`), special tokens skipped, whitespace stripped."""
    return [text.strip() for text in tokenizer.batch_decode(sequences[:, prompt_length:], skip_special_tokens=True)]


@torch.no_grad()
def generate_texts(
    model,
    tokenizer,
    prompts: Sequence[str],
    latents: torch.Tensor | None = None,
    max_new_tokens: int = 32,
    max_prompt_tokens: int | None = None,
    batch_size: int = 32,
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
    "check_cvae",
    "decode_new_tokens",
    "decoder_as_causal_lm",
    "generate_texts",
    "prompt_inputs",
]
