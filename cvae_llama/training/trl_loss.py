"""The CVAE's loss for trainers that compute the loss from the model's outputs, e.g. trl's `SFTTrainer`:

    SFTTrainer(model=cvae, args=SFTConfig(...), train_dataset=texts, compute_loss_func=trl_loss_func)
    Trainer(model=cvae, args=TrainingArguments(...), train_dataset=rows, compute_loss_func=cvae_loss_func(free_bits=0.5))

trl's default loss runs the decoder alone through its fused LM head (the CVAE refuses that in training, see
`modeling_cvae_llama._refuse_training_without_the_latent`); with `compute_loss_func` trl calls the model's own forward,
which encodes each text's posterior (in training mode, `input_ids` themselves), samples z and decodes with it.
"""

import functools
import math

import torch

from ..modeling_cvae_llama import gaussian_kl
from .objectives import free_bits_kl


def cvae_loss(
    outputs,
    labels: torch.Tensor,
    num_items_in_batch: int | torch.Tensor | None = None,
    *,
    kl_weight: float = 1.0,
    free_bits: float | None = None,
) -> torch.Tensor:
    """The CVAE's loss per label token of a `CVAELlamaForCausalLM` forward run without `labels`:

        (sum over label tokens of -log p(y_t | y_<t, x, z) + kl_weight * R) / tokens

    with R the sum over the rows of KL(q(z | x, y) || N(0, I)), or, with `free_bits` = lambda, the rows times the
    free-bits KL of the micro-batch (`free_bits_kl`: per dimension max(mean KL_d, lambda)). `tokens` is
    `num_items_in_batch` (the step's label tokens, as `Trainer` passes it under gradient accumulation) or the
    micro-batch's. With the prior's z (no posterior in the outputs) it is the plain per-token NLL.
    """
    logits = outputs.logits[:, :-1].float()
    targets = labels[:, 1:].to(logits.device)
    loss = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100, reduction="sum"
    )
    if outputs.latent_mean is not None and kl_weight != 0:
        mean, logvar = outputs.latent_mean.float(), outputs.latent_logvar.float()
        if free_bits is None:
            regulariser = gaussian_kl(mean, logvar).sum()
        else:
            regulariser = free_bits_kl(mean, logvar, free_bits) * mean.shape[0]
        loss = loss + kl_weight * regulariser
    tokens = (targets != -100).sum() if num_items_in_batch is None else num_items_in_batch
    return loss / torch.as_tensor(tokens, device=loss.device).clamp(min=1)


def cvae_loss_func(kl_weight: float = 1.0, free_bits: float | None = None):
    """A `compute_loss_func` for `transformers.Trainer` and trl's trainers with the weight of the KL (`kl_weight`,
    beta: 1 is the negative ELBO, 0 an auto-encoder) and optional free bits (`free_bits`, nats per dimension), the
    settings `CVAETrainer` calls `--objective kl --kl_weight` and `--objective free_bits`:

        Trainer(model=cvae, args=..., train_dataset=rows, compute_loss_func=cvae_loss_func(free_bits=0.5))
    """
    for name, value in (("kl_weight", kl_weight), ("free_bits", free_bits)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)
                                  or not math.isfinite(value) or value < 0):  # fmt: skip
            raise ValueError(f"cvae_loss_func: {name} must be a finite number >= 0, got {value!r}")
    return functools.partial(cvae_loss, kl_weight=float(kl_weight), free_bits=free_bits)


def trl_loss_func(outputs, labels: torch.Tensor, num_items_in_batch: int | torch.Tensor | None = None) -> torch.Tensor:
    """The negative ELBO per label token: `cvae_loss` with `kl_weight=1` and no free bits, the model's own loss."""
    return cvae_loss(outputs, labels, num_items_in_batch)


__all__ = ["cvae_loss", "cvae_loss_func", "trl_loss_func"]
