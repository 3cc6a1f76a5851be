"""Latent-guided control where the latent has to carry the topic: a plain VAE over AG News texts (x empty).

In `replicate.py`'s one-to-many setting the prompt (the first 8 tokens of a news text) fixes the topic, and the
base LM's responses to one prompt rarely change it, so the latent, which models what varies *given* the prompt, has
little topic to carry. Here every text is its own example with an empty prompt: the latent is all the decoder knows
about the text, topic included. The script

1. writes `train.jsonl` (a `text` and `label` column: unconditional rows) from the first `--num_train` AG News
   validation texts, and trains `cvae-llama train` on it (its defaults, DG + G-Skip, the density gap aggregating over
   the batch), `--max_steps` steps of `--batch_size` texts;
2. trains the label probe (`train_label_probe`, on the base LM's hidden states) on the rest of the validation texts,
   real AG News texts this time, cut to the response budget;
3. on the first `--num_test` test texts: how well a linear classifier on the posterior means tells the topic (the
   latent carries it or not), label directions from the first half (`label_directions`, one group: the whole half),
   and `latent_guided_control` of the second half's first `--num_control` texts at every `--strengths` k (with the
   share of unshifted reconstructions whose topic, by the probe, is their original's);
4. how the decoded texts read, since a shift can buy the probe's vote with broken text: the base LM's per-token
   perplexity of each set of texts (`fluency`: the reconstructions, then the texts shifted toward each label) and the
   mean within-text share of repeated word bigrams (`repetition`: 0 for a text without a repeated bigram; the base
   LM finds "'s 's 's ..." fluent, this does not); both also for the original texts of the controlled latents.

    python experiments/unconditional_control.py --output_dir runs/unconditional_control

Writes `results.json` in `--output_dir` after every k (all decoded texts in `texts.json`); a finished training is
reused, and a rerun with other `--strengths` adds them to the results already there.
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from cvae_llama.data.collator import OneToManyCollator
from cvae_llama.data.loaders import load_agnews
from cvae_llama.evaluation.control import (
    label_directions,
    latent_guided_control,
    linear_probe_accuracy,
    train_label_probe,
)
from cvae_llama.evaluation.generation import posterior_of_texts
from cvae_llama.evaluation.language_modeling import causal_lm_nll, count_response_tokens, perplexity
from cvae_llama.evaluation.utils import decoder_as_causal_lm
from cvae_llama.loading import load_cvae
from cvae_llama.pretrained import smollm2_path


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", type=Path, required=True)
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "agnews"))
    parser.add_argument("--model", default=None, help="base LM (default: SmolLM2-135M-Instruct, offline)")
    parser.add_argument("--num_train", type=int, default=2048)
    parser.add_argument("--num_probe", type=int, default=1024)
    parser.add_argument("--num_test", type=int, default=256)
    parser.add_argument("--num_control", type=int, default=64)
    parser.add_argument("--max_steps", type=int, default=400)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--max_tokens", type=int, default=32, help="response budget (tokens) in training and decoding")
    parser.add_argument("--strengths", type=float, nargs="*", default=[2.0, 4.0, 8.0, 16.0],
                        help="k of the control (none: only the probe and the latent's topic accuracy)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train_flags", nargs=argparse.REMAINDER, default=[],
                        help="further `cvae-llama train` flags (last)")  # fmt: skip
    return parser.parse_args(argv)


def train(args: argparse.Namespace, model: str) -> Path:
    cvae = args.output_dir / "cvae"
    if (cvae / "cvae_training.json").exists():
        return cvae
    validation = load_agnews(args.data, "validation")
    rows = validation.select(range(args.num_train))
    train_file = args.output_dir / "train.jsonl"
    with train_file.open("w") as handle:
        for text, label in zip(rows["text"], rows["label"], strict=True):
            handle.write(json.dumps({"text": text, "label": label}) + "\n")
    command = [sys.executable, "-m", "cvae_llama", "train", "--model_name_or_path", model, "--dataset",
               str(train_file), "--output_dir", str(cvae), "--max_steps", str(args.max_steps),
               "--per_device_train_batch_size", str(args.batch_size), "--max_response_tokens", str(args.max_tokens + 1),
               "--logging_steps", str(max(1, args.max_steps // 16)), "--save_strategy", "no", "--report_to", "none",
               "--seed", str(args.seed), "--dataloader_num_workers", "0", "--use_cpu", "--overwrite",
               *args.train_flags]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    with (args.output_dir / "train.log").open("w") as log:
        subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env, check=True)
    return cvae


def posterior_means(model, tokenizer, texts: list[str], max_tokens: int, batch_size: int = 32) -> torch.Tensor:
    """The posterior means of unconditional `texts` (no prompt), each within `max_tokens` tokens and EOS."""
    return posterior_of_texts(model, tokenizer, [""] * len(texts), texts, 1, max_tokens + 1, batch_size)[0]


@torch.no_grad()
def base_lm_perplexity(llm, tokenizer, texts: list[str], max_tokens: int, batch_size: int = 32) -> float:
    """Per-token perplexity of `texts` (each cut to `max_tokens`, no EOS) under the base LM `llm`."""
    collator = OneToManyCollator(tokenizer, 0, max_tokens, add_eos=False)
    nll, tokens = [], []
    for start in range(0, len(texts), batch_size):
        batch = collator([{"prompt": "", "responses": [text or " " for text in texts[start : start + batch_size]]}])
        nll.append(causal_lm_nll(llm, batch))
        tokens.append(count_response_tokens(batch["labels"]))
    return perplexity(torch.cat(nll), torch.cat(tokens))


def repetition(texts: list[str]) -> float:
    """Mean over texts of 1 - distinct word bigrams / word bigrams within the text (0 for texts under 2 words)."""
    shares = []
    for text in texts:
        words = text.split()
        bigrams = list(zip(words, words[1:], strict=False))
        shares.append(1 - len(set(bigrams)) / len(bigrams) if bigrams else 0.0)
    return sum(shares) / len(shares)


def main(argv=None) -> dict:
    args = parse_args(argv)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    model_path = args.model or str(smollm2_path())
    model, tokenizer = load_cvae(train(args, model_path))
    llm = decoder_as_causal_lm(model)  # the frozen decoder is the base LM
    validation, test = load_agnews(args.data, "validation"), load_agnews(args.data, "test")
    probe_rows = validation.select(range(args.num_train, args.num_train + args.num_probe))
    probe = train_label_probe(llm, tokenizer, probe_rows["text"], probe_rows["label"], max_length=args.max_tokens,
                              seed=args.seed)  # fmt: skip
    test_rows = test.select(range(args.num_test))
    texts, labels = test_rows["text"], torch.tensor(test_rows["label"])
    means = posterior_means(model, tokenizer, texts, args.max_tokens)
    half = args.num_test // 2
    results_file, texts_file = args.output_dir / "results.json", args.output_dir / "texts.json"
    earlier = json.loads(results_file.read_text())["control"] if results_file.exists() else {}
    decoded = json.loads(texts_file.read_text()) if texts_file.exists() else {}
    results = {
        "settings": {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()},
        "probe_held_out_accuracy": probe.held_out_accuracy,
        "latent_topic_accuracy": linear_probe_accuracy(means, labels, half),  # chance about 0.25
        "posterior_mean_std": means.std(0).mean().item(),
        "label_names": list(validation.features["label"].names),
        "control": earlier,
    }
    directions = label_directions(means[:half], probe.predict_proba(texts[:half]))
    control = means[half : half + args.num_control]
    originals = texts[half : half + args.num_control]  # what the reconstructions should read like
    results["originals"] = {
        "fluency": base_lm_perplexity(llm, tokenizer, originals, args.max_tokens),
        "repetition": repetition(originals),
    }
    for strength in args.strengths:
        result = latent_guided_control(model, tokenizer, probe, [""] * len(control), control, directions, strength,
                                       max_new_tokens=args.max_tokens)  # fmt: skip
        reconstructed = probe.predict_proba(result["reconstructions"])
        # does the decoder write the topic the latent came from? (the probe's vote on each reconstruction)
        votes = torch.tensor(probe.label_values)[reconstructed.argmax(-1)]
        results["reconstruction_topic_accuracy"] = (votes == labels[half : half + len(control)]).float().mean().item()
        sets = {"reconstruction": result["reconstructions"], **result["controlled"]}
        results["control"][str(strength)] = {
            "mean_success": result["mean_success"],
            "success": result["success"],
            "mean_win_rate": result["mean_win_rate"],
            "reconstruction_target_probability": reconstructed.mean(0).tolist(),  # the unshifted baseline, per label
            "examples": {label: texts_[:3] for label, texts_ in result["controlled"].items()},
            "reconstructions": result["reconstructions"][:3],
            "fluency": {
                name: base_lm_perplexity(llm, tokenizer, texts_, args.max_tokens) for name, texts_ in sets.items()
            },
            "repetition": {name: repetition(texts_) for name, texts_ in sets.items()},
        }
        decoded[str(strength)] = sets
        results["control"] = dict(sorted(results["control"].items(), key=lambda item: float(item[0])))
        results_file.write_text(json.dumps(results, indent=2))
        texts_file.write_text(json.dumps(decoded, indent=2))
        entry = results["control"][str(strength)]
        print(
            f"k = {strength}: success {result['mean_success']:.3f}, win rate {result['mean_win_rate']:.3f}, "
            f"base-LM perplexity {entry['fluency']}, repetition {entry['repetition']}"
        )
    return results


if __name__ == "__main__":
    main()
