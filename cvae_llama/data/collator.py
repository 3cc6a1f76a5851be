"""Token ids as the model sees them: prompt encoding ([`encode_prompts`]), left padding ([`left_pad`],
[`prompt_inputs`]) and the training collator [`OneToManyCollator`]."""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from ..validation import check_positive_int, pad_token_id


# Label value that loss functions skip (torch's and transformers' `ignore_index`).
IGNORE_INDEX = -100


def _prefix_token_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The special tokens the tokenizer puts in front of a text (usually `[bos]` or nothing)."""
    with_special = tokenizer("a")["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    for start in range(len(with_special) - len(without) + 1):
        if with_special[start : start + len(without)] == without:
            return list(with_special[:start])
    return []


def encode_prompts(
    tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], max_prompt_tokens: int | None = None
) -> list[list[int]]:
    """Token ids of prompts as the model sees them: the tokenizer's prefix (BOS, when it adds one) once, then the
    prompt's tokens left-truncated to `max_prompt_tokens` (the end of a long context is kept).

    A sequence must start with at least one token (generation needs a context, and the first response token is
    scored only after one): an empty prompt with no prefix becomes the BOS token, or EOS when there is no BOS.
    """
    prefix = _prefix_token_ids(tokenizer)
    start = [tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id]
    encoded = tokenizer(list(prompts), add_special_tokens=False)["input_ids"] if len(prompts) else []
    result = []
    for ids in encoded:
        if max_prompt_tokens is not None:
            ids = ids[-max_prompt_tokens:] if max_prompt_tokens > 0 else []
        ids = prefix + ids
        if not ids:
            if start[0] is None:
                raise ValueError("an empty prompt needs a start token, but the tokenizer has neither BOS nor EOS")
            ids = start
        result.append(ids)
    return result


def left_pad(
    tokenizer: PreTrainedTokenizerBase, sequences: Sequence[Sequence[int]], pad_to_multiple_of: int | None = None
) -> dict[str, torch.Tensor]:
    """`input_ids` and `attention_mask`, `(rows, length)` `torch.LongTensor`s, of token id lists left-padded to the
    longest (rounded up to a multiple of `pad_to_multiple_of`) with the tokenizer's pad token: `tokenizer.pad` with
    `padding_side="left"`, whatever the tokenizer's own side, since a decoder-only LM reads (and generates after)
    the real tokens at the end."""
    pad_token_id(tokenizer)  # the library's message when there is no pad token
    batch = tokenizer.pad(
        {"input_ids": [list(sequence) for sequence in sequences]},
        padding=True,
        pad_to_multiple_of=pad_to_multiple_of,
        padding_side="left",
        return_attention_mask=True,
        return_tensors="pt",
    )
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def prompt_inputs(
    tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], max_prompt_tokens: int | None = None
) -> dict[str, torch.Tensor]:
    """`input_ids` and `attention_mask` of prompts for `generate`, tokenised exactly as the collator does: the
    tokenizer's BOS once, the prompt's last `max_prompt_tokens` tokens ([`encode_prompts`]), left-padded
    ([`left_pad`])."""
    return left_pad(tokenizer, encode_prompts(tokenizer, prompts, max_prompt_tokens))


@dataclass
class OneToManyCollator:
    """Batch groups of one-to-many rows for CVAE training.

    Each feature is one group `{prompt, responses: list[str][, label]}` ([`group_responses`]) or one flat row
    `{prompt, response[, label]}` (a group of one). Every response becomes one row `prompt + response`: the
    tokenizer's BOS once (when it adds one), the prompt's last `max_prompt_tokens` tokens (left truncation keeps the
    end of a dialogue context), the response's first tokens within `max_response_tokens`, then EOS when `add_eos`
    and the response fits with it (a truncated response gets no EOS, so the model does not learn to stop mid-text;
    as the authors do). Rows are left-padded and stay in group order.

    Args:
        tokenizer (`PreTrainedTokenizerBase`): the model's tokenizer; it needs a pad token.
        max_prompt_tokens (`int`): prompt budget (BOS not counted); 0 drops the prompt.
        max_response_tokens (`int`): response budget, EOS included.
        add_eos (`bool`, defaults to `True`): end each untruncated response with EOS.
        pad_to_multiple_of (`int`, *optional*): round the padded length up to a multiple of this.

    Returns (on call), a dict of `torch.LongTensor`, `rows` = the number of responses in the batch:
        - `input_ids`, `attention_mask`: `(rows, length)`, left-padded;
        - `labels`: `(rows, length)`, the response tokens (and EOS), -100 on the prompt, BOS and padding;
        - `group_ids`: `(rows,)`, the index of each row's group in the batch, 0..G-1 (for the density gap);
        - `class_labels`: `(rows,)`, the group's label (-100 when a row has none); only when a feature has `label`.

    With `transformers.Trainer`, set `remove_unused_columns=False` (the model's forward takes no `prompt`).

    Example:

    ```python
    >>> collator = OneToManyCollator(tokenizer, max_prompt_tokens=8, max_response_tokens=32)
    >>> batch = collator([{"prompt": "Fears for pension", "responses": ["Unions say ...", "Workers ..."], "label": 2}])
    >>> batch["group_ids"]
    tensor([0, 0])
    ```
    """

    tokenizer: PreTrainedTokenizerBase
    max_prompt_tokens: int
    max_response_tokens: int
    add_eos: bool = True
    pad_to_multiple_of: int | None = None

    def __post_init__(self) -> None:
        pad_token_id(self.tokenizer)
        check_positive_int(self.max_prompt_tokens, "max_prompt_tokens", minimum=0)
        check_positive_int(self.max_response_tokens, "max_response_tokens")
        if self.add_eos and self.tokenizer.eos_token_id is None:
            raise ValueError(
                "add_eos=True but the tokenizer has no eos token: set tokenizer.eos_token or add_eos=False"
            )

    def _unpack(self, feature: dict[str, Any], index: int) -> tuple[str, list[str]]:
        if "prompt" not in feature or ("responses" not in feature and "response" not in feature):
            raise ValueError(
                f"feature {index} has keys {sorted(feature)} but needs 'prompt' and 'responses' (a group) or "
                f"'response' (one row); with transformers.Trainer set remove_unused_columns=False"
            )
        responses = feature["responses"] if "responses" in feature else [feature["response"]]
        if isinstance(responses, str) or len(responses) == 0:
            raise ValueError(f"feature {index} has responses={responses!r}; expected a non-empty list of strings")
        if not all(isinstance(response, str) for response in responses):
            raise ValueError(f"feature {index} has responses={responses!r}; expected strings")
        prompt = feature["prompt"] if feature["prompt"] is not None else ""
        if not isinstance(prompt, str):
            raise ValueError(f"feature {index} has prompt={prompt!r}; expected a string")
        return prompt, list(responses)

    def _response_ids(self, response: list[int], text: str, group: int) -> list[int]:
        """A response's tokens within the budget, EOS appended when it fits."""
        if not response:
            raise ValueError(f"feature {group}: response {text!r} tokenizes to no tokens")
        if self.add_eos and len(response) < self.max_response_tokens:
            response = response + [self.tokenizer.eos_token_id]
        return response[: self.max_response_tokens]

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if len(features) == 0:
            raise ValueError("features is empty: the collator needs at least one group")
        groups = [self._unpack(feature, index) for index, feature in enumerate(features)]
        prompt_ids = encode_prompts(self.tokenizer, [prompt for prompt, _ in groups], self.max_prompt_tokens)
        flat_responses = [response for _, responses in groups for response in responses]
        response_ids = iter(self.tokenizer(flat_responses, add_special_tokens=False)["input_ids"])
        texts = iter(flat_responses)

        sequences, response_lengths, group_ids, class_labels = [], [], [], []
        for group, ((_, responses), prompt) in enumerate(zip(groups, prompt_ids, strict=True)):
            label = features[group].get("label")
            for _ in responses:
                response = self._response_ids(next(response_ids), next(texts), group)
                sequences.append(prompt + response)
                response_lengths.append(len(response))
                group_ids.append(group)
                class_labels.append(IGNORE_INDEX if label is None else int(label))

        batch = left_pad(self.tokenizer, sequences, self.pad_to_multiple_of)
        # left padding puts each response at the end of its row: every earlier position (padding, BOS, prompt)
        # is not scored
        length = batch["input_ids"].shape[1]
        prompt_end = length - torch.tensor(response_lengths)[:, None]
        batch["labels"] = batch["input_ids"].masked_fill(torch.arange(length)[None] < prompt_end, IGNORE_INDEX)
        batch["group_ids"] = torch.tensor(group_ids, dtype=torch.long)
        if any("label" in feature for feature in features):
            batch["class_labels"] = torch.tensor(class_labels, dtype=torch.long)
        return batch


__all__ = ["IGNORE_INDEX", "OneToManyCollator", "encode_prompts", "left_pad", "prompt_inputs"]
