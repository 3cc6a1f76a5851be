"""Readers of the paper's datasets and of your own files, as `datasets.Dataset`s of `{prompt, response[, label]}` rows.

Readers for the three datasets of Zhang et al., "Latent Variable Modeling for Controllable and Diverse Generation
From Large Language Models" (IEEE TAI 2026, the experimental setup) take any path; nothing here knows where the files
live:

| reader | rows | paper's budget (prompt / response tokens) |
|---|---|---|
| [`load_yelp`] | `{text, label}`; [`split_prompt_response`] cuts `text` into prompt / response by tokens | 32 / 128 |
| [`load_agnews`] | `{prompt: title, response: description, text: "<title> <description>", label}` | 8 / 32 of `text` |
| [`load_dailydialog`] | `{prompt: context, response: next utterance, label: dialogue act}` | 256 / 36 |

Yelp and AG News in the paper are one text split by token count (the first 32, resp. 8, tokens are the prompt), so
their prompt / response depend on the tokenizer: [`load_dataset_by_name`] applies [`split_prompt_response`] with
[`DATASET_BUDGETS`] to give exactly the paper's setting. [`load_prompt_response_file`] and [`load_text_file`] read
your own rows.
"""

import csv
import html
import logging
import os
import re
import zipfile
from pathlib import Path
from typing import Any

from datasets import ClassLabel, Dataset, DatasetDict, Features, Value, load_dataset, load_from_disk
from transformers import PreTrainedTokenizerBase

from ..validation import check_columns, check_existing_path, check_not_empty, check_positive_int
from .budgets import DATASET_BUDGETS


logger = logging.getLogger(__name__)

DATASET_LABEL_NAMES: dict[str, tuple[str, ...]] = {
    "yelp": ("negative", "positive"),
    "agnews": ("World", "Sports", "Business", "Sci/Tech"),
    "dailydialog": ("inform", "question", "directive", "commissive"),
}


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
    path = check_existing_path(path)
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
            labels, texts = zip(*(line.split("\t", 1) for line in lines), strict=True)
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
    path = check_existing_path(path)
    if path.is_dir():
        path = path / ("train.csv" if split == "train" else "test.csv")
        if not path.is_file():
            raise ValueError(f"split={split!r} needs {str(path)!r}, which does not exist")
    with open(path, encoding="utf-8", newline="") as handle:
        records = [record for record in csv.reader(handle) if record]
    for number, record in enumerate(records, start=1):
        if len(record) != 3 or not record[0].strip().isdigit():
            raise ValueError(f'{str(path)!r} line {number} is {record!r}, expected "label","title","description"')
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
            "text": [f"{title} {description}" for title, description in zip(titles, descriptions, strict=True)],
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
    path = check_existing_path(path)
    dialogues_text = _read_dailydialog_member(path, split, f"dialogues_{split}.txt")
    acts_text = _read_dailydialog_member(path, split, f"dialogues_act_{split}.txt")
    dialogues, act_lines = dialogues_text.splitlines(), acts_text.splitlines()
    if len(dialogues) != len(act_lines):
        raise ValueError(f"{split!r}: {len(dialogues)} dialogues but {len(act_lines)} lines of dialogue acts")
    prompts, responses, labels = [], [], []
    misaligned = 0
    for dialogue, act_line in zip(dialogues, act_lines, strict=True):
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
    path = check_existing_path(path)
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
    check_columns(dataset, (text_column,))
    check_not_empty(dataset)
    columns = {"response": dataset[text_column], "prompt": [""] * len(dataset)}
    if "label" in dataset.column_names:
        columns["label"] = dataset["label"]
    return Dataset.from_dict(columns)


def load_prompt_response_file(path: str | os.PathLike, split: str = "train") -> Dataset:
    """Read your own `{prompt, response[, label]}` rows: a `.json` / `.jsonl`, `.csv` or `.parquet` file (through
    `datasets.load_dataset` with the matching builder), or a folder written by `save_to_disk` (for instance by
    [`make_one_to_many`]). A file with a `text` column and neither `prompt` nor `response` is unconditional text
    ([`unconditional_rows`]).

    Args:
        path (`str` or `os.PathLike`): the file or folder.
        split (`str`, defaults to `"train"`): the split to return when the folder holds a `DatasetDict`.
    """
    path = check_existing_path(path)
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
    check_columns(dataset, ("prompt", "response"), name=f"path={str(path)!r}")
    check_not_empty(dataset, name=f"path={str(path)!r}")
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
    check_positive_int(prompt_tokens, "prompt_tokens", minimum=0)
    if max_response_tokens is not None:
        check_positive_int(max_response_tokens, "max_response_tokens")
    check_positive_int(min_response_tokens, "min_response_tokens", minimum=0)
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"split_prompt_response needs a fast tokenizer (offsets), got {type(tokenizer).__name__}")
    check_columns(dataset, (text_column,))
    check_not_empty(dataset)

    def cut(batch: dict[str, list]) -> dict[str, list]:
        encoded = tokenizer(batch[text_column], add_special_tokens=False, return_offsets_mapping=True)
        prompts, responses, keep, lengths = [], [], [], []
        for text, offsets in zip(batch[text_column], encoded["offset_mapping"], strict=True):
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
            len(dataset) - len(kept),
            len(dataset),
            min_response_tokens,
            prompt_tokens,
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


__all__ = [
    "DATASET_LABEL_NAMES",
    "clean_up_tokenization",
    "load_agnews",
    "load_dailydialog",
    "load_dataset_by_name",
    "load_prompt_response_file",
    "load_text_file",
    "load_yelp",
    "split_prompt_response",
    "unconditional_rows",
]
