"""The training data of a `CVAETrainer`: what the density gap aggregates (`dg_grouping="auto"`), and the checks run
before the first step, so that bad data raise a `ValueError` instead of giving a NaN loss."""

from itertools import islice

import pyarrow
import pyarrow.compute
import torch
from datasets import Dataset

from ..data.collator import OneToManyCollator
from .arguments import CVAETrainingArguments


def response_counts(dataset):
    """Responses per row (a pyarrow array) of a `datasets.Dataset` whose `responses` column holds lists; else None."""
    if not isinstance(dataset, Dataset) or "responses" not in dataset.column_names:
        return None
    column_type = dataset.data.schema.field("responses").type
    if not (pyarrow.types.is_list(column_type) or pyarrow.types.is_large_list(column_type)):
        return None
    return pyarrow.compute.list_value_length(dataset.with_format("arrow")["responses"])


def resolve_dg_grouping(args: CVAETrainingArguments, dataset, data_collator) -> str:
    """`args.dg_grouping`, with `"auto"` resolved from the training data: `"group"` when they hold groups of at
    least 2 responses (a `responses` column, or rows that the collator batches into such groups), else
    `"batch"` (unconditional text or flat rows: every row its own example)."""
    if args.dg_grouping != "auto":
        return args.dg_grouping
    if dataset is None:
        return "group"
    sizes = response_counts(dataset)
    if sizes is not None:
        return "group" if (pyarrow.compute.max(sizes).as_py() or 0) >= 2 else "batch"
    try:
        batch = data_collator(list(islice(iter(dataset), args.per_device_train_batch_size)))
    except Exception:  # bad data: validate_train_dataset says what is wrong
        return "group"
    group_ids = batch.get("group_ids") if hasattr(batch, "get") else None  # a dict or a BatchEncoding
    if group_ids is None:
        return "group"
    return "group" if int(torch.bincount(group_ids).max()) >= 2 else "batch"


def validate_train_dataset(args: CVAETrainingArguments, dataset, data_collator, dg_grouping: str) -> None:
    """Check the training data before the first step: columns, a collated first batch, group sizes."""
    needs_groups = args.objective == "dg" and dg_grouping == "group"
    if hasattr(dataset, "__len__") and len(dataset) == 0:
        raise ValueError("train_dataset is empty: it needs at least one group (a prompt with its responses)")
    columns = getattr(dataset, "column_names", None)
    if isinstance(data_collator, OneToManyCollator) and columns is not None:
        if "prompt" not in columns or not {"responses", "response"} & set(columns):
            raise ValueError(
                f"train_dataset has the columns {columns} but the OneToManyCollator needs 'prompt' and "
                "'responses' (grouped rows {prompt, responses[, label]}, see cvae_llama.data.group_responses)"
            )
        if args.remove_unused_columns:
            raise ValueError(
                "remove_unused_columns=True would drop the text columns the OneToManyCollator reads; set "
                "`remove_unused_columns=False` (the CVAETrainingArguments default)"
            )
        if needs_groups and "responses" not in columns:
            raise ValueError(
                f"objective='dg' aggregates the posteriors of each prompt's responses, but train_dataset has flat "
                f"rows (columns {columns}): every group would have 1 response; group them with "
                "cvae_llama.data.group_responses(dataset, group_size >= 2), or set dg_grouping='batch'"
            )
    sizes = response_counts(dataset)
    if sizes is None and isinstance(dataset, Dataset) and "responses" in dataset.column_names:
        raise ValueError(
            f"train_dataset's 'responses' column holds {dataset.data.schema.field('responses').type} values; "
            "expected a list of strings per row (the responses of one prompt, see cvae_llama.data.group_responses)"
        )
    if needs_groups and sizes is not None:
        smallest = pyarrow.compute.min(sizes).as_py()
        if smallest is None or smallest < 2:
            row = pyarrow.compute.index(sizes, smallest).as_py() if smallest is not None else 0
            raise ValueError(
                f"objective='dg' aggregates the posteriors of each prompt's responses, but row {row} of "
                f"train_dataset has {smallest or 0} response(s); expected at least 2 per group (or set "
                "dg_grouping='batch')"
            )

    examples = list(islice(iter(dataset), args.per_device_train_batch_size))
    try:
        batch = data_collator(examples)
    except (KeyError, TypeError) as error:
        raise ValueError(
            f"the data collator could not build a batch from train_dataset's first rows (columns {columns}): {error!r}"
        ) from error
    missing = [key for key in ("input_ids", "attention_mask", "labels") if key not in batch]
    if missing:
        raise ValueError(f"the data collator's batch lacks {missing}; it has {sorted(batch.keys())}")
    if not (batch["labels"][..., 1:] != -100).any():
        raise ValueError(
            "every label of the first training batch is -100: no response token would be scored (check the "
            "token budgets max_prompt_tokens / max_response_tokens and that the responses are not empty)"
        )
    if args.objective == "dg":
        rows = batch["input_ids"].shape[0]
        if dg_grouping == "batch":
            if rows < 2:
                raise ValueError(
                    f"objective='dg' with dg_grouping='batch' aggregates the rows of a batch, but a batch has "
                    f"{rows} row; expected at least 2"
                )
        else:
            group_ids = batch.get("group_ids")
            sizes = torch.bincount(group_ids) if group_ids is not None else torch.tensor([rows])
            sizes = sizes[sizes > 0]
            if sizes.min() < 2:
                raise ValueError(
                    "objective='dg' aggregates the posteriors of each prompt's responses, but the first batch "
                    f"has a group of {int(sizes.min())} row; expected groups of at least 2 responses (or set "
                    "dg_grouping='batch')"
                )


__all__ = ["resolve_dg_grouping", "response_counts", "validate_train_dataset"]
