import json
import math

import pytest
import torch
from conftest import SHARED_DATA, open_memory_gates, tiny_cvae_config, tiny_llama_config

from cvae_llama.evaluation import (
    METRICS,
    active_units,
    aggregate_posterior_kl,
    base_samples,
    bertscore_minilm,
    bleu,
    causal_lm_nll,
    consistent_units,
    control_success,
    decoder_as_causal_lm,
    dialogue_metrics,
    distinct_n,
    diverse_generation,
    diversity_metrics,
    evaluation_report,
    fed_style_score,
    fit_logistic_regression,
    follow_up_nll,
    importance_weighted_nll,
    in_group_active_units,
    interpolate,
    kl_per_dimension,
    kl_to_prior,
    label_directions,
    latent_guided_control,
    linear_probe_accuracy,
    mutual_information,
    negative_elbo,
    perplexity,
    reconstruction,
    response_log_likelihood,
    response_perplexity,
    rouge_l,
    rouge_lsum,
    self_bleu,
    shift_latents,
    temperature_sweep,
    train_label_probe,
)
from cvae_llama.modeling_cvae_llama import LOGVAR_BOUND, CVAELlamaForCausalLM


pytestmark = pytest.mark.usefixtures("one_thread")


WORDS = (
    "the a cat dog sat ran on under mat house big small red blue green market stocks rose fell team won lost game "
    "match news world sports business science tech price oil bank rate new old good bad day night and or of to in "
    "is was it this that for with at by from up down cup goal score players coach shares profit sales chips phone "
    "space study data users web , . ! ?"
).split()


def tiny_tokenizer():
    """A word-level tokenizer whose ids fit the tiny model's vocabulary of 99."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for word in WORDS:
        vocab.setdefault(word, len(vocab))
    assert len(vocab) <= 99
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def ignore_latent(model):
    """Make the decoder ignore z: the memory slots become a constant (the last layer of z -> states is zeroed)."""
    with torch.no_grad():
        for layer in model.latent_memory.layers:
            layer.to_states[-1].weight.zero_()
    return model


def set_constant_posterior(model, latent_mean: float, latent_logvar: float):
    """Make q(z | x, y) = N(latent_mean, exp(latent_logvar)) in every dimension, for every input."""
    read_out = model.encoder.to_latent_mean_logvar[-1]
    share = read_out.bias.shape[0] // 2
    raw_logvar = LOGVAR_BOUND * math.atanh(latent_logvar / LOGVAR_BOUND)  # the encoder soft-bounds the log-variance
    with torch.no_grad():
        read_out.weight.zero_()
        read_out.bias[:share] = latent_mean
        read_out.bias[share:] = raw_logvar
    return model


@pytest.fixture
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture
def model():
    torch.manual_seed(0)
    return open_memory_gates(CVAELlamaForCausalLM(tiny_cvae_config()).eval())


PROMPTS = ["the team won", "stocks fell on", "the cat sat"]


# ------------------------------------------------------------------------------------------------ latent quality


def test_kl_to_prior_matches_the_closed_form():
    latent_mean = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    latent_logvar = torch.tensor([[0.0, math.log(2.0)], [0.0, 0.0]])
    # row 0: 0.5 * 1^2 + 0.5 * (2 - log 2 - 1); row 1: 0
    expected = (0.5 + 0.5 * (1 - math.log(2.0))) / 2
    assert kl_to_prior(latent_mean, latent_logvar) == pytest.approx(expected, abs=1e-9)
    torch.testing.assert_close(
        kl_per_dimension(latent_mean, latent_logvar),
        torch.tensor([0.25, 0.25 * (1 - math.log(2.0))], dtype=torch.float64),
    )
    reference = torch.distributions.kl_divergence(
        torch.distributions.Normal(latent_mean, (0.5 * latent_logvar).exp()), torch.distributions.Normal(0.0, 1.0)
    )
    assert kl_to_prior(latent_mean, latent_logvar) == pytest.approx(reference.sum(-1).mean().item(), abs=1e-6)


def test_posteriors_equal_to_the_prior_have_no_information():
    latent_mean, latent_logvar = torch.zeros(12, 5), torch.zeros(12, 5)
    group_ids = torch.arange(3).repeat_interleave(4)
    generator = torch.Generator().manual_seed(0)
    assert kl_to_prior(latent_mean, latent_logvar) == 0.0
    assert mutual_information(latent_mean, latent_logvar, group_ids, generator=generator) == pytest.approx(0, abs=1e-9)
    assert active_units(latent_mean) == 0
    assert in_group_active_units(latent_mean, group_ids) == {0.03: 0.0, 0.1: 0.0, 0.3: 0.0}
    # the aggregate of prior posteriors is the prior: KL exactly 0, every unit consistent
    assert consistent_units(latent_mean, latent_logvar, group_ids, generator=generator) == {0.03: 5, 0.1: 5, 0.3: 5}


def test_mutual_information_of_separated_posteriors_is_log_group_size():
    # 4 responses whose posteriors do not overlap: z identifies y, I(y; z | x) = H(y | x) = log 4
    latent_mean = torch.tensor([[0.0], [20.0], [40.0], [60.0]]).repeat(2, 1)
    latent_logvar = torch.full_like(latent_mean, -4.0)
    group_ids = [0, 0, 0, 0, 1, 1, 1, 1]
    value = mutual_information(
        latent_mean, latent_logvar, group_ids, num_samples=64, generator=torch.Generator().manual_seed(0)
    )
    assert value == pytest.approx(math.log(4), abs=1e-6)


def _log_normal(value, mean, logvar):
    return -0.5 * (math.log(2 * math.pi) + logvar + (value - mean) ** 2 / math.exp(logvar))


def loop_mutual_information(latent_mean, latent_logvar, group_ids, latent_samples):
    """I(y; z | x) with plain Python loops over groups, samples, responses and dimensions."""
    per_group = []
    for group in sorted(set(group_ids)):
        rows = [i for i, g in enumerate(group_ids) if g == group]
        total, count = 0.0, 0
        for s in range(latent_samples.shape[0]):
            for i in rows:
                z = latent_samples[s, i].tolist()
                log_q = [
                    sum(_log_normal(z[d], latent_mean[j, d].item(), latent_logvar[j, d].item()) for d in range(len(z)))
                    for j in rows
                ]
                top = max(log_q)
                log_aggregate = top + math.log(sum(math.exp(v - top) for v in log_q) / len(rows))
                total += log_q[rows.index(i)] - log_aggregate
                count += 1
        per_group.append(total / count)
    return sum(per_group) / len(per_group)


def loop_aggregate_kl(latent_mean, latent_logvar, group_ids, latent_samples):
    result = []
    for group in sorted(set(group_ids)):
        rows = [i for i, g in enumerate(group_ids) if g == group]
        per_dimension = []
        for d in range(latent_mean.shape[1]):
            values = []
            for s in range(latent_samples.shape[0]):
                for i in rows:
                    z = latent_samples[s, i, d].item()
                    densities = [
                        math.exp(_log_normal(z, latent_mean[j, d].item(), latent_logvar[j, d].item())) for j in rows
                    ]
                    values.append(math.log(sum(densities) / len(rows)) - _log_normal(z, 0.0, 0.0))
            per_dimension.append(sum(values) / len(values))
        result.append(per_dimension)
    return torch.tensor(result, dtype=torch.float64)


def test_mutual_information_and_aggregate_kl_match_a_loop_implementation():
    torch.manual_seed(0)
    group_ids = [0, 0, 0, 1, 1, 1, 1, 2, 2]  # unequal groups
    latent_mean, latent_logvar = torch.randn(9, 3), torch.randn(9, 3) * 0.5 - 0.5
    latent_samples = latent_mean + (0.5 * latent_logvar).exp() * torch.randn(5, 9, 3)
    expected = loop_mutual_information(latent_mean, latent_logvar, group_ids, latent_samples)
    value = mutual_information(latent_mean, latent_logvar, group_ids, latent_samples=latent_samples)
    assert value == pytest.approx(expected, abs=1e-9)
    assert 0 < value < math.log(4)
    aggregate = aggregate_posterior_kl(latent_mean, latent_logvar, group_ids, latent_samples=latent_samples)
    torch.testing.assert_close(aggregate, loop_aggregate_kl(latent_mean, latent_logvar, group_ids, latent_samples))


def test_aggregate_kl_summed_over_dimensions_is_the_trainers_density_gap():
    from cvae_llama.trainer import density_gap

    torch.manual_seed(1)
    latent_mean, latent_logvar = torch.randn(8, 4), torch.randn(8, 4) * 0.3
    group_ids = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    latent_samples = latent_mean + (0.5 * latent_logvar).exp() * torch.randn(6, 8, 4)
    aggregate = aggregate_posterior_kl(latent_mean, latent_logvar, group_ids, latent_samples=latent_samples)
    expected = density_gap(latent_mean, latent_logvar, group_ids=group_ids, latent_samples=latent_samples)
    assert aggregate.sum(-1).mean().item() == pytest.approx(expected.item(), abs=1e-5)


def test_active_units_match_a_loop_implementation():
    torch.manual_seed(0)
    scales = torch.tensor([0.0, 0.05, 0.2, 0.5, 1.0, 3.0])
    latent_means = torch.randn(12, 6) * scales
    group_ids = [0] * 4 + [1] * 5 + [2] * 3

    def variance(values):
        mean = sum(values) / len(values)
        return sum((v - mean) ** 2 for v in values) / (len(values) - 1)

    expected_whole = sum(variance(latent_means[:, d].tolist()) > 0.01 for d in range(6))
    assert active_units(latent_means, delta=0.01) == expected_whole
    expected = {}
    for threshold in (0.03, 0.1, 0.3):
        counts = []
        for group in (0, 1, 2):
            rows = [i for i, g in enumerate(group_ids) if g == group]
            counts.append(sum(variance([latent_means[i, d].item() for i in rows]) > threshold for d in range(6)))
        expected[threshold] = sum(counts) / len(counts)
    assert in_group_active_units(latent_means, group_ids) == pytest.approx(expected)
    assert 0 < expected[0.3] < expected[0.03] <= 6


def test_consistent_units_hand_made_case():
    # dimension 0: two posteriors at -3 and +3, their aggregate is far from N(0, 1); dimension 1: the prior itself
    latent_mean = torch.tensor([[-3.0, 0.0], [3.0, 0.0]])
    latent_logvar = torch.tensor([[math.log(0.1), 0.0], [math.log(0.1), 0.0]])
    generator = torch.Generator().manual_seed(0)
    kl = aggregate_posterior_kl(latent_mean, latent_logvar, [0, 0], num_samples=256, generator=generator)
    assert kl[0, 0] > 1.0
    assert kl[0, 1] == pytest.approx(0.0, abs=1e-12)
    assert consistent_units(latent_mean, latent_logvar, [0, 0], generator=generator) == {0.03: 1, 0.1: 1, 0.3: 1}


def test_in_group_metrics_reject_bad_groups():
    latent_mean = torch.zeros(3, 2)
    with pytest.raises(ValueError, match="at least 2 responses"):
        in_group_active_units(latent_mean, [0, 0, 1])
    with pytest.raises(ValueError, match="at least 2 responses"):
        mutual_information(latent_mean, latent_mean, [0, 1, 2])
    with pytest.raises(ValueError, match="group_ids has shape"):
        consistent_units(latent_mean, latent_mean, [0, 1])
    with pytest.raises(ValueError, match="latent_logvar has shape"):
        kl_to_prior(latent_mean, torch.zeros(3, 4))
    with pytest.raises(ValueError, match="thresholds"):
        in_group_active_units(latent_mean, [0, 0, 0], thresholds=0.1)


# ------------------------------------------------------------------------------------------------ text metrics


def test_distinct_n_hand_computed():
    assert distinct_n(["a b a b"], 1) == 0.5
    assert distinct_n(["a b a b"], 2) == pytest.approx(2 / 3)  # ab, ba, ab
    identical = ["the cat sat on the mat"] * 4
    assert distinct_n(identical, 2) == pytest.approx(5 / 20)  # 5 distinct bigrams, 20 in all
    assert distinct_n(identical, 4) == pytest.approx(3 / 12)
    different = ["the cat sat on the mat", "stocks fell in early trade", "a dog ran under a red house"]
    assert distinct_n(different, 2) == 1.0
    assert distinct_n(["a b"], 4) == 0.0
    with pytest.raises(ValueError, match="n must be"):
        distinct_n(["a"], 0)


def test_self_bleu_identical_is_100_and_disjoint_is_0():
    assert self_bleu(["the cat sat on the mat"] * 4) == 100.0
    assert self_bleu(["a b", "a b"]) == 100.0  # shorter than 4 tokens: effective order
    assert self_bleu(["the cat sat on the mat", "stocks fell in early trade", "a dog ran under a red house"]) == 0.0
    value = self_bleu(["the cat sat on the mat", "the cat sat on a red mat", "stocks fell in early trade"])
    assert 0 < value < 100
    with pytest.raises(ValueError, match="at least 2"):
        self_bleu(["only one text"])


def test_bleu_and_rouge_hand_computed():
    # unigram and bigram precision 1, brevity penalty exp(1 - 4/3)
    assert bleu(["the cat sat"], ["the cat sat on"], max_order=2) == pytest.approx(100 * math.exp(1 - 4 / 3), abs=1e-6)
    assert bleu(["the cat sat"], [["a dog", "the cat sat"]], max_order=4) == 100.0
    # LCS "the cat sat" = 3 of 3 candidate tokens and 4 reference tokens: F = 2 * 1 * 0.75 / 1.75
    assert rouge_l(["the cat sat"], ["the cat sat down"]) == pytest.approx(2 * 0.75 / 1.75)
    assert rouge_l(["a b"], ["c d"]) == 0.0
    assert rouge_lsum(["the cat sat\nthe dog ran"], ["the dog ran\nthe cat sat"]) == 1.0
    with pytest.raises(ValueError, match="one reference per candidate"):
        rouge_l(["a"], ["a", "b"])


def test_bertscore_minilm_is_offline_and_ranks_identity_first():
    scores = bertscore_minilm(["the cat sat on the mat"], ["the cat sat on the mat"])
    assert scores["f1"] == pytest.approx(1.0, abs=1e-4)
    other = bertscore_minilm(["the cat sat on the mat"], ["stock markets fell sharply in early trading"])
    assert other["f1"] < 0.9


# ------------------------------------------------------------------------------------------------ language modelling


def _batch(tokenizer, responses):
    from cvae_llama.data import OneToManyCollator

    return OneToManyCollator(tokenizer, 8, 8)([{"prompt": "the team", "responses": responses}])


def test_importance_weighted_nll_hand_computed(model, tokenizer):
    # a decoder with zero logits gives every token probability 1/V whatever z is: log p(y|x,z) = -T log V
    with torch.no_grad():
        model.lm_head.weight.zero_()
    batch = _batch(tokenizer, ["won the game", "lost the match again"])
    tokens = (batch["labels"][:, 1:] != -100).sum(-1).double()
    expected = tokens * math.log(model.config.vocab_size)

    set_constant_posterior(model, 0.0, 0.0)  # q = p: every importance weight is p(y|x,z)
    torch.testing.assert_close(importance_weighted_nll(model, batch, 4).double(), expected, atol=1e-4, rtol=0)
    assert perplexity(importance_weighted_nll(model, batch, 4), tokens) == pytest.approx(99.0, rel=1e-5)

    # q = N(0.2, 1.1^2) != p: the importance weights p(z_s) / q(z_s) average to 1 (bounded, as q is wider than p)
    set_constant_posterior(model, 0.2, math.log(1.1**2))
    estimate = importance_weighted_nll(model, batch, 256, torch.Generator().manual_seed(0)).double()
    torch.testing.assert_close(estimate, expected, atol=0.15, rtol=0)
    kl = 8 * 0.5 * (0.04 + 1.21 - math.log(1.21) - 1)  # closed form, 8 dimensions
    torch.testing.assert_close(negative_elbo(model, batch).double(), expected + kl, atol=1e-4, rtol=0)


def test_importance_weighted_nll_with_prior_samples_survives_a_posterior_far_sharper_than_the_true_one(model, tokenizer):
    # the decoder ignores z (zero logits), so the true posterior is the prior; q = N(3, 0.01^2) is far from it
    with torch.no_grad():
        model.lm_head.weight.zero_()
    batch = _batch(tokenizer, ["won the game", "lost the match again"])
    expected = (batch["labels"][:, 1:] != -100).sum(-1).double() * math.log(model.config.vocab_size)
    set_constant_posterior(model, 3.0, math.log(0.01**2))
    generator = torch.Generator().manual_seed(0)
    plain = importance_weighted_nll(model, batch, 16, generator).double()
    assert (plain > expected + 30).all()  # every weight p(z) / q(z) is tiny: the plain bound is loose by tens of nats
    # half the samples from the prior, weights divided by the mixture: each prior sample weighs about k / m = 2
    mixed = importance_weighted_nll(model, batch, 16, generator, prior_samples=8).double()
    torch.testing.assert_close(mixed, expected, atol=1e-3, rtol=0)
    only_prior = importance_weighted_nll(model, batch, 4, generator, prior_samples=4).double()
    torch.testing.assert_close(only_prior, expected, atol=1e-4, rtol=0)  # r = p: every weight is p(y | x, z)
    first = importance_weighted_nll(model, batch, 16, torch.Generator().manual_seed(1), prior_samples=0)
    again = importance_weighted_nll(model, batch, 16, torch.Generator().manual_seed(1))
    assert torch.equal(first, again)
    for bad in (-1, 17, 2.0, True):
        with pytest.raises(ValueError, match="prior_samples must be an integer from 0 to num_samples"):
            importance_weighted_nll(model, batch, 16, prior_samples=bad)


def test_importance_weighted_nll_tightens_the_negative_elbo(model, tokenizer):
    torch.manual_seed(0)
    with torch.no_grad():  # an informative random posterior
        model.encoder.to_latent_mean_logvar[-1].weight.normal_(0, 0.5)
    batch = _batch(tokenizer, ["won the game", "lost the match again", "the coach was good"])
    generator = torch.Generator().manual_seed(0)
    iw = importance_weighted_nll(model, batch, 64, generator)
    elbo = negative_elbo(model, batch, 64, generator)
    assert torch.isfinite(iw).all() and (iw <= elbo + 1e-3).all()


def test_causal_lm_nll_of_left_padded_rows_matches_the_llms_loss(tokenizer):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    llm = LlamaForCausalLM(tiny_llama_config()).eval()
    batch = _batch(tokenizer, ["won", "lost the match again today"])  # row 0 is left-padded
    nll = causal_lm_nll(decoder_as_causal_lm(CVAELlamaForCausalLM.from_llm(llm)), batch)
    for row in range(2):
        keep = batch["attention_mask"][row].bool()
        input_ids, labels = batch["input_ids"][row, keep][None], batch["labels"][row, keep][None]
        num_tokens = (labels[:, 1:] != -100).sum().item()
        assert nll[row].item() == pytest.approx(llm(input_ids, labels=labels).loss.item() * num_tokens, abs=1e-4)


def test_language_modelling_rejects_bad_input(model, tokenizer):
    batch = _batch(tokenizer, ["won the game"])
    with pytest.raises(ValueError, match="CVAELlamaForCausalLM"):
        importance_weighted_nll(decoder_as_causal_lm(model), batch)
    with pytest.raises(ValueError, match="lacks"):
        importance_weighted_nll(model, {"input_ids": batch["input_ids"]})
    with pytest.raises(ValueError, match="num_samples"):
        negative_elbo(model, batch, 0)


# ------------------------------------------------------------------------------------------------ generation


def test_decoder_as_causal_lm_is_the_wrapped_llm():
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    llm = LlamaForCausalLM(tiny_llama_config()).eval()
    cvae = CVAELlamaForCausalLM.from_llm(llm).eval()
    decoder = decoder_as_causal_lm(cvae)
    input_ids = torch.randint(3, 99, (2, 7))
    torch.testing.assert_close(decoder(input_ids).logits, llm(input_ids).logits)
    assert decoder.model is cvae.model  # shared, not copied


def test_diverse_generation_from_a_decoder_that_ignores_the_latent(model, tokenizer):
    ignore_latent(model)
    # no early end of text: a random tiny model may end a text at once, and an empty text has no 4-grams to match
    model.generation_config.min_new_tokens = 6
    result = diverse_generation(
        model, tokenizer, PROMPTS, num_latents=3, max_new_tokens=6, generator=torch.Generator().manual_seed(0)
    )
    assert [len(group) for group in result["generations"]] == [3, 3, 3]
    for group in result["generations"]:
        assert len(set(group)) == 1  # every latent decodes to the same text
    assert result["self_bleu_4"] == 100.0
    expected = sum(distinct_n(group, 1) for group in result["generations"]) / 3
    assert result["distinct_1"] == pytest.approx(expected) and result["distinct_1"] <= 1 / 3 + 1e-9


def test_diverse_generation_from_a_latent_sensitive_decoder(model, tokenizer):
    references = [["the team won the cup", "the team lost"], ["stocks fell", "stocks rose"], ["on the mat", "a dog"]]
    result = diverse_generation(
        model,
        tokenizer,
        PROMPTS,
        num_latents=4,
        max_new_tokens=8,
        references=references,
        generator=torch.Generator().manual_seed(0),
    )
    assert sum(len(set(group)) for group in result["generations"]) > 3  # the latent changes the text
    assert 0 <= result["rouge_lsum"] <= 1 and 0 <= result["self_bleu_4"] < 100
    again = diverse_generation(
        model, tokenizer, PROMPTS, num_latents=4, max_new_tokens=8, generator=torch.Generator().manual_seed(0)
    )
    assert again["generations"] == result["generations"]
    with pytest.raises(ValueError, match="num_latents must be an integer >= 2"):
        diverse_generation(model, tokenizer, PROMPTS, num_latents=1)
    with pytest.raises(ValueError, match="K >= 2"):
        diversity_metrics([["only one"]])


def test_temperature_sweep_at_zero_temperature_decodes_the_prior_mean(model, tokenizer):
    model.generation_config.min_new_tokens = 6  # as above: texts long enough to have 4-grams
    rows = temperature_sweep(model, tokenizer, PROMPTS[:2], temperatures=(0.0, 1.0), num_latents=3, max_new_tokens=6)
    assert [row["latent_temperature"] for row in rows] == [0.0, 1.0]
    assert rows[0]["self_bleu_4"] == 100.0  # z = 0 for every sample: identical texts
    assert rows[1]["distinct_4"] >= rows[0]["distinct_4"]


def test_base_samples_come_from_the_llm_not_the_cvae(model, tokenizer):
    samples = base_samples(decoder_as_causal_lm(model), tokenizer, PROMPTS[:2], num_samples=3, max_new_tokens=5)
    assert [len(group) for group in samples] == [3, 3]
    assert samples == base_samples(decoder_as_causal_lm(model), tokenizer, PROMPTS[:2], 3, 5)  # seeded
    with pytest.raises(ValueError, match="depend on a latent"):
        base_samples(model, tokenizer, PROMPTS, 2)


def test_reconstruction_and_interpolation(model, tokenizer):
    result = reconstruction(model, tokenizer, PROMPTS, ["won the cup", "in early trade", "on the mat"], 6)
    assert len(result["reconstructions"]) == 3
    assert 0 <= result["bleu_4"] <= 100 and 0 <= result["rouge_l"] <= 1

    path = interpolate(model, tokenizer, "won the cup", "lost the game", steps=11, prompt="the team", max_new_tokens=6)
    assert path["t"] == pytest.approx([i / 10 for i in range(11)])
    assert len(path["texts"]) == len(path["rouge_l_to_a"]) == len(path["rouge_l_to_b"]) == 11
    ignore_latent(model)  # every step decodes the same text: the same ROUGE-L all along
    flat = interpolate(model, tokenizer, "won the cup", "lost the game", steps=5, prompt="the team", max_new_tokens=6)
    assert len(set(flat["texts"])) == 1 and len(set(flat["rouge_l_to_a"])) == 1
    with pytest.raises(ValueError, match="steps"):
        interpolate(model, tokenizer, "a", "b", steps=1)


# ------------------------------------------------------------------------------------------------ control


def test_label_directions_hand_computed():
    # 3 labels, latents equal to one-hot label probabilities, balanced: corr(p_l, p_m) = -1/2 for l != m,
    # the mean over labels is 0, so the direction of label l is (e_l - (1 - e_l) / 2) / sqrt(3 / 2)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    probs = torch.nn.functional.one_hot(labels, 3).float()
    latents = torch.cat([probs, torch.zeros(6, 1)], dim=1)  # a 4th dimension that never varies
    directions = label_directions(latents, probs, [0] * 6)
    expected = (torch.eye(3) - (1 - torch.eye(3)) / 2) / math.sqrt(3 / 2)
    torch.testing.assert_close(directions, torch.cat([expected, torch.zeros(3, 1)], dim=1))
    torch.testing.assert_close(directions.norm(dim=-1), torch.ones(3))


def test_control_success_hand_computed():
    shifted_probs = torch.tensor(
        [
            [[0.9, 0.1], [0.6, 0.4]],  # texts decoded toward label 0: p(label 0) = 0.9, 0.6
            [[0.3, 0.7], [0.9, 0.1]],  # toward label 1: p(label 1) = 0.7, 0.1
        ]
    )
    reconstructed_probs = torch.tensor([[0.5, 0.5], [0.7, 0.05]])
    result = control_success(shifted_probs, reconstructed_probs)
    assert result["success"] == pytest.approx([0.75, 0.4])
    assert result["win_rate"] == pytest.approx([0.5, 1.0])  # 0.9 > 0.5, 0.6 < 0.7; 0.7 > 0.5, 0.1 > 0.05
    assert result["mean_success"] == pytest.approx(0.575) and result["mean_win_rate"] == pytest.approx(0.75)


def test_control_success_is_one_when_the_latent_encodes_the_label():
    # the latent encodes the label perfectly; a "decoder" writes the label of the largest coordinate and a
    # classifier reads it back exactly
    torch.manual_seed(0)
    num_labels = 4
    labels = torch.arange(num_labels).repeat(6)
    latents = 2.0 * torch.nn.functional.one_hot(labels, num_labels).float() + 0.1 * torch.randn(24, num_labels)
    probs = torch.nn.functional.one_hot(labels, num_labels).float()
    group_ids = torch.arange(6).repeat_interleave(4)
    directions = label_directions(latents, probs, group_ids)

    def decode_and_classify(z):
        return torch.nn.functional.one_hot(z.argmax(-1), num_labels).float()

    shifted = shift_latents(latents, directions, strength=16.0)
    assert shifted.shape == (num_labels, 24, num_labels)
    result = control_success(torch.stack([decode_and_classify(z) for z in shifted]), decode_and_classify(latents))
    assert result["success"] == [1.0] * num_labels and result["mean_success"] == 1.0
    # a text already of the target label cannot win (strictly greater probability): 3 of 4 win
    assert result["win_rate"] == [0.75] * num_labels


def test_logistic_regression_standardises_on_the_training_rows_and_separates_the_labels():
    generator = torch.Generator().manual_seed(0)
    targets = torch.arange(3).repeat(20)
    # the label lives in dimension 1 (an offset of 4 per label) under a large constant and noisy dimensions
    features = torch.randn(60, 4, generator=generator) + 100.0
    features[:, 1] += 4.0 * targets
    head, mean, std, loss = fit_logistic_regression(features, targets, slice(0, 40), num_labels=3)
    torch.testing.assert_close(mean, features[:40].mean(0))
    torch.testing.assert_close(std, features[:40].std(0, correction=0))
    assert not head.weight.requires_grad and head.weight.shape == (3, 4)
    assert (head((features[40:] - mean) / std).argmax(-1) == targets[40:]).float().mean() >= 0.9  # chance 1/3
    assert head.weight[:, 1].abs().sum() > 3 * head.weight[:, [0, 2, 3]].abs().sum(0).max()
    assert 0 < loss < math.log(3)
    assert linear_probe_accuracy(features, targets, 40) >= 0.9
    noise = torch.randn(400, 4, generator=generator)  # nothing to tell: about chance
    assert abs(linear_probe_accuracy(noise, torch.arange(2).repeat(200), 200) - 0.5) < 0.1


def test_label_probe_and_control_on_a_tiny_model(model, tokenizer):
    sports = ["the team won the cup", "players won the match", "the coach lost the game", "goal score team match"]
    markets = ["stocks fell on oil price", "bank rate rose", "shares and profit rose", "sales of chips fell"]
    texts = [text for pair in zip(sports * 3, markets * 3, strict=True) for text in pair]
    labels = [label for _ in range(12) for label in (0, 1)]
    probe = train_label_probe(decoder_as_causal_lm(model), tokenizer, texts, labels, held_out_fraction=0.25)
    assert probe.label_values == [0, 1] and probe.history["num_held_out"] == 6
    assert probe.held_out_accuracy == 1.0  # the two vocabularies are disjoint
    probs = probe.predict_proba(["the team won", "stocks fell"])
    assert probs.shape == (2, 2) and probs[0, 0] > 0.5 and probs[1, 1] > 0.5

    directions = torch.nn.functional.normalize(torch.randn(2, 8), dim=-1)
    result = latent_guided_control(model, tokenizer, probe, PROMPTS, torch.randn(3, 8), directions, max_new_tokens=5)
    assert len(result["success"]) == len(result["win_rate"]) == 2
    assert all(0 <= value <= 1 for value in result["success"] + result["win_rate"])
    assert set(result["controlled"]) == {"0", "1"} and len(result["reconstructions"]) == 3
    with pytest.raises(ValueError, match="at least 2 labels"):
        train_label_probe(decoder_as_causal_lm(model), tokenizer, texts[:4], [0] * 4)


# ------------------------------------------------------------------------------------------------ dialogue


def test_follow_up_nll_matches_the_llms_own_loss(model, tokenizer):
    llm = decoder_as_causal_lm(model)
    nll = follow_up_nll(llm, tokenizer, ["the team won \n", "stocks fell"], ["that is good", "bad"])
    prefix = tokenizer("stocks fell")["input_ids"]
    follow_up = tokenizer("that is good", add_special_tokens=False)["input_ids"]
    input_ids = torch.tensor([prefix + follow_up])
    labels = torch.tensor([[-100] * len(prefix) + follow_up])
    assert nll.shape == (2, 2)
    assert nll[1, 0].item() == pytest.approx(llm(input_ids, labels=labels).loss.item(), abs=1e-5)


def test_dialogue_metrics_hand_made_case(model, tokenizer):
    references = ["the team won the cup", "stocks fell on oil price"]
    metrics = dialogue_metrics(
        references, references, ["who won ?", "what about stocks ?"], decoder_as_causal_lm(model), tokenizer
    )
    assert metrics["bleu_1"] == metrics["bleu_2"] == 100.0
    assert metrics["distinct_1"] == pytest.approx(9 / 10)  # "the" twice
    assert metrics["bertscore_minilm_f1"] == pytest.approx(1.0, abs=1e-4)
    assert metrics["labels"]["bertscore_minilm_f1"] == "BERTScore (MiniLM-L6)"
    assert "substitute" in metrics["labels"]["fed_style"] and math.isfinite(metrics["fed_style"])
    fed = fed_style_score(decoder_as_causal_lm(model), tokenizer, ["who won ?"], ["the team won"])
    assert set(fed) >= {"interesting", "fluent", "overall"}
    assert fed["overall"] == pytest.approx(sum(v for k, v in fed.items() if k != "overall") / 8)


# ------------------------------------------------------------------------------------------------ report


def one_to_many_rows(num_prompts=4, num_responses=3):
    from datasets import ClassLabel, Dataset, Features, Value

    topics = [
        ("the team", ["won the cup", "lost the game", "won the match", "players won"]),
        ("stocks", ["fell on oil price", "rose in early trade", "fell and bank rate rose", "rose"]),
    ]
    rows = {"prompt": [], "response": [], "prompt_id": [], "label": []}
    for prompt_id in range(num_prompts):
        prompt, responses = topics[prompt_id % 2]
        for response in responses[:num_responses]:
            rows["prompt"].append(f"{prompt} {'new' if prompt_id >= 2 else 'old'}")
            rows["response"].append(response)
            rows["prompt_id"].append(prompt_id)
            rows["label"].append(prompt_id % 2)
    features = Features(
        {
            "prompt": Value("string"),
            "response": Value("string"),
            "prompt_id": Value("int64"),
            "label": ClassLabel(names=["sports", "business"]),
        }
    )
    return Dataset.from_dict(rows, features=features)


@pytest.fixture
def saved_model(tmp_path, model, tokenizer):
    folder = tmp_path / "cvae"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def check_png(path):
    import matplotlib.image

    pixels = matplotlib.image.imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100
    assert pixels[..., :3].std() > 0.01  # not a blank image


def test_evaluation_report_on_a_tiny_cvae(saved_model, tmp_path):
    output_dir = tmp_path / "report"
    results = evaluation_report(
        saved_model,
        one_to_many_rows(),
        output_dir,
        metrics=list(METRICS),
        num_latents=3,
        max_prompt_tokens=8,
        max_response_tokens=8,
        temperatures=(0.1, 1.0),
        iw_samples=4,
        iw_prior_samples=2,
        batch_size=8,
    )
    for name in ("results.json", "results.md", "samples.json"):
        assert (output_dir / name).is_file()
    on_disk = json.loads((output_dir / "results.json").read_text())
    assert set(METRICS) <= set(on_disk)
    assert on_disk["data"] == {"num_prompts": 4, "responses_per_prompt": 3, "num_responses": 12}
    latent = on_disk["latent"]
    assert latent["kl"] == pytest.approx(0.0, abs=1e-6)  # a new model's posterior is N(0, I)
    assert latent["active_units_whole_set"] == 0 and latent["consistent_units"]["0.1"] == 8
    language_modeling = on_disk["language_modeling"]
    assert language_modeling["iw_perplexity"] > 1 and language_modeling["iw_perplexity_defensive"] > 1
    assert language_modeling["iw_prior_samples"] == on_disk["settings"]["iw_prior_samples"] == 2
    assert on_disk["diversity"]["references"] == "dataset responses"
    assert len(on_disk["temperature_sweep"]) == 2 and len(on_disk["interpolation"]["texts"]) == 11
    assert on_disk["control"]["label_names"] == ["sports", "business"]
    assert len(on_disk["control"]["success"]) == 2 and 0 <= on_disk["control"]["probe_held_out_accuracy"] <= 1
    assert on_disk["labels"]["bertscore_minilm_f1"] == "BERTScore (MiniLM-L6)"
    markdown = (output_dir / "results.md").read_text()
    assert "| MI I(y; z \\| x) (nats) |" in markdown and "BERTScore (MiniLM-L6)" in markdown
    assert "| IW perplexity per token, 2 of k=4 samples from the prior |" in markdown
    assert set(results["plots"]) == {"latent_space", "kl_per_dimension", "temperature_sweep", "interpolation"}
    for file in results["plots"].values():
        assert f"]({file})" in markdown
        check_png(output_dir / file)


def test_evaluation_report_samples_the_base_lm_when_prompts_have_one_response(model, tokenizer, tmp_path):
    rows = one_to_many_rows(num_prompts=3, num_responses=1)
    model.train()
    results = evaluation_report(
        model,
        rows,
        tmp_path,
        metrics=["diversity", "reconstruction", "language_modeling"],
        tokenizer=tokenizer,
        num_latents=2,
        max_prompt_tokens=8,
        max_response_tokens=6,
    )
    assert results["diversity"]["references"].startswith("samples of the base LM")
    assert set(results["settings"]["metrics"]) == {"diversity", "reconstruction", "language_modeling"}
    assert not results["plots"]
    assert model.training  # evaluated in eval mode, given back as it came


def test_evaluation_report_rejects_bad_input(saved_model, model, tokenizer, tmp_path):
    from datasets import Dataset
    from transformers import LlamaForCausalLM

    rows = one_to_many_rows()
    with pytest.raises(ValueError, match=r"unknown metric\(s\) \['perplexity'\]; expected names from"):
        evaluation_report(saved_model, rows, tmp_path, metrics=["perplexity"])
    with pytest.raises(ValueError, match="num_latents must be an integer >= 2"):
        evaluation_report(saved_model, rows, tmp_path, metrics=["diversity"], num_latents=1)
    with pytest.raises(ValueError, match=r"iw_prior_samples must be an integer from 0 to iw_samples \(4\), got 5"):
        evaluation_report(saved_model, rows, tmp_path, metrics=["language_modeling"], iw_samples=4, iw_prior_samples=5)
    with pytest.raises(ValueError, match="expected 'prompt' and 'response'"):
        evaluation_report(saved_model, Dataset.from_dict({"text": ["a b"]}), tmp_path)
    with pytest.raises(ValueError, match="metric 'control' needs a 'label' column"):
        evaluation_report(saved_model, rows.remove_columns("label"), tmp_path, metrics=["control"])
    with pytest.raises(ValueError, match="metric 'latent' needs one-to-many data"):
        evaluation_report(saved_model, one_to_many_rows(num_responses=1), tmp_path, metrics=["latent"])
    llama_folder = tmp_path / "llama"
    LlamaForCausalLM(tiny_llama_config()).save_pretrained(llama_folder)
    tokenizer.save_pretrained(llama_folder)
    with pytest.raises(ValueError, match=r"metric\(s\) \['latent'\] need a CVAE's latent, but the model is a plain"):
        evaluation_report(llama_folder, rows, tmp_path, metrics=["latent", "diversity"], tokenizer=tokenizer)
    with pytest.raises(ValueError, match=r"metric\(s\) \['control'\] need a CVAE's latent"):
        evaluation_report(decoder_as_causal_lm(model), rows, tmp_path, metrics=["control"], tokenizer=tokenizer)
    with pytest.raises(ValueError, match="model must be a CVAELlamaForCausalLM"):
        evaluation_report(model.encoder, rows, tmp_path, metrics=["latent"], tokenizer=tokenizer)
    assert not (tmp_path / "results.json").exists()  # nothing written on bad input


def test_evaluation_report_of_a_plain_lm_scores_its_samples(model, tokenizer, tmp_path):
    """The base / fine-tuned LLM rows of a comparison: diversity and dialogue from the LM's own samples (T 1.0,
    top-p 0.95, seeded), with the same metric functions as a CVAE's."""
    llm = decoder_as_causal_lm(model)
    rows = one_to_many_rows()
    kwargs = dict(tokenizer=tokenizer, num_latents=3, max_prompt_tokens=8, max_response_tokens=6, seed=3)
    results = evaluation_report(llm, rows, tmp_path / "a", metrics=["diversity", "dialogue"], **kwargs)
    prompts = [f"{p} {a}" for a in ("old", "new") for p in ("the team", "stocks")]
    samples = base_samples(llm, tokenizer, prompts, 3, 6, max_prompt_tokens=8, seed=3)
    references = [[row["response"] for row in rows if row["prompt"] == prompt] for prompt in prompts]
    assert results["diversity"]["llm"] == diversity_metrics(samples, references)
    assert results["settings"]["generation"].startswith("samples (temperature 1.0")
    assert results["settings"]["base_model"] == "the evaluated LM itself"
    on_disk = json.loads((tmp_path / "a" / "samples.json").read_text())
    assert on_disk["diversity"][0]["llm"] == samples[0]
    first = [group[0] for group in base_samples(llm, tokenizer, prompts, 1, 6, max_prompt_tokens=8, seed=3)]
    assert [row["response"] for row in on_disk["dialogue"]] == first
    assert results["dialogue"]["base_lm_perplexity"] == pytest.approx(response_perplexity(llm, tokenizer, prompts, first))
    markdown = (tmp_path / "a" / "results.md").read_text()
    assert "3 samples per prompt" in markdown and "| LM samples |" in markdown and "base LM perplexity" in markdown
    again = evaluation_report(llm, rows, tmp_path / "b", metrics=["diversity"], **kwargs)
    assert again["diversity"] == results["diversity"]  # the seed fixes the samples
    assert evaluation_report(llm, rows, tmp_path / "c", **kwargs)["settings"]["metrics"] == ["diversity"]


def test_response_perplexity_is_the_per_token_perplexity_of_the_responses(model, tokenizer):
    from cvae_llama.data.collator import OneToManyCollator

    llm = decoder_as_causal_lm(model)
    contexts, responses = ["the team won", "stocks fell on"], ["the cup", "oil price and bank rate"]
    batch = OneToManyCollator(tokenizer, 128, 64)([{"prompt": c, "response": r} for c, r in zip(contexts, responses, strict=True)])
    nll = causal_lm_nll(llm, batch)
    tokens = (batch["labels"][:, 1:] != -100).sum()
    assert tokens == 3 + 6  # each response and its EOS
    expected = math.exp(nll.sum().item() / tokens.item())
    assert response_perplexity(llm, tokenizer, contexts, responses) == pytest.approx(expected, rel=1e-5)
    assert response_perplexity(llm, tokenizer, contexts, responses, batch_size=1) == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="contexts has 2 texts but responses has 1"):
        response_perplexity(llm, tokenizer, contexts, responses[:1])


def test_information_is_how_much_the_decoder_reads_z(model, tokenizer, tmp_path):
    """`latent.information`: NLL of a response decoded from its sibling's posterior mean minus from its own."""
    from cvae_llama.data.collator import OneToManyCollator
    from cvae_llama.evaluation.report import _next_in_group

    assert _next_in_group(torch.tensor([0, 0, 0, 1, 1, 2])).tolist() == [1, 2, 0, 4, 3, 5]
    with torch.no_grad():  # a fresh encoder gives every response the mean 0: make the means differ
        model.encoder.to_latent_mean_logvar[-1].weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    rows = one_to_many_rows()
    kwargs = dict(metrics=["latent"], max_prompt_tokens=8, max_response_tokens=8, mc_samples=2, tokenizer=tokenizer)
    results = evaluation_report(model, rows, tmp_path / "a", **kwargs)
    groups = [{"prompt": p, "responses": list(rows.filter(lambda r, i=i: r["prompt_id"] == i)["response"])}
              for i, p in enumerate(dict.fromkeys(rows["prompt"]))]  # fmt: skip
    batch = OneToManyCollator(tokenizer, 8, 8)(groups)
    mean, _ = model.encode(batch["input_ids"], batch["attention_mask"])
    sibling = _next_in_group(batch["group_ids"])
    expected = (response_log_likelihood(model, batch, mean) - response_log_likelihood(model, batch, mean[sibling]))
    assert results["latent"]["information"] == pytest.approx(expected.mean().item(), rel=1e-4, abs=1e-6)
    assert results["latent"]["information"] != 0
    ignore_latent(model)
    deaf = evaluation_report(model, rows, tmp_path / "b", **kwargs)
    assert deaf["latent"]["information"] == pytest.approx(0.0, abs=1e-5)  # a decoder that ignores z reads nothing
    assert "decoder reads z" in (tmp_path / "a" / "results.md").read_text()


def test_every_report_metric_is_one_function_and_one_markdown_section():
    from cvae_llama.evaluation.report import MARKDOWN_SECTIONS, METRIC_FUNCTIONS

    assert tuple(METRIC_FUNCTIONS) == METRICS == tuple(MARKDOWN_SECTIONS)  # one registry order, no if-chain
    assert all(callable(function) for function in (*METRIC_FUNCTIONS.values(), *MARKDOWN_SECTIONS.values()))


@pytest.mark.slow
def test_evaluation_report_on_smollm2_agnews(tmp_path):
    from transformers import AutoTokenizer

    from cvae_llama.data import (
        DATASET_BUDGETS,
        DATASET_LABEL_NAMES,
        load_agnews,
        load_dataset_by_name,
        make_one_to_many,
    )
    from cvae_llama.pretrained import smollm2_path

    torch.manual_seed(0)
    folder = smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = CVAELlamaForCausalLM.from_llm(folder).eval()
    with torch.no_grad():  # stand-in for training: a posterior that depends on the response
        model.encoder.to_latent_mean_logvar[-1].weight.normal_(0, 0.1)
    prompt_tokens, response_tokens = DATASET_BUDGETS["agnews"]
    test = load_dataset_by_name("agnews", SHARED_DATA / "agnews", split="test", tokenizer=tokenizer)
    first_two = {}  # 8 prompts: the first 2 of each of the 4 topics
    for index, label in enumerate(test["label"][:200]):
        if len(first_two.setdefault(label, [])) < 2:
            first_two[label].append(index)
    test = test.select(sorted(index for indices in first_two.values() for index in indices))
    one_to_many = make_one_to_many(
        decoder_as_causal_lm(model),
        tokenizer,
        test["prompt"],
        4,
        tmp_path / "one_to_many",
        max_new_tokens=10,
        labels=test["label"],
        max_prompt_tokens=prompt_tokens,
        progress=False,
    )
    probe_rows = load_agnews(SHARED_DATA / "agnews", split="validation").select(range(64))
    results = evaluation_report(
        model,
        one_to_many,
        tmp_path / "report",
        tokenizer=tokenizer,
        probe_dataset=probe_rows,
        num_latents=4,
        label_names=DATASET_LABEL_NAMES["agnews"],
        max_prompt_tokens=prompt_tokens,
        max_response_tokens=response_tokens,
        max_new_tokens=10,
        iw_samples=2,
    )
    print(
        json.dumps(
            {key: results[key] for key in ("latent", "language_modeling", "diversity", "reconstruction")},
            indent=1,
            default=str,
        )[:3000]
    )
    print("control:", {key: results["control"][key] for key in ("probe_held_out_accuracy", "success", "win_rate")})
    for name in ("results.json", "results.md", "samples.json"):
        assert (tmp_path / "report" / name).is_file()
    assert set(results["plots"]) == {"latent_space", "kl_per_dimension", "temperature_sweep", "interpolation"}
    for file in results["plots"].values():
        check_png(tmp_path / "report" / file)
    assert results["data"] == {"num_prompts": 8, "responses_per_prompt": 4, "num_responses": 32}
    latent = results["latent"]
    assert latent["kl"] > 0 and 0 < latent["mutual_information"] <= math.log(4) + 0.1
    assert latent["active_units_whole_set"] > 0
    # the base LM's own samples are likely under it; an untrained CVAE's memory slots disturb the decoder
    language_modeling = results["language_modeling"]
    assert 1 < language_modeling["base_lm_perplexity"] < 100
    assert math.isfinite(language_modeling["iw_perplexity"]) and language_modeling["iw_perplexity"] > 1
    assert results["control"]["probe_held_out_accuracy"] > 0.25  # above chance on 4 topics
    assert len(results["temperature_sweep"]) == 4
