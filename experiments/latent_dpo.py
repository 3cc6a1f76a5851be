"""Control by a learned prior on Yelp (issue 40; results in README.md here, "Learned prior").

A Yelp CVAE around SmolLM2-135M-Instruct (a folder saved by `sentiment_transfer.py --save DIR`, trained on
unconditional sentences of both sentiments) gets a learned prior trained by `LatentDPOTrainer` on preference pairs
from the dataset's labels: the prompt empty (BOS), a positive training sentence chosen, a negative one rejected.
Before (the fresh prior, N(0, I)) and after, `--num_samples` texts are generated from the prior (z sampled, then
greedy decoding given z, so that what varies is z) and scored: the rate of positive samples by a bag-of-words logistic
regression fitted on other sentences than the pairs', Distinct-2 over the samples, and the perplexity the base LLM
gives them. Rows are appended to `latent_dpo/results.jsonl` as they are measured.

    python experiments/sentiment_transfer.py --save experiments/latent_dpo/cvae --max_steps 200
    python experiments/latent_dpo.py --cvae experiments/latent_dpo/cvae --dpo_steps 100
    python experiments/latent_dpo.py --cvae experiments/latent_dpo/cvae --method lora --dpo_steps 100

`--method lora` trains trl's `DPOTrainer` with a LoRA adapter (r 8 on the attention projections) on the CVAE's base
LLM with the same pairs (the prompt is the BOS token, as the CVAE's empty prompt), and scores samples of the base LLM
(T 1.0, top-p 0.95) before and after the same way.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer


REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "experiments"))

from sentiment_transfer import BagOfWords, read  # noqa: E402

from cvae_llama import CVAELlamaForCausalLM, LatentDPOConfig, LatentDPOTrainer, save_latent_prior  # noqa: E402
from cvae_llama.data.collator import OneToManyCollator  # noqa: E402
from cvae_llama.evaluation.language_modeling import causal_lm_nll, count_response_tokens, perplexity  # noqa: E402
from cvae_llama.evaluation.text import distinct_n  # noqa: E402


OUTPUT = REPO / "experiments" / "latent_dpo"


def prior_samples(model, tokenizer, count: int, max_new_tokens: int, seed: int, batch_size: int = 32) -> list[str]:
    """`count` texts generated from the model's prior (its learned one, or N(0, I)): z sampled, greedy given z."""
    torch.manual_seed(seed)
    texts = []
    bos = torch.full((1, 1), tokenizer.bos_token_id)
    for start in range(0, count, batch_size):
        rows = min(batch_size, count - start)
        output = model.generate(bos, num_return_sequences=rows, max_new_tokens=max_new_tokens, do_sample=False,
                                pad_token_id=tokenizer.pad_token_id)  # fmt: skip
        texts += tokenizer.batch_decode(output[:, 1:], skip_special_tokens=True)
    return [text.strip() for text in texts]


def llm_samples(llm, tokenizer, count: int, max_new_tokens: int, seed: int, batch_size: int = 32) -> list[str]:
    """`count` texts sampled from a plain causal LM after BOS (temperature 1.0, top-p 0.95)."""
    torch.manual_seed(seed)
    texts = []
    bos = torch.full((1, 1), tokenizer.bos_token_id)
    for start in range(0, count, batch_size):
        rows = min(batch_size, count - start)
        output = llm.generate(bos, num_return_sequences=rows, max_new_tokens=max_new_tokens, do_sample=True,
                              top_p=0.95, temperature=1.0, top_k=0, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
        texts += tokenizer.batch_decode(output[:, 1:], skip_special_tokens=True)
    return [text.strip() for text in texts]


def lora_dpo(llm, tokenizer, pairs: Dataset, options, output_dir: Path):
    """trl's `DPOTrainer` with a LoRA adapter on `llm`, the pairs' empty prompts as the BOS token: the trained
    `PeftModel`."""
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    pairs = pairs.map(lambda row: {"prompt": row["prompt"] or tokenizer.bos_token})
    config = DPOConfig(
        output_dir=str(output_dir), per_device_train_batch_size=options.batch_size, max_steps=options.dpo_steps,
        learning_rate=options.learning_rate, beta=options.beta, max_length=48, logging_steps=10, save_strategy="no",
        report_to=[], seed=options.seed, disable_tqdm=True, use_cpu=True,
    )  # fmt: skip
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], task_type="CAUSAL_LM")
    trainer = DPOTrainer(model=llm, args=config, train_dataset=pairs, processing_class=tokenizer, peft_config=lora)
    trainer.train()
    return trainer


def base_perplexity(llm, tokenizer, texts: list[str]) -> float:
    """The base LLM's per-token perplexity of `texts` (each scored after BOS, as the CVAE generated them)."""
    collator = OneToManyCollator(tokenizer, max_prompt_tokens=0, max_response_tokens=64)
    nll, tokens = [], []
    with torch.no_grad():
        for start in range(0, len(texts), 32):
            batch = collator([{"prompt": "", "response": text or "."} for text in texts[start : start + 32]])
            nll.append(causal_lm_nll(llm, batch))
            tokens.append(count_response_tokens(batch["labels"]))
    return perplexity(torch.cat(nll), torch.cat(tokens))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cvae", type=Path, required=True, help="a Yelp CVAE saved by sentiment_transfer.py --save")
    parser.add_argument("--num_pairs", type=int, default=512, help="preference pairs from training sentences")
    parser.add_argument("--num_train", type=int, default=4000, help="sentiment_transfer.py's training sentences")
    parser.add_argument("--num_classifier", type=int, default=2000, help="classifier sentences, half of each")
    parser.add_argument("--dpo_steps", type=int, default=100)
    parser.add_argument("--batch_size", type=int, default=8, help="pairs per step")
    parser.add_argument("--learning_rate", type=float, default=1e-4)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--num_samples", type=int, default=128, help="texts generated from the prior per row")
    parser.add_argument("--max_new_tokens", type=int, default=24)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output_dir", type=Path, default=OUTPUT, help="where results.jsonl and the priors go")
    parser.add_argument("--method", choices=["latent", "lora"], default="latent",
                        help="latent DPO on the CVAE's prior, or trl's DPO with LoRA on the base LLM")
    parser.add_argument("--target", choices=["positive", "negative"], default="positive",
                        help="the sentiment of the chosen sentences (the other one is rejected)")
    options = parser.parse_args()
    torch.set_num_threads(options.threads)
    started = time.time()
    output = options.output_dir
    output.mkdir(parents=True, exist_ok=True)
    setting = {key: getattr(options, key)
               for key in ("method", "target", "dpo_steps", "num_pairs", "learning_rate", "beta", "seed")}  # fmt: skip

    def record(row: dict) -> None:
        row = {"seconds": round(time.time() - started, 1), "cvae": str(options.cvae), **setting, **row}
        with (output / "results.jsonl").open("a", encoding="utf-8") as file:
            file.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)

    sentences = {label: read(label) for label in (0, 1)}
    half, classifier_half = options.num_train // 2, options.num_classifier // 2
    target = 1 if options.target == "positive" else 0
    pairs = Dataset.from_dict({
        "prompt": [""] * options.num_pairs,
        "chosen": sentences[target][: options.num_pairs], "rejected": sentences[1 - target][: options.num_pairs],
    })  # fmt: skip
    classifier_texts = {label: texts[half : half + classifier_half] for label, texts in sentences.items()}
    classifier = BagOfWords(classifier_texts[0] + classifier_texts[1], [0] * classifier_half + [1] * classifier_half)

    tokenizer = AutoTokenizer.from_pretrained(options.cvae)
    model = CVAELlamaForCausalLM.from_pretrained(options.cvae).eval()
    base = model.config.base_model_name_or_path
    scorer = AutoModelForCausalLM.from_pretrained(base).eval()  # the base LLM's perplexity of the samples

    def evaluate(what: str, sampler=None) -> None:
        model.eval()
        texts = prior_samples(model, tokenizer, options.num_samples, options.max_new_tokens, options.seed + 1) \
            if sampler is None else sampler()  # fmt: skip
        predicted = classifier.predict(texts)
        record({"what": what, "target_rate": (predicted == target).float().mean().item(),
                "positive_rate": predicted.float().mean().item(),
                "distinct_2": distinct_n(texts, 2), "base_perplexity": base_perplexity(scorer, tokenizer, texts),
                "examples": texts[:4]})  # fmt: skip

    if options.method == "lora":
        llm = AutoModelForCausalLM.from_pretrained(base)  # trl adds the LoRA layers to it

        def sampler():
            return llm_samples(llm, tokenizer, options.num_samples, options.max_new_tokens, options.seed + 1)

        evaluate("base LLM", sampler)
        trained_at = time.time()
        trainer = lora_dpo(llm, tokenizer, pairs, options, output / "run")
        logs = [entry for entry in trainer.state.log_history if "loss" in entry]
        trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
        record({"what": "LoRA DPO", "train_seconds": round(time.time() - trained_at, 1), "trainable": trainable,
                "last_log": logs[-1] if logs else None})  # fmt: skip
        llm = trainer.model.eval()
        evaluate("LoRA DPO LLM", sampler)
        return
    evaluate("unsteered prior")
    args = LatentDPOConfig(
        output_dir=str(output / "run"), per_device_train_batch_size=options.batch_size, max_steps=options.dpo_steps,
        learning_rate=options.learning_rate, beta=options.beta, logging_steps=10, save_strategy="no", report_to=[],
        seed=options.seed, disable_tqdm=True, use_cpu=True, max_prompt_length=8, max_completion_length=32,
    )  # fmt: skip
    trainer = LatentDPOTrainer(model, args, train_dataset=pairs, processing_class=tokenizer)
    trained_at = time.time()
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    record({"what": "latent DPO", "train_seconds": round(time.time() - trained_at, 1), "trainable": trainable,
            "last_log": logs[-1] if logs else None})  # fmt: skip
    save_latent_prior(model, output / f"prior-{options.target}-seed{options.seed}")
    evaluate("learned prior")


if __name__ == "__main__":
    main()
