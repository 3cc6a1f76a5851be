"""One-to-many data for training a CVAE: readers, grouping, the collator, and sampling responses from an LM.

The format everywhere is a `datasets.Dataset` of flat rows `{prompt: str, response: str[, label: int]}`: one
condition `x` (a prompt, a dialogue context, or `""` for unconditional text) and one response `y`. The paper
(METHOD.md, section 2) trains on *one-to-many* data: for every prompt, N responses sampled from the fine-tuned LM
([`make_one_to_many`]), of which one training example sees M ([`group_responses`]). [`OneToManyCollator`] turns
a batch of such groups into the tensors the model and the density-gap regulariser need.

Readers for the paper's three datasets (section 4) take any path; nothing here knows where the files live:

| reader | rows | paper's budget (prompt / response tokens) |
|---|---|---|
| [`load_yelp`] | `{text, label}`; [`split_prompt_response`] cuts `text` into prompt / response by tokens | 32 / 128 |
| [`load_agnews`] | `{prompt: title, response: description, text: "<title> <description>", label}` | 8 / 32 of `text` |
| [`load_dailydialog`] | `{prompt: context, response: next utterance, label: dialogue act}` | 256 / 36 |

Yelp and AG News in the paper are one text split by token count (the first 32, resp. 8, tokens are the prompt), so
their prompt / response depend on the tokenizer: [`load_dataset_by_name`] applies [`split_prompt_response`] with
[`DATASET_BUDGETS`] to give exactly the paper's setting.

Example (`lm` a causal LM, `tokenizer` its tokenizer with a pad token):

```python
>>> from cvae_llama.data import DATASET_BUDGETS, OneToManyCollator, group_responses, load_dataset_by_name
>>> rows = load_dataset_by_name("agnews", "../shared/data/agnews", split="validation", tokenizer=tokenizer)
>>> flat = make_one_to_many(lm, tokenizer, rows["prompt"][:64], 32, "agnews-one-to-many", max_new_tokens=32,
...                         labels=rows["label"][:64])
>>> groups = group_responses(flat, group_size=16)  # 64 rows {prompt, responses (16), label}
>>> collator = OneToManyCollator(tokenizer, *DATASET_BUDGETS["agnews"])
>>> batch = collator([groups[0], groups[1]])  # 32 rows: input_ids, attention_mask, labels, group_ids, class_labels
```
"""

import csv
import hashlib
import html
import json
import logging
import math
import os
import re
import shutil
import tempfile
import zipfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import ClassLabel, Dataset, DatasetDict, Features, Value, load_dataset, load_from_disk
from datasets.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase


logger = logging.getLogger(__name__)

# (prompt tokens, response tokens) of the paper (METHOD.md section 4; the authors' `get_dataset_max_seq_length`).
DATASET_BUDGETS: dict[str, tuple[int, int]] = {"yelp": (32, 128), "agnews": (8, 32), "dailydialog": (256, 36)}
DATASET_LABEL_NAMES: dict[str, tuple[str, ...]] = {
    "yelp": ("negative", "positive"),
    "agnews": ("World", "Sports", "Business", "Sci/Tech"),
    "dailydialog": ("inform", "question", "directive", "commissive"),
}
# Label value that loss functions skip (torch's and transformers' `ignore_index`).
IGNORE_INDEX = -100
# What a finished `save_to_disk` folder holds; its presence marks a finished `make_one_to_many` run.
_FINISHED_MARKER = "dataset_info.json"
_ONE_TO_MANY_CONFIG = "one_to_many_config.json"


def clean_up_tokenization(text: str) -> str:
    """Undo the spaces of tokenised corpora (`"did n't , ok ."` -> `"didn't, ok."`), then strip.

    The same replacements as transformers' `clean_up_tokenization`, which the authors apply to Yelp and
    DailyDialog; kept here because transformers 5 made it an instance method.
    """
    for spaced, joined in (
        (" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"),
        (" n't", "n't"), (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"),
    ):  # fmt: skip
        text = text.replace(spaced, joined)
    return text.strip()


def _existing_path(path: str | os.PathLike, argument: str = "path") -> Path:
    path = Path(path).expanduser()
    if not path.exists():
        raise ValueError(f"{argument}={str(path)!r} does not exist")
    return path


def _require_columns(dataset: Dataset, columns: Sequence[str], argument: str = "dataset") -> None:
    missing = [column for column in columns if column not in dataset.column_names]
    if missing:
        raise ValueError(f"{argument} has columns {dataset.column_names} but needs {missing} as well")


def _require_rows(dataset: Dataset, argument: str = "dataset") -> None:
    if len(dataset) == 0:
        raise ValueError(f"{argument} is empty (0 rows)")


# ------------------------------------------------------------------------------------------------------ readers


def load_yelp(
    path: str | os.PathLike, split: str | None = None, *, clean_up_tokenization_spaces: bool = True
) -> Dataset:
    """Read Yelp review text with sentiment labels: rows `{text: str, label: int}`.

    Accepted layouts:
    - a folder of `sentiment.<split>.<label>` files, one text a line (Shen et al., 2017): the file suffix is the
      label (0 negative, 1 positive); `split` picks the files (`"dev"`, `"train"`, ...), and may be left out when
      the folder holds a single split;
    - one such file (`.../sentiment.dev.1`): every line gets the suffix as label;
    - one file of `<label>\\t<text>` lines (the DELLA / Optimus Yelp the paper uses, ratings 0-4);
    - any other text file: one text a line, no label column.

    The paper's prompt and response come from one text by token count (first 32 tokens, then up to 128): apply
    [`split_prompt_response`], or use `load_dataset_by_name("yelp", path, tokenizer=...)`. Note that the
    sentence-level files of Shen et al. are mostly shorter than 32 tokens.

    Args:
        path (`str` or `os.PathLike`): a folder or a file as above.
        split (`str`, *optional*): the split of a folder.
        clean_up_tokenization_spaces (`bool`, defaults to `True`): join the spaces of the tokenised corpus
            ([`clean_up_tokenization`]); `False` keeps the lines as they are (stripped).

    Returns:
        `datasets.Dataset` with `text` and, unless the file carries none, `label`, in file order (label 0 first).
    """
    path = _existing_path(path)
    if path.is_dir():
        pattern = re.compile(r"^sentiment\.(.+)\.(\d+)$")
        found = {}
        for file in path.iterdir():
            if match := pattern.match(file.name):
                found.setdefault(match.group(1), []).append((int(match.group(2)), file))
        if not found:
            raise ValueError(f"path={str(path)!r} holds no sentiment.<split>.<label> files")
        if split is None:
            if len(found) > 1:
                raise ValueError(f"path={str(path)!r} holds the splits {sorted(found)}: pass one as split=")
            split = next(iter(found))
        if split not in found:
            raise ValueError(f"split={split!r} not found in {str(path)!r}; it holds the splits {sorted(found)}")
        texts, labels = [], []
        for label, file in sorted(found[split]):
            lines = _read_lines(file)
            texts += lines
            labels += [label] * len(lines)
    else:
        if split is not None:
            raise ValueError(f"split={split!r} applies to a folder, but path={str(path)!r} is a file")
        lines = _read_lines(path)
        if match := re.search(r"\.(\d+)$", path.name):
            texts, labels = lines, [int(match.group(1))] * len(lines)
        elif lines and all(re.match(r"^\d+\t", line) for line in lines):
            labels, texts = zip(*(line.split("\t", 1) for line in lines))
            labels = [int(label) for label in labels]
        else:
            texts, labels = lines, None
    if clean_up_tokenization_spaces:
        texts = [clean_up_tokenization(text) for text in texts]
    if not texts:
        raise ValueError(f"path={str(path)!r} holds no text (0 non-empty lines)")
    columns = {"text": list(texts)}
    features = {"text": Value("string")}
    if labels is not None:
        columns["label"] = list(labels)
        num_labels = max(labels) + 1
        names = DATASET_LABEL_NAMES["yelp"] if num_labels <= 2 else [f"rated_{label}" for label in range(num_labels)]
        features["label"] = ClassLabel(names=list(names))
    return Dataset.from_dict(columns, features=Features(features))


def _read_lines(file: Path) -> list[str]:
    with open(file, encoding="utf-8") as handle:
        return [line.strip() for line in handle if line.strip()]


def _clean_agnews(text: str) -> str:
    # In the AG News CSV a lone backslash marks a line break ("second\team" is "second", "team"; the readme's
    # "\n" is not what the files hold) and HTML entities lost their "&" ("#39;" is "'", "#36;" is "$").
    text = re.sub(r"(?<!&)#(\d+);", r"&#\1;", text.replace("\\", " "))
    return re.sub(r"\s+", " ", html.unescape(text)).strip()


def load_agnews(path: str | os.PathLike, split: str | None = None, *, clean: bool = True) -> Dataset:
    """Read AG News: rows `{prompt: title, response: description, text: title + " " + description, label}`.

    The CSV has no header: `"label","title","description"`, label 1-4 (World, Sports, Business, Sci/Tech), read
    here as the topic 0-3.

    Which rows (`split`):
    - `path` a folder: `"train"` reads `train.csv`; `None` reads all of `test.csv`; `"validation"` and `"test"` read
      the even, resp. odd, rows of `test.csv` (the paper's split of the 7,600-row test set: 3,800 each);
    - `path` a CSV file: `None` or `"train"` all its rows, `"validation"` / `"test"` its even / odd rows.

    `prompt` / `response` are the natural title -> description pair. The paper's 8 / 32 setting instead cuts
    `text` by tokens (the first 8 tokens are the prompt): `split_prompt_response(dataset, tokenizer, 8,
    max_response_tokens=32)`, which `load_dataset_by_name("agnews", path, tokenizer=...)` applies.

    Args:
        path (`str` or `os.PathLike`): a folder holding `test.csv` (and `train.csv`), or a CSV file.
        split (`str`, *optional*): `None`, `"train"`, `"validation"` or `"test"`.
        clean (`bool`, defaults to `True`): turn the file's backslash line breaks into spaces and decode its HTML
            entities (`#39;` -> `'`); `False` keeps the fields as they are.
    """
    if split not in (None, "train", "validation", "test"):
        raise ValueError(f"split={split!r} is not one of None, 'train', 'validation', 'test'")
    path = _existing_path(path)
    if path.is_dir():
        path = path / ("train.csv" if split == "train" else "test.csv")
        if not path.is_file():
            raise ValueError(f"split={split!r} needs {str(path)!r}, which does not exist")
    with open(path, encoding="utf-8", newline="") as handle:
        records = [record for record in csv.reader(handle) if record]
    for number, record in enumerate(records, start=1):
        if len(record) != 3 or not record[0].strip().isdigit():
            raise ValueError(
                f"{str(path)!r} line {number} is {record!r}, expected \"label\",\"title\",\"description\""
            )
    if split in ("validation", "test"):
        records = records[0 if split == "validation" else 1 :: 2]
    if not records:
        raise ValueError(f"path={str(path)!r} holds no rows")
    titles = [_clean_agnews(record[1]) if clean else record[1] for record in records]
    descriptions = [_clean_agnews(record[2]) if clean else record[2] for record in records]
    labels = [int(record[0]) - 1 for record in records]
    if min(labels) < 0 or max(labels) > 3:
        raise ValueError(f"{str(path)!r} has labels {sorted(set(labels))} after -1, expected 0..3 (file values 1-4)")
    features = Features(
        {
            "prompt": Value("string"),
            "response": Value("string"),
            "text": Value("string"),
            "label": ClassLabel(names=list(DATASET_LABEL_NAMES["agnews"])),
        }
    )
    return Dataset.from_dict(
        {
            "prompt": titles,
            "response": descriptions,
            "text": [f"{title} {description}" for title, description in zip(titles, descriptions)],
            "label": labels,
        },
        features=features,
    )


def load_dailydialog(
    path: str | os.PathLike,
    split: str = "train",
    *,
    turn_separator: str = "\n",
    clean_up_tokenization_spaces: bool = True,
) -> Dataset:
    """Read DailyDialog as context -> next utterance pairs: rows `{prompt, response, label}`.

    Every utterance after the first of a dialogue is a response; its prompt is the dialogue so far, each turn
    followed by `turn_separator` (so the prompt ends with it and the response starts a new turn). The collator
    left-truncates long contexts, keeping their end. The label is the response's dialogue act, 0-3 (inform,
    question, directive, commissive; the files say 1-4); it is `None` for the pairs of a dialogue whose act line
    does not have one act per utterance (one dialogue of the official train split: 11 pairs).
    Official splits: 76,053 train and 7,069 validation pairs.

    Args:
        path (`str` or `os.PathLike`): a folder holding `<split>.zip` (or the extracted `dialogues_<split>.txt`
            and `dialogues_act_<split>.txt`, possibly in a `<split>/` sub-folder), or the zip itself. Zips are read
            in place with `zipfile`.
        split (`str`, defaults to `"train"`): `"train"`, `"validation"` or `"test"` (whatever files exist).
        turn_separator (`str`, defaults to `"\\n"`): written after every turn of the context. A chat model's
            end-of-turn token (the authors use Llama 3's `<|eot_id|>`) is another choice.
        clean_up_tokenization_spaces (`bool`, defaults to `True`): join the spaces of the tokenised corpus
            (`"Say , Jim"` -> `"Say, Jim"`), as the authors do.
    """
    path = _existing_path(path)
    dialogues_text = _read_dailydialog_member(path, split, f"dialogues_{split}.txt")
    acts_text = _read_dailydialog_member(path, split, f"dialogues_act_{split}.txt")
    dialogues, act_lines = dialogues_text.splitlines(), acts_text.splitlines()
    if len(dialogues) != len(act_lines):
        raise ValueError(f"{split!r}: {len(dialogues)} dialogues but {len(act_lines)} lines of dialogue acts")
    prompts, responses, labels = [], [], []
    misaligned = 0
    for dialogue, act_line in zip(dialogues, act_lines):
        turns = [turn.strip() for turn in dialogue.split("__eou__")]
        turns = [clean_up_tokenization(turn) if clean_up_tokenization_spaces else turn for turn in turns if turn]
        acts = [int(act) - 1 for act in act_line.split()]
        if len(acts) != len(turns):
            misaligned += 1
            acts = [None] * len(turns)
        for position in range(1, len(turns)):
            prompts.append("".join(turn + turn_separator for turn in turns[:position]))
            responses.append(turns[position])
            labels.append(acts[position])
    if misaligned:
        logger.warning(
            "DailyDialog %s: %d dialogue(s) have acts that do not align with turns: label None", split, misaligned
        )
    if not prompts:
        raise ValueError(f"path={str(path)!r} split={split!r} holds no dialogue of two turns or more")
    features = Features(
        {
            "prompt": Value("string"),
            "response": Value("string"),
            "label": ClassLabel(names=list(DATASET_LABEL_NAMES["dailydialog"])),
        }
    )
    return Dataset.from_dict({"prompt": prompts, "response": responses, "label": labels}, features=features)


def _read_dailydialog_member(path: Path, split: str, name: str) -> str:
    """The text of `name` from a zip, a folder holding `<split>.zip`, or a folder of extracted files."""
    candidates = [path] if path.is_file() else [path / f"{split}.zip", path / name, path / split / name]
    for candidate in candidates:
        if candidate.is_file() and zipfile.is_zipfile(candidate):
            with zipfile.ZipFile(candidate) as archive:
                members = [member for member in archive.namelist() if member.split("/")[-1] == name]
                if members:
                    return archive.read(members[0]).decode("utf-8")
                if candidate == path:
                    raise ValueError(
                        f"path={str(path)!r} has no {name} (split={split!r}); members: {archive.namelist()}"
                    )
        elif candidate.is_file() and candidate.name == name:
            return candidate.read_text(encoding="utf-8")
        elif candidate.is_file() and candidate.suffix.lower() == ".zip":
            raise ValueError(f"{str(candidate)!r} is not a zip archive (truncated or corrupted?)")
    raise ValueError(f"split={split!r}: found no {name} in {str(path)!r} (looked for {[str(c) for c in candidates]})")


def load_text_file(path: str | os.PathLike) -> Dataset:
    """Read unconditional text: a plain-text file with one text per line (blank lines skipped), as rows
    `{prompt: "", response: line}` (see [`unconditional_rows`]), e.g. to train a plain VAE over sentences."""
    path = _existing_path(path)
    if path.is_dir():
        raise ValueError(f"path={str(path)!r} is a folder; expected a text file with one text per line")
    texts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not texts:
        raise ValueError(f"path={str(path)!r} holds no non-blank line; expected one text per line")
    return Dataset.from_dict({"prompt": [""] * len(texts), "response": texts})


def unconditional_rows(dataset: Dataset, text_column: str = "text") -> Dataset:
    """Rows `{prompt: "", response: text[, label]}` from a dataset with a `text_column`: unconditional text, for a
    plain VAE over the texts (x empty, y the text). Train on them as they are (the collator makes each row its own
    example, and `CVAETrainer`'s `dg_grouping="auto"` aggregates the density gap over the batch)."""
    _require_columns(dataset, (text_column,))
    _require_rows(dataset)
    columns = {"response": dataset[text_column], "prompt": [""] * len(dataset)}
    if "label" in dataset.column_names:
        columns["label"] = dataset["label"]
    return Dataset.from_dict(columns)


def single_response_groups(dataset: Dataset) -> Dataset:
    """Grouped rows `{prompt, responses: [response][, label]}` with every row its own example (a group of one), for
    data without one-to-many structure, such as unconditional text; empty responses are dropped."""
    _require_columns(dataset, ("prompt", "response"))
    kept = dataset.filter(lambda row: bool(row["response"].strip()))
    if len(kept) == 0:
        raise ValueError("dataset has no non-empty response")
    grouped = kept.map(lambda row: {"responses": [row["response"]]}, remove_columns=["response"])
    return grouped.select_columns([name for name in ("prompt", "responses", "label") if name in grouped.column_names])


def is_unconditional(dataset: Dataset) -> bool:
    """Whether every prompt is empty (unconditional text, e.g. [`load_text_file`]'s rows)."""
    return all(not (prompt or "").strip() for prompt in dataset["prompt"])


def load_prompt_response_file(path: str | os.PathLike, split: str = "train") -> Dataset:
    """Read your own `{prompt, response[, label]}` rows: a `.json` / `.jsonl`, `.csv` or `.parquet` file (through
    `datasets.load_dataset` with the matching builder), or a folder written by `save_to_disk` (for instance by
    [`make_one_to_many`]). A file with a `text` column and neither `prompt` nor `response` is unconditional text
    ([`unconditional_rows`]).

    Args:
        path (`str` or `os.PathLike`): the file or folder.
        split (`str`, defaults to `"train"`): the split to return when the folder holds a `DatasetDict`.
    """
    path = _existing_path(path)
    builders = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
    if path.is_dir():
        try:
            dataset = load_from_disk(str(path))
        except FileNotFoundError as error:
            raise ValueError(f"path={str(path)!r} is a folder but not one written by save_to_disk: {error}") from None
        if isinstance(dataset, DatasetDict):
            if split not in dataset:
                raise ValueError(f"split={split!r} not in {str(path)!r}, which holds {list(dataset)}")
            dataset = dataset[split]
    elif path.suffix.lower() in builders:
        builder = builders[path.suffix.lower()]
        if path.stat().st_size == 0:
            raise ValueError(f"path={str(path)!r} is an empty file (0 bytes); expected {builder} rows")
        try:
            dataset = load_dataset(builder, data_files=str(path), split="train")
        except Exception as error:  # datasets raises many types (and a bare StopIteration) for an unreadable file
            cause = error.__cause__ or error
            raise ValueError(
                f"path={str(path)!r} could not be read as {builder}: {type(cause).__name__}: "
                f"{' '.join(str(cause).split())[:300]}"
            ) from error
    else:
        raise ValueError(
            f"path={str(path)!r} has suffix {path.suffix!r}; expected one of {sorted(builders)} or a folder"
        )
    if "text" in dataset.column_names and not {"prompt", "response"} & set(dataset.column_names):
        dataset = unconditional_rows(dataset)
    _require_columns(dataset, ("prompt", "response"), argument=f"path={str(path)!r}")
    _require_rows(dataset, argument=f"path={str(path)!r}")
    return dataset


def split_prompt_response(
    dataset: Dataset,
    tokenizer: PreTrainedTokenizerBase,
    prompt_tokens: int,
    *,
    max_response_tokens: int | None = None,
    min_response_tokens: int = 1,
    text_column: str = "text",
) -> Dataset:
    """Cut each text into prompt = its first `prompt_tokens` tokens and response = the rest (the paper's Yelp and
    AG News setting): adds (or replaces) the `prompt` and `response` columns.

    The cut falls on the character where the tokenizer's `prompt_tokens`-th token ends (fast tokenizers' offsets),
    so `prompt + response == text` exactly, with no decoding artefacts, and tokenizing the two apart gives back the
    same tokens for the usual byte-level BPE and WordPiece-like tokenizers (the response keeps its leading space).

    Args:
        dataset (`datasets.Dataset`): rows with a `text_column`.
        tokenizer (`PreTrainedTokenizerBase`): a fast tokenizer (the one of the model to train).
        prompt_tokens (`int`): tokens in the prompt (32 for Yelp, 8 for AG News).
        max_response_tokens (`int`, *optional*): also cut the response after this many tokens (the collator
            truncates anyway; this keeps references short for evaluation).
        min_response_tokens (`int`, defaults to `1`): drop texts whose response would have fewer tokens (logged).
            `0` keeps texts that fit entirely in the prompt (useful when only prompts are needed, for
            [`make_one_to_many`]). The authors keep texts of at least prompt + response_budget // 10 tokens.
        text_column (`str`, defaults to `"text"`): the column to cut.

    Returns:
        `datasets.Dataset`: the rows kept, with `prompt` and `response` set.
    """
    if prompt_tokens < 0:
        raise ValueError(f"prompt_tokens={prompt_tokens} must be >= 0")
    if max_response_tokens is not None and max_response_tokens < 1:
        raise ValueError(f"max_response_tokens={max_response_tokens} must be >= 1 or None")
    if min_response_tokens < 0:
        raise ValueError(f"min_response_tokens={min_response_tokens} must be >= 0")
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"split_prompt_response needs a fast tokenizer (offsets), got {type(tokenizer).__name__}")
    _require_columns(dataset, (text_column,))
    _require_rows(dataset)

    def cut(batch: dict[str, list]) -> dict[str, list]:
        encoded = tokenizer(batch[text_column], add_special_tokens=False, return_offsets_mapping=True)
        prompts, responses, keep, lengths = [], [], [], []
        for text, offsets in zip(batch[text_column], encoded["offset_mapping"]):
            num_response = max(len(offsets) - prompt_tokens, 0)
            if num_response == 0:  # the whole text fits in the prompt
                cut_at = end = len(text)
            else:
                cut_at = offsets[prompt_tokens - 1][1] if prompt_tokens > 0 else 0
                end = len(text)
                if max_response_tokens is not None and num_response > max_response_tokens:
                    num_response = max_response_tokens
                    end = offsets[prompt_tokens + num_response - 1][1]
            prompts.append(text[:cut_at])
            responses.append(text[cut_at:end])
            keep.append(num_response >= min_response_tokens)
            lengths.append(len(offsets))
        return {"prompt": prompts, "response": responses, "_keep": keep, "_length": lengths}

    result = dataset.map(cut, batched=True, desc="Splitting prompt / response")
    kept = result.filter(lambda keep: keep, input_columns="_keep").remove_columns(["_keep", "_length"])
    if len(kept) < len(dataset):
        logger.info(
            "split_prompt_response: dropped %d of %d texts with fewer than %d response tokens after %d prompt tokens",
            len(dataset) - len(kept), len(dataset), min_response_tokens, prompt_tokens,
        )
    if len(kept) == 0:
        raise ValueError(
            f"no text has prompt_tokens={prompt_tokens} tokens and min_response_tokens={min_response_tokens} more "
            f"(the longest of {len(dataset)} texts has {max(result['_length'])} tokens): lower one of them"
        )
    return kept


def load_dataset_by_name(
    name: str,
    path: str | os.PathLike,
    *,
    split: str | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    **kwargs: Any,
) -> Dataset:
    """Read a dataset in the paper's setting: `{prompt, response[, label]}` rows to pair with
    `OneToManyCollator(tokenizer, *DATASET_BUDGETS[name])`.

    - `"yelp"`, `"agnews"`: the reader's `text` cut by [`split_prompt_response`] with the paper's budget and its
      filter (at least `response_budget // 10` response tokens); needs `tokenizer`.
    - `"dailydialog"`: context -> next utterance (`split` defaults to `"train"`).
    - `"prompt_response"`: your own file or folder ([`load_prompt_response_file`]).

    Args:
        name (`str`): one of the names above.
        path (`str` or `os.PathLike`): where the data lie (any path; e.g. `../shared/data/agnews`).
        split (`str`, *optional*): passed to the reader.
        tokenizer (`PreTrainedTokenizerBase`, *optional*): required for `"yelp"` and `"agnews"`.
        kwargs: further keyword arguments of the reader.
    """
    if name == "dailydialog":
        return load_dailydialog(path, split=split or "train", **kwargs)
    if name == "prompt_response":
        return load_prompt_response_file(path, split=split or "train", **kwargs)
    if name not in ("yelp", "agnews"):
        raise ValueError(f"name={name!r} is not one of ['yelp', 'agnews', 'dailydialog', 'prompt_response']")
    if tokenizer is None:
        raise ValueError(f"name={name!r} cuts each text into prompt and response by tokens: pass tokenizer=")
    dataset = (load_yelp if name == "yelp" else load_agnews)(path, split=split, **kwargs)
    prompt_tokens, response_tokens = DATASET_BUDGETS[name]
    return split_prompt_response(
        dataset,
        tokenizer,
        prompt_tokens,
        max_response_tokens=response_tokens,
        min_response_tokens=max(1, response_tokens // 10),
    )


# ----------------------------------------------------------------------------------------------------- grouping


def group_responses(
    dataset: Dataset,
    group_size: int,
    seed: int = 0,
    *,
    max_groups_per_prompt: int = 1,
    group_by: str | None = None,
) -> Dataset:
    """Turn flat `{prompt, response[, label]}` rows into groups: one row per prompt, `{prompt, responses[, label]}`
    with exactly `group_size` responses (METHOD.md section 2: a training step sees one prompt with M of its
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
    for name, value in (("group_size", group_size), ("max_groups_per_prompt", max_groups_per_prompt)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} must be an integer >= 1")
    _require_columns(dataset, ("prompt", "response"))
    _require_rows(dataset)
    group_by = group_by or ("prompt_id" if "prompt_id" in dataset.column_names else "prompt")
    _require_columns(dataset, (group_by,))
    has_label = "label" in dataset.column_names

    columns = dataset.select_columns(sorted({"prompt", "response", group_by} | ({"label"} if has_label else set())))
    columns = columns.to_dict()
    prompts, responses, keys, labels = columns["prompt"], columns["response"], columns[group_by], columns.get("label")
    rows_of: dict[Any, list[int]] = {}
    empty = 0
    for index, (key, response) in enumerate(zip(keys, responses)):
        if not response.strip():
            empty += 1
            continue
        rows_of.setdefault(key, []).append(index)
    if empty:
        logger.info("group_responses: dropped %d empty response(s)", empty)

    rng = np.random.default_rng(seed)
    grouped: dict[str, list] = {"prompt": [], "responses": []}
    if has_label:
        grouped["label"] = []
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
                counts = Counter(labels[i] for i in chosen)
                disagreeing += len(counts) > 1
                grouped["label"].append(min(counts, key=lambda label: (-counts[label], label is None, label or 0)))
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


# ----------------------------------------------------------------------------------------------------- collator


def _left_pad(
    sequences: Sequence[Sequence[int]], pad_value: int, pad_to_multiple_of: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad to the longest: `(tensor (rows, length), attention_mask (rows, length))`."""
    length = max(len(sequence) for sequence in sequences)
    if pad_to_multiple_of:
        length = -(-length // pad_to_multiple_of) * pad_to_multiple_of
    padded = torch.full((len(sequences), length), pad_value, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        if sequence:
            padded[row, length - len(sequence) :] = torch.tensor(sequence, dtype=torch.long)
            mask[row, length - len(sequence) :] = 1
    return padded, mask


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
        if self.tokenizer.pad_token_id is None:
            raise ValueError(
                "the tokenizer has no pad token: set one before building the collator, e.g. "
                "`tokenizer.pad_token = tokenizer.eos_token` (padding is masked out and never scored)"
            )
        for name, smallest in (("max_prompt_tokens", 0), ("max_response_tokens", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < smallest:
                raise ValueError(f"{name}={value!r} must be >= {smallest} (an integer)")
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

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if len(features) == 0:
            raise ValueError("features is empty: the collator needs at least one group")
        groups = [self._unpack(feature, index) for index, feature in enumerate(features)]
        prompt_ids = encode_prompts(self.tokenizer, [prompt for prompt, _ in groups], self.max_prompt_tokens)
        flat_responses = [response for _, responses in groups for response in responses]
        response_ids = self.tokenizer(flat_responses, add_special_tokens=False)["input_ids"]

        sequences, labels, group_ids, class_labels = [], [], [], []
        has_label = any("label" in feature for feature in features)
        row = 0
        for group, ((_, responses), prompt) in enumerate(zip(groups, prompt_ids)):
            label = features[group].get("label")
            for _ in responses:
                response = response_ids[row]
                if not response:
                    raise ValueError(f"feature {group}: response {flat_responses[row]!r} tokenizes to no tokens")
                if self.add_eos and len(response) < self.max_response_tokens:
                    response = response + [self.tokenizer.eos_token_id]
                response = response[: self.max_response_tokens]
                sequences.append(prompt + response)
                labels.append([IGNORE_INDEX] * len(prompt) + response)
                group_ids.append(group)
                class_labels.append(IGNORE_INDEX if label is None else int(label))
                row += 1

        input_ids, attention_mask = _left_pad(sequences, self.tokenizer.pad_token_id, self.pad_to_multiple_of)
        batch = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": _left_pad(labels, IGNORE_INDEX, self.pad_to_multiple_of)[0],
            "group_ids": torch.tensor(group_ids, dtype=torch.long),
        }
        if has_label:
            batch["class_labels"] = torch.tensor(class_labels, dtype=torch.long)
        return batch


# ---------------------------------------------------------------------------------------------------- sampling


def make_one_to_many(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    num_responses: int,
    output_dir: str | os.PathLike,
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 0.95,
    batch_size: int = 8,
    seed: int = 0,
    labels: Sequence[int] | None = None,
    max_prompt_tokens: int | None = None,
    resume: bool = True,
    overwrite: bool = False,
    progress: bool = True,
    generation_kwargs: dict[str, Any] | None = None,
) -> Dataset:
    """Sample `num_responses` responses per prompt from a causal LM (METHOD.md section 2: N = 32, temperature 1.0,
    top_p 0.95) and save them as a `datasets` dataset of flat rows `{prompt, response, prompt_id[, label]}`.

    Prompts go through `model.generate` `batch_size` at a time (left-padded, encoded like the collator does:
    [`encode_prompts`]) with `do_sample=True` and `num_return_sequences=num_responses`. Each finished batch is
    written at once to `output_dir/shards/batch-<k>.jsonl`; a call that finds shards (and the same settings, in
    `output_dir/one_to_many_config.json`) skips their prompts, so an interrupted run resumes where it stopped. Every
    batch samples under its own seed (from `seed` and the batch index), so a resumed run gives the rows of an
    uninterrupted one on the same hardware. At the end the rows are saved with `save_to_disk(output_dir)` and the
    shards removed. The responses are the new tokens decoded up to the first end-of-sequence token, kept verbatim
    (a leading space included) so that `prompt + response` is what the LM wrote; an empty response is kept (the LM
    stopped at once) and [`group_responses`] drops it.

    Prompts are used as given: format them with a chat template first if the LM expects one.

    Args:
        model: a causal LM with `generate` (a `LlamaForCausalLM`, or a `CVAELlamaForCausalLM`, which then draws a
            prior latent per response).
        tokenizer (`PreTrainedTokenizerBase`): its tokenizer, with a pad token.
        prompts (`Sequence[str]`): the prompts; `prompt_id` in the output is the index in this list.
        num_responses (`int`): N, responses per prompt.
        output_dir (`str` or `os.PathLike`): where the shards and the final dataset go.
        max_new_tokens (`int`): cap on each response's tokens.
        temperature (`float`, defaults to `1.0`), top_p (`float`, defaults to `0.95`): sampling settings.
        batch_size (`int`, defaults to `8`): prompts per `generate` call (that call makes batch_size x N sequences).
        seed (`int`, defaults to `0`): base seed.
        labels (`Sequence[int]`, *optional*): a label per prompt, copied to its rows.
        max_prompt_tokens (`int`, *optional*): left-truncate prompts to this many tokens.
        resume (`bool`, defaults to `True`): reuse the shards of an interrupted run; `False` deletes them first.
        overwrite (`bool`, defaults to `False`): replace a finished dataset in `output_dir` (otherwise an error).
        progress (`bool`, defaults to `True`): show a tqdm progress bar over prompts.
        generation_kwargs (`dict`, *optional*): further `generate` arguments (e.g. `repetition_penalty`).

    Returns:
        `datasets.Dataset`: `len(prompts) * num_responses` rows, prompt by prompt.
    """
    prompts = list(prompts)
    if not prompts:
        raise ValueError("prompts is empty")
    if not all(isinstance(prompt, str) for prompt in prompts):
        raise ValueError(f"prompts must be strings, got {sorted({type(p).__name__ for p in prompts})}")
    if num_responses < 1:
        raise ValueError(f"num_responses={num_responses} must be >= 1")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
    if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature={temperature!r} must be a finite number > 0")
    if not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p!r} must be in (0, 1]")
    if labels is not None:
        labels = [None if label is None else int(label) for label in labels]
        if len(labels) != len(prompts):
            raise ValueError(f"labels has {len(labels)} entries but prompts has {len(prompts)}")
    if tokenizer.pad_token_id is None:
        raise ValueError(
            "the tokenizer has no pad token: set one first, e.g. `tokenizer.pad_token = tokenizer.eos_token`"
        )
    generation_kwargs = dict(generation_kwargs or {})
    reserved = {"do_sample", "temperature", "top_p", "max_new_tokens", "num_return_sequences", "input_ids"}
    if reserved & generation_kwargs.keys():
        raise ValueError(f"generation_kwargs sets {sorted(reserved & generation_kwargs.keys())}: use the arguments")

    output_dir = Path(output_dir)
    shard_dir = output_dir / "shards"
    if (output_dir / _FINISHED_MARKER).exists():
        if not overwrite:
            raise ValueError(f"output_dir={str(output_dir)!r} already holds a finished dataset: pass overwrite=True")
        _remove_one_to_many(output_dir)
    settings = {
        "model": getattr(getattr(model, "config", None), "_name_or_path", type(model).__name__),
        "num_prompts": len(prompts),
        "prompts_sha256": hashlib.sha256(json.dumps([prompts, labels]).encode("utf-8")).hexdigest(),
        "num_responses": num_responses,
        "max_new_tokens": max_new_tokens,
        "temperature": temperature,
        "top_p": top_p,
        "batch_size": batch_size,
        "seed": seed,
        "max_prompt_tokens": max_prompt_tokens,
        "generation_kwargs": {key: repr(value) for key, value in sorted(generation_kwargs.items())},
    }
    config_file = output_dir / _ONE_TO_MANY_CONFIG
    if shard_dir.exists() and any(shard_dir.iterdir()):
        previous = json.loads(config_file.read_text()) if config_file.exists() else None
        if not resume:
            logger.warning("make_one_to_many: resume=False, deleting the shards in %s", shard_dir)
            _remove_one_to_many(output_dir)
        elif previous != settings:
            changed = sorted(k for k in settings if previous is None or previous.get(k) != settings[k])
            raise ValueError(
                f"output_dir={str(output_dir)!r} holds shards of a run with other settings ({changed} differ): "
                f"use another output_dir, the same settings, or resume=False to start over"
            )
    shard_dir.mkdir(parents=True, exist_ok=True)
    config_file.write_text(json.dumps(settings, indent=2))

    num_batches = -(-len(prompts) // batch_size)
    shard_names = [re.match(r"^batch-(\d+)\.jsonl$", file.name) for file in shard_dir.iterdir()]
    done = {int(match.group(1)) for match in shard_names if match}
    done &= set(range(num_batches))
    if done:
        logger.info("make_one_to_many: resuming, %d of %d batches already sampled", len(done), num_batches)
    eos_ids = _eos_token_ids(model, tokenizer)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    bar = tqdm(
        total=len(prompts),
        initial=sum(len(prompts[k * batch_size : (k + 1) * batch_size]) for k in done),
        unit="prompt",
        desc="Sampling responses",
        disable=not progress,
    )
    try:
        for k in range(num_batches):
            if k in done:
                continue
            ids = list(range(k * batch_size, min((k + 1) * batch_size, len(prompts))))
            encoded = encode_prompts(tokenizer, [prompts[i] for i in ids], max_prompt_tokens)
            input_ids, attention_mask = _left_pad(encoded, tokenizer.pad_token_id)
            # one seed per batch: a resumed run samples each batch exactly as an uninterrupted one
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                torch.manual_seed(int(np.random.SeedSequence([seed, k]).generate_state(1)[0]))
                output = model.generate(
                    input_ids=input_ids.to(device),
                    attention_mask=attention_mask.to(device),
                    do_sample=True,
                    temperature=temperature,
                    top_p=top_p,
                    max_new_tokens=max_new_tokens,
                    num_return_sequences=num_responses,
                    pad_token_id=tokenizer.pad_token_id,
                    **generation_kwargs,
                )
            new_tokens = output[:, input_ids.shape[1] :].tolist()
            rows = []
            for sequence_index, tokens in enumerate(new_tokens):
                prompt_id = ids[sequence_index // num_responses]
                stop = next((position for position, token in enumerate(tokens) if token in eos_ids), len(tokens))
                row = {
                    "prompt": prompts[prompt_id],
                    "response": tokenizer.decode(
                        tokens[:stop], skip_special_tokens=True, clean_up_tokenization_spaces=False
                    ),
                    "prompt_id": prompt_id,
                }
                if labels is not None:
                    row["label"] = labels[prompt_id]
                rows.append(row)
            _write_shard(shard_dir / f"batch-{k:06d}.jsonl", rows)
            bar.update(len(ids))
    finally:
        bar.close()
        model.train(was_training)

    features = {"prompt": Value("string"), "response": Value("string"), "prompt_id": Value("int64")}
    if labels is not None:
        features["label"] = Value("int64")
    shard_files = [str(shard_dir / f"batch-{k:06d}.jsonl") for k in range(num_batches)]
    bars_were_enabled = not are_progress_bars_disabled()
    if not progress:
        disable_progress_bars()
    try:
        # a private cache: the json builder must never reuse the Arrow file of an earlier run's shards
        with tempfile.TemporaryDirectory(dir=output_dir, prefix=".cache-") as cache_dir:
            dataset = Dataset.from_json(shard_files, features=Features(features), cache_dir=cache_dir)
            dataset.save_to_disk(str(output_dir))
            del dataset
    finally:
        if bars_were_enabled:
            enable_progress_bars()
    shutil.rmtree(shard_dir)
    return load_from_disk(str(output_dir))


def _eos_token_ids(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """Token ids that end a sampled response: the generation config's EOS (one or a list) and the tokenizer's."""
    ids = set()
    generation_config = getattr(model, "generation_config", None)
    configured = getattr(generation_config, "eos_token_id", None)
    if configured is not None:
        ids.update(configured if isinstance(configured, list) else [configured])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def _write_shard(file: Path, rows: list[dict[str, Any]]) -> None:
    """Write a finished batch atomically: a shard exists only once it is complete."""
    partial = file.with_suffix(".jsonl.partial")
    with open(partial, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(partial, file)


def _remove_one_to_many(output_dir: Path) -> None:
    """Remove what make_one_to_many writes (never other files of `output_dir`)."""
    shutil.rmtree(output_dir / "shards", ignore_errors=True)
    for cache in output_dir.glob(".cache-*"):
        shutil.rmtree(cache, ignore_errors=True)
    for file in output_dir.glob("data-*.arrow"):
        file.unlink()
    for name in (_FINISHED_MARKER, "state.json", _ONE_TO_MANY_CONFIG):
        (output_dir / name).unlink(missing_ok=True)


__all__ = [
    "DATASET_BUDGETS",
    "DATASET_LABEL_NAMES",
    "IGNORE_INDEX",
    "OneToManyCollator",
    "clean_up_tokenization",
    "encode_prompts",
    "group_responses",
    "is_unconditional",
    "load_agnews",
    "load_dailydialog",
    "load_dataset_by_name",
    "load_prompt_response_file",
    "load_text_file",
    "load_yelp",
    "make_one_to_many",
    "single_response_groups",
    "split_prompt_response",
    "unconditional_rows",
]
