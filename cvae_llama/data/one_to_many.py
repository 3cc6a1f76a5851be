"""One-to-many data sampled from a causal LM: N responses per prompt, written batch by batch and resumable.

Zhang et al., "Latent Variable Modeling for Controllable and Diverse Generation From Large Language Models" (IEEE
TAI 2026, the objective's one-to-many data) train on N = 32 responses per prompt sampled from the fine-tuned LM at
temperature 1.0 and top_p 0.95 ([`SAMPLING_TEMPERATURE`], [`SAMPLING_TOP_P`]): [`make_one_to_many`] samples them.
"""

import hashlib
import json
import logging
import math
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import Dataset, Features, Value, load_from_disk
from datasets.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from ..validation import check_positive_int, pad_token_id
from .collator import prompt_inputs


logger = logging.getLogger(__name__)

# The paper's sampling settings of one-to-many data (also those of the base LM's reference samples in evaluation).
SAMPLING_TEMPERATURE = 1.0
SAMPLING_TOP_P = 0.95
# What a finished `save_to_disk` folder holds; its presence marks a finished `make_one_to_many` run.
_FINISHED_MARKER = "dataset_info.json"
_ONE_TO_MANY_CONFIG = "one_to_many_config.json"
# `generate` arguments that `make_one_to_many` sets from its own
_RESERVED_GENERATION_KWARGS = frozenset(
    {"do_sample", "temperature", "top_p", "max_new_tokens", "num_return_sequences", "input_ids"}
)


def make_one_to_many(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    num_responses: int,
    output_dir: str | os.PathLike,
    *,
    max_new_tokens: int,
    temperature: float = SAMPLING_TEMPERATURE,
    top_p: float = SAMPLING_TOP_P,
    batch_size: int = 8,
    seed: int = 0,
    labels: Sequence[int] | None = None,
    max_prompt_tokens: int | None = None,
    resume: bool = True,
    overwrite: bool = False,
    progress: bool = True,
    generation_kwargs: dict[str, Any] | None = None,
) -> Dataset:
    """Sample `num_responses` responses per prompt from a causal LM (the paper: N = 32, temperature 1.0, top_p 0.95)
    and save them as a `datasets` dataset of flat rows `{prompt, response, prompt_id[, label]}`.

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
    prompts, labels = _check_prompts_and_labels(prompts, labels)
    check_positive_int(num_responses, "num_responses")
    check_positive_int(batch_size, "batch_size")
    check_positive_int(max_new_tokens, "max_new_tokens")
    _check_sampling(temperature, top_p, generation_kwargs)
    pad_token_id(tokenizer)
    generation_kwargs = dict(generation_kwargs or {})

    output_dir = Path(output_dir)
    settings = _run_settings(
        model, prompts, labels, num_responses=num_responses, max_new_tokens=max_new_tokens, temperature=temperature,
        top_p=top_p, batch_size=batch_size, seed=seed, max_prompt_tokens=max_prompt_tokens,
        generation_kwargs=generation_kwargs,
    )  # fmt: skip
    batches = [range(start, min(start + batch_size, len(prompts))) for start in range(0, len(prompts), batch_size)]
    done = _start_or_resume(output_dir, settings, resume=resume, overwrite=overwrite, num_batches=len(batches))
    generation_kwargs = _sampling_kwargs(tokenizer, generation_kwargs, settings)
    _sample_batches(
        model, tokenizer, prompts, labels, output_dir, batches, done, seed=seed, max_prompt_tokens=max_prompt_tokens,
        generation_kwargs=generation_kwargs, progress=progress,
    )  # fmt: skip
    return _save_shards(output_dir, len(batches), has_labels=labels is not None, progress=progress)


def _run_settings(model, prompts: list[str], labels: list[int | None] | None, *, generation_kwargs: dict, **arguments):
    """What a run resumes on: the model, a hash of the prompts and labels, the arguments, the `generate` extras."""
    return {
        "model": getattr(getattr(model, "config", None), "_name_or_path", type(model).__name__),
        "num_prompts": len(prompts),
        "prompts_sha256": hashlib.sha256(json.dumps([prompts, labels]).encode("utf-8")).hexdigest(),
        **arguments,
        "generation_kwargs": {key: repr(value) for key, value in sorted(generation_kwargs.items())},
    }


def _sampling_kwargs(tokenizer: PreTrainedTokenizerBase, generation_kwargs: dict, settings: dict) -> dict:
    """The `generate` arguments of every batch: the caller's extras, then the run's sampling settings."""
    return {
        "pad_token_id": tokenizer.pad_token_id,
        **generation_kwargs,
        "do_sample": True,
        "temperature": settings["temperature"],
        "top_p": settings["top_p"],
        "max_new_tokens": settings["max_new_tokens"],
        "num_return_sequences": settings["num_responses"],
    }


def _sample_batches(
    model, tokenizer, prompts, labels, output_dir: Path, batches: list[range], done: set, *, seed: int,
    max_prompt_tokens: int | None, generation_kwargs: dict, progress: bool,
) -> None:  # fmt: skip
    """Sample every batch not in `done` and write it as a shard, the model in eval mode meanwhile."""
    eos_ids = _eos_token_ids(model, tokenizer)
    was_training = model.training
    model.eval()
    bar = tqdm(
        total=len(prompts),
        initial=sum(len(batches[k]) for k in done),
        unit="prompt",
        desc="Sampling responses",
        disable=not progress,
    )
    try:
        for k, ids in enumerate(batches):
            if k in done:
                continue
            inputs = prompt_inputs(tokenizer, [prompts[i] for i in ids], max_prompt_tokens)
            new_tokens = _generate_new_tokens(model, inputs, _batch_seed(seed, k), generation_kwargs)
            responses = [_response_text(tokenizer, tokens, eos_ids) for tokens in new_tokens]
            rows = _batch_rows(prompts, labels, ids, responses, generation_kwargs["num_return_sequences"])
            _write_shard(output_dir / "shards" / f"batch-{k:06d}.jsonl", rows)
            bar.update(len(ids))
    finally:
        bar.close()
        model.train(was_training)


def _batch_rows(prompts, labels, ids: range, responses: list[str], num_responses: int) -> list[dict[str, Any]]:
    """The rows of one batch, `num_responses` per prompt in `generate`'s order."""
    prompt_ids = [prompt_id for prompt_id in ids for _ in range(num_responses)]
    return [
        {"prompt": prompts[i], "response": response, "prompt_id": i}
        | ({"label": labels[i]} if labels is not None else {})
        for i, response in zip(prompt_ids, responses, strict=True)
    ]


def _check_prompts_and_labels(prompts, labels) -> tuple[list[str], list[int | None] | None]:
    prompts = list(prompts)
    if not prompts:
        raise ValueError("prompts is empty")
    if not all(isinstance(prompt, str) for prompt in prompts):
        raise ValueError(f"prompts must be strings, got {sorted({type(p).__name__ for p in prompts})}")
    if labels is not None:
        labels = [None if label is None else int(label) for label in labels]
        if len(labels) != len(prompts):
            raise ValueError(f"labels has {len(labels)} entries but prompts has {len(prompts)}")
    return prompts, labels


def _check_sampling(temperature, top_p, generation_kwargs: dict | None) -> None:
    if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature={temperature!r} must be a finite number > 0")
    if not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p!r} must be in (0, 1]")
    reserved = sorted(_RESERVED_GENERATION_KWARGS & (generation_kwargs or {}).keys())
    if reserved:
        raise ValueError(f"generation_kwargs sets {reserved}: use the arguments")


def _start_or_resume(output_dir: Path, settings: dict, *, resume: bool, overwrite: bool, num_batches: int) -> set:
    """Prepare `output_dir` for a run with `settings` and return the batches its shards already hold.

    A finished dataset there is an error unless `overwrite`; shards of a run with other settings are an error
    unless `resume=False`, which deletes them.
    """
    shard_dir = output_dir / "shards"
    if (output_dir / _FINISHED_MARKER).exists():
        if not overwrite:
            raise ValueError(f"output_dir={str(output_dir)!r} already holds a finished dataset: pass overwrite=True")
        _remove_one_to_many(output_dir)
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

    shard_names = [re.match(r"^batch-(\d+)\.jsonl$", file.name) for file in shard_dir.iterdir()]
    done = {int(match.group(1)) for match in shard_names if match} & set(range(num_batches))
    if done:
        logger.info("make_one_to_many: resuming, %d of %d batches already sampled", len(done), num_batches)
    return done


def _batch_seed(seed: int, batch: int) -> int:
    """The seed of one batch: a resumed run samples each batch exactly as an uninterrupted one."""
    return int(np.random.SeedSequence([seed, batch]).generate_state(1)[0])


def _generate_new_tokens(
    model, inputs: dict[str, torch.Tensor], seed: int, generation_kwargs: dict
) -> list[list[int]]:
    """The tokens `model.generate` samples after the prompts, under `seed` (the global RNG left as it was)."""
    device = next(model.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        output = model.generate(
            input_ids=inputs["input_ids"].to(device),
            attention_mask=inputs["attention_mask"].to(device),
            **generation_kwargs,
        )
    return output[:, inputs["input_ids"].shape[1] :].tolist()


def _response_text(tokenizer: PreTrainedTokenizerBase, tokens: list[int], eos_ids: set[int]) -> str:
    """The tokens up to the first end-of-sequence token, decoded verbatim (no clean-up, a leading space kept)."""
    stop = next((position for position, token in enumerate(tokens) if token in eos_ids), len(tokens))
    return tokenizer.decode(tokens[:stop], skip_special_tokens=True, clean_up_tokenization_spaces=False)


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


def _save_shards(output_dir: Path, num_batches: int, *, has_labels: bool, progress: bool) -> Dataset:
    """Join the shards into one dataset saved with `save_to_disk(output_dir)`, remove them, and load it back."""
    shard_dir = output_dir / "shards"
    features = {"prompt": Value("string"), "response": Value("string"), "prompt_id": Value("int64")}
    if has_labels:
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


def _remove_one_to_many(output_dir: Path) -> None:
    """Remove what make_one_to_many writes (never other files of `output_dir`)."""
    shutil.rmtree(output_dir / "shards", ignore_errors=True)
    for cache in output_dir.glob(".cache-*"):
        shutil.rmtree(cache, ignore_errors=True)
    for file in output_dir.glob("data-*.arrow"):
        file.unlink()
    for name in (_FINISHED_MARKER, "state.json", _ONE_TO_MANY_CONFIG):
        (output_dir / name).unlink(missing_ok=True)


__all__ = ["SAMPLING_TEMPERATURE", "SAMPLING_TOP_P", "make_one_to_many"]
