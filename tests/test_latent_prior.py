"""A learned prior p(z | x) and latent DPO (issue 40): a fresh prior is N(0, I) exactly and changes nothing; with
one, `generate()` samples z from it and `forward()` uses its mean; it saves and loads with the model (remote code
too); the DPO loss matches a float64 reference; `LatentDPOTrainer` trains the prior and nothing else."""

import math

import pytest
import torch
from conftest import open_memory_gates, tiny_cvae_config
from datasets import Dataset
from test_remote_code import run_without_cvae_llama, tiny_tokenizer

from cvae_llama import CVAELlamaForCausalLM, LatentDPOConfig, LatentDPOTrainer
from cvae_llama.latent_statistics import LOG_2PI, diagonal_gaussian_log_density
from cvae_llama.training.latent_dpo import latent_dpo_loss, latent_preference_pairs


pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = torch.tensor([[1, 5, 6, 7], [0, 1, 9, 10]])
MASK = torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1]])


def trained_model(**fields) -> CVAELlamaForCausalLM:
    """A tiny seeded CVAE whose posterior and memory differ from a fresh one's (as after training)."""
    torch.manual_seed(0)
    model = CVAELlamaForCausalLM(tiny_cvae_config(**fields)).eval()
    with torch.no_grad():
        model.encoder.to_latent_mean_logvar[-1].weight.normal_(std=0.5)
    return open_memory_gates(model)


def moved_prior(model: CVAELlamaForCausalLM) -> CVAELlamaForCausalLM:
    with torch.no_grad():
        model.latent_prior.to_latent_mean_logvar[-1].weight.normal_(std=0.5)
    return model


def test_a_fresh_prior_is_the_standard_normal_exactly():
    model = trained_model().add_learned_prior()
    assert model.config.learned_prior and model.latent_prior.mean_norm is None
    with torch.no_grad():
        mean, logvar = model.prior(PROMPTS, MASK)
    assert torch.equal(mean, torch.zeros_like(mean)) and torch.equal(logvar, torch.zeros_like(logvar))
    latents = torch.randn(5, 2, 8)
    zeros = torch.zeros_like(latents)
    assert torch.equal(diagonal_gaussian_log_density(latents, mean, logvar),
                       diagonal_gaussian_log_density(latents, zeros, zeros))  # fmt: skip
    torch.testing.assert_close(diagonal_gaussian_log_density(latents, mean, logvar).sum(-1),
                               -0.5 * (8 * LOG_2PI + (latents**2).sum(-1)))  # fmt: skip
    # its layers start as the posterior encoder's
    assert torch.equal(model.latent_prior.layers[0].mlp.up_proj.weight, model.encoder.layers[0].mlp.up_proj.weight)
    with pytest.raises(ValueError, match="has a learned prior already"):
        model.add_learned_prior()


def test_adding_a_fresh_prior_changes_nothing():
    model = trained_model()
    with torch.no_grad():
        logits = model(PROMPTS, attention_mask=MASK).logits
    torch.manual_seed(3)
    sampled = model.generate(PROMPTS, attention_mask=MASK, max_new_tokens=4, do_sample=False, num_return_sequences=2)
    model.add_learned_prior()
    with torch.no_grad():
        torch.testing.assert_close(model(PROMPTS, attention_mask=MASK).logits, logits, rtol=0, atol=0)
    torch.manual_seed(3)
    again = model.generate(PROMPTS, attention_mask=MASK, max_new_tokens=4, do_sample=False, num_return_sequences=2)
    assert torch.equal(again, sampled)


def test_a_learned_prior_gives_forward_its_mean_and_generate_its_samples():
    model = moved_prior(trained_model().add_learned_prior())
    with torch.no_grad():
        mean, logvar = model.prior(PROMPTS, MASK)
        assert mean.abs().sum() > 0 and logvar.abs().sum() > 0
        torch.testing.assert_close(model(PROMPTS, attention_mask=MASK).logits,
                                   model(PROMPTS, attention_mask=MASK, latent=mean).logits)  # fmt: skip
    # at temperature 0 the sample is the mean; at 1, mean + sigma * eps with the global generator's eps
    cold = model.generate(PROMPTS, attention_mask=MASK, max_new_tokens=4, do_sample=False, latent_temperature=0.0)
    assert torch.equal(cold, model.generate(PROMPTS, attention_mask=MASK, max_new_tokens=4, do_sample=False,
                                            latent=mean))  # fmt: skip
    torch.manual_seed(4)
    samples = model.sample_prior(4, input_ids=PROMPTS, attention_mask=MASK)
    torch.manual_seed(4)
    noise = torch.randn(4, 8)
    expected = mean.repeat_interleave(2, 0) + (0.5 * logvar).exp().repeat_interleave(2, 0) * noise
    torch.testing.assert_close(samples, expected)


def test_a_model_with_a_learned_prior_saves_and_loads_it_bitwise(tmp_path):
    model = moved_prior(trained_model().add_learned_prior())
    model.save_pretrained(tmp_path / "cvae")
    tiny_tokenizer().save_pretrained(tmp_path / "cvae")
    loaded = CVAELlamaForCausalLM.from_pretrained(tmp_path / "cvae")
    assert loaded.config.learned_prior
    for (name, expected), (_, found) in zip(model.latent_prior.state_dict().items(),
                                            loaded.latent_prior.state_dict().items(), strict=True):  # fmt: skip
        assert torch.equal(expected, found), name
    report, found = run_without_cvae_llama(tmp_path, str(tmp_path / "cvae"))
    assert report["installed_modules"] == []
    with torch.no_grad():  # the remote code's forward, with its latent given, and the model's own
        logits = model(found["inputs"]["input_ids"], latent=found["inputs"]["latent"]).logits
    torch.testing.assert_close(found["logits"], logits, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------- latent DPO
def reference_log_ratio(z, mean, logvar) -> float:
    """log N(z; mean, exp(logvar)) - log N(z; 0, I), in float64 Python arithmetic."""
    policy = sum(-0.5 * (math.log(2 * math.pi) + lv + (x - m) ** 2 / math.exp(lv))
                 for x, m, lv in zip(z.tolist(), mean.tolist(), logvar.tolist(), strict=True))  # fmt: skip
    reference = sum(-0.5 * (math.log(2 * math.pi) + x**2) for x in z.tolist())
    return policy - reference


def reference_loss(prior_mean, prior_logvar, chosen, rejected, beta) -> float:
    """The DPO loss written out term by term: the mean over pairs of -log sigmoid(beta * margin)."""
    losses = [
        math.log1p(math.exp(-beta * (reference_log_ratio(chosen[row, pair], prior_mean[row], prior_logvar[row])
                                     - reference_log_ratio(rejected[row, pair], prior_mean[row], prior_logvar[row]))))
        for row in range(chosen.shape[0]) for pair in range(chosen.shape[1])
    ]  # fmt: skip
    return sum(losses) / len(losses)


def test_the_latent_dpo_loss_matches_a_float64_reference():
    generator = torch.Generator().manual_seed(0)
    prior_mean, prior_logvar = torch.randn(3, 4, generator=generator, dtype=torch.float64), \
        0.3 * torch.randn(3, 4, generator=generator, dtype=torch.float64)  # fmt: skip
    chosen = torch.randn(3, 2, 4, generator=generator, dtype=torch.float64)
    rejected = torch.randn(3, 2, 4, generator=generator, dtype=torch.float64)
    loss, chosen_rewards, rejected_rewards = latent_dpo_loss(prior_mean, prior_logvar, chosen, rejected, beta=0.1)
    assert loss.dtype == torch.float64 and chosen_rewards.shape == rejected_rewards.shape == (3, 2)
    assert math.isclose(loss.item(), reference_loss(prior_mean, prior_logvar, chosen, rejected, 0.1), rel_tol=1e-12)
    # a fresh prior (N(0, I)) gives every reward 0 and the loss log 2
    zeros = torch.zeros(3, 4, dtype=torch.float64)
    loss, chosen_rewards, _ = latent_dpo_loss(zeros, zeros, chosen, rejected, beta=0.1)
    assert math.isclose(loss.item(), math.log(2), rel_tol=1e-12) and not chosen_rewards.any()


def test_the_preference_latents_are_the_best_and_worst_of_the_three_sources():
    generator = torch.Generator().manual_seed(1)
    zeros = torch.zeros(2, 3)
    chosen_mean, rejected_mean = torch.full((2, 3), 2.0), torch.full((2, 3), -2.0)
    best, worst = latent_preference_pairs(zeros, zeros, chosen_mean, zeros, rejected_mean, zeros, num_samples=16,
                                          fraction=0.25, generator=generator)  # fmt: skip
    assert best.shape == worst.shape == (2, 12, 3)  # a quarter of 3 x 16

    def score(z):  # log q(z | y_w) - log q(z | y_l) with unit variances: 2 * 2 * sum(z)
        return 4 * z.sum(-1)

    assert (score(best).min(dim=1).values > score(worst).max(dim=1).values).all()
    assert (score(best)[:, :-1] >= score(best)[:, 1:]).all()  # the best first, paired with the worst first


def preference_pairs(count: int = 4) -> Dataset:
    return Dataset.from_dict({
        "prompt": ["w5 w6", "w7", "", "w9 w10"][:count],
        "chosen": ["w11 w12 w13", "w14 w15", "w16 w17", "w18"][:count],
        "rejected": ["w20 w21", "w22 w23 w24", "w25", "w26 w27"][:count],
    })  # fmt: skip


def dpo_config(tmp_path, **overrides) -> LatentDPOConfig:
    values = dict(
        output_dir=str(tmp_path / "dpo"),
        per_device_train_batch_size=2,
        max_steps=3,
        learning_rate=1e-2,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    return LatentDPOConfig(**{**values, **overrides})


def test_the_latent_dpo_trainer_moves_the_prior_and_nothing_else(tmp_path):
    model = trained_model()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    trainer = LatentDPOTrainer(model, dpo_config(tmp_path), train_dataset=preference_pairs(),
                               processing_class=tiny_tokenizer())  # fmt: skip
    assert model.latent_prior is not None  # added, fresh
    trainer.train()
    after = model.state_dict()
    moved = sorted(name for name in after if name not in before or not torch.equal(before[name], after[name]))
    assert moved and all(name.startswith("latent_prior.") for name in moved)
    assert any(name.startswith("latent_prior.to_latent_mean_logvar.2.") for name in moved)  # the read-out left 0
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 3
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert all(math.isfinite(entry[key]) for entry in logged), key
    assert logged[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # a fresh prior: every reward 0


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda tmp_path: dict(args=dpo_config(tmp_path), train_dataset=preference_pairs(0)), "train_dataset is empty"),
        (lambda tmp_path: dict(args=dpo_config(tmp_path), train_dataset=preference_pairs().remove_columns("rejected")),
         r"lacks the column\(s\) \['rejected'\]"),
        (lambda tmp_path: dict(args=dpo_config(tmp_path), train_dataset=None), "train_dataset is required"),
        (lambda tmp_path: dict(args=None, train_dataset=preference_pairs()), "args must be a LatentDPOConfig"),
    ],
)  # fmt: skip
def test_bad_input_is_refused_naming_it(tmp_path, make, match):
    with pytest.raises(ValueError, match=match):
        LatentDPOTrainer(trained_model(), processing_class=tiny_tokenizer(), **make(tmp_path))


@pytest.mark.parametrize("setting, value, match", [
    ("beta", float("nan"), "beta must be a finite positive number"),
    ("beta", 0.0, "beta must be a finite positive number"),
    ("preference_fraction", 0.75, r"preference_fraction must be in \(0, 0.5\]"),
    ("num_latent_samples", 0, "num_latent_samples must be a positive integer"),
])  # fmt: skip
def test_bad_settings_are_refused_naming_them(tmp_path, setting, value, match):
    with pytest.raises(ValueError, match=match):
        dpo_config(tmp_path, **{setting: value})


def test_a_model_that_is_not_a_cvae_is_refused(tmp_path):
    from conftest import tiny_llama_config
    from transformers import LlamaForCausalLM

    with pytest.raises(ValueError, match="CVAELlamaForCausalLM"):
        LatentDPOTrainer(LlamaForCausalLM(tiny_llama_config()), dpo_config(tmp_path),
                         train_dataset=preference_pairs(), processing_class=tiny_tokenizer())  # fmt: skip


# ---------------------------------------------------------------------------------------------------- a prior on its own
def test_a_prior_saves_loads_and_swaps_on_its_own_bitwise(tmp_path):
    from cvae_llama import load_latent_prior, save_latent_prior

    first = moved_prior(trained_model().add_learned_prior())
    save_latent_prior(first, tmp_path / "first")
    second = trained_model().add_learned_prior()
    with torch.no_grad():
        second.latent_prior.to_latent_mean_logvar[-1].weight.normal_(
            std=0.5, generator=torch.Generator().manual_seed(9)
        )
    save_latent_prior(second, tmp_path / "second")

    model = trained_model()  # the same CVAE, without a prior: loading gives it one
    for source, folder in ((first, "first"), (second, "second"), (first, "first")):  # swapped back and forth
        load_latent_prior(model, tmp_path / folder)
        for name, tensor in source.latent_prior.state_dict().items():
            assert torch.equal(model.latent_prior.state_dict()[name], tensor), (folder, name)
        with torch.no_grad():
            assert torch.equal(model.prior(PROMPTS, MASK)[0], source.prior(PROMPTS, MASK)[0])


def test_a_prior_for_another_cvae_or_a_wrong_folder_is_refused(tmp_path):
    from cvae_llama import load_latent_prior, save_latent_prior

    save_latent_prior(trained_model().add_learned_prior(), tmp_path / "prior")
    with pytest.raises(ValueError, match="saved for another CVAE: latent_size 8 \\(the model's: 16\\)"):
        load_latent_prior(trained_model(latent_size=16), tmp_path / "prior")
    with pytest.raises(ValueError, match="holds no latent_prior.json"):
        load_latent_prior(trained_model(), tmp_path)
    with pytest.raises(ValueError, match="has no learned prior to save"):
        save_latent_prior(trained_model(), tmp_path / "none")


# -------------------------------------------------------------------------------- online preferences, reward functions
def test_rewarded_latents_are_the_best_and_worst_of_each_prompt_and_ties_are_left_out():
    from cvae_llama.training.latent_dpo import latent_preferences_from_rewards

    latents = torch.arange(2 * 8 * 3, dtype=torch.float32).view(2, 8, 3)
    rewards = torch.tensor([[0.0, 5, 1, 7, 2, 6, 3, 4], [1.0, 1, 1, 1, 1, 1, 1, 2]])
    chosen, rejected, mask = latent_preferences_from_rewards(latents, rewards, fraction=0.25)
    assert torch.equal(chosen[0], latents[0, [3, 5]]) and torch.equal(rejected[0], latents[0, [0, 2]])
    assert torch.equal(chosen[1, 0], latents[1, 7])
    assert mask.tolist() == [[True, True], [True, False]]  # the second prompt's second pair ties


def test_the_masked_loss_is_the_loss_of_the_pairs_kept():
    generator = torch.Generator().manual_seed(0)
    mean, logvar = torch.randn(2, 3, generator=generator), torch.randn(2, 3, generator=generator) * 0.1
    chosen, rejected = torch.randn(2, 4, 3, generator=generator), torch.randn(2, 4, 3, generator=generator)
    mask = torch.tensor([[True, False, True, True], [False, False, True, False]])
    kept = [(row, column) for row in range(2) for column in range(4) if mask[row, column]]
    reference = torch.stack([
        latent_dpo_loss(mean[row : row + 1], logvar[row : row + 1], chosen[row : row + 1, column : column + 1],
                        rejected[row : row + 1, column : column + 1])[0] for row, column in kept
    ]).mean()  # fmt: skip
    assert latent_dpo_loss(mean, logvar, chosen, rejected, mask=mask)[0].item() == pytest.approx(reference.item())
    mean.requires_grad_(True)
    none_kept = latent_dpo_loss(mean, logvar, chosen, rejected, mask=torch.zeros(2, 4, dtype=torch.bool))[0]
    assert none_kept.item() == 0.0 and none_kept.requires_grad


def test_with_reward_functions_the_pairs_columns_go_to_them(tmp_path):
    seen = {}

    def scorer(completions, chosen, rejected, **kwargs):
        seen.update(chosen=chosen, rejected=rejected)
        return [0.0] * len(completions)

    args = dpo_config(tmp_path, num_generations=2, max_completion_length=2, max_steps=1)
    LatentDPOTrainer(trained_model(), args, train_dataset=preference_pairs(), processing_class=tiny_tokenizer(),
                     reward_funcs=scorer).train()  # fmt: skip
    assert len(seen["chosen"]) == 2 * 2 and seen["chosen"][0] == seen["chosen"][1]


def prompts_with(count: int = 4) -> Dataset:
    return Dataset.from_dict({"prompt": ["w5 w6", "w7", "", "w9 w10"][:count], "goal": [40, 50, 60, 70][:count]})


def test_reward_functions_see_each_prompts_decodings_and_columns_and_train_the_prior_alone(tmp_path):
    model = trained_model()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    calls = []

    def first_token(prompts, completions, completion_ids, goal, **kwargs):
        calls.append((prompts, completions, completion_ids, goal))
        return [float(ids[0]) if ids else 0.0 for ids in completion_ids]

    def length(prompts, completions, **kwargs):
        return [len(text.split()) for text in completions]

    args = dpo_config(tmp_path, num_generations=4, max_completion_length=3, reward_weights=[1.0, 0.5])
    trainer = LatentDPOTrainer(model, args, train_dataset=prompts_with(), processing_class=tiny_tokenizer(),
                               reward_funcs=[first_token, length])  # fmt: skip
    trainer.train()
    prompts, completions, completion_ids, goal = calls[0]
    assert len(prompts) == len(completions) == len(completion_ids) == len(goal) == 2 * 4  # 2 prompts a step
    assert prompts[:4] == [prompts[0]] * 4 and goal[:4] == [goal[0]] * 4 and goal[0] in (40, 50, 60, 70)
    assert all(1 <= len(ids) <= 3 for ids in completion_ids)
    assert completions == tiny_tokenizer().batch_decode(completion_ids, skip_special_tokens=True)
    after = model.state_dict()
    moved = sorted(name for name in after if name not in before or not torch.equal(before[name], after[name]))
    assert moved and all(name.startswith("latent_prior.") for name in moved)
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    for key in ("reward", "reward_std", "rewards/first_token/mean", "rewards/length/mean", "rewards/margins"):
        assert all(math.isfinite(entry[key]) for entry in logged), key


def test_reward_functions_raise_the_reward_of_the_priors_samples(tmp_path):
    model = trained_model()
    tokenizer = tiny_tokenizer()

    def first_token(completion_ids, **kwargs):
        return [float(ids[0]) if ids else 0.0 for ids in completion_ids]

    def mean_reward() -> float:  # of 64 decodings of the prior's samples after one prompt
        torch.manual_seed(1)
        prompt = tokenizer(["w5 w6"], return_tensors="pt")
        output = model.generate(**prompt, num_return_sequences=64, max_new_tokens=1, do_sample=False)
        return output[:, -1].float().mean().item()

    model.add_learned_prior()
    start = mean_reward()
    args = dpo_config(tmp_path, num_generations=8, max_completion_length=1, max_steps=20, learning_rate=3e-2)
    LatentDPOTrainer(model, args, train_dataset=prompts_with(1), processing_class=tokenizer,
                     reward_funcs=first_token).train()  # fmt: skip
    model.eval()
    assert start < 95 and mean_reward() > 97  # the vocabulary's top ids are 98


@pytest.mark.parametrize(
    "reward_funcs, weights, dataset, match",
    [
        ("a-reward-model", None, prompts_with(), "reward_funcs must be callables"),
        ([], None, prompts_with(), "reward_funcs is empty"),
        (len, [1.0, 2.0], prompts_with(), "reward_weights has 2 weights for 1 reward functions"),
        (len, None, preference_pairs().remove_columns("prompt"), r"lacks the column\(s\) \['prompt'\]"),
        (len, None, prompts_with(0), "train_dataset is empty"),
        (None, [1.0], preference_pairs(), r"reward_weights=\[1.0\] weighs reward functions, but reward_funcs is not"),
    ],
)  # fmt: skip
def test_bad_reward_functions_are_refused_naming_them(tmp_path, reward_funcs, weights, dataset, match):
    with pytest.raises(ValueError, match=match):
        LatentDPOTrainer(trained_model(), dpo_config(tmp_path, reward_weights=weights), train_dataset=dataset,
                         processing_class=tiny_tokenizer(), reward_funcs=reward_funcs)  # fmt: skip


@pytest.mark.parametrize("returned, match", [
    (lambda count: [0.0] * (count - 1), "expected 8 finite numbers"),
    (lambda count: [float("nan")] * count, "expected 8 finite numbers"),
    (lambda count: ["good"] * count, "expected 8 numbers"),
])  # fmt: skip
def test_a_reward_function_that_returns_bad_values_is_named(tmp_path, returned, match):
    def scorer(completions, **kwargs):
        return returned(len(completions))

    args = dpo_config(tmp_path, num_generations=4, max_completion_length=2)
    trainer = LatentDPOTrainer(trained_model(), args, train_dataset=prompts_with(), processing_class=tiny_tokenizer(),
                               reward_funcs=scorer)  # fmt: skip
    with pytest.raises(ValueError, match=f"the reward function scorer returned .*{match}"):
        trainer.train()


def test_bad_reward_settings_are_refused_naming_them(tmp_path):
    with pytest.raises(ValueError, match="num_generations must be an integer of at least 2"):
        dpo_config(tmp_path, num_generations=1)
    with pytest.raises(ValueError, match="reward_weights must be finite numbers"):
        dpo_config(tmp_path, reward_weights=[float("inf")])


def test_the_prior_is_its_own_component_and_lora_mode_keeps_it():
    from cvae_llama.training.lora import apply_lora, cvae_modules_to_save, lora_adapter_model

    model = moved_prior(trained_model().add_learned_prior())
    prior = {name: tensor.clone() for name, tensor in model.latent_prior.state_dict().items()}
    breakdown = model.parameter_breakdown()
    assert breakdown["latent_prior"]["trainable"] == sum(p.numel() for p in model.latent_prior.parameters())
    assert breakdown["skip"]["trainable"] == sum(p.numel() for p in model.latent_skip.parameters())
    assert "latent_prior" not in trained_model().parameter_breakdown()
    assert "latent_prior" in cvae_modules_to_save(model) and "latent_prior" not in cvae_modules_to_save(
        trained_model()
    )
    peft_model = apply_lora(model, r=2)
    assert any("latent_prior" in name and parameter.requires_grad for name, parameter in peft_model.named_parameters())
    unwrapped = lora_adapter_model(peft_model)
    assert all(torch.equal(unwrapped.latent_prior.state_dict()[name], tensor) for name, tensor in prior.items())
