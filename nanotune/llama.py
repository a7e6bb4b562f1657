"""Llama, the decoder today's open models share (SmolLM2, Llama 3.2, Qwen2.5, Mistral), in one file.

Read gpt2.py first: this is the same causal decoder, and only these changed since GPT-2.
- Positions are not learned vectors added to the tokens: each query and key is rotated by an angle
  that grows with its position (RoPE, `rotate_half` and `apply_rope`), so attention scores depend on
  how far apart two tokens are, and a model can run past the lengths it was trained on.
- RMSNorm instead of LayerNorm: scale each vector to unit root-mean-square, learn a gain; no mean
  subtracted, no bias. Cheaper, and as good.
- A gated MLP (SwiGLU): down(silu(gate(x)) * up(x)) instead of c_proj(gelu(c_fc(x))).
- Grouped-query attention: fewer key/value heads than query heads (SmolLM2-135M: 9 and 3), each
  key/value head shared by a group of query heads, so the key/value cache is that much smaller.
- No biases (except Qwen2's query, key and value projections); the output layer tied to the token
  embedding or not, as config.json says.
- Qwen3 is Qwen2 less its biases, plus an RMSNorm over each head's query and each head's key before
  RoPE (`q_norm`, `k_norm`): the scores' scale stays in hand however large the projections grow.
  Its head size is set on its own (`head_dim`, 128 in all sizes), not hidden_size / heads.
Gemma 3 changes more, and lives beside this file as a diff from it (gemma3.py).

Module names equal the Hugging Face checkpoint keys (`model.layers.0.self_attn.q_proj.weight`, ...),
so loading is a straight copy. Shapes: B batch, T time, C channels (hidden_size), nh query heads,
nkv key/value heads, hs head size.
"""
import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from . import gpt2, hub, tricks
from .errors import NanotuneError

MODEL_TYPES = ("llama", "qwen2", "mistral", "qwen3")
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM",
                 "qwen3": "Qwen3ForCausalLM"}
ROPE_TYPES = ("default", "linear", "llama3")


@dataclass
class LlamaConfig:
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None      # None: as many as query heads (no grouping)
    head_dim: int | None = None                 # None: hidden_size // num_attention_heads
    max_position_embeddings: int = 2048         # the longest context
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0                 # RoPE's base: the slowest rotation's wavelength
    rope_scaling: dict | None = None            # Llama 3.x: {"rope_type": "llama3", "factor": 32, ...}
    rope_parameters: dict | None = None         # newer configs: rope_theta and rope_scaling in one
    attention_bias: bool = False                # Llama: biases on q, k, v and o (rarely on)
    attention_dropout: float = 0.0
    mlp_bias: bool = False
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False
    sliding_window: int | None = None           # Mistral: attend to the last N positions only
    use_sliding_window: bool = False            # Qwen2: whether its sliding_window applies
    bos_token_id: int | list | None = None
    eos_token_id: int | list | None = None
    pad_token_id: int | list | None = None
    model_type: str = "llama"
    architectures: list = field(default_factory=lambda: ["LlamaForCausalLM"])
    extra: dict = field(default_factory=dict)   # the rest of config.json, kept for saving

    def __post_init__(self):
        hub.check_sizes(self, ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                               "num_attention_heads", "max_position_embeddings"))
        self.num_key_value_heads = self.num_key_value_heads or self.num_attention_heads
        self.head_dim = self.head_dim or self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise NanotuneError(f"num_attention_heads {self.num_attention_heads} is not a multiple of"
                                f" num_key_value_heads {self.num_key_value_heads} in config.json")
        if self.hidden_act != "silu":
            raise NanotuneError(f"hidden_act {self.hidden_act!r} in config.json is not supported; Llama-family"
                                " models use silu")
        if self.model_type == "qwen3" and self.use_sliding_window:
            raise NanotuneError("a Qwen3 config.json with use_sliding_window true is not supported (no released"
                                " Qwen3 uses it): set it to false")
        rope = self.rope()
        if rope.get("rope_type", "default") not in ROPE_TYPES:
            raise NanotuneError(f"RoPE scaling of type {rope.get('rope_type')!r} is not implemented (nanotune"
                                f" implements {', '.join(ROPE_TYPES)}): use a checkpoint without it")

    def rope(self) -> dict:
        """RoPE's settings in one dict: rope_type, rope_theta and the scaling's own numbers, from the
        newer `rope_parameters` or the older `rope_theta` + `rope_scaling`."""
        if self.rope_parameters:
            return {"rope_type": "default", "rope_theta": self.rope_theta} | self.rope_parameters
        scaling = self.rope_scaling or {}
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        return scaling | {"rope_type": kind, "rope_theta": self.rope_theta}

    @property
    def qkv_bias(self):
        return self.attention_bias or self.model_type == "qwen2"       # Qwen2: q, k, v biases always

    @property
    def qk_norm(self):
        return self.model_type == "qwen3"                              # Qwen3: each head's q and k normalised

    @property
    def window(self):
        """How many positions back attention may look, if the model limits it (None: all)."""
        if self.model_type == "mistral" or (self.model_type == "qwen2" and self.use_sliding_window):
            return self.sliding_window
        return None

    @property
    def context(self):
        return self.max_position_embeddings


class RMSNorm(nn.Module):
    """x / sqrt(mean(x²) + eps) * weight: every vector scaled to unit root-mean-square, then by a
    learned gain. In fp32 whatever the input, as the checkpoints were trained."""

    def __init__(self, size, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x):
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


# ---- rotary position embeddings (RoPE) ----------------------------------------------------------

def inverse_frequencies(cfg: LlamaConfig, rope=None):
    """(hs / 2,): the angle, per position, by which each pair of a head's channels turns: fast for
    the first pairs, slow for the last (base ** -(2i / hs)). Llama 3 slows the slowest ones further,
    so that its longer context still sees angles like those of its training. `rope`: settings other
    than the config's own (Gemma 3's local layers)."""
    rope, hs = rope or cfg.rope(), cfg.head_dim
    inv_freq = 1.0 / (rope["rope_theta"] ** (torch.arange(0, hs, 2, dtype=torch.int64, device="cpu").float() / hs))
    if rope["rope_type"] == "linear":
        return inv_freq / rope["factor"]
    if rope["rope_type"] == "llama3":
        factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
        old_context = rope["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_context / low, inv_freq / factor, inv_freq)   # long waves: slowed
        smooth = (old_context / wavelen - low) / (high - low)
        between = ~(wavelen < old_context / high) * ~(wavelen > old_context / low)      # medium: a blend
        return torch.where(between, (1 - smooth) * scaled / factor + smooth * scaled, scaled)
    return inv_freq


def rope_angles(inv_freq, position_ids):
    """cos and sin (B, T, hs) of every position's angles, each angle used for two channels."""
    freqs = position_ids[..., None].float() * inv_freq.to(position_ids.device)     # (B, T, hs / 2)
    angles = torch.cat((freqs, freqs), dim=-1)                                       # (B, T, hs)
    return angles.cos(), angles.sin()


def rotate_half(x):
    """(x1, x2) -> (-x2, x1), with x1 the first half of each head's channels and x2 the second:
    Hugging Face checkpoints pair channel i with channel i + hs/2 (not 2i with 2i + 1)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x, cos, sin):
    """Rotate each pair of channels of x (B, nh, T, hs) by its position's angle:
    (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin). A query at position m and a key at position n
    then meet at the angle m - n: the score depends on their distance, not where they are."""
    return x * cos[:, None] + rotate_half(x) * sin[:, None]


# ---- the blocks ---------------------------------------------------------------------------------

def repeat_kv(x, n_rep):
    """(B, nkv, T, hs) -> (B, nkv * n_rep, T, hs): each key/value head repeated for the n_rep query
    heads of its group, so that the attention below is GPT-2's, head for head."""
    B, nkv, T, hs = x.shape
    return x[:, :, None].expand(B, nkv, n_rep, T, hs).reshape(B, nkv * n_rep, T, hs)


def attention(q, k, v, mask, dropout_p):
    """Grouped-query attention: the keys and values repeated to the query heads, then GPT-2's
    attention (gpt2.attention: scores, mask, softmax, dropout, times v)."""
    if tricks.enabled("attention"):
        return tricks.causal_attention(q, k, v, mask, dropout_p)     # the fused kernel reads each group's k, v
    n_rep = q.size(1) // k.size(1)
    return gpt2.attention(q, repeat_kv(k, n_rep), repeat_kv(v, n_rep), mask, dropout_p)


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.n_head, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        C, qkv_bias = cfg.hidden_size, cfg.qkv_bias
        self.q_proj = nn.Linear(C, self.n_head * self.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(C, self.n_kv * self.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(C, self.n_kv * self.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(self.n_head * self.head_dim, C, bias=cfg.attention_bias)
        # Qwen3: an RMSNorm over each head's hs channels, its gain shared by the heads
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.dropout_p = cfg.attention_dropout

    def forward(self, x, cos, sin, mask, cache=None, layer=0):
        B, T, C = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)    # (B, nh, T, hs)
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)      # (B, nkv, T, hs)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)      # (B, nkv, T, hs)
        if self.q_norm is not None:                                                   # Qwen3: before the rotation
            q, k = self.q_norm(q), self.k_norm(k)                                     # over hs, head by head
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)                       # positions, as angles
        if cache is not None:
            k, v = cache.update(layer, k, v)                                          # (B, nkv, past + T, hs)
        y = attention(q, k, v, mask, self.dropout_p if self.training else 0.0)       # (B, nh, T, hs)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))


class MLP(nn.Module):
    """SwiGLU: silu(gate(x)) decides, channel by channel, how much of up(x) passes; down maps back."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """Pre-norm, as GPT-2's: x + attention(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, cache=None, layer=0):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, layer)
        return x + self.mlp(self.post_attention_layernorm(x))


class Llama(nn.Module):
    architectures, block_class, norm_class = ARCHITECTURES, Block, RMSNorm      # gemma3.Gemma3 has its own

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.model = nn.ModuleDict(dict(
            embed_tokens=nn.Embedding(config.vocab_size, config.hidden_size),
            layers=nn.ModuleList(self.block_class(config) for _ in range(config.num_hidden_layers)),
            norm=self.norm_class(config.hidden_size, config.rms_norm_eps),
        ))
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.register_buffer("inv_freq", inverse_frequencies(config), persistent=False)
        self.tie_weights()
        self.gradient_checkpointing = False   # recompute each block in backward to save memory

    def tie_weights(self):
        """The output layer is the token embedding matrix itself, where config.json says so."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def hidden_states(self, input_ids, attention_mask=None, position_ids=None, cache=None):
        """The final hidden states (B, T, C), before the output layer."""
        B, T = input_ids.shape
        past = cache.length if cache is not None else 0
        if past + T > self.config.context:
            raise NanotuneError(f"{past + T} tokens do not fit the model's context of {self.config.context}"
                                " positions: use a shorter input")
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=input_ids.device)[None]        # (1, T)
        mask = self.attention_mask(attention_mask, T, past, input_ids.device)
        x = self.model.embed_tokens(input_ids)                                  # (B, T, C): no position vectors
        # (B, T, hs), once a pass: the angles in fp32 (in bf16, position 1000's would be off by up to 2 radians),
        # their cos and sin in the model's precision, so that a bf16 query stays bf16 (as in transformers)
        cos, sin = (t.to(x.dtype) for t in rope_angles(self.inv_freq, position_ids))
        for i, block in enumerate(self.model.layers):
            if self.gradient_checkpointing and self.training:
                x = checkpoint(block, x, cos, sin, mask, use_reentrant=False)
            else:
                x = block(x, cos, sin, mask, cache, i)
        if cache is not None:
            cache.advance(T)
        return self.model.norm(x)

    def attention_mask(self, attention_mask, T, past, device):
        """GPT-2's mask (causal, padding masked; None: causal only), and with a sliding window
        (Mistral), no key more than `window` positions back either."""
        window = self.config.window
        if window is None or past + T <= window or (attention_mask is not None and attention_mask.dim() == 4):
            return None if attention_mask is None else gpt2.attention_mask_for(attention_mask, T, past, device)
        mask = gpt2.attention_mask_for(attention_mask, T, past, device) if attention_mask is not None else (
            gpt2.attention_mask_for(torch.ones(1, past + T, dtype=torch.long, device=device), T, past, device))
        q_pos = torch.arange(past, past + T, device=device)[:, None]
        return mask & (torch.arange(past + T, device=device)[None, :] > q_pos - window)

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None, output_layer=True):
        """Logits (B, T, vocab_size): at each position, scores for the next token. With
        output_layer=False, the hidden states (B, T, C) instead (for tricks.chunked_lm_loss_sum)."""
        hidden = self.hidden_states(input_ids, attention_mask, position_ids, cache)
        return self.lm_head(hidden) if output_layer else hidden

    def cache_layout(self):
        """(layers, key/value heads, head size): the key/value cache keeps the nkv heads, not repeated."""
        return self.config.num_hidden_layers, self.config.num_key_value_heads, self.config.head_dim

    # ---- Hub checkpoints -------------------------------------------------------------------
    def hub_to_name(self, key):
        if key.endswith("rotary_emb.inv_freq"):                  # a buffer some old files carry: computed here
            return None
        if key == "lm_head.weight" and self.config.tie_word_embeddings:
            return None                                          # tied: the same tensor as embed_tokens
        return key

    @classmethod
    def read_config(cls, folder):
        return hub.config_from_dict(LlamaConfig, hub.read_config(folder, MODEL_TYPES), folder / "config.json")

    @classmethod
    def from_pretrained(cls, name_or_path, dtype=torch.float32, device="cpu", quantize=None):
        """A Hub id or folder (or a GGUF file); `quantize` (a QuantConfig) swaps linear layers for
        8/4-bit ones as they load."""
        folder = hub.resolve(name_or_path)
        config = cls.read_config(folder)
        with torch.device("meta"):      # no memory for weights yet: the checkpoint fills them
            model = cls(config)
        model.inv_freq = inverse_frequencies(config).to(device)
        hub.load_weights(model, folder, model.hub_to_name, None, dtype, device, quantize=quantize)
        model.tie_weights()
        model.name_or_path = str(name_or_path)
        return model.eval()

    def save_pretrained(self, folder, state_dict=None):
        """config.json + model.safetensors, as transformers writes them (and loads them)."""
        state = state_dict if state_dict is not None else self.state_dict()
        tied = self.config.tie_word_embeddings
        tensors = {name: t for name, t in state.items() if not (tied and name == "lm_head.weight")}
        dtype = str(self.model.embed_tokens.weight.dtype).removeprefix("torch.")
        config = hub.config_to_dict(self.config) | {"architectures": [self.architectures[self.config.model_type]],
                                                    "dtype": dtype}
        hub.save_model(folder, config, tensors)
