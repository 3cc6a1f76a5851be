"""Latent-guided control, as in Zhang et al., "Latent Variable Modeling for Controllable and Diverse Generation From
Large Language Models" (IEEE TAI 2026, the use of the latent): a label probe, label directions in the latent space,
shifted decoding and its success rate.

1. [`train_label_probe`]: logistic regression on the base LM's mean-pooled last hidden states, trained with torch on
   the dataset's labels, with its held-out accuracy.
2. [`label_directions`]: per validation group (one prompt's responses), the Pearson correlation of every latent
   dimension (posterior mean) with the probe's probability of every label; averaged over groups, centred across
   labels and L2-normalised: one unit direction per label.
3. [`shift_latents`]: z + k * direction (k = [`CONTROL_STRENGTH`], 16); [`latent_guided_control`] decodes shifted
   and unshifted posterior means and scores them with the probe; [`control_success`] gives the target label's
   probability and the win rate against the unshifted reconstruction.
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from ..data.budgets import DEFAULT_MAX_RESPONSE_TOKENS
from ..validation import check_texts, pad_token_id
from .latent import group_indices
from .utils import DEFAULT_BATCH_SIZE, DEFAULT_MAX_NEW_TOKENS, check_cvae, generate_texts


# k of z + k * direction in the paper
CONTROL_STRENGTH = 16.0


@dataclass
class LabelProbe:
    """A logistic-regression label classifier over a frozen causal LM's mean-pooled last hidden states.

    Args:
        llm: the (base) causal LM whose hidden states are the features.
        tokenizer: its tokenizer.
        head (`nn.Linear`): `hidden_size -> num_labels`, applied to standardised features.
        feature_mean, feature_std (`torch.Tensor` of shape `(hidden_size,)`): the standardisation of the features.
        label_values (`list`): the dataset label of each output index.
        held_out_accuracy (`float`): accuracy on the held-out texts of [`train_label_probe`].
        max_length (`int`): texts are truncated to this many tokens.
    """

    llm: nn.Module
    tokenizer: object
    head: nn.Linear
    feature_mean: torch.Tensor
    feature_std: torch.Tensor
    label_values: list
    held_out_accuracy: float = math.nan
    max_length: int = DEFAULT_MAX_RESPONSE_TOKENS
    batch_size: int = DEFAULT_BATCH_SIZE
    history: dict = field(default_factory=dict)

    @property
    def num_labels(self) -> int:
        return len(self.label_values)

    def features(self, texts: Sequence[str]) -> torch.Tensor:
        """Mean-pooled last hidden states of `texts`, `(num_texts, hidden_size)` float32 (not standardised)."""
        return mean_pooled_hidden_states(self.llm, self.tokenizer, texts, self.max_length, self.batch_size)

    @torch.no_grad()
    def predict_proba(self, texts: Sequence[str]) -> torch.Tensor:
        """Probability of each label for each text, `(num_texts, num_labels)`."""
        features = (self.features(texts) - self.feature_mean) / self.feature_std
        return torch.softmax(self.head(features), dim=-1)


@torch.no_grad()
def mean_pooled_hidden_states(
    llm,
    tokenizer,
    texts: Sequence[str],
    max_length: int = DEFAULT_MAX_RESPONSE_TOKENS,
    batch_size: int = DEFAULT_BATCH_SIZE,
):
    """The LM's last hidden state averaged over each text's tokens, `(num_texts, hidden_size)` float32 on the CPU.

    Texts are right-padded (positions start at 0) and truncated to `max_length` tokens; an empty text is read as
    the tokenizer's end-of-sequence token.
    """
    texts = [text if text.strip() else (tokenizer.eos_token or " ") for text in check_texts(texts, "texts")]
    pad = pad_token_id(tokenizer)
    device = next(llm.parameters()).device
    features = []
    for start in range(0, len(texts), batch_size):
        encoded = tokenizer(
            texts[start : start + batch_size], add_special_tokens=False, truncation=True, max_length=max_length
        )["input_ids"]
        encoded = [ids if ids else [pad] for ids in encoded]
        batch = tokenizer.pad(
            {"input_ids": encoded}, padding_side="right", return_attention_mask=True, return_tensors="pt"
        )
        input_ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        hidden = llm(input_ids=input_ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1].float()
        mask = mask[..., None].float()
        features.append(((hidden * mask).sum(1) / mask.sum(1)).cpu())
    return torch.cat(features)


def fit_logistic_regression(
    features: torch.Tensor,
    targets: torch.Tensor,
    train_rows: torch.Tensor | slice,
    num_labels: int,
    weight_decay: float = 1e-2,
    max_iterations: int = 200,
    seed: int = 0,
) -> tuple[nn.Linear, torch.Tensor, torch.Tensor, float]:
    """Multinomial logistic regression on `features[train_rows]`: standardised with those rows' statistics, fitted
    with full-batch L-BFGS on cross-entropy + `weight_decay` * ||W||^2 from zero weights (a convex problem).

    Returns:
        `(head, feature_mean, feature_std, final_loss)`: the `nn.Linear` acts on `(features - mean) / std`.
    """
    feature_mean = features[train_rows].mean(0)
    feature_std = features[train_rows].std(0, correction=0).clamp(min=1e-6)
    standardised = (features[train_rows] - feature_mean) / feature_std
    torch.manual_seed(seed)
    head = nn.Linear(features.shape[1], num_labels)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    optimizer = torch.optim.LBFGS(head.parameters(), max_iter=max_iterations, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(head(standardised), targets[train_rows])
        loss = loss + weight_decay * head.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        final_loss = optimizer.step(closure).item()
    return head.requires_grad_(False), feature_mean, feature_std, final_loss


def linear_probe_accuracy(features: torch.Tensor, labels: torch.Tensor, train_rows: int) -> float:
    """How linearly `features` (e.g. posterior means) tell their `labels` apart: the accuracy on the rows from
    `train_rows` on of a logistic regression ([`fit_logistic_regression`]) fitted on the rows before."""
    head, mean, std, _ = fit_logistic_regression(features, labels, slice(0, train_rows), int(labels.max()) + 1)
    with torch.no_grad():
        predicted = head((features[train_rows:] - mean) / std).argmax(-1)
    return (predicted == labels[train_rows:]).float().mean().item()


def train_label_probe(
    llm,
    tokenizer,
    texts: Sequence[str],
    labels: Sequence,
    held_out_fraction: float = 0.2,
    weight_decay: float = 1e-2,
    max_iterations: int = 200,
    max_length: int = DEFAULT_MAX_RESPONSE_TOKENS,
    batch_size: int = DEFAULT_BATCH_SIZE,
    seed: int = 0,
) -> LabelProbe:
    """Train a logistic-regression label probe on the LM's mean-pooled hidden states of `texts`.

    The features are computed once (the LM stays frozen) and the head is [`fit_logistic_regression`]'s on the
    training split. A random `held_out_fraction` of the texts (at least one) is kept out and gives
    `held_out_accuracy`.

    Args:
        llm: the base causal LM (e.g. [`decoder_as_causal_lm`] of a frozen-decoder CVAE).
        tokenizer: its tokenizer.
        texts (`list[str]`): the texts to classify (responses).
        labels (`list`): their labels (any hashable values; at least 2 distinct).
        held_out_fraction (`float`, defaults to 0.2): share of texts held out for the accuracy.

    Returns:
        [`LabelProbe`]
    """
    texts = check_texts(texts, "texts")
    labels = list(labels)
    if len(labels) != len(texts):
        raise ValueError(f"labels has {len(labels)} entries but texts has {len(texts)}; expected one label per text")
    if any(label is None for label in labels):
        raise ValueError("labels contains None; the probe needs a label for every text")
    label_values = sorted(set(labels))
    if len(label_values) < 2:
        raise ValueError(f"labels has the single value {label_values}; a classifier needs at least 2 labels")
    if not 0 < held_out_fraction < 1:
        raise ValueError(f"held_out_fraction must be in (0, 1), got {held_out_fraction!r}")
    if len(texts) < 2:
        raise ValueError(f"texts has {len(texts)} text(s); the probe needs at least 2 (train and held out)")
    targets = torch.tensor([label_values.index(label) for label in labels])
    features = mean_pooled_hidden_states(llm, tokenizer, texts, max_length, batch_size)

    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(texts), generator=generator)
    num_held_out = min(max(1, round(held_out_fraction * len(texts))), len(texts) - 1)
    held_out, train = order[:num_held_out], order[num_held_out:]
    head, feature_mean, feature_std, final_loss = fit_logistic_regression(
        features, targets, train, len(label_values), weight_decay, max_iterations, seed
    )
    standardised = (features - feature_mean) / feature_std
    with torch.no_grad():
        predictions = head(standardised).argmax(-1)
    accuracy = lambda rows: (predictions[rows] == targets[rows]).float().mean().item()  # noqa: E731
    return LabelProbe(
        llm=llm,
        tokenizer=tokenizer,
        head=head,
        feature_mean=feature_mean,
        feature_std=feature_std,
        label_values=label_values,
        held_out_accuracy=accuracy(held_out),
        max_length=max_length,
        batch_size=batch_size,
        history={
            "train_accuracy": accuracy(train),
            "train_loss": final_loss,
            "num_train": len(train),
            "num_held_out": len(held_out),
        },
    )


def label_directions(
    latent_means: torch.Tensor, label_probs: torch.Tensor, group_ids: Sequence[int] | torch.Tensor | None = None
) -> torch.Tensor:
    """One unit direction per label in the latent space, from Pearson correlations inside validation groups.

    Per group (one prompt's responses), the Pearson correlation r[l, d] between each label's probability and each
    latent dimension's posterior mean over the responses (0 where either is constant); averaged over groups, centred
    across labels (r[l] - mean_l r[l]) and L2-normalised per label (the paper's recipe).

    Args:
        latent_means (`torch.Tensor` of shape `(num_responses, latent_size)`): posterior means.
        label_probs (`torch.Tensor` of shape `(num_responses, num_labels)`): the classifier's probabilities.
        group_ids (*optional*): the prompt of each response; one group when not given.

    Returns:
        `torch.Tensor` of shape `(num_labels, latent_size)` (zero rows where no dimension correlates).
    """
    if latent_means.ndim != 2 or label_probs.ndim != 2 or latent_means.shape[0] != label_probs.shape[0]:
        raise ValueError(
            f"latent_means has shape {tuple(latent_means.shape)} and label_probs {tuple(label_probs.shape)}; expected "
            "(num_responses, latent_size) and (num_responses, num_labels)"
        )
    correlations = []
    for rows in group_indices(group_ids, latent_means.shape[0], min_size=2):
        latents = latent_means[rows].double()
        probs = label_probs[rows].double()
        latents = latents - latents.mean(0)
        probs = probs - probs.mean(0)
        covariance = probs.T @ latents  # (labels, d), the 1/(n-1) factors cancel
        scale = probs.norm(dim=0)[:, None] * latents.norm(dim=0)[None, :]
        correlations.append(torch.where(scale > 1e-12, covariance / scale.clamp(min=1e-12), 0.0))
    mean_correlation = torch.stack(correlations).mean(0)
    centred = mean_correlation - mean_correlation.mean(0, keepdim=True)
    norm = centred.norm(dim=-1, keepdim=True)
    return torch.where(norm > 1e-12, centred / norm.clamp(min=1e-12), 0.0).float()


def shift_latents(latents: torch.Tensor, directions: torch.Tensor, strength: float = CONTROL_STRENGTH) -> torch.Tensor:
    """z + k * direction for every label: `(n, d)` and `(num_labels, d)` -> `(num_labels, n, d)`."""
    if latents.ndim != 2 or directions.ndim != 2 or latents.shape[1] != directions.shape[1]:
        raise ValueError(
            f"latents has shape {tuple(latents.shape)} and directions {tuple(directions.shape)}; expected "
            "(n, latent_size) and (num_labels, latent_size)"
        )
    return latents[None] + strength * directions[:, None].to(latents.dtype)


def control_success(shifted_probs: torch.Tensor, reconstructed_probs: torch.Tensor) -> dict:
    """Success of control toward each label.

    Args:
        shifted_probs (`torch.Tensor` of shape `(num_labels, n, num_labels)`): the probe's probabilities of the texts
            decoded from latents shifted toward each label (first axis).
        reconstructed_probs (`torch.Tensor` of shape `(n, num_labels)`): those of the unshifted reconstructions.

    Returns:
        `dict` with `success` and `win_rate` (lists over target labels: the mean probability of the target label,
        and the share of texts whose target probability rose above the reconstruction's) and their means
        `mean_success`, `mean_win_rate`.
    """
    num_labels = shifted_probs.shape[0]
    if (
        shifted_probs.ndim != 3
        or shifted_probs.shape[2] != num_labels
        or reconstructed_probs.shape != shifted_probs.shape[1:]
    ):
        raise ValueError(
            f"shifted_probs has shape {tuple(shifted_probs.shape)} and reconstructed_probs "
            f"{tuple(reconstructed_probs.shape)}; expected (L, n, L) and (n, L)"
        )
    labels = torch.arange(num_labels)
    target = shifted_probs[labels, :, labels]  # (L, n): p(target label | text shifted toward it)
    success = target.mean(-1)
    win_rate = (target > reconstructed_probs.T).float().mean(-1)
    return {
        "success": success.tolist(),
        "win_rate": win_rate.tolist(),
        "mean_success": success.mean().item(),
        "mean_win_rate": win_rate.mean().item(),
    }


@torch.no_grad()
def latent_guided_control(
    model,
    tokenizer,
    probe: LabelProbe,
    prompts: Sequence[str],
    latents: torch.Tensor,
    directions: torch.Tensor,
    strength: float = CONTROL_STRENGTH,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    max_prompt_tokens: int | None = None,
    temperature: float | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> dict:
    """Decode each posterior mean unshifted and shifted toward every label, and score the texts with the probe.

    Args:
        model ([`CVAELlamaForCausalLM`]), tokenizer: the CVAE and its tokenizer.
        probe ([`LabelProbe`]): classifies the decoded responses.
        prompts (`list[str]`): the prompt of each latent.
        latents (`torch.Tensor` of shape `(n, latent_size)`): posterior means of test responses.
        directions (`torch.Tensor` of shape `(num_labels, latent_size)`): from [`label_directions`].
        strength (`float`, defaults to [`CONTROL_STRENGTH`], 16.0): k.
        temperature (`float`, *optional*): sample at this temperature (the paper: 0.1); greedy when `None`.

    Returns:
        `dict`: [`control_success`]'s entries, `labels` (the probe's label values) and the texts
        (`reconstructions`, `controlled`: per label).
    """
    check_cvae(model)
    prompts = check_texts(prompts, "prompts")
    if directions.shape[0] != probe.num_labels:
        raise ValueError(f"directions has {directions.shape[0]} rows but the probe has {probe.num_labels} labels")
    decoding = {"do_sample": False} if temperature is None else {"do_sample": True, "temperature": temperature}
    decode = lambda z, desc: generate_texts(  # noqa: E731
        model,
        tokenizer,
        prompts,
        z,
        max_new_tokens=max_new_tokens,
        max_prompt_tokens=max_prompt_tokens,
        batch_size=batch_size,
        desc=desc,
        **decoding,
    )
    reconstructions = decode(latents, "Control: reconstruction")
    reconstructed_probs = probe.predict_proba(reconstructions)
    shifted = shift_latents(latents, directions, strength)
    controlled, shifted_probs = {}, []
    for index, label in enumerate(tqdm(probe.label_values, desc="Control toward each label", leave=False)):
        texts = decode(shifted[index], None)
        controlled[str(label)] = texts
        shifted_probs.append(probe.predict_proba(texts))
    result = control_success(torch.stack(shifted_probs), reconstructed_probs)
    return {
        **result,
        "labels": list(probe.label_values),
        "strength": strength,
        "reconstructions": reconstructions,
        "controlled": controlled,
    }


__all__ = [
    "CONTROL_STRENGTH",
    "LabelProbe",
    "control_success",
    "fit_logistic_regression",
    "label_directions",
    "latent_guided_control",
    "linear_probe_accuracy",
    "mean_pooled_hidden_states",
    "shift_latents",
    "train_label_probe",
]
