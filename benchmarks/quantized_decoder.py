"""A 4-bit decoder against a bf16 one: peak training memory and step time of the same CVAE on the same batch.

    python benchmarks/quantized_decoder.py                          # SmolLM2-135M shape, CPU (numbers: README.md)
    python benchmarks/quantized_decoder.py --shape llama3-8b --device cuda   # the goal's shape, on one GPU
    python benchmarks/quantized_decoder.py --llm /path/to/Meta-Llama-3-8B --device cuda   # real weights instead
    python benchmarks/quantized_decoder.py --tiny --steps 1         # the smoke test (2 layers, hidden 64)

The LLM is a random-weight model of the chosen shape, saved once in bf16 with `save_pretrained` (safetensors) to a
temporary folder (under $TMPDIR), or an existing folder with `--llm`. Each variant loads it with
`CVAELlamaForCausalLM.from_llm(folder, dtype=torch.bfloat16, decoder_mode="frozen", ...)`:

- `bf16`: the decoder in bf16, frozen;
- `4-bit`: the decoder's linear layers bitsandbytes 4-bit (`quantization_config=BitsAndBytesConfig(load_in_4bit=True,
  bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)`), frozen; the
  embeddings and the head stay bf16 (bitsandbytes does not quantise them), and so do the CVAE's own modules.

The CVAE's settings are the defaults in both (the same trainable modules: 9.6 M parameters at SmolLM2's shape); the
encoder's layers start as copies of the decoder's (dequantised in the 4-bit variant), and the fresh modules from a
seed (the two load paths draw different numbers before them, so their values differ; memory and time do not depend on
them). Both train the CVAE's own modules with AdamW on `common.cvae_step` (the posterior's reconstruction loss + the
density gap over the group, G-Skip in the model) on one seeded group of ROWS x (PROMPT + RESPONSE) tokens: `--warmup`
steps, then `--steps` timed steps (median reported). Each variant runs in a fresh process (this script, `--measure`),
so that the peaks do not mix:

- CPU: the peak resident set (VmHWM) minus the resident set after the imports (bitsandbytes imported in both); the
  peak is reset after the model is built (`/proc/self/clear_refs`, as `adapter_size.py`), so the peak is the steps'
  with the weights resident, not the load's. Before the reset the heap's freed blocks go back to the system
  (`malloc_trim(0)`, in both variants): loading a 4-bit decoder frees the bf16 weights it read in the loader
  threads' arenas, which glibc keeps resident (0-450 MiB at SmolLM2's shape from run to run: the JSON's
  `built_untrimmed_mib`) and the steps reuse only in part. One thread by default (`--threads`). Run with
  `MALLOC_MMAP_THRESHOLD_=65536` in the environment for peaks that repeat to the MiB (glibc then returns large blocks
  when they are freed; the steps are slower, and both peaks lower). VmHWM also counts
  the resident pages of mapped files: the table's "of which file-backed" column (RssFile over the baseline, after the
  steps) shows them, "of that, the model's tensors" the bytes of the model's tensors that are views into a mapped
  file, and a third ratio line leaves out the difference (file pages no tensor uses). With the 4-bit decoder the bf16
  embedding and norms stay views into the mapped safetensors file, so the mapping lives on, and the pages of the
  weights read while quantising stay resident with it (about the file's size).
- CUDA (`--device cuda`): `torch.cuda.max_memory_allocated()` over the steps, after `reset_peak_memory_stats()` once
  the model is built; the steps are timed with `torch.cuda.synchronize()`. Gradient checkpointing (non-reentrant, as
  `gpu_check.py`) is on by default on CUDA, off on CPU (`--gradient-checkpointing` / `--no-gradient-checkpointing`).

The goal, 4-bit / bf16 peak memory <= 0.4, is set at the Llama-3-8B shape on a GPU, where the decoder's weights
dominate. At the SmolLM2-135M shape on CPU the figures show the direction only: the embedding (28 M of 135 M
parameters) stays bf16, the activations and the loss over 49,152 words weigh more against the weights, and
bitsandbytes runs its CPU fallback (each 4-bit matmul dequantises the weight to bf16, then multiplies).

`--shape llama3-8b` first builds the random 8B model on the device and saves it: 16 GB of disk (under $TMPDIR) and a
few minutes on the GPU machine (acceptable there; on a 2-core CPU it is not). The models themselves then need about
21 GiB (bf16) of GPU memory at 16 x (32 + 32) tokens with checkpointing (`gpu_check.py`'s frozen CVAE). `--llm PATH`
skips the saving and uses a saved LLM, e.g. a real Llama-3-8B. `--json PATH` also writes the numbers.
"""

import argparse
import ctypes
import gc
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers
from transformers import BitsAndBytesConfig, PretrainedConfig


sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    adamw,
    causal_lm,
    cvae_step,
    format_table,
    llama3_8b_shape,
    make_batch,
    smollm2_shape,
    synchronize,
)
from peak_memory import status_mib  # noqa: E402

from cvae_llama import CVAELlamaForCausalLM  # noqa: E402


MEMORY_GOAL = 0.4  # 4-bit / bf16 peak training memory, at the Llama-3-8B shape on a GPU
VARIANTS = {
    "bf16": "decoder bf16, frozen",
    "4-bit": "decoder 4-bit NF4 (double quant, bf16 compute), frozen",
}


def nf4_config() -> BitsAndBytesConfig:
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16)  # fmt: skip


def shape_of(args) -> PretrainedConfig:
    if args.tiny:  # bitsandbytes quantises in blocks of 64: hidden and intermediate sizes are multiples of 64
        return smollm2_shape(args.layers or 2, vocab_size=128, hidden_size=64, intermediate_size=128,
                             num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    if args.shape == "llama3-8b":
        return llama3_8b_shape(**({"num_hidden_layers": args.layers} if args.layers else {}))
    return smollm2_shape(args.layers or 30)


def save_random_llm(shape: PretrainedConfig, folder: Path, device: torch.device) -> Path:
    """A seeded random LLM of `shape`, built on `device` in bf16 and saved with safetensors."""
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            llm = causal_lm(shape)
    finally:
        torch.set_default_dtype(previous)
    llm.save_pretrained(folder)
    del llm
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return folder


def weight_mib(model: torch.nn.Module) -> float:
    """The bytes of the model's parameters and buffers (shared ones once; a 4-bit weight counts its packed bytes,
    without its quantisation state's small absmax tensors)."""
    tensors = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values()) / 2**20


def mapped_tensor_mib(model: torch.nn.Module) -> float:
    """The bytes of the model's tensors that are views into a mapped file (a safetensors checkpoint), in MiB: the
    file-backed pages that the model uses (Linux's /proc/self/maps)."""
    ranges = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            if len(fields) >= 6 and fields[4] != "0":  # a mapping with an inode: a file
                start, end = (int(address, 16) for address in fields[0].split("-"))
                ranges.append((start, end))
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in (*model.parameters(),
                                                                                        *model.buffers())}  # fmt: skip
    return sum(size for pointer, size in storages.items() if any(a <= pointer < b for a, b in ranges)) / 2**20


def trim_heap() -> bool:
    """Give the heap's freed blocks back to the system (glibc's `malloc_trim(0)`, every arena); False without glibc."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        return False
    return True


def measure(variant: str, llm: str, batch_shape: tuple[int, int, int], steps: int, warmup: int, device: torch.device,
            checkpointing: bool) -> dict:  # fmt: skip
    """`warmup` + `steps` CVAE training steps of one variant in this process: peak memory (MiB) and step times."""
    import bitsandbytes  # noqa: F401  (in both variants, before the baseline: the import is not the decoder's cost)

    baseline = status_mib("VmRSS") if device.type == "cpu" else 0.0
    file_baseline = status_mib("RssFile") if device.type == "cpu" else 0.0
    loading = dict(dtype=torch.bfloat16, decoder_mode="frozen")
    if device.type == "cuda":
        loading["device_map"] = {"": device.index or 0}
    if variant == "4-bit":
        loading["quantization_config"] = nf4_config()
    start = time.perf_counter()
    torch.manual_seed(0)
    model = CVAELlamaForCausalLM.from_llm(llm, **loading)
    load_s = time.perf_counter() - start
    model.train()
    if checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    optimizer = adamw(model, fused=device.type == "cuda")
    batch = {k: v.to(device) for k, v in make_batch(model.config.vocab_size, *batch_shape).items()}
    synchronize(device)
    if device.type == "cuda":
        built = untrimmed = torch.cuda.memory_allocated() / 2**20
        trimmed = False
        torch.cuda.reset_peak_memory_stats()
        reset = True
    else:  # the blocks freed while loading (the bf16 weights read before quantising) go back first, in both variants:
        untrimmed = status_mib("VmRSS") - baseline  # glibc keeps them in the loader threads' arenas, out of reach
        trimmed = trim_heap()
        built = status_mib("VmRSS") - baseline
        try:  # forget the load's peak: the steps' peak is measured, with the weights resident
            Path("/proc/self/clear_refs").write_text("5")
            reset = True
        except OSError:
            reset = False
    torch.manual_seed(0)  # the steps' latent samples
    times, losses = [], []
    for index in range(warmup + steps):
        synchronize(device)
        start = time.perf_counter()
        losses.append(cvae_step(model, optimizer, batch).float().item())
        synchronize(device)
        if index >= warmup:
            times.append(time.perf_counter() - start)
    file_backed = mapped = 0.0
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:  # and the resident file pages (mapped safetensors), which VmHWM counts too: constant over the steps
        peak = status_mib("VmHWM") - baseline
        file_backed = status_mib("RssFile") - file_baseline
        mapped = mapped_tensor_mib(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    quantized = sum(type(m).__name__ == "Linear4bit" for m in model.modules())
    return {"variant": variant, "peak_mib": peak, "built_mib": built, "built_untrimmed_mib": untrimmed,
            "heap_trimmed": trimmed, "file_backed_mib": file_backed,
            "mapped_tensors_mib": mapped,
            "weights_mib": weight_mib(model), "step_s": statistics.median(times), "step_times_s": times,
            "losses": losses, "load_s": load_s, "trainable": trainable, "linear4bit_modules": quantized,
            "peak_reset": reset}  # fmt: skip


def run_variant(variant: str, llm: Path, args) -> dict:
    """One variant in a fresh process (this script with `--measure`): its last stdout line, a JSON object."""
    command = [sys.executable, __file__, "--measure", variant, "--llm", str(llm), "--device", args.device,
               "--batch", *map(str, args.batch), "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--threads", str(args.threads), "--gradient-checkpointing" if args.gradient_checkpointing
               else "--no-gradient-checkpointing"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"the {variant} variant failed (exit {result.returncode}):\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=["smollm2", "llama3-8b"], default="smollm2",
                        help="the random LLM's shape (default smollm2: SmolLM2-135M)")  # fmt: skip
    parser.add_argument("--layers", type=int, help="override the shape's number of layers")
    parser.add_argument("--tiny", action="store_true", help="a tiny random Llama (2 layers, hidden 64): smoke test")
    parser.add_argument("--llm", type=Path, help="an existing LLM folder instead of saving random weights")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--batch", type=int, nargs=3, metavar=("ROWS", "PROMPT", "RESPONSE"), default=None,
                        help="one group of ROWS x (PROMPT + RESPONSE) tokens (default 16 32 32; --tiny: 4 4 4)"
                        )  # fmt: skip
    parser.add_argument("--steps", type=int, default=3, help="timed steps after the warm-up (median reported)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                        help="non-reentrant activation checkpointing (default: on with CUDA, off on CPU)")  # fmt: skip
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    parser.add_argument("--measure", choices=VARIANTS, help=argparse.SUPPRESS)  # one variant (the subprocess)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", 0)
    if args.gradient_checkpointing is None:
        args.gradient_checkpointing = device.type == "cuda"
    args.batch = args.batch or ([4, 4, 4] if args.tiny else [16, 32, 32])
    torch.set_num_threads(args.threads)
    if args.measure:
        result = measure(args.measure, str(args.llm), tuple(args.batch), args.steps, args.warmup, device,
                         args.gradient_checkpointing)  # fmt: skip
        print(json.dumps(result))
        return

    import bitsandbytes

    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as temporary:
        if args.llm:
            llm, name = args.llm, str(args.llm)
            shape = transformers.AutoConfig.from_pretrained(llm)
        else:
            shape = shape_of(args)
            name = "tiny Llama" if args.tiny else {"smollm2": "SmolLM2-135M", "llama3-8b": "Llama-3-8B"}[args.shape]
            name += " shape, random bf16 weights"
            llm = save_random_llm(shape, Path(temporary, "llm"), device)
            print(f"[{time.perf_counter() - start:6.1f} s] saved the random LLM to {llm}", flush=True)
        rows, prompt, response = args.batch
        where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {args.threads} thread(s)"
        checkpointing = "on" if args.gradient_checkpointing else "off"
        print(f"LLM: {name} ({shape.num_hidden_layers} layers, hidden {shape.hidden_size}); device: {where}; "
              f"torch {torch.__version__}, transformers {transformers.__version__}, bitsandbytes "
              f"{bitsandbytes.__version__}; one group of {rows} x ({prompt} + {response}) tokens; {args.warmup} "
              f"warm-up + {args.steps} timed steps; gradient checkpointing {checkpointing}", flush=True)  # fmt: skip
        results = {}
        for variant in VARIANTS:
            results[variant] = run_variant(variant, llm, args)
            print(f"[{time.perf_counter() - start:6.1f} s] {variant}: peak {results[variant]['peak_mib']:,.0f} MiB, "
                  f"step {results[variant]['step_s']:.3f} s", flush=True)  # fmt: skip

    table = [{"variant": f"{variant}: {VARIANTS[variant]}", "weights (MiB)": f"{result['weights_mib']:,.1f}",
              "after build (MiB)": f"{result['built_mib']:,.0f}", "peak (MiB)": f"{result['peak_mib']:,.0f}",
              "of which file-backed (MiB)": f"{result['file_backed_mib']:,.0f}",
              "of that, the model's tensors (MiB)": f"{result['mapped_tensors_mib']:,.0f}",
              "step (s)": f"{result['step_s']:.3f}",
              "trainable parameters": f"{result['trainable']:,}", "first loss": f"{result['losses'][0]:.4f}"}
             for variant, result in results.items()]  # fmt: skip
    columns = ["variant", "weights (MiB)", "after build (MiB)", "peak (MiB)", "of which file-backed (MiB)",
               "of that, the model's tensors (MiB)", "step (s)", "trainable parameters", "first loss"]  # fmt: skip
    if device.type == "cuda":
        columns = [column for column in columns if "file-backed" not in column and "of that" not in column]
    print()
    print(format_table(table, columns))
    quantized, plain = results["4-bit"], results["bf16"]
    memory_ratio = quantized["peak_mib"] / plain["peak_mib"]
    time_ratio = quantized["step_s"] / plain["step_s"]
    # the peak less the resident file pages that no tensor of the model uses (mapped libraries, a checkpoint's
    # pages whose weights were quantised)
    used = {variant: result["peak_mib"] - result["file_backed_mib"] + result["mapped_tensors_mib"]
            for variant, result in results.items()}  # fmt: skip
    used_ratio = used["4-bit"] / used["bf16"]
    print(f"\n4-bit / bf16 peak memory: {memory_ratio:.3f} (goal at 8B: <= {MEMORY_GOAL})")
    print(f"4-bit / bf16 step time: {time_ratio:.3f}")
    if device.type == "cpu":
        print(f"4-bit / bf16 peak memory without the file pages no tensor uses: {used_ratio:.3f} (resident pages of "
              "mapped files, such as a checkpoint whose weights were quantised, which VmHWM counts)")  # fmt: skip
    if not all(result["peak_reset"] for result in results.values()):
        print("(/proc/self/clear_refs was not writable: the CPU peaks include loading the model)")
    if device.type == "cpu":
        print("On CPU the figures show the direction only: the goal is set at the Llama-3-8B shape on a GPU.")
    print(f"total {time.perf_counter() - start:.1f} s")
    if args.json:
        record = {"llm": name, "layers": shape.num_hidden_layers, "hidden_size": shape.hidden_size,
                  "device": where, "torch": torch.__version__, "transformers": transformers.__version__,
                  "bitsandbytes": bitsandbytes.__version__, "tokens": args.batch, "warmup": args.warmup,
                  "steps": args.steps, "gradient_checkpointing": args.gradient_checkpointing, "results": results,
                  "memory_ratio": memory_ratio, "memory_ratio_without_unused_file_pages": used_ratio,
                  "step_time_ratio": time_ratio, "memory_goal": MEMORY_GOAL}  # fmt: skip
        args.json.write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
