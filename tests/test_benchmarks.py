"""Smoke test: every benchmark script runs one tiny iteration end to end (nothing is asserted about time)."""

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest


BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def run(*args):
    result = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.mark.slow
def test_cpu_ratios_quick_prints_every_table():
    output = run(BENCHMARKS / "cpu_ratios.py", "--quick")
    for title in ("train step, depth sweep", "sequence-length sweep", "generate, greedy", "DG term + G-Skip",
                  "peak memory"):
        assert title in output
    assert "frozen / plain" in output and "cvae / plain tokens/s" in output
    assert "plain + encoder layers / plain" in output


def test_cpu_ratios_runs_only_the_sections_asked_for():
    output = run(BENCHMARKS / "cpu_ratios.py", "--quick", "--sections", "share", "--threads", "1")
    assert "DG term + G-Skip" in output and "depth sweep" not in output and "peak memory" not in output


def test_memory_breakdown_attributes_every_component():
    output = run(BENCHMARKS / "memory_breakdown.py", "--tiny")
    header, _, *rows = output.strip().splitlines()
    assert header == "| MiB | plain | CVAE frozen | CVAE full |"
    names = {row.split("|")[1].strip() for row in rows}
    assert {"weights", "gradients + AdamW states", "saved: encoder", "saved: latent_memory", "total"} <= names


def test_peak_memory_reports_one_json_line():
    output = run(BENCHMARKS / "peak_memory.py", "frozen", 2, 2, 3, 3, "--tiny")
    assert '"step_peak_mib"' in output.strip().splitlines()[-1]


@pytest.mark.parametrize("variant", ["bogus"])
def test_peak_memory_refuses_an_unknown_variant(variant):
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / "peak_memory.py"), variant, "2", "2", "3", "3"], capture_output=True, text=True
    )
    assert result.returncode != 0 and "plain, frozen or full" in result.stderr


def test_gpu_check_runs_tiny_on_cpu():
    output = run(BENCHMARKS / "gpu_check.py", "--quick", "--layers", "2")
    assert "cached vs uncached generation" in output and "decoder frozen / plain" in output


def test_cpu_ratios_measures_another_architecture():
    output = run(BENCHMARKS / "cpu_ratios.py", "--quick", "--sections", "depth", "generate", "--architecture", "qwen3",
                 "--threads", "1")  # fmt: skip
    assert "frozen / plain" in output and "cvae / plain tokens/s" in output
    assert output.count("| qwen3 |") == 2  # one row of each table, in the Qwen3 architecture


def test_adapter_size_prints_every_table():
    output = run(BENCHMARKS / "adapter_size.py", "--tiny")
    for title in ("saved bytes: adapter folder / standalone folder", "parameters: shared LLM weights against frozen copies",
                  "peak training memory on CPU"):  # fmt: skip
        assert title in output
    assert "| Llama-3-8B shape | state dict, bf16, share_llm_weights=True |" in output
    assert "frozen duplicates" in output and "/ frozen-LLM floor" in output
    for variant in ("full fine-tune (AdamW)", "the frozen-LLM floor", "share_llm_weights=True", "share_llm_weights=False"):
        assert variant in output


@pytest.mark.slow
def test_quantized_decoder_compares_a_4bit_decoder_with_bf16(tmp_path):
    pytest.importorskip("bitsandbytes")
    numbers = tmp_path / "numbers.json"
    output = run(BENCHMARKS / "quantized_decoder.py", "--tiny", "--steps", "2", "--json", numbers)
    assert "| variant | weights (MiB) | after build (MiB) | peak (MiB) |" in output
    assert "| bf16: decoder bf16, frozen |" in output and "| 4-bit: decoder 4-bit NF4" in output
    assert re.search(r"^4-bit / bf16 peak memory: \d+\.\d{3} \(goal at 8B: <= 0\.4\)$", output, re.MULTILINE)
    assert re.search(r"^4-bit / bf16 step time: \d+\.\d{3}$", output, re.MULTILINE)
    results = json.loads(numbers.read_text())["results"]
    # the 4-bit variant really runs a quantised decoder (2 layers x 7 linears), the bf16 one none
    assert results["4-bit"]["linear4bit_modules"] == 14 and results["bf16"]["linear4bit_modules"] == 0
    assert results["4-bit"]["trainable"] == results["bf16"]["trainable"] > 0  # the same CVAE modules train
    for result in results.values():
        assert result["peak_mib"] > 0 and len(result["step_times_s"]) == 2
        assert all(math.isfinite(loss) for loss in result["losses"])
