"""Latent DPO: a learned prior p(z | x) trained on preference pairs with the CVAE frozen (the authors' code,
`LlamaForLatentDPO` in zhangjf-nlp/LLM-based-CVAE; Zhang et al., COLING 2025, "LPO").

For each pair `(x, y_w, y_l)` the latents come from three sources, `num_latent_samples` each: the prior p(z | x) and
the posteriors q(z | x, y_w) and q(z | x, y_l). They are ranked by log q(z | x, y_w) - log q(z | x, y_l); the top
`preference_fraction` are the chosen latents, the bottom as many the rejected ones, paired best with worst. DPO then
raises the prior's density of the chosen latents against the rejected ones, relative to the reference N(0, I):

    loss = -log sigmoid(beta * ([log p(z_w | x) - log N(z_w)] - [log p(z_l | x) - log N(z_l)]))

No text is decoded and nothing but the prior is back-propagated.

Beyond the paper, preferences can also come online from reward functions (trl's signature, as `GRPOTrainer` takes
them): each step draws `num_generations` latents from the prior per prompt, decodes each greedily, scores the texts,
and takes the best-rewarded `preference_fraction` of the latents as chosen, the worst as rejected (pairs whose rewards
tie are left out).
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
from ..validation import pad_token_id
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


def latent_preferences_from_rewards(latents: torch.Tensor, rewards: torch.Tensor, fraction: float = 0.25):
    """The chosen and rejected latents of each prompt from the rewards of their decodings: `latents` `(batch, n,
    latent_size)`, `rewards` `(batch, n)` -> `(chosen, rejected, mask)`, the latents `(batch, k, latent_size)` with
    k = `fraction` of n (at least 1), the i-th best paired with the i-th worst, and `mask` `(batch, k)` False where
    the pair's rewards tie (no preference)."""
    k = max(1, int(latents.shape[1] * fraction))
    best = rewards.topk(k, dim=1, largest=True).indices
    worst = rewards.topk(k, dim=1, largest=False).indices

    def gather(indices):
        return latents.gather(1, indices[..., None].expand(-1, -1, latents.shape[-1]))

    return gather(best), gather(worst), rewards.gather(1, best) > rewards.gather(1, worst)


def latent_dpo_loss(prior_mean, prior_logvar, chosen_latents, rejected_latents, beta: float = 0.1, mask=None):
    """DPO on the prior's log-densities with N(0, I) as the reference: `(loss, chosen_rewards, rejected_rewards)`,
    the loss averaged over the pairs of latents (those where `mask`, `(batch, k)`, is True when given; 0 when none
    is), the rewards beta * (log p(z | x) - log N(z; 0, I)) per latent pair `(batch, k)`. `prior_*` are `(batch,
    latent_size)`, the latents `(batch, k, latent_size)`."""

    def log_ratio(latents):  # log p(z | x) - log N(z; 0, I)
        policy = diagonal_gaussian_log_density(latents, prior_mean[:, None], prior_logvar[:, None]).sum(-1)
        reference = diagonal_gaussian_log_density(latents, torch.zeros_like(latents), torch.zeros_like(latents))
        return policy - reference.sum(-1)

    chosen_rewards, rejected_rewards = beta * log_ratio(chosen_latents), beta * log_ratio(rejected_latents)
    losses = -F.logsigmoid(chosen_rewards - rejected_rewards)
    loss = losses.mean() if mask is None else (losses * mask).sum() / mask.sum().clamp(min=1)
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
            Token budgets of the prompt and of each response (with reward functions: of each decoding).
        num_generations (`int`, defaults to 8):
            With reward functions: latents drawn from the prior per prompt and step, each decoded and scored.
        reward_weights (`list[float]`, *optional*):
            With reward functions: the weight of each in the summed reward (all 1 when unset), as in trl's
            `GRPOConfig`.
    """

    beta: float = field(default=0.1, metadata={"help": "DPO's beta: how far the prior may move from N(0, I)."})
    num_latent_samples: int = field(default=16, metadata={"help": "Latents from each source (prior, q(z|x,y_w), "
                                                                  "q(z|x,y_l)) per pair."})  # fmt: skip
    preference_fraction: float = field(default=0.25, metadata={"help": "Share of the candidates taken as chosen "
                                                                       "(best) and as rejected (worst) latents."})  # fmt: skip
    max_prompt_length: int = field(default=128, metadata={"help": "Token budget of the prompt."})
    max_completion_length: int = field(default=128, metadata={"help": "Token budget of each response."})
    num_generations: int = field(default=8, metadata={"help": "With reward functions: latents drawn from the prior "
                                                              "per prompt, each decoded and scored."})  # fmt: skip
    reward_weights: list[float] | None = field(default=None, metadata={"help": "With reward functions: the weight "
                                                                              "of each (all 1 when unset)."})  # fmt: skip
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
        generations = self.num_generations
        if isinstance(generations, bool) or not isinstance(generations, int) or generations < 2:
            raise ValueError(f"num_generations must be an integer of at least 2 (a best and a worst latent), got "
                             f"{generations!r}")  # fmt: skip
        if self.reward_weights is not None and not all(
            not isinstance(weight, bool) and isinstance(weight, (int, float)) and math.isfinite(weight)
            for weight in self.reward_weights
        ):
            raise ValueError(f"reward_weights must be finite numbers, got {self.reward_weights!r}")


@dataclass
class LatentPreferenceCollator:
    """Batch preference pairs `{prompt, chosen, rejected}`: the prompts for the prior (`prompt_input_ids`,
    `prompt_attention_mask`, left-padded) and `prompt + response` for the posterior, chosen and rejected rows
    alternating (`input_ids`, `attention_mask`), tokenised as [`OneToManyCollator`] tokenises training rows. With
    `prompts_only` (for reward functions): the prompts' tensors, the `prompts` and the rows' other `columns`."""

    tokenizer: PreTrainedTokenizerBase
    max_prompt_length: int
    max_completion_length: int
    prompts_only: bool = False

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        texts = [feature["prompt"] or "" for feature in features]
        prompts = prompt_inputs(self.tokenizer, texts, self.max_prompt_length)
        batch = {"prompt_input_ids": prompts["input_ids"], "prompt_attention_mask": prompts["attention_mask"]}
        if self.prompts_only:  # for reward functions: the texts and the other columns too
            columns = {name: [feature[name] for feature in features] for name in features[0] if name != "prompt"}
            return {**batch, "prompts": texts, "columns": columns}
        rows = OneToManyCollator(self.tokenizer, self.max_prompt_length, self.max_completion_length)(
            [
                {"prompt": feature["prompt"], "responses": [feature["chosen"], feature["rejected"]]}
                for feature in features
            ]
        )
        return {"input_ids": rows["input_ids"], "attention_mask": rows["attention_mask"], **batch}


class LatentDPOTrainer(Trainer):
    r"""
    Latent DPO ([`latent_dpo_loss`]): trains the CVAE's learned prior p(z | x) on preference pairs, the CVAE frozen.
    A model without a learned prior gets a fresh one (exactly N(0, I): `add_learned_prior`). It logs what trl's
    `DPOTrainer` logs: `rewards/chosen`, `rewards/rejected`, `rewards/margins`, `rewards/accuracies`.

    Args:
        model ([`CVAELlamaForCausalLM`]): the trained CVAE.
        args ([`LatentDPOConfig`]): the training arguments.
        train_dataset, eval_dataset: preference pairs in trl's format, columns `prompt`, `chosen`, `rejected`
            (strings; an empty prompt for unconditional text). With `reward_funcs`: prompts, a `prompt` column (its
            other columns go to the reward functions).
        processing_class: the model's tokenizer.
        reward_funcs (`Callable` or `list[Callable]`, *optional*): online preferences instead of pairs, from reward
            functions with trl's signature, `reward_func(prompts, completions, completion_ids, **columns) ->
            list[float]` (a value per completion; `columns` are the dataset's other columns, one value per
            completion). Each step draws `args.num_generations` latents from the prior per prompt and decodes each
            greedily (`args.max_completion_length` tokens); the rewards, summed with `args.reward_weights`, rank
            them. Logged as trl's `GRPOTrainer` logs them: `reward`, `reward_std`, `rewards/<name>/mean`.

    Example:

    ```python
    >>> trainer = LatentDPOTrainer(model, LatentDPOConfig(output_dir="prior"), train_dataset=pairs,
    ...                            processing_class=tokenizer)
    >>> trainer.train()
    >>> model.generate(**prompt_inputs(tokenizer, ["The food"]), do_sample=True)  # z from the learned prior
    ```
    """

    def __init__(self, model=None, args: LatentDPOConfig | None = None, data_collator=None, train_dataset=None,
                 eval_dataset=None, processing_class: PreTrainedTokenizerBase | None = None, reward_funcs=None,
                 **kwargs):  # fmt: skip
        if not isinstance(args, LatentDPOConfig):
            raise ValueError(f"args must be a LatentDPOConfig, got {type(args).__name__}")
        cvae = unwrap_cvae(model)
        self.reward_funcs = check_reward_funcs(reward_funcs, args.reward_weights)
        if args.reward_weights is not None and not self.reward_funcs:
            raise ValueError(f"reward_weights={args.reward_weights!r} weighs reward functions, but reward_funcs is not "
                             f"given")  # fmt: skip
        columns = ("prompt",) if self.reward_funcs else PREFERENCE_COLUMNS
        for name, dataset in (("train_dataset", train_dataset), ("eval_dataset", eval_dataset)):
            check_preference_dataset(dataset, name, required=name == "train_dataset", columns=columns)
        if self.reward_funcs and processing_class is None:
            raise ValueError(
                "processing_class (the model's tokenizer) is needed to decode the texts reward_funcs score"
            )
        if processing_class is None and data_collator is None:
            raise ValueError("processing_class (the model's tokenizer) is needed to tokenise the pairs")
        if cvae.latent_prior is None:
            logger.info("the model has no learned prior: adding one, exactly N(0, I) (add_learned_prior)")
            cvae.add_learned_prior()
        cvae.requires_grad_(False)
        cvae.latent_prior.requires_grad_(True)  # the prior alone trains
        if data_collator is None:
            data_collator = LatentPreferenceCollator(
                processing_class, args.max_prompt_length, args.max_completion_length, bool(self.reward_funcs)
            )
        super().__init__(model=model, args=args, data_collator=data_collator, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, processing_class=processing_class, **kwargs)  # fmt: skip
        self._metrics = defaultdict(list)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        cvae = unwrap_cvae(self.accelerator.unwrap_model(model))
        args = self.args
        prior_mean, prior_logvar = cvae.prior(inputs["prompt_input_ids"], inputs["prompt_attention_mask"])
        prefix = "" if model.training else "eval_"
        if self.reward_funcs:
            chosen, rejected, mask = self._rewarded_latents(cvae, inputs, prior_mean, prior_logvar, prefix)
        else:
            with torch.no_grad():
                cvae.encoder.eval()  # the posterior as trained: its batch norm's running statistics
                posterior_mean, posterior_logvar = cvae.encode(inputs["input_ids"], inputs["attention_mask"])
            chosen, rejected = latent_preference_pairs(
                prior_mean.float(), prior_logvar.float(), posterior_mean[0::2].float(), posterior_logvar[0::2].float(),
                posterior_mean[1::2].float(), posterior_logvar[1::2].float(), args.num_latent_samples,
                args.preference_fraction,
            )  # fmt: skip
            mask = None
        loss, chosen_rewards, rejected_rewards = latent_dpo_loss(prior_mean.float(), prior_logvar.float(), chosen,
                                                                 rejected, args.beta, mask)  # fmt: skip
        for name, value in (("rewards/chosen", chosen_rewards.mean()), ("rewards/rejected", rejected_rewards.mean()),
                            ("rewards/margins", (chosen_rewards - rejected_rewards).mean()),
                            ("rewards/accuracies", (chosen_rewards > rejected_rewards).float().mean())):  # fmt: skip
            self._metrics[prefix + name].append(self.accelerator.gather_for_metrics(value).mean().item())
        return (loss, {"loss": loss}) if return_outputs else loss

    @torch.no_grad()
    def _rewarded_latents(self, cvae, inputs, prior_mean, prior_logvar, prefix: str):
        """`num_generations` latents from the prior per prompt, each decoded greedily and scored by the reward
        functions: the chosen and rejected latents and the mask of [`latent_preferences_from_rewards`]."""
        args, tokenizer = self.args, self.processing_class
        count = args.num_generations
        latents = sample_posterior(prior_mean.float(), prior_logvar.float(), count).transpose(0, 1)  # (batch, n, d)
        was_training = cvae.training
        cvae.eval()
        prompt_ids = inputs["prompt_input_ids"].repeat_interleave(count, 0)
        sequences = cvae.generate(
            input_ids=prompt_ids, attention_mask=inputs["prompt_attention_mask"].repeat_interleave(count, 0),
            latent=latents.flatten(0, 1).to(cvae.dtype), do_sample=False, max_new_tokens=args.max_completion_length,
            pad_token_id=pad_token_id(tokenizer),
        )  # fmt: skip
        cvae.train(was_training)
        completion_ids = [completion_until_eos(row, tokenizer.eos_token_id)
                          for row in sequences[:, prompt_ids.shape[1] :].tolist()]  # fmt: skip
        completions = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
        prompts = [prompt for prompt in inputs["prompts"] for _ in range(count)]
        columns = {
            name: [value for value in values for _ in range(count)] for name, values in inputs["columns"].items()
        }
        weights = args.reward_weights or [1.0] * len(self.reward_funcs)
        rewards = torch.zeros(len(completions))
        for weight, function in zip(weights, self.reward_funcs, strict=True):
            values = function(prompts=prompts, completions=completions, completion_ids=completion_ids, **columns)
            values = check_rewards(values, len(completions), reward_name(function))
            self._metrics[f"{prefix}rewards/{reward_name(function)}/mean"].append(values.mean().item())
            rewards += weight * values
        rewards = rewards.view(-1, count)
        self._metrics[prefix + "reward"].append(rewards.mean().item())
        self._metrics[prefix + "reward_std"].append(rewards.std(1).mean().item())
        chosen, rejected, mask = latent_preferences_from_rewards(latents, rewards.to(latents.device),
                                                                 args.preference_fraction)  # fmt: skip
        return chosen, rejected, mask

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """`Trainer.log`, with the means of the reward statistics since the last log (as trl's `DPOTrainer`)."""
        evaluation = any(key.startswith("eval_") for key in logs)
        for name in [name for name in self._metrics if name.startswith("eval_") == evaluation]:
            logs[name] = sum(self._metrics[name]) / len(self._metrics[name])
            del self._metrics[name]
        super().log(logs, start_time)


def check_preference_dataset(dataset, name: str, required: bool, columns=PREFERENCE_COLUMNS) -> None:
    """`ValueError` unless `dataset` has rows with the `columns` (preference pairs' by default)."""
    what = "preference pairs" if columns == PREFERENCE_COLUMNS else "prompts for reward_funcs"
    if dataset is None:
        if required:
            raise ValueError(f"{name} is required: {what} with columns {list(columns)}")
        return
    found = getattr(dataset, "column_names", None)
    if found is None and len(dataset):
        found = list(dataset[0])
    missing = [column for column in columns if column not in (found or [])]
    if missing:
        raise ValueError(f"{name} lacks the column(s) {missing}: {what} need {list(columns)}, found {found}")
    if len(dataset) == 0:
        raise ValueError(f"{name} is empty: latent DPO needs at least one row of {what}")


def reward_name(function) -> str:
    return getattr(function, "__name__", type(function).__name__)


def check_reward_funcs(reward_funcs, reward_weights) -> list:
    """The reward functions as a list (empty for none), refused unless each is a callable and `reward_weights`, when
    given, has one weight for each."""
    if reward_funcs is None:
        return []
    functions = list(reward_funcs) if isinstance(reward_funcs, (list, tuple)) else [reward_funcs]
    if not functions:
        raise ValueError("reward_funcs is empty: give a reward function, or leave it out to train on pairs")
    for function in functions:
        if not callable(function):
            raise ValueError(f"reward_funcs must be callables reward_func(prompts, completions, completion_ids, "
                             f"**columns) -> list[float] (trl's signature), got {function!r}; a reward model's name "
                             f"is not taken here: wrap the model in such a function")  # fmt: skip
    if reward_weights is not None and len(reward_weights) != len(functions):
        raise ValueError(f"reward_weights has {len(reward_weights)} weights for {len(functions)} reward functions; "
                         f"expected one per function")  # fmt: skip
    return functions


def check_rewards(values, count: int, name: str) -> torch.Tensor:
    """The rewards a reward function returned as a float tensor, refused unless they are `count` finite numbers."""
    try:
        rewards = torch.tensor([float(value) for value in values], dtype=torch.float32)
    except (TypeError, ValueError) as error:
        raise ValueError(f"the reward function {name} returned {values!r}: expected {count} numbers") from error
    if len(rewards) != count or not torch.isfinite(rewards).all():
        raise ValueError(f"the reward function {name} returned {values!r}: expected {count} finite numbers, one per "
                         f"completion")  # fmt: skip
    return rewards


def completion_until_eos(ids: list[int], eos_token_id: int | None) -> list[int]:
    """The generated ids up to and including the first EOS (the padding after it dropped)."""
    return ids[: ids.index(eos_token_id) + 1] if eos_token_id in ids else ids


__all__ = ["LatentDPOConfig", "LatentDPOTrainer", "LatentPreferenceCollator", "latent_dpo_loss",
           "latent_preference_pairs", "latent_preferences_from_rewards"]  # fmt: skip
