"""Configuration of CVAE-Llama: the config of the wrapped decoder (Llama, Mistral, Qwen2 / Qwen2.5 or Qwen3) plus the
fields of the conditional VAE around it.

This file travels to a Hub repo as remote code: it imports only torch, transformers and the standard library.
"""

import math

from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config


LATENT_INJECTIONS = ("memory", "embedding", "memory+embedding")
SKIP_CONNECTIONS = ("gskip", "skip", "none")
DECODER_MODES = ("frozen", "full", "lora")
POSTERIOR_POOLINGS = ("mean", "queries")
POSTERIOR_NORM_STATISTICS = ("batch", "running_mean", "running")
MEMORY_ATTENTIONS = ("joint", "gated")
CVAE_FIELDS = (
    "latent_size",
    "num_latent_queries",
    "num_memory_slots",
    "num_encoder_layers",
    "latent_injection",
    "skip_connection",
    "gskip_samples",
    "decoder_mode",
    "posterior_batch_norm",
    "posterior_norm_statistics",
    "posterior_pooling",
    "memory_attention",
    "memory_gate_scale",
    "share_llm_weights",
    "learned_prior",
)
# The allowed values of the CVAE fields that take a name (checked by `validate_cvae`; the command line's choices).
CVAE_FIELD_CHOICES = {
    "latent_injection": LATENT_INJECTIONS,
    "skip_connection": SKIP_CONNECTIONS,
    "decoder_mode": DECODER_MODES,
    "posterior_pooling": POSTERIOR_POOLINGS,
    "posterior_norm_statistics": POSTERIOR_NORM_STATISTICS,
    "memory_attention": MEMORY_ATTENTIONS,
}
# The decoder architectures a CVAE can wrap (`base_model_type`, the wrapped LLM's `model_type`), with their configs.
BASE_CONFIG_CLASSES = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config}
# Keys of a CVAE config that are not the base architecture's: the CVAE's own, and what a saved config records about it.
NOT_BASE_FIELDS = (*CVAE_FIELDS, "base_model_type", "model_type", "architectures", "auto_map", "transformers_version",
                   "base_model_name_or_path", "base_model_revision", "base_model_fingerprint", "saved_as",
                   "decoder_lora", "base_model_quantization_config", "quantization_config")  # fmt: skip
# CVAE fields added after the first release, with the value that folders saved before them were built with: a saved
# config without such a field loads as the architecture its weights have.
CVAE_FIELDS_ADDED_LATER = {
    "posterior_batch_norm": False,
    "posterior_pooling": "queries",
    "posterior_norm_statistics": "batch",
    "memory_attention": "joint",
    "memory_gate_scale": 1.0,
    "share_llm_weights": False,
    "learned_prior": False,
}


class CVAELlamaConfig(LlamaConfig):
    r"""
    Configuration of [`CVAELlamaForCausalLM`]: every field of the wrapped LLM's config (the decoder: a
    [`LlamaConfig`], [`MistralConfig`], [`Qwen2Config`] or [`Qwen3Config`], named by `base_model_type`) plus the
    fields of the CVAE (defaults are those of Zhang et al., IEEE TAI 2026).

    Args:
        base_model_type (`str`, defaults to `"llama"`):
            The `model_type` of the decoder's architecture: one of `BASE_CONFIG_CLASSES` (`"llama"`, `"mistral"`,
            `"qwen2"`, which Qwen2.5 shares, `"qwen3"`). The architecture's own config class checks and completes its
            fields ([`~CVAELlamaConfig.base_config`]). Folders saved before this field existed load with `"llama"`.
        latent_size (`int`, defaults to 32):
            Dimension `d` of the latent `z`.
        num_latent_queries (`int`, defaults to 4):
            With `posterior_pooling="queries"`: learned queries appended to the posterior encoder's input; each reads
            out `latent_size / num_latent_queries` means and log-variances. Must then divide `latent_size`.
        num_memory_slots (`int`, defaults to 4):
            Pseudo tokens the latent becomes in every decoder layer (the latent memory).
        num_encoder_layers (`int`, defaults to 2):
            How many of the LLM's first decoder layers the posterior encoder copies.
        latent_injection (`str`, defaults to `"memory"`):
            How `z` reaches the decoder: `"memory"` (per-layer memory slots), `"embedding"` (added to every token
            embedding, a baseline) or `"memory+embedding"`.
        skip_connection (`str`, defaults to `"gskip"`):
            `"gskip"`: gradient-only skip (zero in the forward pass); `"skip"`: a real skip added to the final hidden
            states; `"none"`.
        gskip_samples (`int`, defaults to 32):
            Reparameterised samples of `z` averaged by the skip connection in training.
        decoder_mode (`str`, defaults to `"frozen"`):
            `"frozen"`: the LLM stays fixed and only the CVAE's own modules train (the authors' stage 2; their
            training command trains every parameter, their stage 0, which `"full"` is close to); `"full"`: the
            decoder trains too; `"lora"`: LoRA adapters on the decoder, added by the trainer through peft.
        posterior_batch_norm (`bool`, defaults to `True`):
            Batch-normalise the posterior means (BN-VAE, Zhu et al., 2020): in training each latent dimension of
            the batch's means is standardised (then scaled and shifted by learned parameters starting at 1 and 0),
            in evaluation running statistics stand in. The encoder's features barely differ between texts at
            first, and without it the means stay almost equal, so the decoder learns to ignore z; with it they
            spread from the first step. Folders saved before this field existed load with `False`.
        posterior_norm_statistics (`str`, defaults to `"batch"`):
            What the batch norm standardises the means with in training; evaluation always uses its running
            statistics. A training batch is often one prompt's group.
            - `"batch"`: the batch's own statistics, as plain batch norm. Each group is centred on itself in
              training, but evaluation divides a held-out group's offset by a within-group spread.
            - `"running_mean"`: centred on the running mean (updated with each batch first), scaled by the batch's
              own spread. Every group spreads with unit variance, and its offset from the running mean reaches the
              objective as it does in evaluation. The offset's gradient is not scale-invariant: on a fixed batch
              the gradient norm does not fall.
            - `"running"`: the running mean and variance of every mean seen, so that training normalises exactly as
              evaluation does (batch renormalisation, Ioffe, 2017). The spread between groups then counts too.
            Folders saved before this field existed load with `"batch"`.
        posterior_pooling (`str`, defaults to `"mean"`):
            What the posterior's read-out reads: `"mean"`, the mean of the encoder's last token states (all real
            tokens but the first, which holds an LLM's massive activations), or `"queries"`, the states of
            `num_latent_queries` learned queries appended to the input (the paper's; their states barely differ from
            one text to another at first). Folders saved before this field existed load with `"queries"`.
        memory_attention (`str`, defaults to `"gated"`):
            How a real token attends to the memory slots. `"gated"` (zero-init attention, LLaMA-Adapter, Zhang et al.,
            2024): the LLM's attention over the text, unchanged, plus `g * attention over the slots` (their own
            softmax), with a gate `g` per layer and head that starts at 0: a fresh CVAE is its LLM exactly, whatever
            z, and the gates open as it trains (at `memory_gate_scale`'s pace). `"joint"` (the paper's, as Optimus'
            memory): the slots are keys in front of the text's, in one softmax, so they take attention mass from the
            text, and a fresh CVAE does not score text as its LLM (the slots act as extra attention sinks). The
            attention maps (`output_attentions`) are the joint softmax, the slots' columns first, or with `"gated"`
            the text's own softmax (the LLM's shape). Folders saved before this field existed load with `"joint"`.
        memory_gate_scale (`float`, defaults to 100.0):
            With `memory_attention="gated"`, the gates are `memory_gate_scale * gate`, the parameter `gate` stored
            divided by the scale. Adam moves a parameter by about its learning rate a step whatever its gradient, so
            the scale is how many times faster than the CVAE's other new modules the gates open. Stored as they are
            (1), they open too slowly for the latent to keep pace with the joint memory's. Folders saved before this
            field existed load with 1.
        share_llm_weights (`bool`, defaults to `True`):
            Whether the posterior encoder's token embedding and the memory's key / value projections (and key norms,
            Qwen3's) are the decoder's own modules (`True`), or copies of the LLM's kept by the CVAE, frozen at the
            LLM's values (`False`: 0.79 B more parameters on Llama-3-8B, one embedding and two projections per layer).
            Shared, they follow the decoder where it trains (`decoder_mode="full"`, or LoRA on `k_proj` / `v_proj`).
            Folders saved before this field existed load with `False`, the copies their weights hold.
        learned_prior (`bool`, defaults to `False`):
            Whether the model has a learned prior p(z | x) (`latent_prior`): the posterior encoder's network reading
            the prompt x alone (BOS for unconditional text), without its batch norm, trained by latent DPO
            (`LatentDPOTrainer`) with the CVAE frozen. A fresh one is exactly N(0, I) (zero-initialised read-out). With
            it, `generate()` without `latent` samples z from it and `forward()` without `latent` uses its mean;
            without it, N(0, I) and z = 0. `add_learned_prior()` adds one to a trained CVAE.

    Example:

    ```python
    >>> from transformers import LlamaConfig
    >>> from cvae_llama import CVAELlamaConfig
    >>> config = CVAELlamaConfig.from_llama_config(LlamaConfig(hidden_size=64, num_hidden_layers=2,
    ...     num_attention_heads=4, intermediate_size=128, vocab_size=100), latent_size=16)
    >>> config.latent_size, config.model_type
    (16, 'cvae_llama')
    ```
    """

    model_type = "cvae_llama"

    base_model_type: str = "llama"
    latent_size: int = 32
    num_latent_queries: int = 4
    num_memory_slots: int = 4
    num_encoder_layers: int = 2
    latent_injection: str = "memory"
    skip_connection: str = "gskip"
    gskip_samples: int = 32
    decoder_mode: str = "frozen"
    posterior_batch_norm: bool = True
    posterior_norm_statistics: str = "batch"
    posterior_pooling: str = "mean"
    memory_attention: str = "gated"
    memory_gate_scale: float = 100.0
    share_llm_weights: bool = True
    learned_prior: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.validate_cvae()

    def validate_cvae(self):
        """Raise `ValueError` naming the field and its value when the CVAE fields are inconsistent."""

        def positive_int(name):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}")

        for name in ("latent_size", "num_latent_queries", "num_memory_slots", "num_encoder_layers", "gskip_samples"):
            positive_int(name)
        if self.posterior_pooling == "queries" and self.latent_size % self.num_latent_queries != 0:
            raise ValueError(
                f"`latent_size` ({self.latent_size}) must be divisible by `num_latent_queries` "
                f"({self.num_latent_queries}): each query reads out an equal share of the latent"
            )
        if self.num_encoder_layers > self.num_hidden_layers:
            raise ValueError(
                f"`num_encoder_layers` ({self.num_encoder_layers}) cannot exceed the LLM's `num_hidden_layers` "
                f"({self.num_hidden_layers})"
            )
        scale = self.memory_gate_scale
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
            raise ValueError(f"`memory_gate_scale` must be a finite positive number, got {scale!r}")
        for name in ("posterior_batch_norm", "share_llm_weights", "learned_prior"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"`{name}` must be True or False, got {getattr(self, name)!r}")
        for name, allowed in CVAE_FIELD_CHOICES.items():
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"`{name}` must be one of {allowed}, got {value!r}")
        # the architecture's own config checks its fields and adds those it derives (e.g. Qwen's `layer_types`);
        # its tensor- and pipeline-parallel plans are the decoder's (Qwen3's replicates its q/k norms)
        for name, value in self.base_config().to_dict().items():
            if name not in NOT_BASE_FIELDS and not hasattr(self, name):
                setattr(self, name, value)
        base_config_class = BASE_CONFIG_CLASSES[self.base_model_type]
        self.base_model_tp_plan = base_config_class.base_model_tp_plan
        self.base_model_pp_plan = base_config_class.base_model_pp_plan

    def base_config(self):
        """The wrapped LLM's config: its architecture's own config class (`BASE_CONFIG_CLASSES[base_model_type]`)
        built from this config's fields but the CVAE's. Raises `ValueError` for an unknown `base_model_type` or for
        fields that architecture refuses."""
        if self.base_model_type not in BASE_CONFIG_CLASSES:
            raise ValueError(
                f"`base_model_type` must be one of {tuple(BASE_CONFIG_CLASSES)} (the decoder architectures a "
                f"CVAE-Llama wraps), got {self.base_model_type!r}"
            )
        values = {name: value for name, value in self.to_dict().items() if name not in NOT_BASE_FIELDS}
        try:
            return BASE_CONFIG_CLASSES[self.base_model_type](**values)
        except Exception as error:  # the architecture's own checks (huggingface_hub's strict-dataclass errors too)
            raise ValueError(f"the {self.base_model_type!r} decoder's fields are not valid: {error}") from error

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs):
        """Build the config of a saved CVAE (the `config.json` of `from_pretrained` and `AutoConfig`), refusing one
        that could load the wrong architecture in silence:

        - a config of another model type (a plain Llama, a GPT-2): build a CVAE around an LLM with
          `CVAELlamaForCausalLM.from_llm` instead;
        - a `cvae_llama` config without one of the CVAE fields: every saved config records them all, and a default
          (e.g. `latent_size=32`) would build another architecture than the weights were trained with.

        The fields set by `kwargs` (e.g. `from_pretrained(path, latent_size=16)`) are validated too.
        """
        model_type = config_dict.get("model_type")
        if model_type is not None and model_type != cls.model_type:
            raise ValueError(
                f"config.json has model_type {model_type!r}, not {cls.model_type!r}: it is not a CVAE-Llama; build "
                "a CVAE around a Llama LLM with CVAELlamaForCausalLM.from_llm(path, ...)"
            )
        if model_type == cls.model_type:
            # (`saved_as` says how the folder was saved, adapter or standalone: what `from_pretrained` reads, not the
            # model's configuration)
            config_dict = {name: value for name, value in config_dict.items() if name != "saved_as"}
            config_dict = {**CVAE_FIELDS_ADDED_LATER, "base_model_type": "llama", **config_dict}
            missing = [name for name in CVAE_FIELDS if name not in config_dict and name not in kwargs]
            if missing:
                raise ValueError(
                    f"config.json of a {cls.model_type!r} model has no {missing}: a saved CVAE-Llama config records "
                    f"every CVAE field, and a default could build another architecture than its weights; write the "
                    f"value(s) the model was trained with into config.json"
                )
        loaded = super().from_dict(config_dict, **kwargs)
        config = loaded[0] if isinstance(loaded, tuple) else loaded
        config.validate_cvae()  # from_dict sets the kwargs after __init__, past its validation
        return loaded

    @property
    def uses_memory(self) -> bool:
        return "memory" in self.latent_injection

    @property
    def uses_embedding_injection(self) -> bool:
        return "embedding" in self.latent_injection

    @property
    def memory_prefix_length(self) -> int:
        """Positions taken by the memory slots in front of the real tokens (0 without memory injection)."""
        return self.num_memory_slots if self.uses_memory else 0

    @classmethod
    def from_base_config(cls, base_config, **cvae_fields) -> "CVAELlamaConfig":
        """Build a CVAE config from the config of the LLM to wrap (an instance of one of `BASE_CONFIG_CLASSES`: a
        `LlamaConfig`, `MistralConfig`, `Qwen2Config` or `Qwen3Config`) plus CVAE fields given as keywords."""
        config_class = BASE_CONFIG_CLASSES.get(getattr(base_config, "model_type", None))
        if config_class is None or not isinstance(base_config, config_class):  # subclasses too, as from_llm's check
            supported = ", ".join(f"{config.__name__} ({name!r})" for name, config in BASE_CONFIG_CLASSES.items())
            raise ValueError(
                f"`base_config` must be the config of a supported decoder architecture, one of {supported}; got "
                f"{type(base_config).__name__} with model_type {getattr(base_config, 'model_type', None)!r}"
            )
        unknown = sorted(set(cvae_fields) - set(CVAE_FIELDS))
        if unknown:
            raise ValueError(f"unknown CVAE field(s) {unknown}; expected a subset of {list(CVAE_FIELDS)}")
        values = {name: value for name, value in base_config.to_dict().items() if name not in NOT_BASE_FIELDS}
        return cls(**values, base_model_type=base_config.model_type, **cvae_fields)

    # the name of the first release, which wrapped Llama only
    from_llama_config = from_base_config


def _register_model_type() -> None:
    """Make the model type known to `AutoConfig` in every process that runs this file, as a folder's remote code too.

    `AutoTokenizer.from_pretrained(folder)` reads the folder's config.json before its tokenizer files, and for a model
    type transformers does not know, the `AutoConfig` entry of the config's `auto_map` makes it ask "Do you wish to run
    the custom code? [y/N]" on the console (the question lands in standard output), although the tokenizer is a stock
    one. With the type registered (the installed package registers it too, and is kept when it has), the tokenizer of
    a saved folder loads as any Llama's does once its model or config has been loaded.
    """
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if CVAELlamaConfig.model_type not in CONFIG_MAPPING:
        AutoConfig.register(CVAELlamaConfig.model_type, CVAELlamaConfig)


_register_model_type()

__all__ = ["CVAELlamaConfig"]
