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
def test_quick_dailydialog_scores_against_the_human_responses(tiny_lm, shared_data, tmp_path):
    replicate = load_experiment("replicate")
    output = tmp_path / "replicate"
    summaries = replicate.main(["--quick", "--datasets", "dailydialog", "--output_dir", str(output),
                                "--model_name_or_path", str(tiny_lm), "--data_root", str(shared_data), "--jobs", "1"])
    values = summaries["dailydialog"]["rows"]["dg_gskip"][0]  # the dataset's one row
    assert set(summaries["dailydialog"]["rows"]) == {"dg_gskip"}
    for metric in ("bleu_1", "bertscore_minilm_f1", "fed_style"):
        assert values[f"dialogue {metric}"] is not None, metric
    run = output / "dailydialog" / "dg_gskip-seed0"
    samples = json.loads((run / "evaluation_reference" / "samples.json").read_text())["dialogue"]
    from cvae_llama.data import load_dailydialog

    human = load_dailydialog(shared_data / "dailydialog", split="validation")
    assert samples[0]["reference"] == human[0]["response"]  # scored against DailyDialog's own next turn
    summary = (output / "dailydialog" / "summary.md").read_text()
    assert "BERTScore F1 (MiniLM-L6, substitute)" in summary and "| DG + G-Skip |" in summary
