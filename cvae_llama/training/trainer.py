"""[`CVAETrainer`]: a `Trainer` for a CVAE-Llama on one-to-many data, with every objective of Zhang et al., "Latent
Variable Modeling for Controllable and Diverse Generation From Large Language Models" (IEEE TAI 2026), as trl's
`SFTTrainer`.

One training example is one **group**: a prompt `x` with `M` sampled responses `y_1 .. y_M`. The loss of a group is
the reconstruction NLL of its responses given their posterior latents plus `beta *` a regulariser of its `M`
posteriors (the objectives: `cvae_llama.training.objectives`).

The trainer normalises the loss over the whole optimizer step (every gradient-accumulation micro-batch and every
process): the reconstruction by the step's number of responses (the NLL summed over each response's tokens, as in
the ELBO and the authors' code) or of scored tokens (`reconstruction_reduction="token"`), the regulariser by the
step's number of groups. So 2 micro-batches of 1 group give the gradient of 1 batch of 2 groups, and
`torchrun --nproc_per_node 2` that of one process with the same global batch.
"""

import os
from collections.abc import Iterator
from itertools import islice

import torch
from peft import PeftModel
from torch import nn
from transformers import PreTrainedTokenizerBase, Trainer, TrainerCallback, TrainingArguments
from transformers.utils import logging

from ..data.collator import OneToManyCollator
from ..latent_statistics import active_units, mutual_information
from ..modeling_cvae_llama import CVAELlamaForCausalLM, is_adapter_weight
from .arguments import CVAETrainingArguments
from .checkpoints import checked_resume_checkpoint
from .data_checks import resolve_dg_grouping, validate_train_dataset
from .lora import apply_lora, pretrained_parameter_names, unwrap_cvae
from .objectives import (
    BETA_SCHEDULES,
    REGULARISERS,
    MicroBatchPosterior,
    attach_bow_head,
    bag_of_words_nll,
    density_gap_term,
    kl_term,
)
from .step_posterior import StepPosterior


logger = logging.get_logger(__name__)

# The terms every training log carries (plus `bow_loss` when `bow_weight` > 0).
LOGGED_TERMS = ("reconstruction_loss", "nll_per_token", "kl", "dg", "beta", "mutual_info", "active_units")
# How many of the latest training posterior means `posterior_mean_spread` and the collapse warning look at.
RECENT_MEANS = 256


def requested_fsdp(args: TrainingArguments) -> str | None:
    """The FSDP that `args` or the launcher ask for, as a user would name it, or `None`.

    Read before the `Trainer` builds its `Accelerator`, which sets `ACCELERATE_USE_FSDP` itself when given a plugin.
    transformers 5.25 hands accelerate an FSDP plugin exactly when `args.fsdp_plugin_args` is not None
    (`TrainingArguments._process_fsdp_args`: `fsdp` set, torch_xla's FSDP aside;
    `Trainer.create_accelerator_and_postprocess`), and accelerate 1.16 builds one from the environment when
    `ACCELERATE_USE_FSDP` is true (`accelerate launch --use_fsdp`, an accelerate config with FSDP: `Accelerator`).
    """
    if args.fsdp_plugin_args is not None:
        return f"fsdp={args.fsdp!r} with fsdp_config['version']={args.fsdp_plugin_args['fsdp_version']}"
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        version = os.environ.get("FSDP_VERSION", "1")  # accelerate's default
        return f"accelerate launch --use_fsdp (ACCELERATE_USE_FSDP=true, FSDP_VERSION={version})"
    return None


def restore_environment(name: str, value: str | None) -> None:
    """Set the environment variable `name` back to `value` (`None`: unset)."""
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


def deepspeed_warning(deepspeed_config: dict) -> str:
    """What `CVAETrainer` warns under DeepSpeed, with the ZeRO stage of `deepspeed_config` (DeepSpeed's JSON as a
    dict; stage 0, DeepSpeed's default, when it names none)."""
    stage = deepspeed_config.get("zero_optimization", {}).get("stage", 0)
    return (
        f"DeepSpeed ZeRO stage {stage} is untested with CVAETrainer and this model: CVAETrainer is tested in one "
        "process and with DDP (torchrun), the model with FSDP2 (torch's fully_shard, by hand); check the first steps' "
        "loss terms and a save / reload before a long run"
    )


class LatentGradientCheck(TrainerCallback):
    """Warns once when the first optimizer step after warm-up finds no gradient in any trainable parameter of the
    posterior encoder: whatever the loss does, the latent is not being trained (the path from the loss to z is cut)."""

    def __init__(self, enabled: bool = True):
        self.checked = not enabled  # DeepSpeed's ZeRO keeps the gradients out of `.grad`: nothing to check

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self.checked or model is None or state.global_step < args.get_warmup_steps(state.max_steps):
            return
        self.checked = True
        encoder = [p for name, p in model.named_parameters() if ".encoder." in f".{name}" and p.requires_grad]
        if encoder and all(p.grad is None or not p.grad.any() for p in encoder):
            logger.warning(
                "no gradient reached the posterior encoder at step %d (%d trainable tensors, all zero or None): the "
                "latent is not being trained. Check that the loss is the model's own (CVAETrainer, or Trainer with "
                "`labels`) and that nothing runs the decoder without the latent",
                state.global_step + 1,
                len(encoder),
            )


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
    N(0, I)), `dg`, `beta`, `mutual_info`, `active_units` (at `active_units_threshold`), and `bow_loss` when
    `bow_weight` > 0: each is the mean over the optimizer steps since the last log of the step's mean over groups.
    `kl`, `dg`, `mutual_info` and `active_units` are the functions of `cvae_llama.latent_statistics` that the
    evaluation reports call too, computed whatever the objective (without gradient when it is not theirs);
    `mutual_info` and `active_units` measure the spread inside the density gap's groups (the micro-batch with
    `dg_grouping="batch"`).

    Multi-GPU, FSDP and DeepSpeed: launch as any `Trainer` script (`torchrun`, `accelerate launch`); the step's
    totals are gathered across processes (`average_tokens_across_devices`, on by default). One process driving
    several GPUs (torch `DataParallel`) is refused, and so is FSDP (`fsdp`, `accelerate launch --use_fsdp`) where
    accelerate would not shard (CPU processes, which it trains as DDP replicas); DeepSpeed runs with a warning that it
    is untested.

    One text per device batch (`per_device_train_batch_size=1` on text data) with `gradient_accumulation_steps` > 1:
    the posterior batch norm would see one row; the trainer encodes the step's micro-batches together instead
    ([`StepPosterior`]), which gives the gradient of one batch of the step's size (one process, no DeepSpeed or FSDP).

    Before the first step the training data are checked (columns, a first collated batch, group sizes): bad data
    raise a `ValueError` instead of giving a NaN loss.

    When `model.config.decoder_mode == "lora"` and `model` is not a `PeftModel` yet, the trainer wraps it with
    [`apply_lora`] (settings from `args.lora_*`); with `bow_weight` > 0 (the default of `objective="bow"`) it attaches
    the bag-of-words head first (`model.bow_head`).

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
        cvae = unwrap_cvae(model)
        if cvae.config.decoder_mode == "full" and args.pretrained_learning_rate is None:
            logger.warning(
                "decoder_mode='full' trains the LLM at learning_rate=%g, the rate of the CVAE's new modules; the "
                "authors train it at 1e-5: set pretrained_learning_rate (e.g. 1e-5) to keep the LLM intact",
                args.learning_rate,
            )
        if args.bow_weight > 0:
            if isinstance(model, PeftModel) and getattr(cvae, "bow_head", None) is None:
                raise ValueError(
                    f"bow_weight={args.bow_weight} (objective={args.objective!r}) needs the bag-of-words head among "
                    "the adapter's saved modules: pass the plain "
                    "CVAELlamaForCausalLM with decoder_mode='lora' and let the trainer apply LoRA"
                )
            attach_bow_head(cvae)
        if cvae.config.decoder_mode == "lora" and not isinstance(model, PeftModel):
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
        fsdp_request, launcher_fsdp = requested_fsdp(args), os.environ.get("ACCELERATE_USE_FSDP")
        try:
            super().__init__(
                model=model,
                args=args,
                data_collator=data_collator,
                train_dataset=train_dataset,
                eval_dataset=eval_dataset,
                processing_class=processing_class,
                **kwargs,
            )
        finally:
            # the Accelerator sets ACCELERATE_USE_FSDP for a plugin, and it stays set where no FSDP runs (the plugin
            # dropped, or Trainer refusing FSDP in one process): later trainers of this process would read FSDP asked
            if not getattr(self, "is_fsdp_enabled", False):
                restore_environment("ACCELERATE_USE_FSDP", launcher_fsdp)
        self._check_settings(fsdp_request)
        self._step_counts: torch.Tensor | None = None  # (scored tokens, responses, groups, units) of the step
        self._step_posterior: StepPosterior | None = None  # the step's posterior, when encoded in one pass
        self._term_sums: dict[str, torch.Tensor] = {}
        self._terms_logged_step = 0
        # the latest training posterior means (no gradient), newest first: their spread is logged, batch size aside
        self._recent_means: torch.Tensor | None = None
        self._warned_collapse = False
        self.add_callback(LatentGradientCheck(enabled=not self.is_deepspeed_enabled))
        # what the density gap aggregates: "group" or "batch"
        self.dg_grouping = resolve_dg_grouping(self.args, train_dataset, self.data_collator)
        if train_dataset is not None:
            validate_train_dataset(self.args, train_dataset, self.data_collator, self.dg_grouping)

    def _check_settings(self, fsdp_request: str | None) -> None:
        """Refuse (or warn of) the settings that `Trainer` and accelerate would run otherwise than asked with this
        model: FSDP where accelerate set up none, DeepSpeed (untested), `DataParallel`, the label smoother, a posterior
        encoder with nothing to train."""
        if fsdp_request is not None and not self.is_fsdp_enabled:
            self._refuse_fsdp_fallback(fsdp_request)
        if self.is_deepspeed_enabled:
            logger.warning(deepspeed_warning(self.accelerator.state.deepspeed_plugin.deepspeed_config))
        if self.args.n_gpu > 1:
            raise ValueError(
                f"CVAETrainer does not support torch DataParallel (n_gpu={self.args.n_gpu} in one process); launch "
                "one process per GPU with torchrun or accelerate launch"
            )
        if self.args.label_smoothing_factor:  # Trainer's label smoother: the objective's loss has no place for it
            raise ValueError(
                f"label_smoothing_factor={self.args.label_smoothing_factor} would not be applied: CVAETrainer's loss "
                "is its objective's (the responses' NLL given z, and the regulariser), not Trainer's smoothed cross "
                "entropy; leave it at 0"
            )
        if not any(p.requires_grad for p in unwrap_cvae(self.model).encoder.parameters()):
            logger.warning(
                "every parameter of the posterior encoder is frozen: the latent will not learn (peft's "
                "prepare_model_for_kbit_training freezes the whole model: call model.apply_decoder_mode(), or "
                "apply_lora, after it)"
            )

    def _refuse_fsdp_fallback(self, fsdp_request: str) -> None:
        """Raise `ValueError`: FSDP was asked for but accelerate set up none, and DDP would train unsharded replicas
        without a word. accelerate 1.16 keeps the FSDP plugin only for accelerator processes (`AcceleratorState`:
        distributed types MULTI_GPU, MULTI_XPU, MULTI_NPU, ...); CPU processes (MULTI_CPU) get DDP."""
        world_size = self.args.world_size
        instead = (
            f"{world_size} DistributedDataParallel replicas of the whole model"
            if world_size > 1
            else "one process holding the whole model"
        )
        raise ValueError(
            f"{fsdp_request} asks for FSDP, but accelerate set up none (distributed type "
            f"{self.accelerator.distributed_type.value}): the run would train {instead}, nothing sharded. accelerate "
            "shards only across accelerator processes that a launcher started (torchrun, accelerate launch on GPU, "
            "XPU, NPU, ...), not CPU processes (use_cpu, gloo) nor one process without a launcher. Launch on "
            "accelerators; on CPU, drop fsdp to train with DDP, or shard the model yourself with "
            "torch.distributed.fsdp.fully_shard and train it in your own loop"
        )

    def create_optimizer(self, model=None):
        """The `Trainer`'s optimizer, with the LLM's copied weights in parameter groups of their own at
        `pretrained_learning_rate` (when it is set)."""
        optimizer = super().create_optimizer(model)
        rate = self.args.pretrained_learning_rate
        if rate is None or getattr(optimizer, "_cvae_pretrained_groups", False):
            return optimizer
        model = self.model if model is None else model
        names = pretrained_parameter_names(model)
        pretrained = {id(p) for name, p in model.named_parameters() if name in names}
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

    # ------------------------------------------------------------------------------------------ resuming
    def train(self, resume_from_checkpoint=None, trial=None, ignore_keys_for_eval=None, **kwargs):
        """`Trainer.train`, refusing an incomplete checkpoint (see [`check_checkpoint`]) before anything is loaded."""
        sharded = self.is_deepspeed_enabled or self.is_fsdp_enabled
        resume_from_checkpoint = checked_resume_checkpoint(resume_from_checkpoint, self.args, sharded)
        return super().train(
            resume_from_checkpoint=resume_from_checkpoint,
            trial=trial,
            ignore_keys_for_eval=ignore_keys_for_eval,
            **kwargs,
        )

    def _issue_warnings_after_load(self, load_result) -> None:
        """`Trainer`'s warnings after it loads a checkpoint (resuming, `load_best_model_at_end`), less the decoder's
        weights missing from an adapter checkpoint (`save_pretrained`'s default for a frozen decoder): the decoder is
        the base LLM, unchanged in memory."""
        model = unwrap_cvae(self.accelerator.unwrap_model(self.model))
        if model.config.decoder_mode != "full":
            missing = [name for name in load_result.missing_keys if is_adapter_weight(name)]
            load_result = load_result._replace(missing_keys=missing)
        super()._issue_warnings_after_load(load_result)

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
        self._step_posterior = None
        if self._encodes_per_step(batch_samples):
            self.model.train()
            batch_samples = [self._prepare_inputs(batch) for batch in batch_samples]
            with self.compute_loss_context_manager():
                self._step_posterior = StepPosterior(unwrap_cvae(self.model), batch_samples)
        return batch_samples, counts[0]

    def _encodes_per_step(self, batch_samples: list[dict]) -> bool:
        """Whether the step's posterior is encoded in one pass ([`StepPosterior`]): when the posterior batch norm
        would otherwise see a micro-batch of one row, and the step has more (or a single row ends an epoch)."""
        cvae = unwrap_cvae(self.model)
        if cvae.encoder.mean_norm is None or all(batch["labels"].shape[0] > 1 for batch in batch_samples):
            return False
        if self.args.gradient_accumulation_steps == 1:
            return False  # every step has one row: the batch norm refuses it, naming the fixes
        if self.args.world_size > 1 or self.is_deepspeed_enabled or self.is_fsdp_enabled:
            raise ValueError(
                f"per_device_train_batch_size={self.args.per_device_train_batch_size} gives micro-batches of one row: "
                "CVAETrainer then encodes an optimizer step's micro-batches together for the posterior batch norm, "
                f"which it does in one process without DeepSpeed or FSDP only (world_size={self.args.world_size}); "
                "give each device batch several rows (per_device_train_batch_size >= 2)"
            )
        return True

    def training_step(self, model: nn.Module, inputs: dict, num_items_in_batch=None) -> torch.Tensor:
        """`Trainer.training_step`; after the last micro-batch of a step encoded in one pass, the encoder's
        backward ([`StepPosterior`])."""
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self._step_posterior is not None:
            self._step_posterior.micro_batch_done()
        return loss

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
            logs.update({key: value / steps for key, value in zip(keys, values.tolist(), strict=True)})
            self._term_sums = {}
            self._terms_logged_step = self.state.global_step
            if self._recent_means is not None and self._recent_means.shape[0] > 1:
                self._log_posterior_spread(logs)
        super().log(logs, start_time)

    def _log_posterior_spread(self, logs: dict[str, float]) -> None:
        """`posterior_mean_spread`: the mean over dimensions of the standard deviation of the latest training
        posterior means (up to `RECENT_MEANS` rows, whatever the batch size), and a warning, once, when after warm-up
        no dimension's means vary by more than `active_units_threshold`: the latent says the same about every text."""
        variance = self._recent_means.var(0)
        logs["posterior_mean_spread"] = variance.sqrt().mean().item()
        active = int(active_units(self._recent_means, threshold=self.args.active_units_threshold))  # over one group
        if not self._warned_collapse and active == 0 and self.state.global_step > self.args.get_warmup_steps(
            self.state.max_steps
        ):
            self._warned_collapse = True
            logger.warning(
                "the latent has collapsed at step %d: over the last %d training texts no latent dimension's posterior "
                "mean varies by more than active_units_threshold=%g (spread %.3g), so z tells the decoder nothing "
                "about the text. Remedies: objective='dg' (one-to-many data) or free bits, posterior_batch_norm=True, "
                "a larger learning rate for the new modules",
                self.state.global_step,
                self._recent_means.shape[0],
                self.args.active_units_threshold,
                logs["posterior_mean_spread"],
            )

    # ------------------------------------------------------------------------------------------ the loss
    def current_beta(self) -> float:
        """beta of the current step: the objective's schedule ([`BETA_SCHEDULES`]) at `state.global_step`."""
        schedule = BETA_SCHEDULES[self.args.objective]
        return schedule(self.state.global_step, max(self.state.max_steps, 1), self.args)

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
                self.accelerator.num_processes if args.average_tokens_across_devices and args.world_size > 1 else 1
            )  # DDP averages the processes' gradients; the shares are of the global totals
        else:  # evaluation or a direct call: the mean over this batch
            step_tokens = (labels[..., 1:] != -100).sum().clamp(min=1)
            step_rows, step_groups, step_units, world_scale = rows, groups, units, 1

        # num_items_in_batch=1: the model's loss is the sum of the NLL of the micro-batch's scored tokens
        outputs = model(**inputs, use_cache=False, num_items_in_batch=1)
        nll_sum = outputs.reconstruction_loss
        # "sequence": the NLL of each response (summed over its tokens), mean over responses; "token": a token mean
        reconstruction = nll_sum / (step_rows if args.reconstruction_reduction == "sequence" else step_tokens)
        if outputs.latent_mean is None:
            raise ValueError("the model returned no posterior (latent_mean); it must encode input_ids in training")
        posterior = MicroBatchPosterior(
            latent_mean=outputs.latent_mean,
            latent_logvar=outputs.latent_logvar,
            group_ids=group_ids,
            group_share=groups / step_groups,
            dg_group_ids=None if self.dg_grouping == "batch" else group_ids,
            dg_share=units / step_units,
        )
        beta = self.current_beta()
        regularise = REGULARISERS[args.objective]
        regulariser = regularise(posterior, args)  # the micro-batch's share of the step's regulariser
        loss = reconstruction + beta * regulariser

        terms = {}
        if args.bow_weight > 0:
            if "bow_logits" not in outputs:
                raise ValueError(
                    f"bow_weight={args.bow_weight} but the model has no bag-of-words head (see attach_bow_head)"
                )
            bow_loss = bag_of_words_nll(outputs["bow_logits"], labels) / step_tokens
            loss = loss + args.bow_weight * bow_loss
            terms["bow_loss"] = bow_loss
        loss = loss * world_scale

        if model.training:
            with torch.no_grad():
                recent = outputs.latent_mean.detach().float()
                if self._recent_means is not None:
                    recent = torch.cat([recent, self._recent_means.to(recent.device)])
                self._recent_means = recent[:RECENT_MEANS]
                terms.update(
                    reconstruction_loss=reconstruction,
                    nll_per_token=nll_sum / step_tokens,
                    beta=regulariser.new_tensor(beta) * posterior.group_share,
                    **self._latent_statistics(posterior, regularise, regulariser),
                )
            self._accumulate_terms(terms)
        if return_outputs:
            outputs["loss"] = loss
            return loss, outputs
        return loss

    def _latent_statistics(self, posterior: MicroBatchPosterior, regularise, regulariser) -> dict[str, torch.Tensor]:
        """The logged `kl`, `dg`, `mutual_info` and `active_units` of a micro-batch, as its shares of the step's means
        over groups (`cvae_llama.latent_statistics`, as the evaluation computes them); the objective's own term is
        logged as it entered the loss."""
        mean, logvar = posterior.latent_mean, posterior.latent_logvar
        threshold = self.args.active_units_threshold
        return {
            "kl": regulariser if regularise is kl_term else kl_term(posterior, self.args),
            "dg": regulariser if regularise is density_gap_term else density_gap_term(posterior, self.args),
            # over the density gap's groups: each prompt's responses, or the micro-batch for unconditional text (where
            # every row is its own group, of one response, which has no spread to measure)
            "mutual_info": mutual_information(mean, logvar, posterior.dg_group_ids) * posterior.dg_share,
            "active_units": active_units(mean, posterior.dg_group_ids, threshold) * posterior.dg_share,
        }


__all__ = ["LOGGED_TERMS", "CVAETrainer", "LatentGradientCheck"]
