"""GPT-2, the causal language model, in one file.

Module names equal the Hugging Face checkpoint keys (`transformer.h.0.attn.c_attn.weight`, ...),
so loading is nearly a straight copy. The differences are listed in one place, `hub_to_name`
and `CONV1D` below. Shapes: B batch, T time, C channels (n_embd), nh heads, hs head size.
"""
import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from . import hub, tricks
from .dropout import Dropout
from .errors import NanotuneError

ACTIVATIONS = {
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),   # GPT-2's own: the tanh approximation
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "relu": F.relu,
}


@dataclass
class GPT2Config:
    vocab_size: int = 50257
    n_positions: int = 1024        # longest context
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None     # MLP width; None means 4 * n_embd
    activation_function: str = "gelu_new"
    layer_norm_epsilon: float = 1e-5
    embd_pdrop: float = 0.1
    attn_pdrop: float = 0.1
    resid_pdrop: float = 0.1
    initializer_range: float = 0.02
    bos_token_id: int = 50256
    eos_token_id: int = 50256
    model_type: str = "gpt2"
    architectures: list = field(default_factory=lambda: ["GPT2LMHeadModel"])
    extra: dict = field(default_factory=dict)   # the rest of config.json, kept for saving

    def __post_init__(self):
        hub.check_sizes(self, ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"))
        if self.activation_function not in ACTIVATIONS:
            raise NanotuneError(f"activation_function {self.activation_function!r} in config.json is not"
                                f" supported; use one of {', '.join(ACTIVATIONS)}")
        extra = self.extra
        if (extra.get("scale_attn_by_inverse_layer_idx") or extra.get("reorder_and_upcast_attn")
                or extra.get("scale_attn_weights") is False):
            raise NanotuneError("this GPT-2 config uses attention scaling options nanotune does not implement"
                                " (scale_attn_by_inverse_layer_idx, reorder_and_upcast_attn,"
                                " scale_attn_weights=false)")
        if self.n_embd % self.n_head:
            raise NanotuneError(f"n_embd {self.n_embd} is not divisible by n_head {self.n_head} in config.json")

    @property
    def context(self):
        return self.n_positions


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPT2Config):
        super().__init__()
        self.n_head = cfg.n_head
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)   # query, key, value of all heads in one matmul
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.attn_pdrop = cfg.attn_pdrop
        self.resid_dropout = Dropout(cfg.resid_pdrop)

    def forward(self, x, mask, cache=None, layer=0):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        if cache is not None:
            k, v = cache.update(layer, k, v)                              # (B, nh, past + T, hs)
        y = attention(q, k, v, mask, self.attn_pdrop if self.training else 0.0)   # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)                  # heads side by side again
        return self.resid_dropout(self.c_proj(y))


def attention(q, k, v, mask, dropout_p):
    """softmax(q k^T / sqrt(hs)) v: each position's output is an average of the values, weighted
    by how well its query matches each key. Causal: a position may look at itself and the positions
    before it, never after (it is trained to predict what comes next). `mask` (B, 1, T, past + T) is
    True where a query may look, with padding masked too; None means no padding, causal only."""
    if tricks.enabled("attention"):
        return tricks.causal_attention(q, k, v, mask, dropout_p)         # the same in fused kernels
    T, S = q.size(-2), k.size(-2)                                         # S keys: `past` cached, then T
    if mask is None:
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)   # (T, S): key j <= query i
    att = (q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))              # (B, nh, T, S) scores
    att = att.masked_fill(~mask, float("-inf"))                           # no weight on the future or on padding
    att = F.softmax(att, dim=-1)                                          # each row: weights that sum to 1
    att = F.dropout(att, dropout_p)                                       # training: drop some weights (0 in eval)
    return att @ v                                                        # (B, nh, T, hs)


class MLP(nn.Module):
    def __init__(self, cfg: GPT2Config):
        super().__init__()
        inner = cfg.n_inner or 4 * cfg.n_embd
        self.c_fc = nn.Linear(cfg.n_embd, inner)
        self.act = ACTIVATIONS[cfg.activation_function]
        self.c_proj = nn.Linear(inner, cfg.n_embd)
        self.dropout = Dropout(cfg.resid_pdrop)

    def forward(self, x):
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))


class Block(nn.Module):
    """A pre-norm transformer block: x + attention(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: GPT2Config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self.mlp = MLP(cfg)

    def forward(self, x, mask, cache=None, layer=0):
        x = x + self.attn(self.ln_1(x), mask, cache, layer)
        return x + self.mlp(self.ln_2(x))


def attention_mask_for(attention_mask, T, past, device):
    """The attention mask, (B, 1, T, past + T): True where a query may look.

    `attention_mask` (B, past + T) is 1 for real tokens and 0 for padding; for examples packed side
    by side it numbers them instead (1, 1, 1, 2, 2, ..., 0 for padding), and a query may look only
    within its own example. Every position may also look at itself, so a padding row is never all
    False (that would give NaN, and NaN leaks into real positions through the values)."""
    if attention_mask is not None and attention_mask.dim() == 4:      # made whole already (the serving engine's)
        return attention_mask
    q_pos = torch.arange(past, past + T, device=device)[:, None]      # (T, 1)
    k_pos = torch.arange(past + T, device=device)[None, :]            # (1, past + T)
    mask = k_pos <= q_pos                                             # causal: the past and itself
    if attention_mask is not None:
        keys = attention_mask[:, None, None, :]                       # (B, 1, 1, past + T)
        queries = attention_mask[:, None, past:, None]                # (B, 1, T, 1)
        mask = mask & (keys != 0) & (keys == queries)                 # real keys of the query's own example
        mask = mask | (k_pos == q_pos)
    return mask if mask.dim() == 4 else mask[None, None]


class GPT2(nn.Module):
    def __init__(self, config: GPT2Config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),    # token embeddings
            wpe=nn.Embedding(config.n_positions, config.n_embd),   # position embeddings
            drop=Dropout(config.embd_pdrop),
            h=nn.ModuleList(Block(config) for _ in range(config.n_layer)),
            ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.tie_weights()
        self.gradient_checkpointing = False   # recompute each block in backward to save memory

    def tie_weights(self):
        """The output layer is the token embedding matrix itself (GPT-2 ties them)."""
        self.lm_head.weight = self.transformer.wte.weight

    def hidden_states(self, input_ids, attention_mask=None, position_ids=None, cache=None):
        """The final hidden states (B, T, C), before the output layer."""
        B, T = input_ids.shape
        past = cache.length if cache is not None else 0
        if past + T > self.config.n_positions:
            raise NanotuneError(f"{past + T} tokens do not fit GPT-2's context of {self.config.n_positions}"
                                " positions: use a shorter input")
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=input_ids.device)[None]   # (1, T)
        mask = None if attention_mask is None else attention_mask_for(attention_mask, T, past, input_ids.device)
        x = self.transformer.drop(self.transformer.wte(input_ids) + self.transformer.wpe(position_ids))  # (B, T, C)
        for i, block in enumerate(self.transformer.h):
            if self.gradient_checkpointing and self.training:
                x = checkpoint(block, x, mask, use_reentrant=False)
            else:
                x = block(x, mask, cache, i)
        if cache is not None:
            cache.advance(T)
        return self.transformer.ln_f(x)

    def cache_layout(self):
        """(layers, key/value heads, head size) of the key/value cache (generation.KVCache)."""
        return self.config.n_layer, self.config.n_head, self.config.n_embd // self.config.n_head

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None, output_layer=True):
        """Logits (B, T, vocab_size): at each position, scores for the next token. With
        output_layer=False, the hidden states (B, T, C) instead, for a loss that applies the
        output layer itself (tricks.output_layer_lm_loss_sum)."""
        hidden = self.hidden_states(input_ids, attention_mask, position_ids, cache)
        return self.lm_head(hidden) if output_layer else hidden

    # ---- Hub checkpoints -------------------------------------------------------------------
    # GPT-2 was written with "Conv1D" layers that store weights as (in, out), the transpose of
    # nn.Linear's (out, in). These four are transposed on load and back on save.
    CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")

    @staticmethod
    def hub_to_name(key):
        if key.endswith((".attn.bias", ".attn.masked_bias")):   # causal-mask buffers old files carry
            return None
        if key == "lm_head.weight":                             # tied: the same tensor as wte
            return None
        # The `gpt2` repo stores keys with no prefix (h.0..., wte...); GPT2LMHeadModel saves "transformer.".
        return key if key.startswith("transformer.") else "transformer." + key

    @classmethod
    def from_hub(cls, name, tensor):
        if not name.endswith(cls.CONV1D):
            return tensor
        if tricks.enabled("transposed_views"):    # a view of the file's bytes, no copy (tricks.own_memory)
            return tensor.t()
        return tensor.t().contiguous()            # (in, out) -> (out, in), a copy in nn.Linear's order

    @classmethod
    def from_pretrained(cls, name_or_path, dtype=torch.float32, device="cpu", quantize=None):
        """A Hub id or folder; `quantize` (a QuantConfig) swaps linear layers for 8/4-bit ones as they load."""
        folder = hub.resolve(name_or_path)
        config = hub.config_from_dict(GPT2Config, hub.read_config(folder, ("gpt2",)), folder / "config.json")
        with torch.device("meta"):      # no memory for weights yet: the checkpoint fills them
            model = cls(config)
        hub.load_weights(model, folder, cls.hub_to_name, cls.from_hub, dtype, device, quantize=quantize)
        model.tie_weights()
        model.name_or_path = str(name_or_path)
        return model.eval()

    def save_pretrained(self, folder, state_dict=None):
        """config.json + model.safetensors, as GPT2LMHeadModel writes them (transformers loads it).
        `state_dict`: the weights to write, if not the module's own (gathered from FSDP shards)."""
        state = state_dict if state_dict is not None else self.state_dict()
        tensors = {name: self.from_hub(name, t) for name, t in state.items() if name != "lm_head.weight"}
        dtype = str(self.transformer.wte.weight.dtype).removeprefix("torch.")
        config = hub.config_to_dict(self.config) | {"architectures": ["GPT2LMHeadModel"], "dtype": dtype}
        hub.save_model(folder, config, tensors)
