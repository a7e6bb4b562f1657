"""Gemma 3's text model (270M, 1B; the text half of 4B-27B), as a diff from llama.py.

Read llama.py first: the same decoder (RoPE, grouped-query attention, a gated MLP, RMSNorm), and
only these changed.
- RMSNorm multiplies by (1 + weight), with weight stored as an offset from 1 (a fresh gain is 0),
  and computes in fp32 up to the product, rounding once at the end.
- Four norms a block, not two: one before and one after attention, one before and one after the
  MLP (the residual stream adds normalised outputs, which keeps it tame in bf16).
- The MLP's gate is GELU (its tanh approximation), not SiLU: GeGLU instead of SwiGLU.
- The token embeddings are multiplied by sqrt(hidden_size) (in the embedding's own dtype, as
  transformers does), so that they start at the scale of the rest of the residual stream.
- Each head's query and key pass an RMSNorm before RoPE (as Qwen3's), and the scores are divided by
  sqrt(query_pre_attn_scalar) rather than sqrt(head_dim) (the two are equal in most sizes).
- Most layers are local: they look at the last `sliding_window` positions only (512 in the 1B),
  with a RoPE base of their own (`rope_local_base_freq`, 10,000); every sixth (`layer_types`, or
  the older `sliding_window_pattern`) is global, sees the whole context and has the long-context
  base (1,000,000, with `rope_scaling` in the larger sizes). The key/value cache keeps every
  position for every layer; the local layers' mask hides what is outside their window.
- The output layer is the token embedding (tied).

Module names equal the Hub keys of `Gemma3ForCausalLM`; the text part of a
`Gemma3ForConditionalGeneration` folder loads too (its vision tower is left out).
"""
import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from . import gpt2, hub, llama
from .errors import NanotuneError

MODEL_TYPES = ("gemma3_text", "gemma3")       # gemma3: the multimodal folder, its text_config read
ARCHITECTURES = {"gemma3_text": "Gemma3ForCausalLM"}
LOCAL, GLOBAL = "sliding_attention", "full_attention"


@dataclass
class Gemma3Config(llama.LlamaConfig):
    # transformers' Gemma3TextConfig defaults (the multimodal folders' text_config leaves most out)
    vocab_size: int = 262_208
    hidden_size: int = 2304
    intermediate_size: int = 9216
    num_hidden_layers: int = 26
    num_attention_heads: int = 8
    num_key_value_heads: int | None = 4
    head_dim: int | None = 256
    max_position_embeddings: int = 131_072
    rope_theta: float = 1_000_000.0             # the global layers' base
    rope_local_base_freq: float = 10_000.0      # the local layers' base
    hidden_act: str | None = None               # older configs' name for hidden_activation
    hidden_activation: str = "gelu_pytorch_tanh"
    query_pre_attn_scalar: float = 256
    sliding_window: int | None = 4096
    layer_types: list | None = None             # "sliding_attention" or "full_attention", per layer
    sliding_window_pattern: int = 6             # older configs: every 6th layer global
    final_logit_softcapping: float | None = None
    attn_logit_softcapping: float | None = None
    use_bidirectional_attention: bool | None = False
    tie_word_embeddings: bool = True
    model_type: str = "gemma3_text"
    architectures: list = field(default_factory=lambda: ["Gemma3ForCausalLM"])

    def __post_init__(self):
        hub.check_sizes(self, ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                               "num_attention_heads", "max_position_embeddings"))
        self.num_key_value_heads = self.num_key_value_heads or self.num_attention_heads
        self.head_dim = self.head_dim or self.hidden_size // self.num_attention_heads
        if self.layer_types is None:
            self.layer_types = [GLOBAL if (i + 1) % self.sliding_window_pattern == 0 else LOCAL
                                for i in range(self.num_hidden_layers)]
        activation = self.hidden_act or self.hidden_activation
        problems = [
            f"num_attention_heads {self.num_attention_heads} is not a multiple of num_key_value_heads"
            f" {self.num_key_value_heads}" if self.num_attention_heads % self.num_key_value_heads else "",
            f"hidden_activation {activation!r} (Gemma 3 uses gelu_pytorch_tanh)"
            if activation not in ("gelu_pytorch_tanh", "gelu_tanh") else "",
            f"layer_types names {len(self.layer_types)} layers, not num_hidden_layers {self.num_hidden_layers}"
            if len(self.layer_types) != self.num_hidden_layers or set(self.layer_types) - {LOCAL, GLOBAL} else "",
            "sliding_window is not set" if LOCAL in self.layer_types and not self.sliding_window else "",
            # the output layer is applied outside forward() (chunked loss, cached decoding, the server):
            # a cap there would be skipped, so no checkpoint with one is loaded rather than one run wrong
            "final_logit_softcapping (no released Gemma 3 sets it)" if self.final_logit_softcapping else "",
            "attn_logit_softcapping (no released Gemma 3 sets it)" if self.attn_logit_softcapping else "",
            "use_bidirectional_attention (an embedding model, not a language model)"
            if self.use_bidirectional_attention else ""]
        if any(problems):
            raise NanotuneError(f"config.json: {'; '.join(p for p in problems if p)}: nanotune does not"
                                " implement this Gemma 3 variant; use a Gemma 3 text checkpoint as released")
        for kind in (LOCAL, GLOBAL):
            rope = self.rope_for(kind)
            if rope.get("rope_type", "default") not in llama.ROPE_TYPES:
                raise NanotuneError(f"RoPE scaling of type {rope.get('rope_type')!r} is not implemented (nanotune"
                                    f" implements {', '.join(llama.ROPE_TYPES)}): use a checkpoint without it")
        # both spellings say the same, so that a folder saved here reads alike in older transformers
        # (rope_theta, rope_local_base_freq, rope_scaling) and newer (rope_parameters)
        full = self.rope_for(GLOBAL)
        self.rope_theta, self.rope_local_base_freq = full["rope_theta"], self.rope_for(LOCAL)["rope_theta"]
        if full["rope_type"] != "default":
            self.rope_scaling = {k: v for k, v in full.items() if k != "rope_theta"}

    def rope_for(self, kind) -> dict:
        """RoPE's settings of the local or the global layers: from the newer `rope_parameters`
        ({"full_attention": {...}, "sliding_attention": {...}}), else the older `rope_theta` +
        `rope_scaling` (global) and `rope_local_base_freq` (local, never scaled)."""
        if self.rope_parameters and kind in self.rope_parameters:
            theta = self.rope_local_base_freq if kind == LOCAL else self.rope_theta
            return {"rope_type": "default", "rope_theta": theta} | self.rope_parameters[kind]
        if kind == LOCAL:
            return {"rope_type": "default", "rope_theta": self.rope_local_base_freq}
        scaling = self.rope_scaling or {}
        return scaling | {"rope_type": scaling.get("rope_type", scaling.get("type", "default")),
                          "rope_theta": self.rope_theta}

    def rope(self) -> dict:
        return self.rope_for(GLOBAL)                  # llama.inverse_frequencies' default: the global layers'

    @property
    def qkv_bias(self):
        return self.attention_bias

    @property
    def qk_norm(self):
        return False                                  # Gemma's q_norm and k_norm are its own RMSNorm, below

    @property
    def window(self):
        return None                                   # no window for the whole model: per layer, below


class RMSNorm(nn.Module):
    """llama.RMSNorm with a gain of (1 + weight), all in fp32, rounded to x's dtype at the end."""

    def __init__(self, size, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(size))
        self.eps = eps

    def forward(self, x):
        y = x.float()
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * (1.0 + self.weight.float())).type_as(x)


class Attention(llama.Attention):
    """llama.Attention with Gemma's RMSNorm on each head's query and key, and its own score scale."""

    def __init__(self, cfg: Gemma3Config):
        super().__init__(cfg)
        self.q_norm, self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps), RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        # gpt2.attention divides the scores by sqrt(hs); Gemma divides by sqrt(query_pre_attn_scalar):
        # the queries scaled by sqrt(hs / query_pre_attn_scalar) make the one the other (1 when equal)
        self.q_scale = math.sqrt(cfg.head_dim / cfg.query_pre_attn_scalar)

    def forward(self, x, cos, sin, mask, cache=None, layer=0):
        B, T, C = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)    # (B, nh, T, hs)
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)      # (B, nkv, T, hs)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)      # (B, nkv, T, hs)
        q, k = self.q_norm(q), self.k_norm(k)                                         # before the rotation
        q, k = llama.apply_rope(q, cos, sin) * self.q_scale, llama.apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer, k, v)                                          # (B, nkv, past + T, hs)
        y = llama.attention(q, k, v, mask, self.dropout_p if self.training else 0.0)  # (B, nh, T, hs)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))


class MLP(llama.MLP):
    """GeGLU: llama.MLP with GELU (tanh approximation) as the gate."""

    def forward(self, x):
        return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))


class Block(nn.Module):
    """Still pre-norm, and each branch's output normalised again before it joins the residual:
    x + post_attn(attn(norm(x))), then x + post_ff(mlp(pre_ff(x)))."""

    def __init__(self, cfg: Gemma3Config):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.pre_feedforward_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)
        self.post_feedforward_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, mask, cache=None, layer=0):
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, layer))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class Gemma3(llama.Llama):
    architectures = ARCHITECTURES
    block_class, norm_class = Block, RMSNorm

    def __init__(self, config: Gemma3Config):
        super().__init__(config)
        # the global layers' angles are llama's inv_freq; the local layers' turn with their own base
        self.register_buffer("inv_freq_local", llama.inverse_frequencies(config, config.rope_for(LOCAL)),
                             persistent=False)

    def hidden_states(self, input_ids, attention_mask=None, position_ids=None, cache=None):
        """llama.Llama.hidden_states with scaled embeddings, and per layer the angles and the mask
        of its kind (local or global)."""
        B, T = input_ids.shape
        past = cache.length if cache is not None else 0
        if past + T > self.config.context:
            raise NanotuneError(f"{past + T} tokens do not fit the model's context of {self.config.context}"
                                " positions: use a shorter input")
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=input_ids.device)[None]        # (1, T)
        x = self.model.embed_tokens(input_ids)                                  # (B, T, C)
        x = x * torch.tensor(self.config.hidden_size ** 0.5, dtype=x.dtype)      # rounded as the embedding
        mask = self.attention_mask(attention_mask, T, past, input_ids.device)
        local_mask = self.local_mask(mask, attention_mask, T, past, position_ids, input_ids.device)
        angles = {GLOBAL: llama.rope_angles(self.inv_freq, position_ids),
                  LOCAL: llama.rope_angles(self.inv_freq_local, position_ids)}
        inputs = {GLOBAL: [t.to(x.dtype) for t in angles[GLOBAL]] + [mask],          # (B, T, hs) twice, the mask
                  LOCAL: [t.to(x.dtype) for t in angles[LOCAL]] + [local_mask]}
        for i, block in enumerate(self.model.layers):
            cos, sin, layer_mask = inputs[self.config.layer_types[i]]
            if self.gradient_checkpointing and self.training:
                x = checkpoint(block, x, cos, sin, layer_mask, use_reentrant=False)
            else:
                x = block(x, cos, sin, layer_mask, cache, i)
        if cache is not None:
            cache.advance(T)
        return self.model.norm(x)

    def local_mask(self, mask, attention_mask, T, past, position_ids, device):
        """The global layers' mask, and no key `sliding_window` or more places before its query
        (counted in places of the sequence, padding included, as transformers counts them)."""
        window = self.config.sliding_window
        if past + T <= window:
            return mask                                                  # the window holds everything
        keys = torch.arange(past + T, device=device)                     # (S,)
        if attention_mask is not None and attention_mask.dim() == 4:     # the serving engine's: each row's
            queries = position_ids[:, None, :, None]                     # keys start at its own place 0
        else:
            queries = torch.arange(past, past + T, device=device)[:, None]          # (T, 1)
        causal = mask if mask is not None else gpt2.attention_mask_for(None, T, past, device)
        return causal & (keys > queries - window)

    def hub_to_name(self, key):
        """Gemma3ForConditionalGeneration's text part: `model.language_model.` (or, in older files,
        `language_model.model.`) for `model.`; its vision tower and projector are not read."""
        for prefix in ("model.language_model.", "language_model.model."):
            if key.startswith(prefix):
                key = "model." + key.removeprefix(prefix)
        if key.startswith(("model.vision_tower.", "model.multi_modal_projector.", "vision_tower.",
                           "multi_modal_projector.")):
            return None
        return super().hub_to_name(key.removeprefix("language_model."))

    @classmethod
    def read_config(cls, folder):
        config = hub.read_config(folder, MODEL_TYPES)
        config = text_config(config) if config["model_type"] == "gemma3" else config
        return hub.config_from_dict(Gemma3Config, config, folder / "config.json")

    @classmethod
    def from_pretrained(cls, name_or_path, dtype=torch.float32, device="cpu", quantize=None):
        model = super().from_pretrained(name_or_path, dtype, device, quantize)
        model.inv_freq_local = llama.inverse_frequencies(model.config, model.config.rope_for(LOCAL)).to(device)
        return model


def text_config(config: dict) -> dict:
    """A Gemma3ForConditionalGeneration config.json -> its text model's, as Gemma3ForCausalLM reads it."""
    text = dict(config.get("text_config") or {})
    return text | {"model_type": "gemma3_text", "architectures": ["Gemma3ForCausalLM"],
                   "tie_word_embeddings": config.get("tie_word_embeddings", text.get("tie_word_embeddings", True))}
