"""The latent explorer on a tiny saved CVAE: each library call of `cvae_llama.latent_space` on its own and its
bad-input errors; the Gradio page (`cvae_llama.app`) started on 127.0.0.1 and driven through `gradio_client`, every
operation and a bad input that returns an error while the server goes on serving; the command line (`cvae-llama
explore`); and the page rendered by headless Chromium (skipped where no Chromium is installed)."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from test_remote_code import saved_tiny_model

from cvae_llama import latent_space
from cvae_llama.cli import main
from cvae_llama.evaluation.generation import posterior_of_texts
from cvae_llama.evaluation.utils import generate_texts
from cvae_llama.export import write_training_record
from cvae_llama.loading import load_cvae


os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

# the budgets of the tiny CVAE's training record: short enough that a text over them is easy to write
BUDGETS = {"max_prompt_tokens": 6, "max_response_tokens": 12}
NEW_TOKENS = 6
TEXTS_A = ["w5 w6 w7", "w6 w7 w8", "w5 w7 w9"]
TEXTS_B = ["w60 w61 w62", "w61 w62 w63"]
TOO_LONG = " ".join(f"w{10 + i}" for i in range(13))  # 13 tokens, one over max_response_tokens
CHROMIUM = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """A tiny CVAE with a non-trivial posterior and a latent memory strong enough that different latents write
    different greedy texts, saved with its tokenizer and a training record of `BUDGETS`."""
    folder = tmp_path_factory.mktemp("explore") / "cvae"
    model = saved_tiny_model(folder)
    with torch.no_grad():
        for layer in model.latent_memory.layers:
            layer.to_states[-1].weight.mul_(50.0)
    model.save_pretrained(folder)
    write_training_record(folder, {"training_arguments": BUDGETS})
    return folder


@pytest.fixture(scope="module")
def loaded(folder):
    return load_cvae(folder)


@pytest.fixture(scope="module")
def directions_file(folder) -> Path:
    """A `results.json` as `cvae-llama evaluate --metrics control` writes it: two unit label directions."""
    torch.manual_seed(1)
    directions = torch.nn.functional.normalize(torch.randn(2, 8), dim=-1)
    path = folder.parent / "results.json"
    path.write_text(json.dumps({"settings": {}, "control": {"labels": [0, 1], "label_names": ["neg", "pos"],
                                                            "directions": directions.tolist()}}))  # fmt: skip
    return path


def call(operation, loaded, *args, **kwargs):
    """An operation of `latent_space` on the tiny CVAE with its budgets (and few new tokens where it decodes)."""
    model, tokenizer = loaded
    if operation in (latent_space.reconstruct, latent_space.interpolate, latent_space.transfer, latent_space.sample_prior):
        kwargs.setdefault("max_new_tokens", NEW_TOKENS)
    if operation is not latent_space.sample_prior:
        kwargs.setdefault("max_response_tokens", BUDGETS["max_response_tokens"])
    kwargs.setdefault("max_prompt_tokens", BUDGETS["max_prompt_tokens"])
    return operation(model, tokenizer, *args, **kwargs)


def decode(loaded, latents: torch.Tensor) -> list[str]:
    """Greedy decodings of `latents` without a prompt, as every operation decodes."""
    model, tokenizer = loaded
    return generate_texts(model, tokenizer, [""] * len(latents), latents, max_new_tokens=NEW_TOKENS,
                          max_prompt_tokens=BUDGETS["max_prompt_tokens"])  # fmt: skip


def posterior_means(loaded, texts) -> torch.Tensor:
    model, tokenizer = loaded
    return posterior_of_texts(model, tokenizer, [""] * len(texts), texts, **BUDGETS)[0]


# ---------------------------------------------------------------------------------------------------- library
def test_text_budgets_are_the_training_record_s(folder, tmp_path):
    assert latent_space.text_budgets(folder) == BUDGETS
    assert latent_space.text_budgets(tmp_path) == {"max_prompt_tokens": 64, "max_response_tokens": 64}  # no record


def test_posterior_is_the_training_tokenisation_s_mean_and_std(loaded):
    model, tokenizer = loaded
    mean, std = call(latent_space.posterior, loaded, "w5 w6 w7")
    expected_mean, expected_logvar = posterior_of_texts(model, tokenizer, [""], ["w5 w6 w7"], **BUDGETS)
    assert mean.shape == std.shape == (8,)
    torch.testing.assert_close(mean, expected_mean[0])
    torch.testing.assert_close(std, (0.5 * expected_logvar[0]).exp())
    other, _ = call(latent_space.posterior, loaded, "w60 w61")
    assert not torch.allclose(mean, other)  # a posterior of the text, not a constant


def test_reconstruct_decodes_the_posterior_mean(loaded):
    result = call(latent_space.reconstruct, loaded, TEXTS_A[:2])
    assert result["reconstructions"] == decode(loaded, posterior_means(loaded, TEXTS_A[:2]))
    assert 0 <= result["bleu_4"] <= 100 and 0 <= result["rouge_l"] <= 1


def test_sample_prior_is_seeded_and_scaled_by_the_temperature(loaded):
    first = call(latent_space.sample_prior, loaded, num_samples=3, seed=7, temperature=0.5)
    again = call(latent_space.sample_prior, loaded, num_samples=3, seed=7, temperature=0.5)
    torch.testing.assert_close(first["latents"], 0.5 * torch.randn(3, 8, generator=torch.Generator().manual_seed(7)))
    assert first["texts"] == again["texts"] == decode(loaded, first["latents"])
    assert len(set(first["texts"])) > 1  # different latents, different texts
    other = call(latent_space.sample_prior, loaded, num_samples=3, seed=8, temperature=0.5)
    assert not torch.allclose(first["latents"], other["latents"])
    cold = call(latent_space.sample_prior, loaded, num_samples=2, seed=7, temperature=0.0)
    assert cold["latents"].abs().max() == 0 and cold["texts"][0] == cold["texts"][1]


def test_interpolate_runs_from_one_reconstruction_to_the_other(loaded):
    path = call(latent_space.interpolate, loaded, TEXTS_A[0], TEXTS_B[0], steps=5)
    assert path["t"] == [0.0, 0.25, 0.5, 0.75, 1.0] and len(path["texts"]) == 5
    ends = call(latent_space.reconstruct, loaded, [TEXTS_A[0], TEXTS_B[0]])["reconstructions"]
    assert [path["texts"][0], path["texts"][-1]] == ends


def test_latent_direction_is_the_difference_of_the_mean_posterior_means(loaded):
    direction = call(latent_space.latent_direction, loaded, TEXTS_A, TEXTS_B)
    expected = posterior_means(loaded, TEXTS_A).mean(0) - posterior_means(loaded, TEXTS_B).mean(0)
    assert direction.shape == (8,)
    torch.testing.assert_close(direction, expected)


def test_transfer_moves_the_posterior_means_along_the_direction(loaded):
    direction = call(latent_space.latent_direction, loaded, TEXTS_A, TEXTS_B)
    result = call(latent_space.transfer, loaded, TEXTS_B, direction, strength=1.0)
    # strength 1 moves the mean of texts B onto the mean of texts A: latent arithmetic
    torch.testing.assert_close(result["latents"].mean(0), posterior_means(loaded, TEXTS_A).mean(0))
    assert result["texts"] == decode(loaded, result["latents"])
    stronger = call(latent_space.transfer, loaded, TEXTS_B, direction.tolist(), strength=-2.5)  # a list works too
    torch.testing.assert_close(stronger["latents"], posterior_means(loaded, TEXTS_B) - 2.5 * direction)
    unmoved = call(latent_space.transfer, loaded, TEXTS_B, direction, strength=0.0)
    assert unmoved["texts"] == call(latent_space.reconstruct, loaded, TEXTS_B)["reconstructions"]


def test_project_2d_gives_the_principal_components_of_the_posterior_means(loaded):
    texts = TEXTS_A + TEXTS_B
    result = call(latent_space.project_2d, loaded, texts, labels=["a"] * 3 + ["b"] * 2, batch_size=2)  # 3 batches
    coordinates = torch.tensor([result["x"], result["y"]], dtype=torch.float64).T
    torch.testing.assert_close(result["latent_means"], posterior_means(loaded, texts))
    torch.testing.assert_close(coordinates.mean(0), torch.zeros(2, dtype=torch.float64))  # centred
    assert coordinates[:, 0].var() >= coordinates[:, 1].var() > 0  # the first component carries the most
    assert result["labels"] == ["a"] * 3 + ["b"] * 2
    first, second = result["explained_variance_ratio"]
    assert 0 < second <= first and first + second <= 1 + 1e-9
    assert call(latent_space.project_2d, loaded, texts)["labels"] is None


def test_select_direction_by_label_name_or_index():
    directions = torch.eye(3)
    torch.testing.assert_close(latent_space.select_direction(directions, ["neg", "neu", "pos"], "pos"), directions[2])
    torch.testing.assert_close(latent_space.select_direction(directions, ["neg", "neu", "pos"], 1), directions[1])


def test_saved_directions_are_read_back_with_their_labels(tmp_path):
    """`save_directions` (what experiments/sentiment_transfer.py --save writes) and `read_directions` (what
    `--directions` reads) round-trip; a label count or a suffix that does not fit is refused, naming it."""
    from cvae_llama.latent_io import read_directions, save_directions

    directions = torch.randn(2, 8)
    path = save_directions(tmp_path / "sentiment_direction.json", directions, ["positive", "negative"])
    read, names = read_directions(str(path), 8)
    torch.testing.assert_close(read, directions)
    assert names == ["positive", "negative"]
    torch.testing.assert_close(latent_space.select_direction(read, names, "negative"), directions[1])
    with pytest.raises(ValueError, match=r"shape \(2, 8\) and 1 labels \['positive'\]: expected .* one label per row"):
        save_directions(tmp_path / "d.json", directions, ["positive"])
    with pytest.raises(ValueError, match=r"path '.*d.pt' has suffix '.pt'; expected .json"):
        save_directions(tmp_path / "d.pt", directions, ["positive", "negative"])
    with pytest.raises(ValueError, match=r"directions of shape \(2, 8\) but the model expects \(num_labels, 4\)"):
        read_directions(str(path), 4)


@pytest.mark.parametrize(
    ("operation", "args", "kwargs", "message"),
    [
        (latent_space.posterior, (TOO_LONG,), {},
         r"text 'w10 w11 .*' has 13 tokens but the model takes at most 12 \(max_response_tokens\)"),
        (latent_space.reconstruct, (["w5", TOO_LONG],), {}, r"texts\[1\] .* has 13 tokens but the model takes at most 12"),
        (latent_space.posterior, ("w5",), {"prompt": "w5 w6 w7 w8 w9 w10 w11"},
         r"prompt 'w5 w6 w7 w8 w9 w10 w11' has 7 tokens but the model takes at most 6 \(max_prompt_tokens\)"),
        (latent_space.posterior, ("  ",), {}, r"text is empty; expected a text to encode"),
        (latent_space.posterior, (["w5"],), {}, r"text must be a string, got list"),
        (latent_space.interpolate, ("w5", TOO_LONG), {}, r"text_b .* has 13 tokens"),
        (latent_space.latent_direction, (["w5"], []), {}, r"texts_b has 0 text\(s\) but at least 1 are needed"),
        (latent_space.transfer, (["w5"], torch.zeros(5)), {},
         r"direction has shape \(5,\) but the model expects \(8,\), one number per latent dimension"),
        (latent_space.transfer, (["w5"], torch.zeros(2, 8)), {}, r"direction has shape \(2, 8\) but the model expects"),
        (latent_space.transfer, (["w5"], [float("nan")] * 8), {}, r"direction contains NaN or inf"),
        (latent_space.transfer, (["w5"], torch.zeros(8)), {"strength": float("inf")},
         r"strength must be a finite number, got strength=inf"),
        (latent_space.sample_prior, (), {"num_samples": 0}, r"num_samples must be an integer >= 1, got num_samples=0"),
        (latent_space.sample_prior, (), {"temperature": -1.0}, r"latent_temperature must be a finite number >= 0"),
        (latent_space.project_2d, (["w5"],), {}, r"texts has 1 text\(s\) but at least 2 are needed"),
        (latent_space.project_2d, (["w5", "w6"],), {"labels": [0]}, r"labels has 1 entries but texts has 2"),
        (latent_space.project_2d, (["w5", "w6"],), {"prompts": ["w5", "w5 w6 w7 w8 w9 w10 w11"]},
         r"prompts\[1\] 'w5 w6 w7 w8 w9 w10 w11' has 7 tokens but the model takes at most 6"),
    ],
)  # fmt: skip
def test_bad_input_names_the_argument_the_value_and_what_is_expected(loaded, operation, args, kwargs, message):
    with pytest.raises(ValueError, match=message):
        call(operation, loaded, *args, **kwargs)


def test_an_unknown_label_lists_the_labels():
    with pytest.raises(ValueError, match=r"label 'happy' is not one of the labels \['neg', 'pos'\] of the directions"):
        latent_space.select_direction(torch.eye(2), ["neg", "pos"], "happy")
    assert latent_space.label_index(["neg", "pos"], "pos") == 1 and latent_space.label_index(["neg", "pos"], 0) == 0
    with pytest.raises(ValueError, match=r"--control_label '2' is not one of the labels \['neg', 'pos'\] of --dir"):
        latent_space.label_index(["neg", "pos"], "2", "--control_label", "--directions")


def test_the_app_package_re_exports_the_latent_space_calls():
    """`from cvae_llama.app import transfer` (the path of earlier versions) gives the library call itself."""
    import cvae_llama.app

    for name in cvae_llama.app.__all__:
        assert getattr(cvae_llama.app, name) is getattr(latent_space, name), name


# ---------------------------------------------------------------------------------------------------- the page
def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def served(folder, directions_file):
    """The explorer of the tiny CVAE served on 127.0.0.1 with the label directions, and a client of it."""
    pytest.importorskip("gradio")
    from gradio_client import Client

    from cvae_llama.app.gradio_app import launch_app

    app = launch_app(folder, directions=str(directions_file), host="127.0.0.1", port=free_port(), block=False)
    try:
        yield app, Client(app.local_url, verbose=False, analytics_enabled=False, download_files=False)
    finally:
        app.close()


def rows(table: dict) -> list[list]:
    return table["data"]


def test_the_page_drives_every_operation(served, loaded, directions_file, tmp_path):
    from gradio_client import handle_file

    _, client = served
    reconstruction, scores, plot, dimensions = client.predict(TEXTS_A[0], "", NEW_TOKENS, api_name="/encode")
    assert reconstruction == call(latent_space.reconstruct, loaded, [TEXTS_A[0]])["reconstructions"][0]
    mean, std = call(latent_space.posterior, loaded, TEXTS_A[0])
    assert [row[0] for row in rows(dimensions)] == list(range(8))
    torch.testing.assert_close(torch.tensor([row[1:] for row in rows(dimensions)]), torch.stack([mean, std], 1),
                               atol=1e-4, rtol=0)  # fmt: skip
    assert "BLEU-4" in scores and plot["type"] == "matplotlib" and plot["plot"].startswith("data:image/")

    samples = client.predict("", 3, 0.7, 3, NEW_TOKENS, api_name="/sample_prior")
    assert [row[2] for row in rows(samples)] == call(latent_space.sample_prior, loaded, num_samples=3, seed=3,
                                                     temperature=0.7)["texts"]  # fmt: skip

    table, at_start = client.predict(TEXTS_A[0], TEXTS_B[0], 5, "", NEW_TOKENS, api_name="/interpolate")
    path = call(latent_space.interpolate, loaded, TEXTS_A[0], TEXTS_B[0], steps=5)
    assert [row[:2] for row in rows(table)] == [[t, text] for t, text in zip(path["t"], path["texts"], strict=True)]
    assert at_start == path["texts"][0]
    assert client.predict(0.8, api_name="/text_at_t") == path["texts"][3]  # the nearest step, t = 0.75

    moved, info = client.predict("example texts", "\n".join(TEXTS_A), "\n".join(TEXTS_B), None, None, 1.0,
                                 "\n".join(TEXTS_B), "", NEW_TOKENS, api_name="/transfer")  # fmt: skip
    direction = call(latent_space.latent_direction, loaded, TEXTS_A, TEXTS_B)
    expected = call(latent_space.transfer, loaded, TEXTS_B, direction, strength=1.0)["texts"]
    assert rows(moved) == [[text, out] for text, out in zip(TEXTS_B, expected, strict=True)]
    assert f"norm {direction.norm():.3f}" in info

    # a label direction of the file given at launch, then of an uploaded file
    label_directions = torch.tensor(json.loads(directions_file.read_text())["control"]["directions"])
    expected = call(latent_space.transfer, loaded, TEXTS_B, label_directions[1], strength=16.0)["texts"]
    moved, _ = client.predict("direction file", "", "", None, "1", 16.0, "\n".join(TEXTS_B), "", NEW_TOKENS,
                              api_name="/transfer")  # fmt: skip
    assert [row[1] for row in rows(moved)] == expected
    labels = client.predict(handle_file(str(directions_file)), api_name="/direction_labels")  # the dropdown's update
    assert labels["choices"] == [["0", "0"], ["1", "1"]] and labels["value"] == "0"
    moved, _ = client.predict("direction file", "", "", handle_file(str(directions_file)), "1", 16.0,
                              "\n".join(TEXTS_B), "", NEW_TOKENS, api_name="/transfer")  # fmt: skip
    assert [row[1] for row in rows(moved)] == expected

    texts_file = tmp_path / "texts.jsonl"
    texts_file.write_text("".join(json.dumps({"text": text, "label": label}) + "\n"
                                  for text, label in zip(TEXTS_A + TEXTS_B, "aaabb", strict=True)))  # fmt: skip
    scatter, info = client.predict(handle_file(str(texts_file)), 4, api_name="/project")
    projection = call(latent_space.project_2d, loaded, (TEXTS_A + TEXTS_B)[:4], labels=list("aaab"))
    assert [row[2:] for row in scatter["data"]] == [[label, text] for label, text in
                                                    zip("aaab", (TEXTS_A + TEXTS_B)[:4], strict=True)]  # fmt: skip
    torch.testing.assert_close(torch.tensor([row[:2] for row in scatter["data"]], dtype=torch.float64),
                               torch.tensor([projection["x"], projection["y"]], dtype=torch.float64).T)  # fmt: skip
    assert info.startswith("4 texts; PC 1 explains")


def test_the_transfer_tab_s_example_is_sentiment_transfer_and_runs(served, loaded):
    """The tab's examples (one click fills the inputs): the sentiment sets of `SENTIMENT_EXAMPLE`, then the same texts
    along the launch file's first label; each row, sent as the page sends it, gives what the library gives."""
    from cvae_llama.app.gradio_app import FROM_EXAMPLES, FROM_FILE, SENTIMENT_EXAMPLE

    app, client = served
    (examples,) = [c["props"] for c in app.config["components"] if c.get("type") == "dataset"]
    positive, negative, texts = ("\n".join(SENTIMENT_EXAMPLE[key]) for key in ("texts_a", "texts_b", "texts"))
    assert examples["samples"] == [[FROM_EXAMPLES, positive, negative, texts, 2.0, None],
                                   [FROM_FILE, "", "", texts, 2.0, "0"]]  # fmt: skip
    assert "sentiment transfer" in examples["label"]
    moved, _ = client.predict(FROM_EXAMPLES, positive, negative, None, None, 2.0, texts, "", NEW_TOKENS,
                              api_name="/transfer")  # fmt: skip
    direction = call(latent_space.latent_direction, loaded, SENTIMENT_EXAMPLE["texts_a"], SENTIMENT_EXAMPLE["texts_b"])
    expected = call(latent_space.transfer, loaded, SENTIMENT_EXAMPLE["texts"], direction, strength=2.0)["texts"]
    assert [row[1] for row in rows(moved)] == expected


def test_bad_input_shows_an_error_and_the_server_goes_on(served, loaded, folder, tmp_path):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    _, client = served
    with pytest.raises(AppError, match=r"has 13 tokens but the model takes at most 12 \(max_response_tokens\)"):
        client.predict(TOO_LONG, "", NEW_TOKENS, api_name="/encode")
    wrong_size = tmp_path / "directions.pt"
    torch.save(torch.zeros(2, 5), wrong_size)
    with pytest.raises(AppError, match=r"has directions of shape \(2, 5\) but the model expects \(num_labels, 8\)"):
        client.predict("direction file", "", "", handle_file(str(wrong_size)), "0", 1.0, "w5", "", NEW_TOKENS,
                       api_name="/transfer")  # fmt: skip
    with pytest.raises(AppError, match=r"texts B is empty; expected one text per line"):
        client.predict("example texts", "w5", "", None, None, 1.0, "w5", "", NEW_TOKENS, api_name="/transfer")
    with pytest.raises(AppError, match=r"no texts file"):
        client.predict(None, 10, api_name="/project")
    reconstruction, *_ = client.predict(TEXTS_A[0], "", NEW_TOKENS, api_name="/encode")  # still serving
    assert reconstruction == call(latent_space.reconstruct, loaded, [TEXTS_A[0]])["reconstructions"][0]


def test_launching_on_a_bad_folder_or_directions_raises(folder, tmp_path):
    pytest.importorskip("gradio")
    from cvae_llama.app.gradio_app import launch_app

    with pytest.raises(ValueError, match=r"model_name_or_path '.*missing' does not exist"):
        launch_app(tmp_path / "missing", block=False)
    wrong_size = tmp_path / "directions.pt"
    torch.save(torch.zeros(3, 5), wrong_size)
    with pytest.raises(ValueError, match=r"directions .* has directions of shape \(3, 5\) but the model expects"):
        launch_app(folder, directions=str(wrong_size), block=False)


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary installed (CI installs Debian's chromium)")
def test_headless_chromium_renders_the_page(served, tmp_path):
    app, _ = served
    dumped = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=15000", "--dump-dom", app.local_url],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert dumped.returncode == 0, dumped.stderr[-2000:]
    dom = dumped.stdout
    # the served HTML holds only the app's config; these elements exist once its scripts have rendered the page
    assert 'id="explore-encode-button"' in dom
    for tab in ("Encode", "Prior samples", "Interpolation", "Direction / transfer", "2-D projection"):
        assert f">{tab}</button>" in dom, tab


# ---------------------------------------------------------------------------------------------------- command line
def test_explore_command_help_and_errors(capsys, tmp_path):
    assert main(["explore", "--help"]) == 0
    out = capsys.readouterr().out
    for flag in ("--model_name_or_path", "--directions", "--host", "--port"):
        assert flag in out, flag
    assert main(["explore", "--model_name_or_path", str(tmp_path / "missing")]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert f"cvae-llama explore: error: --model_name_or_path '{tmp_path / 'missing'}' does not exist" in err


def test_explore_command_serves_the_page(folder, directions_file):
    pytest.importorskip("gradio")
    port = free_port()
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    server = subprocess.Popen(
        [sys.executable, "-m", "cvae_llama", "explore", "--model_name_or_path", str(folder), "--directions",
         str(directions_file), "--port", str(port)],
        env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        deadline, config = time.monotonic() + 90, None
        while config is None and time.monotonic() < deadline and server.poll() is None:
            try:
                config = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/config", timeout=5))
            except OSError:
                time.sleep(0.5)
        assert config is not None, server.stdout.read() if server.poll() is not None else "no page within 90 s"
        assert config["title"] == "CVAE latent explorer"
        named = [dependency["api_name"] for dependency in config["dependencies"]]
        assert [name for name in named if name != "load_example"] == [
            "encode", "sample_prior", "interpolate", "text_at_t", "direction_labels", "transfer", "project"
        ]  # fmt: skip
        assert named.count("load_example") == 1  # the transfer tab's examples (gr.Examples), filled in the browser
        (label,) = [component for component in config["components"] if component["props"].get("label") == "Label"]
        assert label["props"]["choices"] == [["0", "0"], ["1", "1"]]  # the labels of --directions
    finally:
        server.terminate()
        server.wait(timeout=30)
