"""`experiments/latent_dpo.py` end to end on a tiny random CVAE with SmolLM2's tokenizer (Yelp and AG News pairs,
latent DPO, latent arithmetic, trl's DPO with LoRA), so that the script behind the "Learned prior" figures cannot
rot."""

import json
import math

import pytest
import torch
from conftest import load_experiment
from datasets import Dataset

from cvae_llama import CVAELlamaForCausalLM, load_latent_prior
from cvae_llama.data import load_agnews


@pytest.fixture(scope="module")
def tiny_cvae(tiny_lm, tmp_path_factory):
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("tiny-cvae")
    torch.manual_seed(0)
    model = CVAELlamaForCausalLM.from_llm(tiny_lm)
    with torch.no_grad():  # a fresh posterior is N(0, I) for every text (its read-out zero): move it
        for parameter in model.encoder.parameters():
            if not parameter.any():
                parameter.normal_(0.0, 0.05)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_lm).save_pretrained(folder)
    return folder


def rows(output) -> list[dict]:
    return [json.loads(line) for line in (output / "results.jsonl").read_text().splitlines()]


def check_scores(row: dict, num_labels: int, num_samples: int):
    assert 0.0 <= row["target_rate"] <= 1.0 and len(row["label_rates"]) == num_labels
    assert sum(row["label_rates"]) == pytest.approx(1.0)
    assert 0.0 <= row["distinct_2"] <= 1.0 and row["base_perplexity"] > 1.0
    assert len(row["examples"]) == min(4, num_samples)


@pytest.mark.slow
def test_yelp_rows_of_each_method(tiny_cvae, tmp_path, one_thread):
    script = load_experiment("latent_dpo")
    common = ["--cvae", str(tiny_cvae), "--target", "negative", "--num_pairs", "8", "--num_train", "400",
              "--num_classifier", "200", "--num_samples", "4", "--max_new_tokens", "4", "--batch_size", "4",
              "--dpo_steps", "2"]  # fmt: skip
    output = tmp_path / "latent"
    script.main([*common, "--output_dir", str(output)])
    pairs, unsteered, trained, learned = rows(output)
    assert pairs["num_pairs"] == 8 and 0.5 < pairs["classifier_accuracy"] <= 1.0
    assert [unsteered["what"], trained["what"], learned["what"]] == ["unsteered prior", "latent DPO", "learned prior"]
    check_scores(unsteered, 2, 4)
    check_scores(learned, 2, 4)
    model = load_latent_prior(
        CVAELlamaForCausalLM.from_pretrained(tiny_cvae), output / "prior-yelp-latent-negative-seed0"
    )
    assert model.config.learned_prior
    assert trained["trainable"] == sum(p.numel() for p in model.latent_prior.parameters())  # the prior alone

    output = tmp_path / "online"
    script.main([*common, "--method", "online", "--num_generations", "2", "--dpo_steps", "1", "--output_dir",
                 str(output)])  # fmt: skip
    _, _, trained, learned = rows(output)
    assert trained["what"] == "online latent DPO" and math.isfinite(trained["last_log"]["reward"])
    check_scores(learned, 2, 4)
    assert (output / "prior-yelp-online-negative-seed0" / "latent_prior.safetensors").is_file()

    output = tmp_path / "arithmetic"
    script.main([*common, "--method", "arithmetic", "--strengths", "0", "2", "--output_dir", str(output)])
    _, unsteered, direction, *steered = rows(output)
    assert direction["direction_norm"] > 0 and 0.0 <= direction["probe_accuracy"] <= 1.0
    assert [row["strength"] for row in steered] == [0, 2]
    for row in steered:
        check_scores(row, 2, 4)

    output = tmp_path / "lora"
    script.main([*common, "--method", "lora", "--dpo_steps", "1", "--output_dir", str(output)])
    _, base, trained, tuned = rows(output)
    assert [base["what"], trained["what"], tuned["what"]] == ["base LLM", "LoRA DPO", "LoRA DPO LLM"]
    assert 0 < trained["trainable"] < sum(p.numel() for p in model.parameters())
    check_scores(tuned, 2, 4)


@pytest.mark.slow
def test_agnews_pairs_come_from_a_classifier_over_each_prompts_responses(tiny_cvae, shared_data, tmp_path, one_thread):
    texts = load_agnews(shared_data / "agnews", "validation")
    by_topic = {label: [text for text, found in zip(texts["text"], texts["label"], strict=True) if found == label][:3]
                for label in range(4)}  # fmt: skip
    one_to_many = {"prompt": [], "response": [], "prompt_id": [], "label": []}
    for prompt_id in range(3):  # each prompt: one response of each topic
        for label in range(4):
            one_to_many["prompt"].append(f"Prompt {prompt_id}")
            one_to_many["response"].append(" " + " ".join(by_topic[label][prompt_id].split()[:20]))
            one_to_many["prompt_id"].append(prompt_id)
            one_to_many["label"].append(label)
    Dataset.from_dict(one_to_many).save_to_disk(str(tmp_path / "one_to_many"))
    script = load_experiment("latent_dpo")
    output = tmp_path / "agnews"
    script.main(["--cvae", str(tiny_cvae), "--data", "agnews", "--target", "world", "--one_to_many",
                 str(tmp_path / "one_to_many"), "--num_train_prompts", "2", "--num_samples", "3", "--max_new_tokens",
                 "4", "--batch_size", "2", "--dpo_steps", "1", "--output_dir", str(output)])  # fmt: skip
    pairs, unsteered, _, learned = rows(output)
    assert pairs["classifier_accuracy"] > 0.6  # four topics
    assert 1 <= pairs["num_pairs"] <= 2  # the two training prompts, one World response each
    assert set(pairs["examples"]["prompt"]) <= {"Prompt 0", "Prompt 1"}
    check_scores(learned, 4, 3)
    assert [example[0] for example in learned["examples"]] == [example[0] for example in unsteered["examples"]]

    with pytest.raises(SystemExit):
        script.main(["--cvae", str(tiny_cvae), "--data", "agnews", "--target", "positive"])
