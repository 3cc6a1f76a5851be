"""FSDP2 on a CVAE built as users build it: the script `torchrun` runs in `test_fsdp.py` (gloo, CPU).

    torchrun --nproc_per_node 2 tests/fsdp_train.py BASE_FOLDER OUTPUT_DIR [4bit]

`CVAELlamaForCausalLM.from_llm(BASE_FOLDER)` with the default settings (decoder frozen; the encoder's embedding and the
memory's key / value projections are the decoder's own), its memory gates opened, is sharded by accelerate's own
`fsdp2_prepare_model` with the plugin `Trainer` makes of `fsdp=True, fsdp_config={"version": 2}`, trained a few steps
on the model's negative ELBO with AdamW, and its full state dict gathered. Rank 0 then saves it with `save_pretrained`
alone, as `Trainer._save` does under FSDP, after the process group is gone: a collective inside `save_pretrained`,
which under `Trainer` would wait forever for the other ranks, raises instead. It writes into OUTPUT_DIR:

- `standalone/`, `adapter/`: `save_pretrained(state_dict=...)` with `standalone=True` and by default (an adapter on
  the base), where the save succeeds;
- `logits.safetensors`: fixed inputs, a fixed latent and the sharded model's logits for them in eval mode;
- `report.json`: the FSDP units, the losses, what each check found and how each save went.

With `4bit`, the base is loaded in 4 bits (bitsandbytes NF4, stored as float32 as FSDP needs one dtype per unit:
peft's FSDP-QLoRA recipe's `bnb_4bit_quant_storage`); the base must then be 64 wide (bitsandbytes' blocks).
"""

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import torch


# What transformers 5.25 hands accelerate for `TrainingArguments(fsdp=True, fsdp_config={"version": 2})`
# (`args.fsdp_plugin_args`)
FSDP_PLUGIN_ARGS = dict(
    fsdp_version=2,
    auto_wrap_policy="TRANSFORMER_BASED_WRAP",
    cpu_ram_efficient_loading=False,
    state_dict_type="FULL_STATE_DICT",
    reshard_after_forward=True,
)
STEPS = 3


# the 4-bit base: bitsandbytes quantises blocks of 64 inputs
WIDE = dict(hidden_size=64, intermediate_size=128)


def save_base(folder: Path, seed: int = 0, **overrides) -> Path:
    """A tiny seeded Llama (hidden 32, 2 layers, or `overrides`) over `ddp_train`'s word-level tokenizer, saved with
    it into `folder`: a base LLM as users have them."""
    from conftest import tiny_base_config
    from ddp_train import build_tokenizer
    from transformers import LlamaForCausalLM

    tokenizer = build_tokenizer()
    config = tiny_base_config("llama", vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                              bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                              **overrides)  # fmt: skip
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def shard_as_accelerate_does(model: torch.nn.Module) -> torch.nn.Module:
    """FSDP2 as `Trainer` and accelerate 1.16 apply it on GPUs, by accelerate's own function
    (`accelerate.utils.fsdp_utils.fsdp2_prepare_model`): `fully_shard` on every module of a class named in
    `model._no_split_modules` (bottom-up), on the input embedding, on the final norm and the LM head together, then
    on the whole model. accelerate sets the plugin up only for accelerator processes, so a stand-in accelerator
    carries what that function reads."""
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model

    accelerator = SimpleNamespace(
        state=SimpleNamespace(fsdp_plugin=FullyShardedDataParallelPlugin(**FSDP_PLUGIN_ARGS)),
        mixed_precision="no",
        is_main_process=torch.distributed.get_rank() == 0,
        device=torch.device("cpu"),
        parallelism_config=None,
    )
    return fsdp2_prepare_model(accelerator, model)


def full_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter gathered whole (a collective: every rank calls it)."""
    return {name: p.full_tensor().detach().clone() for name, p in model.named_parameters()}


def same_bytes(first: torch.Tensor, second: torch.Tensor) -> bool:
    """Whether two tensors hold the same bytes: a 4-bit weight stored as float32 holds packed codes, some of them
    NaN as floats, which `torch.equal` never finds equal."""
    return torch.equal(first.contiguous().view(torch.uint8), second.contiguous().view(torch.uint8))


def buffers_differing_across_ranks(model: torch.nn.Module) -> list[str]:
    """Names of the buffers whose values differ between ranks (a collective)."""
    world_size = torch.distributed.get_world_size()
    differing = []
    for name, buffer in model.named_buffers():
        gathered = [torch.empty_like(buffer) for _ in range(world_size)]
        torch.distributed.all_gather(gathered, buffer.contiguous())
        if not all(torch.equal(gathered[0], other) for other in gathered[1:]):
            differing.append(name)
    return differing


def main(base: Path, output_dir: Path, quantized: bool = False) -> None:
    import torch.distributed as dist
    from conftest import open_memory_gates
    from ddp_train import build_groups, build_tokenizer
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    from cvae_llama import CVAELlamaForCausalLM
    from cvae_llama.data import OneToManyCollator

    dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    report = {"world_size": world_size, "quantized": quantized}

    torch.manual_seed(0)  # the CVAE's new modules start alike on every rank
    loading = {}
    if quantized:
        from transformers import BitsAndBytesConfig

        loading["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32,
            bnb_4bit_quant_storage=torch.float32,
        )  # fmt: skip
    model = open_memory_gates(CVAELlamaForCausalLM.from_llm(base, **loading))
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    model = shard_as_accelerate_does(model)
    report["fsdp_units"] = [name or "<root>" for name, unit in model.named_modules() if isinstance(unit, FSDPModule)]
    report["not_dtensor"] = [name for name, p in model.named_parameters() if not isinstance(p, DTensor)]
    report["not_sharded"] = [name for name, p in model.named_parameters()
                             if p.shape[0] >= world_size and not p.to_local().numel() < p.numel()]  # fmt: skip

    tokenizer = build_tokenizer()
    groups = build_groups(num_groups=world_size * STEPS)
    collator = OneToManyCollator(tokenizer, max_prompt_tokens=8, max_response_tokens=8)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    before = full_tensors(model)
    model.train()
    losses = []
    for step in range(STEPS):  # each rank its own group, as data parallelism splits a batch
        batch = collator([groups[step * world_size + rank]])
        loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    after = full_tensors(model)
    report["losses"] = losses
    report["trainable_unchanged"] = sorted(name for name in trainable if same_bytes(before[name], after[name]))
    report["frozen_changed"] = sorted(name for name in before.keys() - trainable
                                      if not same_bytes(before[name], after[name]))  # fmt: skip
    report["buffers_differing_across_ranks"] = buffers_differing_across_ranks(model)

    model.eval()
    fixed = collator([groups[0]])
    latent = torch.randn(len(fixed["input_ids"]), model.config.latent_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # a forward of a sharded model is a collective: every rank runs it
        logits = model(input_ids=fixed["input_ids"], attention_mask=fixed["attention_mask"], latent=latent).logits
    state_dict = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    dist.barrier()
    dist.destroy_process_group()
    if rank != 0:
        return
    report["state_dict_keys"] = sorted(state_dict)
    save_file({"input_ids": fixed["input_ids"], "attention_mask": fixed["attention_mask"], "latent": latent,
               "logits": logits.contiguous()}, str(output_dir / "logits.safetensors"))  # fmt: skip
    for folder, kwargs in (("standalone", {"standalone": True}), ("adapter", {})):
        try:
            model.save_pretrained(output_dir / folder, state_dict=state_dict, **kwargs)
            report[f"{folder}_save"] = "ok"
        except Exception as error:  # reported: the test names what failed
            report[f"{folder}_save"] = f"{type(error).__name__}: {error}"
    (output_dir / "report.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main(Path(sys.argv[1]), Path(sys.argv[2]), quantized=sys.argv[3:] == ["4bit"])
