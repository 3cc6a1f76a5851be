"""CVAELlamaConfig: round trips, Auto registration and every validation error."""

import pytest
from conftest import tiny_cvae_config, tiny_llama_config
from transformers import AutoConfig, GemmaConfig, GPT2Config

import cvae_llama  # noqa: F401  (registers the Auto classes)
from cvae_llama.configuration_cvae_llama import CVAE_FIELDS, CVAELlamaConfig


NON_DEFAULT_FIELDS = dict(
    latent_size=12,
    num_latent_queries=3,
    num_memory_slots=5,
    num_encoder_layers=1,
    latent_injection="memory+embedding",
    skip_connection="skip",
    gskip_samples=7,
    decoder_mode="full",
    posterior_batch_norm=False,
    posterior_norm_statistics="running_mean",
    posterior_pooling="queries",
    memory_attention="joint",
    memory_gate_scale=10.0,
    share_llm_weights=False,
    learned_prior=True,
)


def as_dict(config: CVAELlamaConfig) -> dict:
    values = config.to_dict()
    values.pop("_name_or_path", None)  # where it was loaded from
    return values


def test_paper_defaults():
    """The paper's defaults, plus the batch norm of the posterior means (beyond the paper: issue 13) and the gated
    memory (a fresh CVAE is its LLM: issue 38)."""
    config = CVAELlamaConfig.from_llama_config(tiny_llama_config())
    assert config.model_type == "cvae_llama"
    assert {name: getattr(config, name) for name in CVAE_FIELDS} == dict(
        latent_size=32,
        num_latent_queries=4,
        num_memory_slots=4,
        num_encoder_layers=2,
        latent_injection="memory",
        skip_connection="gskip",
        gskip_samples=32,
        decoder_mode="frozen",
        posterior_batch_norm=True,
        posterior_norm_statistics="batch",
        posterior_pooling="mean",
        memory_attention="gated",
        memory_gate_scale=100.0,
        share_llm_weights=True,
        learned_prior=False,
    )


def test_from_llama_config_keeps_the_llm_fields():
    llama = tiny_llama_config(rms_norm_eps=1e-5, rope_theta=5000.0)
    config = CVAELlamaConfig.from_llama_config(llama, **NON_DEFAULT_FIELDS)
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "rms_norm_eps", "bos_token_id", "eos_token_id", "pad_token_id"):
        assert getattr(config, name) == getattr(llama, name), name
    assert config.rope_parameters == llama.rope_parameters
    for name, value in NON_DEFAULT_FIELDS.items():
        assert getattr(config, name) == value


def test_dict_round_trip():
    config = tiny_cvae_config(**NON_DEFAULT_FIELDS)
    restored = CVAELlamaConfig.from_dict(config.to_dict())
    assert restored.to_dict() == config.to_dict()
    for name, value in NON_DEFAULT_FIELDS.items():
        assert getattr(restored, name) == value


def test_save_load_round_trip_and_auto_config(tmp_path):
    config = tiny_cvae_config(**NON_DEFAULT_FIELDS)
    config.save_pretrained(tmp_path)
    restored = CVAELlamaConfig.from_pretrained(tmp_path)
    assert as_dict(restored) == as_dict(config)
    auto = AutoConfig.from_pretrained(tmp_path)
    assert type(auto) is CVAELlamaConfig
    assert as_dict(auto) == as_dict(config)
    assert type(AutoConfig.for_model("cvae_llama", latent_size=16)) is CVAELlamaConfig


def test_derived_properties():
    memory = tiny_cvae_config(num_memory_slots=3)
    assert memory.uses_memory and not memory.uses_embedding_injection and memory.memory_prefix_length == 3
    embedding = tiny_cvae_config(latent_injection="embedding", num_memory_slots=3)
    assert not embedding.uses_memory and embedding.uses_embedding_injection and embedding.memory_prefix_length == 0
    both = tiny_cvae_config(latent_injection="memory+embedding", num_memory_slots=3)
    assert both.uses_memory and both.uses_embedding_injection and both.memory_prefix_length == 3


BAD_FIELDS = [
    (dict(latent_size=10, num_latent_queries=4, posterior_pooling="queries"),
     r"`latent_size` \(10\) must be divisible by `num_latent_queries` \(4"),
    (dict(posterior_pooling="max"), r"`posterior_pooling` must be one of \('mean', 'queries'\), got 'max'"),
    (dict(num_encoder_layers=3), r"`num_encoder_layers` \(3\) cannot exceed .*`num_hidden_layers` \(2\)"),
    (dict(latent_injection="prefix"), r"`latent_injection` must be one of .*'memory'.*got 'prefix'"),
    (dict(skip_connection="residual"), r"`skip_connection` must be one of .*'gskip'.*got 'residual'"),
    (dict(decoder_mode="adapter"), r"`decoder_mode` must be one of .*'frozen'.*got 'adapter'"),
    (dict(latent_size=0), r"`latent_size` must be a positive integer, got 0"),
    (dict(latent_size=-8), r"`latent_size` must be a positive integer, got -8"),
    (dict(latent_size=8.0), r"`latent_size` must be a positive integer, got 8.0"),
    (dict(num_latent_queries=0), r"`num_latent_queries` must be a positive integer, got 0"),
    (dict(num_memory_slots=0), r"`num_memory_slots` must be a positive integer, got 0"),
    (dict(num_memory_slots=True), r"`num_memory_slots` must be a positive integer, got True"),
    (dict(num_encoder_layers=0), r"`num_encoder_layers` must be a positive integer, got 0"),
    (dict(gskip_samples=-1), r"`gskip_samples` must be a positive integer, got -1"),
    (dict(gskip_samples="32"), r"`gskip_samples` must be a positive integer, got '32'"),
]


@pytest.mark.parametrize("fields, message", BAD_FIELDS, ids=[str(fields) for fields, _ in BAD_FIELDS])
def test_validation_errors(fields, message):
    with pytest.raises(ValueError, match=message):
        tiny_cvae_config(**fields)
    # the same validation runs when a config is built directly (e.g. from a config.json)
    values = tiny_cvae_config().to_dict()
    values.update(fields)
    with pytest.raises(ValueError, match=message):
        CVAELlamaConfig(**values)


def test_validation_on_load(tmp_path):
    tiny_cvae_config().save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    path.write_text(path.read_text().replace('"skip_connection": "gskip"', '"skip_connection": "bogus"'))
    with pytest.raises(ValueError, match=r"`skip_connection` .* got 'bogus'"):
        CVAELlamaConfig.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    "config",
    [GPT2Config(n_embd=32, n_layer=2, n_head=4), GemmaConfig(hidden_size=32, num_hidden_layers=2)],
    ids=["gpt2", "gemma"],
)
def test_from_llama_config_rejects_other_architectures(config):
    # Llama, Mistral, Qwen2 and Qwen3 are supported (tests/test_architectures.py)
    with pytest.raises(ValueError, match=rf"`base_config` must be the config of a supported decoder architecture, one "
                                         rf"of LlamaConfig .*Qwen3Config \('qwen3'\); got {type(config).__name__} "
                                         rf"with model_type '{config.model_type}'"):  # fmt: skip
        CVAELlamaConfig.from_llama_config(config)


def test_from_llama_config_rejects_unknown_fields():
    with pytest.raises(ValueError, match=r"unknown CVAE field\(s\) \['latent_dim'\]"):
        CVAELlamaConfig.from_llama_config(tiny_llama_config(), latent_dim=16)
