import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# ../shared/data beside the checkout (CI lays a copy of shared/ beside the clone)
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


# The tiny decoder of the unit tests (hidden 32, 2 layers, 4 heads, 2 key / value heads, 99 tokens).
TINY_DECODER = dict(
    vocab_size=99,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
# Each decoder architecture's own features, switched on in its tiny config: sliding windows short enough to act on
# short inputs (every layer for Mistral, the layers from `max_window_layers` on for Qwen2), Qwen2's q/k/v biases (always
# on), Qwen3's per-head q/k norms (always on) with a head size that is not hidden / heads.
ARCHITECTURE_OVERRIDES = {
    "llama": {},
    "mistral": {"sliding_window": 4},
    "qwen2": {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1},
    "qwen3": {"head_dim": 16},
}
ARCHITECTURES = tuple(ARCHITECTURE_OVERRIDES)


def tiny_base_config(base_model_type: str = "llama", **overrides):
    """The tiny decoder in the architecture `base_model_type` (its config class), its own features switched on."""
    from cvae_llama.configuration_cvae_llama import BASE_CONFIG_CLASSES

    values = {**TINY_DECODER, **ARCHITECTURE_OVERRIDES[base_model_type], **overrides}
    return BASE_CONFIG_CLASSES[base_model_type](**values)


def tiny_llama_config(**overrides):
    return tiny_base_config("llama", **overrides)


def tiny_cvae_config(llama_overrides=None, base_model_type: str = "llama", **cvae_fields):
    from cvae_llama import CVAELlamaConfig

    cvae_fields.setdefault("latent_size", 8)
    cvae_fields.setdefault("gskip_samples", 4)
    return CVAELlamaConfig.from_base_config(tiny_base_config(base_model_type, **(llama_overrides or {})), **cvae_fields)


def open_memory_gates(model, value: float = 0.5):
    """Open a gated memory's gates at `value`, as after some training (a fresh CVAE's are 0, and it ignores z until
    they open; the parameter stored is the gate divided by `memory_gate_scale`). Nothing to do for the joint memory."""
    layers = [] if model.latent_memory is None else model.latent_memory.layers  # `latent_injection="embedding"`
    with torch.no_grad():
        for layer in layers:
            if layer.gate is not None:
                layer.gate.fill_(value / layer.gate_scale)
    return model


@pytest.fixture
def one_thread():
    """Torch on one thread: for tiny models threads only add overhead, and on a busy 2-core machine two threads fight
    (a tiny model's forward up to 40x slower, SmolLM2's 2.6x)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_config():
    return tiny_cvae_config()


@pytest.fixture
def tiny_model():
    from cvae_llama import CVAELlamaForCausalLM

    torch.manual_seed(0)
    return CVAELlamaForCausalLM(tiny_cvae_config())


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory) -> Path:
    """A folder with a tiny random Llama and SmolLM2's tokenizer: what the experiment scripts take as a base LM."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    from cvae_llama.pretrained import smollm2_path

    tokenizer = AutoTokenizer.from_pretrained(smollm2_path())
    folder = tmp_path_factory.mktemp("tiny-lm")
    config = tiny_llama_config(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                               eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def load_experiment(name: str):
    """Import `experiments/<name>.py` as the module `name`."""
    path = Path(__file__).resolve().parents[1] / "experiments" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def shared_data():
    if not SHARED_DATA.is_dir():
        pytest.fail(f"shared data not found at {SHARED_DATA}; the tests expect ../shared/data beside the checkout")
    return SHARED_DATA
