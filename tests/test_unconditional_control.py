"""`experiments/unconditional_control.py` end to end (train a plain VAE over AG News texts through the CLI, the
probe, the latent's topic accuracy, control at two strengths with the decoded texts' fluency) on a tiny random Llama
with SmolLM2's tokenizer, so that the script behind the control figures cannot rot."""

import json

import pytest
from conftest import load_experiment


@pytest.mark.slow
def test_trains_evaluates_and_adds_a_rerun_to_the_results(tiny_lm, shared_data, tmp_path):
    script = load_experiment("unconditional_control")
    output = tmp_path / "control"
    argv = ["--output_dir", str(output), "--model", str(tiny_lm), "--data", str(shared_data / "agnews"),
            "--num_train", "32", "--num_probe", "32", "--num_test", "16", "--num_control", "4", "--max_steps", "2",
            "--batch_size", "8", "--max_tokens", "8"]  # fmt: skip
    results = script.main([*argv, "--strengths", "2"])
    record = json.loads((output / "cvae" / "cvae_training.json").read_text())
    assert record["training_arguments"]["max_steps"] == 2
    assert results["label_names"][0] == "World"
    assert 0.0 <= results["latent_topic_accuracy"] <= 1.0 and 0.0 <= results["reconstruction_topic_accuracy"] <= 1.0
    entry = results["control"]["2.0"]
    assert len(entry["success"]) == 4 and 0.0 <= entry["mean_success"] <= 1.0
    assert set(entry["fluency"]) == set(entry["repetition"]) == {"reconstruction", "0", "1", "2", "3"}
    assert all(value > 1.0 for value in entry["fluency"].values())  # perplexities
    assert all(0.0 <= value < 1.0 for value in entry["repetition"].values())
    assert results["originals"]["fluency"] > 1.0 and 0.0 <= results["originals"]["repetition"] < 1.0
    texts = json.loads((output / "texts.json").read_text())
    assert [len(texts["2.0"][name]) for name in ("reconstruction", "0", "3")] == [4, 4, 4]

    # a rerun reuses the training and adds its strength to the results already there
    trained = (output / "cvae" / "model.safetensors").stat().st_mtime_ns
    results = script.main([*argv, "--strengths", "4"])
    assert (output / "cvae" / "model.safetensors").stat().st_mtime_ns == trained
    assert list(results["control"]) == ["2.0", "4.0"]
    assert json.loads((output / "results.json").read_text())["control"]["2.0"] == entry
    assert set(json.loads((output / "texts.json").read_text())) == {"2.0", "4.0"}


@pytest.mark.parametrize(
    ("texts", "expected"), [(["a b c"], 0.0), (["a b a b"], 1 / 3), (["x"], 0.0), (["a b a b", "a b c"], 1 / 6)]
)
def test_repetition_is_the_share_of_repeated_bigrams_within_each_text(texts, expected):
    assert load_experiment("unconditional_control").repetition(texts) == pytest.approx(expected)
