"""Latent DPO: a learned prior p(z | x) trained on preference pairs with the CVAE frozen (the authors' code,
`LlamaForLatentDPO` in zhangjf-nlp/LLM-based-CVAE; Zhang et al., COLING 2025, "LPO").

For each pair `(x, y_w, y_l)` the latents come from three sources, `num_latent_samples` each: the prior p(z | x) and
the posteriors q(z | x, y_w) and q(z | x, y_l). They are ranked by log q(z | x, y_w) - log q(z | x, y_l); the top
`preference_fraction` are the chosen latents, the bottom as many the rejected ones, paired best with worst. DPO then
raises the prior's density of the chosen latents against the rejected ones, relative to the reference N(0, I):

    loss = -log sigmoid(beta * ([log p(z_w | x) - log N(z_w)] - [log p(z_l | x) - log N(z_l)]))

No text is decoded and nothing but the prior is back-propagated.
"""

import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from transformers import PreTrainedTokenizerBase, Trainer, TrainingArguments
from transformers.utils import logging

from ..data.collator import OneToManyCollator, prompt_inputs
from ..latent_statistics import diagonal_gaussian_log_density, sample_posterior
from .lora import unwrap_cvae


logger = logging.get_logger(__name__)

PREFERENCE_COLUMNS = ("prompt", "chosen", "rejected")


def latent_preference_pairs(prior_mean, prior_logvar, chosen_mean, chosen_logvar, rejected_mean, rejected_logvar,
                            num_samples: int = 16, fraction: float = 0.25,
                            generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """The chosen and rejected latents of each pair, each `(batch, k, latent_size)` with k = `fraction` of the
    3 x `num_samples` candidates (`num_samples` from each of the prior and the two posteriors, all `(batch,
    latent_size)`), the i-th best paired with the i-th worst by log q(z | x, y_w) - log q(z | x, y_l). No gradient."""
    with torch.no_grad():
        candidates = torch.cat([sample_posterior(mean, logvar, num_samples, generator) for mean, logvar in (
            (prior_mean, prior_logvar), (chosen_mean, chosen_logvar), (rejected_mean, rejected_logvar))])  # fmt: skip
        candidates = candidates.transpose(0, 1)  # (batch, 3 * num_samples, latent_size)
        score = diagonal_gaussian_log_density(candidates, chosen_mean[:, None], chosen_logvar[:, None]).sum(
            -1
        ) - diagonal_gaussian_log_density(candidates, rejected_mean[:, None], rejected_logvar[:, None]).sum(-1)
        k = max(1, int(candidates.shape[1] * fraction))
        best = score.topk(k, dim=1, largest=True).indices
        worst = score.topk(k, dim=1, largest=False).indices

        def gather(indices):
            return candidates.gather(1, indices[..., None].expand(-1, -1, candidates.shape[-1]))

        return gather(best), gather(worst)


def latent_dpo_loss(prior_mean, prior_logvar, chosen_latents, rejected_latents, beta: float = 0.1):
    """DPO on the prior's log-densities with N(0, I) as the reference: `(loss, chosen_rewards, rejected_rewards)`,
    the loss averaged over the pairs of latents, the rewards beta * (log p(z | x) - log N(z; 0, I)) per latent pair
    `(batch, k)`. `prior_*` are `(batch, latent_size)`, the latents `(batch, k, latent_size)`."""

    def log_ratio(latents):  # log p(z | x) - log N(z; 0, I)
        policy = diagonal_gaussian_log_density(latents, prior_mean[:, None], prior_logvar[:, None]).sum(-1)
        reference = diagonal_gaussian_log_density(latents, torch.zeros_like(latents), torch.zeros_like(latents))
        return policy - reference.sum(-1)

    chosen_rewards, rejected_rewards = beta * log_ratio(chosen_latents), beta * log_ratio(rejected_latents)
    loss = -F.logsigmoid(chosen_rewards - rejected_rewards).mean()
    return loss, chosen_rewards.detach(), rejected_rewards.detach()


@dataclass
class LatentDPOConfig(TrainingArguments):
    r"""
    [`TrainingArguments`] for [`LatentDPOTrainer`], shaped like trl's `DPOConfig`. The defaults of the latent part
    are the authors'.

    Args:
        beta (`float`, defaults to 0.1):
            DPO's beta: how far the prior may move from N(0, I).
        num_latent_samples (`int`, defaults to 16):
            Latents drawn from each source (the prior and the two posteriors) per pair.
        preference_fraction (`float`, defaults to 0.25):
            The share of the candidates taken as chosen latents (the best) and as rejected ones (the worst), in
            (0, 0.5].
        max_prompt_length (`int`, defaults to 128), max_completion_length (`int`, defaults to 128):
            Token budgets of the prompt and of each response.
    """

    beta: float = field(default=0.1, metadata={"help": "DPO's beta: how far the prior may move from N(0, I)."})
    num_latent_samples: int = field(default=16, metadata={"help": "Latents from each source (prior, q(z|x,y_w), "
                                                                  "q(z|x,y_l)) per pair."})  # fmt: skip
    preference_fraction: float = field(default=0.25, metadata={"help": "Share of the candidates taken as chosen "
                                                                       "(best) and as rejected (worst) latents."})  # fmt: skip
    max_prompt_length: int = field(default=128, metadata={"help": "Token budget of the prompt."})
    max_completion_length: int = field(default=128, metadata={"help": "Token budget of each response."})
    remove_unused_columns: bool = field(default=False, metadata={"help": "Keep `prompt`, `chosen`, `rejected`."})

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.beta, bool) or not isinstance(self.beta, (int, float)) or not math.isfinite(self.beta) \
                or self.beta <= 0:  # fmt: skip
            raise ValueError(f"beta must be a finite positive number, got {self.beta!r}")
        fraction = self.preference_fraction
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 0.5:
            raise ValueError(f"preference_fraction must be in (0, 0.5], got {fraction!r}")
        for name in ("num_latent_samples", "max_prompt_length", "max_completion_length"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")


@dataclass
class LatentPreferenceCollator:
    """Batch preference pairs `{prompt, chosen, rejected}`: the prompts for the prior (`prompt_input_ids`,
    `prompt_attention_mask`, left-padded) and `prompt + response` for the posterior, chosen and rejected rows
    alternating (`input_ids`, `attention_mask`), tokenised as [`OneToManyCollator`] tokenises training rows."""

    tokenizer: PreTrainedTokenizerBase
    max_prompt_length: int
    max_completion_length: int

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        rows = OneToManyCollator(self.tokenizer, self.max_prompt_length, self.max_completion_length)(
            [
                {"prompt": feature["prompt"], "responses": [feature["chosen"], feature["rejected"]]}
                for feature in features
            ]
        )
        prompts = prompt_inputs(
            self.tokenizer, [feature["prompt"] or "" for feature in features], self.max_prompt_length
        )
        return {"input_ids": rows["input_ids"], "attention_mask": rows["attention_mask"],
                "prompt_input_ids": prompts["input_ids"], "prompt_attention_mask": prompts["attention_mask"]}  # fmt: skip


class LatentDPOTrainer(Trainer):
    r"""
    Latent DPO ([`latent_dpo_loss`]): trains the CVAE's learned prior p(z | x) on preference pairs, the CVAE frozen.
    A model without a learned prior gets a fresh one (exactly N(0, I): `add_learned_prior`). It logs what trl's
    `DPOTrainer` logs: `rewards/chosen`, `rewards/rejected`, `rewards/margins`, `rewards/accuracies`.

    Args:
        model ([`CVAELlamaForCausalLM`]): the trained CVAE.
        args ([`LatentDPOConfig`]): the training arguments.
        train_dataset, eval_dataset: preference pairs in trl's format, columns `prompt`, `chosen`, `rejected`
            (strings; an empty prompt for unconditional text).
        processing_class: the model's tokenizer.

    Example:

    ```python
    >>> trainer = LatentDPOTrainer(model, LatentDPOConfig(output_dir="prior"), train_dataset=pairs,
    ...                            processing_class=tokenizer)
    >>> trainer.train()
    >>> model.generate(**prompt_inputs(tokenizer, ["The food"]), do_sample=True)  # z from the learned prior
    ```
    """

    def __init__(self, model=None, args: LatentDPOConfig | None = None, data_collator=None, train_dataset=None,
                 eval_dataset=None, processing_class: PreTrainedTokenizerBase | None = None, **kwargs):  # fmt: skip
        if not isinstance(args, LatentDPOConfig):
            raise ValueError(f"args must be a LatentDPOConfig, got {type(args).__name__}")
        cvae = unwrap_cvae(model)
        for name, dataset in (("train_dataset", train_dataset), ("eval_dataset", eval_dataset)):
            check_preference_dataset(dataset, name, required=name == "train_dataset")
        if processing_class is None and data_collator is None:
            raise ValueError("processing_class (the model's tokenizer) is needed to tokenise the pairs")
        if cvae.latent_prior is None:
            logger.info("the model has no learned prior: adding one, exactly N(0, I) (add_learned_prior)")
            cvae.add_learned_prior()
        cvae.requires_grad_(False)
        cvae.latent_prior.requires_grad_(True)  # the prior alone trains
        if data_collator is None:
            data_collator = LatentPreferenceCollator(
                processing_class, args.max_prompt_length, args.max_completion_length
            )
        super().__init__(model=model, args=args, data_collator=data_collator, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, processing_class=processing_class, **kwargs)  # fmt: skip
        self._metrics = defaultdict(list)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        cvae = unwrap_cvae(self.accelerator.unwrap_model(model))
        args = self.args
        with torch.no_grad():
            cvae.encoder.eval()  # the posterior as trained: its batch norm's running statistics
            posterior_mean, posterior_logvar = cvae.encode(inputs["input_ids"], inputs["attention_mask"])
        prior_mean, prior_logvar = cvae.prior(inputs["prompt_input_ids"], inputs["prompt_attention_mask"])
        chosen, rejected = latent_preference_pairs(
            prior_mean.float(), prior_logvar.float(), posterior_mean[0::2].float(), posterior_logvar[0::2].float(),
            posterior_mean[1::2].float(), posterior_logvar[1::2].float(), args.num_latent_samples,
            args.preference_fraction,
        )  # fmt: skip
        loss, chosen_rewards, rejected_rewards = latent_dpo_loss(prior_mean.float(), prior_logvar.float(), chosen,
                                                                 rejected, args.beta)  # fmt: skip
        prefix = "" if model.training else "eval_"
        for name, value in (("rewards/chosen", chosen_rewards.mean()), ("rewards/rejected", rejected_rewards.mean()),
                            ("rewards/margins", (chosen_rewards - rejected_rewards).mean()),
                            ("rewards/accuracies", (chosen_rewards > rejected_rewards).float().mean())):  # fmt: skip
            self._metrics[prefix + name].append(self.accelerator.gather_for_metrics(value).mean().item())
        return (loss, {"loss": loss}) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """`Trainer.log`, with the means of the reward statistics since the last log (as trl's `DPOTrainer`)."""
        evaluation = any(key.startswith("eval_") for key in logs)
        for name in [name for name in self._metrics if name.startswith("eval_") == evaluation]:
            logs[name] = sum(self._metrics[name]) / len(self._metrics[name])
            del self._metrics[name]
        super().log(logs, start_time)


def check_preference_dataset(dataset, name: str, required: bool) -> None:
    """`ValueError` unless `dataset` has rows with the columns `prompt`, `chosen` and `rejected`."""
    if dataset is None:
        if required:
            raise ValueError(f"{name} is required: preference pairs with columns {list(PREFERENCE_COLUMNS)}")
        return
    columns = getattr(dataset, "column_names", None)
    if columns is None and len(dataset):
        columns = list(dataset[0])
    missing = [column for column in PREFERENCE_COLUMNS if column not in (columns or [])]
    if missing:
        raise ValueError(f"{name} lacks the column(s) {missing}: preference pairs need {list(PREFERENCE_COLUMNS)}, "
                         f"found {columns}")  # fmt: skip
    if len(dataset) == 0:
        raise ValueError(f"{name} is empty: latent DPO needs at least one preference pair")


__all__ = ["LatentDPOConfig", "LatentDPOTrainer", "LatentPreferenceCollator", "latent_dpo_loss",
           "latent_preference_pairs"]  # fmt: skip
