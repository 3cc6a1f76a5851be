"""The package's layout: every module imports on its own, and no module imports one that imports it back.

The import graph is read from the source (every `import` / `from ... import` statement, those inside functions
included: a lazy import is still a dependency, it only hides a cycle until the function runs).
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest


PACKAGE_ROOT = Path(__file__).resolve().parents[1] / "cvae_llama"
PACKAGE = PACKAGE_ROOT.name


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE_ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE_ROOT.rglob("*.py"))}


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _resolve(name: str, node: ast.ImportFrom) -> str:
    """The absolute module an import-from statement names (relative levels resolved against `name`)."""
    if node.level == 0:
        return node.module or ""
    base = name.split(".") if _is_package(name) else name.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imported_modules(name: str) -> set[str]:
    """The package's modules that module `name` imports, anywhere in its source."""
    found = set()
    for node in ast.walk(ast.parse(MODULES[name].read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(name, node)
            # `from .pkg import sub` imports the module pkg.sub when there is one, else a name of pkg
            targets = [f"{target}.{alias.name}" if f"{target}.{alias.name}" in MODULES else target for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in MODULES:  # `import cvae_llama.x.y` where only cvae_llama.x is a module
                target = target.rpartition(".")[0]
            if target.startswith(PACKAGE) and target != name:
                found.add(target)
    return found


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


def test_cycle_detection_finds_a_cycle():
    # the detector itself: a -> b -> c -> a is one cycle, d -> a is not part of it
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert import_cycles({"a": {"b"}, "b": set()}) == []


def test_the_import_graph_is_read_from_the_source():
    # known edges, so that an empty graph (a parser that finds nothing) cannot pass the cycle test
    graph = {name: imported_modules(name) for name in MODULES}
    assert f"{PACKAGE}.modeling_cvae_llama" in graph[PACKAGE]
    assert f"{PACKAGE}.configuration_cvae_llama" in graph[f"{PACKAGE}.modeling_cvae_llama"]
    assert sum(len(targets) for targets in graph.values()) > len(MODULES)


def test_no_import_cycle_inside_the_package():
    graph = {name: imported_modules(name) for name in MODULES}
    assert import_cycles(graph) == []


def test_the_remote_code_files_import_only_torch_transformers_and_each_other():
    allowed = {"torch", "transformers", "math", "dataclasses", "typing", "collections", "functools", "warnings",
               "copy", "inspect", "contextlib", "itertools", "json", "os", "re", "hashlib",
               "peft"}  # fmt: skip (peft: only to load the LoRA layers of an adapter folder that holds some)
    for name in ("configuration_cvae_llama", "modeling_cvae_llama"):
        tree = ast.parse((PACKAGE_ROOT / f"{name}.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                roots = {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    assert node.module in {"configuration_cvae_llama", "modeling_cvae_llama"}, (name, node.module)
                    continue
                roots = {node.module.split(".")[0]}
            else:
                continue
            assert roots <= allowed, f"{name} imports {roots - allowed}"


@pytest.mark.slow  # a fresh interpreter per module: about 6 s each, minutes in all
@pytest.mark.parametrize("name", sorted(MODULES))
def test_every_module_imports_on_its_own(name):
    # a fresh interpreter per module: an import that only works after another module was imported fails here
    finished = subprocess.run([sys.executable, "-c", f"import {name}"], capture_output=True, text=True,
                              cwd=PACKAGE_ROOT.parent, timeout=300)  # fmt: skip
    assert finished.returncode == 0, finished.stderr[-2000:]


# ------------------------------------------------------------------------------------------------ sizes a reader meets
def function_lengths(path: Path) -> dict[str, int]:
    """Lines of every function and method in a file (decorators, signature and docstring included)."""
    lengths = {}
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            start = min([node.lineno] + [decorator.lineno for decorator in node.decorator_list])
            lengths[f"{path.relative_to(PACKAGE_ROOT.parent)}:{node.lineno} {node.name}"] = node.end_lineno - start + 1
    return lengths


def test_no_function_in_the_package_is_over_80_lines():
    lengths = {name: length for path in MODULES.values() for name, length in function_lengths(path).items()}
    assert max(lengths.values()) > 20  # the measure finds functions at all
    assert {name: length for name, length in lengths.items() if length > 80} == {}


def test_the_causal_lm_reads_like_transformers_llama():
    """`CVAELlamaForCausalLM` at most 350 lines, its `forward` body (without signature and docstring) at most 60:
    the decoder's run with the latent lives in the base model, the memory in its own module."""
    tree = ast.parse((PACKAGE_ROOT / "modeling_cvae_llama.py").read_text())
    classes = {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}
    causal_lm = classes["CVAELlamaForCausalLM"]
    assert causal_lm.end_lineno - causal_lm.lineno + 1 <= 350
    forward = next(node for node in causal_lm.body if isinstance(node, ast.FunctionDef) and node.name == "forward")
    body = forward.body[1:] if isinstance(forward.body[0], ast.Expr) else forward.body  # without the docstring
    assert 5 < body[-1].end_lineno - body[0].lineno + 1 <= 60
    assert {"CVAELlamaModel", "CVAELlamaLatentMemory", "CVAELlamaPosteriorEncoder", "CVAELlamaLatentSkip"} <= set(classes)
