"""Does the batch norm of the posterior means (BN-VAE) give the same posteriors in evaluation as in training?

A training batch of `CVAETrainer` (one group per device by default) is one prompt's responses: the batch norm
standardises the means *within a group*, and its running statistics average within-group statistics. In evaluation
the running statistics stand in, so a held-out group is no longer centred on its own mean. This script measures, on
held-out one-to-many groups of a saved CVAE, the KL to the prior, the importance-weighted NLL and the NLL of each
response decoded from its own posterior mean and from a sibling's (the same prompt's next response), with the batch norm (a) in eval mode (running statistics, what every
evaluation uses) and (b) normalising each group by its own statistics (what training did with
`posterior_norm_statistics="batch"`), beside the base LM's NLL. With `--prior_samples m` the importance-weighted NLL
is estimated a second time with m of its k samples drawn from the prior (`importance_weighted_nll`'s defensive
mixture), which bounds how much a posterior sharper than the true one can loosen it.

    python experiments/posterior_norm_eval.py runs/replicate/agnews/dg_gskip-seed0/cvae \
        --dataset runs/replicate/agnews/data/test --num_prompts 8 --group_size 8 --iw_samples 16 --prior_samples 8
"""

import argparse
import json

import torch
from datasets import load_from_disk

from cvae_llama.data.collator import OneToManyCollator
from cvae_llama.data.grouping import group_responses
from cvae_llama.evaluation.language_modeling import causal_lm_nll, importance_weighted_nll, response_log_likelihood
from cvae_llama.evaluation.utils import decoder_as_causal_lm
from cvae_llama.latent_statistics import kl_to_prior
from cvae_llama.loading import load_cvae


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model")
    parser.add_argument("--dataset", required=True, help="a one-to-many dataset saved by `cvae-llama sample`")
    parser.add_argument("--num_prompts", type=int, default=8)
    parser.add_argument("--group_size", type=int, default=8)
    parser.add_argument("--iw_samples", type=int, default=16)
    parser.add_argument("--prior_samples", type=int, default=0, help="of the k samples, from the prior (a second IW)")
    parser.add_argument("--max_prompt_tokens", type=int, default=9)
    parser.add_argument("--max_response_tokens", type=int, default=33)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    model, tokenizer = load_cvae(args.model)
    norm = model.encoder.mean_norm
    if norm is None:
        raise SystemExit(f"{args.model} has no posterior batch norm (posterior_batch_norm=False)")
    groups = group_responses(load_from_disk(args.dataset), args.group_size).select(range(args.num_prompts))
    collator = OneToManyCollator(tokenizer, args.max_prompt_tokens, args.max_response_tokens)
    llm = decoder_as_causal_lm(model)
    running = norm.forward  # the module's own (class) forward

    def per_group(latent_mean):  # each call encodes one group: normalise it by its own statistics, as in training
        return torch.nn.functional.batch_norm(latent_mean, None, None, norm.weight, norm.bias, True, 0.0, norm.eps)

    results = {"model": args.model, "running_var_mean": norm.running_var.mean().item(), "iw_samples": args.iw_samples,
               "prior_samples": args.prior_samples}  # fmt: skip
    for name, forward in (("running statistics (eval mode)", running), ("each group's own statistics", per_group)):
        norm.forward = forward
        kl, iw, defensive, own, sibling, base, tokens = [], [], [], [], [], [], []
        generator = torch.Generator().manual_seed(0)
        for group in groups:
            batch = collator([{"prompt": group["prompt"], "responses": group["responses"]}])
            batch = {key: batch[key] for key in ("input_ids", "attention_mask", "labels")}
            with torch.no_grad():
                mean, logvar = model.encode(batch["input_ids"], batch["attention_mask"])
                kl.append(kl_to_prior(mean, logvar).item())
                iw.append(importance_weighted_nll(model, batch, args.iw_samples, generator))
                if args.prior_samples:
                    defensive.append(
                        importance_weighted_nll(model, batch, args.iw_samples, generator, args.prior_samples)
                    )
                own.append(-response_log_likelihood(model, batch, mean))
                sibling.append(-response_log_likelihood(model, batch, mean.roll(1, dims=0)))  # the next response's
                base.append(causal_lm_nll(llm, batch))
                tokens.append((batch["labels"][:, 1:] != -100).sum(-1))
        iw, own, sibling, base, tokens = (torch.cat(values) for values in (iw, own, sibling, base, tokens))
        results[name] = {
            "kl": sum(kl) / len(kl),
            "iw_nll": iw.mean().item(),
            "nll_own_mean": own.mean().item(),
            "nll_sibling_mean": sibling.mean().item(),  # information in the group: this minus nll_own_mean
            "base_nll": base.mean().item(),
            "iw_ppl_over_base": torch.exp((iw.sum() - base.sum()) / tokens.sum()).item(),
        }
        if defensive:
            defensive = torch.cat(defensive)
            results[name].update(
                iw_nll_defensive=defensive.mean().item(),
                iw_ppl_over_base_defensive=torch.exp((defensive.sum() - base.sum()) / tokens.sum()).item(),
            )
    del norm.forward  # back to the class's forward
    print(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
