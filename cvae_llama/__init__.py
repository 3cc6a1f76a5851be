"""cvae-llama: a decoder-only LLM (Llama, Mistral, Qwen2 / Qwen2.5, Qwen3) as a conditional VAE, native to Hugging Face transformers.

`from cvae_llama import CVAETrainer, CVAETrainingArguments, density_gap` works as `from trl import SFTTrainer,
SFTConfig` does; the trainer and its objectives (and `datasets`, which they use) are imported on first access, so
`import cvae_llama` costs only the model and its config.
"""

import importlib
from typing import TYPE_CHECKING

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration_cvae_llama import CVAELlamaConfig
from .modeling_cvae_llama import (
    CVAELlamaForCausalLM,
    CVAELlamaModel,
    CVAELlamaOutput,
    CVAELlamaPreTrainedModel,
    gaussian_kl,
)


__version__ = "0.1.0.dev0"

AutoConfig.register("cvae_llama", CVAELlamaConfig, exist_ok=True)
AutoModel.register(CVAELlamaConfig, CVAELlamaForCausalLM, exist_ok=True)
AutoModelForCausalLM.register(CVAELlamaConfig, CVAELlamaForCausalLM, exist_ok=True)
# save_pretrained writes the two code files and an auto_map, so the folder loads with trust_remote_code
CVAELlamaConfig.register_for_auto_class()
CVAELlamaForCausalLM.register_for_auto_class("AutoModelForCausalLM")

# name -> submodule, imported when the name is first read (`cvae_llama.trainer.__all__`, `gaussian_kl` aside)
_LAZY = {
    name: "trainer"
    for name in (
        "CVAEBagOfWordsHead",
        "CVAETrainer",
        "CVAETrainingArguments",
        "DG_GROUPINGS",
        "LOGGED_TERMS",
        "LatentDPOConfig",
        "LatentDPOTrainer",
        "OBJECTIVES",
        "RECONSTRUCTION_REDUCTIONS",
        "active_units",
        "apply_lora",
        "attach_bow_head",
        "bag_of_words_nll",
        "check_checkpoint",
        "cvae_loss_func",
        "cvae_modules_to_save",
        "cyclical_beta",
        "density_gap",
        "free_bits_kl",
        "mutual_information",
        "pretrained_parameter_names",
        "remove_bow_head",
        "trl_loss_func",
    )
}
_LAZY.update({name: "latent_prior" for name in ("load_latent_prior", "save_latent_prior")})

if TYPE_CHECKING:  # for type checkers and IDEs: the names as if imported here
    from .latent_prior import load_latent_prior, save_latent_prior  # noqa: F401
    from .trainer import (  # noqa: F401
        DG_GROUPINGS,
        LOGGED_TERMS,
        OBJECTIVES,
        RECONSTRUCTION_REDUCTIONS,
        CVAEBagOfWordsHead,
        CVAETrainer,
        CVAETrainingArguments,
        LatentDPOConfig,
        LatentDPOTrainer,
        active_units,
        apply_lora,
        attach_bow_head,
        bag_of_words_nll,
        check_checkpoint,
        cvae_loss_func,
        cvae_modules_to_save,
        cyclical_beta,
        density_gap,
        free_bits_kl,
        mutual_information,
        pretrained_parameter_names,
        remove_bow_head,
        trl_loss_func,
    )


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value  # the next access is a plain attribute
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "CVAELlamaConfig",
    "CVAELlamaForCausalLM",
    "CVAELlamaModel",
    "CVAELlamaOutput",
    "CVAELlamaPreTrainedModel",
    "gaussian_kl",
    "__version__",
    *_LAZY,
]
