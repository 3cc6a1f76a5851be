"""The CVAE's loss for trainers that compute the loss from the model's outputs, e.g. trl's `SFTTrainer`:

    SFTTrainer(model=cvae, args=SFTConfig(...), train_dataset=texts, compute_loss_func=trl_loss_func)

trl's default loss runs the decoder alone through its fused LM head (the CVAE refuses that in training, see
`modeling_cvae_llama._refuse_training_without_the_latent`); with `compute_loss_func` trl calls the model's own forward,
which encodes each text's posterior (in training mode, `input_ids` themselves), samples z and decodes with it.
"""

import torch

from ..modeling_cvae_llama import gaussian_kl


def trl_loss_func(outputs, labels: torch.Tensor, num_items_in_batch: int | torch.Tensor | None = None) -> torch.Tensor:
    """The negative ELBO per label token of a `CVAELlamaForCausalLM` forward run without `labels`:

        (sum over label tokens of -log p(y_t | y_<t, x, z) + sum over rows of KL(q(z | x, y) || N(0, I))) / tokens

    `tokens` is `num_items_in_batch` (the step's label tokens, as `Trainer` passes it under gradient accumulation)
    or the micro-batch's. With the prior's z (no posterior in the outputs) it is the plain per-token NLL.
    """
    logits = outputs.logits[:, :-1].float()
    targets = labels[:, 1:].to(logits.device)
    nll = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100, reduction="sum"
    )
    if outputs.latent_mean is not None:
        nll = nll + gaussian_kl(outputs.latent_mean.float(), outputs.latent_logvar.float()).sum()
    tokens = (targets != -100).sum() if num_items_in_batch is None else num_items_in_batch
    return nll / torch.as_tensor(tokens, device=nll.device).clamp(min=1)


__all__ = ["trl_loss_func"]
