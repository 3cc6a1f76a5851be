"""Sentiment transfer by latent arithmetic on Yelp (issue 26; results in README.md here).

A CVAE around SmolLM2-135M-Instruct (offline, `cvae_llama.pretrained.smollm2_path`) is trained with `CVAETrainer`'s
default objective (density gap + G-Skip) on unconditional Yelp sentences of both sentiments (each sentence its own
example, 16 a step). The direction is `cvae_llama.latent_space.latent_direction(positive, negative)` over training
sentences; held-out sentences move along it (`cvae_llama.latent_space.transfer`: z + k * direction, negative
sentences toward positive and positive ones with -k), decoded greedily. Reported per strength k: the share of the decodings that a bag-of-words
logistic regression (fitted on other Yelp sentences, its held-out accuracy printed) gives the target sentiment, and
BLEU-4 of the decodings to their source sentences (sacrebleu). k = 0 is the reconstruction.

Rows are appended to `sentiment_transfer/results.jsonl` as they are measured. `--save DIR` keeps the trained CVAE
(a folder `cvae-llama explore` serves) and the direction as `DIR/sentiment_direction.json` (labels `positive`,
the direction, and `negative`, its opposite), the explorer's `--directions`. `--objective kl --kl_weight 0` trains an
auto-encoder instead of the default objective.

    python experiments/sentiment_transfer.py --max_steps 200 --strengths 0 0.5 1 1.5 2 3
    python experiments/sentiment_transfer.py --save experiments/sentiment_transfer/model
    cvae-llama explore --model_name_or_path experiments/sentiment_transfer/model \
        --directions experiments/sentiment_transfer/model/sentiment_direction.json
"""

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

import sacrebleu
import torch
from datasets import Dataset
from transformers import AutoTokenizer


REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cvae_llama import CVAELlamaForCausalLM, CVAETrainer, CVAETrainingArguments  # noqa: E402
from cvae_llama.data.loaders import unconditional_rows  # noqa: E402
from cvae_llama.evaluation.control import fit_logistic_regression  # noqa: E402
from cvae_llama.export import save_trained_cvae, training_record  # noqa: E402
from cvae_llama.latent_io import save_directions  # noqa: E402
from cvae_llama.latent_space import latent_direction, transfer  # noqa: E402
from cvae_llama.pretrained import smollm2_path  # noqa: E402


DATA = REPO.parent / "shared" / "data" / "yelp"
OUTPUT = REPO / "experiments" / "sentiment_transfer"


def read(label: int) -> list[str]:
    lines = (DATA / f"sentiment.dev.{label}").read_text(encoding="utf-8").splitlines()
    return [line for line in lines if 6 <= len(line.split()) <= 20]


class BagOfWords:
    """A logistic regression over word counts (the `vocabulary` most frequent words of its training sentences), labels
    0 to max(labels)."""

    def __init__(self, texts: list[str], labels: list[int], vocabulary: int = 3000):
        counts = Counter(word for text in texts for word in text.lower().split())
        self.index = {word: i for i, (word, _) in enumerate(counts.most_common(vocabulary))}
        features, targets = self.features(texts), torch.tensor(labels)
        self.model, self.mean, self.std, _ = fit_logistic_regression(features, targets, slice(None), max(labels) + 1)

    def features(self, texts: list[str]) -> torch.Tensor:
        rows = torch.zeros(len(texts), len(self.index))
        for row, text in enumerate(texts):
            for word in text.lower().split():
                if word in self.index:
                    rows[row, self.index[word]] += 1
        return rows

    def probabilities(self, texts: list[str]) -> torch.Tensor:
        with torch.no_grad():
            return self.model((self.features(texts) - self.mean) / self.std).softmax(-1)

    def predict(self, texts: list[str]) -> torch.Tensor:
        return self.probabilities(texts).argmax(-1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max_steps", type=int, default=200)
    parser.add_argument("--num_train", type=int, default=4000, help="training sentences, half of each sentiment")
    parser.add_argument("--num_classifier", type=int, default=2000, help="classifier sentences, half of each")
    parser.add_argument("--num_transfer", type=int, default=48, help="held-out sentences of each sentiment")
    parser.add_argument("--num_direction", type=int, default=256, help="training sentences of each for the direction")
    parser.add_argument("--strengths", type=float, nargs="+", default=[0, 0.5, 1, 1.5, 2, 3])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--objective", default=None, help="CVAETrainingArguments.objective (default: its default)")
    parser.add_argument("--kl_weight", type=float, default=None, help="CVAETrainingArguments.kl_weight")
    parser.add_argument("--save", type=Path, default=None, help="keep the trained CVAE and its direction file here")
    options = parser.parse_args()
    torch.set_num_threads(options.threads)
    started = time.time()
    OUTPUT.mkdir(parents=True, exist_ok=True)

    # every row names its run's setting (rows of several runs share the file)
    setting = {key: getattr(options, key) for key in ("objective", "kl_weight", "max_steps", "seed")}

    def record(row: dict) -> None:
        row = {"seconds": round(time.time() - started, 1), **setting, **row}
        with (OUTPUT / "results.jsonl").open("a", encoding="utf-8") as file:
            file.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)

    sentences = {label: read(label) for label in (0, 1)}
    half, classifier_half = options.num_train // 2, options.num_classifier // 2
    train = {label: texts[:half] for label, texts in sentences.items()}
    classifier_texts = {label: texts[half : half + classifier_half] for label, texts in sentences.items()}
    held_out = {label: texts[-options.num_transfer :] for label, texts in sentences.items()}

    classifier = BagOfWords(classifier_texts[0] + classifier_texts[1], [0] * classifier_half + [1] * classifier_half)
    accuracy = (classifier.predict(held_out[0] + held_out[1]) == torch.tensor(
        [0] * options.num_transfer + [1] * options.num_transfer)).float().mean().item()  # fmt: skip
    record({"what": "classifier", "held_out_accuracy": accuracy})

    path = smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(options.seed)
    model = CVAELlamaForCausalLM.from_llm(path)
    texts = [text for pair in zip(train[0], train[1], strict=True) for text in pair]
    args = CVAETrainingArguments(
        output_dir=str(OUTPUT / "run"), per_device_train_batch_size=16, max_steps=options.max_steps,
        logging_steps=50, save_strategy="no", report_to=[], seed=options.seed, max_prompt_tokens=8,
        max_response_tokens=32, disable_tqdm=True, use_cpu=True,
        **{key: value for key in ("objective", "kl_weight") if (value := getattr(options, key)) is not None},
    )  # fmt: skip
    rows = unconditional_rows(Dataset.from_dict({"text": texts}))
    trainer = CVAETrainer(model, args, train_dataset=rows, processing_class=tokenizer)
    metrics = trainer.train().metrics
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    record({"what": "training", "steps": options.max_steps, "objective": args.objective, "kl_weight": args.kl_weight,
            "last_log": logs[-1] if logs else None})  # fmt: skip
    if options.save is not None:
        save_trained_cvae(trainer, options.save,
                          training_record(trainer, rows, str(DATA), "text", str(path), metrics))  # fmt: skip

    model = trainer.model.eval()
    budgets = {"max_prompt_tokens": 8, "max_response_tokens": 32}
    direction = latent_direction(model, tokenizer, train[1][: options.num_direction], train[0][: options.num_direction],
                                 **budgets)  # fmt: skip
    record({"what": "direction", "norm": direction.norm().item()})
    if options.save is not None:  # k = 1 along "positive" moves the negative sentences' mean onto the positive's
        saved = save_directions(options.save / "sentiment_direction.json", torch.stack([direction, -direction]),
                                ["positive", "negative"])  # fmt: skip
        record({"what": "saved", "model": str(options.save), "directions": str(saved)})
    for strength in options.strengths:
        reached, outputs = 0, {}
        for source, sign in ((0, 1.0), (1, -1.0)):  # negative -> positive with +k, positive -> negative with -k
            decoded = transfer(model, tokenizer, held_out[source], direction, strength=sign * strength,
                               max_new_tokens=32, **budgets)["texts"]  # fmt: skip
            outputs[source] = decoded
            reached += int((classifier.predict(decoded) == 1 - source).sum())
        sources = held_out[0] + held_out[1]
        decodings = outputs[0] + outputs[1]
        bleu = sacrebleu.corpus_bleu(decodings, [sources]).score
        record({"what": "transfer", "strength": strength, "target_share": reached / len(sources), "bleu": bleu,
                "examples": [[source, text] for source, text in zip(sources[:3], decodings[:3], strict=True)]})  # fmt: skip


if __name__ == "__main__":
    main()
