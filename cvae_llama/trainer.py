"""Training a CVAE-Llama: the objectives of Zhang et al. (IEEE TAI 2026) on one-to-many data, as a `Trainer`.

One training example is one **group**: a prompt `x` with `M` sampled responses `y_1 .. y_M` (METHOD.md, section 2).
The loss of a group is the reconstruction NLL of its responses given their posterior latents plus a regulariser on
its `M` posteriors:

- `"dg"` (the paper's): the density gap, a Monte-Carlo estimate of KL(aggregated posterior of the group || N(0, I)),
  per latent dimension ([`density_gap`]);
- `"kl"`: beta * KL(q || N(0, I)) (beta = `kl_weight`: 1 is the vanilla VAE, 0 the auto-encoder);
- `"free_bits"`: per-dimension max(KL_d, lambda) ([`free_bits_kl`]);
- `"cyclical"`: KL with the cyclical schedule of beta ([`cyclical_beta`]);
- `"optimus"`: cyclical schedule + free bits (the Optimus recipe);
- `"bow"`: KL + a bag-of-words loss from a head on z ([`CVAEBagOfWordsHead`]).

The pure functions (`gaussian_kl`, `free_bits_kl`, `cyclical_beta`, `density_gap`, `mutual_information`,
`active_units`) take `latent_mean`, `latent_logvar` of shape `(batch, latent_size)` and optional `group_ids` of shape
`(batch,)`; a regulariser is computed per group and averaged over the groups.

[`CVAETrainer`] normalises the loss over the whole optimizer step (every gradient-accumulation micro-batch and every
process): the reconstruction by the step's number of responses (the NLL summed over each response's tokens, as in
the ELBO and the authors' code) or of scored tokens (`reconstruction_reduction="token"`), the regulariser by the
step's number of groups. So 2 micro-batches of 1 group give the gradient of 1 batch of 2 groups, and
`torchrun --nproc_per_node 2` that of one process with the same global batch.
"""

import json
import math
import re
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

import pyarrow
import pyarrow.compute
import torch
from datasets import Dataset
from safetensors import safe_open
from torch import nn
from transformers import PreTrainedTokenizerBase, Trainer, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import logging

from . import modeling_cvae_llama
from .data import OneToManyCollator
from .modeling_cvae_llama import CVAELlamaForCausalLM, gaussian_kl


logger = logging.get_logger(__name__)

OBJECTIVES = ("dg", "kl", "free_bits", "cyclical", "optimus", "bow")
DG_GROUPINGS = ("auto", "group", "batch")
RECONSTRUCTION_REDUCTIONS = ("sequence", "token")
# The terms every training log carries (plus `bow_loss` with objective="bow").
LOGGED_TERMS = ("reconstruction_loss", "nll_per_token", "kl", "dg", "beta", "mutual_info", "active_units")
LOG_2PI = math.log(2 * math.pi)


# ---------------------------------------------------------------------------------------------------- pure functions
def _check_posterior(latent_mean: torch.Tensor, latent_logvar: torch.Tensor) -> None:
    if latent_mean.ndim != 2 or latent_mean.shape != latent_logvar.shape or latent_mean.shape[0] == 0:
        raise ValueError(
            f"latent_mean {tuple(latent_mean.shape)} and latent_logvar {tuple(latent_logvar.shape)} must both have "
            "shape (batch >= 1, latent_size)"
        )


def _groups(group_ids: torch.Tensor | None, batch_size: int, device: torch.device) -> list[torch.Tensor]:
    """Row indices of each group, in the order of the group ids: all rows form one group when `group_ids` is None."""
    if group_ids is None:
        return [torch.arange(batch_size, device=device)]
    if group_ids.shape != (batch_size,):
        raise ValueError(f"group_ids has shape {tuple(group_ids.shape)} but the posterior has {batch_size} rows")
    return [torch.nonzero(group_ids == group, as_tuple=True)[0] for group in torch.unique(group_ids)]


def _posterior_samples(latent_mean, latent_logvar, num_samples, latent_samples) -> torch.Tensor:
    """`latent_samples` checked, or `num_samples` reparameterised samples of the posterior: `(S, batch, d)`."""
    _check_posterior(latent_mean, latent_logvar)
    if latent_samples is None:
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
        return modeling_cvae_llama.reparameterize(latent_mean, latent_logvar, num_samples)
    if latent_samples.ndim != 3 or latent_samples.shape[1:] != latent_mean.shape:
        raise ValueError(
            f"latent_samples has shape {tuple(latent_samples.shape)} but the posterior expects "
            f"(num_samples, {latent_mean.shape[0]}, {latent_mean.shape[1]})"
        )
    return latent_samples


def _log_normal(value: torch.Tensor, mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """log N(value; mean, exp(logvar)) elementwise (broadcasting)."""
    return -0.5 * (LOG_2PI + logvar + (value - mean).pow(2) * torch.exp(-logvar))


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
    _check_posterior(latent_mean, latent_logvar)
    if not math.isfinite(free_bits) or free_bits < 0:
        raise ValueError(f"free_bits must be a finite number >= 0, got {free_bits!r}")
    kl = gaussian_kl(latent_mean, latent_logvar)  # (batch, d)
    per_group = [  # per group: average over its rows, clamp each dimension, sum over dimensions
        kl[rows].mean(dim=0).clamp(min=free_bits).sum() for rows in _groups(group_ids, kl.shape[0], kl.device)
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


def density_gap(
    latent_mean: torch.Tensor,
    latent_logvar: torch.Tensor,
    num_samples: int = 16,
    group_ids: torch.Tensor | None = None,
    latent_samples: torch.Tensor | None = None,
) -> torch.Tensor:
    """The density-gap regulariser R_DG (Zhang et al., DG-VAE, NeurIPS 2022; METHOD.md, section 2).

    For one group of `M` posteriors `q_j = N(mu_j, sigma_j^2)` (the responses of one prompt) and `S` samples
    `z_{i,s} ~ q_i` of each, per latent dimension `d`:

        R_DG = sum_d mean_{i, s} [ log( (1/M) sum_j N(z_{i,s,d}; mu_{j,d}, sigma_{j,d}^2) ) - log N(z_{i,s,d}; 0, 1) ]

    a Monte-Carlo estimate of sum_d KL(aggregated posterior of the group || N(0, 1)) in dimension d. The aggregate
    is a log-sum-exp over the group's `M` posteriors; the samples are reparameterised, so the gradient reaches
    `latent_mean` and `latent_logvar` through the samples and through the densities.

    Args:
        latent_mean, latent_logvar (`torch.Tensor` of shape `(batch, latent_size)`): the posteriors.
        num_samples (`int`, defaults to 16): `S`, samples per posterior (ignored when `latent_samples` is given).
        group_ids (`torch.Tensor` of shape `(batch,)`, *optional*):
            The group (prompt) of each row; the aggregate of a row is taken over its group only. When None, all
            rows form one group.
        latent_samples (`torch.Tensor` of shape `(num_samples, batch, latent_size)`, *optional*):
            The samples `z_{i,s}`; drawn with `reparameterize` when not given.

    Returns:
        `torch.Tensor` of shape `()`: **the mean over groups** of each group's R_DG (so a batch of groups of equal
        size gives the mean of the groups computed alone, and the loss of a batch does not grow with its size).
    """
    latent_samples = _posterior_samples(latent_mean, latent_logvar, num_samples, latent_samples)
    per_group = []
    for rows in _groups(group_ids, latent_mean.shape[0], latent_mean.device):
        samples = latent_samples[:, rows, None, :]  # (S, M_i, 1, d): z_{i,s}
        mean, logvar = latent_mean[rows], latent_logvar[rows]  # (M_j, d)
        log_q = _log_normal(samples, mean, logvar)  # (S, M_i, M_j, d): log N(z_{i,s,d}; mu_{j,d}, sigma_{j,d}^2)
        log_aggregate = torch.logsumexp(log_q, dim=2) - math.log(len(rows))  # (S, M, d)
        log_prior = _log_normal(samples[:, :, 0], torch.zeros_like(mean[0]), torch.zeros_like(logvar[0]))
        per_group.append((log_aggregate - log_prior).mean(dim=(0, 1)).sum())
    return torch.stack(per_group).mean()


def mutual_information(
    latent_mean: torch.Tensor,
    latent_logvar: torch.Tensor,
    group_ids: torch.Tensor | None = None,
    num_samples: int = 8,
    latent_samples: torch.Tensor | None = None,
) -> torch.Tensor:
    """A cheap estimate of the mutual information I(y; z | x) inside each group, for logging.

    With the group's aggregated posterior `q(z) = (1/M) sum_j q_j(z)`, I = mean_i KL(q_i || q): the estimator of
    Hoffman & Johnson (2016) and He et al. (2019), here with `S` samples `z_{i,s} ~ q_i`:

        I = mean_{i, s} [ log q_i(z_{i,s}) - log( (1/M) sum_j q_j(z_{i,s}) ) ]

    Every term is at most log M (a group of M responses carries at most log M nats about which one it is), and the
    estimate is 0 when the group's posteriors coincide.

    Args:
        latent_mean, latent_logvar (`torch.Tensor` of shape `(batch, latent_size)`): the posteriors.
        group_ids (`torch.Tensor` of shape `(batch,)`, *optional*): the group of each row; one group when None.
        num_samples (`int`, defaults to 8): `S` (ignored when `latent_samples` is given).
        latent_samples (`torch.Tensor` of shape `(num_samples, batch, latent_size)`, *optional*): the `z_{i,s}`.

    Returns:
        `torch.Tensor` of shape `()`: the mean over groups, in nats.
    """
    latent_samples = _posterior_samples(latent_mean, latent_logvar, num_samples, latent_samples)
    per_group = []
    for rows in _groups(group_ids, latent_mean.shape[0], latent_mean.device):
        samples = latent_samples[:, rows, None, :]  # (S, M_i, 1, d)
        log_q = _log_normal(samples, latent_mean[rows], latent_logvar[rows]).sum(-1)  # (S, M_i, M_j): log q_j(z_i,s)
        log_own = log_q.diagonal(dim1=1, dim2=2)  # (S, M): log q_i(z_{i,s})
        log_aggregate = torch.logsumexp(log_q, dim=2) - math.log(len(rows))  # (S, M)
        per_group.append((log_own - log_aggregate).mean())
    return torch.stack(per_group).mean()


def active_units(
    latent_mean: torch.Tensor,
    group_ids: torch.Tensor | None = None,
    threshold: float = 0.01,
) -> torch.Tensor:
    """Active units (Burda et al., 2016) inside each group: the number of latent dimensions whose posterior mean
    varies across the group's responses, `Var_i(mu_{i,d}) > threshold`.

    Args:
        latent_mean (`torch.Tensor` of shape `(batch, latent_size)`): the posterior means.
        group_ids (`torch.Tensor` of shape `(batch,)`, *optional*): the group of each row; one group when None.
        threshold (`float`, defaults to 0.01): the variance above which a dimension is active.

    Returns:
        `torch.Tensor` of shape `()`: the mean over groups of the count (a group of one row has none).
    """
    if latent_mean.ndim != 2 or latent_mean.shape[0] == 0:
        raise ValueError(f"latent_mean has shape {tuple(latent_mean.shape)}, expected (batch >= 1, latent_size)")
    counts = [
        (latent_mean[rows].var(dim=0, unbiased=False) > threshold).sum().to(latent_mean.dtype)
        for rows in _groups(group_ids, latent_mean.shape[0], latent_mean.device)
    ]
    return torch.stack(counts).mean()


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


# ---------------------------------------------------------------------------------------------------- LoRA
def _is_peft_model(model) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def _unwrap_cvae(model) -> CVAELlamaForCausalLM:
    """The `CVAELlamaForCausalLM` inside `model` (itself, or the base model of a `PeftModel`)."""
    base = model.get_base_model() if _is_peft_model(model) else model
    if not isinstance(base, CVAELlamaForCausalLM):
        raise ValueError(
            f"model must be a CVAELlamaForCausalLM (or a PeftModel of one), got {type(model).__name__}"
            + (f" wrapping {type(base).__name__}" if base is not model else "")
        )
    return base


def _canonical_name(peft_parameter_name: str) -> str:
    """`base_model.model.encoder.modules_to_save.default.layers.0...` -> `encoder.layers.0...` (the CVAE's name)."""
    name = peft_parameter_name.removeprefix("base_model.model.")
    return re.sub(r"\.(modules_to_save\.[^.]+|original_module|base_layer)(?=\.)", "", name)


def cvae_modules_to_save(model: CVAELlamaForCausalLM) -> list[str]:
    """The CVAE's own modules that LoRA mode trains fully (and saves with the adapter): the posterior encoder (its
    embedding copy stays frozen), each memory layer's MLP and norm (its key/value copies stay frozen), the
    embedding injection, the skip connection and the bag-of-words head, those the model has."""
    names = ["encoder"]
    if model.latent_memory is not None:
        for index in range(len(model.latent_memory.layers)):
            names += [f"latent_memory.layers.{index}.to_states", f"latent_memory.layers.{index}.norm"]
    for name in ("latent_to_embedding", "latent_skip", "bow_head"):
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

    LoRA targets only the decoder's layers, `model.layers.<i>.*.<target>` (a regular expression, so the encoder's
    copies of the first layers and the memory's key/value copies get no adapter). The CVAE's own modules
    ([`cvae_modules_to_save`]) become `modules_to_save`: trained in full and saved in the adapter file, so that a
    checkpoint holds everything that trains. The parameters that `decoder_mode` freezes (the LLM, the encoder's
    embedding copy, the memory's attention copies) stay frozen. `merge_and_unload()` on the result gives back a
    plain [`CVAELlamaForCausalLM`] with the adapters merged into the decoder, which `save_pretrained` writes as a
    normal folder.

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
    from peft import LoraConfig, get_peft_model

    if _is_peft_model(model):
        raise ValueError("model is already a PeftModel; apply_lora expects a plain CVAELlamaForCausalLM")
    _unwrap_cvae(model)
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
        name.rsplit(".", 1)[-1]
        for name, module in model.model.layers.named_modules()
        if isinstance(module, nn.Linear)
    }
    unknown = sorted(set(target_modules) - decoder_linear_names)
    if unknown:
        raise ValueError(
            f"target_modules {unknown} are not linear layers of the decoder; expected names among "
            f"{sorted(decoder_linear_names)}"
        )

    model.config.decoder_mode = "lora"
    model.apply_decoder_mode()
    frozen = model.frozen_parameter_names()
    # only the decoder's layers: `model.layers.<i>.<...>.<name>`, matched in full by peft
    pattern = r"model\.layers\.\d+\.(?:.*\.)?(?:" + "|".join(re.escape(name) for name in target_modules) + r")"
    lora_config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=pattern,
        modules_to_save=cvae_modules_to_save(model),
        bias="none",
    )
    peft_model = get_peft_model(model, lora_config)
    for name, parameter in peft_model.named_parameters():
        # the saved copies of the CVAE's modules are trained in full except what decoder_mode freezes
        if _canonical_name(name) in frozen and ".lora_" not in name:
            parameter.requires_grad_(False)
    return peft_model


def pretrained_parameter_names(model) -> set[str]:
    """Names (as `model.named_parameters()` gives them, a `PeftModel`'s included) of the trainable parameters that
    start as copies of the LLM's weights: the encoder's copied layers, and the decoder (`model.*`, `lm_head.*`) when
    it trains. LoRA adapters and the CVAE's new modules are not among them."""
    names = set()
    for name, parameter in model.named_parameters():
        canonical = _canonical_name(name)
        if not parameter.requires_grad or ".lora_" in name:
            continue
        if canonical.startswith(("encoder.layers.", "model.", "lm_head.")):
            names.add(name)
    return names


# ---------------------------------------------------------------------------------------------------- arguments
@dataclass
class CVAETrainingArguments(TrainingArguments):
    r"""
    [`TrainingArguments`] plus the objective of the CVAE (all visible to `HfArgumentParser`, like TRL's `SFTConfig`).

    One training example is one group (a prompt with its `M` responses): `per_device_train_batch_size` counts groups.

    The optimisation defaults differ from `TrainingArguments`' (measured in `experiments/README.md`): AdamW at
    `learning_rate=1e-3` for the CVAE's new modules, `adam_beta2=0.95` and a 10 % warm-up, then constant (the
    paper's schedule); the weights copied from the LLM train at `pretrained_learning_rate`. At `TrainingArguments`'
    5e-5 with a linear decay the latent learned 0.02 nats about a Yelp sentence in 300 steps.

    Args:
        objective (`str`, defaults to `"dg"`):
            The regulariser: `"dg"` (density gap, the paper's), `"kl"` (beta * KL), `"free_bits"`, `"cyclical"`
            (KL with the cyclical schedule of beta), `"optimus"` (cyclical + free bits), `"bow"` (KL + bag of words).
        kl_weight (`float`, defaults to 1.0):
            beta, the weight of the regulariser for every objective (the top of the schedule for `"cyclical"` and
            `"optimus"`); 0 trains an auto-encoder.
        free_bits (`float`, defaults to 0.5):
            lambda of `"free_bits"` and `"optimus"`, in nats per latent dimension.
        num_cycles (`int`, defaults to 4), cycle_zero_fraction (`float`, defaults to 0.5), cycle_ramp_end (`float`,
            defaults to 0.75):
            The cyclical schedule: per cycle beta is 0 until `cycle_zero_fraction`, linear to 1 at `cycle_ramp_end`.
        dg_samples (`int`, defaults to 16):
            Samples per posterior in the density gap.
        dg_grouping (`str`, defaults to `"auto"`):
            What the density gap aggregates: `"group"` (the responses of one prompt, the paper's), `"batch"` (all
            rows of a micro-batch as one group: a plain VAE over unconditional text, every row its own example) or
            `"auto"`: `"group"` when the training data have groups of at least 2 responses, else `"batch"`.
        bow_weight (`float`, defaults to 1.0):
            Weight of the bag-of-words loss of `"bow"` (a token-level mean, as in the authors' code).
        reconstruction_reduction (`str`, defaults to `"sequence"`):
            `"sequence"`: the NLL of each response summed over its tokens, averaged over the step's responses: the
            ELBO's reconstruction term, and what the authors' code does (`cross_entropy(...).sum(-1).mean()`).
            `"token"`: the token-level mean over the step, as the `Trainer` does for causal LMs; the regulariser
            (a sum over latent dimensions per group) then weighs about one response length more, which collapses
            the posterior much sooner.
        max_prompt_tokens (`int`, defaults to 256), max_response_tokens (`int`, defaults to 128):
            Token budgets of the default collator (`OneToManyCollator`): the prompt is left-truncated, the response
            truncated.
        pretrained_learning_rate (`float`, *optional*):
            Learning rate of the trained weights that start as copies of the LLM's ([`pretrained_parameter_names`]:
            the encoder's layers, and the decoder itself with `decoder_mode="full"`), in an optimizer parameter group of
            their own; the CVAE's new modules (read-out, memory MLPs, skip, LoRA adapters) use `learning_rate`. The
            schedule scales both alike. Default: `learning_rate` for all.
        lora_r, lora_alpha, lora_dropout, lora_target_modules:
            LoRA's settings when the model's `decoder_mode` is `"lora"` (see [`apply_lora`]).
        active_units_threshold (`float`, defaults to 0.01):
            Variance of a posterior mean across a group above which a latent dimension counts as active (logged).
        remove_unused_columns (`bool`, defaults to `False`):
            Must stay `False` with the default collator, which reads the text columns.
        ddp_find_unused_parameters (`bool`, defaults to `False`):
            Every trainable parameter gets a gradient at every step: DDP needs no search for unused ones.
        prediction_loss_only (`bool`, defaults to `True`):
            `evaluate()` returns the objective (`eval_loss`) without gathering every row's logits.

    Example:

    ```python
    >>> from transformers import HfArgumentParser
    >>> (args,) = HfArgumentParser(CVAETrainingArguments).parse_args_into_dataclasses(
    ...     ["--output_dir", "out", "--objective", "kl", "--kl_weight", "0.5"])
    ```
    """

    learning_rate: float = field(
        default=1e-3, metadata={"help": "Learning rate of the CVAE's new modules (see pretrained_learning_rate)."}
    )
    lr_scheduler_type: str = field(default="constant_with_warmup", metadata={"help": "The learning-rate schedule."})
    warmup_steps: float = field(
        default=0.1, metadata={"help": "Linear warm-up: steps, or a fraction of the run when < 1 (the paper: 0.1)."}
    )
    adam_beta2: float = field(default=0.95, metadata={"help": "AdamW's beta2 (the paper: 0.95)."})
    objective: str = field(default="dg", metadata={"help": "The regulariser.", "choices": list(OBJECTIVES)})
    kl_weight: float = field(default=1.0, metadata={"help": "beta: weight of the regulariser (0 = auto-encoder)."})
    free_bits: float = field(default=0.5, metadata={"help": "lambda of free bits, nats per latent dimension."})
    num_cycles: int = field(default=4, metadata={"help": "Cycles of the cyclical schedule of beta."})
    cycle_zero_fraction: float = field(default=0.5, metadata={"help": "Fraction of a cycle with beta = 0."})
    cycle_ramp_end: float = field(default=0.75, metadata={"help": "Fraction of a cycle where beta reaches 1."})
    dg_samples: int = field(default=16, metadata={"help": "Samples per posterior in the density gap."})
    dg_grouping: str = field(
        default="auto",
        metadata={
            "help": "Density gap over each prompt's responses ('group'), over the batch ('batch'), or 'auto': group "
            "when the data have groups of >= 2 responses, else batch.",
            "choices": list(DG_GROUPINGS),
        },
    )
    bow_weight: float = field(default=1.0, metadata={"help": "Weight of the bag-of-words loss (objective bow)."})
    reconstruction_reduction: str = field(
        default="sequence",
        metadata={
            "help": "Reconstruction NLL summed over each response's tokens ('sequence', the ELBO and the paper's "
            "code) or averaged over tokens ('token').",
            "choices": list(RECONSTRUCTION_REDUCTIONS),
        },
    )
    max_prompt_tokens: int = field(default=256, metadata={"help": "Prompt token budget (left-truncated)."})
    max_response_tokens: int = field(default=128, metadata={"help": "Response token budget (truncated)."})
    pretrained_learning_rate: float | None = field(
        default=None,
        metadata={
            "help": "Learning rate of the weights copied from the LLM that train (the encoder's layers; the decoder "
            "with decoder_mode full); default: learning_rate."
        },
    )
    lora_r: int = field(default=8, metadata={"help": "LoRA rank (decoder_mode lora)."})
    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA alpha (decoder_mode lora)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout (decoder_mode lora)."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        metadata={"help": "Decoder linear layers that get LoRA adapters (decoder_mode lora)."},
    )
    active_units_threshold: float = field(default=0.01, metadata={"help": "Variance threshold of an active unit."})
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Keep False: the one-to-many collator reads the text columns."}
    )
    ddp_find_unused_parameters: bool | None = field(
        default=False, metadata={"help": "Passed to DistributedDataParallel; every trainable parameter is used."}
    )
    prediction_loss_only: bool = field(
        default=True, metadata={"help": "Evaluation returns the loss only (not every row's logits)."}
    )

    def __post_init__(self):
        self._validate_cvae_fields()
        super().__post_init__()

    def _validate_cvae_fields(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(f"`objective` must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.dg_grouping not in DG_GROUPINGS:
            raise ValueError(f"`dg_grouping` must be one of {DG_GROUPINGS}, got {self.dg_grouping!r}")
        if self.reconstruction_reduction not in RECONSTRUCTION_REDUCTIONS:
            raise ValueError(
                f"`reconstruction_reduction` must be one of {RECONSTRUCTION_REDUCTIONS}, got "
                f"{self.reconstruction_reduction!r}"
            )
        for name in ("kl_weight", "free_bits", "bow_weight", "lora_dropout", "active_units_threshold"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"`{name}` must be a finite number >= 0, got {value!r}")
        for name in ("num_cycles", "dg_samples", "max_prompt_tokens", "max_response_tokens", "lora_r"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}")
        if not 0.0 <= self.cycle_zero_fraction <= self.cycle_ramp_end <= 1.0:
            raise ValueError(
                "the cyclical schedule needs 0 <= `cycle_zero_fraction` <= `cycle_ramp_end` <= 1, got "
                f"cycle_zero_fraction={self.cycle_zero_fraction!r} and cycle_ramp_end={self.cycle_ramp_end!r}"
            )
        if not self.lora_alpha > 0:
            raise ValueError(f"`lora_alpha` must be > 0, got {self.lora_alpha!r}")
        if self.lora_dropout >= 1:
            raise ValueError(f"`lora_dropout` must be in [0, 1), got {self.lora_dropout!r}")
        for name in ("learning_rate", "weight_decay", "max_grad_norm", "pretrained_learning_rate"):
            value = getattr(self, name)
            if value is not None and (not math.isfinite(value) or value < 0):
                raise ValueError(f"`{name}` must be a finite number >= 0, got {value!r}")
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}")


def check_checkpoint(checkpoint: str | Path, args: TrainingArguments, sharded: bool = False) -> None:
    """Raise `ValueError` naming the folder and the file unless `checkpoint` is a complete Trainer checkpoint.

    The Trainer writes the weights, the optimizer, scheduler and RNG states, then `trainer_state.json` last, in place:
    a run killed while saving leaves a folder that the Trainer would load in part (a missing optimizer state is
    silently replaced by a fresh one) or fail on with an error that names no file.
    """
    folder = Path(checkpoint)

    def refuse(problem: str):
        raise ValueError(
            f"resume_from_checkpoint={str(folder)!r} is not a complete checkpoint: {problem}. A run killed while "
            "saving leaves such a folder: resume from an earlier checkpoint, or delete this one"
        )

    if not folder.is_dir():
        refuse("no such folder")
    try:
        json.loads((folder / "trainer_state.json").read_text(encoding="utf-8"))["global_step"]
    except FileNotFoundError:
        refuse("trainer_state.json is missing (the Trainer writes it last)")
    except (ValueError, KeyError, TypeError) as error:
        refuse(f"trainer_state.json is truncated or corrupted ({type(error).__name__}: {error})")
    if not sharded:
        for index in folder.glob("*.safetensors.index.json"):
            shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
            if missing := sorted(name for name in shards if not (folder / name).is_file()):
                refuse(f"{missing} listed in {index.name} are missing")
        weights = sorted(folder.glob("*.safetensors"))
        if not weights:
            refuse("model.safetensors (or adapter_model.safetensors) is missing")
        for file in weights:  # the header must describe the whole file: a truncated one fails here
            try:
                with safe_open(str(file), framework="pt"):
                    pass
            except Exception as error:  # safetensors raises its own error types
                refuse(f"{file.name} is truncated or corrupted ({error})")
    states = [] if args.save_only_model or sharded else ["optimizer.pt", "scheduler.pt"]
    states.append("rng_state.pth" if args.world_size <= 1 else f"rng_state_{args.process_index}.pth")
    for name in states:  # torch.save files are zip archives whose directory is written last
        if not (folder / name).is_file():
            refuse(f"{name} is missing (the Trainer would start a fresh one in silence)")
        try:
            zipfile.ZipFile(folder / name).close()
        except (zipfile.BadZipFile, OSError) as error:
            refuse(f"{name} is truncated or corrupted ({error})")


def _is_complete(checkpoint: Path, args: TrainingArguments, sharded: bool) -> bool:
    try:
        check_checkpoint(checkpoint, args, sharded)
    except ValueError:
        return False
    return True


def _response_counts(dataset):
    """Responses per row (a pyarrow array) of a `datasets.Dataset` whose `responses` column holds lists; else None."""
    if not isinstance(dataset, Dataset) or "responses" not in dataset.column_names:
        return None
    column_type = dataset.data.schema.field("responses").type
    if not (pyarrow.types.is_list(column_type) or pyarrow.types.is_large_list(column_type)):
        return None
    return pyarrow.compute.list_value_length(dataset.with_format("arrow")["responses"])


# ---------------------------------------------------------------------------------------------------- trainer
class CVAETrainer(Trainer):
    r"""
    A [`Trainer`] for [`CVAELlamaForCausalLM`] on one-to-many data, with every objective of the paper.

    The loss of a step is `reconstruction + beta * regulariser (+ bow_weight * bag-of-words)`:

    - reconstruction: the NLL of the response tokens (labels not -100) given `x` and one reparameterised
      `z ~ q(z | x, y)` (the model's posterior of `input_ids`; the model applies G-Skip itself): summed over each
      response's tokens and averaged over the step's responses (`reconstruction_reduction="sequence"`, the
      paper's), or a token-level mean (`"token"`), over the whole optimizer step (all accumulation micro-batches
      and processes);
    - regulariser: computed per group (the rows of one prompt, `group_ids` from the collator) and averaged over the
      step's groups (with `dg_grouping="batch"`, one group per micro-batch).

    Every term is logged with the `Trainer`'s logs (`trainer_state.json`'s `log_history`, the progress bar and any
    `report_to`): `reconstruction_loss` (the objective's term), `nll_per_token`, `kl` (sum over dimensions of KL to
    N(0, I), mean over rows), `dg`, `beta`, `mutual_info`, `active_units` (per group, averaged), and `bow_loss` with
    `objective="bow"`: each is the mean over the optimizer steps since the last log. `dg`, `mutual_info` and
    `active_units` are computed whatever the objective (without gradient when it is not theirs).

    Multi-GPU, FSDP and DeepSpeed: launch as any `Trainer` script (`torchrun`, `accelerate launch`); the step's
    totals are gathered across processes (`average_tokens_across_devices`, on by default). One process driving
    several GPUs (torch `DataParallel`) is refused.

    Before the first step the training data are checked (columns, a first collated batch, group sizes): bad data
    raise a `ValueError` instead of giving a NaN loss.

    When `model.config.decoder_mode == "lora"` and `model` is not a `PeftModel` yet, the trainer wraps it with
    [`apply_lora`] (settings from `args.lora_*`); with `objective="bow"` it attaches the bag-of-words head first
    (`model.bow_head`).

    Args:
        model ([`CVAELlamaForCausalLM`] or a `PeftModel` of one): the CVAE.
        args ([`CVAETrainingArguments`]): the training arguments and the objective.
        data_collator (*optional*): defaults to `OneToManyCollator(processing_class, args.max_prompt_tokens,
            args.max_response_tokens)` over grouped rows `{prompt, responses[, label]}`; any collator that returns
            `input_ids`, `attention_mask`, `labels` and `group_ids` works.
        train_dataset, eval_dataset, processing_class, **kwargs: as for [`Trainer`].

    Example:

    ```python
    >>> from cvae_llama.data import group_responses
    >>> model = CVAELlamaForCausalLM.from_llm("HuggingFaceTB/SmolLM2-135M-Instruct")  # decoder frozen, G-Skip
    >>> args = CVAETrainingArguments(output_dir="out", per_device_train_batch_size=1, max_steps=100)
    >>> trainer = CVAETrainer(model, args, train_dataset=group_responses(flat_rows, 16), processing_class=tokenizer)
    >>> trainer.train()
    >>> trainer.state.log_history[-2]["dg"]  # every term is in the logs
    ```
    """

    # compute_loss normalises by the whole optimizer step itself (see `get_batch_samples`)
    loss_is_scaled_for_ga = True

    def __init__(
        self,
        model: CVAELlamaForCausalLM | None = None,
        args: CVAETrainingArguments | None = None,
        data_collator=None,
        train_dataset=None,
        eval_dataset=None,
        processing_class: PreTrainedTokenizerBase | None = None,
        **kwargs,
    ):
        if args is None:
            args = CVAETrainingArguments()
        if not isinstance(args, CVAETrainingArguments):
            raise ValueError(f"args must be a CVAETrainingArguments, got {type(args).__name__}")
        if model is None:
            raise ValueError("CVAETrainer needs a model (a CVAELlamaForCausalLM); model_init is not supported")
        cvae = _unwrap_cvae(model)
        if cvae.config.decoder_mode == "full" and args.pretrained_learning_rate is None:
            logger.warning(
                "decoder_mode='full' trains the LLM at learning_rate=%g, the rate of the CVAE's new modules; the "
                "authors train it at 1e-5: set pretrained_learning_rate (e.g. 1e-5) to keep the LLM intact",
                args.learning_rate,
            )
        if args.objective == "bow":
            if _is_peft_model(model) and getattr(cvae, "bow_head", None) is None:
                raise ValueError(
                    "objective='bow' needs the bag-of-words head among the adapter's saved modules: pass the plain "
                    "CVAELlamaForCausalLM with decoder_mode='lora' and let the trainer apply LoRA"
                )
            attach_bow_head(cvae)
        if cvae.config.decoder_mode == "lora" and not _is_peft_model(model):
            model = apply_lora(
                model,
                r=args.lora_r,
                alpha=args.lora_alpha,
                target_modules=tuple(args.lora_target_modules),
                dropout=args.lora_dropout,
            )
        if data_collator is None:
            if processing_class is None:
                raise ValueError(
                    "CVAETrainer needs a data_collator, or a processing_class (the tokenizer) for the default "
                    "OneToManyCollator"
                )
            data_collator = OneToManyCollator(processing_class, args.max_prompt_tokens, args.max_response_tokens)
        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            **kwargs,
        )
        if self.args.n_gpu > 1:
            raise ValueError(
                f"CVAETrainer does not support torch DataParallel (n_gpu={self.args.n_gpu} in one process); launch "
                "one process per GPU with torchrun or accelerate launch"
            )
        self._step_counts: torch.Tensor | None = None  # (scored tokens, groups, regulariser units) of the step
        self._term_sums: dict[str, torch.Tensor] = {}
        self._terms_logged_step = 0
        self.dg_grouping = self._resolve_dg_grouping(train_dataset)  # what DG aggregates: "group" or "batch"
        if train_dataset is not None:
            self._validate_train_dataset(train_dataset)

    def create_optimizer(self, model=None):
        """The `Trainer`'s optimizer, with the LLM's copied weights in parameter groups of their own at
        `pretrained_learning_rate` (when it is set)."""
        optimizer = super().create_optimizer(model)
        rate = self.args.pretrained_learning_rate
        if rate is None or getattr(optimizer, "_cvae_pretrained_groups", False):
            return optimizer
        model = self.model if model is None else model
        pretrained = {id(p) for name, p in model.named_parameters() if name in pretrained_parameter_names(model)}
        groups = []
        for group in optimizer.param_groups:
            params = group.pop("params")
            for subset, lr in (
                ([p for p in params if id(p) not in pretrained], group["lr"]),
                ([p for p in params if id(p) in pretrained], rate),
            ):
                if subset:
                    groups.append({**group, "params": subset, "lr": lr})
        optimizer.param_groups.clear()
        for group in groups:
            optimizer.add_param_group(group)
        optimizer._cvae_pretrained_groups = True
        return optimizer

    # ------------------------------------------------------------------------------------------ validation
    def train(self, resume_from_checkpoint=None, trial=None, ignore_keys_for_eval=None, **kwargs):
        """`Trainer.train`, refusing an incomplete checkpoint (see [`check_checkpoint`]) before anything is loaded."""
        sharded = self.is_deepspeed_enabled or self.is_fsdp_enabled
        if resume_from_checkpoint is True:
            output_dir = Path(self.args.output_dir)
            found = output_dir.glob(f"{PREFIX_CHECKPOINT_DIR}-*") if output_dir.is_dir() else []
            checkpoints = sorted(
                (path for path in found if path.is_dir() and path.name.rsplit("-", 1)[-1].isdigit()),
                key=lambda path: int(path.name.rsplit("-", 1)[-1]),
                reverse=True,
            )
            if not checkpoints:
                raise ValueError(f"resume_from_checkpoint=True but output_dir={str(output_dir)!r} has no checkpoint")
            try:
                check_checkpoint(checkpoints[0], self.args, sharded)
            except ValueError as error:
                complete = next((path for path in checkpoints[1:] if _is_complete(path, self.args, sharded)), None)
                hint = f"; the newest complete one is {str(complete)!r}" if complete else "; no complete one is left"
                raise ValueError(f"{error}{hint}") from None
            resume_from_checkpoint = str(checkpoints[0])
        elif resume_from_checkpoint not in (None, False):
            check_checkpoint(resume_from_checkpoint, self.args, sharded)
        return super().train(
            resume_from_checkpoint=resume_from_checkpoint, trial=trial, ignore_keys_for_eval=ignore_keys_for_eval, **kwargs
        )

    def _resolve_dg_grouping(self, dataset) -> str:
        """`args.dg_grouping`, with `"auto"` resolved from the training data: `"group"` when they hold groups of at
        least 2 responses (a `responses` column, or rows that the collator batches into such groups), else
        `"batch"` (unconditional text or flat rows: every row its own example)."""
        if self.args.dg_grouping != "auto":
            return self.args.dg_grouping
        if dataset is None:
            return "group"
        sizes = _response_counts(dataset)
        if sizes is not None:
            return "group" if (pyarrow.compute.max(sizes).as_py() or 0) >= 2 else "batch"
        try:
            batch = self.data_collator(list(islice(iter(dataset), self.args.per_device_train_batch_size)))
        except Exception:  # bad data: _validate_train_dataset says what is wrong
            return "group"
        group_ids = batch.get("group_ids") if hasattr(batch, "get") else None  # a dict or a BatchEncoding
        if group_ids is None:
            return "group"
        return "group" if int(torch.bincount(group_ids).max()) >= 2 else "batch"

    def _validate_train_dataset(self, dataset) -> None:
        """Check the training data before the first step: columns, a collated first batch, group sizes."""
        args = self.args
        needs_groups = args.objective == "dg" and self.dg_grouping == "group"
        if hasattr(dataset, "__len__") and len(dataset) == 0:
            raise ValueError("train_dataset is empty: it needs at least one group (a prompt with its responses)")
        columns = getattr(dataset, "column_names", None)
        if isinstance(self.data_collator, OneToManyCollator) and columns is not None:
            if "prompt" not in columns or not {"responses", "response"} & set(columns):
                raise ValueError(
                    f"train_dataset has the columns {columns} but the OneToManyCollator needs 'prompt' and "
                    "'responses' (grouped rows {prompt, responses[, label]}, see cvae_llama.data.group_responses)"
                )
            if args.remove_unused_columns:
                raise ValueError(
                    "remove_unused_columns=True would drop the text columns the OneToManyCollator reads; set "
                    "`remove_unused_columns=False` (the CVAETrainingArguments default)"
                )
            if needs_groups and "responses" not in columns:
                raise ValueError(
                    f"objective='dg' aggregates the posteriors of each prompt's responses, but train_dataset has flat "
                    f"rows (columns {columns}): every group would have 1 response; group them with "
                    "cvae_llama.data.group_responses(dataset, group_size >= 2), or set dg_grouping='batch'"
                )
        sizes = _response_counts(dataset)
        if sizes is None and isinstance(dataset, Dataset) and "responses" in dataset.column_names:
            raise ValueError(
                f"train_dataset's 'responses' column holds {dataset.data.schema.field('responses').type} values; "
                "expected a list of strings per row (the responses of one prompt, see cvae_llama.data.group_responses)"
            )
        if needs_groups and sizes is not None:
            smallest = pyarrow.compute.min(sizes).as_py()
            if smallest is None or smallest < 2:
                row = pyarrow.compute.index(sizes, smallest).as_py() if smallest is not None else 0
                raise ValueError(
                    f"objective='dg' aggregates the posteriors of each prompt's responses, but row {row} of "
                    f"train_dataset has {smallest or 0} response(s); expected at least 2 per group (or set "
                    "dg_grouping='batch')"
                )

        examples = list(islice(iter(dataset), args.per_device_train_batch_size))
        try:
            batch = self.data_collator(examples)
        except (KeyError, TypeError) as error:
            raise ValueError(
                f"the data collator could not build a batch from train_dataset's first rows (columns {columns}): "
                f"{error!r}"
            ) from error
        missing = [key for key in ("input_ids", "attention_mask", "labels") if key not in batch]
        if missing:
            raise ValueError(f"the data collator's batch lacks {missing}; it has {sorted(batch.keys())}")
        if not (batch["labels"][..., 1:] != -100).any():
            raise ValueError(
                "every label of the first training batch is -100: no response token would be scored (check the "
                "token budgets max_prompt_tokens / max_response_tokens and that the responses are not empty)"
            )
        if args.objective == "dg":
            rows = batch["input_ids"].shape[0]
            if self.dg_grouping == "batch":
                if rows < 2:
                    raise ValueError(
                        f"objective='dg' with dg_grouping='batch' aggregates the rows of a batch, but a batch has "
                        f"{rows} row; expected at least 2"
                    )
            else:
                group_ids = batch.get("group_ids")
                sizes = torch.bincount(group_ids) if group_ids is not None else torch.tensor([rows])
                sizes = sizes[sizes > 0]
                if sizes.min() < 2:
                    raise ValueError(
                        "objective='dg' aggregates the posteriors of each prompt's responses, but the first batch "
                        f"has a group of {int(sizes.min())} row; expected groups of at least 2 responses (or set "
                        "dg_grouping='batch')"
                    )

    # ------------------------------------------------------------------------------------------ step bookkeeping
    def _units(self, batch: dict) -> tuple[int, int]:
        """(groups, regulariser units) of a micro-batch: units are groups, or 1 with dg_grouping='batch'."""
        group_ids = batch.get("group_ids")
        groups = int(torch.unique(group_ids).numel()) if group_ids is not None else 1
        units = 1 if self.args.objective == "dg" and self.dg_grouping == "batch" else groups
        return groups, units

    def get_batch_samples(
        self, epoch_iterator: Iterator, num_batches: int, device: torch.device
    ) -> tuple[list, torch.Tensor | None]:
        """Fetch the micro-batches of one optimizer step and count, over all of them (and all processes when
        `average_tokens_across_devices`), the scored tokens (returned as `num_items_in_batch`), the responses, the
        groups and the regulariser units: `compute_loss` divides by these totals, which makes the step's loss exact
        under gradient accumulation and data parallelism."""
        batch_samples = list(islice(epoch_iterator, num_batches))
        if not batch_samples:
            self._step_counts = None
            return batch_samples, None
        counts = torch.zeros(4, dtype=torch.long)  # scored tokens, responses (rows), groups, regulariser units
        for batch in batch_samples:
            counts[0] += int((batch["labels"][..., 1:] != -100).sum())
            counts[1] += batch["labels"].shape[0]
            counts[2:] += torch.tensor(self._units(batch))
        counts = counts.to(device)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            counts = self.accelerator.gather(counts[None]).sum(dim=0)
        if counts[0] == 0:
            raise ValueError(
                f"no response token is scored in optimizer step {self.state.global_step} (every label is -100): the "
                "reconstruction loss would be 0/0; check the token budgets and the responses"
            )
        self._step_counts = counts
        return batch_samples, counts[0]

    def _accumulate_terms(self, terms: dict[str, torch.Tensor]) -> None:
        for key, value in terms.items():
            value = value.detach().float()
            self._term_sums[key] = self._term_sums[key] + value if key in self._term_sums else value

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the mean of every loss term since the last training log to a training log (one with `loss`)."""
        if "loss" in logs and self._term_sums:
            steps = max(self.state.global_step - self._terms_logged_step, 1)
            keys = list(self._term_sums)
            values = torch.stack([self._term_sums[key] for key in keys])
            if self.args.world_size > 1:
                # each process holds its share of the step's totals (shares of global counts: sum them)
                reduction = "sum" if self.args.average_tokens_across_devices else "mean"
                values = self.accelerator.reduce(values, reduction=reduction)
            logs.update({key: value / steps for key, value in zip(keys, values.tolist())})
            self._term_sums = {}
            self._terms_logged_step = self.state.global_step
        super().log(logs, start_time)

    # ------------------------------------------------------------------------------------------ the loss
    def current_beta(self) -> float:
        """beta of the current step: `kl_weight`, times the cyclical schedule for "cyclical" and "optimus"."""
        args = self.args
        if args.objective in ("cyclical", "optimus"):
            total_steps = max(self.state.max_steps, 1)
            schedule = cyclical_beta(
                self.state.global_step, total_steps, args.num_cycles, args.cycle_zero_fraction, args.cycle_ramp_end
            )
            return args.kl_weight * schedule
        return args.kl_weight

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ):
        """reconstruction + beta * regulariser (+ bow_weight * bag-of-words) of a micro-batch, as its share of the
        optimizer step's loss (see the class docstring)."""
        args = self.args
        inputs = dict(inputs)
        group_ids = inputs.pop("group_ids", None)
        inputs.pop("class_labels", None)  # the topic / dialogue act: for evaluation, not part of the objective
        labels = inputs.get("labels")
        if labels is None:
            raise ValueError(f"the batch has no `labels` (keys {sorted(inputs)}); the collator must provide them")
        if group_ids is None:
            group_ids = torch.zeros(labels.shape[0], dtype=torch.long, device=labels.device)

        groups, units = self._units({"group_ids": group_ids})
        rows = labels.shape[0]
        if model.training and self._step_counts is not None and num_items_in_batch is not None:
            # shares of the whole optimizer step (all micro-batches, all processes)
            step_tokens, step_rows, step_groups, step_units = num_items_in_batch, *self._step_counts[1:]
            world_scale = (
                self.accelerator.num_processes
                if args.average_tokens_across_devices and args.world_size > 1
                else 1
            )  # DDP averages the processes' gradients; the shares are of the global totals
        else:  # evaluation or a direct call: the mean over this batch
            step_tokens = (labels[..., 1:] != -100).sum().clamp(min=1)
            step_rows, step_groups, step_units, world_scale = rows, groups, units, 1
        group_share, unit_share = groups / step_groups, units / step_units

        # num_items_in_batch=1: the model's loss is the sum of the NLL of the micro-batch's scored tokens
        outputs = model(**inputs, use_cache=False, num_items_in_batch=1)
        nll_sum = outputs.reconstruction_loss
        if args.reconstruction_reduction == "sequence":  # NLL of each response (sum over its tokens), mean
            reconstruction = nll_sum / step_rows
        else:  # token-level mean
            reconstruction = nll_sum / step_tokens
        latent_mean, latent_logvar = outputs.latent_mean, outputs.latent_logvar
        if latent_mean is None:
            raise ValueError("the model returned no posterior (latent_mean); it must encode input_ids in training")
        dg_group_ids = None if self.dg_grouping == "batch" else group_ids
        beta = self.current_beta()

        # every regulariser is a mean over the micro-batch's groups (units); only the objective's keeps its gradient
        with torch.set_grad_enabled(torch.is_grad_enabled() and args.objective == "dg"):
            dg = density_gap(latent_mean, latent_logvar, args.dg_samples, group_ids=dg_group_ids)
        kl_per_row = gaussian_kl(latent_mean, latent_logvar).sum(dim=-1)  # (batch,)
        kl = torch.stack([kl_per_row[rows].mean() for rows in _groups(group_ids, len(kl_per_row), kl_per_row.device)])
        kl = kl.mean()
        if args.objective == "dg":
            regulariser, regulariser_share = dg, unit_share
        elif args.objective in ("free_bits", "optimus"):
            regulariser = free_bits_kl(latent_mean, latent_logvar, args.free_bits, group_ids)
            regulariser_share = group_share
        else:  # kl, cyclical, bow
            regulariser, regulariser_share = kl, group_share
        loss = reconstruction + beta * regulariser * regulariser_share

        terms = {}
        if args.objective == "bow":
            if "bow_logits" not in outputs:
                raise ValueError("objective='bow' but the model has no bag-of-words head (see attach_bow_head)")
            bow_loss = bag_of_words_nll(outputs["bow_logits"], labels) / step_tokens
            loss = loss + args.bow_weight * bow_loss
            terms["bow_loss"] = bow_loss
        loss = loss * world_scale

        if model.training:
            with torch.no_grad():
                terms.update(
                    reconstruction_loss=reconstruction,
                    nll_per_token=nll_sum / step_tokens,
                    kl=kl * group_share,
                    dg=dg * unit_share,
                    beta=kl.new_tensor(beta) * group_share,
                    mutual_info=mutual_information(latent_mean, latent_logvar, group_ids) * group_share,
                    active_units=active_units(latent_mean, group_ids, args.active_units_threshold) * group_share,
                )
            self._accumulate_terms(terms)
        if return_outputs:
            outputs["loss"] = loss
            return loss, outputs
        return loss


__all__ = [
    "CVAEBagOfWordsHead",
    "CVAETrainer",
    "CVAETrainingArguments",
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
