"""Shared pieces of the benchmarks: model shapes, the two training steps compared, and timing helpers.

Every ratio is measured side by side in one process: the variants are interleaved, each repeated, and the median
and the spread (min-max of the per-round ratio) are reported, because this machine is shared and noisy.
"""

import statistics
import time
from collections.abc import Callable

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PretrainedConfig

from cvae_llama import CVAELlamaConfig, CVAELlamaForCausalLM
from cvae_llama.configuration_cvae_llama import BASE_CONFIG_CLASSES
from cvae_llama.modeling_cvae_llama import DECODER_ARCHITECTURES
from cvae_llama.latent_statistics import density_gap


def smollm2_shape(num_hidden_layers: int = 30, architecture: str = "llama", **overrides) -> PretrainedConfig:
    """The shape of SmolLM2-135M (random weights: no download), in a decoder architecture of `BASE_CONFIG_CLASSES`
    (the same sizes: Qwen2 adds its q/k/v biases, Qwen3 its q/k norms, Mistral a sliding window longer than the
    benchmarks' sequences)."""
    values = dict(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=8192,
        rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    values.update(overrides)
    return BASE_CONFIG_CLASSES[architecture](**values)


def causal_lm(config: PretrainedConfig):
    """transformers' own causal LM of the config's architecture (`LlamaForCausalLM`, `Qwen3ForCausalLM`, ...)."""
    return DECODER_ARCHITECTURES[config.model_type].causal_lm(config)


def llama3_8b_shape(**overrides) -> LlamaConfig:
    """The shape of Llama-3-8B (random weights: no download)."""
    values = dict(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=8192,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
        bos_token_id=128000,
        eos_token_id=128001,
        pad_token_id=128001,
    )
    values.update(overrides)
    return LlamaConfig(**values)


def build_pair(config: PretrainedConfig, decoder_mode: str, dtype=torch.float32, device="cpu", **cvae_fields):
    """A plain causal LM of the config's architecture and the CVAE built around it (`from_llm`: same weights)."""
    torch.manual_seed(0)
    plain = causal_lm(config).to(device=device, dtype=dtype)
    cvae = CVAELlamaForCausalLM.from_llm(plain, decoder_mode=decoder_mode, **cvae_fields)
    return plain, cvae


def make_batch(vocab_size: int, rows: int, prompt_tokens: int, response_tokens: int, device="cpu"):
    """One group: `rows` responses of one prompt, labels on the response tokens only."""
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, vocab_size, (1, prompt_tokens), generator=generator).expand(rows, -1)
    response = torch.randint(3, vocab_size, (rows, response_tokens), generator=generator)
    input_ids = torch.cat([prompt, response], dim=1).to(device)
    labels = input_ids.clone()
    labels[:, :prompt_tokens] = -100
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}


def plain_step(model: LlamaForCausalLM, optimizer: torch.optim.Optimizer, batch: dict) -> torch.Tensor:
    """A full fine-tuning step of the plain LLM: forward, backward, AdamW."""
    loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def cvae_step(model: CVAELlamaForCausalLM, optimizer: torch.optim.Optimizer, batch: dict, dg_samples: int = 16):
    """A CVAE step with the paper's objective: reconstruction + density gap over the group, G-Skip in the model."""
    outputs = model(**batch)
    loss = outputs.reconstruction_loss + density_gap(outputs.latent_mean, outputs.latent_logvar, dg_samples)
    del outputs  # as in CVAETrainer and plain_step: the logits (rows x tokens x vocab) are not kept through backward
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def adamw(model: torch.nn.Module, fused: bool | None = None) -> torch.optim.Optimizer:
    trained = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(trained, lr=1e-5, betas=(0.9, 0.95), fused=fused)


def synchronize(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def interleaved(variants: dict[str, Callable[[], object]], repeats: int, warmup: int = 1, device="cpu"):
    """Time each variant `repeats` times, interleaved round by round; returns {name: [seconds, ...]}."""
    for _ in range(warmup):
        for run in variants.values():
            run()
    times = {name: [] for name in variants}
    for _ in range(repeats):
        for name, run in variants.items():
            synchronize(device)
            start = time.perf_counter()
            run()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return times


def ratio_summary(numerator: list[float], denominator: list[float]) -> tuple[float, float, float]:
    """Median of the per-round ratios and their min and max (the spread)."""
    ratios = [a / b for a, b in zip(numerator, denominator)]
    return statistics.median(ratios), min(ratios), max(ratios)


def format_table(rows: list[dict], columns: list[str]) -> str:
    """A markdown table."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(str(row.get(column, "")) for column in columns) + " |")
    return "\n".join(lines)


__all__ = [
    "smollm2_shape",
    "causal_lm",
    "llama3_8b_shape",
    "build_pair",
    "make_batch",
    "plain_step",
    "cvae_step",
    "adamw",
    "interleaved",
    "ratio_summary",
    "format_table",
]
