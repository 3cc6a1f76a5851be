"""How much does the latent carry? Train a CVAE through `CVAETrainer` and measure, over the steps and at the end on
held-out data, what the posterior holds and what the decoder reads from it (issue 13; results in README.md here).

Two settings, on SmolLM2-135M-Instruct (offline, `cvae_llama.pretrained.smollm2_path`):

- `--data yelp` (auto-encoding, beta = 0): unconditional Yelp sentences (x empty, y one sentence of 6-20 words),
  every sentence its own example. Information = the NLL of a held-out sentence decoded from another sentence's
  posterior mean minus its NLL decoded from its own (nats per sentence; 0 when the decoder ignores z).
- `--data agnews` (one-to-many, the objective's default, DG + G-Skip): groups of the base LM's responses to the first
  8 tokens of AG News validation texts (sampled once into `<output_dir>/agnews_one_to_many`). Information is
  measured inside each held-out group: a response decoded from its own posterior mean against from a sibling's.

Reported at every `--eval_every` steps: information, NLL (own mean, other's mean, z = 0), KL to the prior, MI (over
the held-out set for yelp, at most log 64; in-group I(y; z | x) for agnews, at most log 8), active units (0.01 over
the set; 0.03 in groups), the spread of the posterior means across examples and the mean posterior std; at the end
also the importance-weighted NLL (`--iw_samples`, 8 by default) and its perplexity over the base LM's.

Each evaluation appends a JSON line to `<output_dir>/results.jsonl`; a finished (variant, data, seed) is skipped, so
an interrupted list of variants resumes. A variant is a set of `from_llm` fields, training arguments and research
patches (hypotheses tried on a fresh model before they became options): see `VARIANTS`.

    python experiments/latent_information.py --data yelp --variants defaults v0 --max_steps 150
    python experiments/latent_information.py --data agnews --batch_size 1 --max_steps 300 --eval_every 50
    python experiments/latent_information.py --plot     # information.png: information against steps, per variant
    python experiments/latent_information.py --table    # the finished runs as a markdown table
    python experiments/latent_information.py --quick    # 2 steps of each setting (tests/test_latent_information.py)
"""

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
from datasets import Dataset, load_from_disk
from transformers import AutoTokenizer, TrainerCallback


REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cvae_llama.data import OneToManyCollator  # noqa: E402
from cvae_llama.evaluation import latent as latent_metrics  # noqa: E402
from cvae_llama.evaluation.language_modeling import (  # noqa: E402
    causal_lm_nll,
    importance_weighted_nll,
    response_log_likelihood,
)
from cvae_llama.modeling_cvae_llama import CVAELlamaForCausalLM  # noqa: E402
from cvae_llama.trainer import CVAETrainer, CVAETrainingArguments  # noqa: E402


DATA = REPO.parent / "shared" / "data"
DEFAULT_OUTPUT = REPO / "experiments" / "latent_information"

# variant name -> from_llm keywords ("model"), training arguments ("train") and research patches ("patch", applied to
# the fresh model in order); everything else is the defaults. "v0" is the model as it was before issue 13 (no batch
# norm of the posterior means, the paper's query read-out, memory slots stored at the BOS state's own size); "v1" the
# first fix (batch norm and slots of RMS 1, still the query read-out); "defaults" adds the mean-pooled read-out.
V0 = {"model": {"posterior_batch_norm": False, "posterior_pooling": "queries"}, "patch": ["v0_slots"]}
V1 = {"model": {"posterior_pooling": "queries"}}


def _variant(base: dict, model=None, train=None, patch=()):
    return {"model": {**base.get("model", {}), **(model or {})}, "train": {**base.get("train", {}), **(train or {})},
            "patch": [*base.get("patch", []), *patch]}  # fmt: skip


VARIANTS = {
    "v0": V0,
    "v0+embedding": _variant(V0, model={"latent_injection": "memory+embedding"}),
    "v0+mean_pool": _variant(V0, patch=["mean_pool"]),
    "v0+batch_norm": _variant(V0, patch=["batch_norm"]),
    "v0+unit_slots": _variant(V0, patch=["unit_slots"]),
    "v0+unit_slots+batch_norm": _variant(V0, patch=["unit_slots", "batch_norm"]),
    "v0+kl": _variant(V0, train={"objective": "kl", "kl_weight": 1.0}),
    "v1": V1,
    "v1+mean_pool": _variant(V1, patch=["mean_pool"]),
    # the current defaults (rows recorded before 2026-12-07, issue 38, under this name had the joint memory)
    "defaults": {},
    "defaults+joint": _variant({}, model={"memory_attention": "joint"}),  # the paper's memory, the default before
    "defaults+kl": _variant({}, train={"objective": "kl", "kl_weight": 1.0}),
    "defaults+lr3e-3": _variant({}, train={"learning_rate": 3e-3}),
    "defaults+pretrained_lr1e-4": _variant({}, train={"pretrained_learning_rate": 1e-4}),
    "defaults+pretrained_lr1e-5": _variant({}, train={"pretrained_learning_rate": 1e-5}),
    "defaults+full": _variant({}, model={"decoder_mode": "full"}, train={"pretrained_learning_rate": 1e-5}),
    "defaults+lora": _variant({}, model={"decoder_mode": "lora"}),
    # the encoder's embedding and the memory's key / value projections as frozen copies of the LLM's, as before
    # `share_llm_weights` (issue 37): shared, they follow a decoder that trains
    "defaults+full+copies": _variant({}, model={"decoder_mode": "full", "share_llm_weights": False},
                                     train={"pretrained_learning_rate": 1e-5}),  # fmt: skip
    "defaults+lora+copies": _variant({}, model={"decoder_mode": "lora", "share_llm_weights": False}),
    "defaults+running_mean": _variant({}, model={"posterior_norm_statistics": "running_mean"}),
    # the memory's attention in a softmax of its own, behind a gate per layer and head starting at 0 (issue 27)
    "defaults+gated": _variant({}, model={"memory_attention": "gated", "memory_gate_scale": 1.0}),
    # the gates opened faster (issue 38): stored divided by 10, 30 or 100 (`memory_gate_scale`; these rows were first
    # measured with the same scaling as a patch, before the field existed)
    **{f"defaults+gated+gate_scale{scale}": _variant({}, model={"memory_attention": "gated", "memory_gate_scale": scale})
       for scale in (10, 30, 100)},
    # (1 - g) * the LLM's attention + g * the joint attention, g per layer and head from 0 (issue 38)
    **{f"defaults+blend_scale{scale}": _variant({}, model={"memory_attention": "joint"}, patch=[f"blend_scale{scale}"])
       for scale in (1, 10, 30, 100)},
    # one text per device batch, 16 accumulation steps (issue 25): CVAETrainer encodes each step in one pass
    "defaults+batch1x16": _variant({}, train={"per_device_train_batch_size": 1, "gradient_accumulation_steps": 16}),
}
AUTOENCODER = {"objective": "kl", "kl_weight": 0.0}


# ---------------------------------------------------------------------------------------------------- research patches
# Hypotheses tried on a fresh model before they become options of the model itself (a variant's "patch").
def patch_mean_pool(model):
    """Read-out from the mean of the encoder's last token states (real tokens but the first, which carries the
    massive activations), RMS-normed, instead of the latent queries' states."""
    encoder, config = model.encoder, model.config
    hidden = config.hidden_size
    head = torch.nn.Sequential(torch.nn.Linear(hidden, hidden), torch.nn.SiLU(), torch.nn.Linear(hidden, 2 * config.latent_size))
    torch.nn.init.zeros_(head[-1].weight), torch.nn.init.zeros_(head[-1].bias)
    encoder.pool_head = head
    from cvae_llama.modeling_cvae_llama import LOGVAR_BOUND, create_causal_mask

    def forward(input_ids, attention_mask=None):
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        states = encoder.embed_tokens(input_ids)
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        mask = create_causal_mask(config=config, inputs_embeds=states, attention_mask=attention_mask, cache=None,
                                  position_ids=position_ids)  # fmt: skip
        rotary = encoder.rotary_emb(states, position_ids=position_ids)
        for layer in encoder.layers:
            states = layer(states, attention_mask=mask, position_ids=position_ids, position_embeddings=rotary)
        weights = attention_mask.float() * (position_ids > 0)  # real tokens but the first
        weights = weights / weights.sum(-1, keepdim=True).clamp(min=1)
        pooled = (states * weights[..., None].to(states.dtype)).sum(1)
        mean, logvar = encoder.pool_head(encoder.norm(pooled)).chunk(2, dim=-1)
        if encoder.mean_norm is not None:
            mean = encoder.mean_norm(mean)
        return mean, LOGVAR_BOUND * torch.tanh(logvar / LOGVAR_BOUND)

    encoder.forward = forward


def patch_batch_norm(model):
    """BN-VAE (Zhu et al., 2020): the posterior means batch-normalised (no affine), so that they spread across the
    batch with unit variance per dimension whatever the encoder's scale; running statistics in eval."""
    encoder = model.encoder
    encoder.mean_norm = torch.nn.BatchNorm1d(model.config.latent_size, affine=False)
    forward = encoder.forward

    def normalised(input_ids, attention_mask=None):
        mean, logvar = forward(input_ids, attention_mask)
        return encoder.mean_norm(mean), logvar

    encoder.forward = normalised


def patch_unit_slots(model):
    """Divide each memory layer's output layer (weight and bias) by the RMS of its BOS bias. The slots are RMS-normed
    right after, so the forward is unchanged, but the parameters Adam moves are O(1) instead of O(|BOS state|):
    BOS states reach norm ~300 in deep layers, where a step of lr = 1e-3 per element then moves a slot by 1e-4 of
    its size."""
    with torch.no_grad():
        for memory in model.latent_memory.layers:
            last = memory.to_states[-1]
            rms = last.bias.view(model.config.num_memory_slots, -1).pow(2).mean(-1).sqrt().mean()
            last.weight.div_(rms)
            last.bias.div_(rms)


def patch_v0_slots(model):
    """Undo the RMS scaling of `from_llm`'s slots: each memory output layer at the BOS state's own size (the model
    before issue 13; the forward is the same)."""
    with torch.no_grad():
        for memory, state in zip(model.latent_memory.layers, _bos_states(model)):
            last = memory.to_states[-1]
            rms = state[0, 0].pow(2).mean().sqrt()
            last.weight.mul_(rms)
            last.bias.mul_(rms)


def _bos_states(model):
    bos = torch.tensor([[model.config.bos_token_id or 0]])
    with torch.no_grad():
        return model.model(input_ids=bos, output_hidden_states=True).hidden_states


class _Scaled(torch.nn.Module):
    def __init__(self, scale: float):
        super().__init__()
        self.scale = scale

    def forward(self, stored):
        return self.scale * stored


def patch_blend_scale(scale: float):
    """patch_blend with its gates stored divided by `scale` (as `memory_gate_scale` stores the gated memory's)."""
    from torch.nn.utils import parametrize

    def patch(model):
        patch_blend(model)
        for memory in model.latent_memory.layers:
            parametrize.register_parametrization(memory, "blend", _Scaled(scale))

    return patch


def patch_blend(model):
    """out = (1 - g) * the LLM's attention over the text + g * the joint attention (slots and text in one softmax),
    a gate g per layer and head starting at 0: a fresh CVAE is its LLM, and at g = 1 the memory is the paper's.
    Equivalently `out_text + g * w * (out_memory - out_text)`, w the slots' share of the joint softmax (issue 38)."""
    from transformers import AttentionInterface

    from cvae_llama import modeling_cvae_llama as modeling

    for memory in model.latent_memory.layers:
        memory.blend = torch.nn.Parameter(torch.zeros(model.config.num_attention_heads))
    original = modeling.latent_memory_attention

    def blended(module, query, key, value, attention_mask, latent_memory, **kwargs):
        call = latent_memory
        blend = getattr(call.memory.layers[module.layer_idx], "blend", None)
        if blend is None or (call.states is None and not call.in_cache):
            return original(module, query, key, value, attention_mask, latent_memory, **kwargs)
        if call.in_cache:  # the slots are the cache's first keys and values
            slots = call.memory.layers[module.layer_idx].num_memory_slots
            memory_key, key, memory_value, value = key[:, :, :slots], key[:, :, slots:], value[:, :, :slots], value[:, :, slots:]
            if not call.fill_cache and attention_mask is not None:
                attention_mask = attention_mask[..., slots:]
        else:
            memory_key, memory_value = call.keys_and_values(module)
        attention = modeling.ALL_ATTENTION_FUNCTIONS[call.implementation]
        text, weights = attention(module, query, key, value, attention_mask, **kwargs)
        joint, _ = modeling.joint_memory_attention(attention, module, query, key, value, attention_mask, memory_key,
                                                   memory_value, call.implementation, **kwargs)  # fmt: skip
        gate = blend.to(text.dtype)[:, None]  # (heads, 1) against (batch, query, heads, head_dim)
        return text + gate * (joint.to(text.dtype) - text), weights

    AttentionInterface.register(modeling.LATENT_MEMORY_ATTENTION, blended)


PATCHES = {"v0_slots": patch_v0_slots, "unit_slots": patch_unit_slots,
           "mean_pool": patch_mean_pool, "batch_norm": patch_batch_norm,
           **{f"blend_scale{scale}": patch_blend_scale(scale) for scale in (1, 10, 30, 100)}}


def yelp_rows(num_train: int, num_eval: int):
    lines = (DATA / "yelp" / "sentiment.dev.1").read_text(encoding="utf-8").splitlines()
    sentences = [line.strip() for line in lines if 6 <= len(line.split()) <= 20]
    train, held_out = sentences[:num_train], sentences[-num_eval:]
    as_rows = lambda texts: [{"prompt": "", "responses": [text]} for text in texts]  # noqa: E731
    return as_rows(train), as_rows(held_out)


def agnews_groups(options, model_path, tokenizer, output: Path):
    """One-to-many groups on AG News in the paper's 8 / 32 setting: the base LM's responses to the first 8 tokens of
    validation texts, sampled once into `<output_dir>/agnews_one_to_many` (resumable), then grouped: training
    groups of `--group_size`, held-out groups of `--eval_group_size` from later prompts."""
    from transformers import AutoModelForCausalLM

    from cvae_llama.data import group_responses, load_dataset_by_name, make_one_to_many

    texts = load_dataset_by_name("agnews", DATA / "agnews", split="validation", tokenizer=tokenizer)
    num_prompts = options.num_train_prompts + options.num_eval_prompts
    texts = texts.select(range(num_prompts))
    folder = output / "agnews_one_to_many"
    if (folder / "dataset_info.json").is_file():  # sampled by an earlier run
        flat = load_from_disk(str(folder))
    else:
        flat = make_one_to_many(
            AutoModelForCausalLM.from_pretrained(model_path), tokenizer, texts["prompt"], options.group_size, folder,
            max_new_tokens=32, labels=texts["label"], max_prompt_tokens=8, batch_size=8, seed=0, progress=False,
        )  # fmt: skip
    train = flat.filter(lambda row: row["prompt_id"] < options.num_train_prompts)
    held_out = flat.filter(lambda row: row["prompt_id"] >= options.num_train_prompts)
    train = group_responses(train, options.group_size)
    held_out = group_responses(held_out, options.eval_group_size)
    return [dict(row) for row in train], [dict(row) for row in held_out]


class Evaluation(TrainerCallback):
    """Measure the latent on held-out rows every `every` steps (and at the end) and append to `results`."""

    def __init__(self, model, collator, held_out, every, record):
        self.model, self.collator, self.held_out, self.every, self.record = model, collator, held_out, every, record

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every == 0 or state.global_step == state.max_steps:
            self.record(state.global_step, measure(self.model, self.collator, self.held_out, final=False))


@torch.no_grad()
def measure(model, collator, groups, final: bool, batch_size: int = 32, base_model=None, iw_samples: int = 8) -> dict:
    """The latent's numbers on `groups` (grouped rows); every group of one row is compared with another row."""
    was_training = model.training
    model.eval()
    generator = torch.Generator().manual_seed(0)
    means, logvars, group_ids, nll_own, nll_z0, nll_iw, nll_base, batches = [], [], [], [], [], [], [], []
    for start in range(0, len(groups), batch_size):
        batch = collator(groups[start : start + batch_size])
        mean, logvar = model.encode(batch["input_ids"], batch["attention_mask"])
        means.append(mean.float())
        logvars.append(logvar.float())
        group_ids.append(batch["group_ids"] + start)
        nll_own.append(-response_log_likelihood(model, batch, mean))
        nll_z0.append(-response_log_likelihood(model, batch, torch.zeros_like(mean)))
        if final:
            nll_iw.append(importance_weighted_nll(model, batch, num_samples=iw_samples, generator=generator))
            nll_base.append(causal_lm_nll(base_model, batch))
        batches.append(batch)
    mean, logvar, group_ids = torch.cat(means), torch.cat(logvars), torch.cat(group_ids)
    grouped = bool((torch.bincount(group_ids) > 1).any())
    # the other latent: a sibling's posterior mean (next row of the same group) or, for groups of one, the next row
    other = torch.arange(len(mean)).roll(-1)
    if grouped:
        for group in group_ids.unique():
            rows = (group_ids == group).nonzero().flatten()
            other[rows] = rows.roll(-1)
    nll_other, offset = [], 0
    for batch in batches:
        rows = batch["input_ids"].shape[0]
        nll_other.append(-response_log_likelihood(model, batch, mean[other[offset : offset + rows]]))
        offset += rows
    nll_own, nll_other, nll_z0 = torch.cat(nll_own), torch.cat(nll_other), torch.cat(nll_z0)
    result = {
        "information": (nll_other - nll_own).mean().item(),
        "nll_own": nll_own.mean().item(),
        "nll_other": nll_other.mean().item(),
        "nll_z0": nll_z0.mean().item(),
        "kl": latent_metrics.kl_to_prior(mean, logvar),
        "mean_spread": mean.std(dim=0).mean().item(),
        "posterior_std": logvar.mul(0.5).exp().mean().item(),
    }
    if grouped:
        result["mutual_information"] = latent_metrics.mutual_information(mean, logvar, group_ids, generator=generator)
        result["active_units_0.03"] = latent_metrics.in_group_active_units(mean, group_ids, (0.03,))[0.03]
    else:
        result["mutual_information"] = latent_metrics.mutual_information(mean, logvar, generator=generator)
        result["active_units_0.01"] = latent_metrics.active_units(mean, 0.01)
    if final:
        tokens = sum(int((batch["labels"][:, 1:] != -100).sum()) for batch in batches)
        iw, base = torch.cat(nll_iw).sum().item(), torch.cat(nll_base).sum().item()
        result.update(iw_nll=iw / len(mean), base_nll=base / len(mean), iw_ppl_ratio=math.exp((iw - base) / tokens))
    model.train(was_training)
    return result


def run_variant(name: str, options: argparse.Namespace, model_path, tokenizer, train_rows, held_out, output: Path):
    spec = VARIANTS[name]
    torch.manual_seed(options.seed)
    model = CVAELlamaForCausalLM.from_llm(model_path, **spec.get("model", {}))
    for patch in spec.get("patch", []):
        PATCHES[patch](model)
    training = {
        "output_dir": str(output / "runs" / name),
        "per_device_train_batch_size": options.batch_size,
        "max_steps": options.max_steps,
        "logging_steps": options.eval_every,
        "save_strategy": "no",
        "report_to": [],
        "seed": options.seed,
        "max_prompt_tokens": 8 if options.data == "agnews" else 32,
        "max_response_tokens": 32 if options.data == "agnews" else 64,
        "disable_tqdm": True,
        "use_cpu": True,
        # the optimisation is CVAETrainingArguments' defaults (rows measured before they existed set the same by
        # hand, with a warm-up of 10 steps instead of 10 %)
        **(AUTOENCODER if options.data == "yelp" else {}),
        **spec.get("train", {}),
    }
    args = CVAETrainingArguments(**training)
    collator = OneToManyCollator(tokenizer, args.max_prompt_tokens, args.max_response_tokens)
    results = output / "results.jsonl"
    started = time.time()

    def record(step, metrics):
        row = {"data": options.data, "variant": name, "seed": options.seed, "step": step,
               "seconds": round(time.time() - started, 1), **metrics}  # fmt: skip
        with results.open("a", encoding="utf-8") as file:
            file.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)

    record(0, measure(model, collator, held_out, final=False))
    trainer = CVAETrainer(
        model, args, train_dataset=Dataset.from_list(train_rows), processing_class=tokenizer, data_collator=collator
    )
    trainer.add_callback(Evaluation(trainer.model, collator, held_out, options.eval_every, record))
    trainer.train()
    from transformers import AutoModelForCausalLM

    base_model = AutoModelForCausalLM.from_pretrained(model_path).eval()
    model = trainer.model
    if hasattr(model, "merge_and_unload"):  # decoder_mode "lora": the evaluation takes the merged CVAE
        model = model.merge_and_unload()
    final = measure(model, collator, held_out, final=True, base_model=base_model, iw_samples=options.iw_samples)
    final["iw_samples"] = options.iw_samples
    if options.data == "agnews":
        final.update(control(model, tokenizer, base_model, train_rows, held_out, output / "reports" / name))
    record(options.max_steps, {"final": True, **final})


def control(model, tokenizer, base_model, train_rows, held_out, folder: Path) -> dict:
    """Latent-guided control as `cvae-llama evaluate` measures it (the paper's k = 16, temperature 0.1): a topic probe
    on the base LM trained on the training responses, directions from the first half of the held-out prompts, success
    on the second half; chance is 1 / 4."""
    from cvae_llama.evaluation import evaluation_report

    probe_rows = [{"response": text, "label": row["label"]} for row in train_rows for text in row["responses"]]
    results = evaluation_report(
        model.eval(), Dataset.from_list(held_out), folder, metrics=["control"], tokenizer=tokenizer,
        base_model=base_model, probe_dataset=Dataset.from_list(probe_rows), max_prompt_tokens=8,
        max_response_tokens=32, max_new_tokens=32, control_temperature=0.1,
    )  # fmt: skip
    found = results["control"]
    return {key: found[key] for key in ("mean_success", "mean_win_rate", "probe_held_out_accuracy") if key in found}


def finished(output: Path, data: str, name: str, seed: int, steps: int) -> bool:
    results = output / "results.jsonl"
    if not results.is_file():
        return False
    rows = [json.loads(line) for line in results.read_text(encoding="utf-8").splitlines() if line.strip()]
    key = (data, name, seed, steps)
    return any(r.get("final") and (r["data"], r["variant"], r["seed"], r["step"]) == key for r in rows)


def plot(output: Path) -> Path:
    from cvae_llama.evaluation.plots import pyplot as _pyplot

    plt = _pyplot()
    rows = [json.loads(line) for line in (output / "results.jsonl").read_text(encoding="utf-8").splitlines()]
    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, data in zip(axes, ("yelp", "agnews")):
        ax.set_prop_cycle(color=plt.cm.tab20.colors)
        keys = sorted({(r["variant"], r["seed"]) for r in rows if r["data"] == data})
        for variant, seed in keys:
            points = sorted({(r["step"], r["information"]) for r in rows
                             if (r["data"], r["variant"], r["seed"]) == (data, variant, seed)})  # fmt: skip
            ax.plot(*zip(*points), marker="o", label=f"{variant} (seed {seed})")
        ax.set(title=data, xlabel="optimizer step", ylabel="information (nats / response)")
        if keys:
            ax.legend(fontsize=7)
    path = output / "information.png"
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    return path


def table(output: Path) -> str:
    """A markdown table of every finished run in results.jsonl (its last evaluation), per setting."""
    rows = [json.loads(line) for line in (output / "results.jsonl").read_text(encoding="utf-8").splitlines() if line]
    lines = []
    for data in ("yelp", "agnews"):
        finals = [row for row in rows if row["data"] == data and row.get("final")]
        if not finals:
            continue
        au = "AU 0.01 (of the set)" if data == "yelp" else "AU 0.03 (in groups)"
        lines += [f"\n{data}\n", f"| variant | seed | steps | information | NLL own z | NLL other z | NLL z = 0 | KL | MI | {au} "
                  "| mean spread | posterior std | IW-PPL / base | minutes |", "|" + "---|" * 14]  # fmt: skip
        for row in finals:
            units = row.get("active_units_0.01", row.get("active_units_0.03"))
            lines.append(
                f"| {row['variant']} | {row['seed']} | {row['step']} | **{row['information']:.2f}** | {row['nll_own']:.1f} | "
                f"{row['nll_other']:.1f} | {row['nll_z0']:.1f} | {row['kl']:.1f} | {row['mutual_information']:.2f} | "
                f"{units:g} | {row['mean_spread']:.2f} | {row['posterior_std']:.3f} | "
                f"{row.get('iw_ppl_ratio', float('nan')):.3f} | {row['seconds'] / 60:.0f} |"
            )
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", choices=("yelp", "agnews"), default="yelp")
    parser.add_argument("--variants", nargs="+", default=["defaults"], help=f"among {sorted(VARIANTS)}")
    parser.add_argument("--max_steps", type=int, default=150)
    parser.add_argument("--eval_every", type=int, default=25)
    parser.add_argument("--batch_size", type=int, default=16, help="examples (groups) per step")
    parser.add_argument("--num_train", type=int, default=4000)
    parser.add_argument("--num_eval", type=int, default=64, help="held-out sentences (yelp)")
    parser.add_argument("--num_train_prompts", type=int, default=96, help="agnews: prompts sampled for training")
    parser.add_argument("--num_eval_prompts", type=int, default=16, help="agnews: held-out prompts")
    parser.add_argument("--group_size", type=int, default=16, help="agnews: responses per prompt (a training group)")
    parser.add_argument("--eval_group_size", type=int, default=8, help="agnews: responses per held-out group")
    parser.add_argument("--iw_samples", type=int, default=8, help="importance samples of the final IW-NLL")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output_dir", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--plot", action="store_true", help="only draw information.png from results.jsonl")
    parser.add_argument("--table", action="store_true", help="only print the finished runs as a markdown table")
    parser.add_argument("--quick", action="store_true", help="2 steps of each setting on a few examples (a smoke test)")
    options = parser.parse_args(argv)
    options.output_dir.mkdir(parents=True, exist_ok=True)
    if options.plot or options.table:
        print(plot(options.output_dir) if options.plot else table(options.output_dir))
        return
    unknown = sorted(set(options.variants) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; expected among {sorted(VARIANTS)}")
    torch.set_num_threads(options.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if options.quick:
        quick = dict(variants=["defaults"], max_steps=2, eval_every=1, num_train=32, num_eval=8, num_train_prompts=2,
                     num_eval_prompts=2, group_size=4, eval_group_size=4)  # fmt: skip
        for data, batch_size in (("yelp", 4), ("agnews", 1)):
            run(argparse.Namespace(**{**vars(options), **quick, "data": data, "batch_size": batch_size}))
        print(plot(options.output_dir))
        return
    run(options)


def run(options: argparse.Namespace) -> None:
    """Every variant of `options.variants` on `options.data`, skipping those already in results.jsonl."""
    from cvae_llama.pretrained import smollm2_path

    model_path = smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if options.data == "yelp":
        train_rows, held_out = yelp_rows(options.num_train, options.num_eval)
    else:
        train_rows, held_out = agnews_groups(options, model_path, tokenizer, options.output_dir)
    for name in options.variants:
        if finished(options.output_dir, options.data, name, options.seed, options.max_steps):
            print(f"{name} (seed {options.seed}, {options.max_steps} steps): already in results.jsonl")
            continue
        run_variant(name, options, model_path, tokenizer, train_rows, held_out, options.output_dir)

if __name__ == "__main__":
    main()
