"""Where a training step's memory goes: parameters, gradients and AdamW states, and the tensors autograd saves for
backward, attributed to the module that saved them. Plain `LlamaForCausalLM` against the CVAE.

    python benchmarks/memory_breakdown.py            # SmolLM2-135M shape, 30 layers, one group of 16 x (32 + 32)
    python benchmarks/memory_breakdown.py --tiny     # the smoke test

Saved tensors are counted once per storage, parameters not (they are under "weights"). What this does
not see: short-lived buffers inside an operation and the allocator's own overhead, which `peak_memory.py` includes.
"""

import argparse
import collections
import sys
from pathlib import Path

import torch
from transformers import LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import make_batch, smollm2_shape  # noqa: E402

from cvae_llama import CVAELlamaConfig, CVAELlamaForCausalLM  # noqa: E402
from cvae_llama.latent_statistics import density_gap  # noqa: E402

MIB = 2**20


def component(name: str) -> str:
    """`model.layers.7.mlp.up_proj` -> `decoder mlp`; `encoder.layers.0...` -> `encoder`; `lm_head` -> `lm_head`."""
    parts = name.split(".")
    if parts[:2] == ["model", "layers"]:
        return "decoder " + (parts[3] if len(parts) > 3 else "layer")
    return parts[0] or "loss and outputs"


def saved_tensors_by_component(model, batch: dict) -> dict[str, float]:
    """MiB of the tensors autograd saves in one forward, by the innermost module running when each was saved."""
    running = [""]

    def enter(name):
        def hook(module, args):
            running.append(name)  # returns None: the module's inputs stay as they are

        return hook

    def leave(module, args, output):
        running.pop()

    handles = []
    for name, module in model.named_modules():
        if name:
            handles += [module.register_forward_pre_hook(enter(name)), module.register_forward_hook(leave)]
    # parameters are counted under "weights", not again where a layer saves them
    seen, sizes = {p.untyped_storage().data_ptr() for p in model.parameters()}, collections.Counter()

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            sizes[component(running[-1])] += storage.nbytes() / MIB
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        outputs = model(**batch)
        if isinstance(model, CVAELlamaForCausalLM):
            loss = outputs.reconstruction_loss + density_gap(outputs.latent_mean, outputs.latent_logvar, 16)
        else:
            loss = outputs.loss
    del loss, outputs
    for handle in handles:
        handle.remove()
    return dict(sizes)


def static_mib(model) -> dict[str, float]:
    """Weights (4 bytes each in float32) and, per trainable parameter, a gradient and AdamW's two moments."""
    parameters = {id(p): p for p in model.parameters()}.values()  # tied weights once
    total = sum(p.numel() for p in parameters)
    trainable = sum(p.numel() for p in parameters if p.requires_grad)
    return {"weights": 4 * total / MIB, "gradients + AdamW states": 12 * trainable / MIB}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--tiny", action="store_true", help="a tiny shape (the smoke test)")
    args = parser.parse_args(argv)
    if args.tiny:
        from cpu_ratios import tiny_shape

        shape, (rows, prompt, response) = tiny_shape(2), (4, 4, 4)
    else:
        shape, (rows, prompt, response) = smollm2_shape(args.layers), (16, 32, 32)
    batch = make_batch(shape.vocab_size, rows, prompt, response)
    torch.manual_seed(0)
    models = {"plain": LlamaForCausalLM(shape)}
    for mode in ("frozen", "full"):
        models[f"CVAE {mode}"] = CVAELlamaForCausalLM(CVAELlamaConfig.from_llama_config(shape, decoder_mode=mode))
    table = {}
    for name, model in models.items():
        model.train()
        saved = saved_tensors_by_component(model, batch)
        table[name] = {**static_mib(model), **{f"saved: {key}": value for key, value in saved.items()}}
    rows_ = sorted({key for values in table.values() for key in values}, key=lambda key: (key.startswith("saved"), key))
    print(f"| MiB | {' | '.join(table)} |\n|---|{'---|' * len(table)}")
    for key in rows_ + ["total"]:
        cells = [sum(values.values()) if key == "total" else values.get(key, 0.0) for values in table.values()]
        print(f"| {key} | " + " | ".join(f"{cell:,.0f}" for cell in cells) + " |")


if __name__ == "__main__":
    main()
