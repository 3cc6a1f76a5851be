"""Supervised fine-tuning of the base LM on prompt / response pairs (the paper's optional first step, before the
one-to-many data are sampled from it), with the plain `transformers.Trainer`: the batches of
[`PromptResponseCollator`], whose tokenisation and budgets are those of CVAE training."""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class PromptResponseCollator:
    """Plain causal-LM batches of prompt + response (the prompt masked out of the labels).

    The tokenisation is the one-to-many collator's (the same token budgets and left padding as in CVAE training);
    position ids are counted from each row's first real token.
    """

    tokenizer: Any
    max_prompt_tokens: int
    max_response_tokens: int

    def __post_init__(self):
        from .data import OneToManyCollator

        self.collator = OneToManyCollator(self.tokenizer, self.max_prompt_tokens, self.max_response_tokens)

    def __call__(self, features: Sequence[dict]) -> dict[str, torch.Tensor]:
        batch = self.collator(features)
        batch.pop("group_ids", None)
        batch.pop("class_labels", None)
        batch["position_ids"] = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
        return batch


def prompt_response_pairs(rows):
    """The `{prompt, response}` pairs of a `datasets.Dataset` of pairs, or of groups `{prompt, responses}` (one pair
    per response)."""
    if "responses" in rows.column_names:
        rows = rows.map(
            lambda batch: {
                "prompt": [p for p, rs in zip(batch["prompt"], batch["responses"], strict=True) for _ in rs],
                "response": [r for rs in batch["responses"] for r in rs],
            },
            batched=True,
            remove_columns=rows.column_names,
        )
    return rows.select_columns(["prompt", "response"])


__all__ = ["PromptResponseCollator", "prompt_response_pairs"]
