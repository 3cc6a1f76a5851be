"""FSDP: CVAETrainer refuses FSDP where accelerate would run DDP instead (CPU processes), and FSDP2 applied as
accelerate applies it shards, trains and saves a CVAE built with `from_llm` (`torchrun --nproc_per_node 2`, gloo)."""

import json
from pathlib import Path

import pytest
import torch
from fsdp_train import WIDE, save_base
from safetensors.torch import load_file
from test_ddp import run_arguments, torchrun

from cvae_llama import CVAELlamaForCausalLM


pytestmark = pytest.mark.slow  # two torchrun processes per run

TESTS = Path(__file__).resolve().parent


def test_fsdp_asked_on_cpu_processes_is_refused_instead_of_training_ddp_replicas(tmp_path):
    """accelerate sets FSDP up only on accelerators: on CPU processes `fsdp` would train unsharded DDP replicas."""
    arguments = run_arguments(tmp_path, "dg", per_device_batch=1)
    result = torchrun(TESTS / "ddp_train.py", *arguments, "--ddp_backend", "gloo",
                      "--fsdp", "--fsdp_config", json.dumps({"version": 2}))  # fmt: skip
    assert result.returncode != 0, result.stdout[-3000:]
    assert "rank 0 of 2" not in result.stdout  # no step was trained
    for part in ("ValueError: fsdp=True with fsdp_config['version']=2 asks for FSDP", "distributed type MULTI_CPU",
                 "2 DistributedDataParallel replicas of the whole model, nothing sharded",
                 "torch.distributed.fsdp.fully_shard"):  # fmt: skip
        assert part in result.stderr, (part, result.stderr[-5000:])


@pytest.fixture(scope="module", params=["plain", "4bit"], ids=["plain", "4bit"])
def fsdp_run(request, tmp_path_factory):
    """`fsdp_train.py` on 2 processes, the base as it is or loaded in 4 bits: (the base LLM's folder, the output
    folder, its report)."""
    quantized = request.param == "4bit"
    if quantized:
        pytest.importorskip("bitsandbytes")
    base = save_base(tmp_path_factory.mktemp("base"), **(WIDE if quantized else {}))
    output_dir = tmp_path_factory.mktemp("fsdp")
    result = torchrun(TESTS / "fsdp_train.py", str(base), str(output_dir), *(["4bit"] if quantized else []))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return base, output_dir, json.loads((output_dir / "report.json").read_text())


def test_fsdp2_shards_every_parameter_of_the_cvae(fsdp_run):
    _, _, report = fsdp_run
    units = set(report["fsdp_units"])
    assert {"<root>", "model.layers.0", "model.layers.1", "encoder.layers.0", "encoder.layers.1"} <= units
    assert report["not_dtensor"] == []
    assert report["not_sharded"] == []  # each rank holds a part of every tensor with a first dimension >= 2


def test_fsdp2_trains_exactly_the_trainable_parameters(fsdp_run):
    _, _, report = fsdp_run
    assert all(torch.isfinite(torch.tensor(report["losses"])))
    assert report["trainable_unchanged"] == []  # a gradient reached every one
    assert report["frozen_changed"] == []  # the LLM's own tensors, the shared ones included


def test_the_decoders_tensors_are_shared_not_copied_under_fsdp2(fsdp_run):
    _, _, report = fsdp_run
    keys = report["state_dict_keys"]
    assert "model.embed_tokens.weight" in keys and "model.layers.0.self_attn.k_proj.weight" in keys
    copies = [key for key in keys if key.startswith("encoder.embed_tokens.")
              or key.startswith("latent_memory.") and key.split(".")[3] in ("k_proj", "v_proj", "k_norm")]  # fmt: skip
    assert copies == []


def reload_matches_the_sharded_model(folder: Path, output_dir: Path) -> CVAELlamaForCausalLM:
    """Reload `folder` and check its logits for the run's fixed inputs and latent against the sharded model's."""
    fixed = load_file(output_dir / "logits.safetensors")
    model = CVAELlamaForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        logits = model(input_ids=fixed["input_ids"], attention_mask=fixed["attention_mask"], latent=fixed["latent"])
    torch.testing.assert_close(logits.logits, fixed["logits"])
    assert model.encoder.embed_tokens is None  # the decoder's tensors, shared as in the model that was sharded
    assert all(layer.k_proj is None and layer.v_proj is None for layer in model.latent_memory.layers)
    return model


def test_the_gathered_state_dict_saved_standalone_reloads_to_the_sharded_models_logits(fsdp_run):
    _, output_dir, report = fsdp_run
    if report["quantized"]:
        assert "the decoder is quantised" in report["standalone_save"]  # a 4-bit decoder saves as an adapter only
        return
    assert report["standalone_save"] == "ok"
    reload_matches_the_sharded_model(output_dir / "standalone", output_dir)


def test_the_gathered_state_dict_saved_as_an_adapter_reloads_to_the_sharded_models_logits(fsdp_run):
    base, output_dir, report = fsdp_run
    assert report["adapter_save"] == "ok", report["adapter_save"]
    assert not [key for key in load_file(output_dir / "adapter" / "model.safetensors") if key.startswith("model.")]
    model = reload_matches_the_sharded_model(output_dir / "adapter", output_dir)
    assert model.config.base_model_name_or_path == str(base)
    assert getattr(model, "is_loaded_in_4bit", False) == report["quantized"]  # reloaded in 4 bits as it was trained


def test_the_folders_saved_under_fsdp2_are_the_cvaes_hub_folders(fsdp_run):
    """`fully_shard` makes the model an instance of torch's `FSDPCVAELlamaForCausalLM`: the folders still name the
    CVAE's own class and carry its code."""
    _, output_dir, report = fsdp_run
    folders = [output_dir / name for name in ("standalone", "adapter") if report[f"{name}_save"] == "ok"]
    assert len(folders) == (1 if report["quantized"] else 2)
    for folder in folders:
        config = json.loads((folder / "config.json").read_text())
        assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_cvae_llama.CVAELlamaForCausalLM"
        assert config["auto_map"]["AutoModel"] == "modeling_cvae_llama.CVAELlamaForCausalLM"
        assert config["architectures"] == ["CVAELlamaForCausalLM"]
        assert (folder / "modeling_cvae_llama.py").is_file() and not list(folder.glob("_fsdp*.py"))
