"""Statistics of the posteriors q(z | x, y) over one-to-many groups: the one definition that training logs
(`CVAETrainer`) and evaluation reports (`cvae_llama.evaluation`) both call.

A *group* is one prompt `x` with the posteriors of its `M` responses `y_1 .. y_M` (Zhang et al., "Latent Variable
Modeling for Controllable and Diverse Generation From Large Language Models", IEEE TAI 2026: one-to-many data).
Every function takes `latent_mean`, `latent_logvar` of shape `(batch, latent_size)` and optional `group_ids` of shape
`(batch,)` (the group of each row; all rows form one group when None, which makes a within-group statistic a
whole-set one), computes its value **within each group** and returns **the mean over groups**, as a torch tensor in
the dtype of the posteriors (differentiable: the density gap is a training objective).

Conventions, one for every statistic:

- Monte-Carlo estimates draw [`NUM_SAMPLES`] = 16 reparameterised samples per posterior ([`sample_posterior`]: the
  paper's S = 16 of the density gap), unless `latent_samples` `(num_samples, batch, latent_size)` are given. With a
  `generator` the samples are reproducible; without one they come from `modeling_cvae_llama.reparameterize` (the
  model's own noise).
- Variances across a group are unbiased sample variances (divisor `M - 1`, as in Optimus's and He et al.'s code);
  a group of one row has variance 0.
"""

import math
from collections.abc import Sequence

import torch

from . import modeling_cvae_llama
from .modeling_cvae_llama import gaussian_kl


NUM_SAMPLES = 16
LOG_2PI = math.log(2 * math.pi)


# ---------------------------------------------------------------------------------------------------- helpers
def check_posterior(latent_mean: torch.Tensor, latent_logvar: torch.Tensor | None = None) -> None:
    """Raise `ValueError` unless `latent_mean` is `(batch >= 1, latent_size)` and `latent_logvar` (when given) alike."""
    if not isinstance(latent_mean, torch.Tensor) or latent_mean.ndim != 2 or latent_mean.shape[0] == 0:
        shape = tuple(latent_mean.shape) if isinstance(latent_mean, torch.Tensor) else type(latent_mean).__name__
        raise ValueError(f"latent_mean has shape {shape} but expected a tensor of shape (batch >= 1, latent_size)")
    if latent_logvar is not None and (
        not isinstance(latent_logvar, torch.Tensor) or latent_logvar.shape != latent_mean.shape
    ):
        shape = tuple(latent_logvar.shape) if isinstance(latent_logvar, torch.Tensor) else type(latent_logvar).__name__
        raise ValueError(f"latent_logvar has shape {shape} but latent_mean has {tuple(latent_mean.shape)}")


def group_indices(
    group_ids: Sequence[int] | torch.Tensor | None,
    num_rows: int,
    min_size: int = 1,
    device: torch.device | str | None = None,
) -> list[torch.Tensor]:
    """Row indices of each group, in the order of the sorted group ids (all rows form one group when `None`).

    Raises `ValueError` when `group_ids` is not one integer per row, or a group has fewer than `min_size` rows.
    """
    if group_ids is None:
        groups = [torch.arange(num_rows, device=device)]
    else:
        group_ids = torch.as_tensor(group_ids, device=device)
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
    return -0.5 * (LOG_2PI + latent_logvar + (latent - latent_mean).pow(2) * torch.exp(-latent_logvar))


def sample_posterior(
    latent_mean: torch.Tensor,
    latent_logvar: torch.Tensor,
    num_samples: int = NUM_SAMPLES,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """`num_samples` reparameterised samples z = mu + sigma * eps, eps ~ N(0, I), of each posterior:
    `(batch, latent_size)` -> `(num_samples, batch, latent_size)`, differentiable in `latent_mean` and `latent_logvar`.

    With a `generator` the noise is drawn from it (on its device, in the posterior's dtype) in one call of shape
    `(num_samples, batch, latent_size)`; without one, by `modeling_cvae_llama.reparameterize` (the global RNG).
    """
    check_posterior(latent_mean, latent_logvar)
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
    if generator is None:
        return modeling_cvae_llama.reparameterize(latent_mean, latent_logvar, num_samples)
    shape = (num_samples, *latent_mean.shape)
    noise = torch.randn(shape, generator=generator, dtype=latent_mean.dtype, device=generator.device)
    return latent_mean + torch.exp(0.5 * latent_logvar) * noise.to(latent_mean.device)


def _samples(latent_mean, latent_logvar, num_samples, latent_samples, generator) -> torch.Tensor:
    """`latent_samples` checked against the posteriors, or [`sample_posterior`]'s."""
    check_posterior(latent_mean, latent_logvar)
    if latent_samples is None:
        return sample_posterior(latent_mean, latent_logvar, num_samples, generator)
    if latent_samples.ndim != 3 or latent_samples.shape[1:] != latent_mean.shape:
        raise ValueError(
            f"latent_samples has shape {tuple(latent_samples.shape)} but the posteriors expect "
            f"(num_samples, {latent_mean.shape[0]}, {latent_mean.shape[1]})"
        )
    return latent_samples


# ---------------------------------------------------------------------------------------------------- statistics
def kl_to_prior(
    latent_mean: torch.Tensor, latent_logvar: torch.Tensor, group_ids: Sequence[int] | torch.Tensor | None = None
) -> torch.Tensor:
    """KL(q(z | x, y) || N(0, I)) in nats: summed over dimensions, averaged over each group's rows, then over groups.

    Returns:
        `torch.Tensor` of shape `()`.
    """
    check_posterior(latent_mean, latent_logvar)
    kl = gaussian_kl(latent_mean, latent_logvar).sum(-1)  # (batch,)
    groups = group_indices(group_ids, kl.shape[0], device=kl.device)
    return torch.stack([kl[rows].mean() for rows in groups]).mean()


def aggregate_posterior_kl(
    latent_mean: torch.Tensor,
    latent_logvar: torch.Tensor,
    group_ids: Sequence[int] | torch.Tensor | None = None,
    num_samples: int = NUM_SAMPLES,
    latent_samples: torch.Tensor | None = None,
    *,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    r"""KL of each group's aggregated posterior q(z | x) = (1/M) sum_j q_j to N(0, I), per latent dimension.

    With `S` samples `z_{i,s} ~ q_i` of each of the group's posteriors, per dimension `d`:

        KL_{x,d} = mean_{i, s} [ log( (1/M) sum_j N(z_{i,s,d}; mu_{j,d}, sigma^2_{j,d}) ) - log N(z_{i,s,d}; 0, 1) ]

    (a log-sum-exp over the group's `M` posteriors). Summed over `d` this is the group's density gap ([`density_gap`]).

    Returns:
        `torch.Tensor` of shape `(num_groups, latent_size)`, groups in the order of the sorted ids.
    """
    latent_samples = _samples(latent_mean, latent_logvar, num_samples, latent_samples, generator)
    per_group = []
    for rows in group_indices(group_ids, latent_mean.shape[0], device=latent_mean.device):
        samples = latent_samples[:, rows, None, :]  # (S, M_i, 1, d): z_{i,s}
        mean, logvar = latent_mean[rows], latent_logvar[rows]  # (M_j, d)
        log_q = diagonal_gaussian_log_density(samples, mean, logvar)  # (S, M_i, M_j, d): log N(z_{i,s,d}; mu_j, ..)
        log_aggregate = torch.logsumexp(log_q, dim=2) - math.log(len(rows))  # (S, M, d): log q(z_{i,s,d} | x)
        log_prior = diagonal_gaussian_log_density(
            samples[:, :, 0], torch.zeros_like(mean[0]), torch.zeros_like(mean[0])
        )
        per_group.append((log_aggregate - log_prior).mean(dim=(0, 1)))
    return torch.stack(per_group)


def density_gap(
    latent_mean: torch.Tensor,
    latent_logvar: torch.Tensor,
    num_samples: int = NUM_SAMPLES,
    group_ids: Sequence[int] | torch.Tensor | None = None,
    latent_samples: torch.Tensor | None = None,
    *,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The density-gap regulariser R_DG (the density gap of Zhang et al. 2026, from DG-VAE, Zhang et al., NeurIPS
    2022): per group, the sum over latent dimensions of [`aggregate_posterior_kl`],

        R_DG = sum_d mean_{i, s} [ log( (1/M) sum_j N(z_{i,s,d}; mu_{j,d}, sigma_{j,d}^2) ) - log N(z_{i,s,d}; 0, 1) ]

    a Monte-Carlo estimate of sum_d KL(aggregated posterior of the group || N(0, 1)) in dimension d. The samples are
    reparameterised, so the gradient reaches `latent_mean` and `latent_logvar` through the samples and the densities.

    Args:
        latent_mean, latent_logvar (`torch.Tensor` of shape `(batch, latent_size)`): the posteriors.
        num_samples (`int`, defaults to [`NUM_SAMPLES`]): `S`, samples per posterior (unused with `latent_samples`).
        group_ids (`torch.Tensor` of shape `(batch,)`, *optional*):
            The group (prompt) of each row; the aggregate of a row is taken over its group only. When None, all
            rows form one group.
        latent_samples (`torch.Tensor` of shape `(num_samples, batch, latent_size)`, *optional*): the `z_{i,s}`.
        generator (`torch.Generator`, *optional*): for reproducible samples (see [`sample_posterior`]).

    Returns:
        `torch.Tensor` of shape `()`: **the mean over groups** of each group's R_DG (so a batch of groups of equal
        size gives the mean of the groups computed alone, and the loss of a batch does not grow with its size).
    """
    aggregate_kl = aggregate_posterior_kl(
        latent_mean, latent_logvar, group_ids, num_samples, latent_samples, generator=generator
    )
    return aggregate_kl.sum(-1).mean()


def mutual_information(
    latent_mean: torch.Tensor,
    latent_logvar: torch.Tensor,
    group_ids: Sequence[int] | torch.Tensor | None = None,
    num_samples: int = NUM_SAMPLES,
    latent_samples: torch.Tensor | None = None,
    *,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    r"""The mutual information I(y; z | x) within each group, in nats.

    With the group's aggregated posterior q(z | x) = (1/M) sum_j q_j(z), I_x = mean_i KL(q_i || q(z | x)): the
    estimator of Hoffman & Johnson (2016) and He et al. (2019), with `S` samples `z_{i,s} ~ q_i` and the full
    diagonal-Gaussian densities (summed over dimensions):

        I_x = mean_{i, s} [ log q_i(z_{i,s}) - log( (1/M) sum_j q_j(z_{i,s}) ) ]

    I_x lies in [0, log M] up to sampling noise: 0 when the group's posteriors coincide (a group of one row has 0),
    log M when they do not overlap (a group of M responses carries at most log M nats about which one it is).

    Args:
        latent_mean, latent_logvar (`torch.Tensor` of shape `(batch, latent_size)`): the posteriors.
        group_ids (`torch.Tensor` of shape `(batch,)`, *optional*): the group of each row; one group when None.
        num_samples (`int`, defaults to [`NUM_SAMPLES`]): `S` (unused with `latent_samples`).
        latent_samples (`torch.Tensor` of shape `(num_samples, batch, latent_size)`, *optional*): the `z_{i,s}`.
        generator (`torch.Generator`, *optional*): for reproducible samples (see [`sample_posterior`]).

    Returns:
        `torch.Tensor` of shape `()`: the mean of I_x over groups.
    """
    latent_samples = _samples(latent_mean, latent_logvar, num_samples, latent_samples, generator)
    per_group = []
    for rows in group_indices(group_ids, latent_mean.shape[0], device=latent_mean.device):
        samples = latent_samples[:, rows, None, :]  # (S, M_i, 1, d)
        log_q = diagonal_gaussian_log_density(samples, latent_mean[rows], latent_logvar[rows]).sum(-1)  # (S, M, M)
        log_own = log_q.diagonal(dim1=1, dim2=2)  # (S, M): log q_i(z_{i,s})
        log_aggregate = torch.logsumexp(log_q, dim=2) - math.log(len(rows))  # (S, M): log q(z_{i,s} | x)
        per_group.append((log_own - log_aggregate).mean())
    return torch.stack(per_group).mean()


def active_units(
    latent_mean: torch.Tensor,
    group_ids: Sequence[int] | torch.Tensor | None = None,
    threshold: float = 0.01,
) -> torch.Tensor:
    """Active units (Burda et al., 2016) within each group: the number of latent dimensions whose posterior mean
    varies across the group's rows, `Var_i(mu_{i,d}) > threshold`, with the unbiased variance (divisor `M - 1`).

    With `group_ids=None` all rows form one group: the whole-set count of the text-VAE literature (Optimus, with
    `threshold=0.01` over a test set). The paper's in-group AU uses the thresholds 0.03 / 0.1 / 0.3.

    Args:
        latent_mean (`torch.Tensor` of shape `(batch, latent_size)`): the posterior means.
        group_ids (`torch.Tensor` of shape `(batch,)`, *optional*): the group of each row; one group when None.
        threshold (`float`, defaults to 0.01): the variance above which a dimension is active.

    Returns:
        `torch.Tensor` of shape `()`: the mean over groups of the count (a group of one row has none).
    """
    check_posterior(latent_mean)
    counts = []
    for rows in group_indices(group_ids, latent_mean.shape[0], device=latent_mean.device):
        if len(rows) < 2:  # no spread across a single response
            counts.append(latent_mean.new_zeros(()))
            continue
        variance = latent_mean[rows].var(dim=0, correction=1)  # (d,)
        counts.append((variance > threshold).sum().to(latent_mean.dtype))
    return torch.stack(counts).mean()


def consistent_units(
    latent_mean: torch.Tensor,
    latent_logvar: torch.Tensor,
    group_ids: Sequence[int] | torch.Tensor | None = None,
    threshold: float = 0.1,
    num_samples: int = NUM_SAMPLES,
    latent_samples: torch.Tensor | None = None,
    *,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Consistent units (Zhang et al. 2026, the evaluation of the latent): per group, the number of dimensions whose
    aggregated posterior is within `threshold` nats of the prior ([`aggregate_posterior_kl`] `< threshold`).

    All `latent_size` units are consistent when the posteriors equal the prior; a collapsed *or* a well-regularised
    latent scores high, an aggregate that drifts from N(0, 1) (where prior samples land off the decoder's training
    data) scores low. The paper reports the thresholds 0.03 / 0.1 / 0.3.

    Returns:
        `torch.Tensor` of shape `()`: the mean over groups of the count.
    """
    aggregate_kl = aggregate_posterior_kl(
        latent_mean, latent_logvar, group_ids, num_samples, latent_samples, generator=generator
    )
    return (aggregate_kl < threshold).sum(-1).to(aggregate_kl.dtype).mean()


__all__ = [
    "LOG_2PI",
    "NUM_SAMPLES",
    "active_units",
    "aggregate_posterior_kl",
    "check_posterior",
    "consistent_units",
    "density_gap",
    "diagonal_gaussian_log_density",
    "group_indices",
    "kl_to_prior",
    "mutual_information",
    "sample_posterior",
]
