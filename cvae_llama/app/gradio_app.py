"""The latent explorer's web page, a Gradio app over the library calls of `cvae_llama.latent_space` (`cvae-llama
explore`): [`build_app`] lays out the tabs for one saved CVAE (one function per tab), [`launch_app`] loads the model
and serves the page.

Tabs: encode (the reconstruction and the posterior per dimension), prior samples, interpolation, direction /
transfer (latent arithmetic along a label direction or the difference of two sets of example texts) and a 2-D
projection of a file's posterior means. Every handler turns a failure into a `gr.Error`, which the page shows as a
message while the server goes on serving; one model answers one request at a time (a shared concurrency group).
"""

import functools
import os
from dataclasses import dataclass, field
from typing import Any

import gradio as gr
import pandas as pd
from matplotlib.figure import Figure

from .. import latent_space
from ..data.budgets import DEFAULT_MAX_PROMPT_TOKENS, DEFAULT_MAX_RESPONSE_TOKENS
from ..latent_io import read_directions
from ..loading import load_cvae, load_rows
from ..validation import check_positive_int


# The texts of a file the projection tab encodes at most by default.
DEFAULT_MAX_PROJECTED_TEXTS = 500
# Direction sources of the transfer tab.
FROM_EXAMPLES, FROM_FILE = "example texts", "direction file"
# The transfer tab's example (one click fills it): sentiment transfer by latent arithmetic, positive minus negative
# restaurant reviews (lower-cased and tokenised as the Yelp sentences of experiments/sentiment_transfer.py, which
# measures it: the share reaching the other sentiment grows with k, 0.39 at k = 0 to 0.73 at k = 2).
SENTIMENT_EXAMPLE = {
    "texts_a": ["the food was delicious and the staff were friendly .", "great service and a lovely atmosphere .",
                "i love this place , we will be back !", "the best pizza in town ."],
    "texts_b": ["the food was cold and the service was slow .", "terrible service , we waited an hour .",
                "i will never come back to this place .", "the worst pizza i have ever had ."],
    "texts": ["the waiter was rude and the soup was bland .", "the room was dirty and nobody cared ."],
    "strength": 2.0,
}  # fmt: skip
# Every handler that runs the model joins this group, which runs one job at a time.
MODEL_CONCURRENCY_ID = "model"
# The progress bar a handler gets as its `progress` default (Gradio keeps each event's state in its own context, so
# one instance serves every handler); it follows the library's tqdm bars (encoding and decoding batches) too.
PROGRESS = gr.Progress(track_tqdm=True)


def _shows_errors(handler):
    """Run `handler`; a failure becomes a `gr.Error` carrying its one-line message (shown in the page)."""

    @functools.wraps(handler)  # Gradio reads the signature (the `gr.Progress` default) through __wrapped__
    def run(*args, **kwargs):
        try:
            return handler(*args, **kwargs)
        except gr.Error:
            raise
        except Exception as error:
            message = " ".join(str(error).split()) or type(error).__name__
            if not isinstance(error, ValueError):
                message = f"{type(error).__name__}: {message}"
            raise gr.Error(message, print_exception=False) from error

    return run


def _lines(text: str | None, name: str) -> list[str]:
    """The non-blank lines of a text box, or `ValueError` naming the box when it has none."""
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"{name} is empty; expected one text per line")
    return lines


def _integer(value, name: str, minimum: int | None = 1) -> int:
    """A whole number from a Gradio number or slider (which may hand over `3.0`)."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if minimum is None:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name} must be an integer, got {name}={value!r}")
        return value
    return check_positive_int(value, name, minimum)


def posterior_figure(mean, std) -> Figure:
    """The posterior per latent dimension: its mean with error bars of one standard deviation, over the prior's
    one-standard-deviation band. A `matplotlib.figure.Figure` outside pyplot (nothing kept after it is drawn)."""
    figure = Figure(figsize=(8, 3.2))
    axis = figure.subplots()
    dimensions = list(range(len(mean)))
    axis.axhspan(-1.0, 1.0, color="0.92", label="prior N(0, 1): mean ± 1 std")
    axis.errorbar(dimensions, mean.tolist(), yerr=std.tolist(), fmt="o", capsize=3, label="posterior: mean ± std")
    axis.axhline(0.0, color="0.6", linewidth=0.8)
    axis.set_xlabel("latent dimension")
    axis.set_ylabel("z")
    axis.set_xticks(dimensions if len(dimensions) <= 32 else dimensions[:: len(dimensions) // 16])
    axis.legend(fontsize=8, loc="lower left", bbox_to_anchor=(0.0, 1.0), ncol=2, frameon=False)  # above the axes
    axis.grid(alpha=0.3)
    figure.tight_layout()
    return figure


@dataclass
class _Page:
    """What the tabs of one page share: the CVAE and its tokenizer, the text budgets (`read`) and the inputs above the
    tabs (the prompt and the new-token budget)."""

    model: Any
    tokenizer: Any
    read: dict
    prompt: Any
    max_new_tokens: Any
    # every handler that runs the model: one job at a time
    listen: dict = field(default_factory=lambda: {"concurrency_limit": 1, "concurrency_id": MODEL_CONCURRENCY_ID})


def _encode_tab(page: _Page):
    """The Encode tab: a text's reconstruction and its posterior per dimension. Returns the function that connects
    its button (called once every tab is laid out)."""
    model, tokenizer, read = page.model, page.tokenizer, page.read

    @_shows_errors
    def encode(text, prompt, max_new_tokens, progress=PROGRESS):
        progress(0.1, desc="Encoding")
        mean, std = latent_space.posterior(model, tokenizer, text, prompt, **read)
        progress(0.4, desc="Decoding the posterior mean")
        result = latent_space.reconstruct(model, tokenizer, [text], prompt, _integer(max_new_tokens, "max_new_tokens"),
                                          **read)  # fmt: skip
        scores = (
            f"Reconstruction: BLEU-4 {result['bleu_4']:.1f}, ROUGE-L {result['rouge_l']:.2f} to the text. Posterior: "
            f"mean |mean| {mean.abs().mean():.2f}, mean std {std.mean():.2f} (the prior's: 0 and 1)."
        )
        table = [[dimension, round(m, 4), round(s, 4)] for dimension, (m, s) in
                 enumerate(zip(mean.tolist(), std.tolist(), strict=True))]  # fmt: skip
        return result["reconstructions"][0], scores, posterior_figure(mean, std), table

    with gr.Tab("Encode"):
        with gr.Row():
            with gr.Column():
                text = gr.Textbox(label="Text y", lines=3)
                encode_button = gr.Button("Encode", variant="primary", elem_id="explore-encode-button")
            with gr.Column():
                reconstruction = gr.Textbox(label="Reconstruction (greedy from the posterior mean)", lines=3)
                scores = gr.Markdown()
        figure = gr.Plot(label="Posterior q(z | x, y) per dimension")
        with gr.Accordion("Posterior per dimension (table)", open=False):
            dimensions = gr.Dataframe(headers=["dimension", "mean", "std"], show_label=False)

    def connect():
        outputs = [reconstruction, scores, figure, dimensions]
        encode_button.click(encode, [text, page.prompt, page.max_new_tokens], outputs, api_name="encode",
                            **page.listen)  # fmt: skip

    return connect


def _prior_samples_tab(page: _Page):
    """The Prior samples tab: latents z ~ N(0, T^2 I) decoded side by side. Returns the function that connects it."""

    @_shows_errors
    def prior_samples(prompt, seed, temperature, num_samples, max_new_tokens, progress=PROGRESS):
        progress(0.1, desc="Decoding prior samples")
        result = latent_space.sample_prior(
            page.model,
            page.tokenizer,
            prompt,
            num_samples=_integer(num_samples, "num_samples"),
            seed=_integer(seed, "seed", minimum=None),
            temperature=temperature,
            max_new_tokens=_integer(max_new_tokens, "max_new_tokens"),
            max_prompt_tokens=page.read["max_prompt_tokens"],
        )
        norms = result["latents"].norm(dim=-1).tolist()
        return [[index + 1, round(norm, 2), text] for index, (norm, text) in
                enumerate(zip(norms, result["texts"], strict=True))]  # fmt: skip

    with gr.Tab("Prior samples"):
        with gr.Row():
            seed = gr.Number(value=0, precision=0, label="Seed")
            temperature = gr.Slider(0, 2, value=1.0, step=0.05, label="Latent temperature T: z ~ N(0, T² I)")
            num_samples = gr.Slider(1, 8, value=latent_space.DEFAULT_NUM_SAMPLES, step=1, label="Samples")
        sample_button = gr.Button("Sample", variant="primary")
        samples = gr.Dataframe(headers=["sample", "|z|", "text"], label="One continuation per latent",
                               wrap=True)  # fmt: skip

    def connect():
        sample_button.click(prior_samples, [page.prompt, seed, temperature, num_samples, page.max_new_tokens], samples,
                            api_name="sample_prior", **page.listen)  # fmt: skip

    return connect


def _interpolation_tab(page: _Page):
    """The Interpolation tab: the greedy texts along z = (1 - t) z_A + t z_B, and the text at a chosen t. Returns the
    function that connects it."""

    @_shows_errors
    def interpolation(text_a, text_b, steps, prompt, max_new_tokens, progress=PROGRESS):
        progress(0.1, desc="Decoding the path")
        path = latent_space.interpolate(page.model, page.tokenizer, text_a, text_b,
                                        _integer(steps, "steps", minimum=2), prompt,
                                        _integer(max_new_tokens, "max_new_tokens"), **page.read)  # fmt: skip
        table = [[t, text, round(to_a, 3), round(to_b, 3)] for t, text, to_a, to_b in
                 zip(path["t"], path["texts"], path["rouge_l_to_a"], path["rouge_l_to_b"], strict=True)]  # fmt: skip
        return table, path, path["texts"][0]

    @_shows_errors
    def text_at(t, path):
        if not path:
            raise ValueError("no interpolation yet; press Interpolate first")
        nearest = min(range(len(path["t"])), key=lambda index: abs(path["t"][index] - float(t)))
        return path["texts"][nearest]

    with gr.Tab("Interpolation"):
        with gr.Row():
            text_a = gr.Textbox(label="Text A", lines=2)
            text_b = gr.Textbox(label="Text B", lines=2)
        steps = gr.Slider(2, 21, value=latent_space.DEFAULT_INTERPOLATION_STEPS, step=1, label="Steps")
        interpolate_button = gr.Button("Interpolate", variant="primary")
        t = gr.Slider(0, 1, value=0, step=0.05, label="t: z = (1 - t) z_A + t z_B")
        at_t = gr.Textbox(label="Text at t (the nearest step)")
        path_table = gr.Dataframe(headers=["t", "text", "ROUGE-L to A", "ROUGE-L to B"], wrap=True,
                                  label="The whole path")  # fmt: skip
        path = gr.State(None)

    def connect():
        interpolate_button.click(interpolation, [text_a, text_b, steps, page.prompt, page.max_new_tokens],
                                 [path_table, path, at_t], api_name="interpolate", **page.listen)  # fmt: skip
        t.change(text_at, [t, path], at_t, api_name="text_at_t")

    return connect


def _transfer_handlers(page: _Page, directions):
    """The handlers of the Direction / transfer tab: the labels of a direction file, and the transfer itself."""
    model, tokenizer, read = page.model, page.tokenizer, page.read

    def file_directions(direction_file):
        if direction_file is not None:
            return read_directions(str(direction_file), model.config.latent_size, "direction file")
        if directions is None:
            raise ValueError("no direction file: upload one (results.json of `cvae-llama evaluate --metrics control`, "
                             "or a .pt / .safetensors tensor), or start the app with --directions")  # fmt: skip
        return directions

    @_shows_errors
    def direction_labels(direction_file):
        _, names = file_directions(direction_file)
        return gr.Dropdown(choices=names, value=names[0])

    @_shows_errors
    def transfer(source, texts_a, texts_b, direction_file, label, strength, texts, prompt, max_new_tokens,
                 progress=PROGRESS):  # fmt: skip
        progress(0.1, desc="Building the direction")
        if source == FROM_EXAMPLES:
            direction = latent_space.latent_direction(model, tokenizer, _lines(texts_a, "texts A"),
                                                      _lines(texts_b, "texts B"), prompt, **read)  # fmt: skip
            origin = "mean posterior mean of texts A minus that of texts B"
        elif source == FROM_FILE:
            label_directions, names = file_directions(direction_file)
            direction = latent_space.select_direction(label_directions, names,
                                                      names[0] if label in (None, "") else label)  # fmt: skip
            origin = f"label {label or names[0]!r} of the direction file"
        else:
            raise ValueError(f"direction source {source!r} is not one of {[FROM_EXAMPLES, FROM_FILE]}")
        progress(0.4, desc="Moving the texts")
        sources = _lines(texts, "texts to move")
        result = latent_space.transfer(model, tokenizer, sources, direction, strength, prompt,
                                       _integer(max_new_tokens, "max_new_tokens"), **read)  # fmt: skip
        info = f"Direction: {origin}, norm {direction.norm():.3f}; z + {result['strength']:g} * direction."
        return [[text, moved] for text, moved in zip(sources, result["texts"], strict=True)], info

    return direction_labels, transfer


def _transfer_tab(page: _Page, directions):
    """The Direction / transfer tab: texts moved along a direction, from two sets of example texts or a label of a
    direction file (`directions` until one is uploaded). Returns the function that connects it."""
    direction_labels, transfer = _transfer_handlers(page, directions)
    with gr.Tab("Direction / transfer"):
        source = gr.Radio([FROM_EXAMPLES, FROM_FILE], value=FROM_FILE if directions else FROM_EXAMPLES,
                          label="Direction from")  # fmt: skip
        with gr.Row():
            texts_a = gr.Textbox(label="Texts A, one per line (where to go)", lines=4)
            texts_b = gr.Textbox(label="Texts B, one per line (where from)", lines=4)
        with gr.Row():
            direction_file = gr.File(
                label="Direction file (results.json of evaluate --metrics control, .pt or .safetensors)",
                file_types=[".json", ".pt", ".safetensors"],
            )
            names = directions[1] if directions else []
            label = gr.Dropdown(choices=names, value=names[0] if names else None, allow_custom_value=True,
                                label="Label")  # fmt: skip
        strength = gr.Slider(
            -32, 32, value=1.0, step=0.25,
            label="Strength k: z + k * direction (k = 1 moves by the distance between the two sets' means; "
            "the paper's label directions: 16)",
        )  # fmt: skip
        texts = gr.Textbox(label="Texts to move, one per line", lines=4)
        example = [SENTIMENT_EXAMPLE[key] for key in ("texts_a", "texts_b", "texts")]
        examples = [[FROM_EXAMPLES, *map("\n".join, example), SENTIMENT_EXAMPLE["strength"], None]]
        if directions:  # the same texts moved along the launch file's first label
            examples.append([FROM_FILE, "", "", examples[0][3], SENTIMENT_EXAMPLE["strength"], names[0]])
        gr.Examples(examples, [source, texts_a, texts_b, texts, strength, label],
                    label="Example: sentiment transfer (texts A positive reviews, B negative)")  # fmt: skip
        transfer_button = gr.Button("Transfer", variant="primary")
        transfer_info = gr.Markdown()
        transferred = gr.Dataframe(headers=["text", "moved"], wrap=True, label="Texts and their moved versions")

    def connect():
        direction_file.upload(direction_labels, direction_file, label, api_name="direction_labels")
        transfer_button.click(transfer, [source, texts_a, texts_b, direction_file, label, strength, texts, page.prompt,
                                         page.max_new_tokens], [transferred, transfer_info], api_name="transfer",
                              **page.listen)  # fmt: skip

    return connect


def _projection_tab(page: _Page):
    """The 2-D projection tab: the posterior means of a file's texts on their first two principal components. Returns
    the function that connects it."""

    @_shows_errors
    def projection(texts_file, max_texts, progress=PROGRESS):
        if texts_file is None:
            raise ValueError("no texts file: upload a .txt (one text per line) or a .jsonl / .json / .csv / .parquet "
                             "with a response (or text) column and an optional label column")  # fmt: skip
        rows, _ = load_rows(str(texts_file), page.tokenizer, argument="texts file")
        rows = rows.select(range(min(len(rows), _integer(max_texts, "max_texts"))))
        labels = [str(label) for label in rows["label"]] if "label" in rows.column_names else None
        prompts = [prompt or "" for prompt in rows["prompt"]] if "prompt" in rows.column_names else ""
        progress(0.1, desc=f"Encoding {len(rows)} texts")
        result = latent_space.project_2d(page.model, page.tokenizer, rows["response"], labels, prompts, **page.read)
        frame = pd.DataFrame({"PC 1": result["x"], "PC 2": result["y"], "label": labels or ["all"] * len(rows),
                              "text": rows["response"]})  # fmt: skip
        first, second = result["explained_variance_ratio"]
        info = (f"{len(rows)} texts; PC 1 explains {100 * first:.1f} % of the posterior means' variance, PC 2 "
                f"{100 * second:.1f} %.")  # fmt: skip
        return frame, info

    with gr.Tab("2-D projection"):
        texts_file = gr.File(label="Texts: .txt (one per line) or .jsonl / .json / .csv / .parquet with a "
                             "response (or text) column and an optional label column")  # fmt: skip
        max_texts = gr.Number(value=DEFAULT_MAX_PROJECTED_TEXTS, precision=0, label="Texts at most")
        project_button = gr.Button("Project", variant="primary")
        projection_info = gr.Markdown()
        scatter = gr.ScatterPlot(x="PC 1", y="PC 2", color="label", tooltip=["label", "text"], height=480,
                                 label="Posterior means on their first two principal components")  # fmt: skip

    def connect():
        project_button.click(projection, [texts_file, max_texts], [scatter, projection_info], api_name="project",
                             **page.listen)  # fmt: skip

    return connect


def build_app(model, tokenizer, directions=None, budgets: dict | None = None, title: str = "CVAE latent explorer"):
    """The explorer's page (`gr.Blocks`) for a loaded CVAE.

    Args:
        model ([`CVAELlamaForCausalLM`]), tokenizer: the CVAE (in eval mode) and its tokenizer.
        directions (*optional*): `(label_directions, label_names)` as `cvae_llama.latent_io.read_directions`
            gives them: the transfer tab's direction file until one is uploaded.
        budgets (`dict`, *optional*): `max_prompt_tokens` and `max_response_tokens`, the longest texts the page
            takes (default: the package's; [`launch_app`] reads the model's training record, `text_budgets`).
        title (`str`): the page's title.

    Returns:
        `gr.Blocks`, to `launch()`.
    """
    # the longest prompts and texts the page reads
    read = {"max_prompt_tokens": DEFAULT_MAX_PROMPT_TOKENS, "max_response_tokens": DEFAULT_MAX_RESPONSE_TOKENS,
            **(budgets or {})}  # fmt: skip
    with gr.Blocks(title=title, analytics_enabled=False) as app:
        gr.Markdown(
            f"# {title}\n`{model.name_or_path}`: a {model.config.base_model_type} decoder with a latent of "
            f"{model.config.latent_size} dimensions. Texts up to {read['max_response_tokens']} tokens, prompts up to "
            f"{read['max_prompt_tokens']}; every decoding is greedy, so the latent alone decides the text."
        )
        with gr.Row():
            prompt = gr.Textbox(label="Prompt x (the condition; empty: unconditional)", scale=4)
            max_new_tokens = gr.Slider(1, 128, value=32, step=1, label="New tokens at most", scale=1)
        page = _Page(model, tokenizer, read, prompt, max_new_tokens)
        with gr.Tabs():
            connections = [_encode_tab(page), _prior_samples_tab(page), _interpolation_tab(page),
                           _transfer_tab(page, directions), _projection_tab(page)]  # fmt: skip
        for connect in connections:  # the events after the whole layout, in the order of the tabs
            connect()
    return app


def launch_app(
    model_name_or_path: str | os.PathLike,
    directions: str | None = None,
    host: str = "127.0.0.1",
    port: int | None = None,
    block: bool = True,
    argument: str = "model_name_or_path",
    **load_kwargs,
):
    """Load a saved CVAE and serve its explorer page (`cvae-llama explore`).

    Args:
        model_name_or_path: a CVAE folder (or Hub repo id); its training record gives the text budgets.
        directions (`str`, *optional*): label directions for the transfer tab: the `results.json` of
            `cvae-llama evaluate --metrics control`, or a `(num_labels, latent_size)` `.pt` / `.safetensors` file.
        host, port: where to serve (port `None`: Gradio's first free port from 7860).
        block (`bool`, defaults to `True`): serve until interrupted; `False` returns at once, the server running in
            a thread (`app.close()` stops it).
        argument (`str`): how messages name `model_name_or_path` (the command line passes its flag).
        load_kwargs: `from_pretrained` keywords (`dtype`, `attn_implementation`).

    Returns:
        The running `gr.Blocks`; its `local_url` is the page's address.
    """
    model, tokenizer = load_cvae(model_name_or_path, argument, **load_kwargs)
    label_directions = None
    if directions is not None:
        label_directions = read_directions(directions, model.config.latent_size, "--directions" if
                                           argument.startswith("--") else "directions")  # fmt: skip
    budgets = latent_space.text_budgets(model_name_or_path)
    app = build_app(model, tokenizer, label_directions, budgets)
    app.launch(server_name=host, server_port=port, prevent_thread_lock=not block, ssr_mode=False, quiet=not block)
    return app


__all__ = ["DEFAULT_MAX_PROJECTED_TEXTS", "SENTIMENT_EXAMPLE", "build_app", "launch_app", "posterior_figure"]
