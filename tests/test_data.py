import json
import logging
import zipfile

import pytest
import torch
from conftest import tiny_cvae_config, tiny_llama_config
from datasets import Dataset, load_from_disk
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from cvae_llama import CVAELlamaForCausalLM
from cvae_llama.data import (
    DATASET_BUDGETS,
    IGNORE_INDEX,
    OneToManyCollator,
    encode_prompts,
    group_responses,
    load_agnews,
    load_dailydialog,
    load_dataset_by_name,
    load_prompt_response_file,
    load_yelp,
    make_one_to_many,
    split_prompt_response,
)


PAD, BOS, EOS = 0, 1, 2


def word_tokenizer(bos: bool = True) -> PreTrainedTokenizerFast:
    """One token per word: "w<i>" is id 4 + i, so that expected ids can be written by hand."""
    vocab = {"<pad>": PAD, "<s>": BOS, "</s>": EOS, "<unk>": 3, **{f"w{i}": 4 + i for i in range(20)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if bos:
        backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS)])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>" if bos else None,
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
    )


def w(*indices: int) -> str:
    return " ".join(f"w{i}" for i in indices)


def ids(*indices: int) -> list[int]:
    return [4 + i for i in indices]


SENTENCES = [
    "the food was great and the service was friendly.",
    "never going back to this place again, the waiter was rude!",
    "Unions representing workers say they are disappointed after talks.",
    "What do you mean? It will help us to relax.",
    "Stocks rose on Monday as oil prices eased for a second session.",
]


@pytest.fixture(scope="module")
def bpe_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE (the kind Llama 3 and SmolLM2 use) trained on a few sentences; adds BOS like Llama."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<pad>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    backend.train_from_iterator(SENTENCES, trainer)
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


# ------------------------------------------------------------------------------------ readers (data/loaders.py)


def test_load_yelp_folder(shared_data):
    dataset = load_yelp(shared_data / "yelp")
    assert len(dataset) == 25_278 + 38_205
    assert dataset.column_names == ["text", "label"]
    assert dataset.features["label"].names == ["negative", "positive"]
    assert dataset[0] == {"text": "ok never going back to this place again.", "label": 0}
    assert sum(dataset["label"]) == 38_205 and set(dataset["label"]) == {0, 1}
    raw = load_yelp(shared_data / "yelp", split="dev", clean_up_tokenization_spaces=False)
    assert raw[0]["text"] == "ok never going back to this place again ."


def test_load_yelp_single_file_and_tab_format(shared_data, tmp_path):
    positive = load_yelp(shared_data / "yelp" / "sentiment.dev.1")
    assert len(positive) == 38_205 and set(positive["label"]) == {1}
    rated = tmp_path / "yelp.txt"
    rated.write_text("4\tgreat food !\n0\tawful .\n\n2\tok i guess\n", encoding="utf-8")
    dataset = load_yelp(rated)
    assert dataset["label"] == [4, 0, 2] and dataset["text"] == ["great food!", "awful.", "ok i guess"]
    assert dataset.features["label"].num_classes == 5
    plain = tmp_path / "reviews.txt"
    plain.write_text("first review\nsecond one\n", encoding="utf-8")
    assert load_yelp(plain).column_names == ["text"]


def test_load_yelp_bad_input(shared_data, tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_yelp(tmp_path / "missing")
    with pytest.raises(ValueError, match="split='train' not found.*'dev'"):
        load_yelp(shared_data / "yelp", split="train")
    for name in ("sentiment.train.0", "sentiment.dev.0"):
        (tmp_path / name).write_text("a line\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"splits \['dev', 'train'\]: pass one as split="):
        load_yelp(tmp_path)
    with pytest.raises(ValueError, match="applies to a folder"):
        load_yelp(tmp_path / "sentiment.dev.0", split="dev")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n", encoding="utf-8")
    with pytest.raises(ValueError, match="no text"):
        load_yelp(empty)


def test_load_agnews(shared_data):
    dataset = load_agnews(shared_data / "agnews")
    assert len(dataset) == 7_600
    assert dataset.features["label"].names == ["World", "Sports", "Business", "Sci/Tech"]
    assert [dataset["label"].count(label) for label in range(4)] == [1_900] * 4
    first = dataset[0]
    assert first["label"] == 2  # "3" in the file: Business
    assert first["prompt"] == "Fears for T N pension after talks"
    assert first["response"].startswith("Unions representing workers at Turner Newall say")
    assert first["text"] == first["prompt"] + " " + first["response"]
    # backslash line breaks and "&"-less HTML entities are decoded
    second = dataset[1]["response"]
    assert "A second team of rocketeers" in second and "$10 million" in second
    assert not any("\\" in text or "#39;" in text for text in dataset["text"])

    validation, test = load_agnews(shared_data / "agnews", "validation"), load_agnews(shared_data / "agnews", "test")
    assert len(validation) == len(test) == 3_800
    assert validation[0] == dataset[0] and test[0] == dataset[1] and test[-1] == dataset[-1]
    raw = load_agnews(shared_data / "agnews" / "test.csv", clean=False)
    assert "A second\\team" in raw[1]["response"]


def test_load_agnews_bad_input(shared_data, tmp_path):
    with pytest.raises(ValueError, match="split='dev' is not one of"):
        load_agnews(shared_data / "agnews", split="dev")
    with pytest.raises(ValueError, match="train.csv"):
        load_agnews(shared_data / "agnews", split="train")  # only the test split is shared
    bad = tmp_path / "bad.csv"
    bad.write_text('"World","title only"\n', encoding="utf-8")
    with pytest.raises(ValueError, match='line 1.*expected "label","title","description"'):
        load_agnews(bad)


def test_load_dailydialog(shared_data):
    train = load_dailydialog(shared_data / "dailydialog", "train")
    validation = load_dailydialog(shared_data / "dailydialog" / "validation.zip", "validation")
    assert (len(train), len(validation)) == (76_053, 7_069)  # the paper's pair counts
    assert train.features["label"].names == ["inform", "question", "directive", "commissive"]
    assert train[0] == {
        "prompt": "Say, Jim, how about going for a few beers after dinner?\n",
        "response": "You know that is tempting but is really not good for our fitness.",
        "label": 3,  # act 4, commissive
    }
    assert train[1]["prompt"] == train[0]["prompt"] + train[0]["response"] + "\n"
    assert train[1]["label"] == 1  # act 2, question
    assert set(validation["label"]) == {0, 1, 2, 3}
    # one train dialogue has 12 turns but 11 acts: its 11 pairs carry no label
    assert train["label"].count(None) == 11 and set(train["label"]) == {0, 1, 2, 3, None}
    assert all(prompt.endswith("\n") for prompt in validation["prompt"])


def test_load_dailydialog_separator_and_extracted_folder(shared_data, tmp_path):
    with zipfile.ZipFile(shared_data / "dailydialog" / "validation.zip") as archive:
        archive.extractall(tmp_path)  # -> tmp_path/validation/dialogues_validation.txt, ...
    from_zip = load_dailydialog(shared_data / "dailydialog", "validation", turn_separator="<|eot_id|>")
    from_folder = load_dailydialog(tmp_path, "validation", turn_separator="<|eot_id|>")
    assert from_zip.to_dict() == from_folder.to_dict()
    assert from_zip[0]["prompt"] == "Good morning, sir. Is there a bank near here?<|eot_id|>"


def test_load_dailydialog_bad_input(shared_data, tmp_path):
    with pytest.raises(ValueError, match="split='test': found no dialogues_test.txt"):
        load_dailydialog(shared_data / "dailydialog", "test")
    with pytest.raises(ValueError, match="does not exist"):
        load_dailydialog(tmp_path / "nowhere", "train")


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".csv", ".parquet", "folder"])
def test_load_prompt_response_file(tmp_path, suffix):
    rows = Dataset.from_dict({"prompt": ["p0", "p1"], "response": ["r0", "r1"], "label": [0, 1]})
    path = tmp_path / f"rows{suffix}"
    if suffix in (".json", ".jsonl"):
        rows.to_json(path)
    elif suffix == ".csv":
        rows.to_csv(path, index=False)
    elif suffix == ".parquet":
        rows.to_parquet(path)
    else:
        rows.save_to_disk(path)
    assert load_prompt_response_file(path).to_dict() == rows.to_dict()
    assert load_dataset_by_name("prompt_response", path).to_dict() == rows.to_dict()


def test_load_prompt_response_file_bad_input(tmp_path):
    path = tmp_path / "rows.json"
    Dataset.from_dict({"prompt": ["p"], "text": ["t"]}).to_json(path)
    with pytest.raises(ValueError, match=r"has columns \['prompt', 'text'\] but needs \['response'\]"):
        load_prompt_response_file(path)
    with pytest.raises(ValueError, match="suffix '.txt'"):
        (tmp_path / "rows.txt").write_text("x")
        load_prompt_response_file(tmp_path / "rows.txt")
    with pytest.raises(ValueError, match="does not exist"):
        load_prompt_response_file(tmp_path / "missing.json")
    (tmp_path / "not_a_dataset").mkdir()
    with pytest.raises(ValueError, match="not one written by save_to_disk"):
        load_prompt_response_file(tmp_path / "not_a_dataset")


def test_split_prompt_response_by_hand():
    tokenizer = word_tokenizer()
    texts = Dataset.from_dict({"text": [w(0, 1, 2, 3, 4), w(5, 6), w(7, 8, 9)], "label": [0, 1, 2]})
    dataset = split_prompt_response(texts, tokenizer, 2)
    assert dataset["prompt"] == [w(0, 1), w(7, 8)]  # "w5 w6" has no response token left: dropped
    assert dataset["response"] == [" " + w(2, 3, 4), " " + w(9)]
    assert dataset["label"] == [0, 2]
    capped = split_prompt_response(texts, tokenizer, 2, max_response_tokens=2, min_response_tokens=0)
    assert capped["response"] == [" " + w(2, 3), "", " " + w(9)] and capped["prompt"][1] == w(5, 6)
    assert split_prompt_response(texts, tokenizer, 0)["prompt"] == ["", "", ""]
    with pytest.raises(ValueError, match=r"min_response_tokens=4 more \(the longest of 3 texts has 5 tokens\)"):
        split_prompt_response(texts, tokenizer, 3, min_response_tokens=4)
    with pytest.raises(ValueError, match=r"needs \['body'\]"):
        split_prompt_response(texts, tokenizer, 2, text_column="body")
    with pytest.raises(ValueError, match="empty"):
        split_prompt_response(texts.select([]), tokenizer, 2)


def test_split_prompt_response_round_trip_bpe(bpe_tokenizer):
    texts = Dataset.from_dict({"text": SENTENCES + ["Zürich café – naïve ✓ emoji 🎉 fin."]})
    dataset = split_prompt_response(texts, bpe_tokenizer, 5)
    for text, prompt, response in zip(texts["text"], dataset["prompt"], dataset["response"], strict=True):
        assert prompt + response == text
        encode = lambda s: bpe_tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
        assert len(encode(prompt)) <= 5  # a character split across byte tokens goes to the prompt whole
        assert encode(prompt) + encode(response) == encode(text)[: len(encode(prompt) + encode(response))]
    assert all(len(bpe_tokenizer(p, add_special_tokens=False)["input_ids"]) == 5 for p in dataset["prompt"][:5])


def test_load_dataset_by_name_paper_budgets(shared_data, bpe_tokenizer):
    prompt_budget, response_budget = DATASET_BUDGETS["agnews"]
    dataset = load_dataset_by_name("agnews", shared_data / "agnews", split="validation", tokenizer=bpe_tokenizer)
    assert 0 < len(dataset) <= 3_800
    for row in dataset.select(range(50)):
        assert row["text"].startswith(row["prompt"] + row["response"])
        assert len(bpe_tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]) == prompt_budget
        response_tokens = len(bpe_tokenizer(row["response"], add_special_tokens=False)["input_ids"])
        assert response_budget // 10 <= response_tokens <= response_budget
    with pytest.raises(ValueError, match="pass tokenizer="):
        load_dataset_by_name("yelp", shared_data / "yelp")
    with pytest.raises(ValueError, match="name='imdb' is not one of"):
        load_dataset_by_name("imdb", shared_data)
    dialogues = load_dataset_by_name("dailydialog", shared_data / "dailydialog", split="validation")
    assert len(dialogues) == 7_069


# ---------------------------------------------------------------------------------- grouping (data/grouping.py)


def flat_rows() -> Dataset:
    return Dataset.from_dict(
        {
            "prompt": ["a"] * 5 + ["b"] * 3 + ["c"],
            "response": ["a0", "a1", "a2", "a3", "a4", "b0", "b1", "b2", "c0"],
            "label": [1, 1, 1, 0, 1, 2, 2, 2, 3],
        }
    )


def test_group_responses(caplog):
    with caplog.at_level(logging.INFO, logger="cvae_llama.data"):
        groups = group_responses(flat_rows(), group_size=3, seed=0)
    assert "dropped 1 of 3 prompts with fewer than 3 responses" in caplog.text
    assert groups.column_names == ["prompt", "responses", "label"]
    assert groups["prompt"] == ["a", "b"]
    assert groups[1]["responses"] == ["b0", "b1", "b2"] and groups[1]["label"] == 2
    a_responses = groups[0]["responses"]
    assert len(a_responses) == len(set(a_responses)) == 3 and set(a_responses) <= {"a0", "a1", "a2", "a3", "a4"}
    assert groups[0]["label"] == 1  # the majority label: "a" has four rows labelled 1 and one 0
    assert group_responses(flat_rows(), 3, seed=0).to_dict() == groups.to_dict()
    draws = {tuple(group_responses(flat_rows(), 3, seed=seed)[0]["responses"]) for seed in range(10)}
    assert len(draws) > 1  # the seed matters


def test_group_responses_disjoint_groups_empty_responses_and_prompt_ids():
    rows = Dataset.from_dict(
        {
            "prompt": ["same"] * 8,
            "response": ["r0", "r1", "r2", "", "r3", "  ", "r4", "r5"],
            "prompt_id": [0, 0, 0, 0, 0, 1, 1, 1],
        }
    )
    groups = group_responses(rows, 2, max_groups_per_prompt=5)
    # prompt_id keeps the two prompts with the same text apart; empty responses are not usable
    assert groups["prompt"] == ["same"] * 3 and "label" not in groups.column_names
    first_two = groups[0]["responses"] + groups[1]["responses"]
    assert len(set(first_two)) == 4 and set(first_two) == {"r0", "r1", "r2", "r3"}
    assert set(groups[2]["responses"]) == {"r4", "r5"}
    assert len(group_responses(rows, 2, group_by="prompt", max_groups_per_prompt=5)) == 3  # 6 usable // 2


def test_group_responses_bad_input():
    with pytest.raises(ValueError, match="group_size=4 leaves no group: prompts have at most 3"):
        group_responses(flat_rows().select(range(5, 9)), 4)
    with pytest.raises(ValueError, match="group_size must be an integer >= 1, got group_size=0"):
        group_responses(flat_rows(), 0)
    with pytest.raises(ValueError, match="empty"):
        group_responses(flat_rows().select([]), 2)
    with pytest.raises(ValueError, match=r"needs \['response'\]"):
        group_responses(flat_rows().remove_columns("response"), 2)


# ---------------------------------------------------------------------------------- collator (data/collator.py)


def test_collator_by_hand():
    collator = OneToManyCollator(word_tokenizer(), max_prompt_tokens=2, max_response_tokens=4)
    features = [
        {"prompt": w(1, 2, 3), "responses": [w(5, 6), w(7, 8, 9, 10, 11)], "label": 2},
        {"prompt": "", "response": w(12)},  # a flat row, unconditional, without label
    ]
    batch = collator(features)
    p, r = [BOS, *ids(2, 3)], IGNORE_INDEX  # left truncation keeps the end of the prompt: w2 w3
    expected_ids = [
        [PAD, *p, *ids(5, 6), EOS],
        [*p, *ids(7, 8, 9, 10)],  # truncated to 4 tokens: no EOS
        [PAD, PAD, PAD, PAD, BOS, *ids(12), EOS],
    ]
    expected_labels = [
        [r, r, r, r, *ids(5, 6), EOS],
        [r, r, r, *ids(7, 8, 9, 10)],
        [r, r, r, r, r, *ids(12), EOS],
    ]
    assert batch["input_ids"].tolist() == expected_ids
    assert batch["labels"].tolist() == expected_labels
    assert batch["attention_mask"].tolist() == [[0, 1, 1, 1, 1, 1, 1], [1] * 7, [0, 0, 0, 0, 1, 1, 1]]
    assert batch["group_ids"].tolist() == [0, 0, 1]
    assert batch["class_labels"].tolist() == [2, 2, IGNORE_INDEX]
    assert all(tensor.dtype == torch.long for tensor in batch.values())
    assert "class_labels" not in collator([{"prompt": w(1), "response": w(2)}])


def test_collator_prompt_budget_zero_tokenizer_without_bos_and_pad_multiple():
    tokenizer = word_tokenizer(bos=False)
    assert encode_prompts(tokenizer, ["", w(1, 2)]) == [[EOS], ids(1, 2)]  # no BOS: an empty prompt starts at EOS
    collator = OneToManyCollator(tokenizer, max_prompt_tokens=0, max_response_tokens=8, pad_to_multiple_of=4)
    batch = collator([{"prompt": w(1, 2), "responses": [w(3)]}])
    assert batch["input_ids"].tolist() == [[PAD, EOS, *ids(3), EOS]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, IGNORE_INDEX, *ids(3), EOS]]


def test_collator_pad_equal_to_eos_still_scores_eos(bpe_tokenizer):
    tokenizer = word_tokenizer()
    tokenizer.pad_token = tokenizer.eos_token
    batch = OneToManyCollator(tokenizer, 4, 4)([{"prompt": w(1), "responses": [w(2), w(3, 4)]}])
    assert batch["input_ids"].tolist() == [[EOS, BOS, *ids(1, 2), EOS], [BOS, *ids(1, 3, 4), EOS]]
    assert batch["labels"][:, -1].tolist() == [EOS, EOS] and batch["labels"][0, 0] == IGNORE_INDEX


def test_collator_feeds_the_model(shared_data, bpe_tokenizer):
    rows = load_dailydialog(shared_data / "dailydialog", "validation").select(range(40))
    unconditional = rows.map(lambda row: {"prompt": ""})
    groups = group_responses(unconditional, 4, max_groups_per_prompt=2)  # two groups of 4 utterances, x empty
    collator = OneToManyCollator(bpe_tokenizer, *DATASET_BUDGETS["dailydialog"])
    batch = collator([groups[0], groups[1]])
    assert batch["input_ids"].shape[0] == 8 and batch["group_ids"].tolist() == [0] * 4 + [1] * 4
    assert batch["input_ids"].shape[1] <= 1 + 256 + 36
    torch.manual_seed(0)
    model = CVAELlamaForCausalLM(tiny_cvae_config(llama_overrides={"vocab_size": len(bpe_tokenizer)}))
    output = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    assert torch.isfinite(output.loss)
    long_context = collator([rows[30]])  # a long context is cut to its last 256 tokens, BOS in front
    assert (long_context["labels"] == IGNORE_INDEX).sum() <= 1 + 256


def test_collator_bad_input():
    tokenizer = word_tokenizer()
    collator = OneToManyCollator(tokenizer, 4, 4)
    with pytest.raises(ValueError, match=r"feature 0 has keys \['input_ids'\] but needs 'prompt' and 'responses'"):
        collator([{"input_ids": [1, 2]}])
    with pytest.raises(ValueError, match="remove_unused_columns=False"):
        collator([{}])
    with pytest.raises(ValueError, match=r"feature 1 has responses=\[\]; expected a non-empty list"):
        collator([{"prompt": "", "response": w(1)}, {"prompt": "", "responses": []}])
    with pytest.raises(ValueError, match="feature 0: response '' tokenizes to no tokens"):
        collator([{"prompt": w(1), "responses": [w(2), ""]}])
    with pytest.raises(ValueError, match="features is empty"):
        collator([])
    tokenizer.pad_token = None
    with pytest.raises(ValueError, match=r"no pad token.*tokenizer.pad_token = tokenizer.eos_token"):
        OneToManyCollator(tokenizer, 4, 4)
    with pytest.raises(ValueError, match="max_response_tokens must be an integer >= 1, got max_response_tokens=0"):
        OneToManyCollator(word_tokenizer(), 4, 0)


# ------------------------------------------------------------------------------- sampling (data/one_to_many.py)


PROMPTS = ["the food was", "never going back", "", "Stocks rose on", "What do you"]


@pytest.fixture
def sampler(bpe_tokenizer, one_thread) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config(vocab_size=len(bpe_tokenizer))).eval()


def sample(model, tokenizer, output_dir, **overrides):
    arguments = dict(max_new_tokens=6, batch_size=2, seed=3, labels=[0, 1, 2, 3, 0], progress=False)
    arguments.update(overrides)
    return make_one_to_many(model, tokenizer, PROMPTS, 3, output_dir, **arguments)


def test_make_one_to_many(sampler, bpe_tokenizer, tmp_path):
    dataset = sample(sampler, bpe_tokenizer, tmp_path / "out")
    assert len(dataset) == len(PROMPTS) * 3
    assert dataset.column_names == ["prompt", "response", "prompt_id", "label"]
    assert dataset["prompt_id"] == [i for i in range(len(PROMPTS)) for _ in range(3)]
    assert dataset["prompt"] == [PROMPTS[i] for i in dataset["prompt_id"]]
    assert dataset["label"] == [[0, 1, 2, 3, 0][i] for i in dataset["prompt_id"]]
    assert len(set(dataset["response"])) > len(PROMPTS)  # sampled, not greedy
    assert load_from_disk(tmp_path / "out").to_dict() == dataset.to_dict()
    assert not (tmp_path / "out" / "shards").exists()
    groups = group_responses(dataset, 2)
    assert len(groups) >= 4 and all(len(group) == 2 for group in groups["responses"])
    # every batch samples its own random stream: one prompt in two batches gets different responses
    twice = make_one_to_many(
        sampler, bpe_tokenizer, PROMPTS[:1] * 2, 3, tmp_path / "twice", max_new_tokens=6, batch_size=1, progress=False
    )
    assert twice["response"][:3] != twice["response"][3:]


def test_make_one_to_many_with_a_cvae(tmp_path, one_thread):
    """A CVAE samples like any causal LM (one prior latent per response)."""
    torch.manual_seed(0)
    model = CVAELlamaForCausalLM(tiny_cvae_config())
    dataset = make_one_to_many(model, word_tokenizer(), [w(1, 2), ""], 4, tmp_path, max_new_tokens=5, progress=False)
    assert dataset["prompt_id"] == [0] * 4 + [1] * 4


def test_make_one_to_many_resumes_after_interruption(sampler, bpe_tokenizer, tmp_path):
    reference = sample(sampler, bpe_tokenizer, tmp_path / "reference")

    generate, sampled = sampler.generate, []

    def interrupted_generate(*args, **kwargs):
        if sampled:  # the second batch fails, after the first one was written
            raise RuntimeError("interrupted")
        sampled.append(kwargs["input_ids"].shape[0])
        return generate(*args, **kwargs)

    sampler.generate = interrupted_generate
    with pytest.raises(RuntimeError, match="interrupted"):
        sample(sampler, bpe_tokenizer, tmp_path / "out")
    assert [file.name for file in (tmp_path / "out" / "shards").iterdir()] == ["batch-000000.jsonl"]
    assert sampler.training is False

    def counting_generate(*args, **kwargs):
        sampled.append(kwargs["input_ids"].shape[0])
        return generate(*args, **kwargs)

    sampler.generate = counting_generate
    resumed = sample(sampler, bpe_tokenizer, tmp_path / "out")
    assert sum(sampled) == len(PROMPTS)  # 2 prompts before the interruption, the other 3 after: none twice
    assert resumed.to_dict() == reference.to_dict()


def test_make_one_to_many_refuses_overwrite_and_changed_settings(sampler, bpe_tokenizer, tmp_path):
    first = sample(sampler, bpe_tokenizer, tmp_path / "out")
    with pytest.raises(ValueError, match="already holds a finished dataset: pass overwrite=True"):
        sample(sampler, bpe_tokenizer, tmp_path / "out")
    again = sample(sampler, bpe_tokenizer, tmp_path / "out", overwrite=True)
    assert again.to_dict() == first.to_dict()

    shards = tmp_path / "partial" / "shards"
    shards.mkdir(parents=True)
    (shards / "batch-000000.jsonl").write_text(json.dumps({"prompt": "x", "response": "y", "prompt_id": 0}) + "\n")
    (tmp_path / "partial" / "one_to_many_config.json").write_text(json.dumps({"num_responses": 7}))
    with pytest.raises(ValueError, match=r"shards of a run with other settings \(\['batch_size'"):
        sample(sampler, bpe_tokenizer, tmp_path / "partial")
    restarted = sample(sampler, bpe_tokenizer, tmp_path / "partial", resume=False)
    assert restarted.to_dict() == first.to_dict()


def test_make_one_to_many_bad_input(sampler, bpe_tokenizer, tmp_path):
    with pytest.raises(ValueError, match="prompts is empty"):
        make_one_to_many(sampler, bpe_tokenizer, [], 2, tmp_path, max_new_tokens=2)
    with pytest.raises(ValueError, match="num_responses must be an integer >= 1, got num_responses=0"):
        make_one_to_many(sampler, bpe_tokenizer, ["a"], 0, tmp_path, max_new_tokens=2)
    with pytest.raises(ValueError, match="labels has 1 entries but prompts has 2"):
        make_one_to_many(sampler, bpe_tokenizer, ["a", "b"], 2, tmp_path, max_new_tokens=2, labels=[0])
    greedy = {"do_sample": False}
    with pytest.raises(ValueError, match=r"generation_kwargs sets \['do_sample'\]"):
        make_one_to_many(sampler, bpe_tokenizer, ["a"], 2, tmp_path, max_new_tokens=2, generation_kwargs=greedy)


# ---------------------------------------------------------------------------------------------------- unconditional text
def test_unconditional_text_from_lines_or_a_text_column(tmp_path):
    from cvae_llama.data import (
        is_unconditional,
        load_prompt_response_file,
        load_text_file,
        single_response_groups,
        unconditional_rows,
    )

    lines = tmp_path / "texts.txt"
    lines.write_text("the food was great .\n\n  service was slow .  \n")
    rows = load_text_file(lines)
    assert rows.to_dict() == {"prompt": ["", ""], "response": ["the food was great .", "service was slow ."]}
    assert is_unconditional(rows)
    table = tmp_path / "texts.jsonl"
    table.write_text('{"text": "a", "label": 1}\n{"text": "b", "label": 0}\n')
    assert load_prompt_response_file(table).to_dict() == {"response": ["a", "b"], "prompt": ["", ""], "label": [1, 0]}
    with_label = unconditional_rows(Dataset.from_dict({"text": ["x", " "], "label": [3, 4]}))
    groups = single_response_groups(with_label)  # every row its own example; the blank text is dropped
    assert groups.to_dict() == {"prompt": [""], "responses": [["x"]], "label": [3]}
    assert not is_unconditional(Dataset.from_dict({"prompt": ["", "hi"], "response": ["a", "b"]}))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    with pytest.raises(ValueError, match="no non-blank line"):
        load_text_file(empty)
    with pytest.raises(ValueError, match="text"):
        unconditional_rows(Dataset.from_dict({"sentence": ["a"]}))
