"""Probes of a fresh CVAE around SmolLM2-135M-Instruct, behind the diagnosis in experiments/README.md (issue 13):

1. how much the decoder's NLL moves with z at initialisation (z = 0 against prior samples of scale 1 and 3);
2. how much the encoder's read-out features differ from one sentence to another (mean pairwise cosine of the
   RMS-normed features: the query states of the paper's read-out, the mean of the token states but the first);
3. the attention the real tokens pay to the memory slots, per decoder layer, and the norm of the slots' values.

    python experiments/latent_probes.py      # one thread, about a minute
"""

import sys
from pathlib import Path

import torch


REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import cvae_llama.modeling_cvae_llama as modeling  # noqa: E402
from cvae_llama.data import OneToManyCollator  # noqa: E402
from cvae_llama.evaluation.language_modeling import response_log_likelihood  # noqa: E402
from cvae_llama.pretrained import smollm2_path  # noqa: E402


def mean_cosine(features: torch.Tensor) -> float:
    normed = torch.nn.functional.normalize(features.float().flatten(1), dim=-1)
    similarity, count = normed @ normed.T, len(normed)
    return ((similarity.sum() - count) / (count * count - count)).item()


@torch.no_grad()
def main():
    from transformers import AutoTokenizer

    torch.set_num_threads(1)
    path = smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    lines = (REPO.parent / "shared" / "data" / "yelp" / "sentiment.dev.1").read_text(encoding="utf-8").splitlines()
    sentences = [line.strip() for line in lines if 6 <= len(line.split()) <= 20][-32:]
    batch = OneToManyCollator(tokenizer, 0, 64)([{"prompt": "", "responses": [text]} for text in sentences])

    print("1. decoder NLL of 32 Yelp sentences (nats / sentence) at initialisation, by the scale of z")
    for pooling in ("queries", "mean"):
        model = modeling.CVAELlamaForCausalLM.from_llm(path, posterior_pooling=pooling, attn_implementation="eager")
        if pooling == "queries":
            for scale in (0, 1, 3):
                latent = torch.randn(32, 32, generator=torch.Generator().manual_seed(0)) * scale
                print(f"   scale {scale}: {-response_log_likelihood(model, batch, latent).mean().item():.2f}")

        # 2. the read-out's features: run the encoder up to its norm
        captured = []
        hook = model.encoder.norm.register_forward_hook(lambda module, args, output, into=captured: into.append(output))
        model.encode(batch["input_ids"], batch["attention_mask"])
        hook.remove()
        print(f"2. read-out '{pooling}': mean pairwise cosine of the normed features {mean_cosine(captured[0]):.3f}")

    print("3. per decoder layer: attention of real tokens on the 4 slots, |value| of the slots and of real tokens")
    original, rows = modeling.eager_attention_forward, []

    def spy(module, query, key, value, attention_mask, **kwargs):
        output, weights = original(module, query, key, value, attention_mask, **kwargs)
        if weights.shape[-1] > batch["input_ids"].shape[1]:  # the decoder's layers (with the slots in front)
            real = batch["attention_mask"].bool()
            on_slots = weights[..., :4].sum(-1).mean(1)[real].mean().item()
            norms = value.norm(dim=-1)
            rows.append((on_slots, norms[..., :4].mean().item(), norms[..., 4:].mean().item()))
        return output, weights

    modeling.eager_attention_forward = spy
    try:
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], latent=torch.zeros(32, 32))
    finally:
        modeling.eager_attention_forward = original
    for layer, (on_slots, slot_norm, real_norm) in enumerate(rows):
        if layer % 3 == 0:
            print(f"   layer {layer:2d}: attention on slots {on_slots:.2f}, |v| slots {slot_norm:.2f}, real {real_norm:.2f}")


if __name__ == "__main__":
    main()
