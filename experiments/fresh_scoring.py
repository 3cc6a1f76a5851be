"""Does a fresh CVAE score text as its LLM does? (issue 27; results in README.md here.)

A fresh `CVAELlamaForCausalLM.from_llm(SmolLM2-135M-Instruct)` with z = 0 (the prior's mean, what `forward` uses
without a latent, as a scoring harness calls it) against the LLM, on `--num` Yelp sentences (sentiment.dev.1), in
every way a harness sends text:

- `bos`: each sentence after the tokenizer's BOS token (lm-evaluation-harness' `loglikelihood_rolling` prefixes one),
  every sentence token scored; `raw`: the sentence alone, all tokens but the first scored;
- `batch`: all sentences in one left-padded batch with its attention mask; `one`: one sentence at a time, no mask.

Printed and appended to `fresh_scoring/results.jsonl`: NLL per scored token of the LLM and of each CVAE variant, and
the CVAE's NLL relative to the LLM's (the issue's target: within 1 %, i.e. a ratio in [0.99, 1.01]).

    python experiments/fresh_scoring.py --variants defaults joint
"""

import argparse
import json
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cvae_llama import CVAELlamaForCausalLM  # noqa: E402
from cvae_llama.pretrained import smollm2_path  # noqa: E402


DATA = REPO.parent / "shared" / "data"
# variant -> from_llm keywords
VARIANTS = {
    "defaults": {},  # since issue 38 the gated memory (the rows before it name it "gated")
    "joint": {"memory_attention": "joint"},  # the paper's: memory slots in the text's softmax (the default before)
    "joint_1_slot": {"memory_attention": "joint", "num_memory_slots": 1},
    "gated": {"memory_attention": "gated"},
}


def token_rows(tokenizer, sentences: list[str], bos: bool) -> list[tuple[list[int], int]]:
    """(token ids, index of the first scored token) per sentence."""
    rows = []
    for sentence in sentences:
        ids = tokenizer(sentence, add_special_tokens=False)["input_ids"]
        rows.append(([tokenizer.bos_token_id, *ids], 1) if bos else (ids, 1))
    return rows


def nll_per_token(model, rows, batched: bool, pad_id: int) -> float:
    """Summed NLL of the scored tokens over their number, with z = 0 for a CVAE (no latent passed)."""
    total, count = 0.0, 0
    groups = [rows] if batched else [[row] for row in rows]
    for group in groups:
        length = max(len(ids) for ids, _ in group)
        input_ids = torch.tensor([[pad_id] * (length - len(ids)) + ids for ids, _ in group])
        labels = input_ids.clone()
        for index, (ids, first) in enumerate(group):
            labels[index, : length - len(ids) + first] = -100  # the padding and the unscored first tokens
        kwargs = {}
        if batched:  # left padding, masked
            kwargs["attention_mask"] = torch.tensor([[0] * (length - len(ids)) + [1] * len(ids) for ids, _ in group])
        with torch.no_grad():
            logits = model(input_ids=input_ids, **kwargs).logits[:, :-1].float()
        target = labels[:, 1:]
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, ignore_index=-100, reduction="sum")
        total, count = total + nll.item(), count + int((target != -100).sum())
    return total / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), help=f"among {sorted(VARIANTS)}")
    parser.add_argument("--num", type=int, default=100, help="Yelp sentences")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", type=Path, default=REPO / "experiments" / "fresh_scoring" / "results.jsonl")
    options = parser.parse_args()
    torch.set_num_threads(options.threads)
    path = smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    sentences = (DATA / "yelp" / "sentiment.dev.1").read_text(encoding="utf-8").splitlines()[: options.num]
    llm = AutoModelForCausalLM.from_pretrained(path).eval()
    models = {"llm": llm}
    for name in options.variants:
        torch.manual_seed(0)
        models[name] = CVAELlamaForCausalLM.from_llm(llm, **VARIANTS[name]).eval()
    options.output.parent.mkdir(parents=True, exist_ok=True)
    for bos in (True, False):
        rows = token_rows(tokenizer, sentences, bos)
        for batched in (True, False):
            setting = f"{'bos' if bos else 'raw'}, {'batch' if batched else 'one'}"
            pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
            nlls = {name: nll_per_token(model, rows, batched, pad_id) for name, model in models.items()}
            result = {"setting": setting, "sentences": len(sentences), "nll_per_token": nlls,
                      "ratio": {name: nlls[name] / nlls["llm"] for name in options.variants}}  # fmt: skip
            print(json.dumps(result), flush=True)
            with options.output.open("a", encoding="utf-8") as file:
                file.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
