"""What the CVAE costs over the LLM it wraps, on CPU: ratios measured side by side in one process.

    python benchmarks/cpu_ratios.py                 # the tables of benchmarks/README.md (about 30 minutes here)
    python benchmarks/cpu_ratios.py --quick         # one tiny iteration of everything (the smoke test)
    python benchmarks/cpu_ratios.py --sections depth generate --threads 2   # some of the tables

Shapes: SmolLM2-135M (30 layers, hidden 576), random weights, in the decoder architecture `--architecture` (default
Llama; the peak-memory section stays Llama); one group of 16 responses, prompt 32 + response 32
tokens. Each variant is interleaved round by round with a plain model of its own (one pair in memory at a time);
each cell is the median of the per-round ratios, with the min-max spread in brackets. Peak memory is measured in fresh subprocesses (see peak_memory.py).
"""

import argparse
import gc
import json
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    adamw,
    build_pair,
    causal_lm,
    cvae_step,
    format_table,
    interleaved,
    make_batch,
    plain_step,
    ratio_summary,
    smollm2_shape,
)

from cvae_llama import CVAELlamaConfig  # noqa: E402
from cvae_llama.configuration_cvae_llama import BASE_CONFIG_CLASSES  # noqa: E402
from cvae_llama.modeling_cvae_llama import reparameterize  # noqa: E402
from cvae_llama.latent_statistics import density_gap  # noqa: E402


def fmt(summary) -> str:
    median, low, high = summary
    return f"{median:.3f} [{low:.3f}-{high:.3f}]"


def train_ratios(layers: int, rows: int, prompt: int, response: int, repeats: int, tiny: bool = False,
                 architecture: str = "llama") -> dict:  # fmt: skip
    """Train-step time of the CVAE (frozen, full) over a full fine-tuning step of the plain LLM.

    Also a plain LLM with as many more layers as the CVAE's posterior encoder has (2): the encoder runs those layers
    over the same tokens, so `plain + encoder layers / plain` is the floor of `full / plain` for this architecture.

    Each variant is timed against a plain model of its own, the two interleaved, and both are freed before the next
    pair. With all four models and their AdamW states resident at once (7 GB at 30 layers), the variants slowed
    each other unevenly: at 30 layers full / plain measured 1.23-1.25 that way and 1.04 in pairs (2026-11-26).
    """
    def shape_of(num_layers: int):
        return (tiny_shape if tiny else smollm2_shape)(num_layers, architecture=architecture)

    batch = make_batch(shape_of(layers).vocab_size, rows, prompt, response)
    columns = {"frozen": "frozen / plain", "full": "full / plain", "deeper": "plain + encoder layers / plain"}
    encoder_layers = CVAELlamaConfig.from_base_config(shape_of(layers)).num_encoder_layers
    ratios, times = {}, {}
    for variant, column in columns.items():
        if variant == "deeper":
            torch.manual_seed(0)
            plain, other = causal_lm(shape_of(layers)), causal_lm(shape_of(layers + encoder_layers))
            step = plain_step
        else:
            plain, other = build_pair(shape_of(layers), variant)
            step = cvae_step
        optimizers = {"plain": adamw(plain.train()), variant: adamw(other.train())}
        pair = interleaved(
            {
                "plain": lambda: plain_step(plain, optimizers["plain"], batch),
                variant: lambda: step(other, optimizers[variant], batch),
            },
            repeats=repeats,
        )
        ratios[column] = fmt(ratio_summary(pair[variant], pair["plain"]))
        times[variant], times[f"plain ({variant} pair)"] = pair[variant], pair["plain"]
        del plain, other, optimizers
        gc.collect()
    plain_times = sorted(t for name, values in times.items() if name.startswith("plain") for t in values)
    return {
        "architecture": architecture,
        "layers": layers,
        "tokens": f"{rows}x{prompt + response}",
        "plain step (s)": f"{plain_times[len(plain_times) // 2]:.3f}",
        **ratios,
        "_times": times,
    }


def generate_ratio(layers: int, batch_size: int, prompt: int, new_tokens: int, repeats: int, tiny=False,
                   architecture: str = "llama") -> dict:  # fmt: skip
    """New tokens per second of `generate(latent=z)` over plain `generate` (greedy, same decoder weights)."""
    shape = (tiny_shape if tiny else smollm2_shape)(layers, architecture=architecture)
    plain, cvae = build_pair(shape, "frozen")
    plain.eval()
    cvae.eval()
    input_ids = make_batch(shape.vocab_size, batch_size, prompt, 0)["input_ids"]
    latent = cvae.sample_prior(batch_size)
    options = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=2)
    times = interleaved(
        {
            "plain": lambda: plain.generate(input_ids, attention_mask=torch.ones_like(input_ids), **options),
            "cvae": lambda: cvae.generate(
                input_ids, attention_mask=torch.ones_like(input_ids), latent=latent, **options
            ),
        },
        repeats=repeats,
    )
    # tokens/s ratio = (n / t_cvae) / (n / t_plain) = t_plain / t_cvae
    return {
        "architecture": architecture,
        "layers": layers,
        "batch": batch_size,
        "new tokens": new_tokens,
        "plain tokens/s": f"{batch_size * new_tokens / sorted(times['plain'])[repeats // 2]:.1f}",
        "cvae / plain tokens/s": fmt(ratio_summary(times["plain"], times["cvae"])),
    }


def regulariser_share(layers: int, rows: int, prompt: int, response: int, repeats: int, tiny=False,
                      architecture: str = "llama") -> dict:  # fmt: skip
    """Share of one (frozen-decoder) train step spent in the DG term and the G-Skip, timed in isolation."""
    shape = (tiny_shape if tiny else smollm2_shape)(layers, architecture=architecture)
    _, cvae = build_pair(shape, "frozen")
    cvae.train()
    batch = make_batch(shape.vocab_size, rows, prompt, response)
    optimizer = adamw(cvae)
    hidden_grad = torch.randn(rows, prompt + response, shape.hidden_size)
    mean = torch.randn(rows, cvae.config.latent_size, requires_grad=True)
    logvar = torch.randn(rows, cvae.config.latent_size, requires_grad=True)

    def dg_alone():
        density_gap(mean, logvar, 16).backward()

    def gskip_alone():
        samples = reparameterize(mean, logvar, cvae.config.gskip_samples)
        skip = cvae.latent_skip(samples)
        hidden = torch.zeros(rows, prompt + response, shape.hidden_size, requires_grad=True)
        (hidden + (skip - skip.detach())[:, None]).backward(hidden_grad)

    times = interleaved(
        {"step": lambda: cvae_step(cvae, optimizer, batch), "dg": dg_alone, "gskip": gskip_alone},
        repeats=repeats,
    )
    step = sorted(times["step"])[repeats // 2]
    dg = sorted(times["dg"])[repeats // 2]
    gskip = sorted(times["gskip"])[repeats // 2]
    return {
        "layers": layers,
        "step (s)": f"{step:.3f}",
        "DG (ms)": f"{1000 * dg:.2f}",
        "G-Skip (ms)": f"{1000 * gskip:.2f}",
        "DG + G-Skip share": f"{100 * (dg + gskip) / step:.2f} %",
    }


def peak_memory(layers: int, rows: int, prompt: int, response: int, tiny=False) -> dict:
    """Peak resident memory of a training step, each variant in a fresh subprocess (see peak_memory.py)."""
    script = Path(__file__).resolve().parent / "peak_memory.py"
    result = {}
    for variant in ("plain", "frozen", "full"):
        command = [sys.executable, str(script), variant, str(layers), str(rows), str(prompt), str(response)]
        if tiny:
            command.append("--tiny")
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        result[variant] = json.loads(output.strip().splitlines()[-1])["step_peak_mib"]
    return {
        "layers": layers,
        "plain (MiB)": f"{result['plain']:.0f}",
        "frozen / plain": f"{result['frozen'] / result['plain']:.3f}",
        "full / plain": f"{result['full'] / result['plain']:.3f}",
    }


SECTIONS = ("depth", "length", "generate", "share", "memory")


def tiny_shape(layers: int, architecture: str = "llama"):
    return smollm2_shape(layers, architecture, vocab_size=128, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                         num_key_value_heads=2)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one tiny iteration of every measurement")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS),
                        help="measurements to run (default: all)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--architecture", choices=list(BASE_CONFIG_CLASSES), default="llama",
                        help="decoder architecture of the depth, length, generate and share sections (default: llama)")
    args = parser.parse_args(argv)
    architecture = args.architecture
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    tiny = args.quick
    repeats = 1 if args.quick else args.repeats
    rows, prompt, response = (4, 4, 4) if tiny else (16, 32, 32)
    depths = (2,) if tiny else (4, 12, 30)
    lengths = ((2, 4),) if tiny else ((16, 32), (4, 128), (2, 512))  # (rows, prompt = response) per length

    sections = {}
    if "depth" in args.sections:
        sections["train step, depth sweep (one group of 16, 32 + 32 tokens)"] = [
            train_ratios(depth, rows, prompt, response, repeats, tiny, architecture) for depth in depths
        ]
    if "length" in args.sections:
        sections["train step, sequence-length sweep (4 layers; fewer rows at long lengths)"] = [
            train_ratios(depths[0], r, half, half, repeats, tiny, architecture) for r, half in lengths
        ]
    if "generate" in args.sections:
        sections["generate, greedy, 64 new tokens, batch 8"] = [
            generate_ratio(depth, 2 if tiny else 8, prompt, 4 if tiny else 64, max(repeats, 1), tiny, architecture)
            for depth in depths
        ]
    if "share" in args.sections:
        sections["DG term + G-Skip, share of one train step"] = [
            regulariser_share(depth, rows, prompt, response, max(repeats, 1), tiny, architecture) for depth in depths
        ]
    if "memory" in args.sections:
        sections["peak memory of a train step"] = [peak_memory(depth, rows, prompt, response, tiny) for depth in depths]

    for title, rows_ in sections.items():
        columns = [key for key in rows_[0] if not key.startswith("_")]
        print(f"\n### {title}\n")
        print(format_table(rows_, columns))
    if args.json:
        args.json.write_text(json.dumps(sections, indent=2, default=str))


if __name__ == "__main__":
    main()
