"""transformers' own test mixins (`tests/test_modeling_common.py` and the files beside it), from the source
distribution of the installed transformers version, for `test_transformers_common.py`.

The wheel ships no tests, the source distribution on PyPI does: it is downloaded once with
`pip download --no-binary :all: --no-deps transformers==<installed version>` into a cache outside the checkout
(`$CVAE_LLAMA_CACHE`, by default `~/.cache/cvae-llama`, under `transformers-sdist/`), and its top-level `tests/*.py` are
extracted there as the package `transformers_tests`. Nothing of it is committed.

The source distribution leaves out some files those tests import; stand-ins take their place:

- `tests/generation/test_utils.py` (`GenerationTesterMixin`): an empty class. This project's own generation tests
  (`test_modeling_cvae_llama.py`, `test_pipeline.py`, `test_remote_code.py`) cover `generate`.
- `tests/exporters/test_export.py` (`ExportTesterMixin`, the base of `ModelTesterMixin`): an empty class, so the
  export tests (ONNX, dynamo, ExecuTorch, ... backends) do not run; `test_transformers_common.py` checks `torch.export`
  of `forward` itself.
- `tests/utils/test_configuration_utils.py` (`config_common_kwargs`, for `ConfigTester`): the arguments every
  `PreTrainedConfig` takes, with non-default values, as that file defines them for transformers 5.x.
- `tests/distributed_testing_utils.py` (`run_distributed`, for `TensorParallelTesterMixin`): runs a function in a
  gloo process group of CPU processes on this machine.
"""

import importlib
import os
import socket
import subprocess
import sys
import tarfile
import tempfile
import types
from pathlib import Path

import torch
import transformers


PACKAGE = "transformers_tests"


def cache_dir() -> Path:
    return Path(os.environ.get("CVAE_LLAMA_CACHE", Path.home() / ".cache" / "cvae-llama")) / "transformers-sdist"


def _download(version: str, folder: Path) -> Path:
    """The source distribution of transformers `version` in `folder` (downloaded with pip when it is not there)."""
    archive = folder / f"transformers-{version}.tar.gz"
    if archive.is_file():
        return archive
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as download:
        command = [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps", "--quiet",
                   f"transformers=={version}", "--dest", download]  # fmt: skip
        result = subprocess.run(command, capture_output=True, text=True)
        downloaded = Path(download) / archive.name
        if result.returncode != 0 or not downloaded.is_file():
            raise RuntimeError(
                f"could not download the source distribution of transformers {version} (it holds the tests that "
                f"test_transformers_common.py runs): `{' '.join(command)}` exited with {result.returncode}: "
                f"{result.stderr.strip()[-2000:]}\nRun it once with access to PyPI; the file is kept in {folder}"
            )
        os.replace(downloaded, archive)  # atomic: a concurrent run sees the whole file or none
    return archive


def transformers_tests_root(version: str | None = None) -> Path:
    """The folder holding the package `transformers_tests` (transformers' `tests/*.py` of `version`, by default the
    installed one), extracted from the cached source distribution."""
    version = version or transformers.__version__
    folder = cache_dir()
    root = folder / f"transformers-{version}"
    if (root / PACKAGE / "test_modeling_common.py").is_file():
        return root
    archive = _download(version, folder)
    with tempfile.TemporaryDirectory(dir=folder) as staging:
        package = Path(staging) / PACKAGE
        package.mkdir()
        prefix = f"transformers-{version}/tests/"
        with tarfile.open(archive) as sdist:
            for member in sdist.getmembers():
                name = member.name.removeprefix(prefix)
                if member.isfile() and member.name.startswith(prefix) and "/" not in name and name.endswith(".py"):
                    (package / name).write_bytes(sdist.extractfile(member).read())
        if not (package / "test_modeling_common.py").is_file():
            raise RuntimeError(f"{archive} has no {prefix}test_modeling_common.py")
        (package / "__init__.py").write_text("")
        root.mkdir(exist_ok=True)
        try:
            os.rename(package, root / PACKAGE)  # atomic; fails when another run has put its copy there first
        except OSError:
            if not (root / PACKAGE / "test_modeling_common.py").is_file():
                raise
    return root


class GenerationTesterMixin:
    """Stand-in for `tests/generation/test_utils.py`'s mixin, which the source distribution does not ship."""


class ExportTesterMixin:
    """Stand-in for `tests/exporters/test_export.py`'s mixin, which the source distribution does not ship."""


# `tests/utils/test_configuration_utils.py`'s `config_common_kwargs` (transformers 5.x): arguments of every
# `PreTrainedConfig`, with values other than their defaults
CONFIG_COMMON_KWARGS = {
    "return_dict": False,
    "output_hidden_states": True,
    "output_attentions": True,
    "dtype": "float16",
    "chunk_size_feed_forward": 5,
    "architectures": ["BertModel"],
    "id2label": {0: "label"},
    "label2id": {"label": "0"},
    "problem_type": "regression",
}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_distributed(world_size: int):
    """Stand-in for `tests/distributed_testing_utils.py`'s helper (`run_distributed(world_size)(func)(*args)`): runs
    `func(rank, *args)` in `world_size` fresh processes of one gloo process group on this machine."""

    def decorator(func):
        def run(*args):
            torch.multiprocessing.spawn(
                _distributed_worker,
                args=(world_size, _free_port(), func.__module__, func.__qualname__, args),
                nprocs=world_size,
                join=True,
            )

        return run

    return decorator


def _distributed_worker(rank: int, world_size: int, port: int, module: str, qualname: str, args: tuple) -> None:
    # `func` travels by name: a fresh process needs the stand-ins in place before it imports transformers' tests
    if module.startswith(f"{PACKAGE}."):
        load(module.removeprefix(f"{PACKAGE}."))
    func = getattr(importlib.import_module(module), qualname)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size))  # fmt: skip
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        func(rank, *args)
    finally:
        torch.distributed.destroy_process_group()


def _stand_in(name: str, **attributes) -> None:
    module = types.ModuleType(name)
    module.__dict__.update(attributes)
    sys.modules[name] = module


def load(module: str) -> types.ModuleType:
    """Import `transformers_tests.<module>` (e.g. `"test_modeling_common"`), downloading the tests if needed."""
    root = str(transformers_tests_root())
    if root not in sys.path:
        sys.path.insert(0, root)
    for name, attributes in (
        ("generation", {}),
        ("generation.test_utils", {"GenerationTesterMixin": GenerationTesterMixin}),
        ("exporters", {}),
        ("exporters.test_export", {"ExportTesterMixin": ExportTesterMixin}),
        ("utils", {}),
        ("utils.test_configuration_utils", {"config_common_kwargs": CONFIG_COMMON_KWARGS}),
        ("distributed_testing_utils", {"run_distributed": run_distributed}),
    ):
        if f"{PACKAGE}.{name}" not in sys.modules:
            _stand_in(f"{PACKAGE}.{name}", **attributes)
    return importlib.import_module(f"{PACKAGE}.{module}")
