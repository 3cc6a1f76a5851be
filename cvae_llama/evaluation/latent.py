"""Latent quality over one-to-many groups: KL to the prior, mutual information, active and consistent units.

A *group* is one prompt `x` with several responses `y_1 .. y_M` sampled from the LM (the one-to-many test data of
METHOD.md, section 4); `group_ids` gives each posterior's group as an integer. Monte-Carlo estimates draw their noise
per group, in the order of the sorted group ids, as `torch.randn((num_samples, M, latent_size), generator=...)`, so a
seeded `generator` makes them reproducible.
"""

import math
from collections.abc import Sequence

import torch

from ..modeling_cvae_llama import gaussian_kl


LOG_TWO_PI = math.log(2 * math.pi)
DEFAULT_THRESHOLDS = (0.03, 0.1, 0.3)


def _check_posterior(latent_mean: torch.Tensor, latent_logvar: torch.Tensor | None = None) -> None:
    if not isinstance(latent_mean, torch.Tensor) or latent_mean.ndim != 2 or latent_mean.shape[0] == 0:
        shape = tuple(latent_mean.shape) if isinstance(latent_mean, torch.Tensor) else type(latent_mean).__name__
        raise ValueError(f"latent_mean has shape {shape} but expected a tensor of shape (batch >= 1, latent_size)")
    if latent_logvar is not None and (
        not isinstance(latent_logvar, torch.Tensor) or latent_logvar.shape != latent_mean.shape
    ):
        shape = tuple(latent_logvar.shape) if isinstance(latent_logvar, torch.Tensor) else type(latent_logvar).__name__
        raise ValueError(f"latent_logvar has shape {shape} but latent_mean has {tuple(latent_mean.shape)}")


def group_indices(
    group_ids: Sequence[int] | torch.Tensor | None, num_rows: int, min_size: int = 1
) -> list[torch.Tensor]:
    """Row indices of each group, in the order of the sorted group ids (all rows form one group when `None`).

    Raises `ValueError` when a group has fewer than `min_size` rows.
    """
    if group_ids is None:
        groups = [torch.arange(num_rows)]
    else:
        group_ids = torch.as_tensor(group_ids)
        if group_ids.ndim != 1 or group_ids.shape[0] != num_rows or group_ids.is_floating_point():
            raise ValueError(
                f"group_ids has shape {tuple(group_ids.shape)} and dtype {group_ids.dtype} but expected integer ids "
                f"of shape ({num_rows},), one per posterior"
            )
        groups = [torch.nonzero(group_ids == value).flatten() for value in torch.unique(group_ids)]
    for index, rows in enumerate(groups):
        if rows.numel() < min_size:
            raise ValueError(
                f"group {index} has {rows.numel()} response(s) but in-group metrics need at least {min_size} "
                "responses per prompt (one-to-many data, e.g. from cvae_llama.data.group_responses)"
            )
    return groups


def diagonal_gaussian_log_density(
    latent: torch.Tensor, latent_mean: torch.Tensor, latent_logvar: torch.Tensor
) -> torch.Tensor:
    """log N(z; mu, diag(sigma^2)) per dimension (broadcast shapes); sum over the last axis for the joint density."""
    return -0.5 * (LOG_TWO_PI + latent_logvar + (latent - latent_mean).pow(2) * torch.exp(-latent_logvar))


def kl_per_dimension(latent_mean: torch.Tensor, latent_logvar: torch.Tensor) -> torch.Tensor:
    """KL(q(z|x,y) || N(0, I)) per latent dimension, averaged over the posteriors: `(batch, d)` -> `(d,)`."""
    _check_posterior(latent_mean, latent_logvar)
    return gaussian_kl(latent_mean.double(), latent_logvar.double()).mean(dim=0)


def kl_to_prior(latent_mean: torch.Tensor, latent_logvar: torch.Tensor) -> float:
    """KL(q(z|x,y) || N(0, I)) in nats, summed over dimensions and averaged over the posteriors `(batch, d)`."""
    return kl_per_dimension(latent_mean, latent_logvar).sum().item()


def _group_samples(latent_mean, latent_logvar, group_ids, num_samples, generator, latent_samples, min_size):
    """Yield `(mean (M, d), logvar (M, d), samples (S, M, d))` per group, float64."""
    if latent_samples is not None:
        if latent_samples.ndim != 3 or latent_samples.shape[1:] != latent_mean.shape:
            raise ValueError(
                f"latent_samples has shape {tuple(latent_samples.shape)} but the posteriors expect "
                f"(num_samples, {latent_mean.shape[0]}, {latent_mean.shape[1]})"
            )
    elif isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
    for rows in group_indices(group_ids, latent_mean.shape[0], min_size=min_size):
        mean, logvar = latent_mean[rows].double(), latent_logvar[rows].double()
        if latent_samples is not None:
            samples = latent_samples[:, rows].double()
        else:
            noise = torch.randn((num_samples, *mean.shape), generator=generator, dtype=torch.float64)
            samples = mean + torch.exp(0.5 * logvar) * noise.to(mean.device)
        yield mean, logvar, samples


def mutual_information(
    latent_mean: torch.Tensor,
    latent_logvar: torch.Tensor,
    group_ids: Sequence[int] | torch.Tensor | None = None,
    num_samples: int = 16,
    generator: torch.Generator | None = None,
    latent_samples: torch.Tensor | None = None,
) -> float:
    r"""I(y; z | x) in nats: the in-group Monte-Carlo estimate of the paper, averaged over groups.

    For a group (prompt x) with posteriors q_i = q(z | x, y_i), i = 1..M, and S samples z_{i,s} ~ q_i:

        I_x = mean_{i, s} [ log q_i(z_{i,s}) - log( (1/M) sum_j q_j(z_{i,s}) ) ]

    with full diagonal-Gaussian densities (summed over dimensions) and log-sum-exp. The aggregate
    q(z | x) = (1/M) sum_j q_j is the group's aggregated posterior, so I_x lies in [0, log M] up to sampling noise:
    0 when all responses share one posterior, log M when the posteriors do not overlap.

    Args:
        latent_mean, latent_logvar (`torch.Tensor` of shape `(batch, latent_size)`): the posteriors.
        group_ids (`torch.Tensor` or sequence of `int` of length `batch`, *optional*):
            The prompt of each posterior; all posteriors form one group when not given.
        num_samples (`int`, defaults to 16): S, samples per posterior.
        generator (`torch.Generator`, *optional*): for reproducible noise (CPU generator).
        latent_samples (`torch.Tensor` of shape `(num_samples, batch, latent_size)`, *optional*):
            The samples z_{i,s} to use instead of drawing them.

    Returns:
        `float`: the mean of I_x over groups.
    """
    _check_posterior(latent_mean, latent_logvar)
    values = []
    samples = _group_samples(latent_mean, latent_logvar, group_ids, num_samples, generator, latent_samples, 2)
    for mean, logvar, latent in samples:
        log_q_own = diagonal_gaussian_log_density(latent, mean, logvar).sum(-1)  # (S, M)
        log_q_all = diagonal_gaussian_log_density(latent[:, :, None], mean, logvar).sum(-1)  # (S, M, M)
        log_q_aggregate = torch.logsumexp(log_q_all, dim=-1) - math.log(mean.shape[0])
        values.append((log_q_own - log_q_aggregate).mean())
    return torch.stack(values).mean().item()


def aggregate_posterior_kl(
    latent_mean: torch.Tensor,
    latent_logvar: torch.Tensor,
    group_ids: Sequence[int] | torch.Tensor | None = None,
    num_samples: int = 16,
    generator: torch.Generator | None = None,
    latent_samples: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""KL of each group's aggregated posterior to N(0, 1), per dimension, estimated like the DG term.

        KL_{x,d} = mean_{i, s} [ log( (1/M) sum_j N(z_{i,s,d}; mu_{j,d}, sigma^2_{j,d}) ) - log N(z_{i,s,d}; 0, 1) ]

    with z_{i,s} ~ q(z | x, y_i) (METHOD.md, section 2). Summed over d this is the density gap R_DG of the group
    (`cvae_llama.trainer.density_gap` averages that sum over groups). Arguments as in [`mutual_information`].

    Returns:
        `torch.Tensor` of shape `(num_groups, latent_size)` (float64), groups in the order of the sorted ids.
    """
    _check_posterior(latent_mean, latent_logvar)
    values = []
    samples = _group_samples(latent_mean, latent_logvar, group_ids, num_samples, generator, latent_samples, 1)
    for mean, logvar, latent in samples:  # latent: (S, M, d)
        log_q_all = diagonal_gaussian_log_density(latent[:, :, None], mean, logvar)  # (S, M, M, d)
        log_q_aggregate = torch.logsumexp(log_q_all, dim=2) - math.log(mean.shape[0])  # (S, M, d)
        log_prior = diagonal_gaussian_log_density(latent, torch.zeros_like(latent), torch.zeros_like(latent))
        values.append((log_q_aggregate - log_prior).mean(dim=(0, 1)))
    return torch.stack(values)


def consistent_units(
    latent_mean: torch.Tensor,
    latent_logvar: torch.Tensor,
    group_ids: Sequence[int] | torch.Tensor | None = None,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    num_samples: int = 16,
    generator: torch.Generator | None = None,
    latent_samples: torch.Tensor | None = None,
) -> dict[float, float]:
    """Consistent units: dimensions whose aggregated posterior is within `threshold` nats of the prior.

    Per group, a dimension counts when its [`aggregate_posterior_kl`] is below the threshold; the counts are
    averaged over groups (the paper's CU at 0.03 / 0.1 / 0.3). All `latent_size` units are consistent when the
    posteriors equal the prior; a collapsed *or* a well-regularised latent scores high, an aggregate that drifts
    from N(0, 1) (where prior samples land off the decoder's training data) scores low.

    Returns:
        `dict`: threshold -> mean number of consistent dimensions per group.
    """
    _check_thresholds(thresholds)
    kl = aggregate_posterior_kl(latent_mean, latent_logvar, group_ids, num_samples, generator, latent_samples)
    return {float(threshold): (kl < threshold).sum(-1).double().mean().item() for threshold in thresholds}


def active_units(latent_means: torch.Tensor, delta: float = 0.01) -> int:
    """Active units over a whole set (Burda et al., 2016): dimensions d with Var_set(E_q[z_d]) > `delta`.

    Args:
        latent_means (`torch.Tensor` of shape `(num_posteriors, latent_size)`): posterior means over a test set.
        delta (`float`, defaults to 0.01): the variance threshold.

    The variance is the unbiased sample variance (divisor `num_posteriors - 1`), as in Optimus' code.
    """
    _check_posterior(latent_means)
    if latent_means.shape[0] < 2:
        raise ValueError(f"latent_means has {latent_means.shape[0]} row(s); active units need at least 2 posteriors")
    return int((latent_means.double().var(dim=0) > delta).sum().item())


def in_group_active_units(
    latent_means: torch.Tensor,
    group_ids: Sequence[int] | torch.Tensor,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
) -> dict[float, float]:
    """Active units inside each group: dimensions whose posterior mean varies across one prompt's responses.

    Per group, the unbiased variance over its responses of each dimension's posterior mean is compared with each
    threshold; the counts are averaged over groups (the paper's AU at 0.03 / 0.1 / 0.3).

    Returns:
        `dict`: threshold -> mean number of active dimensions per group.
    """
    _check_posterior(latent_means)
    _check_thresholds(thresholds)
    groups = group_indices(group_ids, latent_means.shape[0], min_size=2)
    variances = torch.stack([latent_means[rows].double().var(dim=0) for rows in groups])  # (num_groups, d)
    return {float(threshold): (variances > threshold).sum(-1).double().mean().item() for threshold in thresholds}


def _check_thresholds(thresholds):
    if isinstance(thresholds, (int, float)) or len(thresholds) == 0 or any(t <= 0 for t in thresholds):
        raise ValueError(f"thresholds must be a non-empty sequence of positive numbers, got {thresholds!r}")


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
