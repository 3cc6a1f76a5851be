"""Every ordinary way of training a CVAE trains the latent, or is refused with the fix (issue 25): `CVAETrainer`, the
plain `transformers.Trainer` with `labels`, and trl's `SFTTrainer` (with `compute_loss_func=trl_loss_func`; its
default fused LM head is refused), each with and without gradient checkpointing, per-device batch 1 with gradient
accumulation and a batch of several, with and without LoRA. Every parameter that should train gets a non-zero
gradient and moves, the frozen ones stay, and an auto-encoder learns information through z. A device batch of one
row (one text) is refused by the posterior batch norm, but for `CVAETrainer` with gradient accumulation, which
encodes a step's micro-batches together (with the gradient of the whole batch); on one-to-many data a batch of 1 is
one group of responses, several rows, and trains."""

import logging as logging_module
import math

import pytest
import torch
from datasets import Dataset
from ddp_train import SENTENCES, build_groups, build_model, build_tokenizer
from transformers import DataCollatorForLanguageModeling, Trainer, TrainerCallback, TrainingArguments
from transformers.utils import logging

from cvae_llama import CVAETrainer, CVAETrainingArguments, apply_lora, cvae_loss_func, trl_loss_func
from cvae_llama.data import OneToManyCollator
from cvae_llama.data.loaders import unconditional_rows


pytestmark = pytest.mark.usefixtures("one_thread")
PATHS = ("cvae_trainer", "trainer", "sft")
BATCHES = {"batch1x4": (1, 4), "batch4": (4, 1)}


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


class GradientRecorder(TrainerCallback):
    """The names of the parameters that had a non-zero gradient before some optimizer step."""

    def __init__(self):
        self.nonzero = set()

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.nonzero |= {name for name, p in model.named_parameters() if p.grad is not None and p.grad.any()}


def common_arguments(output_dir, batch: str, checkpointing: bool, steps: int) -> dict:
    per_device, accumulation = BATCHES[batch]
    return dict(
        output_dir=str(output_dir), per_device_train_batch_size=per_device, gradient_accumulation_steps=accumulation,
        max_steps=steps, learning_rate=1e-2, warmup_steps=0, lr_scheduler_type="constant", logging_steps=1,
        save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, gradient_checkpointing=checkpointing,
        seed=0, dataloader_drop_last=True,
    )  # fmt: skip


def text_rows(tokenizer, repeats: int = 4) -> Dataset:
    """The sentences (each its own example) tokenised for the plain Trainer: input_ids, which the collator copies to
    labels (padding masked)."""
    rows = [tokenizer(sentence + tokenizer.eos_token) for sentence in SENTENCES * repeats]
    return Dataset.from_dict({"input_ids": [row["input_ids"] for row in rows]})


def make_trainer(path: str, tokenizer, tmp_path, batch: str, checkpointing: bool, lora: bool, steps: int = 3,
                 decoder_mode: str = "frozen", one_to_many: bool | None = None, loss_func=trl_loss_func,
                 **kw):  # fmt: skip
    """`path`'s trainer on the sentences. `CVAETrainer` at per-device batch 1 trains on groups of 3 responses (one
    to many) unless `one_to_many=False`; the others compute `loss_func` from the model's outputs (the plain Trainer
    its own loss, the negative ELBO, when it is None)."""
    model = build_model(tokenizer, decoder_mode="lora" if lora else decoder_mode)
    if lora and path != "cvae_trainer":  # CVAETrainer applies LoRA itself
        model = apply_lora(model)
    arguments = common_arguments(tmp_path, batch, checkpointing, steps)
    if path == "cvae_trainer":
        one_to_many = batch == "batch1x4" if one_to_many is None else one_to_many
        texts = build_groups(8) if one_to_many else unconditional_rows(Dataset.from_dict({"text": SENTENCES * 4}))
        kw.setdefault("objective", "kl")  # the density gap over one text per batch is refused (it needs 2 rows)
        args = CVAETrainingArguments(**arguments, max_prompt_tokens=4, max_response_tokens=12, **kw)
        return CVAETrainer(model, args, train_dataset=texts, processing_class=tokenizer)
    if path == "trainer":
        tokenizer.padding_side = "left"
        collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)
        args = TrainingArguments(**arguments, remove_unused_columns=False)
        return Trainer(model=model, args=args, train_dataset=text_rows(tokenizer), data_collator=collator,
                       compute_loss_func=None if loss_func is trl_loss_func else loss_func)  # fmt: skip
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(**arguments, max_length=16, **kw)
    return SFTTrainer(model=model, args=args, train_dataset=Dataset.from_dict({"text": SENTENCES * 4}),
                      processing_class=tokenizer, compute_loss_func=loss_func)  # fmt: skip


@pytest.mark.parametrize("lora", [False, True], ids=["frozen", "lora"])
@pytest.mark.parametrize("checkpointing", [False, True], ids=["no_gc", "gc"])
@pytest.mark.parametrize("batch", list(BATCHES))
@pytest.mark.parametrize("path", PATHS)
def test_every_trainable_parameter_gets_a_gradient_and_moves(tokenizer, tmp_path, path, batch, checkpointing, lora):
    trainer = make_trainer(path, tokenizer, tmp_path, batch, checkpointing, lora)
    if path != "cvae_trainer" and batch == "batch1x4":  # one text per device batch: refused, with the fix
        with pytest.raises(ValueError, match="this batch has 1 row .*per_device_train_batch_size=16"):
            trainer.train()
        return
    recorder = GradientRecorder()
    trainer.add_callback(recorder)
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    trainer.train()
    trainable = {name for name, p in trainer.model.named_parameters() if p.requires_grad}
    assert any(".encoder." in f".{name}" for name in trainable) and any("latent_memory" in n for n in trainable)
    assert trainable - recorder.nonzero == set()  # every trainable tensor had a gradient
    moved = {name for name, p in trainer.model.named_parameters() if not torch.equal(before[name], p.detach())}
    assert trainable - moved == set()
    assert moved - trainable == set()  # the frozen LLM (and the frozen copies) stay as they were
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 3 and all(math.isfinite(loss) for loss in losses)
    assert all(entry["grad_norm"] > 0 for entry in trainer.state.log_history if "grad_norm" in entry)


def one_text_trainer(tokenizer, output_dir, batch: str, checkpointing: bool = False, recorder=None, **kw):
    texts = unconditional_rows(Dataset.from_dict({"text": SENTENCES}))
    arguments = common_arguments(output_dir, batch, checkpointing, 1) | kw
    args = CVAETrainingArguments(**arguments, objective="kl", max_grad_norm=0.0)
    trainer = CVAETrainer(build_model(tokenizer), args, train_dataset=texts, processing_class=tokenizer)
    if recorder is not None:
        trainer.add_callback(recorder)
    return trainer


class GradientCopies(TrainerCallback):
    """A copy of every gradient before the first optimizer step."""

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if not hasattr(self, "grads"):
            self.grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("checkpointing", [False, True], ids=["no_gc", "gc"])
def test_one_text_per_device_batch_has_the_gradient_of_the_whole_batch(tokenizer, tmp_path, checkpointing, monkeypatch):
    """CVAETrainer encodes the 4 one-row micro-batches of a step together (StepPosterior): the posterior batch norm
    sees the step's 4 rows and the gradient is the one of a batch of 4 (z = the posterior mean here, so that the
    two runs draw no noise)."""
    import cvae_llama.modeling_cvae_llama as modeling

    def posterior_mean(mean, logvar, num_samples=None):
        return mean if num_samples is None else mean.expand(num_samples, *mean.shape)

    monkeypatch.setattr(modeling, "reparameterize", posterior_mean)
    grads = {}
    for batch in BATCHES:
        recorder = GradientCopies()
        one_text_trainer(tokenizer, tmp_path / batch, batch, checkpointing, recorder).train()
        grads[batch] = recorder.grads
    assert grads["batch1x4"].keys() == grads["batch4"].keys()
    assert any(".encoder." in f".{name}" for name in grads["batch4"])
    for name, grad in grads["batch4"].items():
        torch.testing.assert_close(grads["batch1x4"][name], grad, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")


def test_one_text_per_device_batch_without_accumulation_is_refused(tokenizer, tmp_path):
    trainer = one_text_trainer(tokenizer, tmp_path, "batch4", per_device_train_batch_size=1)
    with pytest.raises(ValueError, match="posterior_batch_norm=True .* 1 row.*gradient_accumulation_steps > 1"):
        trainer.train()
    model = build_model(tokenizer, posterior_batch_norm=False)  # a setting the message names: trains
    CVAETrainer(model, trainer.args, train_dataset=trainer.train_dataset, processing_class=tokenizer).train()


def test_a_posterior_passed_to_forward_is_checked(tokenizer):
    model = build_model(tokenizer).train()
    ids = torch.tensor([[1, 5, 6, 7]])
    model.encoder.eval()
    mean, logvar = model.encode(ids)
    with pytest.raises(ValueError, match="latent_logvar is None but .* each of shape \\(1, "):
        model(input_ids=ids, latent_mean=mean)
    with pytest.raises(ValueError, match="either latent or a posterior"):
        model(input_ids=ids, latent_mean=mean, latent_logvar=logvar, latent=mean)
    outputs = model(input_ids=ids, labels=ids, latent_mean=mean, latent_logvar=logvar)
    assert outputs.latent_mean is mean and outputs.kl_loss > 0


@pytest.mark.parametrize("checkpointing", [False, True], ids=["no_gc", "gc"])
def test_sft_trainer_default_loss_is_refused_with_the_fix(tokenizer, tmp_path, checkpointing):
    """trl's fused LM head runs `model.model` alone: without the refusal it trains nothing (grad_norm 0)."""
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(**common_arguments(tmp_path, "batch4", checkpointing, 1), max_length=16)
    trainer = SFTTrainer(model=build_model(tokenizer), args=args, processing_class=tokenizer,
                         train_dataset=Dataset.from_dict({"text": SENTENCES}))  # fmt: skip
    with pytest.raises(RuntimeError, match="compute_loss_func=cvae_llama.trl_loss_func"):
        trainer.train()


def test_the_decoder_alone_still_runs_outside_training(tokenizer):
    model = build_model(tokenizer)
    ids = torch.tensor([[1, 5, 6, 7]])
    model.eval()
    assert model.model(input_ids=ids).last_hidden_state.shape == (1, 4, model.config.hidden_size)
    model.train()
    with torch.no_grad():  # e.g. trl's metrics pass
        model.model(input_ids=ids)
    with pytest.raises(RuntimeError, match="without the latent"):
        model.model(input_ids=ids)


def test_trl_loss_func_is_the_negative_elbo_per_token(tokenizer):
    model = build_model(tokenizer).train()
    ids = torch.tensor([[1, 5, 6, 7, 2], [1, 8, 9, 2, 0]])
    labels = ids.masked_fill(ids == 0, -100)
    torch.manual_seed(0)
    outputs = model(input_ids=ids, attention_mask=(ids != 0).long())
    loss = trl_loss_func(outputs, labels)
    logits = outputs.logits[:, :-1]
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels[:, 1:], reduction="sum")
    kl = 0.5 * (outputs.latent_mean**2 + outputs.latent_logvar.exp() - 1 - outputs.latent_logvar).sum()
    torch.testing.assert_close(loss, (nll + kl) / 7)
    torch.testing.assert_close(trl_loss_func(outputs, labels, num_items_in_batch=14), (nll + kl) / 14)


def test_cvae_loss_func_weights_the_kl_and_takes_free_bits(tokenizer):
    model = build_model(tokenizer).train()
    ids = torch.tensor([[1, 5, 6, 7, 2], [1, 8, 9, 2, 0]])
    labels = ids.masked_fill(ids == 0, -100)
    outputs = model(input_ids=ids, attention_mask=(ids != 0).long())
    nll = torch.nn.functional.cross_entropy(outputs.logits[:, :-1].transpose(1, 2), labels[:, 1:], reduction="sum")
    kl = 0.5 * (outputs.latent_mean**2 + outputs.latent_logvar.exp() - 1 - outputs.latent_logvar)  # (rows, d)
    torch.testing.assert_close(cvae_loss_func(kl_weight=0.0)(outputs, labels), nll / 7)
    torch.testing.assert_close(cvae_loss_func(kl_weight=0.5)(outputs, labels), (nll + 0.5 * kl.sum()) / 7)
    free_bits = kl.mean(0).clamp(min=0.3).sum() * 2  # per dimension max(mean KL_d, lambda), times the rows
    torch.testing.assert_close(cvae_loss_func(free_bits=0.3)(outputs, labels), (nll + free_bits) / 7)
    for name, value in (("kl_weight", -1.0), ("kl_weight", float("nan")), ("free_bits", "0.5"), ("kl_weight", True)):
        with pytest.raises(ValueError, match=f"{name} must be a finite number >= 0, got {value!r}"):
            cvae_loss_func(**{name: value})


# ---------------------------------------------------------------------------------------------------- information
def information(model, tokenizer) -> float:
    """Mean over the sentences of NLL(sentence | the next sentence's posterior mean) - NLL(sentence | its own), in
    nats per sentence: 0 when the decoder ignores z or the posterior says the same about every sentence."""
    collator = OneToManyCollator(tokenizer, 0, 12)
    batch = collator([{"prompt": "", "responses": SENTENCES}])
    inputs = {key: batch[key] for key in ("input_ids", "attention_mask")}
    model.eval()
    with torch.no_grad():
        means = model.encode(**inputs)[0]

        def nll(latents):
            logits = model(**inputs, latent=latents).logits[:, :-1]
            token_nll = torch.nn.functional.cross_entropy(
                logits.transpose(1, 2), batch["labels"][:, 1:], reduction="none", ignore_index=-100
            )
            return token_nll.sum(-1)

        return (nll(means.roll(1, 0)) - nll(means)).mean().item()


INFORMATION_PATHS = {  # the auto-encoder (beta = 0) as each way of training sets it up
    "cvae_trainer-batch4": ("cvae_trainer", "batch4", {"objective": "kl", "kl_weight": 0.0}),
    "cvae_trainer-batch1x4": ("cvae_trainer", "batch1x4", {"objective": "kl", "kl_weight": 0.0, "one_to_many": False}),
    "trainer-batch4": ("trainer", "batch4", {"loss_func": cvae_loss_func(kl_weight=0.0)}),
    "sft-batch4": ("sft", "batch4", {"loss_func": cvae_loss_func(kl_weight=0.0)}),
}


@pytest.mark.parametrize("name", list(INFORMATION_PATHS))
def test_an_auto_encoder_learns_information_through_z(tokenizer, tmp_path, name):
    """200 steps of 4 sentences as a beta = 0 auto-encoder (the tiny random decoder trains too: it has nothing to
    read z with at first) give 2.5-4 nats through every way of training, one text per device batch with
    accumulation included; a cut path, or a dead latent (the batch norm of a batch of one row at its running
    statistics, as before issue 25), gives about 0 (a fresh model 0.001)."""
    path, batch, kw = INFORMATION_PATHS[name]
    trainer = make_trainer(path, tokenizer, tmp_path, batch, False, False, steps=200, decoder_mode="full", **kw)
    assert abs(information(trainer.model, tokenizer)) < 0.01  # a fresh CVAE: z is barely read yet
    trainer.train()
    assert information(trainer.model, tokenizer) > 1.5


class Records(logging_module.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_the_trainer_warns_when_the_latent_is_collapsed_or_gets_no_gradient(tokenizer, tmp_path):
    trainer = make_trainer("cvae_trainer", tokenizer, tmp_path, "batch4", False, False, steps=3)
    # cut the path to the encoder (it gets no gradient), and every posterior mean is the same (collapsed)
    trainer.model.encoder.register_forward_hook(lambda module, inputs, outputs: tuple(t.detach() for t in outputs))
    trainer.model.encoder.mean_norm.weight.data.zero_()
    logger, records = logging.get_logger("cvae_llama.training.trainer"), Records()
    logger.addHandler(records)
    try:
        trainer.train()
    finally:
        logger.removeHandler(records)
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert all(entry["posterior_mean_spread"] == 0 for entry in logs)
    messages = records.messages
    assert sum("no gradient reached the posterior encoder" in m for m in messages) == 1
    assert sum("the latent has collapsed" in m for m in messages) == 1  # once, not at every log


def test_dpo_trainer_is_refused_with_the_reason(tokenizer, tmp_path):
    """DPO scores sequences through trl's fused LM head too (the decoder alone, no z): refused, not a silent DPO of
    the LLM inside the CVAE. (DPOTrainer loads its reference model from the model's folder.)"""
    from trl import DPOConfig, DPOTrainer

    from cvae_llama import CVAELlamaForCausalLM

    build_model(tokenizer).save_pretrained(tmp_path / "cvae")
    model = CVAELlamaForCausalLM.from_pretrained(tmp_path / "cvae")
    pairs = Dataset.from_dict({"prompt": ["the cat", "the team"], "chosen": [" sat on the mat", " won the final game"],
                               "rejected": [" ran in the park", " fell as markets opened"]})  # fmt: skip
    args = DPOConfig(**common_arguments(tmp_path / "dpo", "batch4", False, 1) | {"per_device_train_batch_size": 2})
    trainer = DPOTrainer(model=model, args=args, train_dataset=pairs, processing_class=tokenizer)
    with pytest.raises(RuntimeError, match="SFTTrainer / DPOTrainer do this"):
        trainer.train()
