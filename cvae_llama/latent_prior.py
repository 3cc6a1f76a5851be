"""A learned prior p(z | x) on its own: saved, loaded, swapped and shared apart from its CVAE, one prior per preference
on one CVAE (as peft keeps several adapters on one model).

A prior folder holds `latent_prior.safetensors` (the weights of `model.latent_prior`) and `latent_prior.json` (the
shape it fits and the CVAE it was trained on). The model's own folder keeps its prior too (`config.learned_prior`).

```python
>>> save_latent_prior(model, "prior-positive")                      # or push_to_hub=True, repo_id="you/prior"
>>> load_latent_prior(model, "prior-negative")                      # swap: the model now samples the other one
```
"""

import json
import os
from pathlib import Path

import torch
from huggingface_hub import hf_hub_download, upload_folder
from safetensors.torch import load_file, save_file

from .modeling_cvae_llama import CVAELlamaForCausalLM


WEIGHTS_NAME = "latent_prior.safetensors"
CONFIG_NAME = "latent_prior.json"
# what a prior's weights must agree on with the model that loads them
SHAPE_FIELDS = ("base_model_type", "hidden_size", "latent_size", "num_encoder_layers", "posterior_pooling",
                "num_latent_queries", "share_llm_weights")  # fmt: skip


def save_latent_prior(model: CVAELlamaForCausalLM, save_directory: str | os.PathLike, push_to_hub: bool = False,
                      repo_id: str | None = None, **hub_kwargs) -> Path:  # fmt: skip
    """Write `model`'s learned prior into `save_directory` (created), and upload the folder to the Hub repo `repo_id`
    with `push_to_hub=True` (`hub_kwargs` go to `huggingface_hub.upload_folder`: `token`, `commit_message`, ...).
    Returns the folder."""
    if getattr(model, "latent_prior", None) is None:
        raise ValueError("the model has no learned prior to save (config.learned_prior=False): train one with "
                         "LatentDPOTrainer, or add one with model.add_learned_prior()")  # fmt: skip
    folder = Path(save_directory)
    folder.mkdir(parents=True, exist_ok=True)
    state = {name: tensor.detach().contiguous().cpu() for name, tensor in model.latent_prior.state_dict().items()}
    save_file(state, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
    record = {name: getattr(model.config, name) for name in SHAPE_FIELDS}
    record["cvae"] = getattr(model.config, "_name_or_path", None) or None
    record["base_model_name_or_path"] = getattr(model.config, "base_model_name_or_path", None)
    (folder / CONFIG_NAME).write_text(json.dumps(record, indent=2) + "\n")
    if push_to_hub:
        if not repo_id:
            raise ValueError("push_to_hub=True needs repo_id (the Hub repo to upload the prior to)")
        upload_folder(repo_id=repo_id, folder_path=str(folder), **hub_kwargs)
    return folder


def load_latent_prior(model: CVAELlamaForCausalLM, path_or_repo: str | os.PathLike, **hub_kwargs):
    """Load the learned prior saved in `path_or_repo` (a folder of [`save_latent_prior`] or a Hub repo holding one;
    `hub_kwargs` go to `hf_hub_download`: `revision`, `token`, `cache_dir`, ...) into `model`, replacing its prior
    (or giving it one). Refused, naming the field, when the prior was saved for another shape. Returns the model."""

    def fetch(name: str) -> str:
        local = Path(path_or_repo) / name
        if local.is_file():
            return str(local)
        if Path(path_or_repo).is_dir():
            raise ValueError(f"{str(path_or_repo)!r} holds no {name}: not a folder written by save_latent_prior")
        return hf_hub_download(str(path_or_repo), name, **hub_kwargs)

    record = json.loads(Path(fetch(CONFIG_NAME)).read_text())
    different = {name: (record.get(name), getattr(model.config, name)) for name in SHAPE_FIELDS
                 if record.get(name) != getattr(model.config, name)}  # fmt: skip
    if different:
        details = ", ".join(f"{name} {saved!r} (the model's: {own!r})" for name, (saved, own) in different.items())
        raise ValueError(f"the prior in {str(path_or_repo)!r} was saved for another CVAE: {details}")
    state = load_file(fetch(WEIGHTS_NAME))
    if model.latent_prior is None:
        model.add_learned_prior()
    device = next(model.latent_prior.parameters()).device
    with torch.no_grad():
        model.latent_prior.load_state_dict({name: tensor.to(device) for name, tensor in state.items()})
    return model


__all__ = ["load_latent_prior", "save_latent_prior"]
