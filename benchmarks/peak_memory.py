"""Peak resident memory of training one variant, in a fresh process: `plain`, `frozen` or `full`.

    python benchmarks/peak_memory.py frozen 30 16 32 32

Prints one JSON line: `step_peak_mib`, the process's peak resident set (VmHWM) after two training steps minus its
resident set after the imports (weights + gradients + optimizer states + activations). VmHWM, unlike
`getrusage`'s ru_maxrss, starts afresh in a new program (ru_maxrss keeps the parent's peak across fork and exec).
"""

import json
import sys
from pathlib import Path

import torch
from transformers import LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import adamw, cvae_step, make_batch, plain_step, smollm2_shape  # noqa: E402

from cvae_llama import CVAELlamaConfig, CVAELlamaForCausalLM  # noqa: E402


def status_mib(field: str) -> float:
    """A memory figure of this process from /proc/self/status (Linux), in MiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    variant, layers, rows, prompt, response = argv[0], *map(int, argv[1:5])
    if variant not in ("plain", "frozen", "full"):
        raise SystemExit(f"variant must be plain, frozen or full, got {variant!r}")
    baseline = status_mib("VmRSS")
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
    peak = status_mib("VmHWM")
    print(json.dumps({"variant": variant, "step_peak_mib": peak - baseline}))


if __name__ == "__main__":
    main()
