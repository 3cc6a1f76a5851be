"""One GPU check at the Llama-3-8B shape: random bf16 weights (no download), SDPA, gradient checkpointing.

    python benchmarks/gpu_check.py                  # on an NVIDIA GPU (about 3-5 minutes on one H100)
    python benchmarks/gpu_check.py --layers 2 --quick   # a tiny smoke run (CPU works too)

Prints one table: train-step time and peak memory of the CVAE (decoder frozen, decoder trained) over a full
fine-tuning step of the plain LLM, generate tokens/s, the DG + G-Skip share of a step, and whether cached and
uncached generation agree. An 8B model and its AdamW states do not fit twice on one card, so the variants run one
after the other (a GPU is not shared, so their timings are stable), each `--repeats` times; medians reported.
"""

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import adamw, cvae_step, format_table, llama3_8b_shape, make_batch, plain_step  # noqa: E402

from cvae_llama import CVAELlamaConfig, CVAELlamaForCausalLM  # noqa: E402
from cvae_llama.modeling_cvae_llama import reparameterize  # noqa: E402
from cvae_llama.trainer import density_gap  # noqa: E402


def timed(function, repeats: int, device) -> float:
    function()  # warm-up
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        function()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def build(variant: str, shape, device, dtype):
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            if variant == "plain":
                model = LlamaForCausalLM(shape)
            else:
                config = CVAELlamaConfig.from_llama_config(shape, decoder_mode=variant)
                model = CVAELlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    model.config._attn_implementation  # noqa: B018 (sdpa is the default)
    return model


def free(*objects):
    for obj in objects:
        del obj
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="a tiny shape, one repeat (smoke test)")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    overrides = dict(num_hidden_layers=args.layers)
    if args.quick:
        overrides.update(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                         vocab_size=256, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    shape = llama3_8b_shape(**overrides)
    repeats = 1 if args.quick else args.repeats
    rows, prompt, response = (4, 4, 4) if args.quick else (16, 32, 32)
    batch = {k: v.to(device) for k, v in make_batch(shape.vocab_size, rows, prompt, response).items()}
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"device: {name}; shape: {shape.num_hidden_layers} layers, hidden {shape.hidden_size}; dtype {dtype}")

    step_time, peak = {}, {}
    for variant in ("plain", "frozen", "full"):
        model = build(variant, shape, device, dtype).train()
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        optimizer = adamw(model)
        step = plain_step if variant == "plain" else cvae_step
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        step_time[variant] = timed(lambda: step(model, optimizer, batch), repeats, device)
        peak[variant] = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
        if variant == "frozen":
            mean = torch.randn(rows, model.config.latent_size, device=device, dtype=dtype, requires_grad=True)
            logvar = torch.randn_like(mean, requires_grad=True)
            dg = timed(lambda: density_gap(mean, logvar, 16).backward(), repeats, device)

            def gskip():
                skip = model.latent_skip(reparameterize(mean, logvar, model.config.gskip_samples))
                hidden = torch.zeros(rows, prompt + response, shape.hidden_size, device=device, dtype=dtype,
                                     requires_grad=True)
                (hidden + (skip - skip.detach())[:, None]).sum().backward()

            skip_time = timed(gskip, repeats, device)
        del optimizer
        free(model)

    # generation: the plain model and the frozen CVAE share the decoder's weights (from_llm), inference only
    plain = build("plain", shape, device, dtype).eval()
    cvae = CVAELlamaForCausalLM.from_llm(plain, decoder_mode="frozen").eval()
    input_ids = batch["input_ids"][: min(8, rows), :prompt]
    latent = cvae.sample_prior(input_ids.shape[0])
    new_tokens = 4 if args.quick else 64
    options = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                   pad_token_id=shape.pad_token_id)
    options["attention_mask"] = torch.ones_like(input_ids)
    plain_time = timed(lambda: plain.generate(input_ids, **options), repeats, device)
    cvae_time = timed(lambda: cvae.generate(input_ids, latent=latent, **options), repeats, device)
    cached = cvae.generate(input_ids, latent=latent, return_dict_in_generate=True, output_logits=True, **options)
    full_logits = cvae(cached.sequences, latent=latent).logits[:, prompt - 1 : -1].float()
    step_logits = torch.stack(cached.logits, dim=1).float()
    agreement = (full_logits - step_logits).abs().max().item()
    same_tokens = torch.equal(full_logits.argmax(-1), step_logits.argmax(-1))

    rows_out = [
        {"measure": "train step, decoder frozen / plain full fine-tune", "value": f"{step_time['frozen'] / step_time['plain']:.3f}", "target": "<= 0.9"},
        {"measure": "train step, decoder trained / plain full fine-tune", "value": f"{step_time['full'] / step_time['plain']:.3f}", "target": "<= 1.15"},
        {"measure": "generate(latent=z) tokens/s / plain tokens/s", "value": f"{plain_time / cvae_time:.3f}", "target": ">= 0.95"},
        {"measure": "peak memory, frozen / plain", "value": f"{peak['frozen'] / peak['plain']:.3f}", "target": "well under 1"},
        {"measure": "peak memory, trained / plain", "value": f"{peak['full'] / peak['plain']:.3f}", "target": "<= 1.1"},
        {"measure": "DG + G-Skip share of a frozen step", "value": f"{100 * (dg + skip_time) / step_time['frozen']:.2f} %", "target": "< 2 %"},
        {"measure": "cached vs uncached generation, max |logit diff|", "value": f"{agreement:.3g} (argmax equal: {same_tokens})", "target": "bf16 noise"},
        {"measure": "plain step (s) / peak (GiB)", "value": f"{step_time['plain']:.3f} / {peak['plain']:.1f}", "target": ""},
    ]
    print(format_table(rows_out, ["measure", "value", "target"]))


if __name__ == "__main__":
    main()
