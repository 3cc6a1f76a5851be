"""Dialogue metrics (DailyDialog): BLEU-1/2, Distinct-1/2, BERTScore with an offline MiniLM, and a FED-style score.

Both model-based scores are substitutes, labelled as such: the paper's BERTScore uses roberta-large and its FED
(Mehri and Eskenazi, 2020) uses DialoGPT-large, neither of which is available offline here.
"""

from collections.abc import Sequence

import torch

from ..data.budgets import DEFAULT_MAX_RESPONSE_TOKENS
from ..data.collator import IGNORE_INDEX, OneToManyCollator, encode_prompts
from ..validation import check_texts, pad_token_id
from .language_modeling import causal_lm_nll, count_response_tokens, perplexity
from .text import BERTSCORE_LABEL, bertscore_minilm, bleu, distinct_n
from .utils import DEFAULT_BATCH_SIZE


FED_STYLE_LABEL = "FED-style (base-LM substitute for FED, which needs DialoGPT-large)"
# Tokens of the conversation the FED-style score reads before each follow-up (its last ones).
FED_MAX_CONTEXT_TOKENS = 128

# The turn-level follow-up utterances of FED (Mehri and Eskenazi, 2020; as in the paper authors' fed.py).
FED_TURN_LEVEL_FOLLOW_UPS: dict[str, dict[str, tuple[str, ...]]] = {
    "interesting": {
        "positive": ("Wow that is really interesting.", "That's really interesting!", "Cool! That sounds super interesting."),
        "negative": ("That's not very interesting.", "That's really boring.", "That was a really boring response."),
    },
    "engaging": {
        "positive": ("Wow! That's really cool!", "Tell me more!", "I'm really interested in learning more about this."),
        "negative": ("Let's change the topic.", "I don't really care. That's pretty boring.", "I want to talk about something else."),
    },
    "specific": {
        "positive": ("That's good to know. Cool!", "I see, that's interesting.", "That's a good point."),
        "negative": ("That's a very generic response.", "Not really relevant here.", "That's not really relevant here."),
    },
    "relevant": {
        "positive": (),
        "negative": ("That's not even related to what I said.", "Don't change the topic!", "Why are you changing the topic?"),
    },
    "correct": {
        "positive": (),
        "negative": ("You're not understanding me!", "I am so confused right now!", "I don't understand what you're saying."),
    },
    "semantically appropriate": {
        "positive": ("That makes sense!", "You have a good point."),
        "negative": ("That makes no sense!",),
    },
    "understandable": {
        "positive": ("That makes sense!", "You have a good point."),
        "negative": ("I don't understand at all!", "I'm so confused!", "That makes no sense!", "What does that even mean?"),
    },
    "fluent": {
        "positive": ("That makes sense!", "You have a good point."),
        "negative": ("Is that real English?", "I'm so confused right now!", "That makes no sense!"),
    },
}  # fmt: skip


@torch.no_grad()
def follow_up_nll(
    llm,
    tokenizer,
    conversations: Sequence[str],
    follow_ups: Sequence[str],
    max_context_tokens: int | None = FED_MAX_CONTEXT_TOKENS,
    batch_size: int = DEFAULT_BATCH_SIZE,
):
    """Mean per-token NLL of each follow-up utterance given each conversation, `(num_conversations, num_follow_ups)`.

    The sequence is the conversation's tokens (its last `max_context_tokens`, after the tokenizer's special
    prefix), then the follow-up's tokens; only the latter are scored.
    """
    pad_token_id(tokenizer)
    device = next(llm.parameters()).device
    prefix_ids = encode_prompts(tokenizer, list(conversations), max_context_tokens)
    follow_up_ids = tokenizer(list(follow_ups), add_special_tokens=False)["input_ids"]
    pairs = [(prefix, follow_up) for prefix in prefix_ids for follow_up in follow_up_ids]
    scores = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        batch = tokenizer.pad(  # right padding: positions start at 0
            {"input_ids": [prefix + follow_up for prefix, follow_up in chunk]},
            padding_side="right",
            return_attention_mask=True,
            return_tensors="pt",
        )
        input_ids, mask = batch["input_ids"], batch["attention_mask"]
        positions = torch.arange(input_ids.shape[1])[None]
        prefix_lengths = torch.tensor([len(prefix) for prefix, _ in chunk])[:, None]
        # only the follow-up is scored: not the conversation before it, nor the padding after it
        labels = input_ids.masked_fill((positions < prefix_lengths) | (mask == 0), IGNORE_INDEX)
        logits = llm(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits[:, :-1].float()
        targets = labels[:, 1:].to(device)
        scored = targets != IGNORE_INDEX
        log_probs = torch.log_softmax(logits, -1).gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)
        scores.append((-(log_probs * scored).sum(-1) / scored.sum(-1)).cpu())
    return torch.cat(scores).view(len(prefix_ids), len(follow_up_ids))


def fed_style_score(
    llm,
    tokenizer,
    contexts: Sequence[str],
    responses: Sequence[str],
    turn_separator: str = "\n",
    max_context_tokens: int | None = FED_MAX_CONTEXT_TOKENS,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> dict[str, float]:
    """A FED-style turn-level score with a causal LM: a **substitute** for FED, which uses DialoGPT-large.

    As FED does, for each quality the LM reads the conversation (context, then the response) followed by positive
    and negative follow-up utterances ([`FED_TURN_LEVEL_FOLLOW_UPS`]); the quality's score is mean NLL(negative
    follow-ups) - mean NLL(positive follow-ups) (a missing side counts 0, as in FED), so higher is better. Here NLL
    is per token of the follow-up only, given the conversation's last `max_context_tokens` tokens. Scores are
    averaged over the pairs; `overall` is the mean over qualities. Cost: one LM pass per pair and follow-up
    (32 distinct follow-ups).

    Returns:
        `dict`: one score per quality and `overall`.
    """
    contexts, responses = check_texts(contexts, "contexts"), check_texts(responses, "responses")
    if len(contexts) != len(responses):
        raise ValueError(f"contexts has {len(contexts)} texts but responses has {len(responses)}; expected pairs")
    follow_ups = sorted(
        {text for sides in FED_TURN_LEVEL_FOLLOW_UPS.values() for side in sides.values() for text in side}
    )
    conversations = [
        context
        + ("" if context.endswith(turn_separator) or not context else turn_separator)
        + response
        + turn_separator
        for context, response in zip(contexts, responses, strict=True)
    ]
    nll = follow_up_nll(
        llm, tokenizer, conversations, follow_ups, max_context_tokens, batch_size
    )  # (pairs, follow-ups)
    column = {text: index for index, text in enumerate(follow_ups)}

    def side_mean(texts):  # FED counts a side without follow-ups as 0
        return nll[:, [column[text] for text in texts]].mean(-1) if texts else torch.zeros(len(nll))

    scores = {
        quality: (side_mean(sides["negative"]) - side_mean(sides["positive"])).mean().item()
        for quality, sides in FED_TURN_LEVEL_FOLLOW_UPS.items()
    }
    scores["overall"] = sum(scores.values()) / len(scores)
    return scores


@torch.no_grad()
def response_perplexity(
    llm,
    tokenizer,
    contexts: Sequence[str],
    responses: Sequence[str],
    max_context_tokens: int = FED_MAX_CONTEXT_TOKENS,
    max_response_tokens: int = DEFAULT_MAX_RESPONSE_TOKENS,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> float:
    """Per-token perplexity of each response given its context under a plain causal LM (fluency: the base LM's
    perplexity of generated turns), over all responses' tokens; contexts keep their last `max_context_tokens`."""
    contexts, responses = check_texts(contexts, "contexts"), check_texts(responses, "responses")
    if len(contexts) != len(responses):
        raise ValueError(f"contexts has {len(contexts)} texts but responses has {len(responses)}; expected pairs")
    collator = OneToManyCollator(tokenizer, max_context_tokens, max_response_tokens)
    nll, tokens = [], []
    for start in range(0, len(contexts), batch_size):
        rows = [
            {"prompt": c, "response": r}
            for c, r in zip(contexts[start : start + batch_size], responses[start : start + batch_size], strict=True)
        ]
        batch = collator(rows)
        nll.append(causal_lm_nll(llm, batch))
        tokens.append(count_response_tokens(batch["labels"]))
    return perplexity(torch.cat(nll), torch.cat(tokens))


def dialogue_metrics(
    candidates: Sequence[str],
    references: Sequence[str],
    contexts: Sequence[str] | None = None,
    llm=None,
    tokenizer=None,
    bertscore: bool = True,
) -> dict:
    """The dialogue benchmark's metrics of generated responses against the reference responses.

    - `bleu_1`, `bleu_2`: corpus BLEU (sacrebleu, 0-100) with 1- and 2-grams;
    - `distinct_1`, `distinct_2`: over all generated responses (in [0, 1]);
    - `bertscore_minilm_f1` (and precision / recall): "BERTScore (MiniLM-L6)", not the paper's roberta-large one;
    - `fed_style`: [`fed_style_score`]'s `overall` with `llm` (given `contexts`, `llm` and `tokenizer`), a
      substitute for FED;
    - `base_lm_perplexity`: [`response_perplexity`] of the responses under `llm` (with `llm`).

    Returns:
        `dict` of the metrics above plus `labels`, the display name of each substitute.
    """
    candidates, references = check_texts(candidates, "candidates"), check_texts(references, "references")
    if len(candidates) != len(references):
        raise ValueError(f"candidates has {len(candidates)} texts but references has {len(references)}")
    metrics = {
        "bleu_1": bleu(candidates, references, 1),
        "bleu_2": bleu(candidates, references, 2),
        "distinct_1": distinct_n(candidates, 1),
        "distinct_2": distinct_n(candidates, 2),
    }
    labels = {}
    if bertscore:
        scores = bertscore_minilm(candidates, references)
        metrics.update({f"bertscore_minilm_{key}": value for key, value in scores.items()})
        labels["bertscore_minilm_f1"] = BERTSCORE_LABEL
    if llm is not None:
        if contexts is None or tokenizer is None:
            raise ValueError("the FED-style score needs contexts and tokenizer besides llm")
        fed = fed_style_score(llm, tokenizer, contexts, candidates)
        metrics["fed_style"] = fed["overall"]
        metrics["fed_style_per_quality"] = {key: value for key, value in fed.items() if key != "overall"}
        labels["fed_style"] = FED_STYLE_LABEL
        metrics["base_lm_perplexity"] = response_perplexity(llm, tokenizer, contexts, candidates)
    metrics["labels"] = labels
    return metrics


__all__ = [
    "FED_MAX_CONTEXT_TOKENS",
    "FED_STYLE_LABEL",
    "FED_TURN_LEVEL_FOLLOW_UPS",
    "dialogue_metrics",
    "fed_style_score",
    "follow_up_nll",
    "response_perplexity",
]
