"""A tiny, seeded CVAE training run that `test_resume.py` kills with SIGKILL and resumes, in a subprocess.

    python tests/resume_train.py --output_dir OUT --max_steps 8 --save_steps 2 [--step_delay 0.5]
                                 [--resume_from_checkpoint OUT/checkpoint-2]

Every flag of [`CVAETrainingArguments`] applies (the defaults below make the run tiny, CPU-only and quiet), plus
`--step_delay`, seconds to sleep after every optimizer step, so that a run can be killed between two checkpoints.
The model, tokenizer and groups are those of `ddp_train.py` (4 groups of 3 responses, hidden 32, latent 8).

At the end it writes, into `--output_dir`: the final model (`model.safetensors`, `Trainer.save_model`),
`samples.safetensors` (token ids sampled with `do_sample=True` from the trained model after `torch.manual_seed`,
prior latents drawn inside `generate`) and `losses.json` (the logged loss of every step, restored ones included).
"""

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch


# the tiny run: every value can be overridden on the command line
DEFAULTS = {
    "per_device_train_batch_size": "1",
    "learning_rate": "5e-3",
    "logging_steps": "1",
    "save_strategy": "steps",
    "report_to": "none",
    "disable_tqdm": "true",
    "use_cpu": "true",
    "seed": "0",
    "dg_samples": "4",
    "max_prompt_tokens": "8",
    "max_response_tokens": "8",
}


@dataclass
class ScriptArguments:
    step_delay: float = field(default=0.0, metadata={"help": "Seconds to sleep after every optimizer step."})


def parse(argv: list[str]):
    from transformers import HfArgumentParser

    from cvae_llama.trainer import CVAETrainingArguments

    given = {argument.split("=")[0] for argument in argv if argument.startswith("--")}
    defaults = [item for key, value in DEFAULTS.items() if f"--{key}" not in given for item in (f"--{key}", value)]
    return HfArgumentParser((CVAETrainingArguments, ScriptArguments)).parse_args_into_dataclasses(defaults + argv)


def main(argv: list[str]) -> None:
    from safetensors.torch import save_file
    from transformers import TrainerCallback

    from cvae_llama.trainer import CVAETrainer
    from ddp_train import build_groups, build_model, build_tokenizer

    torch.set_num_threads(1)  # the same reductions in every run (and fast for a tiny model)
    args, script_args = parse(argv)

    class StepDelay(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            time.sleep(script_args.step_delay)

    tokenizer = build_tokenizer()
    model = build_model(tokenizer)
    trainer = CVAETrainer(
        model,
        args,
        train_dataset=build_groups(),
        processing_class=tokenizer,
        callbacks=[StepDelay()] if script_args.step_delay > 0 else None,
    )
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    output_dir = Path(args.output_dir)
    trainer.save_model(str(output_dir))

    model.eval()
    prompt = tokenizer(["the cat", "stocks fell"], return_tensors="pt", padding=True)
    torch.manual_seed(args.seed)
    samples = model.generate(**prompt, do_sample=True, max_new_tokens=6, num_return_sequences=3)
    save_file({"samples": samples.contiguous()}, str(output_dir / "samples.safetensors"))
    losses = {entry["step"]: entry["loss"] for entry in trainer.state.log_history if "loss" in entry}
    (output_dir / "losses.json").write_text(json.dumps(losses))
    print(f"finished at step {trainer.state.global_step}")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # ddp_train.py beside this script
    main(sys.argv[1:])
