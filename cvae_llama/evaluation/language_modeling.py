"""Language modelling with the latent marginalised: importance-weighted NLL, perplexity and the negative ELBO.

A *batch* is what `cvae_llama.data.OneToManyCollator` returns: `input_ids` and `attention_mask` of `x + y` (left
padding) and `labels` with -100 on the prompt and the padding. Only the response tokens are scored.
"""

import math
from collections.abc import Mapping

import torch

from ..latent_statistics import diagonal_gaussian_log_density, sample_posterior
from ..modeling_cvae_llama import gaussian_kl
from .utils import check_cvae, prior_latents


def _check_batch(batch: Mapping[str, torch.Tensor]) -> None:
    missing = [key for key in ("input_ids", "attention_mask", "labels") if key not in batch]
    if missing:
        raise ValueError(
            f"batch lacks {missing}; expected input_ids, attention_mask and labels (as the OneToManyCollator returns)"
        )
    if batch["labels"].shape != batch["input_ids"].shape:
        raise ValueError(
            f"labels has shape {tuple(batch['labels'].shape)} but input_ids has {tuple(batch['input_ids'].shape)}"
        )
    if (count_response_tokens(batch["labels"]) == 0).any():
        raise ValueError("a row of labels has no response token (all -100): nothing to score")


def count_response_tokens(labels: torch.Tensor) -> torch.Tensor:
    """Scored tokens per sequence, `(batch, seq)` -> `(batch,)`: labels other than -100, after the shift."""
    return (labels[:, 1:] != -100).sum(-1)


def _labelled_log_likelihood(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed log-probability of the labelled tokens (labels shifted as in `LlamaForCausalLM`), `(batch,)`."""
    targets = labels[:, 1:]
    scored = targets != -100
    log_probs = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, targets.clamp(min=0)[..., None])
    return (log_probs.squeeze(-1) * scored).sum(-1)


@torch.no_grad()
def response_log_likelihood(model, batch: Mapping[str, torch.Tensor], latent: torch.Tensor) -> torch.Tensor:
    """log p(y | x, z): the summed log-probability of the labelled tokens given `latent`, `(batch,)`, float32."""
    logits = model(
        input_ids=batch["input_ids"].to(model.device),
        attention_mask=batch["attention_mask"].to(model.device),
        latent=latent,
    ).logits
    return _labelled_log_likelihood(logits, batch["labels"].to(model.device))


@torch.no_grad()
def causal_lm_nll(llm, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """-log p(y | x) of each response under a plain causal LM (the base LM, for comparison), `(batch,)`, float32.

    Positions are counted from the first real token, as `generate` does with left padding.
    """
    _check_batch(batch)
    device = next(llm.parameters()).device
    attention_mask = batch["attention_mask"].to(device)
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    logits = llm(
        input_ids=batch["input_ids"].to(device), attention_mask=attention_mask, position_ids=position_ids
    ).logits
    return -_labelled_log_likelihood(logits, batch["labels"].to(device)).cpu()


def check_prior_samples(
    prior_samples, num_samples: int, name: str = "prior_samples", bound_name: str = "num_samples"
) -> int:
    """`prior_samples` if it is an integer from 0 to `num_samples`; else `ValueError` naming both and the value."""
    if isinstance(prior_samples, bool) or not isinstance(prior_samples, int) or not 0 <= prior_samples <= num_samples:
        raise ValueError(f"{name} must be an integer from 0 to {bound_name} ({num_samples}), got {prior_samples!r}")
    return prior_samples


def _posterior(model, batch):
    """The posterior means and log-variances of the batch, float32."""
    latent_mean, latent_logvar = model.encode(
        batch["input_ids"].to(model.device), batch["attention_mask"].to(model.device)
    )
    return latent_mean.float(), latent_logvar.float()


def _posterior_samples(model, batch, num_samples, generator):
    """The posteriors of the batch (float32) and `num_samples` reparameterised samples of each, one `(batch, d)` at a
    time (drawn together by `cvae_llama.latent_statistics.sample_posterior`)."""
    latent_mean, latent_logvar = _posterior(model, batch)
    for latent in sample_posterior(latent_mean, latent_logvar, num_samples, generator):
        yield latent_mean, latent_logvar, latent


@torch.no_grad()
def importance_weighted_nll(
    model,
    batch: Mapping[str, torch.Tensor],
    num_samples: int = 32,
    generator: torch.Generator | None = None,
    prior_samples: int = 0,
) -> torch.Tensor:
    r"""-log p(y | x) per response, estimated with `num_samples` posterior samples as the proposal (Burda et al.).

        -log p(y|x) ~= -log( (1/k) sum_s exp( log p(y|x,z_s) + log p(z_s) - log r(z_s) ) ),  r = q(z|x,y)

    with p(z) = N(0, I), computed with log-sum-exp. In expectation it is an upper bound of the true NLL that
    tightens as k grows, and at most the negative ELBO (k = 1 gives the single-sample ELBO).

    With `prior_samples` = m > 0, m of the k samples are drawn from the prior instead, and every weight divides by the
    mixture the samples come from, r = ((k - m) q(z|x,y) + m p(z)) / k (defensive importance sampling, Hesterberg,
    1995; the balance heuristic of Veach and Guibas, 1995). The mean weight is still unbiased for p(y | x), so the
    estimate is still an upper bound of the NLL in expectation; but a weight is at most (k / m) p(y | x, z), so a
    posterior much sharper than the true one (which makes the plain estimate loose) costs at most log(k / m) nats
    beyond what prior samples alone would give.

    Args:
        model ([`CVAELlamaForCausalLM`]): the CVAE (evaluated as it is; call `.eval()` first).
        batch (`dict`): `input_ids`, `attention_mask` (left padding) and `labels` (-100 except the response).
        num_samples (`int`, defaults to 32): k.
        generator (`torch.Generator`, *optional*): CPU generator for reproducible samples.
        prior_samples (`int`, defaults to 0): m, how many of the k samples come from the prior (0 to k).

    Returns:
        `torch.Tensor` of shape `(batch,)`: the NLL of each response in nats (float32).
    """
    check_cvae(model)
    _check_batch(batch)
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
    check_prior_samples(prior_samples, num_samples)
    latent_mean, latent_logvar = _posterior(model, batch)
    batch_size, latent_size = latent_mean.shape
    posterior_samples = num_samples - prior_samples
    latents = [sample_posterior(latent_mean, latent_logvar, posterior_samples, generator)] if posterior_samples else []
    if prior_samples:
        prior = prior_latents(model, prior_samples * batch_size, generator=generator).to(latent_mean.device)
        latents.append(prior.view(prior_samples, batch_size, latent_size))
    latents = torch.cat(latents)  # (k, batch, d): the posterior's samples, then the prior's
    log_prior = diagonal_gaussian_log_density(latents, torch.zeros_like(latents), torch.zeros_like(latents)).sum(-1)
    log_posterior = diagonal_gaussian_log_density(latents, latent_mean, latent_logvar).sum(-1)
    # log r(z) = log( ((k - m) q(z|x,y) + m p(z)) / k ); a zero share is log 0 = -inf, which logsumexp ignores
    shares = torch.tensor([posterior_samples / num_samples, prior_samples / num_samples], device=latents.device)
    log_proposal = torch.logsumexp(torch.stack([log_posterior, log_prior]) + shares.log().view(2, 1, 1), dim=0)
    log_weights = (
        torch.stack([response_log_likelihood(model, batch, latent.to(model.dtype)) for latent in latents])
        + log_prior
        - log_proposal
    )  # (k, batch)
    return -(torch.logsumexp(log_weights, dim=0) - math.log(num_samples)).cpu()


@torch.no_grad()
def negative_elbo(
    model, batch: Mapping[str, torch.Tensor], num_samples: int = 1, generator: torch.Generator | None = None
) -> torch.Tensor:
    r"""-ELBO per response: -E_q[log p(y | x, z)] (Monte Carlo, `num_samples` posterior samples) + KL(q || N(0, I)).

    Returns:
        `torch.Tensor` of shape `(batch,)` in nats (float32).
    """
    check_cvae(model)
    _check_batch(batch)
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
    reconstruction, kl = 0.0, None
    for latent_mean, latent_logvar, latent in _posterior_samples(model, batch, num_samples, generator):
        reconstruction = reconstruction - response_log_likelihood(model, batch, latent.to(model.dtype)) / num_samples
        kl = gaussian_kl(latent_mean, latent_logvar).sum(-1)
    return (reconstruction + kl).cpu()


def perplexity(nll: torch.Tensor, num_tokens: torch.Tensor) -> float:
    """Per-token perplexity exp(sum NLL / sum tokens) of responses with summed NLLs `nll` and lengths `num_tokens`."""
    nll, num_tokens = torch.as_tensor(nll, dtype=torch.float64), torch.as_tensor(num_tokens, dtype=torch.float64)
    if nll.shape != num_tokens.shape or num_tokens.sum() <= 0:
        raise ValueError(
            f"nll has shape {tuple(nll.shape)} and num_tokens {tuple(num_tokens.shape)} (total "
            f"{num_tokens.sum().item()}); expected equal shapes and at least one token"
        )
    return math.exp(nll.sum().item() / num_tokens.sum().item())


__all__ = [
    "causal_lm_nll",
    "count_response_tokens",
    "importance_weighted_nll",
    "negative_elbo",
    "perplexity",
    "response_log_likelihood",
]
