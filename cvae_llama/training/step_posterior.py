"""One posterior pass per optimizer step, for device batches of one row.

The posterior batch norm (BN-VAE) normalises each latent dimension over the training batch; a device batch of one
row has nothing to normalise over. [`StepPosterior`] encodes all the micro-batches of an optimizer step at once, so
the norm sees the step's rows (`per_device_train_batch_size * gradient_accumulation_steps` of them), as one batch
of that size would, while the decoder still runs one micro-batch at a time:

    mu, logvar = encoder(every row of the step)                  # batch norm over the step's rows
    for each micro-batch i:                                       # the decoder's memory of one micro-batch
        loss_i(z_i ~ N(mu_i, exp(logvar_i))).backward()          # stops at leaves holding mu_i, logvar_i
    backward(mu, logvar; the leaves' gradients)                  # once through the encoder: d(sum_i loss_i)/d encoder

which gives the gradient of the one large batch (measured in experiments/README.md, issue 25).
"""

import torch


class StepPosterior:
    """The posterior of every row of one optimizer step, from one encoder pass (see the module docstring).

    Args:
        cvae ([`CVAELlamaForCausalLM`]): the model (unwrapped), in training mode, with the posterior batch norm.
        batches (`list[dict]`): the step's micro-batches, on the model's device; each gets `latent_mean` and
            `latent_logvar` (leaves, no graph) for its rows, which its forward uses instead of encoding.
    """

    def __init__(self, cvae, batches: list[dict]):
        key = "posterior_input_ids" if "posterior_input_ids" in batches[0] else "input_ids"
        mask_key = "posterior_attention_mask" if key == "posterior_input_ids" else "attention_mask"
        input_ids, attention_mask = _left_pad_together(
            [batch[key] for batch in batches], [batch.get(mask_key) for batch in batches]
        )
        norm, training = cvae.encoder.mean_norm, cvae.encoder.mean_norm.training
        if input_ids.shape[0] == 1:  # a step of one row (the end of an epoch): no batch at all
            norm.eval()  # its running statistics, as evaluation uses
        try:
            self.mean, self.logvar = cvae.encode(input_ids, attention_mask)
        finally:
            norm.train(training)
        self.leaf_mean = self.mean.detach().requires_grad_()
        self.leaf_logvar = self.logvar.detach().requires_grad_()
        start = 0
        for batch in batches:
            rows = batch[key].shape[0]
            batch["latent_mean"] = self.leaf_mean[start : start + rows]
            batch["latent_logvar"] = self.leaf_logvar[start : start + rows]
            start += rows
        self.remaining = len(batches)

    def micro_batch_done(self) -> None:
        """Count a micro-batch whose backward has run; after the step's last, backpropagate through the encoder."""
        self.remaining -= 1
        if self.remaining > 0:
            return
        pairs = [
            (output, leaf.grad)
            for output, leaf in ((self.mean, self.leaf_mean), (self.logvar, self.leaf_logvar))
            if leaf.grad is not None and output.requires_grad
        ]
        if pairs:
            torch.autograd.backward([output for output, _ in pairs], [grad for _, grad in pairs])
        self.mean = self.logvar = self.leaf_mean = self.leaf_logvar = None  # free the encoder's graph


def _left_pad_together(input_ids: list[torch.Tensor], masks: list[torch.Tensor | None]):
    """Concatenate `(rows, length)` token ids of several lengths, padding on the left (masked out; the encoder's
    positions count real tokens only, so a row encodes as it does alone)."""
    length = max(ids.shape[1] for ids in input_ids)
    padded_ids, padded_masks = [], []
    for ids, mask in zip(input_ids, masks, strict=True):
        mask = torch.ones_like(ids) if mask is None else mask
        pad = length - ids.shape[1]
        padded_ids.append(torch.nn.functional.pad(ids, (pad, 0), value=int(ids[0, -1])))
        padded_masks.append(torch.nn.functional.pad(mask, (pad, 0), value=0))
    return torch.cat(padded_ids), torch.cat(padded_masks)
