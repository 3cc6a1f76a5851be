"""A saved CVAE-Llama folder is a complete Hub repo that loads with `trust_remote_code` where cvae_llama is absent.

The loading runs in subprocesses in which `import cvae_llama` fails (a `sys.meta_path` finder refuses it, since the
package is installed), from a folder and by repo id from a Hugging Face cache laid out as the Hub lays it out, with
`HF_HUB_OFFLINE=1`: the code path of a real Hub download, without the network.
"""

import ast
import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import open_memory_gates, tiny_cvae_config
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, PreTrainedTokenizerFast

import cvae_llama
from cvae_llama.configuration_cvae_llama import CVAELlamaConfig
from cvae_llama.modeling_cvae_llama import CVAELlamaForCausalLM


CODE_FILES = ("configuration_cvae_llama.py", "modeling_cvae_llama.py")
PACKAGE = Path(cvae_llama.__file__).parent

# Run first in every subprocess: cvae_llama (installed in this environment) cannot be imported there.
BLOCK_CVAE_LLAMA = textwrap.dedent(
    """
    import importlib.abc, sys

    class BlockCVAELlama(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "cvae_llama" or name.startswith("cvae_llama."):
                raise ImportError(f"{name} is blocked: this process must run the model from its remote code")

    sys.meta_path.insert(0, BlockCVAELlama())
    try:
        import cvae_llama
    except ImportError:
        pass
    else:
        raise SystemExit("cvae_llama could be imported")
    """
)

# Loads the model (from a folder or a repo id), writes its logits and generations, checks that no installed code ran.
LOAD_AND_RUN = textwrap.dedent(
    """
    import json, sys
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    source, inputs_path, outputs_path = sys.argv[1:4]
    inputs = torch.load(inputs_path)
    model = AutoModelForCausalLM.from_pretrained(source, trust_remote_code=True).eval()
    config = AutoConfig.from_pretrained(source, trust_remote_code=True)
    base = AutoModel.from_pretrained(source, trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained(source)  # a stock tokenizer: no trust_remote_code, no question asked
    with torch.no_grad():
        logits = model(inputs["input_ids"], latent=inputs["latent"]).logits
        posterior = model.encode(inputs["input_ids"])
    sequences = model.generate(inputs["input_ids"], latent=inputs["latent"], max_new_tokens=5, do_sample=False)
    torch.save({"logits": logits, "latent_mean": posterior[0], "sequences": sequences}, outputs_path)
    modules = sorted(name for name in sys.modules if "cvae_llama" in name)
    print(json.dumps({
        "model_class": type(model).__module__ + "." + type(model).__name__,
        "config_class": type(config).__module__ + "." + type(config).__name__,
        "base_class": type(base).__name__,
        "attention": model.config._attn_implementation,
        "decoder_linear": type(model.model.layers[0].self_attn.q_proj).__name__,
        "tokenizer_decodes": tokenizer.decode(sequences[0]),
        "installed_modules": [name for name in modules if name.startswith("cvae_llama")],
    }))
    """
)


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the tiny configs' 99 ids, built offline: `<pad>` 0, `<s>` 1, `</s>` 2, `<unk>` 3,
    then the words `w4` ... `w98` (left padding, as for batched generation)."""
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{f"w{index}": index for index in range(4, 99)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        padding_side="left",
    )


def saved_tiny_model(folder: Path, **fields) -> CVAELlamaForCausalLM:
    """A tiny seeded model with a non-trivial posterior and open memory gates, saved with its tokenizer into
    `folder`."""
    torch.manual_seed(0)
    model = CVAELlamaForCausalLM(tiny_cvae_config(**fields)).eval()
    with torch.no_grad():
        model.encoder.to_latent_mean_logvar[-1].weight.normal_(std=0.5)
    open_memory_gates(model)
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return model


def run_without_cvae_llama(tmp_path: Path, source: str, environment: dict | None = None) -> tuple[dict, dict]:
    """Run `LOAD_AND_RUN` on `source` in a fresh interpreter where cvae_llama cannot be imported."""
    inputs = {"input_ids": torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]]), "latent": torch.randn(2, 8)}
    torch.save(inputs, tmp_path / "inputs.pt")
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("HF_", "HUGGINGFACE_", "TRANSFORMERS_")) and key != "PYTHONPATH"
    }
    env.update(
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_HOME=str(tmp_path / "hf_home"),
        HF_MODULES_CACHE=str(tmp_path / "modules"),  # where transformers copies the remote code
        TOKENIZERS_PARALLELISM="false",
        **(environment or {}),
    )
    result = subprocess.run(
        [sys.executable, "-c", BLOCK_CVAE_LLAMA + LOAD_AND_RUN, source, "inputs.pt", "outputs.pt"],
        cwd=tmp_path,  # not the checkout: its folder would put cvae_llama on the path
        env=env,
        capture_output=True,
        stdin=subprocess.DEVNULL,  # a question on the console would get no answer
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert len(result.stdout.strip().splitlines()) == 1, result.stdout  # the report alone: nothing asked on stdout
    report = json.loads(result.stdout.strip().splitlines()[-1])
    outputs = torch.load(tmp_path / "outputs.pt")
    return report, {"inputs": inputs, **outputs}


def assert_same_as_local(model: CVAELlamaForCausalLM, report: dict, outputs: dict):
    assert report["installed_modules"] == []  # only the remote copy of the code ran
    assert report["model_class"].startswith("transformers_modules.")
    assert report["model_class"].endswith("modeling_cvae_llama.CVAELlamaForCausalLM")
    assert report["config_class"].endswith("configuration_cvae_llama.CVAELlamaConfig")
    assert report["base_class"] == "CVAELlamaForCausalLM"
    assert report["attention"] == model.config._attn_implementation == "sdpa"
    input_ids, latent = outputs["inputs"]["input_ids"], outputs["inputs"]["latent"]
    with torch.no_grad():
        assert torch.equal(outputs["logits"], model(input_ids, latent=latent).logits)
        assert torch.equal(outputs["latent_mean"], model.encode(input_ids)[0])
    sequences = model.generate(input_ids, latent=latent, max_new_tokens=5, do_sample=False)
    assert torch.equal(outputs["sequences"], sequences)
    vocab = {0: "<pad>", 1: "<s>", 2: "</s>", 3: "<unk>"}  # tiny_tokenizer's special ids, then w4 ... w98
    assert report["tokenizer_decodes"] == " ".join(vocab.get(index, f"w{index}") for index in sequences[0].tolist())


# ------------------------------------------------------------------------------------------------ the saved folder
def test_saved_folder_is_a_complete_hub_repo(tmp_path):
    saved_tiny_model(tmp_path)
    files = {path.name for path in tmp_path.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", *CODE_FILES} <= files
    assert {"tokenizer.json", "tokenizer_config.json"} <= files
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "cvae_llama"
    assert config["architectures"] == ["CVAELlamaForCausalLM"]
    assert config["auto_map"] == {
        "AutoConfig": "configuration_cvae_llama.CVAELlamaConfig",
        "AutoModel": "modeling_cvae_llama.CVAELlamaForCausalLM",
        "AutoModelForCausalLM": "modeling_cvae_llama.CVAELlamaForCausalLM",
    }
    for name in CODE_FILES:  # the code files are the package's own
        assert (tmp_path / name).read_text() == (PACKAGE / name).read_text()
    generation_config = json.loads((tmp_path / "generation_config.json").read_text())
    assert generation_config["bos_token_id"] == 1 and generation_config["eos_token_id"] == 2


@pytest.mark.parametrize("name", CODE_FILES)
def test_code_files_import_only_torch_transformers_and_each_other(name):
    tree = ast.parse((PACKAGE / name).read_text())
    allowed = {"torch", "transformers", *sys.stdlib_module_names, "peft"}  # peft: only for an adapter's LoRA layers
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            assert all(alias.name.split(".")[0] in allowed for alias in node.names), ast.dump(node)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # a relative import: only the other code file
                assert node.module in {Path(code).stem for code in CODE_FILES}, ast.dump(node)
            else:
                assert node.module.split(".")[0] in allowed, ast.dump(node)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            assert node.func.id != "open", "the remote code opens no file"


def test_auto_classes_after_import(tmp_path):
    model = saved_tiny_model(tmp_path)
    assert type(AutoConfig.from_pretrained(tmp_path)) is CVAELlamaConfig
    for auto in (AutoModelForCausalLM, AutoModel):
        loaded = auto.from_pretrained(tmp_path)
        assert type(loaded) is CVAELlamaForCausalLM
        assert all(torch.equal(tensor, loaded.state_dict()[key]) for key, tensor in model.state_dict().items())
    assert type(AutoModelForCausalLM.from_config(tiny_cvae_config())) is CVAELlamaForCausalLM


# ------------------------------------------------------------------------------------------------ remote code
def test_loads_from_a_folder_without_cvae_llama(tmp_path):
    folder = tmp_path / "tiny-cvae"
    model = saved_tiny_model(folder)
    report, outputs = run_without_cvae_llama(tmp_path, str(folder))
    assert_same_as_local(model, report, outputs)


def test_loads_embedding_injection_and_plain_skip_without_cvae_llama(tmp_path):
    folder = tmp_path / "tiny-cvae"
    model = saved_tiny_model(folder, latent_injection="memory+embedding", skip_connection="skip")
    report, outputs = run_without_cvae_llama(tmp_path, str(folder))
    assert_same_as_local(model, report, outputs)


def lay_out_as_the_hub(folder: Path, cache: Path, repo_id: str) -> str:
    """Put the files of `folder` into a Hugging Face cache as a Hub download leaves them: `refs/main` holds the commit
    hash, `snapshots/<commit>/<file>` are relative symlinks to content-addressed `blobs/`. Returns the commit."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    files = sorted(path for path in folder.iterdir() if path.is_file())
    commit = hashlib.sha1(b"".join(path.name.encode() + path.read_bytes() for path in files)).hexdigest()
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "blobs").mkdir()
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for path in files:
        blob = hashlib.sha256(path.read_bytes()).hexdigest()
        (repo / "blobs" / blob).write_bytes(path.read_bytes())
        (snapshot / path.name).symlink_to(Path("..", "..", "blobs", blob))
    return commit


def test_loads_by_repo_id_from_a_hub_cache_without_cvae_llama(tmp_path):
    folder = tmp_path / "exported"
    model = saved_tiny_model(folder)
    cache = tmp_path / "hub"
    commit = lay_out_as_the_hub(folder, cache, "cvae-org/tiny-cvae-llama")
    assert (cache / "models--cvae-org--tiny-cvae-llama" / "snapshots" / commit / "config.json").is_symlink()
    report, outputs = run_without_cvae_llama(tmp_path, "cvae-org/tiny-cvae-llama", {"HF_HUB_CACHE": str(cache)})
    assert_same_as_local(model, report, outputs)
    assert f".{commit}.modeling_cvae_llama." in report["model_class"]  # the code came from the snapshot


def test_remote_model_saves_a_folder_that_loads_again(tmp_path):
    """The remote copy of the code writes the same complete repo (auto_map and code files) when saved again."""
    folder = tmp_path / "tiny-cvae"
    saved_tiny_model(folder)
    resave = tmp_path / "resaved"
    script = BLOCK_CVAE_LLAMA + textwrap.dedent(
        f"""
        import torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(folder)!r}, trust_remote_code=True)
        model.save_pretrained({str(resave)!r})
        """
    )
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    config = json.loads((resave / "config.json").read_text())
    assert set(config["auto_map"]) == {"AutoConfig", "AutoModel", "AutoModelForCausalLM"}
    for name in CODE_FILES:
        assert (resave / name).read_text() == (PACKAGE / name).read_text()
    original, again = CVAELlamaForCausalLM.from_pretrained(folder), CVAELlamaForCausalLM.from_pretrained(resave)
    assert all(torch.equal(tensor, again.state_dict()[key]) for key, tensor in original.state_dict().items())
