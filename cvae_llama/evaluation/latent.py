"""Latent quality over one-to-many groups: KL to the prior, mutual information, active and consistent units.

A *group* is one prompt `x` with several responses `y_1 .. y_M` sampled from the LM (the one-to-many test data of
Zhang et al., "Latent Variable Modeling for Controllable and Diverse Generation From Large Language Models", IEEE
TAI 2026); `group_ids` gives each posterior's group as an integer. These are the evaluation's views of
`cvae_llama.latent_statistics`, the statistics the trainer logs too: computed in float64, returned as Python numbers
(or dicts of them, one per threshold), and requiring at least 2 responses per prompt where a statistic compares a
prompt's responses. Monte-Carlo estimates draw `(num_samples, batch, latent_size)` noise in one call, from
`generator` when one is given (so a seeded CPU generator makes them reproducible).
"""

from collections.abc import Sequence

import torch

from .. import latent_statistics
from ..latent_statistics import NUM_SAMPLES, check_posterior, diagonal_gaussian_log_density, group_indices
from ..modeling_cvae_llama import gaussian_kl


DEFAULT_THRESHOLDS = (0.03, 0.1, 0.3)


def _float64_samples(latent_mean, latent_logvar, num_samples, generator, latent_samples) -> torch.Tensor:
    """The posteriors' samples as float64: drawn in the posteriors' dtype (the trainer's draw for the same noise), at
    least float32 (a bfloat16 sample would round off a narrow posterior)."""
    if latent_samples is None:
        dtype = torch.promote_types(latent_mean.dtype, torch.float32)
        latent_mean, latent_logvar = latent_mean.to(dtype), latent_logvar.to(dtype)
        latent_samples = latent_statistics.sample_posterior(latent_mean, latent_logvar, num_samples, generator)
    return latent_samples.double()


def _check_thresholds(thresholds):
    if isinstance(thresholds, (int, float)) or len(thresholds) == 0 or any(t <= 0 for t in thresholds):
        raise ValueError(f"thresholds must be a non-empty sequence of positive numbers, got {thresholds!r}")


def kl_per_dimension(latent_mean: torch.Tensor, latent_logvar: torch.Tensor) -> torch.Tensor:
    """KL(q(z|x,y) || N(0, I)) per latent dimension, averaged over the posteriors: `(batch, d)` -> `(d,)`."""
    check_posterior(latent_mean, latent_logvar)
    return gaussian_kl(latent_mean.double(), latent_logvar.double()).mean(dim=0)


def kl_to_prior(latent_mean: torch.Tensor, latent_logvar: torch.Tensor) -> float:
    """KL(q(z|x,y) || N(0, I)) in nats, summed over dimensions and averaged over the posteriors `(batch, d)`."""
    return latent_statistics.kl_to_prior(latent_mean.double(), latent_logvar.double()).item()


def mutual_information(
    latent_mean: torch.Tensor,
    latent_logvar: torch.Tensor,
    group_ids: Sequence[int] | torch.Tensor | None = None,
    num_samples: int = NUM_SAMPLES,
    generator: torch.Generator | None = None,
    latent_samples: torch.Tensor | None = None,
) -> float:
    """I(y; z | x) in nats, averaged over groups: [`cvae_llama.latent_statistics.mutual_information`] (its estimator,
    formula and bounds are documented there, once), as the evaluation reports it.

    What this view adds: float64 arithmetic, a Python `float`, at least 2 posteriors per group (`ValueError`
    otherwise), and `generator` before `latent_samples` among the positional arguments.

    Args:
        latent_mean, latent_logvar (`torch.Tensor` of shape `(batch, latent_size)`): the posteriors.
        group_ids (`torch.Tensor` or sequence of `int` of length `batch`, *optional*):
            The prompt of each posterior (at least 2 per prompt); all posteriors form one group when not given.
        num_samples (`int`, defaults to 16): S, samples per posterior.
        generator (`torch.Generator`, *optional*): for reproducible noise.
        latent_samples (`torch.Tensor` of shape `(num_samples, batch, latent_size)`, *optional*):
            The samples z_{i,s} to use instead of drawing them.

    Returns:
        `float`: the mean of I_x over groups.
    """
    check_posterior(latent_mean, latent_logvar)
    group_indices(group_ids, latent_mean.shape[0], min_size=2)
    samples = _float64_samples(latent_mean, latent_logvar, num_samples, generator, latent_samples)
    value = latent_statistics.mutual_information(
        latent_mean.double(), latent_logvar.double(), group_ids, latent_samples=samples
    )
    return value.item()


def aggregate_posterior_kl(
    latent_mean: torch.Tensor,
    latent_logvar: torch.Tensor,
    group_ids: Sequence[int] | torch.Tensor | None = None,
    num_samples: int = NUM_SAMPLES,
    generator: torch.Generator | None = None,
    latent_samples: torch.Tensor | None = None,
) -> torch.Tensor:
    """KL of each group's aggregated posterior to N(0, 1), per dimension: the float64 view of
    [`cvae_llama.latent_statistics.aggregate_posterior_kl`] (its estimator is documented there). Summed over
    dimensions this is the density gap R_DG of the group (the trainer's `density_gap` averages that sum over groups).
    Arguments as in [`mutual_information`].

    Returns:
        `torch.Tensor` of shape `(num_groups, latent_size)` (float64), groups in the order of the sorted ids.
    """
    check_posterior(latent_mean, latent_logvar)
    samples = _float64_samples(latent_mean, latent_logvar, num_samples, generator, latent_samples)
    return latent_statistics.aggregate_posterior_kl(
        latent_mean.double(), latent_logvar.double(), group_ids, latent_samples=samples
    )


def consistent_units(
    latent_mean: torch.Tensor,
    latent_logvar: torch.Tensor,
    group_ids: Sequence[int] | torch.Tensor | None = None,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    num_samples: int = NUM_SAMPLES,
    generator: torch.Generator | None = None,
    latent_samples: torch.Tensor | None = None,
) -> dict[float, float]:
    """Consistent units: dimensions whose aggregated posterior is within `threshold` nats of the prior
    ([`cvae_llama.latent_statistics.consistent_units`], every threshold on the same samples).

    Per group, a dimension counts when its [`aggregate_posterior_kl`] is below the threshold; the counts are
    averaged over groups (the paper's CU at 0.03 / 0.1 / 0.3).

    Returns:
        `dict`: threshold -> mean number of consistent dimensions per group.
    """
    _check_thresholds(thresholds)
    check_posterior(latent_mean, latent_logvar)
    samples = _float64_samples(latent_mean, latent_logvar, num_samples, generator, latent_samples)
    mean, logvar = latent_mean.double(), latent_logvar.double()
    return {
        float(threshold): latent_statistics.consistent_units(
            mean, logvar, group_ids, threshold, latent_samples=samples
        ).item()
        for threshold in thresholds
    }


def active_units(latent_means: torch.Tensor, delta: float = 0.01) -> int:
    """Active units over a whole set: [`cvae_llama.latent_statistics.active_units`] (its definition and variance
    convention are documented there, once) with all rows one group, as the evaluation reports it.

    What this view adds: float64 arithmetic, a Python `int`, at least 2 posteriors (`ValueError` otherwise), and the
    threshold as the second positional argument `delta`.

    Args:
        latent_means (`torch.Tensor` of shape `(num_posteriors, latent_size)`): posterior means over a test set.
        delta (`float`, defaults to 0.01): the variance threshold.
    """
    check_posterior(latent_means)
    if latent_means.shape[0] < 2:
        raise ValueError(f"latent_means has {latent_means.shape[0]} row(s); active units need at least 2 posteriors")
    return int(latent_statistics.active_units(latent_means.double(), threshold=delta).item())


def in_group_active_units(
    latent_means: torch.Tensor,
    group_ids: Sequence[int] | torch.Tensor,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
) -> dict[float, float]:
    """Active units inside each group: dimensions whose posterior mean varies across one prompt's responses
    ([`cvae_llama.latent_statistics.active_units`], the trainer's logged `active_units` at one threshold).

    Per group, the unbiased variance over its responses of each dimension's posterior mean is compared with each
    threshold; the counts are averaged over groups (the paper's AU at 0.03 / 0.1 / 0.3).

    Returns:
        `dict`: threshold -> mean number of active dimensions per group.
    """
    check_posterior(latent_means)
    _check_thresholds(thresholds)
    group_indices(group_ids, latent_means.shape[0], min_size=2)
    means = latent_means.double()
    return {
        float(threshold): latent_statistics.active_units(means, group_ids, threshold).item()
        for threshold in thresholds
    }


__all__ = [
    "active_units",
    "aggregate_posterior_kl",
    "consistent_units",
    "diagonal_gaussian_log_density",
    "group_indices",
    "in_group_active_units",
    "kl_per_dimension",
    "kl_to_prior",
    "mutual_information",
]
