"""The latent carries the response: a tiny auto-encoder learns information through the whole encoder -> memory ->
decoder path; every parameter that should train gets a gradient in every mode; the LLM's copied weights get a
learning rate of their own; the batch norm of the posterior means; and `experiments/latent_information.py --quick`.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_cvae_config
from datasets import Dataset

from cvae_llama import CVAELlamaConfig, CVAELlamaForCausalLM
from cvae_llama.modeling_cvae_llama import CVAELlamaPosteriorNorm
from cvae_llama.trainer import CVAETrainer, CVAETrainingArguments, pretrained_parameter_names


pytestmark = pytest.mark.usefixtures("one_thread")
REPO = Path(__file__).resolve().parents[1]
BOS, FIRST_TOKEN, NUM_SYMBOLS, LENGTH = 1, 3, 32, 8


def random_strings(count: int, seed: int) -> list[list[int]]:
    """Strings of `LENGTH` uniformly random symbols: the decoder alone cannot beat LENGTH * ln(NUM_SYMBOLS) nats."""
    generator = torch.Generator().manual_seed(seed)
    return (torch.randint(NUM_SYMBOLS, (count, LENGTH), generator=generator) + FIRST_TOKEN).tolist()


def collate(rows):
    """x = BOS, y = the string; every row its own group (an auto-encoder over unconditional strings)."""
    tokens = torch.tensor([row["tokens"] for row in rows])
    input_ids = torch.cat([torch.full((len(rows), 1), BOS), tokens], dim=1)
    labels = input_ids.clone()
    labels[:, 0] = -100
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "labels": labels,
        "group_ids": torch.arange(len(rows)),
    }


def args(output_dir, **overrides) -> CVAETrainingArguments:
    values = dict(
        output_dir=str(output_dir), per_device_train_batch_size=16, max_steps=300, learning_rate=3e-3,
        objective="kl", kl_weight=0.0, logging_steps=100, save_strategy="no", report_to="none", disable_tqdm=True,
        use_cpu=True, seed=0, lr_scheduler_type="constant", weight_decay=0.0,
    )  # fmt: skip
    values.update(overrides)
    return CVAETrainingArguments(**values)


@torch.no_grad()
def information(model, strings) -> tuple[float, float]:
    """(NLL of each string decoded from its own posterior mean, the same from the next string's), nats / string."""
    model.eval()
    batch = collate([{"tokens": tokens} for tokens in strings])
    mean, _ = model.encode(batch["input_ids"], batch["attention_mask"])

    def nll(latent):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], latent=latent).logits
        log_probs = logits[:, :-1].log_softmax(-1).gather(-1, batch["input_ids"][:, 1:, None])
        return -log_probs.sum((1, 2)).mean().item()

    return nll(mean), nll(mean.roll(1, dims=0))


def test_tiny_autoencoder_learns_information_through_the_latent(tmp_path):
    """A tiny Llama (decoder trained too) auto-encodes fresh random strings: decoded from its own posterior mean, a
    held-out string costs several nats less than decoded from another string's. Cutting the path from the encoder
    to the decoder (the memory, the read-out, the batch norm) leaves no difference and fails this test."""
    torch.manual_seed(0)
    config = tiny_cvae_config(decoder_mode="full", latent_size=16, llama_overrides={"vocab_size": NUM_SYMBOLS + 3})
    model = CVAELlamaForCausalLM(config)
    train = Dataset.from_list([{"tokens": tokens} for tokens in random_strings(4096, seed=0)])
    CVAETrainer(model, args(tmp_path), train_dataset=train, data_collator=collate).train()
    own, other = information(model, random_strings(64, seed=1))
    floor = LENGTH * torch.log(torch.tensor(float(NUM_SYMBOLS))).item()  # 27.7 nats: what no latent can beat
    print(f"\nheld-out random strings: NLL own z {own:.1f}, other's z {other:.1f}, floor without z {floor:.1f}")
    assert other - own >= 3.0, f"the latent carries {other - own:.2f} nats per string (expected >= 3)"
    assert own < floor  # with its latent a string costs less than any decoder without one can achieve


@pytest.mark.parametrize("decoder_mode", ["frozen", "full", "lora"])
def test_every_parameter_that_should_train_gets_a_gradient(tmp_path, decoder_mode):
    """After two optimizer steps (the zero-initialised read-out and injection pass no gradient before their first
    step), one more backward gives every trainable parameter a non-zero gradient, and none to a frozen one."""
    torch.manual_seed(0)
    config = tiny_cvae_config(decoder_mode=decoder_mode, latent_injection="memory+embedding",
                              llama_overrides={"vocab_size": NUM_SYMBOLS + 3})  # fmt: skip
    train = Dataset.from_list([{"tokens": tokens} for tokens in random_strings(32, seed=0)])
    trainer = CVAETrainer(
        CVAELlamaForCausalLM(config),
        args(tmp_path, max_steps=2, per_device_train_batch_size=4, objective="dg", dg_grouping="batch"),
        train_dataset=train, data_collator=collate,
    )  # fmt: skip
    trainer.train()
    model = trainer.model
    model.train()
    model.zero_grad()
    batch = collate([{"tokens": tokens} for tokens in random_strings(4, seed=2)])
    trainer.compute_loss(model, batch).backward()
    trainable = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    assert trainable, "nothing trains"
    missing = sorted(
        name for name, parameter in model.named_parameters()
        if parameter.requires_grad and (parameter.grad is None or not parameter.grad.abs().sum() > 0)
    )  # fmt: skip
    assert not missing, f"{decoder_mode}: trainable parameters without a gradient: {missing}"
    leaked = sorted(
        name for name, parameter in model.named_parameters() if not parameter.requires_grad and parameter.grad is not None
    )
    assert not leaked


def test_pretrained_learning_rate_puts_the_llm_copies_in_groups_of_their_own(tmp_path):
    torch.manual_seed(0)
    model = CVAELlamaForCausalLM(tiny_cvae_config(decoder_mode="full", llama_overrides={"vocab_size": NUM_SYMBOLS + 3}))
    train = Dataset.from_list([{"tokens": tokens} for tokens in random_strings(8, seed=0)])
    trainer = CVAETrainer(
        model, args(tmp_path, max_steps=1, learning_rate=1e-3, pretrained_learning_rate=1e-5, weight_decay=0.1,
                    dg_grouping="batch"),
        train_dataset=train, data_collator=collate,
    )  # fmt: skip
    optimizer = trainer.create_optimizer()
    assert trainer.create_optimizer() is optimizer  # built once
    names = {id(parameter): name for name, parameter in model.named_parameters()}
    pretrained = pretrained_parameter_names(model)
    assert "model.layers.0.self_attn.q_proj.weight" in pretrained and "encoder.layers.1.mlp.up_proj.weight" in pretrained
    assert not any(name.startswith(("latent_memory.", "latent_skip.", "encoder.to_latent")) for name in pretrained)
    assert "encoder.embed_tokens.weight" not in pretrained  # frozen in every mode
    seen = set()
    for group in optimizer.param_groups:
        group_names = {names[id(parameter)] for parameter in group["params"]}
        assert group_names <= pretrained or not group_names & pretrained  # never mixed
        assert group["lr"] == (1e-5 if group_names <= pretrained else 1e-3)
        seen |= group_names
    assert seen == {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    trainer.train()  # the schedule scales both groups
    rates = sorted({group["lr"] for group in trainer.optimizer.param_groups})
    assert len(rates) == 2 and rates[0] < rates[1]


@pytest.mark.parametrize("statistics", ["running", "running_mean", "batch"])
def test_posterior_batch_norm_spreads_the_means_and_keeps_a_fresh_posterior_standard_normal(statistics):
    torch.manual_seed(0)
    config = tiny_cvae_config(llama_overrides={"vocab_size": NUM_SYMBOLS + 3}, posterior_norm_statistics=statistics)
    model = CVAELlamaForCausalLM(config)
    batch = collate([{"tokens": tokens} for tokens in random_strings(6, seed=0)])
    for training in (True, False):
        model.train(training)
        mean, logvar = model.encode(batch["input_ids"])
        assert torch.equal(mean, torch.zeros_like(mean)) and torch.equal(logvar, torch.zeros_like(logvar))
    with torch.no_grad():  # give the read-out some weight: the raw means differ a little from row to row
        model.encoder.to_latent_mean_logvar[-1].weight.normal_(std=0.1)
    model.train()
    model.encoder.mean_norm.reset_running_stats()  # the first batch seen: its own statistics, in either setting
    norm, model.encoder.mean_norm = model.encoder.mean_norm, None
    raw, _ = model.encode(batch["input_ids"])
    model.encoder.mean_norm = norm
    mean, _ = model.encode(batch["input_ids"])
    # each dimension standardised over the batch: mu = (raw - E[raw]) / sqrt(Var[raw] + eps), learned scale 1, shift 0
    expected = (raw - raw.mean(0)) / torch.sqrt(raw.var(0, unbiased=False) + norm.eps)
    assert torch.allclose(mean, expected, atol=1e-4)
    assert mean.std(dim=0, unbiased=False).min() > 10 * raw.std(dim=0, unbiased=False).max()  # spread amplified
    # a training batch of one row has no spread: refused (its running statistics would leave the latent dead)
    with pytest.raises(ValueError, match="this batch has 1 row"):
        model.encode(batch["input_ids"][:1])
    model.eval()
    first, second = model.encode(batch["input_ids"])[0], model.encode(batch["input_ids"])[0]
    assert torch.equal(first, second)  # evaluation: running statistics, deterministic
    assert model.encode(batch["input_ids"][:1])[0].allclose(first[:1], atol=1e-6)  # a row alone = in its batch


def test_folders_saved_before_the_new_posterior_fields_load_as_they_were_built(tmp_path):
    """A folder written before `posterior_batch_norm` and `posterior_pooling` existed (its config.json has neither)
    loads as the architecture its weights have: no batch norm, the query read-out; a new model gets both new values."""
    model = CVAELlamaForCausalLM(tiny_cvae_config(posterior_batch_norm=False, posterior_pooling="queries"))
    model.save_pretrained(tmp_path)
    config_file = tmp_path / "config.json"
    values = json.loads(config_file.read_text())
    # as written by the version before the fields
    del values["posterior_batch_norm"], values["posterior_pooling"], values["posterior_norm_statistics"]
    config_file.write_text(json.dumps(values))
    config = CVAELlamaConfig.from_pretrained(tmp_path)
    assert (config.posterior_batch_norm, config.posterior_pooling) == (False, "queries")
    assert config.posterior_norm_statistics == "batch"
    loaded = CVAELlamaForCausalLM.from_pretrained(tmp_path)
    assert loaded.encoder.mean_norm is None
    assert torch.equal(loaded.encoder.latent_queries, model.encoder.latent_queries)
    fresh = CVAELlamaConfig()
    assert (fresh.posterior_batch_norm, fresh.posterior_pooling, fresh.posterior_norm_statistics) == (
        True, "mean", "batch"
    )  # fmt: skip
    with pytest.raises(ValueError, match="posterior_batch_norm"):
        tiny_cvae_config(posterior_batch_norm="yes")
    with pytest.raises(ValueError, match="posterior_norm_statistics.*'group'"):
        tiny_cvae_config(posterior_norm_statistics="group")


def test_posterior_norm_running_statistics_normalise_training_as_evaluation():
    """`posterior_norm_statistics="running"`: the running statistics are those of every mean seen (between-batch
    spread included), training normalises with them as evaluation does, and the gradient is batch norm's."""
    norm = CVAELlamaPosteriorNorm(3, statistics="running")
    generator = torch.Generator().manual_seed(0)
    first = torch.randn(8, 3, generator=generator)
    second = torch.randn(8, 3, generator=generator) * 2 + 5  # another group: offset and wider
    norm(first)
    means = second.clone().requires_grad_()
    trained = norm(means)
    # two equal batches, weights 1 then 1/2: the statistics of the two together (not the mean of their variances)
    both = torch.cat([first, second])
    assert torch.allclose(norm.running_mean, both.mean(0), atol=1e-5)
    assert torch.allclose(norm.running_var, both.var(0, unbiased=False), atol=1e-4)
    norm.eval()
    assert torch.allclose(trained, norm(second), atol=1e-5)  # training = evaluation, by construction
    assert trained.mean().item() > 0.5  # the second group's offset is kept, not centred away
    weights = torch.randn(8, 3, generator=generator)
    (trained * weights).sum().backward()
    # batch norm's gradient through the batch's statistics, scaled by r = sigma_B / sigma
    reference = second.clone().requires_grad_()
    standardised = (reference - reference.mean(0)) / (reference.var(0, unbiased=False) + norm.eps).sqrt()
    (standardised * weights).sum().backward()
    ratio = ((second.var(0, unbiased=False) + norm.eps) / (norm.running_var + norm.eps)).sqrt()
    assert torch.allclose(means.grad, reference.grad * ratio, atol=1e-5)
    assert means.grad.abs().sum() > 0 and torch.allclose(means.grad.sum(0), torch.zeros(3), atol=1e-5)
    for _ in range(20):  # later batches weigh `momentum` (0.1) each
        norm.train()(torch.randn(8, 3, generator=generator) * 0.01)
    assert norm.num_batches_tracked.item() == 22 and (norm.running_mean.abs() < both.mean(0).abs()).all()


def test_posterior_norm_running_mean_keeps_each_batchs_spread_and_passes_its_offset():
    """`posterior_norm_statistics="running_mean"`: (mu - running mean) / the batch's own spread in training, with
    the offset's gradient; evaluation divides by the running mean of the batches' variances."""
    norm = CVAELlamaPosteriorNorm(3, statistics="running_mean")
    generator = torch.Generator().manual_seed(0)
    first = torch.randn(8, 3, generator=generator)
    second = torch.randn(8, 3, generator=generator) * 2 + 5
    norm(first)
    means = second.clone().requires_grad_()
    trained = norm(means)
    assert torch.allclose(norm.running_mean, torch.cat([first, second]).mean(0), atol=1e-5)
    variances = torch.stack([first.var(0, unbiased=False), second.var(0, unbiased=False)])
    assert torch.allclose(norm.running_var, variances.mean(0), atol=1e-5)  # within-batch, not the mixture's
    assert torch.allclose(trained.std(0, unbiased=False), torch.ones(3), atol=1e-4)  # the batch's own spread
    offset = (second.mean(0) - norm.running_mean) / (second.var(0, unbiased=False) + norm.eps).sqrt()
    assert torch.allclose(trained.mean(0), offset, atol=1e-5) and (offset > 0.5).all()  # kept, not centred away
    # the offset's gradient reaches the means: 1 / sigma_B in all (sigma_B does not change with a common shift)
    trained.mean(0).sum().backward()
    assert torch.allclose(means.grad.sum(0), 1 / (second.var(0, unbiased=False) + norm.eps).sqrt(), atol=1e-5)
    norm.eval()
    expected = (second - norm.running_mean) / (norm.running_var + norm.eps).sqrt()
    assert torch.allclose(norm(second), expected, atol=1e-5)


@pytest.mark.parametrize("statistics", ["running", "running_mean"])
def test_posterior_norm_a_batch_of_equal_means_leaves_the_running_statistics_alone(statistics):
    """A fresh encoder's means are all equal (zero read-out): such a batch has no spread to give, so it is not
    counted, and the first real batch sets the statistics alone (not averaged with a variance of 0)."""
    norm = CVAELlamaPosteriorNorm(3, statistics=statistics)
    assert torch.equal(norm(torch.zeros(8, 3)), torch.zeros(8, 3))
    assert norm.num_batches_tracked.item() == 0
    assert torch.equal(norm.running_mean, torch.zeros(3)) and torch.equal(norm.running_var, torch.ones(3))
    batch = torch.randn(8, 3, generator=torch.Generator().manual_seed(0)) * 1e-3
    norm(batch)
    assert norm.num_batches_tracked.item() == 1
    assert torch.allclose(norm.running_var, batch.var(0, unbiased=False)), "the real batch's own variance"


@pytest.mark.slow
def test_latent_information_tool_quick(tmp_path):
    """The measurement tool end to end on SmolLM2-135M (a few steps of each setting), as the issue asks."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(REPO / "experiments" / "latent_information.py"), "--quick", "--output_dir",
               str(tmp_path)]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    finals = [row for row in rows if row.get("final")]
    assert {row["data"] for row in finals} == {"yelp", "agnews"}
    for row in finals:
        for key in ("information", "nll_own", "nll_other", "nll_z0", "kl", "mutual_information", "mean_spread",
                    "posterior_std", "iw_nll", "iw_ppl_ratio"):  # fmt: skip
            assert key in row and row[key] == row[key], key  # present and not NaN
    assert (tmp_path / "information.png").stat().st_size > 0


def test_full_decoder_mode_without_a_rate_for_the_llm_warns(tmp_path, caplog):
    from transformers.utils import logging as hf_logging

    model = CVAELlamaForCausalLM(tiny_cvae_config(decoder_mode="full", llama_overrides={"vocab_size": NUM_SYMBOLS + 3}))
    train = Dataset.from_list([{"tokens": tokens} for tokens in random_strings(8, seed=0)])
    hf_logging.enable_propagation()
    try:
        with caplog.at_level("WARNING"):
            CVAETrainer(model, args(tmp_path, max_steps=1, dg_grouping="batch"), train_dataset=train,
                        data_collator=collate)  # fmt: skip
        assert "pretrained_learning_rate" in caplog.text
        caplog.clear()
        with caplog.at_level("WARNING"):
            CVAETrainer(model, args(tmp_path, max_steps=1, dg_grouping="batch", pretrained_learning_rate=1e-5),
                        train_dataset=train, data_collator=collate)  # fmt: skip
        assert "pretrained_learning_rate" not in caplog.text
    finally:
        hf_logging.disable_propagation()
