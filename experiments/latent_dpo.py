"""Control by a learned prior (issue 40; results in README.md here, "Learned prior").

A CVAE around SmolLM2-135M-Instruct gets a learned prior p(z | x) trained by `LatentDPOTrainer` on preference pairs
(`--method latent`), or online with the classifier that labels the pairs as its reward function (`--method online`:
the probability of the target label of each decoding of the prior's latents, no pairs). The same pairs train trl's
`DPOTrainer` with a LoRA adapter on the base LLM (`--method lora`), or give a latent-arithmetic direction (`--method
arithmetic`: the chosen responses' mean posterior mean minus the rejected ones', added at each `--strengths` k to
z ~ N(0, I); with the held-out accuracy of a linear probe telling the two sets apart by their posterior means).
Before and after, one text is generated per held-out prompt (the CVAE: z from its prior or shifted, then greedy
decoding given z, so that what varies is z; the LLM: T 1.0, top-p 0.95) and scored: the rate of the target label by
a bag-of-words logistic regression fitted on other texts than the pairs' (and than those of the classifier that
labels the pairs), Distinct-2 over the texts, and the base LLM's perplexity of them after their prompts. Rows are
appended to `<output_dir>/results.jsonl` as they come.

- `--data yelp`: a CVAE saved by `sentiment_transfer.py --save DIR` (unconditional Yelp sentences of both
  sentiments). Pairs from the dataset's labels: the prompt empty (BOS), a training sentence of the target sentiment
  chosen and one of the other rejected. 128 texts after BOS are scored.
- `--data agnews`: a CVAE trained on the base LLM's one-to-many responses to the first 8 tokens of AG News validation
  texts (the paper's 8 / 32 setting; `--one_to_many`, the folder `cvae-llama sample` writes). Pairs from a classifier
  over those samples, as the paper makes them: per training prompt, its responses that a topic classifier (fitted on
  other validation texts) gives the target topic are chosen, paired with the prompt's other responses. Scored on
  one text after each of 128 later validation prompts (unseen in training) by a classifier fitted on test texts.

    python experiments/sentiment_transfer.py --save experiments/latent_dpo/cvae --max_steps 200
    python experiments/latent_dpo.py --cvae experiments/latent_dpo/cvae --target negative --dpo_steps 30
    python experiments/latent_dpo.py --cvae experiments/latent_dpo/cvae --target negative --method lora --dpo_steps 100
    python experiments/latent_dpo.py --cvae experiments/latent_dpo/cvae --target negative --method arithmetic
"""

import argparse
import json
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
from datasets import Dataset, load_from_disk
from transformers import AutoModelForCausalLM, AutoTokenizer


REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "experiments"))

from sentiment_transfer import BagOfWords, read  # noqa: E402

from cvae_llama import CVAELlamaForCausalLM, LatentDPOConfig, LatentDPOTrainer, save_latent_prior  # noqa: E402
from cvae_llama.data import OneToManyCollator, load_agnews, load_dataset_by_name  # noqa: E402
from cvae_llama.data.loaders import DATASET_LABEL_NAMES  # noqa: E402
from cvae_llama.evaluation.control import linear_probe_accuracy  # noqa: E402
from cvae_llama.evaluation.generation import posterior_of_texts  # noqa: E402
from cvae_llama.evaluation.language_modeling import causal_lm_nll, count_response_tokens, perplexity  # noqa: E402
from cvae_llama.evaluation.text import distinct_n  # noqa: E402
from cvae_llama.evaluation.utils import generate_texts, prior_latents  # noqa: E402


DATA = REPO.parent / "shared" / "data"
OUTPUT = REPO / "experiments" / "latent_dpo"
TARGETS = {
    "yelp": DATASET_LABEL_NAMES["yelp"],
    "agnews": tuple(name.lower() for name in DATASET_LABEL_NAMES["agnews"]),
}

# How texts are decoded: the CVAE greedily given its z (so that what varies is z), a plain LLM by sampling
CVAE_DECODING = dict(do_sample=False)
LLM_DECODING = dict(do_sample=True, top_p=0.95, temperature=1.0, top_k=0)


@dataclass
class Task:
    pairs: Dataset  # prompt, chosen, rejected
    prompts: list[str]  # the held-out prompts, one text generated after each
    classifier: BagOfWords  # the rate's classifier (fitted on other texts than the pairs' and their classifier's)
    labelling: BagOfWords  # the classifier behind the pairs (Yelp: fitted on the pairs' sentences) and the reward
    train_prompts: list[str]  # the prompts of online training
    target: int
    accuracy: float  # the classifier's accuracy on held-out labelled texts
    max_prompt_tokens: int
    max_response_tokens: int


def accuracy_of(classifier: BagOfWords, texts: list[str], labels: list[int]) -> float:
    return (classifier.predict(texts) == torch.tensor(labels)).float().mean().item()


def yelp_task(options, tokenizer) -> Task:
    """Yelp: pairs from the labels of `sentiment_transfer.py`'s training sentences, the prompt empty."""
    sentences = {label: read(label) for label in (0, 1)}
    half, classifier_half = options.num_train // 2, options.num_classifier // 2
    target = TARGETS["yelp"].index(options.target)
    pairs = Dataset.from_dict({
        "prompt": [""] * options.num_pairs,
        "chosen": sentences[target][: options.num_pairs], "rejected": sentences[1 - target][: options.num_pairs],
    })  # fmt: skip
    texts = {label: lines[half : half + classifier_half] for label, lines in sentences.items()}
    classifier = BagOfWords(texts[0] + texts[1], [0] * classifier_half + [1] * classifier_half)
    labelling = BagOfWords(sentences[0][:half] + sentences[1][:half], [0] * half + [1] * half)
    held_out = {label: lines[-48:] for label, lines in sentences.items()}
    accuracy = accuracy_of(classifier, held_out[0] + held_out[1], [0] * 48 + [1] * 48)
    return Task(pairs, [""] * options.num_samples, classifier, labelling, [""] * options.num_pairs, target, accuracy,
                8, 32)  # fmt: skip


def agnews_task(options, tokenizer) -> Task:
    """AG News: pairs from a topic classifier over the one-to-many responses of the training prompts."""
    target = TARGETS["agnews"].index(options.target)
    validation, test = (load_agnews(DATA / "agnews", split) for split in ("validation", "test"))
    labelling = BagOfWords(list(validation["text"][1000:3000]), list(validation["label"][1000:3000]))
    classifier = BagOfWords(list(test["text"][:2000]), list(test["label"][:2000]))
    responses = load_from_disk(str(options.one_to_many)).filter(
        lambda row: row["prompt_id"] < options.num_train_prompts
    )
    texts = [text.strip() for text in responses["response"]]
    labels = labelling.predict(texts).tolist()
    groups = defaultdict(list)  # prompt_id -> the indices of its responses, in order
    for index, prompt_id in enumerate(responses["prompt_id"]):
        groups[prompt_id].append(index)
    prompt_of = {prompt_id: responses[indices[0]]["prompt"] for prompt_id, indices in groups.items()}
    rows = {"prompt": [], "chosen": [], "rejected": []}
    for prompt_id in sorted(groups):
        chosen = [texts[i] for i in groups[prompt_id] if labels[i] == target]
        rejected = [texts[i] for i in groups[prompt_id] if labels[i] != target]
        for good, bad in list(zip(chosen, rejected, strict=False))[: options.pairs_per_prompt]:
            rows["prompt"].append(prompt_of[prompt_id])
            rows["chosen"].append(good)
            rows["rejected"].append(bad)
    first = options.first_eval_prompt
    prompts = load_dataset_by_name("agnews", DATA / "agnews", split="validation", tokenizer=tokenizer)
    prompts = list(prompts.select(range(first, first + options.num_samples))["prompt"])
    accuracy = accuracy_of(classifier, list(test["text"][2000:2800]), list(test["label"][2000:2800]))
    train_prompts = [prompt_of[prompt_id] for prompt_id in sorted(groups)]
    return Task(Dataset.from_dict(rows), prompts, classifier, labelling, train_prompts, target, accuracy, 8, 32)


def probe_accuracy(chosen: torch.Tensor, rejected: torch.Tensor, seed: int) -> float:
    """How well the posterior means tell the chosen responses from the rejected ones: the held-out accuracy of a
    logistic regression fitted on a random half of them (0.5: the latent does not carry the preference)."""
    features, labels = torch.cat([chosen, rejected]), torch.tensor([1] * len(chosen) + [0] * len(rejected))
    order = torch.randperm(len(features), generator=torch.Generator().manual_seed(seed))
    return linear_probe_accuracy(features[order], labels[order], len(features) // 2)


def lora_dpo_trainer(llm, tokenizer, task: Task, options, output_dir: Path):
    """trl's `DPOTrainer` with a LoRA adapter on `llm`, empty prompts as the BOS token (not yet trained)."""
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    pairs = task.pairs.map(lambda row: {"prompt": row["prompt"] or tokenizer.bos_token})
    config = DPOConfig(
        output_dir=str(output_dir), per_device_train_batch_size=options.batch_size, max_steps=options.dpo_steps,
        learning_rate=options.learning_rate, beta=options.beta, max_length=task.max_prompt_tokens +
        task.max_response_tokens + 8, logging_steps=min(10, options.dpo_steps), save_strategy="no", report_to=[],
        seed=options.seed,
        disable_tqdm=True, use_cpu=True,
    )  # fmt: skip
    lora = LoraConfig(
        r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], task_type="CAUSAL_LM"
    )
    return DPOTrainer(model=llm, args=config, train_dataset=pairs, processing_class=tokenizer, peft_config=lora)


def base_perplexity(llm, tokenizer, task: Task, texts: list[str]) -> float:
    """The base LLM's per-token perplexity of `texts`, each after its prompt (BOS where the prompt is empty)."""
    collator = OneToManyCollator(tokenizer, task.max_prompt_tokens, max_response_tokens=64)
    rows = [{"prompt": prompt, "response": text or "."} for prompt, text in zip(task.prompts, texts, strict=True)]
    nll, tokens = [], []
    with torch.no_grad():
        for start in range(0, len(rows), 32):
            batch = collator(rows[start : start + 32])
            nll.append(causal_lm_nll(llm, batch))
            tokens.append(count_response_tokens(batch["labels"]))
    return perplexity(torch.cat(nll), torch.cat(tokens))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cvae", type=Path, required=True, help="the CVAE folder (see above for each --data)")
    parser.add_argument("--data", choices=sorted(TARGETS), default="yelp")
    parser.add_argument("--target", required=True, help=f"the label of the chosen responses: {TARGETS}")
    parser.add_argument(
        "--method",
        choices=["latent", "online", "lora", "arithmetic"],
        default="latent",
        help="latent DPO on the CVAE's prior from the pairs or online from a reward (the pairs' classifier), trl's "
        "DPO with LoRA on the base LLM, or latent arithmetic",
    )
    parser.add_argument("--num_pairs", type=int, default=512, help="yelp: preference pairs from training sentences")
    parser.add_argument("--num_train", type=int, default=4000, help="yelp: sentiment_transfer.py's training sentences")
    parser.add_argument("--num_classifier", type=int, default=2000, help="yelp: classifier sentences, half of each")
    parser.add_argument(
        "--one_to_many",
        type=Path,
        default=REPO / "experiments" / "memory_gate" / "agnews" / "agnews_one_to_many",
        help="agnews: the one-to-many responses the CVAE trained on (prompt, response, prompt_id)",
    )
    parser.add_argument("--num_train_prompts", type=int, default=96, help="agnews: the prompts the CVAE trained on")
    parser.add_argument("--pairs_per_prompt", type=int, default=8, help="agnews: at most this many pairs a prompt")
    parser.add_argument("--first_eval_prompt", type=int, default=112, help="agnews: the first held-out prompt")
    parser.add_argument("--dpo_steps", type=int, default=100)
    parser.add_argument("--batch_size", type=int, default=8, help="pairs per step")
    parser.add_argument("--learning_rate", type=float, default=1e-4)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--num_generations", type=int, default=8, help="online: latents decoded per prompt")
    parser.add_argument("--strengths", type=float, nargs="+", default=[0.5, 1, 1.5, 2, 3], help="arithmetic: k")
    parser.add_argument("--num_samples", type=int, default=128, help="texts generated per row (held-out prompts)")
    parser.add_argument("--max_new_tokens", type=int, default=24)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output_dir", type=Path, default=OUTPUT, help="where results.jsonl and the priors go")
    options = parser.parse_args(argv)
    if options.target not in TARGETS[options.data]:
        parser.error(f"--target {options.target!r} is not a label of {options.data}: {TARGETS[options.data]}")
    torch.set_num_threads(options.threads)
    started = time.time()
    output = options.output_dir
    output.mkdir(parents=True, exist_ok=True)
    setting = {key: getattr(options, key)
               for key in ("data", "method", "target", "dpo_steps", "learning_rate", "beta", "seed")}  # fmt: skip

    def record(row: dict) -> None:
        row = {"seconds": round(time.time() - started, 1), "cvae": str(options.cvae), **setting, **row}
        with (output / "results.jsonl").open("a", encoding="utf-8") as file:
            file.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)

    tokenizer = AutoTokenizer.from_pretrained(options.cvae)
    task = (yelp_task if options.data == "yelp" else agnews_task)(options, tokenizer)
    model = CVAELlamaForCausalLM.from_pretrained(options.cvae).eval()
    base = model.config.base_model_name_or_path
    scorer = AutoModelForCausalLM.from_pretrained(base).eval()  # the base LLM's perplexity of the samples
    record({"what": "pairs", "num_pairs": len(task.pairs), "classifier_accuracy": task.accuracy,
            "examples": task.pairs[:2]})  # fmt: skip

    def evaluate(what: str, source, decoding: dict, latents: torch.Tensor | None = None, **extra) -> None:
        source.eval()
        torch.manual_seed(options.seed + 1)  # the CVAE's prior samples, or the LLM's tokens
        texts = generate_texts(source, tokenizer, task.prompts, latents, max_new_tokens=options.max_new_tokens,
                               max_prompt_tokens=task.max_prompt_tokens, batch_size=32, **decoding)  # fmt: skip
        predicted = task.classifier.predict(texts)
        record({"what": what, **extra, "target_rate": (predicted == task.target).float().mean().item(),
                "label_rates": torch.bincount(predicted, minlength=len(TARGETS[options.data])).div(len(texts)).tolist(),
                "distinct_2": distinct_n(texts, 2), "base_perplexity": base_perplexity(scorer, tokenizer, task, texts),
                "examples": [list(pair) for pair in zip(task.prompts[:4], texts[:4], strict=True)]})  # fmt: skip

    def train(what: str, trainer) -> None:
        started_training = time.time()
        trainer.train()
        logs = [entry for entry in trainer.state.log_history if "loss" in entry]
        trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
        record({"what": what, "train_seconds": round(time.time() - started_training, 1), "trainable": trainable,
                "last_log": logs[-1] if logs else None})  # fmt: skip

    if options.method == "lora":
        llm = AutoModelForCausalLM.from_pretrained(base)  # trl adds the LoRA layers to it
        evaluate("base LLM", llm, LLM_DECODING)
        trainer = lora_dpo_trainer(llm, tokenizer, task, options, output / "run")
        train("LoRA DPO", trainer)
        evaluate("LoRA DPO LLM", trainer.model, LLM_DECODING)
        return
    evaluate("unsteered prior", model, CVAE_DECODING)
    if options.method == "arithmetic":  # the posterior means as in training (the responses truncated to the budget)
        budgets = (task.max_prompt_tokens, task.max_response_tokens)
        prompts, chosen, rejected = (list(task.pairs[column]) for column in ("prompt", "chosen", "rejected"))
        chosen, _ = posterior_of_texts(model, tokenizer, prompts, chosen, *budgets)
        rejected, _ = posterior_of_texts(model, tokenizer, prompts, rejected, *budgets)
        direction = chosen.mean(0) - rejected.mean(0)
        record({"what": "direction", "direction_norm": direction.norm().item(),
                "probe_accuracy": probe_accuracy(chosen, rejected, options.seed)})  # fmt: skip
        noise = prior_latents(model, len(task.prompts), generator=torch.Generator().manual_seed(options.seed + 1))
        for strength in options.strengths:
            evaluate("arithmetic", model, CVAE_DECODING, noise + strength * direction, strength=strength)
        return
    args = LatentDPOConfig(
        output_dir=str(output / "run"), per_device_train_batch_size=options.batch_size, max_steps=options.dpo_steps,
        learning_rate=options.learning_rate, beta=options.beta, logging_steps=min(10, options.dpo_steps),
        save_strategy="no", report_to=[],
        seed=options.seed, disable_tqdm=True, use_cpu=True, max_prompt_length=task.max_prompt_tokens,
        max_completion_length=task.max_response_tokens,
    )  # fmt: skip
    if options.method == "online":  # the reward: the pairs' classifier's probability of the target label
        args.max_completion_length, args.num_generations = options.max_new_tokens, options.num_generations

        def target_probability(completions, **kwargs) -> list[float]:
            return task.labelling.probabilities(completions)[:, task.target].tolist()

        prompts = Dataset.from_dict({"prompt": task.train_prompts})
        trainer = LatentDPOTrainer(model, args, train_dataset=prompts, processing_class=tokenizer,
                                   reward_funcs=target_probability)  # fmt: skip
        train("online latent DPO", trainer)
    else:
        train("latent DPO", LatentDPOTrainer(model, args, train_dataset=task.pairs, processing_class=tokenizer))
    name = f"prior-{options.data}-{options.method}-{options.target.replace('/', '')}-seed{options.seed}"
    save_latent_prior(model, output / name)
    evaluate("learned prior", model, CVAE_DECODING)


if __name__ == "__main__":
    main()
