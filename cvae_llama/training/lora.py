"""`decoder_mode="lora"` with peft: LoRA adapters on the decoder, the CVAE's own modules trained in full, and the
names of a `PeftModel`'s parameters as the CVAE calls them."""

from collections.abc import Sequence

from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import ModulesToSaveWrapper
from torch import nn

from ..modeling_cvae_llama import CVAELlamaForCausalLM, inject_decoder_lora, is_lora_weight


def unwrap_cvae(model) -> CVAELlamaForCausalLM:
    """The `CVAELlamaForCausalLM` inside `model` (itself, or the base model of a `PeftModel`)."""
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    if not isinstance(base, CVAELlamaForCausalLM):
        raise ValueError(
            f"model must be a CVAELlamaForCausalLM (or a PeftModel of one), got {type(model).__name__}"
            + (f" wrapping {type(base).__name__}" if base is not model else "")
        )
    return base


def _own_parameters(module: nn.Module, prefix: str = ""):
    """Yield `(the CVAE's name, parameter)` for the parameters the CVAE has: a module peft trains in full stands for
    its trained copy, a LoRA layer for its base layer; LoRA's adapters are not the CVAE's and are left out."""
    if isinstance(module, ModulesToSaveWrapper):
        module = module.modules_to_save[module.active_adapters[0]]
    elif isinstance(module, BaseTunerLayer):
        module = module.get_base_layer()
    for name, parameter in module.named_parameters(recurse=False):
        yield prefix + name, parameter
    for name, child in module.named_children():
        yield from _own_parameters(child, f"{prefix}{name}.")


def cvae_parameter_names(model) -> dict[str, str]:
    """`{name in model.named_parameters(): the CVAE's own name}` for `model` (a `CVAELlamaForCausalLM` or a
    `PeftModel` of one): inside a `PeftModel`, `base_model.model.encoder.modules_to_save.default.layers.0...` is
    `encoder.layers.0...`. LoRA's adapter weights are not among the keys."""
    names = {id(parameter): name for name, parameter in model.named_parameters()}
    own_names = {}
    for own_name, parameter in _own_parameters(unwrap_cvae(model)):
        if id(parameter) in names:  # a tied parameter keeps its first name, as in named_parameters()
            own_names.setdefault(names[id(parameter)], own_name)
    return own_names


def cvae_modules_to_save(model: CVAELlamaForCausalLM) -> list[str]:
    """The CVAE's own modules that LoRA mode trains fully (and saves with the adapter): the posterior encoder (its
    embedding copy stays frozen), each memory layer's MLP and norm (its key/value copies stay frozen), the
    embedding injection, the skip connection, the bag-of-words head and the learned prior, those the model has. A
    gated memory layer is trained whole: its gates are parameters of the layer itself, which peft trains only inside
    a module it wraps (a layer of the joint memory keeps the two modules it was wrapped as before, so that its
    checkpoints resume)."""
    names = ["encoder"]
    if model.latent_memory is not None:
        for index, layer in enumerate(model.latent_memory.layers):
            prefix = f"latent_memory.layers.{index}"
            names += [prefix] if layer.gate is not None else [f"{prefix}.to_states", f"{prefix}.norm"]
    for name in ("latent_to_embedding", "latent_skip", "bow_head", "latent_prior"):
        if getattr(model, name, None) is not None:
            names.append(name)
    return names


def apply_lora(
    model: CVAELlamaForCausalLM,
    r: int = 8,
    alpha: float = 16,
    target_modules: Sequence[str] = ("q_proj", "k_proj", "v_proj", "o_proj"),
    dropout: float = 0.0,
):
    """`decoder_mode="lora"`: LoRA adapters (peft) on the decoder, the CVAE's own modules fully trained.

    LoRA targets only the decoder's layers, `model.layers.<i>.*.<target>`: the modules of those names elsewhere (the
    encoder's copies of the first layers, the memory's key/value copies) are `exclude_modules`. The CVAE's own
    modules ([`cvae_modules_to_save`]) become `modules_to_save`: trained in full and saved in the adapter file, so
    that a checkpoint holds everything that trains. The parameters that `decoder_mode` freezes (the LLM, the
    encoder's embedding copy, the memory's attention copies) stay frozen. `merge_and_unload()` on the result gives
    back a plain [`CVAELlamaForCausalLM`] with the adapters merged into the decoder, which `save_pretrained` writes
    as a normal folder.

    Cost: peft's `modules_to_save` keeps the original of each such module beside its trained copy, so the encoder
    (its layers and its embedding copy) is held twice until `merge_and_unload()`: about 1 B extra parameters on
    Llama-3-8B, 36 M on SmolLM2-135M.

    Args:
        model ([`CVAELlamaForCausalLM`]): the CVAE (its `config.decoder_mode` becomes `"lora"`).
        r (`int`, defaults to 8), alpha (`float`, defaults to 16), dropout (`float`, defaults to 0.0): LoRA's rank,
            scaling numerator and dropout.
        target_modules (`Sequence[str]`, defaults to the attention projections): names of the decoder's linear
            layers to adapt (e.g. add `"gate_proj", "up_proj", "down_proj"` for the MLPs).

    Returns:
        `peft.PeftModel` wrapping `model`.

    Example:

    ```python
    >>> merged = apply_lora(model).merge_and_unload()   # after training: a plain CVAELlamaForCausalLM
    ```
    """
    _check_lora_arguments(model, r, alpha, target_modules, dropout)
    model.config.decoder_mode = "lora"
    model.apply_decoder_mode()
    frozen = model.frozen_parameter_names()
    peft_model = get_peft_model(model, _lora_config(model, r, alpha, target_modules, dropout))
    parameters = dict(peft_model.named_parameters())
    for name, own_name in cvae_parameter_names(peft_model).items():
        # peft trains the copies of the modules to save in full: freeze again what decoder_mode freezes in them
        if own_name in frozen:
            parameters[name].requires_grad_(False)
    return peft_model


def lora_adapter_model(peft_model: PeftModel) -> CVAELlamaForCausalLM:
    """The CVAE that `peft_model` (of [`apply_lora`]) trained, with its LoRA layers unmerged in the decoder and their
    settings in `config.decoder_lora`: `save_pretrained` writes it as an adapter folder on the base LLM (the CVAE's
    weights and LoRA's), which `from_pretrained` loads with the LoRA layers in place. The trained copies of the
    CVAE's own modules replace peft's wrappers (`peft_model` is unwrapped in the process)."""
    config = peft_model.peft_config[peft_model.active_adapter]
    settings = {
        "r": config.r, "lora_alpha": config.lora_alpha, "lora_dropout": config.lora_dropout,
        "target_modules": sorted(config.target_modules), "bias": config.bias, "use_rslora": config.use_rslora,
    }  # fmt: skip
    lora = {
        name.removeprefix("base_model.model."): tensor.detach().clone()
        for name, tensor in peft_model.state_dict().items()
        if is_lora_weight(name)
    }
    model = unwrap_cvae(peft_model.unload())  # the decoder's own layers back, the trained modules in place
    model.config.decoder_lora = settings
    inject_decoder_lora(model, settings)
    missing, unexpected = model.load_state_dict(lora, strict=False)
    if unexpected or any(is_lora_weight(name) for name in missing):
        raise ValueError(f"the LoRA weights do not fit the decoder: unexpected {unexpected[:3]}, missing {missing[:3]}")
    model.apply_decoder_mode()
    return model


def _check_lora_arguments(model, r, alpha, target_modules, dropout) -> None:
    """`ValueError` unless `model` is a plain CVAE and the LoRA settings name linear layers of its decoder."""
    if isinstance(model, PeftModel):
        raise ValueError("model is already a PeftModel; apply_lora expects a plain CVAELlamaForCausalLM")
    unwrap_cvae(model)
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"r must be a positive integer, got {r!r}")
    if not isinstance(alpha, (int, float)) or alpha <= 0:
        raise ValueError(f"alpha must be a positive number, got {alpha!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
    names_ok = not isinstance(target_modules, str) and all(isinstance(name, str) and name for name in target_modules)
    if not target_modules or not names_ok:
        raise ValueError(f"target_modules must be a non-empty sequence of module names, got {target_modules!r}")
    decoder_linear_names = {
        name.rsplit(".", 1)[-1] for name, module in model.model.layers.named_modules() if isinstance(module, nn.Linear)
    }
    unknown = sorted(set(target_modules) - decoder_linear_names)
    if unknown:
        raise ValueError(
            f"target_modules {unknown} are not linear layers of the decoder; expected names among "
            f"{sorted(decoder_linear_names)}"
        )


def _lora_config(model: CVAELlamaForCausalLM, r: int, alpha: float, target_modules, dropout: float) -> LoraConfig:
    """LoRA on the decoder's `target_modules` only, the CVAE's own modules saved (and trained) in full."""
    # peft matches a name of target_modules as a suffix of any module's name: exclude those outside the decoder
    elsewhere = [
        name
        for name, _ in model.named_modules()
        if name.rsplit(".", 1)[-1] in target_modules and not name.startswith("model.layers.")
    ]
    return LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=list(target_modules),
        exclude_modules=elsewhere or None,
        modules_to_save=cvae_modules_to_save(model),
        bias="none",
    )


def pretrained_parameter_names(model) -> set[str]:
    """Names (as `model.named_parameters()` gives them, a `PeftModel`'s included) of the trainable parameters that
    start as copies of the LLM's weights: the encoder's copied layers, and the decoder (`model.*`, `lm_head.*`) when
    it trains. LoRA adapters and the CVAE's new modules are not among them."""
    parameters = dict(model.named_parameters())
    return {
        name
        for name, own_name in cvae_parameter_names(model).items()
        if parameters[name].requires_grad and own_name.startswith(("encoder.layers.", "model.", "lm_head."))
    }


__all__ = [
    "apply_lora",
    "cvae_modules_to_save",
    "cvae_parameter_names",
    "lora_adapter_model",
    "pretrained_parameter_names",
    "unwrap_cvae",
]
