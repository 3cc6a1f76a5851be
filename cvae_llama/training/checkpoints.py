"""Refuse an incomplete `Trainer` checkpoint before resuming from it (a run killed while saving leaves one)."""

import json
import zipfile
from pathlib import Path

from safetensors import safe_open
from transformers import TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint


def check_checkpoint(checkpoint: str | Path, args: TrainingArguments, sharded: bool = False) -> None:
    """Raise `ValueError` naming the folder and the file unless `checkpoint` is a complete Trainer checkpoint.

    The Trainer writes the weights, the optimizer, scheduler and RNG states, then `trainer_state.json` last, in place:
    a run killed while saving leaves a folder that the Trainer would load in part (a missing optimizer state is
    silently replaced by a fresh one) or fail on with an error that names no file.
    """
    folder = Path(checkpoint)

    def refuse(problem: str):
        raise ValueError(
            f"resume_from_checkpoint={str(folder)!r} is not a complete checkpoint: {problem}. A run killed while "
            "saving leaves such a folder: resume from an earlier checkpoint, or delete this one"
        )

    if not folder.is_dir():
        refuse("no such folder")
    try:
        json.loads((folder / "trainer_state.json").read_text(encoding="utf-8"))["global_step"]
    except FileNotFoundError:
        refuse("trainer_state.json is missing (the Trainer writes it last)")
    except (ValueError, KeyError, TypeError) as error:
        refuse(f"trainer_state.json is truncated or corrupted ({type(error).__name__}: {error})")
    if not sharded:
        for index in folder.glob("*.safetensors.index.json"):
            shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
            if missing := sorted(name for name in shards if not (folder / name).is_file()):
                refuse(f"{missing} listed in {index.name} are missing")
        weights = sorted(folder.glob("*.safetensors"))
        if not weights:
            refuse("model.safetensors (or adapter_model.safetensors) is missing")
        for file in weights:  # the header must describe the whole file: a truncated one fails here
            try:
                with safe_open(str(file), framework="pt"):
                    pass
            except Exception as error:  # safetensors raises its own error types
                refuse(f"{file.name} is truncated or corrupted ({error})")
    states = [] if args.save_only_model or sharded else ["optimizer.pt", "scheduler.pt"]
    states.append("rng_state.pth" if args.world_size <= 1 else f"rng_state_{args.process_index}.pth")
    for name in states:  # torch.save files are zip archives whose directory is written last
        if not (folder / name).is_file():
            refuse(f"{name} is missing (the Trainer would start a fresh one in silence)")
        try:
            zipfile.ZipFile(folder / name).close()
        except (zipfile.BadZipFile, OSError) as error:
            refuse(f"{name} is truncated or corrupted ({error})")


def _is_complete(checkpoint: Path, args: TrainingArguments, sharded: bool) -> bool:
    try:
        check_checkpoint(checkpoint, args, sharded)
    except ValueError:
        return False
    return True


def _newest_complete(output_dir: Path, args: TrainingArguments, sharded: bool) -> Path | None:
    """The newest complete `checkpoint-<step>` of `output_dir` below the newest one (which is incomplete)."""
    steps = sorted(
        (int(path.name.rsplit("-", 1)[-1]) for path in output_dir.glob(f"{PREFIX_CHECKPOINT_DIR}-*")
         if path.is_dir() and path.name.rsplit("-", 1)[-1].isdigit()),
        reverse=True,
    )  # fmt: skip
    older = (output_dir / f"{PREFIX_CHECKPOINT_DIR}-{step}" for step in steps[1:])
    return next((path for path in older if _is_complete(path, args, sharded)), None)


def checked_resume_checkpoint(
    resume_from_checkpoint: str | bool | None, args: TrainingArguments, sharded: bool = False
) -> str | None:
    """`Trainer.train`'s `resume_from_checkpoint`, checked ([`check_checkpoint`]) before anything is loaded: `True`
    becomes the newest `checkpoint-<step>` of `args.output_dir` (refused, naming the newest complete one, when it is
    incomplete); a path is returned as it is; None or False stays None."""
    if resume_from_checkpoint is True:
        output_dir = Path(args.output_dir)
        newest = get_last_checkpoint(str(output_dir)) if output_dir.is_dir() else None
        if newest is None:
            raise ValueError(f"resume_from_checkpoint=True but output_dir={str(output_dir)!r} has no checkpoint")
        try:
            check_checkpoint(newest, args, sharded)
        except ValueError as error:
            complete = _newest_complete(output_dir, args, sharded)
            hint = f"; the newest complete one is {str(complete)!r}" if complete else "; no complete one is left"
            raise ValueError(f"{error}{hint}") from None
        return newest
    if resume_from_checkpoint in (None, False):
        return None
    check_checkpoint(resume_from_checkpoint, args, sharded)
    return resume_from_checkpoint


__all__ = ["check_checkpoint", "checked_resume_checkpoint"]
