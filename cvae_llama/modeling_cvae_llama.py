"""CVAE-Llama: a decoder-only LLM (Llama, Mistral, Qwen2 / Qwen2.5, Qwen3) turned into a conditional VAE (Zhang et
al., "Latent Variable Modeling for Controllable and Diverse Generation From Large Language Models", IEEE TAI 2026).

Read top to bottom, as transformers' `modeling_llama.py`: the output dataclasses, the building blocks (the posterior
encoder q(z | x, y) built from the LLM's first layers, the per-layer latent memory through which z reaches every
decoder layer, the gradient-only skip connection, G-Skip), the pretrained base, the base model (the decoder run with
the latent memory, returning hidden states) and the causal LM on top of it (logits, then the loss terms).

The decoder is transformers' own model class of the LLM's architecture (`LlamaModel`, `MistralModel`, `Qwen2Model`,
`Qwen3Model`: `DECODER_ARCHITECTURES`), unchanged: the memory enters through one attention function registered with
transformers' `AttentionInterface`, which receives it as a keyword argument, so it survives gradient checkpointing and
needs no copy of the architecture's code.

This file travels to a Hub repo as remote code: it imports only torch, transformers, the standard library and
`configuration_cvae_llama.py` (and peft, only for the LoRA layers of an adapter folder that holds some). It opens no
file and no connection itself: an adapter folder's base LLM is loaded, and its stored weights read, by transformers.
"""

import copy
import hashlib
import math
from dataclasses import dataclass

import torch
import transformers
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface, load_state_dict, safe_open
from transformers.models.llama.modeling_llama import LlamaRMSNorm, rotate_half
from transformers.processing_utils import Unpack
from transformers.utils import ModelOutput, TransformersKwargs, cached_file, can_return_tuple, logging
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.hub import get_checkpoint_shard_files

from .configuration_cvae_llama import BASE_CONFIG_CLASSES, CVAE_FIELDS, CVAELlamaConfig


logger = logging.get_logger(__name__)

# Log-variances are soft-bounded to (-LOGVAR_BOUND, LOGVAR_BOUND) so that exp() can neither overflow nor vanish.
LOGVAR_BOUND = 10.0
# The attention implementations the latent memory wraps, and the name its attention function is registered under.
SUPPORTED_ATTENTION = ("eager", "sdpa")
LATENT_MEMORY_ATTENTION = "cvae_latent_memory"
# The names of the decoder's parameters (the LLM's, which an adapter folder leaves out).
DECODER_PREFIXES = ("model.", "lm_head.")
# `from_pretrained`'s arguments that say where the folder's files are, and those of them that apply to its base LLM.
ADAPTER_HUB_ARGUMENTS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder", "proxies")
BASE_HUB_ARGUMENTS = ("cache_dir", "force_download", "local_files_only", "token", "proxies")
# In `from_llm`, the latent-dependent part of each memory slot starts at this fraction of the slot's constant part.
LATENT_SHARE_AT_INIT = 0.1


@dataclass(frozen=True)
class DecoderArchitecture:
    """transformers' own classes of a decoder architecture that a CVAE wraps: the LLM (`causal_lm`), the decoder
    (`model`), the layers the encoder copies (`decoder_layer`), the attention whose key / value projections (and key
    norm, Qwen3's) the memory copies, the rotary embedding, and the eager attention the memory's attention wraps."""

    causal_lm: type
    model: type
    decoder_layer: type
    attention: type
    rotary_embedding: type
    eager_attention: object

    @classmethod
    def of(cls, model_type: str, config_class: type) -> "DecoderArchitecture":
        """The classes of `transformers.models.<model_type>`, named after its config class (`LlamaConfig` ->
        `LlamaForCausalLM`, `LlamaModel`, ...)."""
        module = getattr(getattr(transformers.models, model_type), f"modeling_{model_type}")
        prefix = config_class.__name__.removesuffix("Config")
        suffixes = ("ForCausalLM", "Model", "DecoderLayer", "Attention", "RotaryEmbedding")
        return cls(*(getattr(module, prefix + suffix) for suffix in suffixes), module.eager_attention_forward)


# By `config.base_model_type` (the wrapped LLM's `model_type`; Qwen2.5 checkpoints are "qwen2"): one entry per
# supported config in `BASE_CONFIG_CLASSES`, the one table of supported architectures.
DECODER_ARCHITECTURES = {name: DecoderArchitecture.of(name, config) for name, config in BASE_CONFIG_CLASSES.items()}


def sliding_layers(config: CVAELlamaConfig) -> list[bool]:
    """Which decoder layers attend through a sliding window: Qwen's `layer_types`, or Mistral's `sliding_window`
    (every layer), as their models decide; Llama has none."""
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return [layer_type == "sliding_attention" for layer_type in layer_types]
    return [getattr(config, "sliding_window", None) is not None] * config.num_hidden_layers


@dataclass
class CVAELlamaModelOutput(ModelOutput):
    """
    Output of [`CVAELlamaModel`]: the decoder's hidden states given a latent, and where the latent came from.

    Args:
        last_hidden_state (`torch.FloatTensor` of shape `(batch, sequence_length, hidden_size)`):
            The decoder's final hidden states (with the skip connection's contribution).
        latent (`torch.FloatTensor` of shape `(batch, latent_size)`):
            The latent the decoder was conditioned on.
        latent_mean, latent_logvar (`torch.FloatTensor` of shape `(batch, latent_size)`, *optional*):
            The posterior's mean and log-variance, when the posterior was used.
        cache (`Cache`, *optional*):
            The decoder's key/value cache. A dynamic cache starts with the `num_memory_slots` memory slots (written by
            the first call that receives it empty), then the real tokens.
        hidden_states, attentions (`tuple(torch.FloatTensor)`, *optional*):
            As for `LlamaModel` (attention maps include the memory slots as first columns).
    """

    last_hidden_state: torch.FloatTensor | None = None
    latent: torch.FloatTensor | None = None
    latent_mean: torch.FloatTensor | None = None
    latent_logvar: torch.FloatTensor | None = None
    cache: Cache | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class CVAELlamaOutput(ModelOutput):
    """
    Output of [`CVAELlamaForCausalLM`].

    Args:
        loss (`torch.FloatTensor` of shape `()`, *optional*, returned when `labels` is given):
            `reconstruction_loss + kl_loss` (the negative ELBO per token and per sequence); `reconstruction_loss`
            alone when the latent did not come from the posterior. The losses are float32, whatever the model's dtype.
        logits (`torch.FloatTensor` of shape `(batch, sequence_length, vocab_size)`):
            Next-token scores of the decoder.
        reconstruction_loss (`torch.FloatTensor` of shape `()`, *optional*):
            Token-level negative log-likelihood of the labelled tokens given the latent.
        kl_loss (`torch.FloatTensor` of shape `()`, *optional*):
            KL(q(z | x, y) || N(0, I)) summed over latent dimensions and averaged over the batch; present when the
            latent was drawn from the posterior.
        latent (`torch.FloatTensor` of shape `(batch, latent_size)`):
            The latent the decoder was conditioned on.
        latent_mean, latent_logvar (`torch.FloatTensor` of shape `(batch, latent_size)`, *optional*):
            The posterior's mean and log-variance, when the posterior was used.
        cache (`Cache`, *optional*):
            The decoder's key/value cache. A dynamic cache starts with the `num_memory_slots` memory slots (written by
            the first call that receives it empty), then the real tokens.
        hidden_states, attentions (`tuple(torch.FloatTensor)`, *optional*):
            As for `LlamaForCausalLM`, for the decoder (attention maps include the memory slots as first columns).
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    reconstruction_loss: torch.FloatTensor | None = None
    kl_loss: torch.FloatTensor | None = None
    latent: torch.FloatTensor | None = None
    latent_mean: torch.FloatTensor | None = None
    latent_logvar: torch.FloatTensor | None = None
    cache: Cache | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


# ------------------------------------------------------------------------------------------------- the latent's math
def reparameterize(latent_mean: torch.Tensor, latent_logvar: torch.Tensor, num_samples: int | None = None):
    """z = mu + sigma * eps, eps ~ N(0, I): `(batch, d)`, or `(num_samples, batch, d)` when `num_samples` is given."""
    shape = latent_mean.shape if num_samples is None else (num_samples, *latent_mean.shape)
    noise = torch.randn(shape, dtype=latent_mean.dtype, device=latent_mean.device)
    return latent_mean + torch.exp(0.5 * latent_logvar) * noise


def gaussian_kl(latent_mean: torch.Tensor, latent_logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, sigma^2) || N(0, 1)) per dimension, `(batch, d)`: 0.5 * (mu^2 + sigma^2 - log sigma^2 - 1)."""
    return 0.5 * (latent_mean.pow(2) + latent_logvar.exp() - latent_logvar - 1.0)


class ZeroInitLinear(nn.Linear):
    """A linear layer that [`CVAELlamaPreTrainedModel`] initialises to zero (weight and bias).

    The last layer of the posterior read-out (a new model's posterior is exactly N(0, I)) and of the embedding
    injection (which starts as a no-op, so that a new model is the LLM it wraps).
    """


# ------------------------------------------------------------------------------------------ the posterior encoder
class CVAELlamaPosteriorNorm(nn.BatchNorm1d):
    """Batch normalisation of the posterior means, `(batch, latent_size)` (BN-VAE, Zhu et al., 2020). Evaluation uses
    the running statistics; `statistics` says what training normalises with (a training batch is often one prompt's
    group):

    - `"running_mean"`: centred on the running mean, scaled by the batch's own spread, mu_hat = (mu - mu_run) /
      sigma_B. Every batch (group) spreads with unit variance, and its offset from the running mean reaches the
      objective (and the gradient) as it does in evaluation, where the running mean of the batches' variances
      stands in for sigma_B. The offset's gradient is not invariant to the scale of the means (it grows as sigma_B
      shrinks), so on a fixed batch the gradient norm does not fall.
    - `"running"`: the running statistics of every mean seen (the mixture of the batches, between-batch spread
      included), as evaluation does, with batch norm's gradient (batch renormalisation, Ioffe, 2017):

          mu_hat = (mu - mu_B) / sigma_B * r + d,   r = sg(sigma_B / sigma),   d = sg((mu_B - mu_run) / sigma)

      which equals (mu - mu_run) / sigma in value (`sg`: no gradient).
    - `"batch"` (the default): plain batch norm, the batch's own mean and variance. With one group per batch, the
      running statistics are then within-group ones, and evaluation divides a held-out group's offset by them.

    With `"running_mean"` and `"running"` the running statistics are updated with the batch before it is normalised
    (its weight 1 / batches seen, `momentum` at least), so the first batch uses its own statistics.

    A training batch of one row has no spread to normalise by and is refused: its running statistics, which no
    batch of one row updates, would make the norm the identity and the latent dead. Pooling a step's micro-batches'
    statistics without their gradient does not work either (measured, issue 25 in experiments/README.md): batch
    norm's gradient removes the part of the encoder's gradient common to the batch, which otherwise dominates.
    `CVAETrainer` encodes the micro-batches of an optimizer step together instead, and passes each its rows'
    posterior (`forward`'s `latent_mean`, `latent_logvar`).
    """

    def __init__(self, num_features: int, statistics: str = "batch"):
        super().__init__(num_features)
        self.statistics = statistics

    def forward(self, latent_mean: torch.Tensor) -> torch.Tensor:
        if self.training and latent_mean.shape[0] == 1:
            raise ValueError(
                "posterior_batch_norm=True normalises each latent dimension over the training batch, but this batch "
                "has 1 row (per_device_train_batch_size=1 on data of one text per example?): its running statistics "
                "would make the norm the identity and the latent would not train. Train with CVAETrainer and "
                "gradient_accumulation_steps > 1 (it encodes a step's micro-batches together), give each device "
                "batch several rows (e.g. per_device_train_batch_size=16), train on "
                "one-to-many data (a batch is a group of responses), or build the model with "
                "posterior_batch_norm=False (then use objective='dg' or free bits against collapse)"
            )
        if not self.training or self.statistics == "batch":
            # in the parameters' dtype: peft's k-bit preparation casts the parameters to float32, not the buffers
            if self.running_mean.dtype != self.weight.dtype:
                self.running_mean.data, self.running_var.data = (
                    self.running_mean.data.to(self.weight.dtype), self.running_var.data.to(self.weight.dtype))  # fmt: skip
            return super().forward(latent_mean.to(self.weight.dtype)).to(latent_mean.dtype)
        means = latent_mean.float()
        batch_mean, batch_var = means.mean(0), means.var(0, unbiased=False)
        with torch.no_grad():  # the running statistics, the batch's weight 1 / (batches seen) or `momentum` at least
            # a batch of equal means (a fresh encoder's) has no statistics to give: weight 0, not counted
            spread = (batch_var > 0).any()
            weight = torch.where(spread, (1.0 / (self.num_batches_tracked + 1)).clamp(min=self.momentum), 0.0)
            running_mean, running_var = self.running_mean.float(), self.running_var.float()  # buffers in any dtype
            mean = torch.lerp(running_mean, batch_mean, weight)
            if self.statistics == "running":  # of the mixture of the batches: between-batch spread included
                var = (1 - weight) * (running_var + (running_mean - mean) ** 2) + weight * (
                    batch_var + (batch_mean - mean) ** 2
                )
            else:  # "running_mean": the mean of the batches' variances, as plain batch norm keeps
                var = torch.lerp(running_var, batch_var, weight)
            self.running_mean.copy_(mean)
            self.running_var.copy_(var)
            self.num_batches_tracked.add_(spread.long())
        batch_std = (batch_var + self.eps).sqrt()
        if self.statistics == "running":
            std = (var + self.eps).sqrt()
            normed = (means - batch_mean) / batch_std * (batch_std / std).detach() + (
                (batch_mean - mean) / std
            ).detach()
        else:  # the batch's offset from the running mean passes (with its gradient), over the batch's own spread
            normed = (means - mean) / batch_std
        return (normed * self.weight + self.bias).to(latent_mean.dtype)


def dequantized_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """`module`'s parameters and buffers as plain tensors: the weights of a quantised LLM (bitsandbytes' 4-bit
    `Params4bit` and 8-bit `Int8Params`) dequantised, as the CVAE's own copies of its layers start from them."""
    state = {}
    for name, tensor in (*module.named_parameters(), *module.named_buffers()):
        if type(tensor).__name__ in ("Params4bit", "Int8Params"):
            from transformers.integrations.bitsandbytes import dequantize_bnb_weight

            owner = module.get_submodule(name.rpartition(".")[0])
            tensor = dequantize_bnb_weight(tensor, getattr(owner, "state", None))
        state[name] = tensor
    return state


class CVAELlamaPosteriorEncoder(nn.Module):
    """q(z | x, y): the LLM's token embedding and copies of its first layers (its architecture's own layer class),
    then a read-out (`config.posterior_pooling`): the mean of the last layer's token states (`"mean"`), or learned
    queries appended at the end (`"queries"`, the paper's), RMS-normed, through an MLP to the mean and log-variance.

    Input `(batch, seq)` token ids of `x + y` (left-padded) and, with `config.share_llm_weights`, their embeddings by
    the decoder's own embedding (the encoder then has none); output `latent_mean`, `latent_logvar`, each
    `(batch, latent_size)`. A fresh encoder returns exactly N(0, I) (zero-initialised read-out; the batch norm of
    the means, `config.posterior_batch_norm`, maps equal means to 0).
    """

    def __init__(self, config: CVAELlamaConfig, batch_norm: bool | None = None):
        super().__init__()
        self.config = config
        # a copy of the LLM's embedding in folders saved before `share_llm_weights`
        shared = config.share_llm_weights
        self.embed_tokens = (
            None if shared else nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        )
        architecture = DECODER_ARCHITECTURES[config.base_model_type]
        self.layers = nn.ModuleList(
            [architecture.decoder_layer(config, layer_idx) for layer_idx in range(config.num_encoder_layers)]
        )
        self.sliding = sliding_layers(config)[: config.num_encoder_layers]
        self.rotary_emb = architecture.rotary_embedding(config)
        self.num_read_outs = config.num_latent_queries if config.posterior_pooling == "queries" else 1
        if config.posterior_pooling == "queries":
            self.latent_queries = nn.Parameter(torch.zeros(config.num_latent_queries, config.hidden_size))
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        share = 2 * config.latent_size // self.num_read_outs  # each read-out: its share of mean and log-variance
        self.to_latent_mean_logvar = nn.Sequential(
            nn.Linear(config.hidden_size, config.hidden_size), nn.SiLU(), ZeroInitLinear(config.hidden_size, share)
        )
        # (`batch_norm=False`: the learned prior's network, whose means are not normalised)
        batch_norm = config.posterior_batch_norm if batch_norm is None else batch_norm
        self.mean_norm = (
            CVAELlamaPosteriorNorm(config.latent_size, config.posterior_norm_statistics) if batch_norm else None
        )

    def forward(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None,
                inputs_embeds: torch.FloatTensor | None = None):  # fmt: skip
        batch_size, num_read_outs = input_ids.shape[0], self.num_read_outs
        if inputs_embeds is None:
            if self.embed_tokens is None:
                raise ValueError(
                    "the posterior encoder shares the decoder's token embedding (config.share_llm_weights=True): pass "
                    "inputs_embeds=model.get_input_embeddings()(input_ids), or call model.encode(input_ids)"
                )
            inputs_embeds = self.embed_tokens(input_ids)
        hidden_states = inputs_embeds
        if torch.is_grad_enabled() and not hidden_states.requires_grad and self.training:
            # the embedding is frozen: a reentrant gradient checkpoint of the first layer would then pass no
            # gradient to the layers (transformers' `enable_input_require_grads` does this for the decoder)
            hidden_states.requires_grad_()
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if self.config.posterior_pooling == "queries":  # (batch, seq + queries, hidden): causal, queries see all
            queries = self.latent_queries.to(hidden_states.dtype).expand(batch_size, -1, -1)
            hidden_states = torch.cat([hidden_states, queries], dim=1)
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(batch_size, num_read_outs)], dim=1)
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # left padding does not shift positions
        mask_kwargs = dict(
            config=self.config, inputs_embeds=hidden_states, attention_mask=attention_mask, cache=None,
            position_ids=position_ids,
        )  # fmt: skip
        masks = {False: create_causal_mask(**mask_kwargs)}  # the layers' masks, as their architecture makes them
        if any(self.sliding):
            masks[True] = create_sliding_window_causal_mask(**mask_kwargs)
        position_embeddings = self.rotary_emb(hidden_states, position_ids=position_ids)
        for layer, sliding in zip(self.layers, self.sliding, strict=True):
            hidden_states = layer(
                hidden_states,
                attention_mask=masks[sliding],
                position_ids=position_ids,
                position_embeddings=position_embeddings,
            )
        if self.config.posterior_pooling == "queries":
            features = hidden_states[:, -num_read_outs:]  # (batch, queries, hidden)
        else:
            # the mean over the real tokens but the first: at every depth an LLM's first token holds the massive
            # activations of its attention sink, which would dominate the mean (and the RMS norm after it)
            weights = attention_mask * (position_ids > 0)
            weights = torch.where(weights.sum(-1, keepdim=True) > 0, weights, attention_mask).to(hidden_states.dtype)
            weights = weights / weights.sum(-1, keepdim=True)
            features = torch.einsum("bs,bsh->bh", weights, hidden_states)[:, None]  # (batch, 1, hidden)
        read_out = self.to_latent_mean_logvar(self.norm(features))  # (batch, read-outs, share)
        latent_mean, latent_logvar = read_out.view(batch_size, num_read_outs, 2, -1).unbind(dim=2)
        latent_logvar = LOGVAR_BOUND * torch.tanh(latent_logvar / LOGVAR_BOUND)
        latent_mean = latent_mean.reshape(batch_size, -1)
        if self.mean_norm is not None:
            # mu <- gamma * (mu - E[mu]) / sqrt(Var[mu] + eps) + beta, per dimension (E, Var: the running statistics
            # or the batch's): the means spread from the first step, however little the encoder's features differ
            latent_mean = self.mean_norm(latent_mean)
        return latent_mean, latent_logvar.reshape(batch_size, -1)

    def init_from_llm(self, llm: PreTrainedModel) -> None:
        """Copy the LLM's first layers (and its embedding, where the encoder keeps a copy); the queries start at the
        mean token embedding, a neutral input for the copied layers, plus a little noise so that they do not read out
        the same share of the latent."""
        for index, layer in enumerate(self.layers):
            layer.load_state_dict(dequantized_state_dict(llm.model.layers[index]))
        if self.embed_tokens is not None:
            self.embed_tokens.weight.copy_(llm.model.embed_tokens.weight)
        if self.config.posterior_pooling == "queries":
            queries = self.latent_queries
            queries.copy_(llm.model.embed_tokens.weight.mean(dim=0, keepdim=True).expand_as(queries))
            queries.add_(torch.randn_like(queries) * self.config.initializer_range)


# ------------------------------------------------------------------------------------------------ the latent memory
def rotate_slot_keys(keys: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """RoPE on the memory's keys `(..., slots, head_dim)`, as a prefix at positions 0 .. slots - 1 (keys only: the
    slots ask no queries)."""
    cos, sin = (embedding[:, None] for embedding in position_embeddings)
    return keys * cos + rotate_half(keys) * sin


class CVAELlamaLatentMemoryLayer(nn.Module):
    """z -> `num_memory_slots` pseudo token states -> keys and values for one decoder layer.

    d -> sqrt(hidden) -> GELU -> slots * hidden, RMS-normed, then the layer's own key and value projections (and its
    key norm where the architecture has one, Qwen3's), so that the slots' keys are computed as the layer computes its
    tokens' keys (folders saved before `config.share_llm_weights` hold copies of them here instead). With
    `memory_attention="gated"`, a gate per head says how much of the memory's own attention the layer adds (0 at
    first): `gate_scale * gate` (`config.memory_gate_scale`).
    """

    def __init__(self, config: CVAELlamaConfig, layer_idx: int = 0):
        super().__init__()
        self.num_memory_slots = config.num_memory_slots
        self.hidden_size = config.hidden_size
        bottleneck = int(math.sqrt(config.hidden_size))
        self.to_states = nn.Sequential(
            nn.Linear(config.latent_size, bottleneck),
            nn.GELU(),
            nn.Linear(bottleneck, config.num_memory_slots * config.hidden_size),
        )
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.k_proj = self.v_proj = self.k_norm = None
        if not config.share_llm_weights:  # copies: the layer's attention built by its architecture, keys and values
            attention = DECODER_ARCHITECTURES[config.base_model_type].attention(config, layer_idx)
            self.k_proj, self.v_proj = attention.k_proj, attention.v_proj
            self.k_norm = getattr(attention, "k_norm", None)
        gated = config.memory_attention == "gated"
        # g = memory_gate_scale * gate: Adam moves a parameter by about its learning rate a step whatever the
        # gradient, so the scale is how much faster than the other new modules the gates open
        self.gate = nn.Parameter(torch.zeros(config.num_attention_heads)) if gated else None
        self.gate_scale = config.memory_gate_scale

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        """`(batch, latent_size)` -> the slots' states `(batch, slots, hidden)`."""
        return self.norm(self.to_states(latent).view(latent.shape[0], self.num_memory_slots, self.hidden_size))

    def keys_and_values(self, states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor],
                        attention: nn.Module):  # fmt: skip
        """`(batch, slots, hidden)` states -> keys (rotated as a prefix) and values `(batch, kv_heads, slots,
        head_dim)`, by the projections of the decoder layer's `attention` (or the copies this layer holds). Where the
        decoder trains (in full, or LoRA on `k_proj` / `v_proj`), the slots go through its projections as they train,
        so that merging LoRA into the decoder leaves the model unchanged."""
        projections = attention if self.k_proj is None else self
        states = states.contiguous()
        shape = (*states.shape[:2], -1, attention.head_dim)
        key = projections.k_proj(states).view(shape)
        if getattr(projections, "k_norm", None) is not None:  # Qwen3: RMS norm over each head's key, before RoPE
            key = projections.k_norm(key)
        value = projections.v_proj(states).view(shape).transpose(1, 2)
        return rotate_slot_keys(key.transpose(1, 2), position_embeddings), value

    @torch.no_grad()
    def init_from_llm(self, llm_layer: nn.Module, bos_state: torch.Tensor, probe: torch.Tensor) -> None:
        """Start as the LLM's layer `llm_layer` sees a BOS token, with z's part a tenth of that state.

        Each slot starts at the LLM's own input state of this layer for a BOS token (`bos_state`), so a fresh CVAE
        attends to a BOS-like prefix and keeps the LLM's perplexity (random slots multiply it by ~100 on
        SmolLM2-135M). The latent's part (measured on the latents `probe`) is scaled to a tenth of that state's norm:
        BOS states are large in deep layers (attention sinks, norm ~300 on SmolLM2-135M), and an unscaled random part
        (~0.3) would vanish under the RMS norm, leaving z invisible to the decoder. The slots are RMS-normed next, so
        the state is stored divided by its RMS: the same forward, but parameters of size ~1, which Adam moves at the
        same relative speed in every layer (stored at the BOS state's own size, a Yelp auto-encoder's latent carried
        0.34 nats after 50 steps instead of 3.36).
        """
        attention = llm_layer.self_attn
        if self.k_proj is not None:  # copies (`share_llm_weights=False`)
            self.k_proj.load_state_dict(dequantized_state_dict(attention.k_proj))
            self.v_proj.load_state_dict(dequantized_state_dict(attention.v_proj))
            if self.k_norm is not None:
                self.k_norm.load_state_dict(attention.k_norm.state_dict())
        self.norm.weight.copy_(llm_layer.input_layernorm.weight)
        last = self.to_states[-1]
        bos_state = bos_state / bos_state.pow(2).mean().sqrt().clamp(min=1e-12)  # RMS 1
        last.bias.copy_(bos_state.repeat(self.num_memory_slots))
        varying = (self.to_states(probe) - last.bias).norm(dim=-1).mean()
        last.weight.mul_(LATENT_SHARE_AT_INIT * last.bias.norm() / varying.clamp(min=1e-12))


@dataclass
class LatentMemoryCall:
    """What the decoder's attention receives as its `latent_memory` keyword in one forward call.

    `states` holds each layer's slot states `(batch, slots, hidden)` when this call computes the slots' keys and
    values (in each layer's own attention call, from that layer's projections); `None` when they are in the KV cache
    already, or when there is no memory (the decoder run on its own). `in_cache`: the slots are the first keys and
    values of the cache, in front of the text's; `fill_cache`: this call writes them there (the first call on an
    empty cache, whose attention mask has no columns for them). `implementation` is the attention wrapped: "eager"
    or "sdpa".
    """

    memory: "CVAELlamaLatentMemory"
    implementation: str
    states: tuple[torch.Tensor, ...] | None = None
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None
    in_cache: bool = False
    fill_cache: bool = False

    def keys_and_values(self, attention: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """The memory keys (rotated) and values of the decoder layer whose attention module is `attention`, `(batch,
        kv_heads, slots, head_dim)`, by its own projections."""
        layer = self.memory.layers[attention.layer_idx]
        return layer.keys_and_values(self.states[attention.layer_idx], self.position_embeddings, attention)


def latent_memory_attention(module, query, key, value, attention_mask, latent_memory: LatentMemoryCall, **kwargs):
    """Self-attention in which every real token also attends to the layer's latent memory slots (the latent memory
    of Zhang et al., 2026): the function the decoder's attention modules call, registered with transformers'
    `AttentionInterface` under `LATENT_MEMORY_ATTENTION`.

    `memory_attention="joint"` puts the slots' keys in front of the text's, in one softmax; `"gated"` keeps the LLM's
    attention over the text and adds [`gated_memory_attention`]. Without memory this is the wrapped implementation.
    """
    call, layer_idx = latent_memory, module.layer_idx
    if call.implementation == "eager":  # the architecture's own
        attention = DECODER_ARCHITECTURES[module.config.base_model_type].eager_attention
    else:
        attention = ALL_ATTENTION_FUNCTIONS[call.implementation]
    memory_layer = call.memory.layers[layer_idx]
    num_slots = memory_layer.num_memory_slots
    if call.in_cache:  # the slots are the cache's first keys and values (see `CVAELlamaLatentMemory.attach`)
        if call.fill_cache:  # the mask was made before they were there: every token sees them
            attention_mask = mask_with_slots(attention_mask, query, key.shape[2] - num_slots, num_slots)
        if memory_layer.gate is None:  # joint: keys like the text's
            return attention(module, query, key, value, attention_mask, **kwargs)
        memory_key, key = key[:, :, :num_slots], key[:, :, num_slots:]
        memory_value, value = value[:, :, :num_slots], value[:, :, num_slots:]
        attention_mask = None if attention_mask is None else attention_mask[..., num_slots:]
    elif call.states is not None:
        memory_key, memory_value = call.keys_and_values(module)
    else:
        return attention(module, query, key, value, attention_mask, **kwargs)
    if memory_layer.gate is None:
        return joint_memory_attention(
            attention, module, query, key, value, attention_mask, memory_key, memory_value, call.implementation, **kwargs
        )
    output, weights = attention(module, query, key, value, attention_mask, **kwargs)  # the LLM's attention
    gate = memory_layer.gate
    if isinstance(gate, DTensor):  # tensor parallel: the gates of this rank's heads, as the plan shards the queries
        gate = gate.to_local()
    gate = memory_layer.gate_scale * gate
    memory_output = gated_memory_attention(module, query, memory_key, memory_value, gate)
    return output + memory_output.to(output.dtype), weights


def mask_with_slots(attention_mask, query, key_length: int, num_slots: int):
    """`attention_mask` over `key_length` keys (or `None`: causal) with `num_slots` visible columns in front."""
    if attention_mask is None:  # the causal pattern was left implicit (sdpa's is_causal): spell it out
        query_length = query.shape[2]
        attention_mask = torch.ones(query_length, key_length, dtype=torch.bool, device=query.device)
        attention_mask = attention_mask.tril(key_length - query_length)[None, None]
    visible = (
        torch.ones((), dtype=torch.bool, device=query.device)
        if attention_mask.dtype == torch.bool
        else torch.zeros((), dtype=attention_mask.dtype, device=query.device)
    )
    return torch.cat([visible.expand(*attention_mask.shape[:-1], num_slots), attention_mask], dim=-1)


def joint_memory_attention(attention, module, query, key, value, attention_mask, memory_key, memory_value,
                           implementation: str, **kwargs):  # fmt: skip
    """`memory_attention="joint"` with the slots passed in: their keys and values in front of the text's, visible to
    every token, in one softmax."""
    attention_mask = mask_with_slots(attention_mask, query, key.shape[2], memory_key.shape[2])
    key = torch.cat([memory_key.to(key.dtype), key], dim=2)
    value = torch.cat([memory_value.to(value.dtype), value], dim=2)
    if implementation == "sdpa" and query.device.type == "cpu" and not kwargs.get("output_attentions"):
        # With a mask, transformers' sdpa path repeats the keys and values for every query head (a copy kept
        # for backward in each layer); CPU's fused kernel takes the mask and the grouped keys as they are.
        output = nn.functional.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, dropout_p=kwargs.get("dropout", 0.0),
            scale=kwargs.get("scaling"), enable_gqa=query.shape[1] != key.shape[1],
        )  # fmt: skip
        return output.transpose(1, 2).contiguous(), None
    return attention(module, query, key, value, attention_mask, **kwargs)


def gated_memory_attention(module, query, memory_key, memory_value, gate):
    """`memory_attention="gated"`: the part the latent memory adds to a layer's attention output,
    `g * softmax(q K_mem^T / sqrt(head_dim)) V_mem`, with its own softmax over the slots (every slot visible to every
    token) and a gate `g` per head that starts at 0 (zero-init attention, LLaMA-Adapter): `(batch, query_length,
    heads, head_dim)`."""
    memory_output = nn.functional.scaled_dot_product_attention(
        query, memory_key.to(query.dtype), memory_value.to(query.dtype), scale=getattr(module, "scaling", None),
        enable_gqa=query.shape[1] != memory_key.shape[1],
    )  # fmt: skip
    return gate.to(query.dtype)[:, None] * memory_output.transpose(1, 2)


AttentionInterface.register(LATENT_MEMORY_ATTENTION, latent_memory_attention)


def token_positions(attention_mask, sequence_length: int, past_length: int, device) -> torch.LongTensor:
    """Positions of the real tokens counted from 0, `(batch or 1, sequence_length)`: from a 2-D `attention_mask`
    (left padding does not shift them), else following `past_length` tokens already in the cache."""
    if attention_mask is not None and attention_mask.ndim == 2:
        return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -sequence_length:]
    return torch.arange(past_length, past_length + sequence_length, device=device)[None]


def decoder_checkpointing(decoder: nn.Module) -> bool:
    """Whether this forward of `decoder` runs its layers under gradient checkpointing."""
    return (
        decoder.training and torch.is_grad_enabled() and any(layer.gradient_checkpointing for layer in decoder.layers)
    )


class _ReentrantMemoryGradient(torch.autograd.Function):
    """Carry the memory's gradient across reentrant gradient checkpointing.

    A reentrant checkpoint replays each layer in a backward call of its own, so a memory tensor captured in the
    layer's keyword arguments would be backpropagated once per layer through a graph freed after the first. The
    layers get detached stand-in leaves instead; this identity on the decoder's input embeddings runs its backward
    after every layer's (it is upstream of all of them) and hands the leaves' accumulated gradients to the memory.
    """

    @staticmethod
    def forward(ctx, inputs_embeds, leaves, *memory):
        ctx.leaves = leaves
        return inputs_embeds.view_as(inputs_embeds)

    @staticmethod
    def backward(ctx, grad):
        memory_grads = [leaf.grad if leaf.grad is not None else torch.zeros_like(leaf) for leaf in ctx.leaves]
        return grad, None, *memory_grads


class CVAELlamaLatentMemory(nn.Module):
    """The latent memory: everything about how z reaches the decoder's attention.

    One [`CVAELlamaLatentMemoryLayer`] per decoder layer (the slots' states, keys, values and gate); the slots'
    positions (0 .. slots - 1, in front of the real tokens); their place in the KV cache; the attention mask's columns
    for them; and [`latent_memory_attention`], which the decoder's attention modules call ([`attach`]).
    """

    def __init__(self, config: CVAELlamaConfig):
        super().__init__()
        self.num_memory_slots = config.num_memory_slots
        self.layers = nn.ModuleList(
            [CVAELlamaLatentMemoryLayer(config, layer_idx) for layer_idx in range(config.num_hidden_layers)]
        )

    def attach(self, decoder: nn.Module) -> None:
        """Make `decoder`'s attention modules call [`latent_memory_attention`]: they look their attention function
        up by `self.config._attn_implementation`, so they get a copy of the config that names it, while the model's
        config keeps the plain "eager" / "sdpa" that masks and tools read. Pre-hooks hand the decoder, when it runs
        on its own, a call without memory (the model's attention unchanged), and write each layer's slots into an
        empty KV cache from inside that layer's attention call, before its own keys."""
        attention_config = copy.copy(decoder.config)
        attention_config._attn_implementation_internal = LATENT_MEMORY_ATTENTION
        for layer in decoder.layers:
            layer.self_attn.config = attention_config
            layer.self_attn.register_forward_pre_hook(self._write_slots_to_cache, with_kwargs=True)
        decoder.register_forward_pre_hook(self._without_memory, with_kwargs=True)

    def _without_memory(self, decoder: nn.Module, args: tuple, kwargs: dict):
        if kwargs.get("latent_memory") is None:
            kwargs["latent_memory"] = LatentMemoryCall(self, decoder.config._attn_implementation)
        return args, kwargs

    def _write_slots_to_cache(self, attention: nn.Module, args: tuple, kwargs: dict) -> None:
        call = kwargs.get("latent_memory")
        if call is not None and call.fill_cache:
            cache = kwargs["cache"] if "cache" in kwargs else kwargs["past_key_values"]
            cache.update(*call.keys_and_values(attention), attention.layer_idx)

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        """`(batch, latent_size)` -> every layer's slot states `(batch, layers, slots, hidden)`."""
        if not self._stackable():
            return torch.stack([layer(latent) for layer in self.layers], dim=1)
        return self._stacked_forward(latent).transpose(0, 1)

    def keys_and_values(self, latent: torch.Tensor, decoder: nn.Module) -> tuple:
        """Every layer's memory keys and values for `latent`, `(key, value)` per layer, each `(batch, kv_heads,
        slots, head_dim)`: what each layer of `decoder` (the CVAE's `model.model`) computes in its attention call from
        its own projections, for inspection (a forward computes them layer by layer, in each layer's attention
        call)."""
        states = self(latent)
        position_embeddings = self.slot_position_embeddings(states, decoder.rotary_emb)
        return tuple(
            layer.keys_and_values(states[:, index], position_embeddings, decoder_layer.self_attn)
            for index, (layer, decoder_layer) in enumerate(zip(self.layers, decoder.layers, strict=True))
        )

    def slot_position_embeddings(self, states: torch.Tensor, rotary_emb: nn.Module) -> tuple:
        """The rotary embedding `(cos, sin)` of the slots' positions 0 .. slots - 1, in the states' dtype."""
        return rotary_emb(states, position_ids=torch.arange(self.num_memory_slots, device=states.device)[None])

    def _stackable(self) -> bool:
        """Whether every layer's MLP and norm are the plain modules, on one device, with no hooks or wrappers
        (PEFT, accelerate), so that their weights can be stacked; otherwise each layer runs its own forward."""
        plain = (nn.Sequential, nn.Linear, nn.GELU, nn.Linear)
        for layer in self.layers:  # (a layer peft wraps whole, a gated one, is not of the layer's own class)
            if type(layer) is not CVAELlamaLatentMemoryLayer:
                return False
            if type(layer.to_states) is not nn.Sequential or type(layer.norm) is not LlamaRMSNorm:
                return False
            parts = (layer.to_states, *layer.to_states, layer.norm)
            if tuple(map(type, parts[:-1])) != plain:
                return False
            if any(part._forward_hooks or part._forward_pre_hooks or "forward" in vars(part)
                   for part in (layer, *parts)):  # fmt: skip
                return False
        weights = [
            part.weight for layer in self.layers for part in (layer.to_states[0], layer.to_states[2], layer.norm)
        ]
        return len({weight.device for weight in weights}) == 1

    def _stacked_forward(self, latent: torch.Tensor) -> torch.Tensor:
        """The layers' MLPs at once, as batched matrix products over stacked weights, then each layer's norm:
        `(layers, batch, slots, hidden)`. A step of a small batch on a GPU is bound by kernel launches, and this
        makes the MLPs' launches a few in all instead of a few per layer."""
        first = self.layers[0]
        num_layers, batch_size = len(self.layers), latent.shape[0]

        def stacked(name: str, index: int) -> torch.Tensor:
            return torch.stack([getattr(layer.to_states[index], name) for layer in self.layers])

        # (layers, batch, d) -> (layers, batch, bottleneck) -> (layers, batch, slots * hidden)
        hidden = torch.baddbmm(stacked("bias", 0)[:, None], latent.expand(num_layers, -1, -1),
                               stacked("weight", 0).transpose(1, 2))  # fmt: skip
        hidden = first.to_states[1](hidden)
        states = torch.baddbmm(stacked("bias", 2)[:, None], hidden, stacked("weight", 2).transpose(1, 2))
        states = states.view(num_layers, batch_size, self.num_memory_slots, first.hidden_size)
        return torch.stack([layer.norm(part) for layer, part in zip(self.layers, states.unbind(0), strict=True)])

    def slots_in_cache(self, cache: Cache | None, checkpointing: bool, sliding: bool) -> bool:
        """Whether the slots are keys and values in the KV cache, written by the first call, so that a decoding step
        copies nothing more than the LLM's: with a dynamic cache of plain layers (whose `update` returns the tensors
        it keeps). Otherwise (no cache, as in training under gradient checkpointing; a static, quantised or sliding
        window cache, which would evict the slots or hide them from tokens beyond the window) each call's attention
        gets them, visible to every token."""
        return (
            isinstance(cache, DynamicCache) and not checkpointing and not sliding
            and all(type(layer) is DynamicLayer for layer in cache.layers)
            and getattr(cache, "layer_class_to_replicate", None) in (None, DynamicLayer)
        )  # fmt: skip

    def prepare(self, latent, states, inputs_embeds, attention_mask, position_ids, cache, decoder, checkpointing):
        """The decoder's inputs for one forward call with the memory: `(inputs_embeds, attention_mask,
        position_ids, call)`, the [`LatentMemoryCall`] its attention receives.

        The real tokens take the positions after the slots'. With the slots in the cache, the first call writes
        them there (each layer from its own attention call), and later calls give a 2-D attention mask their
        columns. `states` are precomputed slot states (`generate` computes them once per call), else computed from
        `latent`. `checkpointing`: whether the decoder's layers run under gradient checkpointing in this call.
        """
        num_slots, sequence_length = self.num_memory_slots, inputs_embeds.shape[1]
        in_cache = self.slots_in_cache(cache, checkpointing, any(sliding_layers(decoder.config)))
        past_length = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            real_past = max(past_length - num_slots, 0) if in_cache else past_length
            position_ids = token_positions(attention_mask, sequence_length, real_past, inputs_embeds.device)
        call = LatentMemoryCall(self, decoder.config._attn_implementation, in_cache=in_cache)
        if not (in_cache and past_length):  # this call computes the slots' keys and values
            states = self(latent) if states is None else self._check_states(states, inputs_embeds.shape[0])
            call.states = states.unbind(1)
            call.position_embeddings = self.slot_position_embeddings(states, decoder.rotary_emb)
            call.fill_cache = in_cache
        elif attention_mask is not None and attention_mask.ndim == 2:  # the cache's slots get their mask columns
            slot_columns = attention_mask.new_ones(attention_mask.shape[0], num_slots)
            attention_mask = torch.cat([slot_columns, attention_mask], dim=-1)
        if checkpointing and call.states is not None and self._reentrant(decoder):
            leaves = [state.detach().requires_grad_(state.requires_grad) for state in call.states]
            inputs_embeds = _ReentrantMemoryGradient.apply(inputs_embeds, leaves, *call.states)
            call.states = tuple(leaves)
        return inputs_embeds, attention_mask, position_ids + num_slots, call

    def _check_states(self, states, batch_size: int) -> torch.Tensor:
        """Raise `ValueError` for precomputed slot states (`forward`'s `latent_memory`) of the wrong kind or shape."""
        layer = self.layers[0]
        expected = (batch_size, len(self.layers), self.num_memory_slots, layer.hidden_size)
        if not isinstance(states, torch.Tensor) or tuple(states.shape) != expected:
            found = tuple(states.shape) if isinstance(states, torch.Tensor) else type(states).__name__
            raise ValueError(
                f"latent_memory is {found} but the model expects the memory's slot states of shape {expected} "
                "(batch, num_hidden_layers, num_memory_slots, hidden_size), as `model.latent_memory(latent)` gives"
            )
        return states

    @staticmethod
    def _reentrant(decoder: nn.Module) -> bool:
        """Whether the decoder's layers are checkpointed with torch's reentrant checkpoint (its default)."""
        for layer in decoder.layers:
            if layer.gradient_checkpointing:
                checkpoint = getattr(layer, "_gradient_checkpointing_func", None)
                return bool(getattr(checkpoint, "keywords", {}).get("use_reentrant", True))
        return False

    @torch.no_grad()
    def init_from_llm(self, llm: PreTrainedModel) -> None:
        """Each layer's slots start at the LLM's input state of that layer for a BOS token
        ([`CVAELlamaLatentMemoryLayer.init_from_llm`])."""
        bos_token_id = llm.config.bos_token_id if llm.config.bos_token_id is not None else 0
        bos = torch.tensor([[bos_token_id]], device=llm.device)
        bos_states = llm.model(input_ids=bos, output_hidden_states=True).hidden_states  # [l]: the input of layer l
        latent_size = self.layers[0].to_states[0].in_features
        probe = torch.randn(64, latent_size, generator=torch.Generator().manual_seed(0))
        probe = probe.to(device=llm.device, dtype=llm.dtype)
        for memory_layer, layer, state in zip(self.layers, llm.model.layers, bos_states, strict=False):
            memory_layer.init_from_llm(layer, state[0, 0], probe)


# -------------------------------------------------------------------------------------------------------- the skip
class CVAELlamaLatentSkip(nn.Module):
    """The skip connection from z to the final hidden states: r = mean over samples of RMSNorm(MLP(z)),
    `(samples, batch, d)` -> `(batch, hidden)`.

    G-Skip adds `r - r.detach()` to the final hidden states (zero forward, a short gradient path to the encoder);
    the plain skip adds `r`.
    """

    def __init__(self, config: CVAELlamaConfig):
        super().__init__()
        self.config = config
        self.to_hidden = nn.Sequential(
            nn.Linear(config.latent_size, config.hidden_size),
            nn.SiLU(),
            nn.Linear(config.hidden_size, config.hidden_size),
        )
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, latent_samples: torch.Tensor) -> torch.Tensor:
        return self.norm(self.to_hidden(latent_samples)).mean(dim=0)

    def add_to(self, hidden_states, latent, latent_mean=None, latent_logvar=None) -> torch.Tensor:
        """`hidden_states` `(batch, seq, hidden)` with the skip added: in training from the posterior, K =
        `gskip_samples` reparameterised samples of q averaged; else the latent itself."""
        if latent_mean is not None and self.training:
            samples = reparameterize(latent_mean, latent_logvar, self.config.gskip_samples)
        else:
            samples = latent[None]
        if self.config.skip_connection == "skip":
            return hidden_states + self(samples)[:, None]
        if latent_mean is not None and torch.is_grad_enabled():
            # G-Skip: r - r.detach() is exactly zero forward; backward it is a short path to the encoder
            skip = self(samples)
            return hidden_states + (skip - skip.detach())[:, None]
        return hidden_states


def _refuse_training_without_the_latent(decoder: nn.Module, args: tuple, kwargs: dict) -> None:
    """A forward pre-hook of the CVAE's decoder (`model.model`): in training, with gradients, the decoder runs only
    inside the CVAE's forward, which passes it the latent memory. A caller that runs the backbone alone (trl's fused
    LM head in `SFTTrainer` and `DPOTrainer` does) would train the LLM without the latent, and the encoder would get
    no gradient at all."""
    if decoder.training and torch.is_grad_enabled() and "latent_memory" not in kwargs:
        raise RuntimeError(
            "the CVAE's decoder (model.model) was called on its own in training, without the latent: the encoder "
            "and the latent would get no gradient. trl's SFTTrainer / DPOTrainer do this (their fused LM head "
            "replaces model.forward). Train with cvae_llama's CVAETrainer, with transformers.Trainer and `labels` "
            "(the loss is the negative ELBO), or give SFTTrainer `compute_loss_func=cvae_llama.trl_loss_func` (see "
            "the README's 'Training with trl')."
        )


# ------------------------------------------------------------------------------------------------------- the models
class CVAELlamaPreTrainedModel(PreTrainedModel):
    config_class = CVAELlamaConfig
    config: CVAELlamaConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = [architecture.decoder_layer.__name__ for architecture in DECODER_ARCHITECTURES.values()]
    _supports_sdpa = True
    _supports_flash_attn = False
    _supports_flex_attn = False
    _supports_attention_backend = False
    _can_compile_fullgraph = False

    def get_correct_attn_implementation(self, requested_attention, is_init_check=False):
        # "eager" or "sdpa" (sdpa by default), which the latent memory's attention wraps (configs of earlier versions
        # named the wrapper, "cvae_latent_memory|sdpa": the same)
        if isinstance(requested_attention, str):
            requested_attention = requested_attention.removeprefix(LATENT_MEMORY_ATTENTION + "|")
        implementation = super().get_correct_attn_implementation(requested_attention, is_init_check)
        if implementation not in SUPPORTED_ATTENTION:
            raise ValueError(
                f"attn_implementation={implementation!r} is not supported by CVAE-Llama's latent memory; "
                f"expected one of {SUPPORTED_ATTENTION}"
            )
        return implementation

    def _init_weights(self, module):
        # Only modules with parameters of their own reach this method for remote code (transformers skips the
        # others), so the zero initialisations live on the linear layers themselves.
        super()._init_weights(module)
        if isinstance(module, ZeroInitLinear):
            init.zeros_(module.weight)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, CVAELlamaPosteriorEncoder) and hasattr(module, "latent_queries"):
            init.normal_(module.latent_queries, mean=0.0, std=self.config.initializer_range)
        elif isinstance(module, CVAELlamaLatentMemoryLayer) and module.gate is not None:
            init.zeros_(module.gate)  # closed: a fresh CVAE is its LLM

    def tie_weights(self, *args, **kwargs):
        # transformers calls this whenever it puts parameters in place (building, loading, resizing the vocabulary),
        # and parameters put in place train: the decoder mode's freezing is applied here, its one home
        super().tie_weights(*args, **kwargs)
        self.apply_decoder_mode()

    def parameter_groups(self) -> dict[str, list[tuple[str, nn.Parameter]]]:
        """The model's parameters by component: `encoder`, `latent_memory`, `skip` (the skip connection, the
        embedding injection and any module attached to the model later, such as the trainer's bag-of-words head),
        `decoder` (the LLM: `model` and `lm_head`; tied weights counted once), and `latent_prior` where the model has
        a learned prior."""
        groups = {"encoder": [], "latent_memory": [], "skip": [], "decoder": []}
        if self.latent_prior is not None:
            groups["latent_prior"] = []
        for name, parameter in self.named_parameters():
            if name.startswith("encoder."):
                groups["encoder"].append((name, parameter))
            elif name.startswith("latent_prior."):
                groups["latent_prior"].append((name, parameter))
            elif name.startswith("latent_memory."):
                groups["latent_memory"].append((name, parameter))
            elif name.startswith(DECODER_PREFIXES):
                groups["decoder"].append((name, parameter))
            else:
                groups["skip"].append((name, parameter))
        return groups

    def frozen_parameter_names(self) -> set[str]:
        """Names of the parameters that `config.decoder_mode` freezes.

        `"frozen"` and `"lora"` freeze the LLM (decoder and head); `"full"` trains it. The encoder's embedding and
        the memory's key / value projections are the decoder's own (`config.share_llm_weights`) and follow it. In
        folders saved before that setting they are copies of the LLM's, which every mode freezes, as in the authors'
        stage 2 (training them would cost 16 bytes a parameter with AdamW).
        """
        frozen = {name for name, _ in self.encoder.named_parameters(prefix="encoder") if ".embed_tokens." in name}
        # (the copies' names; with shared weights there are none)
        if self.latent_memory is not None:
            frozen |= {
                name
                for name, _ in self.latent_memory.named_parameters(prefix="latent_memory")
                if name.endswith(("k_proj.weight", "k_proj.bias", "v_proj.weight", "v_proj.bias", "k_norm.weight"))
            }
        if self.config.decoder_mode != "full":
            frozen |= {name for name, _ in self.parameter_groups()["decoder"]}
        return frozen

    def apply_decoder_mode(self):
        """Set `requires_grad` as `config.decoder_mode` says (see `frozen_parameter_names`); `ValueError` for
        `decoder_mode="full"` with a quantised decoder, whose weights cannot train."""
        quantization = getattr(self.config, "base_model_quantization_config", None)
        if quantization and self.config.decoder_mode == "full":
            raise ValueError(
                f'decoder_mode="full" trains the decoder, but its weights are quantised '
                f"({describe_quantization(quantization)}) and cannot train: use "
                '"frozen" or "lora" (QLoRA), or build the CVAE on the LLM without quantization_config'
            )
        frozen = self.frozen_parameter_names()
        for name, parameter in self.named_parameters():
            parameter.requires_grad_(name not in frozen)
        return self

    def parameter_breakdown(self) -> dict[str, dict[str, int]]:
        """Parameter counts per component (`encoder`, `latent_memory`, `skip`, `decoder`, `total`), each as
        `{"trainable": n, "frozen": n}`."""
        breakdown = {}
        for group, parameters in self.parameter_groups().items():
            trainable = sum(p.numel() for _, p in parameters if p.requires_grad)
            frozen = sum(p.numel() for _, p in parameters if not p.requires_grad)
            breakdown[group] = {"trainable": trainable, "frozen": frozen}
        breakdown["total"] = {
            key: sum(counts[key] for counts in breakdown.values()) for key in ("trainable", "frozen")
        }
        return breakdown

    def print_parameter_breakdown(self) -> dict[str, dict[str, int]]:
        """Print the parameter breakdown as a table and return it."""
        breakdown = self.parameter_breakdown()
        print(f"{'component':<15}{'trainable':>15}{'frozen':>15}")
        for group, counts in breakdown.items():
            print(f"{group:<15}{counts['trainable']:>15,}{counts['frozen']:>15,}")
        return breakdown

    def save_pretrained(self, save_directory, *args, standalone: bool | None = None, state_dict=None, **kwargs):
        """[`PreTrainedModel.save_pretrained`], by default as an adapter on the base LLM: only the CVAE's own weights
        (the encoder, the memory, the skip connection: a few percent of the LLM's), with `config.json` naming the
        base (`base_model_name_or_path`, `base_model_revision`) and the fingerprint of its stored weights
        (`base_model_fingerprint`). `from_pretrained` loads the base by that name and attaches them.

        Args:
            standalone (`bool`, *optional*):
                `True`: the whole model, the decoder included, as a folder that needs no base. `False`: an adapter,
                refused (naming the reason) where the decoder is not its named base's: trained (`decoder_mode="full"`,
                LoRA merged into it), or an LLM without stored safetensors weights. By default an adapter where it
                can be, else the whole model.
        """
        state_dict = None if state_dict is None else dict(state_dict)  # transformers drops tied keys from it in place
        adapter = self._saves_as_adapter(standalone, state_dict)
        if adapter:  # the CVAE's own weights and LoRA's: not the decoder's (`model.*`) nor the head's
            state_dict = self.state_dict() if state_dict is None else state_dict
            state_dict = {name: tensor for name, tensor in state_dict.items() if is_adapter_weight(name)}
        # under FSDP2 the model is an instance of a class that `fully_shard` made (`FSDPCVAELlamaForCausalLM`, in a
        # module of torch's): the folder's code, auto_map and architectures are those of the model's own class
        sharded_class = type(self)
        self.__class__ = next(cls for cls in sharded_class.__mro__ if not issubclass(cls, FSDPModule))
        # a saved folder is a complete Hub repo: its auto_map names AutoModel as well as AutoConfig and
        # AutoModelForCausalLM (the latter two are added by transformers for a class registered for auto classes)
        if self._auto_class is not None:
            auto_map = dict(getattr(self.config, "auto_map", None) or {})
            auto_map.setdefault("AutoModel", f"modeling_cvae_llama.{type(self).__name__}")
            self.config.auto_map = auto_map
        self.config.saved_as = "adapter" if adapter else "standalone"  # how the folder is saved, not the model
        try:
            return super().save_pretrained(save_directory, *args, state_dict=state_dict, **kwargs)
        finally:
            self.__class__ = sharded_class
            del self.config.saved_as

    def _saves_as_adapter(self, standalone: bool | None, state_dict: dict | None = None) -> bool:
        """Whether `save_pretrained(standalone=standalone, state_dict=state_dict)` writes an adapter; `ValueError`
        for `standalone=False` where the model cannot be one."""
        if standalone not in (None, True, False):
            raise ValueError(f"standalone must be True, False or None (an adapter where possible), got {standalone!r}")
        reason = None if standalone else self._why_not_an_adapter(state_dict)
        if any(is_lora_weight(name) for name, _ in self.parameter_groups()["decoder"]) and (standalone or reason):
            why = f" (and no adapter can be saved: {reason})" if reason else ""
            raise ValueError(
                f"save_pretrained of a decoder with LoRA layers as a standalone folder, which holds the LLM's own "
                f"layers{why}: save the adapter on its base, or merge LoRA into the decoder first"
            )
        quantization = getattr(self.config, "base_model_quantization_config", None)
        if quantization and (standalone or reason):
            why = "standalone=True was asked" if standalone else reason
            raise ValueError(
                f"the decoder is quantised ({describe_quantization(quantization)}), and a CVAE on a quantised LLM "
                f"saves as an adapter on its base, which loads quantised again; it cannot here: {why}. A standalone "
                "folder would need a top-level quantization_config, which would quantise the CVAE's own layers on "
                "loading"
            )
        if standalone:
            return False
        if reason is not None and standalone is False:
            raise ValueError(f"save_pretrained(standalone=False) cannot save an adapter: {reason}")
        if reason is not None:
            logger.info(f"saving the whole model (standalone): {reason}")
        return reason is None

    def _why_not_an_adapter(self, state_dict: dict | None = None) -> str | None:
        """Why this model (or its weights `state_dict`, where given) cannot be saved as an adapter on its base LLM,
        or `None` when it can."""
        if self.config.decoder_mode == "full":
            return 'decoder_mode="full" trains the decoder, which only a standalone folder keeps'
        if not getattr(self.config, "base_model_fingerprint", None):
            return (
                f"its base LLM ({getattr(self.config, 'base_model_name_or_path', None) or 'an object without a name'}) "
                "has no stored safetensors weights to name (build the CVAE with from_llm(path or repo id) of an LLM "
                "saved with save_pretrained)"
            )
        if getattr(self, "_base_digest", None) != self._decoder_digest(state_dict):
            return (
                "the decoder is not the base LLM it was built from (LoRA merged into it? trained? loaded from a "
                "standalone folder?): only a standalone folder keeps it"
            )
        return None

    def adopt_quantization(self, llm: PreTrainedModel) -> None:
        """Carry the markers of a quantised decoder over from its LLM `llm` (`quantization_method`,
        `is_loaded_in_4bit` / `is_loaded_in_8bit`), so that the tools which read them treat the CVAE as they treat the
        LLM: transformers refuses to cast it to another dtype, `Trainer` leaves it on its devices, peft's
        `prepare_model_for_kbit_training` prepares it. The CVAE has no `hf_quantizer`: its own layers are not
        quantised, and it trains without peft. Nothing to do for an LLM that is not quantised."""
        for name in ("quantization_method", "is_loaded_in_4bit", "is_loaded_in_8bit"):
            if getattr(llm, name, None):
                setattr(self, name, getattr(llm, name))
        # bitsandbytes (0.50) on a CPU with AVX512-BF16 repacks a 4-bit weight at its first call in inference, its
        # scales rounded to bfloat16, and unpacks it when its state dict is read: the decoder's outputs would depend
        # on the order of those calls. It keeps the stored form here, the same in training and inference.
        for module in self.model.modules():
            if getattr(module, "support_avx512bf16_for_cpu", False):
                module.support_avx512bf16_for_cpu = False

    def _decoder_digest(self, state_dict: dict | None = None) -> str:
        """A digest of the decoder's parameters as they are in memory (64 values of each, in its own dtype), or as
        `state_dict` holds them (the full weights of a sharded model, gathered): whether the decoder is still the
        base LLM it was built around or loaded from."""
        digest = hashlib.sha256()
        for name, parameter in self.parameter_groups()["decoder"]:
            if is_lora_weight(name):  # LoRA's weights are the adapter's, the layer they adapt is the base's
                continue
            parameter = parameter if state_dict is None else state_dict.get(name, parameter)
            if isinstance(parameter, DTensor):  # a shard: reading it whole would take every process
                raise ValueError(
                    f"the model is sharded ({name} is a DTensor): pass save_pretrained the full state dict gathered "
                    "from every process (state_dict=...), as Trainer does under FSDP"
                )
            name = name.replace(".base_layer.", ".")
            values = parameter.detach().reshape(-1)
            values = values[:: max(1, values.numel() // 64)][:64]
            digest.update(f"{name}{tuple(parameter.shape)}{values.float().tolist()}".encode())
        return digest.hexdigest()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, base_model=None, **kwargs):
        r"""
        [`PreTrainedModel.from_pretrained`], for standalone folders and for adapter folders (`save_pretrained`'s
        default): an adapter's base LLM is loaded by the name its `config.json` records (`base_model_name_or_path` at
        `base_model_revision`), with the loading arguments given here (`dtype`, `device_map`,
        `quantization_config`, `attn_implementation`, `token`, `cache_dir`, `local_files_only`, ...; `revision` and
        `subfolder` are the adapter folder's), refused if its stored weights' fingerprint is not the one recorded,
        and the CVAE's weights are attached to it.

        Args:
            base_model (`str` or `os.PathLike`, *optional*):
                Where to load an adapter's base LLM from instead (a local copy, a mirror); its fingerprint is checked.
        """
        hub_kwargs = {name: kwargs[name] for name in ADAPTER_HUB_ARGUMENTS if name in kwargs}
        config_dict = {}  # (no folder: a config and a state dict given, as transformers' own tests do)
        if pretrained_model_name_or_path is not None:
            config_dict, _ = cls.config_class.get_config_dict(pretrained_model_name_or_path, **hub_kwargs)
        if config_dict.get("saved_as") != "adapter":
            if base_model is not None:
                raise ValueError(
                    f"base_model={base_model!r} names the base LLM of an adapter folder, but "
                    f"{pretrained_model_name_or_path!r} is a standalone folder (its decoder is in its weights)"
                )
            if kwargs.get("quantization_config") is not None:
                raise ValueError(
                    f"quantization_config is given, but {pretrained_model_name_or_path!r} is a standalone folder, "
                    "which transformers would quantise whole, the CVAE's own layers included: a quantised decoder "
                    "comes from an adapter folder (save_pretrained's default), whose base LLM is loaded quantised"
                )
            return super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        return cls._from_adapter(pretrained_model_name_or_path, config_dict, base_model, kwargs)

    @classmethod
    def _from_adapter(cls, path, config_dict: dict, base_model, kwargs: dict):
        """Load the adapter folder `path` (whose config.json holds `config_dict`): its base LLM (checked by
        fingerprint), the CVAE built around the base's own decoder and head (no copy), its own weights attached."""
        from transformers import AutoModelForCausalLM, GenerationConfig

        hub_kwargs = {name: kwargs.pop(name) for name in ADAPTER_HUB_ARGUMENTS if name in kwargs}
        config = kwargs.pop("config", None)
        overrides = {name: kwargs.pop(name) for name in list(kwargs) if name in CVAE_FIELDS}
        if not isinstance(config, CVAELlamaConfig):
            config = cls.config_class.from_dict(config_dict, **overrides)
        base_hub_kwargs = {name: hub_kwargs[name] for name in BASE_HUB_ARGUMENTS if name in hub_kwargs}
        base_name = base_model if base_model is not None else config.base_model_name_or_path
        revision = None if base_model is not None else getattr(config, "base_model_revision", None)
        if revision is not None:
            base_hub_kwargs["revision"] = revision
        found = base_model_fingerprint(base_name, **base_hub_kwargs)
        if found is None:
            raise ValueError(
                f"the adapter {str(path)!r} is saved on the base LLM {config.base_model_name_or_path!r}, but "
                f"{str(base_name)!r} has no safetensors weights with these loading arguments ({base_hub_kwargs}): "
                "neither a folder holding them nor a Hub repo reachable (offline, or not in the cache?)"
            )
        if found != config.base_model_fingerprint:
            raise ValueError(
                f"the adapter {str(path)!r} was saved on the base LLM {config.base_model_name_or_path!r} (revision "
                f"{getattr(config, 'base_model_revision', None)}) with stored weights of fingerprint "
                f"{config.base_model_fingerprint}, but {str(base_name)!r} has {found}: "
                "its weights differ, and the CVAE's would be attached to another LLM. Load it on its own base (pass "
                "base_model= to point at a copy of it)"
            )
        # the loading arguments but the auto classes' own (`_from_auto`, `_commit_hash`, the folder's code revision)
        kwargs = {name: value for name, value in kwargs.items() if not name.startswith("_") and name != "code_revision"}
        if getattr(config, "base_model_quantization_config", None):  # the decoder quantised as it was trained
            kwargs.setdefault("quantization_config", config.base_model_quantization_config)
        llm = AutoModelForCausalLM.from_pretrained(base_name, **base_hub_kwargs, **kwargs)
        config._attn_implementation = llm.config._attn_implementation
        record_quantization(config, llm)
        with torch.device(llm.device):
            model = cls._from_config(config, dtype=llm.dtype, llm=llm)
        model.adopt_quantization(llm)
        if getattr(config, "decoder_lora", None):  # a CVAE trained with LoRA: its LoRA layers, unmerged
            inject_decoder_lora(model, config.decoder_lora)
        weights = cached_file(path, "model.safetensors", **hub_kwargs)
        missing, unexpected = model.load_state_dict(load_state_dict(weights), strict=False)
        missing = [name for name in missing if is_adapter_weight(name)]
        if missing:
            raise ValueError(f"the adapter {str(path)!r} lacks weights of the CVAE: {missing[:5]}")
        if unexpected:
            logger.warning(f"ignored weights the model does not have in {str(path)!r}: {unexpected[:5]}")
        model.tie_weights()  # the decoder mode's freezing
        generation_file = cached_file(path, "generation_config.json", _raise_exceptions_for_missing_entries=False,
                                      **hub_kwargs)  # fmt: skip
        if generation_file is not None:  # the adapter's own generation settings, else the base's
            model.generation_config = GenerationConfig.from_pretrained(path, **hub_kwargs)
        else:
            model.generation_config = llm.generation_config
        model.config._name_or_path = str(path)
        model._base_digest = model._decoder_digest()
        model.train(False)  # evaluation mode, as from_pretrained returns models
        return model


# ------------------------------------------------------------------------------ an adapter on the base LLM: its weights
def is_lora_weight(name: str) -> bool:
    """Whether the weight `name` is one of LoRA's (peft names them `...lora_A...`, `...lora_B...`)."""
    return ".lora_" in name


def is_adapter_weight(name: str) -> bool:
    """Whether the weight `name` of a CVAE belongs in its adapter folder: the CVAE's own, and LoRA's on the decoder;
    not the decoder's (`model.*`) nor the head's, which are the base LLM's."""
    return not name.startswith(DECODER_PREFIXES) or is_lora_weight(name)


def inject_decoder_lora(model: "CVAELlamaModel", settings: dict) -> None:
    """Add LoRA layers (peft's, with `settings`: `r`, `lora_alpha`, `target_modules`, ...; `config.decoder_lora`) to
    the decoder of `model`, unmerged, as an adapter folder of a CVAE trained with LoRA holds them. Only such folders
    need peft."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError as error:
        raise ImportError(
            "this CVAE's decoder has LoRA layers (config.json's `decoder_lora`), and loading them needs peft, which "
            "is not installed: pip install peft"
        ) from error
    inject_adapter_in_model(LoraConfig(**settings), model.model)


def record_quantization(config: CVAELlamaConfig, llm: PreTrainedModel) -> bool:
    """Record in `config` how the weights of `llm` (the decoder) are quantised: `base_model_quantization_config`, its
    `quantization_config` as a dict, which loading the adapter passes on to the base; not there for an LLM that is not
    quantised. The CVAE's config has no top-level `quantization_config`, which would make transformers quantise the
    CVAE's own layers too. Returns whether `llm` is quantised."""
    quantization = getattr(llm.config, "quantization_config", None) if getattr(llm, "is_quantized", False) else None
    if quantization is None:
        vars(config).pop("base_model_quantization_config", None)
        return False
    quantization = quantization if isinstance(quantization, dict) else quantization.to_dict()
    # (JSON's values: `quant_method` is an enum of transformers')
    config.base_model_quantization_config = {key: getattr(value, "value", value) for key, value in quantization.items()}
    return True


def describe_quantization(quantization: dict) -> str:
    """A short description of a `quantization_config` dict, for messages ("bitsandbytes 4-bit (nf4)")."""
    method = str(quantization.get("quant_method"))
    if quantization.get("load_in_4bit"):
        return f"{method} 4-bit ({quantization.get('bnb_4bit_quant_type')})"
    return f"{method} 8-bit" if quantization.get("load_in_8bit") else method


def base_model_fingerprint(name_or_path, **hub_kwargs) -> str | None:
    """A fingerprint of an LLM's stored safetensors weights (a local folder or a Hub repo, fetched as loading it
    fetches them): a hash over every tensor's name, dtype and shape and its first 256 stored values. It reads a few
    kilobytes per tensor, and it does not depend on how the LLM is loaded (dtype, quantisation, device). `None` where
    there are no safetensors weights."""
    index = cached_file(name_or_path, "model.safetensors.index.json", _raise_exceptions_for_missing_entries=False,
                        **hub_kwargs)  # fmt: skip
    if index is not None:
        files, _ = get_checkpoint_shard_files(name_or_path, index, **hub_kwargs)
    else:
        single = cached_file(name_or_path, "model.safetensors", _raise_exceptions_for_missing_entries=False,
                             **hub_kwargs)  # fmt: skip
        files = [single] if single is not None else []
    if not files:
        return None
    digest = hashlib.sha256()
    for file in sorted(files, key=lambda file: str(file).rsplit("/", 1)[-1]):
        with safe_open(file, framework="pt") as stored:
            for name in sorted(stored.keys()):
                tensor = stored.get_slice(name)
                digest.update(f"{name}:{tensor.get_dtype()}:{tensor.get_shape()}".encode())
                values = tensor[:1] if len(tensor.get_shape()) > 1 else tensor[:]  # the first row
                digest.update(bytes(values.reshape(-1)[:256].contiguous().view(torch.uint8).tolist()))
    return f"sha256:{digest.hexdigest()}"


class CVAELlamaModel(CVAELlamaPreTrainedModel):
    r"""
    The CVAE without its LM head: the decoder (`self.model`, the wrapped architecture's own model class:
    `DECODER_ARCHITECTURES[config.base_model_type].model`) run with a latent `z` of size `config.latent_size`, which
    reaches it through the latent memory (`self.latent_memory`), an optional embedding injection
    (`self.latent_to_embedding`) and the skip connection (`self.latent_skip`, G-Skip by default); the posterior
    encoder (`self.encoder`) gives z from a text. Its forward returns the final hidden states.
    """

    def __init__(self, config: CVAELlamaConfig, lm_head: bool = False, llm: PreTrainedModel | None = None):
        super().__init__(config)
        # the decoder: built, or the given LLM's own (an adapter's base: its modules become the CVAE's, not copied)
        self.model = DECODER_ARCHITECTURES[config.base_model_type].model(config) if llm is None else llm.model
        self.model.register_forward_pre_hook(_refuse_training_without_the_latent, with_kwargs=True)
        # the causal LM's head comes right after the decoder, as in the LLM's checkpoints (and so its weights
        # initialise in the order they always did)
        if lm_head:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False) if llm is None else llm.lm_head
        else:
            self.lm_head = None
        self.encoder = CVAELlamaPosteriorEncoder(config)
        # p(z | x): the posterior's network reading the prompt alone (`config.learned_prior`; else N(0, I))
        self.latent_prior = CVAELlamaPosteriorEncoder(config, batch_norm=False) if config.learned_prior else None
        self.latent_memory = CVAELlamaLatentMemory(config) if config.uses_memory else None
        if self.latent_memory is not None:
            self.latent_memory.attach(self.model)
        self.latent_to_embedding = (
            nn.Sequential(
                nn.Linear(config.latent_size, config.hidden_size),
                nn.SiLU(),
                ZeroInitLinear(config.hidden_size, config.hidden_size),
            )
            if config.uses_embedding_injection
            else None
        )
        self.latent_skip = CVAELlamaLatentSkip(config) if config.skip_connection != "none" else None
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def resize_token_embeddings(self, new_num_tokens=None, pad_to_multiple_of=None, mean_resizing=True):
        embeddings = super().resize_token_embeddings(new_num_tokens, pad_to_multiple_of, mean_resizing)
        if self.encoder.embed_tokens is not None:  # a copy of the embedding follows the decoder's vocabulary too
            self.encoder.embed_tokens = self._get_resized_embeddings(
                self.encoder.embed_tokens, embeddings.num_embeddings, None, mean_resizing
            )
        return embeddings

    def encode(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None):
        """Posterior q(z | x, y) of the token sequence `x + y`: `(latent_mean, latent_logvar)`, each
        `(batch, latent_size)`."""
        return self._run_encoder(self.encoder, input_ids, attention_mask)

    def prior(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None):
        """The learned prior p(z | x) of the prompt `x` (`config.learned_prior`): `(latent_mean, latent_logvar)`,
        each `(batch, latent_size)`; N(0, I) for a model without one."""
        if self.latent_prior is None:
            zeros = torch.zeros(input_ids.shape[0], self.config.latent_size, device=self.device, dtype=self.dtype)
            return zeros, zeros.clone()
        return self._run_encoder(self.latent_prior, input_ids, attention_mask)

    def _run_encoder(self, encoder: CVAELlamaPosteriorEncoder, input_ids, attention_mask):
        self._check_input_ids(input_ids)
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)} but input_ids has {tuple(input_ids.shape)}"
            )
        shared = encoder.embed_tokens is None  # the decoder's own embedding (`config.share_llm_weights`)
        return encoder(input_ids, attention_mask, self.model.embed_tokens(input_ids) if shared else None)

    @torch.no_grad()
    def add_learned_prior(self):
        """Give the model a learned prior p(z | x) (`config.learned_prior`): a copy of the posterior encoder's network
        (its batch norm aside) with the last layer of its read-out zeroed, so that it is exactly N(0, I) and the
        model generates as before, until latent DPO trains it. Returns the model."""
        if self.latent_prior is not None:
            raise ValueError("the model has a learned prior already (config.learned_prior=True)")
        prior = CVAELlamaPosteriorEncoder(self.config, batch_norm=False).to(device=self.device, dtype=self.dtype)
        prior.load_state_dict({name: value for name, value in self.encoder.state_dict().items()
                               if not name.startswith("mean_norm.")})  # fmt: skip
        init.zeros_(prior.to_latent_mean_logvar[-1].weight)
        init.zeros_(prior.to_latent_mean_logvar[-1].bias)
        self.latent_prior = prior
        self.config.learned_prior = True
        return self

    def _check_posterior(self, latent_mean, latent_logvar, latent, batch_size: int) -> None:
        """Raise `ValueError` for a `latent_mean` / `latent_logvar` pair that `forward` cannot use as the posterior."""
        if latent is not None:
            raise ValueError("pass either latent or a posterior (latent_mean, latent_logvar), not both")
        expected = (batch_size, self.config.latent_size)
        for name, tensor in (("latent_mean", latent_mean), ("latent_logvar", latent_logvar)):
            if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != expected:
                shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else tensor
                raise ValueError(
                    f"{name} is {shape} but a posterior passed to forward needs latent_mean and latent_logvar, "
                    f"each of shape {expected} (batch, latent_size)"
                )

    def _check_inputs(self, input_ids, inputs_embeds, attention_mask, posterior_input_ids) -> None:
        """Raise `ValueError`, naming the argument and its shape or value, for inputs `forward` cannot use."""
        if input_ids is not None:
            self._check_input_ids(input_ids)
            shape = tuple(input_ids.shape)
        else:
            if not isinstance(inputs_embeds, torch.Tensor) or inputs_embeds.ndim != 3 or 0 in inputs_embeds.shape[:2]:
                shape = tuple(inputs_embeds.shape) if isinstance(inputs_embeds, torch.Tensor) else None
                raise ValueError(
                    f"inputs_embeds has shape {shape} but the model expects (batch >= 1, sequence_length >= 1, "
                    f"{self.config.hidden_size})"
                )
            shape = tuple(inputs_embeds.shape[:2])
        if isinstance(attention_mask, torch.Tensor) and attention_mask.ndim == 2 and attention_mask.shape != shape:
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)} but the inputs have {shape}")
        if posterior_input_ids is not None:
            self._check_input_ids(posterior_input_ids, "posterior_input_ids")

    def _check_input_ids(self, input_ids, name: str = "input_ids") -> None:
        """Raise `ValueError` unless `input_ids` is an integer `(batch >= 1, sequence_length >= 1)` tensor of ids in
        the vocabulary (the value check, one reduction, is skipped while compiling)."""
        if not isinstance(input_ids, torch.Tensor):
            raise ValueError(
                f"{name} must be a torch.Tensor of shape (batch, sequence_length), got {type(input_ids).__name__}"
            )
        if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
            raise ValueError(f"{name} must be an integer tensor of token ids, got dtype {input_ids.dtype}")
        if input_ids.ndim != 2 or 0 in input_ids.shape:
            raise ValueError(
                f"{name} has shape {tuple(input_ids.shape)} but the model expects (batch >= 1, sequence_length >= 1)"
            )
        if not torch.compiler.is_compiling():
            vocab_size = self.config.vocab_size
            outside = (input_ids < 0) | (input_ids >= vocab_size)
            if outside.any():
                row, column = outside.nonzero()[0].tolist()
                raise ValueError(
                    f"{name} holds ids outside the vocabulary of {vocab_size} tokens (0 .. {vocab_size - 1}), e.g. "
                    f"{name}[{row}, {column}] = {input_ids[row, column].item()}; check that the tokenizer is the "
                    f"model's (and that labels, with their -100, are not passed as {name})"
                )

    def sample_prior(self, batch_size: int, temperature: float = 1.0, generator: torch.Generator | None = None,
                     input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None):  # fmt: skip
        """`(batch_size, latent_size)` samples of the prior at `temperature`: N(0, temperature^2 I), or with a learned
        prior (`config.learned_prior`) mu + temperature * sigma * eps of p(z | x) for the prompts `input_ids` (BOS
        where none are given), `batch_size / len(input_ids)` samples per prompt."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
        noise = torch.randn(
            batch_size, self.config.latent_size, generator=generator, device=self.device, dtype=torch.float32
        )
        if self.latent_prior is None:
            return (temperature * noise).to(self.dtype)
        if input_ids is None:
            input_ids = torch.full((1, 1), self.config.bos_token_id or 0, dtype=torch.long, device=self.device)
        if batch_size % input_ids.shape[0] != 0:
            raise ValueError(f"batch_size={batch_size} is not a multiple of the {input_ids.shape[0]} prompts")
        mean, logvar = (part.float().repeat_interleave(batch_size // input_ids.shape[0], dim=0)
                        for part in self.prior(input_ids, attention_mask))  # fmt: skip
        return (mean + temperature * (0.5 * logvar).exp() * noise).to(self.dtype)

    def _check_latent(self, latent, batch_size: int | None = None, name: str = "latent") -> torch.Tensor:
        """Validate a user latent: a finite floating-point `(batch, latent_size)`, `(1, latent_size)` or
        `(latent_size,)` tensor, returned as `(batch_size, latent_size)` (broadcast when it has one row), or as
        `(rows, latent_size)` when `batch_size` is None. (The finiteness check, a reduction, is skipped while
        compiling or exporting.)"""
        size = self.config.latent_size
        if not isinstance(latent, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor of shape (batch, {size}), got {type(latent).__name__}")
        if not latent.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got dtype {latent.dtype}")
        if latent.ndim == 1:
            latent = latent[None]
        if latent.ndim != 2 or latent.shape[-1] != size:
            raise ValueError(f"{name} has shape {tuple(latent.shape)} but the model expects (batch, {size})")
        if batch_size is not None and latent.shape[0] == 1 and batch_size > 1:
            latent = latent.expand(batch_size, -1)
        if batch_size is not None and latent.shape[0] != batch_size:
            raise ValueError(
                f"{name} has batch size {latent.shape[0]} but the inputs have batch size {batch_size}; "
                f"expected (batch, {size}), (1, {size}) or ({size},)"
            )
        finite = None if torch.compiler.is_compiling() else torch.isfinite(latent)  # a value check: not in a graph
        if finite is not None and not finite.all():
            row, column = (~finite).nonzero()[0].tolist()
            raise ValueError(
                f"{name} contains NaN or inf: {int((~finite).sum())} of {latent.numel()} values are not finite, "
                f"e.g. {name}[{row}, {column}] = {latent[row, column].item()}"
            )
        return latent.to(device=self.device, dtype=self.dtype)

    def _resolve_latent(self, batch_size, input_ids, attention_mask, latent, posterior_input_ids,
                        posterior_attention_mask, latent_mean, latent_logvar, encode_input_ids: bool):  # fmt: skip
        """The latent this call conditions on, `(batch, latent_size)`, and the posterior it came from (`None`, `None`
        for a given latent or the prior's mean): see [`CVAELlamaForCausalLM.forward`]'s `latent`."""
        if latent_mean is not None or latent_logvar is not None:
            self._check_posterior(latent_mean, latent_logvar, latent, batch_size)
        elif latent is not None:
            return self._check_latent(latent, batch_size), None, None
        else:
            if posterior_input_ids is None and (encode_input_ids or self.training) and input_ids is not None:
                posterior_input_ids, posterior_attention_mask = input_ids, attention_mask
            if posterior_input_ids is None:  # the prior's mean: p(z | x) of the inputs where learned, else 0
                if self.latent_prior is not None and input_ids is not None:
                    return self.prior(input_ids, attention_mask)[0], None, None
                return (
                    torch.zeros(batch_size, self.config.latent_size, device=self.device, dtype=self.dtype),
                    None,
                    None,
                )
            if posterior_input_ids.shape[0] != batch_size:
                raise ValueError(
                    f"posterior_input_ids has batch size {posterior_input_ids.shape[0]} but input_ids has {batch_size}"
                )
            latent_mean, latent_logvar = self.encode(posterior_input_ids, posterior_attention_mask)
        # in training one reparameterised sample of the posterior, in evaluation its mean
        latent = reparameterize(latent_mean, latent_logvar) if self.training else latent_mean
        return latent, latent_mean, latent_logvar

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        latent: torch.FloatTensor | None = None,
        posterior_input_ids: torch.LongTensor | None = None,
        posterior_attention_mask: torch.Tensor | None = None,
        latent_memory: torch.FloatTensor | None = None,
        latent_mean: torch.FloatTensor | None = None,
        latent_logvar: torch.FloatTensor | None = None,
        encode_input_ids: bool = False,
        **kwargs: Unpack[TransformersKwargs],
    ) -> CVAELlamaModelOutput:
        r"""
        The arguments of [`CVAELlamaForCausalLM.forward`] but `labels` and `logits_to_keep`; `encode_input_ids`:
        use the posterior of `input_ids` when no latent is given, as in training mode (the causal LM sets it when it
        has labels).
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if cache is None or cache.get_seq_length() == 0:  # user inputs (later decoding steps are the model's own)
            self._check_inputs(input_ids, inputs_embeds, attention_mask, posterior_input_ids)
        batch_size = (input_ids if input_ids is not None else inputs_embeds).shape[0]
        latent, latent_mean, latent_logvar = self._resolve_latent(
            batch_size, input_ids, attention_mask, latent, posterior_input_ids, posterior_attention_mask,
            latent_mean, latent_logvar, encode_input_ids,
        )  # fmt: skip

        if inputs_embeds is None:
            inputs_embeds = self.model.embed_tokens(input_ids)
        if self.latent_to_embedding is not None:
            inputs_embeds = inputs_embeds + self.latent_to_embedding(latent)[:, None]
        if use_cache is None:
            use_cache = self.config.use_cache and not self.training
        checkpointing = decoder_checkpointing(self.model)
        if use_cache and cache is None and not checkpointing:
            cache = DynamicCache(config=self.config)
        memory = None
        if self.latent_memory is not None:
            inputs_embeds, attention_mask, position_ids, memory = self.latent_memory.prepare(
                latent, latent_memory, inputs_embeds, attention_mask, position_ids, cache, self.model, checkpointing
            )
        elif position_ids is None:
            past_length = cache.get_seq_length() if cache is not None else 0
            position_ids = token_positions(attention_mask, inputs_embeds.shape[1], past_length, inputs_embeds.device)
        outputs = self.model(
            inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
            use_cache=use_cache, latent_memory=memory, **kwargs,
        )  # fmt: skip
        hidden_states = outputs.last_hidden_state
        if self.latent_skip is not None:
            hidden_states = self.latent_skip.add_to(hidden_states, latent, latent_mean, latent_logvar)
        return CVAELlamaModelOutput(
            last_hidden_state=hidden_states, latent=latent, latent_mean=latent_mean, latent_logvar=latent_logvar,
            cache=outputs.cache, hidden_states=outputs.hidden_states, attentions=outputs.attentions,
        )  # fmt: skip


class CVAELlamaForCausalLM(CVAELlamaModel, GenerationMixin):
    r"""
    A causal LM conditioned on a latent `z` of size `config.latent_size`: [`CVAELlamaModel`] and the LM head
    (`self.lm_head`), with the checkpoint names of the wrapped architecture's `...ForCausalLM`. It extends the base
    model (rather than holding it at `self.model`, as `LlamaForCausalLM` holds `LlamaModel`) so that the decoder
    stays at `model.model`, where tools reach for it, and checkpoints keep their names.

    Example:

    ```python
    >>> import torch
    >>> from transformers import LlamaConfig
    >>> from cvae_llama import CVAELlamaConfig, CVAELlamaForCausalLM
    >>> config = CVAELlamaConfig.from_llama_config(LlamaConfig(hidden_size=32, intermediate_size=64,
    ...     num_hidden_layers=2, num_attention_heads=4, vocab_size=99, bos_token_id=1), latent_size=8)
    >>> model = CVAELlamaForCausalLM(config).eval()
    >>> z = model.sample_prior(2)                                   # (2, 8) from N(0, I)
    >>> out = model.generate(latent=z, max_new_tokens=5, do_sample=False)
    >>> out.shape
    torch.Size([2, 6])
    ```
    """

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    # As `LlamaForCausalLM`'s: the decoder's plan (`model.*`, from the config) shards `model.embed_tokens`, so the
    # head tied to it is sharded too
    _tp_plan = {"lm_head": "colwise_gather_output"}
    # The keys and values of the memory's copies of the projections (folders saved before `share_llm_weights`) join each
    # decoder layer's own, whose heads the plan shards: they are sharded alike.
    _latent_memory_tp_plan = {"latent_memory.layers.*.k_proj": "colwise", "latent_memory.layers.*.v_proj": "colwise"}

    def __init__(self, config: CVAELlamaConfig, llm: PreTrainedModel | None = None):
        super().__init__(config, lm_head=True, llm=llm)

    def init_parallel_plans(self) -> None:
        super().init_parallel_plans()  # (called by post_init)
        memory = getattr(self, "latent_memory", None)
        if self._tp_plan and memory is not None and memory.layers[0].k_proj is not None:  # copies of the projections
            self._tp_plan.update(self._latent_memory_tp_plan)
            if self.latent_memory.layers[0].k_norm is not None:  # as the decoder's own key norms (Qwen3)
                self._tp_plan["latent_memory.layers.*.k_norm"] = "replicated_with_grad_allreduce"
        if self._tp_plan and memory is not None and memory.layers[0].gate is not None:
            self._tp_plan["latent_memory.layers.*.gate"] = "colwise"  # one gate per query head: sharded as the heads

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        latent: torch.FloatTensor | None = None,
        posterior_input_ids: torch.LongTensor | None = None,
        posterior_attention_mask: torch.Tensor | None = None,
        latent_memory: torch.FloatTensor | None = None,
        latent_mean: torch.FloatTensor | None = None,
        latent_logvar: torch.FloatTensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> CVAELlamaOutput:
        r"""
        Args:
            input_ids, attention_mask, cache, inputs_embeds, use_cache, logits_to_keep:
                As for `LlamaForCausalLM` (`x + y`, left-padded).
            position_ids (`torch.LongTensor` of shape `(batch, sequence_length)`, *optional*):
                Positions of the real tokens counted from 0 (from `attention_mask` when not given); the memory
                slots take the `num_memory_slots` positions in front of them.
            labels (`torch.LongTensor` of shape `(batch, sequence_length)`, *optional*):
                Tokens to reconstruct (`-100` for the prompt and padding), shifted inside as in `LlamaForCausalLM`.
            latent (`torch.FloatTensor` of shape `(batch, latent_size)` or `(latent_size,)`, *optional*):
                The latent to condition on. When it is not given, the model uses **the posterior** of
                `posterior_input_ids` (or, when `labels` are given or the model is in training mode, of
                `input_ids` itself): in training mode one reparameterised sample of it, in eval mode its mean.
                Without a posterior it uses **the prior's mean**: z = 0, or with a learned prior
                (`config.learned_prior`) the mean of p(z | x) with `input_ids` as x. So in eval mode `forward` is
                deterministic, as for any transformers model (scoring a text gives the same logits and loss every
                time), and a latent is drawn at random only in training and by `generate` (one prior sample per
                returned sequence, see [`~CVAELlamaForCausalLM.generate`]). Loss is `reconstruction_loss + kl_loss`
                when the posterior was used.
            posterior_input_ids, posterior_attention_mask (`(batch, posterior_length)`, *optional*):
                The sequence the posterior encodes, when it differs from `input_ids`.
            latent_memory (`torch.FloatTensor` of shape `(batch, num_hidden_layers, num_memory_slots, hidden_size)`,
                *optional*):
                The memory slots' states precomputed from the latent (`self.latent_memory(latent)`), as `generate`
                passes them once per call.
            latent_mean, latent_logvar (`torch.FloatTensor` of shape `(batch, latent_size)`, *optional*):
                A posterior computed outside `forward` (`self.encode(...)`), used as the posterior instead of
                encoding: `CVAETrainer` encodes all the micro-batches of an optimizer step at once, so that the
                posterior batch norm sees the step's rows when a device batch has one. Both or neither, not with
                `latent`.
        """
        inputs = input_ids if input_ids is not None else inputs_embeds
        if isinstance(labels, torch.Tensor) and isinstance(inputs, torch.Tensor) and labels.shape != inputs.shape[:2]:
            raise ValueError(f"labels has shape {tuple(labels.shape)} but the inputs have {tuple(inputs.shape[:2])}")
        outputs = super().forward(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
            inputs_embeds=inputs_embeds, use_cache=use_cache, latent=latent, posterior_input_ids=posterior_input_ids,
            posterior_attention_mask=posterior_attention_mask, latent_memory=latent_memory, latent_mean=latent_mean,
            latent_logvar=latent_logvar, encode_input_ids=labels is not None, **kwargs,
        )  # fmt: skip
        slice_indices = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(outputs.last_hidden_state[:, slice_indices, :])

        # the negative ELBO: -E_q[log p(y | x, z)] + KL(q(z | x, y) || p(z)), when the latent came from the posterior
        loss = reconstruction_loss = kl_loss = None
        if outputs.latent_mean is not None:  # in float32, like the reconstruction loss of transformers' losses
            kl_loss = gaussian_kl(outputs.latent_mean.float(), outputs.latent_logvar.float()).sum(-1).mean()
        if labels is not None:
            reconstruction_loss = self.loss_function(
                logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs
            )
            loss = reconstruction_loss if kl_loss is None else reconstruction_loss + kl_loss
        return CVAELlamaOutput(
            loss=loss, logits=logits, reconstruction_loss=reconstruction_loss, kl_loss=kl_loss, latent=outputs.latent,
            latent_mean=outputs.latent_mean, latent_logvar=outputs.latent_logvar, cache=outputs.cache,
            hidden_states=outputs.hidden_states, attentions=outputs.attentions,
        )  # fmt: skip

    @torch.no_grad()
    def generate(self, inputs=None, generation_config=None, latent=None, latent_temperature: float = 1.0, **kwargs):
        r"""
        [`GenerationMixin.generate`] conditioned on a latent. Every decoding strategy, cache and `generate`
        argument works as for `LlamaForCausalLM`.

        Args:
            latent (`torch.FloatTensor` of shape `(batch, latent_size)`, `(batch * num_return_sequences,
                latent_size)` or `(latent_size,)`, *optional*):
                The latent of each prompt, of each returned sequence, or of all. When not given, a fresh prior
                sample is drawn **per returned sequence** (per prompt with beam search, whose beams share it).
                Without a prompt, the batch size comes from the latent (and `num_return_sequences`).
            latent_temperature (`float`, defaults to 1.0):
                Scale of the prior samples drawn when `latent` is not given.
        """
        num_return_sequences = self._generation_setting("num_return_sequences", generation_config, kwargs)
        if num_return_sequences is None:
            num_return_sequences = 1
        elif isinstance(num_return_sequences, bool) or not isinstance(num_return_sequences, int):
            raise ValueError(f"num_return_sequences must be a positive integer, got {num_return_sequences!r}")
        elif num_return_sequences < 1:
            raise ValueError(f"num_return_sequences must be a positive integer, got {num_return_sequences!r}")
        num_beams = self._generation_setting("num_beams", generation_config, kwargs) or 1
        prompt = inputs if inputs is not None else kwargs.pop("input_ids", None)
        if prompt is not None:
            self._check_input_ids(prompt, "input_ids" if inputs is None else "inputs")
        latent = self._latent_per_row(prompt, latent, latent_temperature, num_return_sequences, num_beams, kwargs)

        # one latent per returned sequence: with num_beams = 1 the prompts are expanded here, one row per returned
        # sequence, each with its own latent; with beam search the beams of a prompt share its latent
        if prompt is None and kwargs.get("inputs_embeds") is None:
            bos_token_id = self._generation_setting("bos_token_id", generation_config, kwargs)
            if bos_token_id is None:
                bos_token_id = self.config.bos_token_id
            if bos_token_id is None:
                raise ValueError("generate() without a prompt needs `bos_token_id` in the generation config")
            prompt = torch.full((latent.shape[0], 1), bos_token_id, dtype=torch.long, device=self.device)
        elif num_beams == 1 and num_return_sequences > 1:
            tensors = {key: value for key, value in kwargs.items() if isinstance(value, torch.Tensor)}
            prompt, tensors = self._expand_inputs_for_generation(num_return_sequences, False, prompt, **tensors)
            kwargs.update(tensors)
        if num_beams == 1 and num_return_sequences > 1:  # the rows are already one per returned sequence
            if generation_config is None:
                kwargs["num_return_sequences"] = 1
            else:  # in a copy of the user's config: generate() deprecates a config together with such keywords
                generation_config = copy.deepcopy(generation_config)
                generation_config.num_return_sequences = 1
                kwargs.pop("num_return_sequences", None)
        # the memory's states, computed once per call (each layer computes their keys and values)
        latent_memory = self.latent_memory(latent) if self.latent_memory is not None else None
        return super().generate(
            prompt, generation_config=generation_config, latent=latent, latent_memory=latent_memory, **kwargs
        )

    def _latent_per_row(self, prompt, latent, latent_temperature, num_return_sequences, num_beams, kwargs):
        """The latent of each row `generate` decodes, `(rows, latent_size)`: one per returned sequence with
        `num_beams` = 1, one per prompt with beam search; prior samples at `latent_temperature` where none is
        given."""
        if (
            isinstance(latent_temperature, bool)
            or not isinstance(latent_temperature, (int, float))
            or not math.isfinite(latent_temperature)
            or latent_temperature < 0
        ):
            raise ValueError(f"latent_temperature must be a finite number >= 0, got {latent_temperature!r}")
        if latent is not None:
            latent = self._check_latent(latent)  # (given_rows, latent_size)
        if prompt is not None:
            batch_size = prompt.shape[0]
        elif kwargs.get("inputs_embeds") is not None:
            batch_size = kwargs["inputs_embeds"].shape[0]
        elif latent is None:
            batch_size = 1
        elif num_beams == 1 and latent.shape[0] % num_return_sequences == 0:
            batch_size = latent.shape[0] // num_return_sequences
        else:
            batch_size = latent.shape[0]
        rows = batch_size * num_return_sequences if num_beams == 1 else batch_size
        if latent is None:
            return self.sample_prior(rows, temperature=latent_temperature, input_ids=prompt,
                                     attention_mask=kwargs.get("attention_mask"))  # fmt: skip
        if latent.shape[0] == batch_size and rows != batch_size:
            latent = latent.repeat_interleave(num_return_sequences, dim=0)
        elif num_beams > 1 and num_return_sequences > 1 and latent.shape[0] == batch_size * num_return_sequences:
            raise ValueError(
                f"latent has batch size {latent.shape[0]} = {batch_size} prompt(s) x num_return_sequences="
                f"{num_return_sequences}, but with beam search (num_beams={num_beams}) the beams of a prompt share "
                f"one latent: expected {batch_size} (one per prompt) or 1"
            )
        elif latent.shape[0] not in (1, rows) and rows != batch_size:
            raise ValueError(
                f"latent has batch size {latent.shape[0]}, which fits neither the {batch_size} prompt(s) nor "
                f"num_return_sequences={num_return_sequences}: expected {batch_size} (one per prompt), {rows} (one "
                f"per returned sequence) or 1"
            )
        return self._check_latent(latent, rows)

    def _generation_setting(self, name: str, generation_config, kwargs: dict):
        """The value `generate` will use for `name`: its keyword, else the given config's, else the model's."""
        for value in (kwargs.get(name), getattr(generation_config, name, None), getattr(self.generation_config, name)):
            if value is not None:
                return value
        return None

    @classmethod
    def from_llm(cls, model_or_path, **kwargs) -> "CVAELlamaForCausalLM":
        """Build a CVAE around a pretrained LLM of a supported architecture (`LlamaForCausalLM`,
        `MistralForCausalLM`, `Qwen2ForCausalLM` for Qwen2 and Qwen2.5, `Qwen3ForCausalLM`): a model object, a local
        folder or a Hub repo id.

        CVAE fields (`latent_size`, `decoder_mode`, ...) are taken from `kwargs`; the other keywords go to
        `from_pretrained` when a path is given. The decoder and the encoder's layers are copies of the LLM's weights
        (the encoder's embedding and the memory's key / value projections are the decoder's own); the LLM object
        passed in is not modified.

        A quantised LLM (`quantization_config=BitsAndBytesConfig(load_in_4bit=True, ...)`, or an LLM object loaded
        so) is not copied: its quantised decoder and head become the CVAE's, frozen (`decoder_mode` `"frozen"` or
        `"lora"`), the encoder's layers start from its dequantised weights, and the CVAE's own modules are built
        unquantised in the LLM's dtype. `config.base_model_quantization_config` records the quantisation, which the
        saved adapter's base is loaded with again.
        """
        cvae_fields = {key: kwargs.pop(key) for key in list(kwargs) if key in CVAE_FIELDS}
        if isinstance(model_or_path, PreTrainedModel):
            llm = model_or_path
        elif isinstance(model_or_path, str) or hasattr(model_or_path, "__fspath__"):
            from transformers import AutoModelForCausalLM

            llm = AutoModelForCausalLM.from_pretrained(model_or_path, **kwargs)
        else:
            raise ValueError(
                f"model_or_path must be a causal LM, a folder or a repo id, got {type(model_or_path).__name__}"
            )
        architecture = DECODER_ARCHITECTURES.get(getattr(llm.config, "model_type", None))
        if architecture is None or not isinstance(llm, architecture.causal_lm):
            supported = ", ".join(
                f"{arch.causal_lm.__name__} ({name!r})" for name, arch in DECODER_ARCHITECTURES.items()
            )
            raise ValueError(
                f"from_llm supports the causal LMs {supported}; got {type(llm).__name__} (model_type "
                f"{getattr(llm.config, 'model_type', None)!r})"
            )
        config = CVAELlamaConfig.from_base_config(llm.config, **cvae_fields)
        config._attn_implementation = llm.config._attn_implementation
        quantized = record_quantization(config, llm)
        if quantized and isinstance(model_or_path, PreTrainedModel):
            logger.warning(
                f"the LLM is quantised ({describe_quantization(config.base_model_quantization_config)}): the CVAE takes "
                "its decoder and head as they are (a quantised weight cannot be copied without doubling its memory), "
                "so the LLM object now runs with the CVAE's latent memory attached (without a latent, as before)"
            )
        # built where the LLM lives, in its dtype: an 8B CVAE built on CPU in float32 first takes minutes and 37 GB
        with torch.device(llm.device):
            model = cls._from_config(config, dtype=llm.dtype, llm=llm if quantized else None)
        model.adopt_quantization(llm)
        with torch.no_grad():
            if not quantized:
                _, unexpected = model.load_state_dict(llm.state_dict(), strict=False)
                if unexpected:
                    raise ValueError(f"the LLM has weights the CVAE's decoder does not: {unexpected[:5]}")
            model.encoder.init_from_llm(llm)
            if model.latent_memory is not None:
                model.latent_memory.init_from_llm(llm)
        model.generation_config = llm.generation_config.__class__.from_dict(llm.generation_config.to_dict())
        model._name_base(llm, kwargs)
        return model

    def _name_base(self, llm: PreTrainedModel, loading_kwargs: dict) -> None:
        """Record in the config the base LLM the decoder is (its name, revision and stored weights' fingerprint), so
        that `save_pretrained` can write an adapter on it; an LLM without stored safetensors weights gets no
        fingerprint."""
        name = getattr(llm, "name_or_path", None)
        if not name:
            return
        self.config.base_model_name_or_path = name
        revision = loading_kwargs.get("revision") or getattr(llm.config, "_commit_hash", None)
        hub_kwargs = {key: loading_kwargs[key] for key in BASE_HUB_ARGUMENTS if key in loading_kwargs}
        try:
            fingerprint = base_model_fingerprint(name, **hub_kwargs, **({"revision": revision} if revision else {}))
        except OSError as error:  # e.g. a name that is neither a folder nor a reachable repo
            logger.info(f"the base LLM {name!r} has no stored weights to fingerprint ({error})")
            fingerprint = None
        self.config.base_model_revision = revision
        self.config.base_model_fingerprint = fingerprint
        self._base_digest = self._decoder_digest()


__all__ = [
    "CVAELlamaForCausalLM",
    "CVAELlamaModel",
    "CVAELlamaPreTrainedModel",
    "CVAELlamaOutput",
    "CVAELlamaModelOutput",
    "CVAELlamaPosteriorEncoder",
    "CVAELlamaLatentMemory",
    "CVAELlamaLatentSkip",
    "ZeroInitLinear",
    "gaussian_kl",
    "reparameterize",
    "latent_memory_attention",
]
