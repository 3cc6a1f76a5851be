"""Argument checks shared by the library: one definition of each, so that every bad value gets the same clear error
(the argument's name, the value, what was expected). The two remote-code files keep their own few checks, since they
import only torch and transformers."""

import math
import os
from collections.abc import Sequence
from pathlib import Path


def check_positive_int(value, name: str, minimum: int = 1) -> int:
    """`value` if it is an `int` (not a `bool`) of at least `minimum`; else `ValueError` naming `name` and `value`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {name}={value!r}")
    return value


def check_non_negative_float(value, name: str) -> float:
    """`value` as a `float` if it is a finite real number >= 0; else `ValueError` naming `name`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def check_texts(texts, name: str, min_count: int = 1) -> list[str]:
    """`texts` as a list if it is a sequence of at least `min_count` strings (not one string); else `ValueError`."""
    if isinstance(texts, str) or not isinstance(texts, Sequence) or not all(isinstance(t, str) for t in texts):
        raise ValueError(f"{name} must be a list of strings, got {type(texts).__name__}")
    if len(texts) < min_count:
        raise ValueError(f"{name} has {len(texts)} text(s) but at least {min_count} are needed")
    return list(texts)


def check_existing_path(path: str | os.PathLike, name: str = "path") -> Path:
    """`path` as an expanded `Path` if it exists; else `ValueError` naming `name`."""
    path = Path(path).expanduser()
    if not path.exists():
        raise ValueError(f"{name}={str(path)!r} does not exist")
    return path


def check_columns(dataset, columns: Sequence[str], name: str = "dataset") -> None:
    """`ValueError` unless the `datasets.Dataset` has every column of `columns` (naming those it lacks)."""
    missing = [column for column in columns if column not in dataset.column_names]
    if missing:
        raise ValueError(f"{name} has columns {dataset.column_names} but needs {missing} as well")


def check_not_empty(dataset, name: str = "dataset") -> None:
    """`ValueError` when the dataset has no row."""
    if len(dataset) == 0:
        raise ValueError(f"{name} is empty (0 rows)")


def pad_token_id(tokenizer) -> int:
    """The tokenizer's pad token id, or `ValueError` saying how to set one (the library never changes a user's
    tokenizer behind their back; the command line and `cvae_llama.pretrained` set `pad_token = eos_token` when they
    load a tokenizer that has none)."""
    if tokenizer.pad_token_id is None:
        raise ValueError(
            "the tokenizer has no pad token: set one first, e.g. `tokenizer.pad_token = tokenizer.eos_token` "
            "(padding is masked out and never scored)"
        )
    return tokenizer.pad_token_id


def non_empty_dir(path) -> bool:
    """Whether `path` is a folder with anything in it."""
    path = Path(path)
    return path.is_dir() and any(path.iterdir())


def refuse_to_overwrite(path, overwrite: bool, name: str) -> Path:
    """`path` as a `Path` if it is absent, an empty folder, or `overwrite` is set; else `ValueError`.

    The message names `path` as `name` and says how to allow it: `--overwrite` when `name` is a command-line flag
    (`"--output_dir"`), `overwrite=True` otherwise.
    """
    path = Path(path)
    if not overwrite and (path.is_file() or non_empty_dir(path)):
        allow = "--overwrite" if name.startswith("--") else "overwrite=True"
        raise ValueError(f"{name} {str(path)!r} already exists; pass {allow} to replace it")
    return path


__all__ = [
    "check_columns",
    "check_existing_path",
    "check_non_negative_float",
    "check_not_empty",
    "check_positive_int",
    "check_texts",
    "non_empty_dir",
    "pad_token_id",
    "refuse_to_overwrite",
]
