"""[`CVAETrainingArguments`]: `TrainingArguments` plus the objective of the CVAE, as trl's `SFTConfig`."""

import math
from dataclasses import dataclass, field

from transformers import TrainingArguments

from .objectives import OBJECTIVES


DG_GROUPINGS = ("auto", "group", "batch")
RECONSTRUCTION_REDUCTIONS = ("sequence", "token")


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
        bow_weight (`float`, *optional*):
            Weight of the bag-of-words loss (a token-level mean, as in the authors' code), added to any objective:
            a head on z predicts every token of the response, so z has to carry its content words. Default: 1.0
            with `objective="bow"` (KL + bag of words), 0 (no head) otherwise.
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
    bow_weight: float | None = field(
        default=None,
        metadata={
            "help": "Weight of the bag-of-words loss, added to any objective (> 0 attaches the head); default 1.0 "
            "with objective bow, else 0."
        },
    )
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
        if self.bow_weight is None:
            self.bow_weight = 1.0 if self.objective == "bow" else 0.0
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


__all__ = ["DG_GROUPINGS", "RECONSTRUCTION_REDUCTIONS", "CVAETrainingArguments"]
