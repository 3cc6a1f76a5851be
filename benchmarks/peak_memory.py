"""Peak resident memory of training one variant, in a fresh process: `plain`, `frozen` or `full`.

    python benchmarks/peak_memory.py frozen 30 16 32 32

Prints one JSON line: `step_peak_mib`, the process's peak resident set after two training steps minus its
resident set after the imports (weights + gradients + optimizer states + activations).
"""

import json
import resource
import sys
from pathlib import Path

import torch
from transformers import LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import adamw, cvae_step, make_batch, plain_step, smollm2_shape  # noqa: E402

from cvae_llama import CVAELlamaConfig, CVAELlamaForCausalLM  # noqa: E402


def resident_mib() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize() / 2**20


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    variant, layers, rows, prompt, response = argv[0], *map(int, argv[1:5])
    if variant not in ("plain", "frozen", "full"):
        raise SystemExit(f"variant must be plain, frozen or full, got {variant!r}")
    baseline = resident_mib()
    shape = smollm2_shape(layers)
    if "--tiny" in argv:
        from cpu_ratios import tiny_shape

        shape = tiny_shape(layers)
    torch.manual_seed(0)
    if variant == "plain":
        model, step = LlamaForCausalLM(shape), plain_step
    else:
        model, step = CVAELlamaForCausalLM(CVAELlamaConfig.from_llama_config(shape, decoder_mode=variant)), cvae_step
    model.train()
    optimizer = adamw(model)
    batch = make_batch(shape.vocab_size, rows, prompt, response)
    for _ in range(2):
        step(model, optimizer, batch)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"variant": variant, "step_peak_mib": peak - baseline}))


if __name__ == "__main__":
    main()
