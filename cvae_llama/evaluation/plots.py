"""PNG plots of an evaluation (matplotlib, Agg backend): the latent space, KL per dimension, the interpolation path
and the latent-temperature sweep. Each function writes one file and returns its path."""

import os
from collections.abc import Sequence
from pathlib import Path

import torch


def pyplot():
    """`matplotlib.pyplot` with the file-only Agg backend (never needs a display)."""
    import matplotlib

    matplotlib.use("Agg", force=True)  # files only: never needs a display
    import matplotlib.pyplot as plt

    return plt




def _save(figure, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    pyplot().close(figure)
    return path


def principal_components(latent_means: torch.Tensor, num_components: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """PCA of the posterior means: `(projections (n, num_components), explained variance ratio (num_components,))`.

    Components beyond the data's rank are zero.
    """
    centred = latent_means.double() - latent_means.double().mean(0)
    _, singular_values, right = torch.linalg.svd(centred, full_matrices=False)
    k = min(num_components, right.shape[0])
    projections = torch.zeros(latent_means.shape[0], num_components, dtype=torch.float64)
    projections[:, :k] = centred @ right[:k].T
    variance = singular_values.pow(2)
    ratio = torch.zeros(num_components, dtype=torch.float64)
    ratio[:k] = variance[:k] / variance.sum().clamp(min=1e-30)
    return projections, ratio


def plot_latent_space(
    latent_means: torch.Tensor,
    labels: Sequence | None,
    path: str | os.PathLike,
    label_names: dict | None = None,
    title: str = "Posterior means (PCA)",
) -> Path:
    """Scatter of the posterior means projected on their first two principal components, coloured by label."""
    plt = pyplot()
    projections, ratio = principal_components(latent_means)
    figure, axis = plt.subplots(figsize=(6, 5))
    labels = list(labels) if labels is not None else [None] * len(projections)
    values = sorted({label for label in labels}, key=lambda value: (value is None, str(value)))
    colours = plt.get_cmap("tab10")
    for index, value in enumerate(values):
        rows = [row for row, label in enumerate(labels) if label == value]
        name = "all" if value is None else (label_names or {}).get(value, str(value))
        axis.scatter(
            projections[rows, 0], projections[rows, 1], s=18, alpha=0.8, color=colours(index % 10), label=name
        )
    axis.set_xlabel(f"PC 1 ({100 * ratio[0]:.1f} % of variance)")
    axis.set_ylabel(f"PC 2 ({100 * ratio[1]:.1f} % of variance)")
    axis.set_title(title)
    axis.grid(alpha=0.3)
    if len(values) > 1 or values[0] is not None:
        axis.legend(title="label", fontsize=8)
    return _save(figure, path)


def plot_kl_per_dimension(
    kl_per_dimension: Sequence[float], path: str | os.PathLike, aggregate_kl: Sequence[float] | None = None
) -> Path:
    """Bar chart of KL(q || p) per latent dimension (and, when given, of the groups' aggregated posterior)."""
    plt = pyplot()
    kl = [float(value) for value in kl_per_dimension]
    figure, axis = plt.subplots(figsize=(max(6, 0.25 * len(kl)), 4))
    positions = torch.arange(len(kl)).tolist()
    width = 0.4 if aggregate_kl is not None else 0.8
    offset = width / 2 if aggregate_kl is not None else 0.0
    axis.bar([p - offset for p in positions], kl, width=width, label="KL(q(z|x,y) || N(0,1)), mean over responses")
    if aggregate_kl is not None:
        axis.bar(
            [p + offset for p in positions],
            [float(v) for v in aggregate_kl],
            width=width,
            label="KL(aggregated q(z|x) || N(0,1)), mean over prompts",
        )
    axis.set_xlabel("latent dimension")
    axis.set_ylabel("nats")
    axis.set_title("KL per latent dimension")
    axis.legend(fontsize=8)
    axis.grid(axis="y", alpha=0.3)
    return _save(figure, path)


def plot_interpolation(interpolation: dict, path: str | os.PathLike) -> Path:
    """ROUGE-L of each interpolation step's text to both ends against t, above the decoded text of every step."""
    plt = pyplot()
    t, texts = interpolation["t"], interpolation["texts"]
    figure, (axis, text_axis) = plt.subplots(
        2, 1, figsize=(8, 4 + 0.22 * len(texts)), gridspec_kw={"height_ratios": [3, 0.12 * len(texts) + 0.6]}
    )
    axis.plot(t, interpolation["rouge_l_to_a"], marker="o", label="ROUGE-L to text A (t = 0)")
    axis.plot(t, interpolation["rouge_l_to_b"], marker="s", label="ROUGE-L to text B (t = 1)")
    axis.set_xlabel("t  (z = (1 - t) z_A + t z_B)")
    axis.set_ylabel("ROUGE-L F")
    axis.set_ylim(-0.02, 1.02)
    axis.set_title("Interpolation between two posterior means")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    lines = [f"A: {interpolation.get('text_a', '')[:100]!r}", f"B: {interpolation.get('text_b', '')[:100]!r}"]
    lines += [f"t={value:.2f}: {text[:100]!r}" for value, text in zip(t, texts, strict=True)]
    text_axis.axis("off")
    text_axis.text(0, 1, "\n".join(lines), fontsize=7, family="monospace", va="top", transform=text_axis.transAxes)
    return _save(figure, path)


def plot_temperature_sweep(rows: Sequence[dict], path: str | os.PathLike) -> Path:
    """Diversity and quality against the latent temperature, and Distinct-4 against ROUGE-Lsum."""
    plt = pyplot()
    temperatures = [row["latent_temperature"] for row in rows]
    has_rouge = all("rouge_lsum" in row for row in rows)
    figure, axes = plt.subplots(1, 2 if has_rouge else 1, figsize=(11 if has_rouge else 6, 4.2), squeeze=False)
    axis = axes[0, 0]
    axis.plot(temperatures, [row["distinct_4"] for row in rows], marker="o", label="Distinct-4")
    axis.plot(temperatures, [row["self_bleu_4"] / 100 for row in rows], marker="s", label="Self-BLEU-4 / 100")
    if has_rouge:
        axis.plot(temperatures, [row["rouge_lsum"] for row in rows], marker="^", label="ROUGE-Lsum to base LM")
    axis.set_xlabel("latent temperature")
    axis.set_ylim(-0.02, 1.02)
    axis.set_title("Prior sampling at several latent temperatures")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    if has_rouge:
        axis = axes[0, 1]
        x, y = [row["rouge_lsum"] for row in rows], [row["distinct_4"] for row in rows]
        axis.plot(x, y, marker="o")
        for temperature, xi, yi in zip(temperatures, x, y, strict=True):
            axis.annotate(f"T={temperature:g}", (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=8)
        axis.set_xlabel("ROUGE-Lsum to the base LM's samples (quality / coverage)")
        axis.set_ylabel("Distinct-4 (diversity)")
        axis.set_title("Diversity against coverage")
        axis.grid(alpha=0.3)
    return _save(figure, path)


__all__ = [
    "plot_interpolation",
    "plot_kl_per_dimension",
    "plot_latent_space",
    "plot_temperature_sweep",
    "principal_components",
    "pyplot",
]
