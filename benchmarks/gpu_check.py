"""One GPU check at the Llama-3-8B shape: random bf16 weights (no download), SDPA, gradient checkpointing.

    python benchmarks/gpu_check.py                  # on an NVIDIA GPU: about 40 s on one H100 80GB, models built
    python benchmarks/gpu_check.py --rows 8 --prompt-tokens 256 --response-tokens 256   # more tokens per step
    python benchmarks/gpu_check.py --profile prof/  # where the time goes (torch.profiler), per variant
    python benchmarks/gpu_check.py --layers 2 --quick   # a tiny smoke run (CPU works too)

Prints one table: train-step time and peak memory (`torch.cuda.max_memory_allocated`) of the CVAE (decoder frozen,
decoder trained) over a full fine-tuning step of the plain LLM, generate tokens/s (whole calls, and decoding alone),
the DG + G-Skip share of a step, and how far cached decoding is from an uncached forward, next to the plain LLM's own
figure. An 8B model and its AdamW states do not fit twice on one card, so the training variants run one after the
other (a GPU is not shared, so their timings are stable), each `--repeats` times; medians reported. AdamW is fused."""

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers
from transformers import LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    adamw,
    cvae_step,
    format_table,
    interleaved,
    llama3_8b_shape,
    make_batch,
    plain_step,
    synchronize,
)

from cvae_llama import CVAELlamaConfig, CVAELlamaForCausalLM  # noqa: E402
from cvae_llama.modeling_cvae_llama import reparameterize  # noqa: E402
from cvae_llama.latent_statistics import density_gap  # noqa: E402


def timed(function, repeats: int, device) -> float:
    """Median seconds of `repeats` calls after a warm-up, synchronised with the device."""
    return statistics.median(interleaved({"run": function}, repeats, device=device)["run"])


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
    return model  # sdpa attention, transformers' default


def release() -> None:
    """Give the freed blocks back, so the next variant's peak starts from what it holds itself."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def training(variant: str, shape, batch, device, dtype):
    """One variant, with non-reentrant gradient checkpointing, and a callable running one AdamW step of it."""
    model = build(variant, shape, device, dtype).train()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    # fused AdamW on CUDA: foreach AdamW keeps a temporary the size of every trained parameter (sqrt of the
    # second moments), which at 8B in bf16 is 15 GiB on top of the weights, gradients and states
    optimizer = adamw(model, fused=device.type == "cuda")
    step = plain_step if variant == "plain" else cvae_step
    return model, lambda: step(model, optimizer, batch)


def measure_training(variant: str, shape, batch, device, dtype, repeats: int) -> dict:
    """Median step time and peak memory of one variant; DG and G-Skip times on the frozen CVAE."""
    model, train_step = training(variant, shape, batch, device, dtype)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    result = {"step_s": timed(train_step, repeats, device)}
    result["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    if variant == "frozen":
        rows, length = batch["input_ids"].shape
        mean = torch.randn(rows, model.config.latent_size, device=device, dtype=dtype, requires_grad=True)
        logvar = torch.randn_like(mean, requires_grad=True)
        result["dg_s"] = timed(lambda: density_gap(mean, logvar, 16).backward(), repeats, device)

        def gskip():
            skip = model.latent_skip(reparameterize(mean, logvar, model.config.gskip_samples))
            hidden = torch.zeros(rows, length, shape.hidden_size, device=device, dtype=dtype, requires_grad=True)
            (hidden + (skip - skip.detach())[:, None]).sum().backward()

        result["gskip_s"] = timed(gskip, repeats, device)
    return result


def cache_agreement(model, input_ids, options, **latent) -> tuple[float, float]:
    """Cached decoding against one uncached forward over the finished sequences: the largest logit difference
    and the share of steps whose argmax agrees."""
    cached = model.generate(input_ids, return_dict_in_generate=True, output_logits=True, **options, **latent)
    uncached = model(cached.sequences, **latent).logits[:, input_ids.shape[1] - 1 : -1].float()
    stepwise = torch.stack(cached.logits, dim=1).float()
    agree = (uncached.argmax(-1) == stepwise.argmax(-1)).float().mean().item()
    return (uncached - stepwise).abs().max().item(), agree


def measure_generation(plain, cvae, input_ids, new_tokens: int, repeats: int, device) -> dict:
    """Greedy generate of the plain LLM and the CVAE (`latent=z`), interleaved; also 1-token calls (the prefill),
    so that decoding alone can be compared, and the cached-vs-uncached agreement of both models."""
    latent = cvae.sample_prior(input_ids.shape[0])

    def options(tokens):
        return dict(max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, attention_mask=torch.ones_like(input_ids),
                    pad_token_id=plain.config.pad_token_id)

    runs = {
        "plain": lambda: plain.generate(input_ids, **options(new_tokens)),
        "cvae": lambda: cvae.generate(input_ids, latent=latent, **options(new_tokens)),
        "plain_prefill": lambda: plain.generate(input_ids, **options(1)),
        "cvae_prefill": lambda: cvae.generate(input_ids, latent=latent, **options(1)),
    }
    with torch.no_grad():
        result = {name: statistics.median(times) for name, times in interleaved(runs, repeats, device=device).items()}
        for name in ("plain", "cvae"):
            result[f"{name}_decode"] = result[name] - result[f"{name}_prefill"]
        result["plain_cache_diff"], result["plain_cache_argmax"] = cache_agreement(plain, input_ids, options(new_tokens))
        result["cvae_cache_diff"], result["cvae_cache_argmax"] = cache_agreement(
            cvae, input_ids, options(new_tokens), latent=latent
        )
    return result


def profiled(function, device, out: Path, name: str) -> dict:
    """One profiled call (after two warm-ups): wall time, GPU kernel time, launches and host syncs; the op tables
    go to `out`."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    for _ in range(2):
        function()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    synchronize(device)
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        function()
        synchronize(device)
        wall = time.perf_counter() - start
    events = prof.key_averages()
    count = {event.key: event.count for event in events}
    summary = {
        "wall_ms": 1e3 * wall,
        # the kernels' own events (the CPU ops that launched them carry the same time again)
        "kernel_ms": sum(event.self_device_time_total for event in events if event.device_type != DeviceType.CPU) / 1e3,
        "kernel_launches": count.get("cudaLaunchKernel", 0) + count.get("cuLaunchKernel", 0),
        "host_syncs": count.get("aten::_local_scalar_dense", 0) + count.get("cudaStreamSynchronize", 0),
    }
    sort = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    text = events.table(sort_by=sort, row_limit=40) + "\n\n" + events.table(sort_by="cpu_time_total", row_limit=40)
    (out / f"profile_{name}.txt").write_text(text)
    return summary


def profile_all(shape, batch, device, dtype, out: Path) -> None:
    """Where the time goes: one profiled train step of each variant and one generate call of each model."""
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for variant in ("plain", "frozen", "full"):
        train_step = training(variant, shape, batch, device, dtype)[1]
        rows.append({"run": f"train step, {variant}", **profiled(train_step, device, out, variant)})
        del train_step
        release()
    plain = build("plain", shape, device, dtype).eval()
    start = time.perf_counter()
    cvae = CVAELlamaForCausalLM.from_llm(plain, decoder_mode="frozen").eval()
    print(f"from_llm: {time.perf_counter() - start:.1f} s", flush=True)
    input_ids = batch["input_ids"][:8, :32]
    options = dict(max_new_tokens=16, min_new_tokens=16, do_sample=False, pad_token_id=shape.pad_token_id,
                   attention_mask=torch.ones_like(input_ids))
    latent = cvae.sample_prior(input_ids.shape[0])
    with torch.no_grad():
        rows.append({"run": "generate 16, plain", **profiled(lambda: plain.generate(input_ids, **options), device, out, "generate_plain")})
        rows.append({"run": "generate 16, cvae", **profiled(lambda: cvae.generate(input_ids, latent=latent, **options), device, out, "generate_cvae")})
    for row in rows:
        row.update({key: f"{row[key]:.1f}" for key in ("wall_ms", "kernel_ms")})
    print(format_table(rows, ["run", "wall_ms", "kernel_ms", "kernel_launches", "host_syncs"]))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="a tiny shape, one repeat (smoke test)")
    parser.add_argument("--rows", type=int, default=16, help="responses in the one training group")
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--response-tokens", type=int, default=32)
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--json", type=Path, help="also write the measurements here")
    parser.add_argument("--profile", type=Path, metavar="DIR",
                        help="instead of the table: profile one step of each variant and one generate call of each "
                             "model (torch.profiler), print where the time goes, write the op tables to DIR")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    overrides = dict(num_hidden_layers=args.layers)
    if args.quick:
        overrides.update(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                         vocab_size=256, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    shape = llama3_8b_shape(**overrides)
    repeats = 1 if args.quick else args.repeats
    rows, prompt, response = (4, 4, 4) if args.quick else (args.rows, args.prompt_tokens, args.response_tokens)
    batch = {k: v.to(device) for k, v in make_batch(shape.vocab_size, rows, prompt, response).items()}
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"device: {name}; torch {torch.__version__}, transformers {transformers.__version__}; shape: "
          f"{shape.num_hidden_layers} layers, hidden {shape.hidden_size}; dtype {dtype}", flush=True)
    if args.profile:
        return profile_all(shape, batch, device, dtype, args.profile)
    start = time.perf_counter()

    train = {}
    for variant in ("plain", "frozen", "full"):
        try:
            train[variant] = measure_training(variant, shape, batch, device, dtype, repeats)
        except torch.OutOfMemoryError as error:
            train[variant] = {"step_s": float("nan"), "peak_gib": float("nan"), "error": f"out of memory: {error}"}
        release()
        print(f"[{time.perf_counter() - start:6.1f} s] {variant}: {train[variant]}", flush=True)

    # generation: the plain model and the frozen CVAE share the decoder's weights (from_llm), inference only
    plain = build("plain", shape, device, dtype).eval()
    cvae = CVAELlamaForCausalLM.from_llm(plain, decoder_mode="frozen").eval()
    input_ids = batch["input_ids"][: min(8, rows), :prompt]
    new_tokens = 4 if args.quick else 64
    generate = measure_generation(plain, cvae, input_ids, new_tokens, repeats, device)
    print(f"[{time.perf_counter() - start:6.1f} s] generate: {generate}", flush=True)

    step, peak = ({v: train[v][key] for v in train} for key in ("step_s", "peak_gib"))
    frozen = train["frozen"]
    dg_share = 100 * (frozen.get("dg_s", float("nan")) + frozen.get("gskip_s", float("nan"))) / step["frozen"]
    rows_out = [
        {"measure": "train step, decoder frozen / plain full fine-tune", "value": f"{step['frozen'] / step['plain']:.3f}", "target": "<= 0.9"},
        {"measure": "train step, decoder trained / plain full fine-tune", "value": f"{step['full'] / step['plain']:.3f}", "target": "<= 1.15"},
        {"measure": "generate(latent=z) tokens/s / plain tokens/s", "value": f"{generate['plain'] / generate['cvae']:.3f}", "target": ">= 0.95"},
        {"measure": "the same, decoding only (prefill, a 1-token generate, subtracted)", "value": f"{generate['plain_decode'] / generate['cvae_decode']:.3f}", "target": ""},
        {"measure": "peak memory, frozen / plain", "value": f"{peak['frozen'] / peak['plain']:.3f}", "target": "well under 1"},
        {"measure": "peak memory, trained / plain", "value": f"{peak['full'] / peak['plain']:.3f}", "target": "<= 1.1"},
        {"measure": "DG + G-Skip share of a frozen step", "value": f"{dg_share:.2f} %", "target": "< 2 %"},
        {"measure": "cached vs uncached generation, cvae: max abs logit diff, argmax agreement", "value": f"{generate['cvae_cache_diff']:.3g}, {100 * generate['cvae_cache_argmax']:.1f} %", "target": "as plain's"},
        {"measure": "cached vs uncached generation, plain (reference)", "value": f"{generate['plain_cache_diff']:.3g}, {100 * generate['plain_cache_argmax']:.1f} %", "target": ""},
        {"measure": "step (s): plain / frozen / full", "value": " / ".join(f"{step[v]:.3f}" for v in train), "target": ""},
        {"measure": "peak (GiB): plain / frozen / full", "value": " / ".join(f"{peak[v]:.1f}" for v in train), "target": ""},
        {"measure": f"generate, {new_tokens} new tokens x {input_ids.shape[0]} (s): plain / cvae", "value": f"{generate['plain']:.3f} / {generate['cvae']:.3f}", "target": ""},
    ]
    print(format_table(rows_out, ["measure", "value", "target"]))
    print(f"total {time.perf_counter() - start:.1f} s")
    if args.json:
        record = {"device": name, "torch": torch.__version__, "transformers": transformers.__version__,
                  "layers": shape.num_hidden_layers, "tokens": [rows, prompt, response], "train": train,
                  "generate": generate, "table": rows_out}
        args.json.write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
