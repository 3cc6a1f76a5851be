r"""Training a CVAE-Llama (the public import path is `cvae_llama.trainer`, or `cvae_llama` itself).

| module | what |
|---|---|
| `arguments` | [`CVAETrainingArguments`]: `TrainingArguments` plus the objective (as trl's `SFTConfig`) |
| `trainer` | [`CVAETrainer`]: the `Trainer` with the step-exact loss and its logged terms (as trl's `SFTTrainer`) |
| `objectives` | the objectives as name -> function registries, free bits, the cyclical beta, the bag-of-words head |
| `latent_dpo` | [`LatentDPOTrainer`], [`LatentDPOConfig`]: a learned prior p(z \| x) by DPO on preference pairs (as trl's `DPOTrainer`) or on the latents reward functions rank (trl's reward-function signature) |
| `lora` | [`apply_lora`] and the names of the CVAE's parameters inside a `PeftModel` |
| `checkpoints` | [`check_checkpoint`]: refuse an incomplete checkpoint before resuming |
| `data_checks` | what the density gap aggregates (`dg_grouping="auto"`) and the checks of the training data |

The latent statistics the trainer logs (`dg`, `mutual_info`, `active_units`) come from `cvae_llama.latent_statistics`,
the module the evaluation calls too.
"""
