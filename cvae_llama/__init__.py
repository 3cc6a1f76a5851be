"""cvae-llama: a Llama-family LLM as a conditional VAE, native to Hugging Face transformers."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration_cvae_llama import CVAELlamaConfig
from .modeling_cvae_llama import CVAELlamaForCausalLM, CVAELlamaOutput, CVAELlamaPreTrainedModel


__version__ = "0.1.0.dev0"

AutoConfig.register("cvae_llama", CVAELlamaConfig, exist_ok=True)
AutoModel.register(CVAELlamaConfig, CVAELlamaForCausalLM, exist_ok=True)
AutoModelForCausalLM.register(CVAELlamaConfig, CVAELlamaForCausalLM, exist_ok=True)
# save_pretrained writes the two code files and an auto_map, so the folder loads with trust_remote_code
CVAELlamaConfig.register_for_auto_class()
CVAELlamaForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = ["CVAELlamaConfig", "CVAELlamaForCausalLM", "CVAELlamaOutput", "CVAELlamaPreTrainedModel", "__version__"]
