"""Flat `{prompt, response[, label]}` rows turned into training examples: groups of one prompt's responses.

A training step of Zhang et al., "Latent Variable Modeling for Controllable and Diverse Generation From Large
Language Models" (IEEE TAI 2026, the objective's one-to-many data) sees one prompt with M of its sampled responses:
[`group_responses`] makes those groups, [`single_response_groups`] makes groups of one for data without one-to-many
structure (such as unconditional text, [`is_unconditional`]).
"""

import logging
from collections import Counter
from typing import Any

import numpy as np
from datasets import Dataset, Features, Value

from ..validation import check_columns, check_not_empty, check_positive_int


logger = logging.getLogger(__name__)


def group_responses(
    dataset: Dataset,
    group_size: int,
    seed: int = 0,
    *,
    max_groups_per_prompt: int = 1,
    group_by: str | None = None,
) -> Dataset:
    """Turn flat `{prompt, response[, label]}` rows into groups: one row per prompt, `{prompt, responses[, label]}`
    with exactly `group_size` responses (the paper's objective: a training step sees one prompt with M of its
    responses). One training example is one group, so a Trainer's batch size counts groups.

    A prompt with more responses gets `group_size` of them drawn without replacement (seeded); with
    `max_groups_per_prompt > 1` it gives up to that many disjoint groups (e.g. 32 responses -> 2 groups of 16).
    Prompts with fewer than `group_size` usable responses are dropped (the count is logged); empty or
    whitespace-only responses are not usable (an LM's immediate end of text) and are dropped first.
    The group's `label` is its prompt's most common label.

    Args:
        dataset (`datasets.Dataset`): flat rows.
        group_size (`int`): M, responses per group (>= 1; DG needs >= 2).
        seed (`int`, defaults to `0`): seed of the draws.
        max_groups_per_prompt (`int`, defaults to `1`): disjoint groups made from one prompt at most.
        group_by (`str`, *optional*): the column whose equal values form a prompt's rows; defaults to `prompt_id`
            when present (as in [`make_one_to_many`]'s output, so repeated prompt strings stay apart), else `prompt`.

    Returns:
        `datasets.Dataset` of groups in order of first appearance of their prompt.
    """
    check_positive_int(group_size, "group_size")
    check_positive_int(max_groups_per_prompt, "max_groups_per_prompt")
    check_columns(dataset, ("prompt", "response"))
    check_not_empty(dataset)
    group_by = group_by or ("prompt_id" if "prompt_id" in dataset.column_names else "prompt")
    check_columns(dataset, (group_by,))
    has_label = "label" in dataset.column_names

    columns = dataset.select_columns(sorted({"prompt", "response", group_by} | ({"label"} if has_label else set())))
    columns = columns.to_dict()
    prompts, responses, labels = columns["prompt"], columns["response"], columns.get("label")
    rows_of = _usable_rows_by_prompt(columns[group_by], responses)

    rng = np.random.default_rng(seed)
    grouped: dict[str, list] = {"prompt": [], "responses": [], **({"label": []} if has_label else {})}
    too_small, disagreeing = 0, 0
    for rows in rows_of.values():
        if len(rows) < group_size:
            too_small += 1
            continue
        order = rng.permutation(len(rows))
        for group in range(min(max_groups_per_prompt, len(rows) // group_size)):
            chosen = sorted(rows[i] for i in order[group * group_size : (group + 1) * group_size])
            grouped["prompt"].append(prompts[chosen[0]])
            grouped["responses"].append([responses[i] for i in chosen])
            if has_label:
                label, agree = _majority_label([labels[i] for i in chosen])
                grouped["label"].append(label)
                disagreeing += not agree
    if too_small:
        logger.info(
            "group_responses: dropped %d of %d prompts with fewer than %d responses",
            too_small,
            len(rows_of),
            group_size,
        )
    if disagreeing:
        logger.warning("group_responses: %d group(s) mix labels; each takes its most common one", disagreeing)
    if not grouped["prompt"]:
        most = max((len(rows) for rows in rows_of.values()), default=0)
        raise ValueError(
            f"group_size={group_size} leaves no group: prompts have at most {most} non-empty responses "
            f"({len(rows_of)} prompts)"
        )
    features = {"prompt": Value("string"), "responses": [Value("string")]}
    if has_label:
        features["label"] = dataset.features["label"]
    return Dataset.from_dict(grouped, features=Features(features))


def _usable_rows_by_prompt(keys: list, responses: list[str]) -> dict[Any, list[int]]:
    """The row indices of each prompt (`keys`, in order of first appearance) whose response is not blank."""
    rows_of: dict[Any, list[int]] = {}
    empty = 0
    for index, (key, response) in enumerate(zip(keys, responses, strict=True)):
        if not response.strip():
            empty += 1
            continue
        rows_of.setdefault(key, []).append(index)
    if empty:
        logger.info("group_responses: dropped %d empty response(s)", empty)
    return rows_of


def _majority_label(labels: list) -> tuple[Any, bool]:
    """The most common label (ties to the smallest; `None` only when it is the most common) and whether all agree."""
    counts = Counter(labels)
    return min(counts, key=lambda label: (-counts[label], label is None, label or 0)), len(counts) == 1


def single_response_groups(dataset: Dataset) -> Dataset:
    """Grouped rows `{prompt, responses: [response][, label]}` with every row its own example (a group of one), for
    data without one-to-many structure, such as unconditional text; empty responses are dropped."""
    check_columns(dataset, ("prompt", "response"))
    kept = dataset.filter(lambda row: bool(row["response"].strip()))
    if len(kept) == 0:
        raise ValueError("dataset has no non-empty response")
    grouped = kept.map(lambda row: {"responses": [row["response"]]}, remove_columns=["response"])
    return grouped.select_columns([name for name in ("prompt", "responses", "label") if name in grouped.column_names])


def is_unconditional(dataset: Dataset) -> bool:
    """Whether every prompt is empty (unconditional text, e.g. [`load_text_file`]'s rows)."""
    return all(not (prompt or "").strip() for prompt in dataset["prompt"])


__all__ = ["group_responses", "is_unconditional", "single_response_groups"]
