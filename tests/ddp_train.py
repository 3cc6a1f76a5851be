"""A tiny, seeded CVAE training run, for the trainer's tests and as the script `torchrun` runs in `test_ddp.py`.

    torchrun --nproc_per_node 2 tests/ddp_train.py --output_dir OUT --per_device_train_batch_size 1 ...

It writes the final trainable weights to `OUT/final_weights.safetensors` (from the main process). The helpers
(`build_tokenizer`, `build_groups`, `build_model`, `fixed_noise`) are imported by the tests as well, so that the
multi-process run and the single-process reference train exactly the same thing.
"""

import contextlib
import os
import sys
from pathlib import Path

import torch


# a few sentences: the vocabulary of the word-level tokenizer, and the prompts and responses of the groups
SENTENCES = [
    "the cat sat on the mat",
    "a dog ran in the park today",
    "stocks fell as markets opened lower",
    "the team won the final game",
    "new phone has a bigger screen",
    "rain is expected later this week",
    "scientists found water on a distant planet",
    "the bank raised interest rates again",
]
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]


def build_tokenizer():
    """A word-level `PreTrainedTokenizerFast` over `SENTENCES` (pad 0, bos 1, eos 2, unk 3), offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = sorted({word for sentence in SENTENCES for word in sentence.split()})
    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS + words)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        padding_side="left",
    )


def build_groups(num_groups: int = 4, group_size: int = 3):
    """`num_groups` grouped rows `{prompt, responses, label}` whose responses differ in length from group to group
    (so that a token-level mean over a micro-batch differs from one over the whole step)."""
    from datasets import Dataset

    rows = {"prompt": [], "responses": [], "label": []}
    for group in range(num_groups):
        words = SENTENCES[group % len(SENTENCES)].split()
        rows["prompt"].append(" ".join(words[:2]))
        responses = []
        for index in range(group_size):
            source = SENTENCES[(group + index + 1) % len(SENTENCES)].split()
            responses.append(" ".join(source[: 2 + (group + index) % 5]))
        rows["responses"].append(responses)
        rows["label"].append(group % 2)
    return Dataset.from_dict(rows)


def build_model(tokenizer, seed: int = 0, **cvae_fields):
    """A tiny `CVAELlamaForCausalLM` (hidden 32, 2 layers, latent 8) over the tokenizer's vocabulary, seeded."""
    from conftest import tiny_cvae_config  # this folder is on the path for the tests and for torchrun alike

    from cvae_llama.modeling_cvae_llama import CVAELlamaForCausalLM

    llama_overrides = dict(
        vocab_size=len(tokenizer),
        max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    config = tiny_cvae_config(llama_overrides, **cvae_fields)
    torch.manual_seed(seed)
    model = CVAELlamaForCausalLM(config)
    with torch.no_grad():
        # a fresh posterior is exactly N(0, I); give the read-out some weight so that means and variances differ
        read_out = model.encoder.to_latent_mean_logvar[-1]
        read_out.weight.normal_(0.0, 0.2, generator=torch.Generator().manual_seed(seed + 1))
    return model


def _fixed_reparameterize(latent_mean, latent_logvar, num_samples=None):
    """z = mu + sigma * eps with eps a fixed function of (sample, dimension): the same for every row and batch."""
    size = latent_mean.shape[-1]
    samples = 1 if num_samples is None else num_samples
    position = torch.arange(samples * size, dtype=latent_mean.dtype, device=latent_mean.device)
    noise = torch.sin(1.7 * position + 0.3).view(samples, 1, size)
    if num_samples is None:
        noise = noise[0]
    return latent_mean + torch.exp(0.5 * latent_logvar) * noise


@contextlib.contextmanager
def fixed_noise():
    """Replace the model's (and the density gap's) reparameterisation noise by a fixed, batch-independent one.

    Random noise makes a batch of 2 groups and 2 micro-batches of 1 group (or 2 processes) draw different samples;
    with this noise they see the same ones, so their gradients must agree exactly if the loss is normalised right.
    """
    from cvae_llama import modeling_cvae_llama

    original = modeling_cvae_llama.reparameterize
    modeling_cvae_llama.reparameterize = _fixed_reparameterize
    try:
        yield
    finally:
        modeling_cvae_llama.reparameterize = original


def trainable_state(model) -> dict[str, torch.Tensor]:
    """Copies of the trainable parameters, by name."""
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def main(argv: list[str] | None = None) -> None:
    from safetensors.torch import save_file
    from transformers import HfArgumentParser

    from cvae_llama.trainer import CVAETrainer, CVAETrainingArguments

    (args,) = HfArgumentParser(CVAETrainingArguments).parse_args_into_dataclasses(argv)
    tokenizer = build_tokenizer()
    # without the posterior batch norm, whose statistics are per process and micro-batch (as any batch norm's), so
    # that 2 processes of 1 group are bitwise 1 process of 2 groups
    model = build_model(tokenizer, posterior_batch_norm=False)
    with fixed_noise():
        trainer = CVAETrainer(model, args, train_dataset=build_groups(), processing_class=tokenizer)
        trainer.train()
    if trainer.is_world_process_zero():
        weights = {name: tensor.contiguous() for name, tensor in trainable_state(model).items()}
        save_file(weights, str(Path(args.output_dir) / "final_weights.safetensors"))
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        print(f"rank 0 of {int(os.environ.get('WORLD_SIZE', 1))}: losses {losses}")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main(sys.argv[1:])
