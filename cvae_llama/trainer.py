"""Training a CVAE-Llama: the objectives of Zhang et al., "Latent Variable Modeling for Controllable and Diverse
Generation From Large Language Models" (IEEE TAI 2026) on one-to-many data, as a `Trainer`.

This is the public import path (`from cvae_llama.trainer import CVAETrainer, CVAETrainingArguments, density_gap`);
the code lives in `cvae_llama.training` (arguments, trainer, objectives, LoRA, checkpoints) and, for the latent
statistics the trainer logs and the evaluation reports alike, in `cvae_llama.latent_statistics`.
"""

from .latent_statistics import active_units, density_gap, mutual_information
from .modeling_cvae_llama import gaussian_kl
from .training.arguments import DG_GROUPINGS, RECONSTRUCTION_REDUCTIONS, CVAETrainingArguments
from .training.checkpoints import check_checkpoint
from .training.latent_dpo import LatentDPOConfig, LatentDPOTrainer
from .training.lora import apply_lora, cvae_modules_to_save, pretrained_parameter_names
from .training.objectives import (
    OBJECTIVES,
    CVAEBagOfWordsHead,
    attach_bow_head,
    bag_of_words_nll,
    cyclical_beta,
    free_bits_kl,
    remove_bow_head,
)
from .training.trainer import LOGGED_TERMS, CVAETrainer
from .training.trl_loss import cvae_loss_func, trl_loss_func


__all__ = [
    "cvae_loss_func",
    "trl_loss_func",
    "CVAEBagOfWordsHead",
    "CVAETrainer",
    "CVAETrainingArguments",
    "LatentDPOConfig",
    "LatentDPOTrainer",
    "DG_GROUPINGS",
    "RECONSTRUCTION_REDUCTIONS",
    "LOGGED_TERMS",
    "OBJECTIVES",
    "active_units",
    "apply_lora",
    "attach_bow_head",
    "bag_of_words_nll",
    "check_checkpoint",
    "cvae_modules_to_save",
    "cyclical_beta",
    "density_gap",
    "free_bits_kl",
    "gaussian_kl",
    "mutual_information",
    "pretrained_parameter_names",
    "remove_bow_head",
]
