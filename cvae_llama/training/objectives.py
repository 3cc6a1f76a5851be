"""The objectives of a CVAE-Llama (Zhang et al., "Latent Variable Modeling for Controllable and Diverse Generation
From Large Language Models", IEEE TAI 2026: the density gap and the baselines it is compared with).

The loss of a group (a prompt with its `M` responses) is the reconstruction NLL of its responses plus
`beta * regulariser` of its `M` posteriors, the regulariser and beta chosen by name:

- `"dg"` (the paper's): the density gap, KL(aggregated posterior of the group || N(0, I)) per latent dimension
  ([`cvae_llama.latent_statistics.density_gap`]);
- `"kl"`: beta * KL(q || N(0, I)) (beta = `kl_weight`: 1 is the vanilla VAE, 0 the auto-encoder);
- `"free_bits"`: per-dimension max(KL_d, lambda) ([`free_bits_kl`]);
- `"cyclical"`: KL with the cyclical schedule of beta ([`cyclical_beta`]);
- `"optimus"`: cyclical schedule + free bits (the Optimus recipe);
- `"bow"`: KL + a bag-of-words loss from a head on z ([`CVAEBagOfWordsHead`]).

[`REGULARISERS`] and [`BETA_SCHEDULES`] map each name to its function; [`OBJECTIVES`] lists the names.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers import TrainingArguments

from ..latent_statistics import check_posterior, density_gap, group_indices, kl_to_prior
from ..modeling_cvae_llama import CVAELlamaForCausalLM, gaussian_kl


# ---------------------------------------------------------------------------------------------------- pure functions
def free_bits_kl(
    latent_mean: torch.Tensor,
    latent_logvar: torch.Tensor,
    free_bits: float,
    group_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Free-bits KL: `sum_d max(mean_i KL(q_i || N(0, 1))_d, free_bits)`, averaged over groups.

    This is Kingma et al. (2016, IAF, "free bits"): the KL of each dimension is first averaged over the (mini)batch,
    here over the rows of one group (the responses of one prompt), then clamped from below at `lambda = free_bits`,
    so that a dimension below lambda nats gets no gradient. (The authors' code of the paper, like Optimus's
    `fb_mode=1`, clamps each response's KL per dimension before averaging, a stronger constraint; averaging per
    group first keeps the objective a sum over groups, so gradient accumulation and DDP stay exact.)

    Args:
        latent_mean, latent_logvar (`torch.Tensor` of shape `(batch, latent_size)`): the posteriors.
        free_bits (`float`): lambda, in nats per dimension (the paper's baselines use 0.5).
        group_ids (`torch.Tensor` of shape `(batch,)`, *optional*): the group of each row; one group when None.

    Returns:
        `torch.Tensor` of shape `()`: the mean over groups of each group's clamped KL.
    """
    check_posterior(latent_mean, latent_logvar)
    if not math.isfinite(free_bits) or free_bits < 0:
        raise ValueError(f"free_bits must be a finite number >= 0, got {free_bits!r}")
    kl = gaussian_kl(latent_mean, latent_logvar)  # (batch, d)
    per_group = [  # per group: average over its rows, clamp each dimension, sum over dimensions
        kl[rows].mean(dim=0).clamp(min=free_bits).sum()
        for rows in group_indices(group_ids, kl.shape[0], device=kl.device)
    ]
    return torch.stack(per_group).mean()


def cyclical_beta(
    step: int,
    total_steps: int,
    num_cycles: int = 4,
    zero_fraction: float = 0.5,
    ramp_end: float = 0.75,
) -> float:
    """The cyclical annealing schedule of beta (Fu et al., 2019, in the variant of the paper's baselines).

    Training is cut into `num_cycles` equal cycles. Inside a cycle, at the fraction `tau` of it: beta = 0 while
    `tau < zero_fraction`, rises linearly to 1 at `tau = ramp_end`, then stays 1.

    Args:
        step (`int`): the optimizer step (0-based, the `Trainer`'s `state.global_step`).
        total_steps (`int`): the steps of the whole run (`state.max_steps`).
        num_cycles (`int`, defaults to 4), zero_fraction (`float`, defaults to 0.5), ramp_end (`float`, defaults
            to 0.75): the cycles and their phases, `0 <= zero_fraction <= ramp_end <= 1`.

    Returns:
        `float` in [0, 1].
    """
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be an integer >= 0, got {step!r}")
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
        raise ValueError(f"total_steps must be a positive integer, got {total_steps!r}")
    if isinstance(num_cycles, bool) or not isinstance(num_cycles, int) or num_cycles < 1:
        raise ValueError(f"num_cycles must be a positive integer, got {num_cycles!r}")
    if not 0.0 <= zero_fraction <= ramp_end <= 1.0:
        raise ValueError(
            "the cycle's phases must satisfy 0 <= zero_fraction <= ramp_end <= 1, got "
            f"zero_fraction={zero_fraction!r} and ramp_end={ramp_end!r}"
        )
    period = total_steps / num_cycles
    tau = (step % period) / period  # position inside the current cycle, in [0, 1)
    if tau >= ramp_end:
        return 1.0
    if tau < zero_fraction:
        return 0.0
    return (tau - zero_fraction) / (ramp_end - zero_fraction)


# ---------------------------------------------------------------------------------------------------- registries
@dataclass(frozen=True)
class MicroBatchPosterior:
    """The posteriors of one micro-batch, how they group, and the micro-batch's share of the optimizer step.

    Args:
        latent_mean, latent_logvar (`torch.Tensor` of shape `(batch, latent_size)`): the posteriors.
        group_ids (`torch.Tensor` of shape `(batch,)`): the prompt of each row.
        group_share (`float`): the micro-batch's groups / the step's groups.
        dg_group_ids (`torch.Tensor` of shape `(batch,)`, *optional*): what the density gap aggregates: `group_ids`,
            or None (the whole micro-batch as one group, `dg_grouping="batch"`).
        dg_share (`float`): the micro-batch's density-gap groups / the step's.
    """

    latent_mean: torch.Tensor
    latent_logvar: torch.Tensor
    group_ids: torch.Tensor
    group_share: float
    dg_group_ids: torch.Tensor | None
    dg_share: float


# A regulariser maps a micro-batch's posteriors and the training arguments (a `CVAETrainingArguments`) to the
# micro-batch's share of the step's regulariser (a mean over the step's groups)
Regulariser = Callable[[MicroBatchPosterior, TrainingArguments], torch.Tensor]


def density_gap_term(posterior: MicroBatchPosterior, args: TrainingArguments) -> torch.Tensor:
    """R_DG with `args.dg_samples` samples per posterior, over the density gap's groups."""
    value = density_gap(posterior.latent_mean, posterior.latent_logvar, args.dg_samples, posterior.dg_group_ids)
    return value * posterior.dg_share


def kl_term(posterior: MicroBatchPosterior, args: TrainingArguments) -> torch.Tensor:
    """KL(q || N(0, I)) summed over dimensions, averaged over each group's rows."""
    return kl_to_prior(posterior.latent_mean, posterior.latent_logvar, posterior.group_ids) * posterior.group_share


def free_bits_term(posterior: MicroBatchPosterior, args: TrainingArguments) -> torch.Tensor:
    """[`free_bits_kl`] at lambda = `args.free_bits`."""
    value = free_bits_kl(posterior.latent_mean, posterior.latent_logvar, args.free_bits, posterior.group_ids)
    return value * posterior.group_share


def constant_beta(step: int, total_steps: int, args: TrainingArguments) -> float:
    """beta = `kl_weight` at every step."""
    return args.kl_weight


def cyclical_kl_weight(step: int, total_steps: int, args: TrainingArguments) -> float:
    """beta = `kl_weight` times [`cyclical_beta`] with the cycles of `args`."""
    schedule = cyclical_beta(step, total_steps, args.num_cycles, args.cycle_zero_fraction, args.cycle_ramp_end)
    return args.kl_weight * schedule


REGULARISERS: dict[str, Regulariser] = {
    "dg": density_gap_term,
    "kl": kl_term,
    "free_bits": free_bits_term,
    "cyclical": kl_term,
    "optimus": free_bits_term,
    "bow": kl_term,  # plus the bag-of-words loss, which the trainer adds with `bow_weight`
}
BETA_SCHEDULES: dict[str, Callable[[int, int, TrainingArguments], float]] = {
    "dg": constant_beta,
    "kl": constant_beta,
    "free_bits": constant_beta,
    "cyclical": cyclical_kl_weight,
    "optimus": cyclical_kl_weight,
    "bow": constant_beta,
}
OBJECTIVES = tuple(REGULARISERS)


# ---------------------------------------------------------------------------------------------------- bag of words
class CVAEBagOfWordsHead(nn.Module):
    """The bag-of-words head of the `"bow"` baseline (Zhao et al., 2017): z -> one distribution over the vocabulary
    from which every token of the response is predicted, regardless of its position.

    `latent (batch, latent_size)` -> Linear -> SiLU -> LM head -> `(batch, vocab_size)` logits, as in the authors'
    code; the output projection starts as a copy of the decoder's LM head (a trainable copy, not a shared tensor).
    (The authors draw one latent sample per response token; here the head reads the latent the decoder used.)
    """

    def __init__(self, model: CVAELlamaForCausalLM):
        super().__init__()
        config = model.config
        lm_head = model.get_output_embeddings()
        self.to_hidden = nn.Sequential(nn.Linear(config.latent_size, config.hidden_size), nn.SiLU())
        self.to_vocab = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        with torch.no_grad():
            self.to_vocab.weight.copy_(lm_head.weight)
        self.to(device=lm_head.weight.device, dtype=lm_head.weight.dtype)

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return self.to_vocab(self.to_hidden(latent))


def _bag_of_words_hook(module: CVAELlamaForCausalLM, args, kwargs, output):
    # runs inside the model's forward, so that DDP, FSDP and DeepSpeed see the head as part of the model
    bow_head = getattr(module, "bow_head", None)
    if bow_head is not None and kwargs.get("labels") is not None and output.latent is not None:
        output["bow_logits"] = bow_head(output.latent)
    return output


def attach_bow_head(model: CVAELlamaForCausalLM) -> CVAEBagOfWordsHead:
    """Attach a [`CVAEBagOfWordsHead`] to `model` as `model.bow_head` (kept when one is already there).

    As a submodule of the model, the head is trained by the model's optimizer and saved in every checkpoint (and
    restored by `resume_from_checkpoint`); a forward hook makes every forward with `labels` also return
    `bow_logits` `(batch, vocab_size)` from the latent it used. A folder saved with the head loads with
    `from_pretrained` as a plain CVAE (the head's weights are reported as unexpected and dropped).
    """
    if getattr(model, "bow_head", None) is None:
        model.bow_head = CVAEBagOfWordsHead(model)
    if getattr(model, "_bow_hook", None) is None:
        model._bow_hook = model.register_forward_hook(_bag_of_words_hook, with_kwargs=True)
    return model.bow_head


def remove_bow_head(model: CVAELlamaForCausalLM) -> CVAELlamaForCausalLM:
    """Remove the bag-of-words head and its hook (a training-only module) before saving a plain CVAE."""
    if getattr(model, "_bow_hook", None) is not None:
        model._bow_hook.remove()
        model._bow_hook = None
    if getattr(model, "bow_head", None) is not None:
        del model.bow_head
    return model


def bag_of_words_nll(bow_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed NLL of the scored response tokens under the bag-of-words distribution of their row.

    Args:
        bow_logits (`torch.Tensor` of shape `(batch, vocab_size)`): the head's logits.
        labels (`torch.Tensor` of shape `(batch, sequence_length)`): as for the model (`-100` not scored); the
            tokens scored are `labels[:, 1:]`, those the shifted reconstruction scores.

    Returns:
        `torch.Tensor` of shape `()`: the sum over scored tokens (divide by their number for a token mean).
    """
    targets = labels[:, 1:]
    scored = targets != -100
    log_probs = torch.log_softmax(bow_logits.float(), dim=-1)  # (batch, vocab)
    token_log_probs = log_probs.gather(1, targets.clamp(min=0))  # (batch, sequence_length - 1)
    return -(token_log_probs * scored).sum()


__all__ = [
    "BETA_SCHEDULES",
    "OBJECTIVES",
    "REGULARISERS",
    "CVAEBagOfWordsHead",
    "MicroBatchPosterior",
    "attach_bow_head",
    "bag_of_words_nll",
    "constant_beta",
    "cyclical_beta",
    "cyclical_kl_weight",
    "density_gap_term",
    "free_bits_kl",
    "free_bits_term",
    "kl_term",
    "remove_bow_head",
]
