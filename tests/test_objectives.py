"""The objectives' math (cvae_llama.trainer's pure functions) against direct, independent computations."""

import math

import pytest
import torch
from transformers import HfArgumentParser

from cvae_llama.trainer import (
    OBJECTIVES,
    CVAETrainingArguments,
    active_units,
    bag_of_words_nll,
    cyclical_beta,
    density_gap,
    free_bits_kl,
    gaussian_kl,
    mutual_information,
)


def posterior(batch: int = 5, size: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    latent_mean = torch.randn(batch, size, generator=generator)
    latent_logvar = 0.5 * torch.randn(batch, size, generator=generator)
    return latent_mean, latent_logvar


def log_normal(x: float, mean: float, logvar: float) -> float:
    return -0.5 * (math.log(2 * math.pi) + logvar + (x - mean) ** 2 / math.exp(logvar))


# ---------------------------------------------------------------------------------------------------- KL
def test_gaussian_kl_matches_closed_form_and_torch_distributions():
    latent_mean = torch.tensor([[0.0, 1.0, -2.0], [0.5, 0.0, 3.0]])
    latent_logvar = torch.tensor([[0.0, -1.0, 0.5], [2.0, 0.3, -0.2]])
    expected = torch.tensor(
        [
            [0.5 * (m**2 + math.exp(lv) - lv - 1) for m, lv in zip(means, logvars, strict=True)]
            for means, logvars in zip(latent_mean.tolist(), latent_logvar.tolist(), strict=True)
        ]
    )
    torch.testing.assert_close(gaussian_kl(latent_mean, latent_logvar), expected)
    reference = torch.distributions.kl_divergence(
        torch.distributions.Normal(latent_mean, torch.exp(0.5 * latent_logvar)), torch.distributions.Normal(0.0, 1.0)
    )
    torch.testing.assert_close(gaussian_kl(latent_mean, latent_logvar), reference)
    assert gaussian_kl(torch.zeros(1, 4), torch.zeros(1, 4)).abs().max() == 0


# ---------------------------------------------------------------------------------------------------- free bits
def test_free_bits_clamps_each_dimension_of_the_batch_averaged_kl():
    latent_mean = torch.tensor([[0.1, 2.0, 0.0], [0.3, 1.0, 0.0]], requires_grad=True)
    latent_logvar = torch.zeros(2, 3, requires_grad=True)
    # batch-averaged KL per dimension: 0.5 * mean(mu^2) = 0.0125, 1.25, 0.0
    kl_per_dim = [0.5 * (0.1**2 + 0.3**2) / 2, 0.5 * (4.0 + 1.0) / 2, 0.0]
    free_bits = 0.5
    expected = sum(max(kl, free_bits) for kl in kl_per_dim)  # 0.5 + 1.25 + 0.5
    value = free_bits_kl(latent_mean, latent_logvar, free_bits)
    torch.testing.assert_close(value, torch.tensor(expected))
    value.backward()
    # a dimension under lambda gets no gradient; one above gets the KL's
    assert latent_mean.grad[:, 0].abs().max() == 0
    torch.testing.assert_close(latent_mean.grad[:, 1], latent_mean.detach()[:, 1] / 2)
    # lambda = 0 is the plain KL
    torch.testing.assert_close(
        free_bits_kl(latent_mean, latent_logvar, 0.0), gaussian_kl(latent_mean, latent_logvar).mean(0).sum()
    )


def test_free_bits_averages_per_group():
    latent_mean, latent_logvar = posterior(batch=5)
    group_ids = torch.tensor([0, 0, 1, 1, 1])
    alone = [free_bits_kl(latent_mean[rows], latent_logvar[rows], 0.3) for rows in (slice(0, 2), slice(2, 5))]
    torch.testing.assert_close(free_bits_kl(latent_mean, latent_logvar, 0.3, group_ids), sum(alone) / 2)


# ---------------------------------------------------------------------------------------------------- cyclical
@pytest.mark.parametrize(
    "step, expected",
    [
        (0, 0.0),
        (12, 0.0),  # tau 0.48: first half of the cycle
        (13, 0.08),  # tau 0.52: (0.52 - 0.5) / 0.25
        (15, 0.4),  # tau 0.6
        (18, 0.88),  # tau 0.72
        (19, 1.0),  # tau 0.76: past 3/4
        (24, 1.0),
        (25, 0.0),  # second cycle starts
        (44, 1.0),  # tau 0.76 of cycle 2
        (99, 1.0),
        (100, 0.0),  # past the end, the cycles go on
    ],
)
def test_cyclical_beta_at_chosen_steps(step, expected):
    assert cyclical_beta(step, total_steps=100, num_cycles=4) == pytest.approx(expected)


def test_cyclical_beta_phases_are_configurable():
    # one cycle of 10 steps, zero for the first 20 %, linear to 1 at 60 %
    values = [cyclical_beta(step, 10, num_cycles=1, zero_fraction=0.2, ramp_end=0.6) for step in range(10)]
    assert values == pytest.approx([0, 0, 0, 0.25, 0.5, 0.75, 1, 1, 1, 1])
    # zero_fraction == ramp_end is a step function
    assert [cyclical_beta(s, 4, 1, 0.5, 0.5) for s in range(4)] == [0, 0, 1, 1]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(step=-1, total_steps=10), "step"),
        (dict(step=0, total_steps=0), "total_steps"),
        (dict(step=0, total_steps=10, num_cycles=0), "num_cycles"),
        (dict(step=0, total_steps=10, zero_fraction=0.8, ramp_end=0.5), "zero_fraction"),
        (dict(step=0, total_steps=10, zero_fraction=0.5, ramp_end=1.5), "ramp_end"),
    ],
)
def test_cyclical_beta_bad_input(kwargs, message):
    with pytest.raises(ValueError, match=message):
        cyclical_beta(**kwargs)


# ---------------------------------------------------------------------------------------------------- density gap
def density_gap_by_loops(latent_mean, latent_logvar, latent_samples, group_ids) -> float:
    """The density gap R_DG of Zhang et al. 2026 with python loops over groups, d, i, s and j (math.log / math.exp,
    float64)."""
    mean, logvar, samples = latent_mean.tolist(), latent_logvar.tolist(), latent_samples.tolist()
    groups = {}
    for row, group in enumerate(group_ids.tolist()):
        groups.setdefault(group, []).append(row)
    values = []
    for rows in groups.values():
        total = 0.0
        for d in range(len(mean[0])):
            terms = []
            for i in rows:
                for s in range(len(samples)):
                    z = samples[s][i][d]
                    aggregate = sum(math.exp(log_normal(z, mean[j][d], logvar[j][d])) for j in rows) / len(rows)
                    terms.append(math.log(aggregate) - log_normal(z, 0.0, 0.0))
            total += sum(terms) / len(terms)
        values.append(total)
    return sum(values) / len(values)


def test_density_gap_matches_a_loop_computation():
    latent_mean, latent_logvar = posterior(batch=7, size=4)
    group_ids = torch.tensor([3, 3, 3, 0, 0, 1, 1])  # any ids, any order: rows of equal id form a group
    noise = torch.randn(6, 7, 4, generator=torch.Generator().manual_seed(1))
    latent_samples = latent_mean + torch.exp(0.5 * latent_logvar) * noise
    value = density_gap(latent_mean, latent_logvar, group_ids=group_ids, latent_samples=latent_samples)
    expected = density_gap_by_loops(latent_mean, latent_logvar, latent_samples, group_ids)
    assert value.item() == pytest.approx(expected, abs=1e-5)
    # and with all rows in one group
    value = density_gap(latent_mean, latent_logvar, latent_samples=latent_samples)
    expected = density_gap_by_loops(latent_mean, latent_logvar, latent_samples, torch.zeros(7, dtype=torch.long))
    assert value.item() == pytest.approx(expected, abs=1e-5)


def test_density_gap_of_two_groups_is_the_mean_of_each_alone():
    latent_mean, latent_logvar = posterior(batch=6, size=3, seed=2)
    latent_samples = latent_mean + torch.exp(0.5 * latent_logvar) * torch.randn(5, 6, 3)
    group_ids = torch.tensor([0, 0, 0, 1, 1, 1])
    both = density_gap(latent_mean, latent_logvar, group_ids=group_ids, latent_samples=latent_samples)
    alone = [
        density_gap(latent_mean[rows], latent_logvar[rows], latent_samples=latent_samples[:, rows])
        for rows in (slice(0, 3), slice(3, 6))
    ]
    torch.testing.assert_close(both, (alone[0] + alone[1]) / 2)
    # the aggregate never mixes groups: the two-group value is not the one-group value of all rows
    assert not torch.allclose(both, density_gap(latent_mean, latent_logvar, latent_samples=latent_samples))


def test_density_gap_is_zero_when_the_aggregate_is_the_prior_and_has_gradients():
    zeros = torch.zeros(4, 3)
    assert density_gap(zeros, zeros, num_samples=8).abs().max() < 1e-6
    latent_mean, latent_logvar = posterior(batch=4, size=3)
    latent_mean.requires_grad_(True)
    latent_logvar.requires_grad_(True)
    torch.manual_seed(0)
    value = density_gap(latent_mean, latent_logvar, num_samples=16)
    assert torch.isfinite(value) and value > 0  # these posteriors are far from the prior
    value.backward()
    assert latent_mean.grad.abs().sum() > 0 and latent_logvar.grad.abs().sum() > 0


def test_density_gap_is_finite_for_extreme_log_variances():
    latent_mean = torch.tensor([[0.0, 30.0], [1.0, -30.0]])
    latent_logvar = torch.tensor([[-10.0, 10.0], [-10.0, -10.0]])
    assert torch.isfinite(density_gap(latent_mean, latent_logvar, num_samples=4))


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda m, v: density_gap(m, v[:, :2]), "latent_logvar"),
        (lambda m, v: density_gap(m, v, num_samples=0), "num_samples"),
        (lambda m, v: density_gap(m, v, group_ids=torch.zeros(3, dtype=torch.long)), "group_ids"),
        (lambda m, v: density_gap(m, v, latent_samples=torch.zeros(2, 4, 3)), "latent_samples"),
        (lambda m, v: density_gap(m[:0], v[:0]), "batch >= 1"),
        (lambda m, v: free_bits_kl(m, v, -1.0), "free_bits"),
        (lambda m, v: mutual_information(m, v, num_samples=0), "num_samples"),
    ],
)
def test_objective_functions_bad_input(call, message):
    latent_mean, latent_logvar = posterior(batch=5, size=3)
    with pytest.raises(ValueError, match=message):
        call(latent_mean, latent_logvar)


# ---------------------------------------------------------------------------------------------------- logging metrics
def test_mutual_information_matches_loops_and_its_bounds():
    latent_mean, latent_logvar = posterior(batch=4, size=2, seed=3)
    samples = latent_mean + torch.exp(0.5 * latent_logvar) * torch.randn(3, 4, 2)
    value = mutual_information(latent_mean, latent_logvar, latent_samples=samples)
    mean, logvar, z = latent_mean.tolist(), latent_logvar.tolist(), samples.tolist()

    def log_q(j, point):
        return sum(log_normal(point[d], mean[j][d], logvar[j][d]) for d in range(2))

    terms = [
        log_q(i, z[s][i]) - math.log(sum(math.exp(log_q(j, z[s][i])) for j in range(4)) / 4)
        for s in range(3)
        for i in range(4)
    ]
    assert value.item() == pytest.approx(sum(terms) / len(terms), abs=1e-5)
    assert value <= math.log(4) + 1e-6
    # identical posteriors carry no information about which response it is
    same_mean, same_logvar = latent_mean[:1].expand(4, -1), latent_logvar[:1].expand(4, -1)
    assert mutual_information(same_mean, same_logvar).abs() < 1e-6
    # far-apart posteriors carry log M
    far = torch.tensor([[0.0], [100.0], [200.0], [300.0]])
    assert mutual_information(far, torch.zeros(4, 1)).item() == pytest.approx(math.log(4), abs=1e-4)


def test_active_units_counts_dimensions_that_vary_within_each_group():
    # group 0: dimension 0 varies (variance 1), dimension 1 barely (variance 1e-4); group 1: both vary
    latent_mean = torch.tensor([[1.0, 0.01, 0.0], [-1.0, -0.01, 0.0], [0.0, 0.0, 0.0], [2.0, 2.0, 0.0]])
    group_ids = torch.tensor([0, 0, 1, 1])
    assert active_units(latent_mean, group_ids).item() == pytest.approx((1 + 2) / 2)
    assert active_units(latent_mean, group_ids, threshold=2.0).item() == 0
    assert active_units(latent_mean[:1]).item() == 0  # a group of one row has no active unit


def test_bag_of_words_nll_scores_the_shifted_response_tokens():
    bow_logits = torch.randn(2, 7)
    labels = torch.tensor([[-100, -100, 3, 4], [-100, 5, 6, -100]])
    log_probs = torch.log_softmax(bow_logits, -1)
    # labels[:, 1:] are the tokens the reconstruction scores: 3, 4 (row 0) and 5, 6 (row 1)
    expected = -(log_probs[0, 3] + log_probs[0, 4] + log_probs[1, 5] + log_probs[1, 6])
    torch.testing.assert_close(bag_of_words_nll(bow_logits, labels), expected)


# ---------------------------------------------------------------------------------------------------- arguments
def test_training_arguments_parse_from_the_command_line(tmp_path):
    (args,) = HfArgumentParser(CVAETrainingArguments).parse_args_into_dataclasses(
        [
            "--output_dir", str(tmp_path),
            "--objective", "optimus",
            "--kl_weight", "0.5",
            "--free_bits", "0.25",
            "--num_cycles", "2",
            "--cycle_zero_fraction", "0.4",
            "--cycle_ramp_end", "0.9",
            "--dg_samples", "8",
            "--dg_grouping", "batch",
            "--bow_weight", "2",
            "--reconstruction_reduction", "token",
            "--max_prompt_tokens", "8",
            "--max_response_tokens", "32",
            "--lora_target_modules", "q_proj", "v_proj",
        ]
    )  # fmt: skip
    assert (args.objective, args.kl_weight, args.free_bits, args.num_cycles) == ("optimus", 0.5, 0.25, 2)
    assert (args.cycle_zero_fraction, args.cycle_ramp_end, args.dg_samples, args.dg_grouping) == (0.4, 0.9, 8, "batch")
    assert (args.bow_weight, args.max_prompt_tokens, args.max_response_tokens) == (2.0, 8, 32)
    assert args.reconstruction_reduction == "token"
    assert args.lora_target_modules == ["q_proj", "v_proj"]
    defaults = CVAETrainingArguments(output_dir=str(tmp_path))
    assert (defaults.objective, defaults.kl_weight, defaults.dg_samples) == ("dg", 1.0, 16)
    assert defaults.reconstruction_reduction == "sequence"
    assert defaults.remove_unused_columns is False
    # the bag-of-words loss: on by default for objective bow only, and addable to any objective
    assert defaults.bow_weight == 0.0
    assert CVAETrainingArguments(output_dir=str(tmp_path), objective="bow").bow_weight == 1.0
    assert CVAETrainingArguments(output_dir=str(tmp_path), objective="bow", bow_weight=0.0).bow_weight == 0.0
    assert CVAETrainingArguments(output_dir=str(tmp_path), bow_weight=3.0).bow_weight == 3.0


def test_training_arguments_reject_an_unknown_objective_on_the_command_line(tmp_path):
    with pytest.raises(SystemExit):  # argparse's choices
        HfArgumentParser(CVAETrainingArguments).parse_args_into_dataclasses(
            ["--output_dir", str(tmp_path), "--objective", "elbo"]
        )


@pytest.mark.parametrize(
    "field, value",
    [
        ("objective", "elbo"),
        ("dg_grouping", "prompt"),
        ("reconstruction_reduction", "mean"),
        ("kl_weight", -1.0),
        ("kl_weight", float("nan")),
        ("free_bits", -0.5),
        ("bow_weight", -1.0),
        ("num_cycles", 0),
        ("dg_samples", 0),
        ("max_prompt_tokens", 0),
        ("max_response_tokens", 0),
        ("cycle_zero_fraction", 0.9),  # > cycle_ramp_end
        ("cycle_ramp_end", 1.5),
        ("lora_r", 0),
        ("lora_alpha", 0.0),
        ("lora_dropout", 1.0),
    ],
)
def test_training_arguments_bad_values_name_the_field(tmp_path, field, value):
    with pytest.raises(ValueError, match=field):
        CVAETrainingArguments(output_dir=str(tmp_path), **{field: value})


def test_every_objective_is_accepted(tmp_path):
    for objective in OBJECTIVES:
        assert CVAETrainingArguments(output_dir=str(tmp_path), objective=objective).objective == objective


def test_every_objective_has_a_regulariser_and_a_beta_schedule(tmp_path):
    from cvae_llama.training.objectives import BETA_SCHEDULES, REGULARISERS, free_bits_term, kl_term

    assert tuple(REGULARISERS) == tuple(BETA_SCHEDULES) == OBJECTIVES
    assert REGULARISERS["optimus"] is REGULARISERS["free_bits"] is free_bits_term
    assert REGULARISERS["cyclical"] is REGULARISERS["bow"] is REGULARISERS["kl"] is kl_term
    args = CVAETrainingArguments(output_dir=str(tmp_path), kl_weight=0.5, num_cycles=1)
    for objective, schedule in BETA_SCHEDULES.items():  # 5 of 8 steps: the cyclical schedule's beta is 0.5
        expected = 0.5 * (cyclical_beta(5, 8, num_cycles=1) if objective in ("cyclical", "optimus") else 1.0)
        assert schedule(5, 8, args) == expected, objective
