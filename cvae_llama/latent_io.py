"""Latents and label directions in files: reading a latent given as inline JSON or as a .json / .pt / .safetensors
file (a `.pt` is read with `torch.load(weights_only=True)`, so a latent file never runs code), reading the label
directions that the control metric writes into `results.json`, and writing latents as `.safetensors`.

Each reader names its input as its `argument` in its messages (the command line passes its flag, `"--latent"`).
"""

import json
import os
from pathlib import Path
from typing import Any

import torch


def _tensor_from(value: Any, source: str, key: str) -> torch.Tensor:
    """`value` (a tensor, a list of numbers, or a dict holding one under `key` or alone) as a float32 CPU tensor."""
    if isinstance(value, dict):
        if key in value:
            value = value[key]
        elif len(value) == 1:
            value = next(iter(value.values()))
        else:
            raise ValueError(f"{source} holds the keys {sorted(value)}; expected {key!r} or a single tensor")
    if isinstance(value, torch.Tensor):
        return value.detach().to(torch.float32).cpu()
    try:
        return torch.tensor(value, dtype=torch.float32)
    except (TypeError, ValueError, RuntimeError) as error:
        raise ValueError(f"{source} is not a list of numbers or a tensor ({error})") from error


def _read_tensor_source(value: str, argument: str) -> tuple[Any, str]:
    """Parse inline JSON or read a .json / .pt / .safetensors file: `(object, description for messages)`."""
    text = value.strip()
    if text.startswith(("[", "{")):
        try:
            return json.loads(text), f"{argument} (inline JSON)"
        except json.JSONDecodeError as error:
            raise ValueError(f"{argument} is not valid JSON: {error}") from error
    path = Path(value).expanduser()
    source = f"{argument} {value!r}"
    if not path.is_file():
        raise ValueError(f"{source} does not exist (expected a file or a JSON list)")
    suffix = path.suffix.lower()
    if suffix == ".json":
        try:
            return json.loads(path.read_text(encoding="utf-8")), source
        except json.JSONDecodeError as error:
            raise ValueError(f"{source} is not valid JSON: {error}") from error
    if suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path)), source
        except (SafetensorError, OSError) as error:
            raise ValueError(f"{source} is not a readable safetensors file: {error}") from error
    if suffix in (".pt", ".pth", ".bin"):
        import pickle

        try:  # weights_only: a latent file never runs code when it is read
            return torch.load(path, map_location="cpu", weights_only=True), source
        except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as error:
            raise ValueError(
                f"{source} is not a tensor file torch.load can read with weights_only=True: "
                f"{' '.join(str(error).split())[:200]}"
            ) from error
    raise ValueError(f"{source} has suffix {suffix!r}; expected .json, .pt or .safetensors")


def read_latent(value: str, latent_size: int, argument: str = "latent") -> torch.Tensor:
    """A latent given as inline JSON (`'[0.1, -0.3, ...]'` or a list of such lists) or a file holding a
    `(latent_size,)` or `(n, latent_size)` tensor (key `latent` in a dict), as `(n, latent_size)` float32.

    Raises:
        ValueError: unreadable, not finite, or not of shape `(latent_size,)` / `(n, latent_size)`.
    """
    obj, source = _read_tensor_source(value, argument)
    latent = _tensor_from(obj, source, "latent")
    if latent.ndim == 1:
        latent = latent[None]
    if latent.ndim != 2 or latent.shape[-1] != latent_size or latent.shape[0] == 0:
        shape = tuple(latent.shape) if latent.ndim != 2 or latent.shape[0] != 1 else (latent.shape[1],)
        raise ValueError(f"{source} has shape {shape} but the model expects ({latent_size},) or (n, {latent_size})")
    if not torch.isfinite(latent).all():
        raise ValueError(f"{source} contains NaN or inf")
    return latent


def read_directions(value: str, latent_size: int, argument: str = "directions") -> tuple[torch.Tensor, list[str]]:
    """Label directions `(num_labels, latent_size)` and their label names (the report's values, else indices), from
    the `results.json` of an evaluation with the control metric, or a `.pt` / `.safetensors` / JSON tensor."""
    obj, source = _read_tensor_source(value, argument)
    labels = None
    if isinstance(obj, dict) and "control" in obj:  # results.json of `evaluation_report`
        obj = obj["control"]
    if isinstance(obj, dict) and "directions" in obj:
        labels = obj.get("labels")
        obj = obj["directions"]
    elif isinstance(obj, dict) and "settings" in obj:
        raise ValueError(f"{source} is a report without the control metric; evaluate with the control metric")
    directions = _tensor_from(obj, source, "directions")
    if directions.ndim != 2 or directions.shape[1] != latent_size:
        raise ValueError(
            f"{source} has directions of shape {tuple(directions.shape)} but the model expects "
            f"(num_labels, {latent_size})"
        )
    names = [str(label) for label in labels] if labels is not None else [str(i) for i in range(len(directions))]
    return directions, names


def save_latents(path: str | os.PathLike, latent: torch.Tensor) -> Path:
    """Write `latent` to a `.safetensors` file under the key `latent` (what [`read_latent`] reads back)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"latent": latent.detach().contiguous().cpu()}, str(path))
    return path


def save_directions(path: str | os.PathLike, directions: torch.Tensor, labels: list[str]) -> Path:
    """Write label `directions` `(num_labels, latent_size)` and their `labels` as a JSON file under the keys of an
    evaluation report's control metric (`{"directions", "labels"}`), which [`read_directions`] reads back (and the
    explorer's `--directions` takes)."""
    if directions.ndim != 2 or len(labels) != len(directions):
        raise ValueError(
            f"directions of shape {tuple(directions.shape)} and {len(labels)} labels {list(labels)!r}: expected "
            "a (num_labels, latent_size) tensor with one label per row"
        )
    path = Path(path)
    if path.suffix.lower() != ".json":
        raise ValueError(f"path {str(path)!r} has suffix {path.suffix!r}; expected .json")
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = {"directions": directions.detach().to(torch.float32).cpu().tolist(), "labels": [str(x) for x in labels]}
    path.write_text(json.dumps(rows), encoding="utf-8")
    return path


__all__ = ["read_directions", "read_latent", "save_directions", "save_latents"]
