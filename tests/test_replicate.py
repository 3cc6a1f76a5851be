"""`experiments/replicate.py --quick`: the paper-comparison script end to end (sample, train two rows, evaluate,
tables and plots) on a tiny random Llama with SmolLM2's tokenizer and real AG News prompts, so that it cannot rot."""

import json

import pytest
from conftest import load_experiment


@pytest.mark.slow
def test_quick_mode_runs_every_step_and_writes_the_tables(tiny_lm, shared_data, tmp_path):
    replicate = load_experiment("replicate")
    output = tmp_path / "replicate"
    argv = ["--quick", "--output_dir", str(output), "--model_name_or_path", str(tiny_lm), "--data_root",
            str(shared_data), "--jobs", "1"]
    summaries = replicate.main(argv)
    out = output / "agnews"
    rows = summaries["agnews"]["rows"]
    assert set(rows) == {"vanilla", "dg_gskip"}
    for name in rows:
        values = rows[name][0]
        for column, _ in replicate.COLUMNS:
            assert values[column] is not None, (name, column)
        assert values["train s"] > 0 and values["eval s"] > 0
        assert set(k for k in values if k.startswith("ctrl ")) >= {"ctrl mean"}
        record = json.loads((out / f"{name}-seed0" / "cvae" / "cvae_training.json").read_text())
        assert record["training_arguments"]["max_steps"] == replicate.QUICK_BUDGET.max_steps
    # the two rows differ in what they train: their saved configs say so
    configs = {name: json.loads((out / f"{name}-seed0" / "cvae" / "config.json").read_text()) for name in rows}
    assert configs["vanilla"]["skip_connection"] == "none" and configs["dg_gskip"]["skip_connection"] == "gskip"
    summary = (out / "summary.md").read_text()
    assert "| vanilla KL |" in summary and "| DG + G-Skip |" in summary and "| base LM, sampled" in summary
    assert "-m cvae_llama train" in summary
    assert (out / "latent_space_vanilla_vs_dg_gskip.png").stat().st_size > 0
    assert (out / "temperature_sweep.png").stat().st_size > 0

    # a second call finds every step done and runs none of them again
    before = {path: path.stat().st_mtime_ns for path in out.rglob("results.json")}
    replicate.main(argv)
    assert {path: path.stat().st_mtime_ns for path in out.rglob("results.json")} == before


def test_bad_arguments_are_refused(capsys):
    replicate = load_experiment("replicate")
    with pytest.raises(SystemExit):
        replicate.parse_args(["--output_dir", "x", "--rows", "nonsense"])
    assert "invalid choice: 'nonsense'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        replicate.parse_args(["--output_dir", "x", "--jobs", "0"])
    assert "--jobs and --threads must be >= 1, got 0 and 1" in capsys.readouterr().err


@pytest.mark.slow
def test_quick_dailydialog_fine_tunes_then_scores_every_row_against_the_human_responses(tiny_lm, shared_data, tmp_path):
    replicate = load_experiment("replicate")
    output = tmp_path / "replicate"
    argv = ["--quick", "--datasets", "dailydialog", "--seeds", "0", "1", "--output_dir", str(output),
            "--model_name_or_path", str(tiny_lm), "--data_root", str(shared_data), "--jobs", "1"]  # fmt: skip
    runs = replicate.dataset_runs(replicate.DATASETS["dailydialog"], replicate.parse_args(argv), [0], [])
    assert [row.name for row, _ in runs] == ["dg_gskip", "vanilla", "dg", "base_llm", "sft_llm", "free_bits"]
    # the base LLM's row is the fine-tuned LLM's with the base model's path: its commands, without running them
    runner = replicate.Runner(1, dry_run=True)
    setup, budget = replicate.DATASETS["dailydialog"], replicate.QUICK_BUDGET
    replicate.run_dataset(setup, [(replicate.ROWS_BY_NAME["base_llm"], 1)], budget, str(tiny_lm), shared_data,
                          output / "dry", runner, 1)  # fmt: skip
    commands = [command for command in runner.commands if " evaluate " in command]
    assert len(commands) == 2 and all(f"--model_name_or_path {tiny_lm} " in command for command in commands)
    assert all("--seed 1 " in command and f"--base_model {tiny_lm}" not in command for command in commands[:1])
    assert f"--base_model {tiny_lm}" in commands[1] and not (output / "dry").exists()

    argv += ["--rows", "sft_llm", "dg_gskip"]  # the suite's version: one LM row and one CVAE row
    summaries = replicate.main(argv)
    out = output / "dailydialog"
    rows = summaries["dailydialog"]["rows"]
    assert set(rows) == {"sft_llm", "dg_gskip"}
    for name, seeds in rows.items():
        assert set(seeds) == {0, 1}, name
        for seed, values in seeds.items():
            for metric in ("bleu_1", "bleu_2", "distinct_1", "distinct_2", "bertscore_minilm_f1", "fed_style",
                           "base_lm_perplexity"):  # fmt: skip
                assert values[f"dialogue {metric}"] is not None, (name, seed, metric)
            assert values["Self-BLEU-4"] is not None and values["Dist-2"] is not None, (name, seed)
            cvae = not name.endswith("_llm")
            assert (values["MI"] is not None) == cvae and (values["reads z"] is not None) == cvae, name
    # the paper's way: the LLM fine-tuned first, the one-to-many data sampled from it, the CVAEs built on it
    record = json.loads((out / "dg_gskip-seed0" / "cvae" / "cvae_training.json").read_text())
    assert str(out / "sft") in json.dumps(record)
    assert json.loads((out / "data" / "train" / "dataset_info.json").read_text())
    assert "-m cvae_llama sft" in (out / "sft.log").read_text()
    sample_log = (out / "data" / "sample_train.log").read_text().splitlines()[0]
    assert f"--model_name_or_path {out / 'sft'}" in sample_log
    # the LM rows are scored from their own samples, each seed its own; the base LLM judges every row
    sft = [json.loads((out / f"sft_llm-seed{seed}" / "evaluation" / "samples.json").read_text()) for seed in (0, 1)]
    assert sft[0]["diversity"][0]["llm"] != sft[1]["diversity"][0]["llm"]
    for name in ("sft_llm", "dg_gskip"):
        settings = json.loads((out / f"{name}-seed0" / "evaluation_reference" / "results.json").read_text())
        assert settings["settings"]["base_model"] == "given"
    run = out / "dg_gskip-seed0"
    samples = json.loads((run / "evaluation_reference" / "samples.json").read_text())["dialogue"]
    from cvae_llama.data import load_dailydialog

    human = load_dailydialog(shared_data / "dailydialog", split="validation")
    assert samples[0]["reference"] == human[0]["response"]  # scored against DailyDialog's own next turn
    summary = (out / "summary.md").read_text()
    assert "BERTScore F1 (MiniLM-L6, substitute)" in summary and "| DG + G-Skip |" in summary
    assert "the dialogue table over seeds" in summary and "| fine-tuned LLM (SFT), sampled" in summary
    assert "**Context 3**" in summary and "decoder reads z (nats)" in summary
    assert "## wall-clock of the shared steps (s)\n\nsft " in summary

    # interrupted after the fine-tuning and one training: the rerun does only what is missing
    for path in (out / "dg_gskip-seed1").rglob("results.json"):
        path.unlink()
    before = {path: path.stat().st_mtime_ns for path in out.rglob("results.json")}
    sft_weights = (out / "sft" / "model.safetensors").stat().st_mtime_ns
    replicate.main(argv)
    after = {path: path.stat().st_mtime_ns for path in out.rglob("results.json")}
    assert {path: after[path] for path in before} == before
    assert set(after) - set(before) == set((out / "dg_gskip-seed1").rglob("results.json"))
    assert (out / "sft" / "model.safetensors").stat().st_mtime_ns == sft_weights
