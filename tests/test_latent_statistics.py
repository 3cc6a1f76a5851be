"""cvae_llama.latent_statistics: one definition per statistic, so that the trainer's logs and the evaluation's
reports agree about the same posteriors; sampling; groups of one; the module's place in the import graph."""

import ast
import math
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from ddp_train import _fixed_reparameterize, build_groups, build_model, build_tokenizer, fixed_noise

from cvae_llama import evaluation, latent_statistics, trainer
from cvae_llama.latent_statistics import (
    NUM_SAMPLES,
    active_units,
    aggregate_posterior_kl,
    consistent_units,
    density_gap,
    kl_to_prior,
    mutual_information,
    sample_posterior,
)


pytestmark = pytest.mark.usefixtures("one_thread")

PACKAGE_ROOT = Path(__file__).resolve().parents[1] / "cvae_llama"


def posterior(batch: int = 9, size: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, size, generator=generator), 0.5 * torch.randn(batch, size, generator=generator) - 0.5


GROUP_IDS = torch.tensor([0, 0, 0, 1, 1, 1, 1, 2, 2])  # unequal groups


# ---------------------------------------------------------------------------------------------------- trainer == evaluation
def test_the_trainers_logged_statistics_are_the_evaluations(tmp_path):
    """One training step: the logged `mutual_info`, `active_units`, `kl` and `dg` are what the evaluation reports for
    the posteriors of that step (the same noise: the model's reparameterisation, fixed here)."""
    tokenizer = build_tokenizer()
    model = build_model(tokenizer)
    seen = {}

    def keep_posterior(module, args, output):
        if module.training:
            seen.update(latent_mean=output.latent_mean.detach(), latent_logvar=output.latent_logvar.detach())

    class RecordingTrainer(trainer.CVAETrainer):
        def compute_loss(self, model, inputs, *args, **kwargs):
            if model.training:
                seen["group_ids"] = inputs["group_ids"]
            return super().compute_loss(model, inputs, *args, **kwargs)

    model.register_forward_hook(keep_posterior)
    args = trainer.CVAETrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=1, logging_steps=1, save_strategy="no",
        report_to="none", disable_tqdm=True, use_cpu=True, seed=0, dg_samples=4, max_prompt_tokens=8,
        max_response_tokens=8, active_units_threshold=0.01,
    )  # fmt: skip
    with fixed_noise():
        run = RecordingTrainer(model, args, train_dataset=build_groups(), processing_class=tokenizer)
        run.train()
        mean, logvar, group_ids = seen["latent_mean"], seen["latent_logvar"], seen["group_ids"]
        reported = {
            "mutual_info": evaluation.mutual_information(mean, logvar, group_ids),  # its default number of samples
            "dg": evaluation.aggregate_posterior_kl(mean, logvar, group_ids, num_samples=4).sum(-1).mean().item(),
        }
    reported["active_units"] = evaluation.in_group_active_units(mean, group_ids, (0.01,))[0.01]
    reported["kl"] = evaluation.kl_to_prior(mean, logvar)  # groups of equal size: the mean over groups
    logged = next(entry for entry in run.state.log_history if "loss" in entry)
    assert torch.bincount(group_ids).tolist() == [3, 3, 3, 3]
    assert logged["mutual_info"] > 0.1 and logged["active_units"] > 0
    for term, value in reported.items():
        assert logged[term] == pytest.approx(value, rel=1e-5, abs=1e-6), term


def test_active_units_have_one_variance_convention():
    # group 0: means 0 and 0.2, the unbiased variance 0.02 (the biased one 0.01); group 1: no spread
    latent_mean = torch.tensor([[0.0, 1.0], [0.2, 1.0], [5.0, 1.0], [5.0, 1.0]])
    group_ids = torch.tensor([0, 0, 1, 1])
    logged = trainer.active_units(latent_mean, group_ids, threshold=0.015)
    assert logged.item() == evaluation.in_group_active_units(latent_mean, group_ids, (0.015,))[0.015] == 0.5
    # all rows one group: the whole-set count of the evaluation
    assert trainer.active_units(latent_mean, threshold=5.0).item() == evaluation.active_units(latent_mean, 5.0) == 1
    assert latent_statistics.active_units is trainer.active_units


@pytest.mark.parametrize("seeded", ["global", "generator"])
def test_monte_carlo_statistics_agree_for_the_same_noise(seeded):
    latent_mean, latent_logvar = posterior()

    def draw(function, *args, **kwargs):
        if seeded == "global":
            torch.manual_seed(0)
        else:
            kwargs["generator"] = torch.Generator().manual_seed(0)
        value = function(*args, **kwargs)
        return value.item() if isinstance(value, torch.Tensor) and value.ndim == 0 else value

    # the same default number of samples, the same draw: the trainer's statistic is the evaluation's
    logged = draw(mutual_information, latent_mean, latent_logvar, GROUP_IDS)
    assert logged == pytest.approx(
        draw(evaluation.mutual_information, latent_mean, latent_logvar, GROUP_IDS), abs=1e-6
    )
    assert 0 < logged < math.log(4)
    dg = draw(density_gap, latent_mean, latent_logvar, group_ids=GROUP_IDS)
    aggregate = draw(evaluation.aggregate_posterior_kl, latent_mean, latent_logvar, GROUP_IDS)
    assert dg == pytest.approx(aggregate.sum(-1).mean().item(), abs=1e-5)
    units = draw(consistent_units, latent_mean, latent_logvar, GROUP_IDS, 0.3)
    assert units == draw(evaluation.consistent_units, latent_mean, latent_logvar, GROUP_IDS, (0.3,))[0.3]
    assert NUM_SAMPLES == 16


# ---------------------------------------------------------------------------------------------------- the functions
def test_sample_posterior_is_reparameterised_and_reproducible():
    latent_mean = torch.tensor([[1.0, -2.0]], requires_grad=True)
    latent_logvar = torch.tensor([[0.0, math.log(0.25)]], requires_grad=True)
    samples = sample_posterior(latent_mean, latent_logvar, 20000, torch.Generator().manual_seed(0))
    assert samples.shape == (20000, 1, 2) and samples.dtype == torch.float32
    torch.testing.assert_close(samples.mean(0), latent_mean.detach(), atol=0.02, rtol=0)
    torch.testing.assert_close(samples.std(0), torch.tensor([[1.0, 0.5]]), atol=0.02, rtol=0)
    samples.sum().backward()
    assert latent_mean.grad.abs().min() > 0 and latent_logvar.grad.abs().min() > 0
    again = sample_posterior(latent_mean, latent_logvar, 20000, torch.Generator().manual_seed(0))
    torch.testing.assert_close(again, samples)
    with fixed_noise():  # without a generator: the model's own reparameterisation
        torch.testing.assert_close(
            sample_posterior(latent_mean, latent_logvar, 3), _fixed_reparameterize(latent_mean, latent_logvar, 3)
        )
    with pytest.raises(ValueError, match="num_samples"):
        sample_posterior(latent_mean, latent_logvar, 0)


def test_groups_of_one_carry_no_information_and_no_active_unit():
    latent_mean, latent_logvar = posterior(batch=4)
    group_ids = torch.arange(4)  # every row its own group (dg_grouping="batch" on flat rows)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no degrees-of-freedom warning from a variance over one row
        assert active_units(latent_mean, group_ids).item() == 0
        assert mutual_information(latent_mean, latent_logvar, group_ids).abs().item() < 1e-6
    # a group of one row: its aggregated posterior is its posterior, so the density gap is its KL in expectation
    kl = kl_to_prior(latent_mean, latent_logvar, group_ids)
    dg = density_gap(latent_mean, latent_logvar, 4000, group_ids, generator=torch.Generator().manual_seed(0))
    assert dg.item() == pytest.approx(kl.item(), rel=0.05)


def test_kl_to_prior_is_a_mean_over_groups():
    latent_mean, latent_logvar = posterior()
    per_row = (0.5 * (latent_mean**2 + latent_logvar.exp() - latent_logvar - 1)).sum(-1)
    groups = [per_row[GROUP_IDS == group].mean() for group in range(3)]
    assert kl_to_prior(latent_mean, latent_logvar, GROUP_IDS).item() == pytest.approx(sum(groups).item() / 3)
    assert kl_to_prior(latent_mean, latent_logvar).item() == pytest.approx(per_row.mean().item())
    assert evaluation.kl_to_prior(latent_mean, latent_logvar) == pytest.approx(per_row.mean().item())


def test_consistent_units_count_the_dimensions_of_a_small_aggregate_kl():
    latent_mean, latent_logvar = posterior()
    samples = sample_posterior(latent_mean, latent_logvar, 8, torch.Generator().manual_seed(0))
    kl = aggregate_posterior_kl(latent_mean, latent_logvar, GROUP_IDS, latent_samples=samples)  # (3, 4)
    for threshold in (0.03, 0.3, 1.0, 3.0):
        value = consistent_units(latent_mean, latent_logvar, GROUP_IDS, threshold, latent_samples=samples)
        assert value.item() == pytest.approx((kl < threshold).sum(-1).double().mean().item())


def test_density_gap_keeps_its_gradient():
    latent_mean, latent_logvar = posterior()
    latent_mean.requires_grad_(True)
    latent_logvar.requires_grad_(True)
    density_gap(latent_mean, latent_logvar, group_ids=GROUP_IDS, generator=torch.Generator().manual_seed(0)).backward()
    assert latent_mean.grad.abs().sum() > 0 and latent_logvar.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------------- the import graph
def _package_imports(path: Path) -> set[str]:
    """The modules a source file imports (relative imports as written, `.x` / `..x`)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            found.add("." * node.level + (node.module or ""))
    return found


def test_latent_statistics_imports_only_torch_and_the_model():
    assert _package_imports(PACKAGE_ROOT / "latent_statistics.py") <= {
        "math", "collections.abc", "torch", ".", ".modeling_cvae_llama",
    }  # fmt: skip
    code = (
        "import sys, cvae_llama.latent_statistics; print(sorted(m for m in sys.modules if m.startswith('cvae_llama')))"
    )
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == str(
        [
            "cvae_llama",
            "cvae_llama.configuration_cvae_llama",
            "cvae_llama.latent_statistics",
            "cvae_llama.modeling_cvae_llama",
        ]
    )


def test_training_imports_neither_the_cli_nor_the_evaluation():
    for path in sorted((PACKAGE_ROOT / "training").glob("*.py")) + [PACKAGE_ROOT / "trainer.py"]:
        imports = _package_imports(path)
        assert not any(name.lstrip(".").startswith(("cli", "evaluation")) for name in imports), (path.name, imports)
        assert not any("cvae_llama.cli" in name or "cvae_llama.evaluation" in name for name in imports), path.name
